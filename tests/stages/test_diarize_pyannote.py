"""Stage ``diarize`` with ``backend: pyannote`` on a small random pyannote.audio 4 pipeline.

pyannote weights cannot be downloaded here, so :func:`make_pipeline_dir` builds the
layout ``pyannote/speaker-diarization-community-1`` has on the hub, from the library's
own classes with random weights: ``segmentation/pytorch_model.bin`` (a small powerset
``PyanNet``), ``embedding/pytorch_model.bin`` (``WeSpeakerResNet34``), ``plda/`` (random
``xvec_transform.npz`` + ``plda.npz``) and a ``config.yaml`` naming them as
``$model/<folder>``. The stage loads it through the same code a user's ``path:`` hits.
A random model diarizes arbitrarily, so the tests check plumbing: shapes, types, times
inside the file, the hints pyannote enforces, the files the chain writes, errors, and
that the hub token never leaks.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

# no usage metrics to pyannote.ai from tests (set before pyannote is first imported)
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
pytest.importorskip("pyannote.audio")
torch = pytest.importorskip("torch")

from speechmill.pipeline import dag as dagmod  # noqa: E402
from speechmill.pipeline.errors import ConfigError  # noqa: E402
from speechmill.pipeline.models import ModelNotFoundError  # noqa: E402
from speechmill.pipeline.runner import run  # noqa: E402
from speechmill.pipeline.stage import StageContext  # noqa: E402
from speechmill.pipeline.store import RunStore  # noqa: E402
from speechmill.stages import diarize_pyannote as dp  # noqa: E402
from speechmill.stages.diarize import Diarize, DiarizeConfig  # noqa: E402
from testkit.conversations import espeak_available, make_conversation  # noqa: E402

# the conversation is spoken by an eSpeak NG voice too; the config checks need no audio
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt)")

SECRET = "hf_SpeechmillTestToken0000SECRETdoNotLeak42"
EMBED_DIM = 256  # WeSpeakerResNet34
# columns the embed-cluster backend adds, which segment / link_speakers read
DIARIZE_COLUMNS = {"num_speakers", "turns", "overlaps", "speaker_embeddings", "diarizer"}
SEED = 3  # random weights whose output has non-overlapped speech and some overlap

CONFIG_YAML = """\
dependencies:
  pyannote.audio: 4.0.0
pipeline:
  name: pyannote.audio.pipelines.SpeakerDiarization
  params:
    clustering: VBxClustering
    segmentation: $model/segmentation
    segmentation_step: 1.0
    segmentation_batch_size: 8
    embedding: $model/embedding
    embedding_batch_size: 8
    embedding_exclude_overlap: true
    plda: $model/plda
params:
  clustering:
    threshold: 0.6
    Fa: 0.07
    Fb: 0.8
  segmentation:
    min_duration_off: 0.0
"""


def _save_checkpoint(model: torch.nn.Module, folder: Path) -> None:
    """Save ``model`` as the Lightning checkpoint ``Model.from_pretrained`` reads
    (weights, hyper-parameters, and the ``pyannote.audio`` section with its class and
    specifications that the model's own ``on_save_checkpoint`` writes)."""
    import lightning

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
            "pytorch-lightning_version": lightning.__version__}
    model.on_save_checkpoint(ckpt)
    torch.save(ckpt, folder / "pytorch_model.bin")


def make_pipeline_dir(root: Path, seed: int = SEED, config: str = CONFIG_YAML) -> Path:
    from pyannote.audio.core.task import Problem, Resolution, Specifications
    from pyannote.audio.models.embedding import WeSpeakerResNet34
    from pyannote.audio.models.segmentation import PyanNet

    torch.manual_seed(seed)
    seg = PyanNet(lstm={"hidden_size": 16, "num_layers": 1},
                  linear={"hidden_size": 16, "num_layers": 1})
    seg.specifications = Specifications(  # like segmentation-3.0: 3 speakers, <= 2 at once
        problem=Problem.MONO_LABEL_CLASSIFICATION, resolution=Resolution.FRAME,
        duration=5.0, classes=["spk1", "spk2", "spk3"], powerset_max_classes=2,
        permutation_invariant=True)
    seg.build()
    _save_checkpoint(seg, root / "segmentation")
    emb = WeSpeakerResNet34()
    emb.specifications = Specifications(problem=Problem.REPRESENTATION,
                                        resolution=Resolution.CHUNK, duration=5.0)
    _save_checkpoint(emb, root / "embedding")
    rng = np.random.default_rng(seed)
    lda_dim = 128  # PLDA's default LDA dimension
    (root / "plda").mkdir()
    np.savez(root / "plda" / "xvec_transform.npz", mean1=0.1 * rng.normal(size=EMBED_DIM),
             mean2=0.1 * rng.normal(size=lda_dim),
             lda=rng.normal(size=(EMBED_DIM, lda_dim)) / math.sqrt(EMBED_DIM))
    rot, _ = np.linalg.qr(rng.normal(size=(lda_dim, lda_dim)))
    np.savez(root / "plda" / "plda.npz", mu=0.1 * rng.normal(size=lda_dim), tr=rot,
             psi=np.sort(rng.uniform(0.5, 5.0, size=lda_dim))[::-1].copy())
    (root / "config.yaml").write_text(config)
    return root


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline_dir(tmp_path_factory.mktemp("pyannote") / "community-1-random")


@pytest.fixture(scope="module")
def conversation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """(folder with one 2-speaker conversation with overlapping turns, its duration)."""
    d = tmp_path_factory.mktemp("conv")
    import soundfile as sf

    make_conversation(d / "talk.wav", 2, 4, seed=0, overlap_s=0.6)
    return d, sf.info(d / "talk.wav").duration


def _row(path: Path, duration: float) -> dict:
    return {"id": "a" * 20, "audio_path": str(path), "offset": 0.0, "duration": duration,
            "sample_rate": 16000}


def _stage(tmp_path: Path, offline: bool = True, **cfg) -> Diarize:
    config = DiarizeConfig(backend="pyannote", **cfg)
    Diarize.validate_config(config)
    st = Diarize(config, StageContext("diarize", str(tmp_path), offline=offline))
    st.setup()
    return st


def _check_row(row: dict, duration: float) -> None:
    assert set(row) >= DIARIZE_COLUMNS and row["diarizer"] == "pyannote"
    turns, overlaps = row["turns"], row["overlaps"]
    assert turns and all(set(t) == {"start", "end", "speaker"} for t in turns)
    assert all(0.0 <= t["start"] < t["end"] <= duration + 1e-3 for t in turns)
    assert [t["start"] for t in turns] == sorted(t["start"] for t in turns)
    labels = [t["speaker"] for t in turns]
    order = list(dict.fromkeys(labels))
    assert order == [f"SPK{i}" for i in range(len(order))]  # first-appearance order
    assert row["num_speakers"] == len(order)
    for lab in order:  # one speaker's turns never overlap each other
        own = sorted((t["start"], t["end"]) for t in turns if t["speaker"] == lab)
        assert all(a[1] <= b[0] + 1e-3 for a, b in zip(own, own[1:], strict=False))
    for o in overlaps:  # an overlap region lies where two speakers' turns overlap
        assert 0.0 <= o["start"] < o["end"] <= duration + 1e-3
        active = {t["speaker"] for t in turns
                  if t["start"] <= o["start"] + 1e-3 and t["end"] >= o["end"] - 1e-3}
        assert len(active) >= 2, (o, active)
    embs = {e["speaker"]: np.asarray(e["embedding"]) for e in row["speaker_embeddings"]}
    # one per local speaker (pyannote's centroid, or the fallback), except for speakers
    # with too little speech to embed
    talk = {lab: sum(t["end"] - t["start"] for t in turns if t["speaker"] == lab)
            for lab in order}
    assert set(embs) <= set(order)
    assert {lab for lab, s in talk.items() if s >= dp.FALLBACK_MIN_S + 0.01} <= set(embs)
    for v in embs.values():
        assert v.shape == (EMBED_DIM,) and np.all(np.isfinite(v))
        assert abs(np.linalg.norm(v) - 1.0) < 1e-4


# --------------------------------------------------------------------------------------


@needs_espeak
def test_chain_diarize_segment_link_and_token_never_leaks(
        pipeline_dir: Path, conversation: tuple[Path, float], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]) -> None:
    d, duration = conversation
    monkeypatch.setenv("SPEECHMILL_TEST_HF", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="speechmill")
    run_dir = tmp_path / "run"
    dag = dagmod.loads(f"""
name: pyannote-chain
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{d}"]}}}}
  - {{id: diarize, uses: diarize, needs: ingest,
      with: {{backend: pyannote, path: "{pipeline_dir}", token_env: SPEECHMILL_TEST_HF,
              device: cpu}}}}
  - {{id: segment, uses: segment, needs: diarize, with: {{min_s: 0.5, max_s: 12.0}}}}
  - {{id: link, uses: link_speakers, needs: segment}}
""")
    res = run(dag, progress=False, offline=True)
    assert res.status == "succeeded"
    store = RunStore(run_dir)
    rows = store.read_outputs("diarize").to_pylist()
    assert len(rows) == 1 and store.read_rejects("diarize").num_rows == 0
    _check_row(rows[0], duration)
    assert rows[0]["overlaps"], "the random model marks some overlapped speech"

    # segment takes the output as it takes embed-cluster's: every diarized file ends in
    # segments or rejects with segment's own reasons, never in an error
    segs = store.read_outputs("segment").to_pylist()
    seg_rej = store.read_rejects("segment").to_pylist()
    assert {r["reason"] for r in seg_rej} <= {"overlap", "too_short", "no_speech",
                                               "no_segments"}
    assert segs, "non-overlapped speech becomes segments"
    embs = {e["speaker"]: e["embedding"] for e in rows[0]["speaker_embeddings"]}
    turns = rows[0]["turns"]
    for s in segs:
        assert s["parent_id"] == rows[0]["id"]
        assert s["speaker_local"] in embs and s["speaker_embedding"] == embs[s["speaker_local"]]
        assert 0.5 <= s["duration"] <= 12.0 + 0.11
        # a segment holds its speaker's speech (segment merges a speaker's consecutive
        # turns) and never another speaker's turn (beyond its 0.05 s padding)
        a0, b0 = s["offset"], s["offset"] + s["duration"]
        spoken = {t["speaker"] for t in turns if min(t["end"], b0) - max(t["start"], a0) > 0.1}
        assert spoken == {s["speaker_local"]}, (a0, b0, turns)
        # a segment never spans overlapped speech (overlaps are cut out, not merged over)
        for o in rows[0]["overlaps"]:
            assert o["end"] <= s["offset"] + 1e-3 or o["start"] >= s["offset"] + s["duration"] - 1e-3
    linked = store.read_outputs("link").to_pylist()
    assert len(linked) == len(segs) and all(s["speaker"].startswith("spk-") for s in linked)

    # the token: in no file of the run, in no log record, on no output stream
    dag_yaml = (run_dir / "dag.yaml").read_text()
    assert "token_env" in dag_yaml
    out, err = capfd.readouterr()
    leaks = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


@needs_espeak
def test_speaker_hints(pipeline_dir: Path, conversation: tuple[Path, float],
                       tmp_path: Path) -> None:
    d, duration = conversation
    batch = pa.Table.from_pylist([_row(d / "talk.wav", duration)])
    two = _stage(tmp_path, path=str(pipeline_dir), num_speakers=2).process(batch)
    assert two.rejects.num_rows == 0
    row = two.outputs.to_pylist()[0]
    _check_row(row, duration)
    assert 1 <= row["num_speakers"] <= 2
    one = _stage(tmp_path, path=str(pipeline_dir), max_speakers=1).process(batch)
    row = one.outputs.to_pylist()[0]
    _check_row(row, duration)
    # at most one speaker at a time: one label, no overlapped speech
    assert row["num_speakers"] == 1 and row["overlaps"] == []


@needs_espeak
def test_output_mapping_from_a_stubbed_pipeline_output(pipeline_dir: Path,
                                                       conversation: tuple[Path, float]) -> None:
    """Exactly what the adapter makes of pyannote's output: labels by first appearance,
    times clipped to the audio, overlaps, centroids normalised, and a NaN centroid
    replaced by an embedding of the speaker's non-overlapped speech; hints passed on."""
    import threading

    import soundfile as sf
    from pyannote.audio.pipelines.speaker_diarization import DiarizeOutput
    from pyannote.core import Annotation, Segment

    real = dp.load(dp.locate("x", str(pipeline_dir), offline=True, stage="diarize"),
                   token_env="HF_TOKEN", device="cpu", stage="diarize").pipeline
    ann, excl = Annotation(), Annotation()
    ann[Segment(0.5, 3.0)] = excl[Segment(0.5, 2.5)] = "SPEAKER_01"
    ann[Segment(2.5, 6.0)] = excl[Segment(3.0, 6.0)] = "SPEAKER_00"
    ann[Segment(7.0, 12.0)] = excl[Segment(7.0, 12.0)] = "SPEAKER_01"  # past the end
    cent = np.zeros((2, EMBED_DIM))
    cent[0] = np.nan  # SPEAKER_00 (labels are sorted)
    cent[1, :2] = [3.0, 4.0]
    hints: list[dict] = []

    class Stub:
        _embedding = real._embedding

        def __call__(self, file: dict, **kw) -> DiarizeOutput:
            assert file["waveform"].shape == (1, 10 * 16000) and file["sample_rate"] == 16000
            hints.append(kw)
            return DiarizeOutput(ann, excl, cent)

    audio = sf.read(conversation[0] / "talk.wav", dtype="float32")[0][: 10 * 16000]
    res = dp.PyannoteDiarizer(Stub(), threading.Lock(), dp._Secret(None)).diarize(
        audio, 16000, min_speakers=1, max_speakers=3)
    assert hints == [{"min_speakers": 1, "max_speakers": 3}]
    assert res.turns == [(0.5, 3.0, "SPK0"), (2.5, 6.0, "SPK1"), (7.0, 10.0, "SPK0")]
    assert res.overlaps == [(2.5, 3.0)]
    assert np.allclose(res.embeddings["SPK0"][:3], [0.6, 0.8, 0.0])
    alone = real._embedding(torch.from_numpy(audio[3 * 16000: 6 * 16000])[None, None])[0]
    assert np.allclose(res.embeddings["SPK1"], alone / np.linalg.norm(alone), atol=1e-5)


@needs_espeak
def test_hub_pipeline_gets_token_from_env_and_errors_are_scrubbed(
        pipeline_dir: Path, conversation: tuple[Path, float], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A hub id (not cached, online) is handed to pyannote with the token from
    ``token_env``; pyannote's loader is stubbed to load the local random pipeline."""
    import huggingface_hub.constants
    from pyannote.audio import Pipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("MY_HF", SECRET)
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="speechmill")
    original = Pipeline.from_pretrained
    calls: list[tuple[str, str | None]] = []

    def fake_from_pretrained(checkpoint, token=None, **kw):
        calls.append((str(checkpoint), token))
        return original(str(pipeline_dir), token=token)

    monkeypatch.setattr(Pipeline, "from_pretrained", fake_from_pretrained)
    name = "speechmill-test/gated-pipeline"
    st = _stage(tmp_path, offline=False, pipeline=name, token_env="MY_HF")
    assert calls == [(name, SECRET)]
    d, _ = conversation
    out = st.process(pa.Table.from_pylist([_row(d / "talk.wav", 8.0)]))  # the first 8 s
    assert out.rejects.num_rows == 0
    _check_row(out.outputs.to_pylist()[0], 8.0)

    def failing(checkpoint, token=None, **kw):
        raise OSError(f"401 Client Error for {checkpoint} with token {token}")

    monkeypatch.setattr(Pipeline, "from_pretrained", failing)
    with pytest.raises(ModelNotFoundError) as ei:
        _stage(tmp_path, offline=False, pipeline="speechmill-test/other", token_env="MY_HF")
    msg = str(ei.value)
    assert "stage 'diarize', key 'with.pipeline'" in msg and "401" in msg
    assert SECRET not in msg and "<redacted>" in msg
    assert SECRET not in caplog.text


@needs_espeak
def test_offline_without_model_fails_fast(conversation: tuple[Path, float],
                                          pipeline_dir: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.delenv("SPEECHMILL_MODELS", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    d, _ = conversation

    def dag(with_: str, run_dir: Path) -> dagmod.Dag:
        return dagmod.loads(f"""
name: offline
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{d}"]}}}}
  - {{id: diar, uses: diarize, needs: ingest, with: {with_}}}
""")

    # the default hub pipeline, not cached, offline: stops before any file is diarized
    t = time.monotonic()
    with pytest.raises(ModelNotFoundError) as ei:
        run(dag("{backend: pyannote}", tmp_path / "r1"), progress=False, offline=True)
    assert time.monotonic() - t < 20
    msg = str(ei.value)
    assert "stage 'diar', key 'with.pipeline'" in msg
    assert dp.DEFAULT_PIPELINE in msg and "offline" in msg and "path" in msg
    store = RunStore(tmp_path / "r1")
    assert not store.output_parts("diar") and store.read_rejects("diar").num_rows == 0

    # a path that does not exist
    with pytest.raises(ModelNotFoundError, match=r"(?s)stage 'diar', key 'with.path'.*does not exist"):
        run(dag(f"{{backend: pyannote, path: {tmp_path / 'nope'}}}", tmp_path / "r2"),
            progress=False, offline=True)

    # a local config.yaml that still names hub models: refused offline, naming them
    hub_cfg = tmp_path / "hubcfg"
    hub_cfg.mkdir()
    (hub_cfg / "config.yaml").write_text(
        CONFIG_YAML.replace("$model/segmentation", "pyannote/segmentation-3.0")
        .replace("$model/embedding", str(pipeline_dir / "embedding"))  # local: fine
        .replace("    plda: $model/plda\n", ""))  # pyannote's default PLDA: the hub
    with pytest.raises(ModelNotFoundError) as ei:
        dp.locate(dp.DEFAULT_PIPELINE, str(hub_cfg), offline=True, stage="diar")
    msg = str(ei.value)
    assert "key 'with.path'" in msg and "pyannote/segmentation-3.0" in msg and "plda" in msg
    assert "embedding" not in msg
    assert dp.locate("x", str(hub_cfg / "config.yaml"), offline=False, stage="d").source == "path"
    # ... and a directory whose config names missing folders
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text(CONFIG_YAML)
    with pytest.raises(ModelNotFoundError, match="do not exist"):
        dp.locate(dp.DEFAULT_PIPELINE, str(broken), offline=False, stage="diar")
    # the random pipeline itself resolves offline, from `path` or $SPEECHMILL_MODELS
    assert dp.locate("x", str(pipeline_dir), offline=True, stage="diar").source == "path"
    models = tmp_path / "models"
    (models / "pyannote" / "me").mkdir(parents=True)
    (models / "pyannote" / "me" / "community-1").symlink_to(pipeline_dir)
    monkeypatch.setenv("SPEECHMILL_MODELS", str(models))
    assert dp.locate("me/community-1", None, offline=True, stage="diar").source == "local_dir"


def test_backend_keys_are_checked(tmp_path: Path) -> None:
    def load(with_: str) -> None:
        dagmod.loads(f"""
name: keys
run_dir: {tmp_path}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{tmp_path}"]}}}}
  - {{id: diarize, uses: diarize, needs: ingest, with: {with_}}}
""")

    with pytest.raises(ConfigError, match=r"stage 'diarize'.*with\.path.*pyannote"):
        load("{path: /models/p}")  # embed-cluster is the default backend
    with pytest.raises(ConfigError, match=r"with\.window_s.*embed-cluster"):
        load("{backend: pyannote, window_s: 2.0}")
    with pytest.raises(ConfigError, match=r"with\.backend"):
        load("{backend: nemo}")
    load("{backend: pyannote, num_speakers: 2, token_env: MY_TOKEN, device: cpu}")
