"""Stage transcribe: real ASR with the shipped tiny.en model, VAD cutting, the
openai-whisper backend through its real loading path, model resolution."""

from __future__ import annotations

import pathlib
from pathlib import Path

import jiwer
import numpy as np
import pytest
import soundfile as sf
from whisper.normalizers import EnglishTextNormalizer
from whisper.tokenizer import LANGUAGES

from speechmill.pipeline.models import ModelNotFoundError, ModelSpec, resolve
from speechmill.pipeline.records import segment_id
from speechmill.pipeline.stage import StageContext
from speechmill.stages.demo_data import SENTENCES, synthesize
from speechmill.stages.transcribe import Transcribe, TranscribeConfig, vad_segments
from testkit.audio import speech_samples

NORM = EnglishTextNormalizer()


@pytest.fixture(scope="module")
def asr(tmp_path_factory: pytest.TempPathFactory) -> Transcribe:
    st = Transcribe(TranscribeConfig(cpu_threads=2),
                    StageContext("transcribe", str(tmp_path_factory.mktemp("run")),
                                 offline=True))
    st.setup()
    return st


def _row(path: Path, rid: str = "rec") -> dict:
    return {"id": rid, "audio_path": str(path), "offset": 0.0,
            "duration": sf.info(path).duration, "source_url": str(path)}


def test_wer_on_recorded_english(asr: Transcribe) -> None:
    refs, hyps = [], []
    for wav in speech_samples(("en",)):
        out = asr.run_row(_row(wav))
        assert out.reject is None, out.reject
        (o,) = out.outputs
        refs.append(NORM(wav.with_suffix(".txt").read_text()))
        hyps.append(NORM(o["text"]))
        assert o["language"] == "en" and o["id"] == "rec" and o["parent_id"] == "rec"
        assert o["words"] and all(w["end"] >= w["start"] >= 0 for w in o["words"])
        assert o["words"][-1]["end"] <= o["duration"] + 0.5
        assert set(o["scores"]) >= {"lid_prob", "asr_avg_logprob", "asr_compression_ratio",
                                    "asr_no_speech_prob"}
        # tiny.en detects no language: the probability was not measured, so it is null
        assert o["scores"]["lid_prob"] is None
        assert o["scores"]["asr_avg_logprob"] < 0
    wer = jiwer.wer(refs, hyps)
    print(f"tiny.en WER on pytest-audioeval English samples: {wer:.3f}")
    assert wer <= 0.10


def test_wer_on_piper_speech(asr: Transcribe, tmp_path: Path) -> None:
    refs, hyps = [], []
    for i, text in enumerate(SENTENCES):
        x, sr = synthesize(text)
        p = tmp_path / f"s{i}.wav"
        sf.write(p, x, sr)
        (o,) = asr.run_row(_row(p)).outputs
        refs.append(NORM(text))
        hyps.append(NORM(o["text"]))
    wer = jiwer.wer(refs, hyps)
    print(f"tiny.en WER on Piper (joe) speech: {wer:.3f}")  # measured 0.054
    assert wer <= 0.15


def _long_recording(tmp_path: Path) -> tuple[Path, list[str]]:
    """~75 s: the Piper sentences separated by 1.5 s pauses, at 24 kHz FLAC."""
    parts, texts = [], []
    for text in SENTENCES * 2:
        x, sr = synthesize(text)
        parts += [x, np.zeros(int(1.5 * sr), np.float32)]
        texts.append(text)
    import soxr

    y = soxr.resample(np.concatenate(parts), sr, 24000).astype(np.float32)
    p = tmp_path / "long.flac"
    sf.write(p, y, 24000)
    return p, texts


def test_log_mel_does_not_follow_the_blas_thread_count(asr: Transcribe) -> None:
    """A Ray actor runs NumPy's BLAS on one thread, a local run on all cores; Whisper's
    log-mel (a NumPy matmul) then differed in the last bit and beam search turned that into
    other words for the same clip. The stage computes it on one BLAS thread whatever the
    process has, so every executor gets the same features (and transcripts)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from testkit.audio import load_speech

    x = load_speech(10.0, 16000, seed=1).astype(np.float32)
    fe = asr.asr.model.feature_extractor
    with threadpool_limits(1, "blas"):
        one = fe(x)
    with threadpool_limits(2, "blas"):
        two = fe(x)
    np.testing.assert_array_equal(one, two)
    # and the process's own setting is left as it was
    with threadpool_limits(2, "blas"):
        fe(x)
        assert all(i["num_threads"] == 2 for i in threadpool_info() if i["user_api"] == "blas")


def test_long_file_is_cut_by_vad(asr: Transcribe, tmp_path: Path) -> None:
    p, texts = _long_recording(tmp_path)
    row = _row(p, "0123456789abcdef0123")
    assert row["duration"] > 60
    out = asr.run_row(row)
    assert out.reject is None
    segs = out.outputs
    assert 2 <= len(segs) <= 2 * len(texts)
    for s in segs:
        assert 0 < s["duration"] <= 30.0 + 1e-6
        assert s["id"] == segment_id(row["id"], s["offset"], s["offset"] + s["duration"])
        assert s["parent_id"] == row["id"]
    starts = [s["offset"] for s in segs]
    assert starts == sorted(starts)
    hyp = NORM(" ".join(s["text"] for s in segs))
    wer = jiwer.wer(NORM(" ".join(texts)), hyp)
    print(f"VAD-cut long file: {len(segs)} segments, WER {wer:.3f}")
    assert wer <= 0.2


def test_vad_windows_join_across_edges(tmp_path: Path, monkeypatch) -> None:
    p, _ = _long_recording(tmp_path)
    import speechmill.stages.transcribe as tr

    whole = vad_segments(str(p), 0.0, None, 30.0, 0.3, 0.5, 500, 200)
    monkeypatch.setattr(tr, "VAD_WINDOW_S", 7.0)  # many window edges inside speech
    windowed = tr.vad_segments(str(p), 0.0, None, 30.0, 0.3, 0.5, 500, 200)
    speech = sum(e - s for s, e in whole)
    speech_w = sum(e - s for s, e in windowed)
    assert speech_w == pytest.approx(speech, rel=0.1)
    assert all(e - s <= 30.0 for s, e in windowed)


def test_silence_is_no_speech_and_language_rules(asr: Transcribe, tmp_path: Path) -> None:
    sf.write(tmp_path / "quiet.wav", np.zeros(16000 * 40, np.float32), 16000)
    out = asr.run_row(_row(tmp_path / "quiet.wav"))
    assert out.reject is not None and out.reject["reason"] == "no_speech"
    st = Transcribe(TranscribeConfig(allowed_languages=["de"]),
                    StageContext("t", str(tmp_path)))
    st.asr, st.opts, st.model_name = asr.asr, asr.opts, "tiny.en"
    wav = speech_samples(("en",))[0]
    out = st.run_row(_row(wav))
    assert out.reject is not None and out.reject["reason"] == "language_not_allowed"


def test_openai_whisper_backend_loads_a_checkpoint(tmp_path: Path) -> None:
    """A randomly initialised tiny Whisper saved as a checkpoint and loaded through
    ``whisper.load_model(path)``, the path a user's ``model_path`` takes."""
    import torch
    import whisper
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2,
                           n_audio_layer=1, n_vocab=51864, n_text_ctx=64, n_text_state=32,
                           n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    ckpt = tmp_path / "tiny-random.pt"
    from dataclasses import asdict

    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, ckpt)
    assert whisper.load_model(str(ckpt)).dims == dims
    st = Transcribe(TranscribeConfig(backend="whisper", model_path=str(ckpt), beam_size=1,
                                     temperature=[0.0], language="en",
                                     word_timestamps=False),
                    StageContext("t", str(tmp_path), offline=True))
    st.setup()
    assert st.asr.resolved.source == "path"
    wav = speech_samples(("en",))[0]
    out = st.run_row(_row(wav))
    # random weights: whatever text comes out, the row is well-formed or an empty_text reject
    if out.reject is not None:
        assert out.reject["reason"] in {"empty_text"}
    else:
        (o,) = out.outputs
        assert o["language"] == "en" and isinstance(o["text"], str)
        assert o["asr_model"].startswith("whisper:")
        assert o["scores"]["lid_prob"] is None  # fixed language: nothing detected


def test_model_resolution_order(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SPEECHMILL_MODELS", raising=False)
    r = resolve(ModelSpec(backend="faster-whisper", name="tiny.en"), offline=True)
    assert r.source in {"package", "cache"} and pathlib.Path(r.location, "model.bin").exists()
    local = tmp_path / "models" / "faster-whisper" / "tiny.en"
    local.mkdir(parents=True)
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path / "models"))
    assert resolve(ModelSpec(backend="faster-whisper", name="tiny.en")).source == "local_dir"
    with pytest.raises(ModelNotFoundError) as e:
        resolve(ModelSpec(backend="faster-whisper", name="large-v3"), offline=True)
    msg = str(e.value)
    assert "large-v3" in msg and "SPEECHMILL_MODELS" in msg and "offline" in msg
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(ModelSpec(backend="whisper", path=str(tmp_path / "nope.pt")))


def test_batched_decoding_matches_sequential(asr: Transcribe, tmp_path: Path) -> None:
    import pyarrow as pa

    paths = list(speech_samples(("en",)))
    for i, text in enumerate(SENTENCES[:5]):
        x, sr = synthesize(text)
        paths.append(tmp_path / f"b{i}.wav")
        sf.write(paths[-1], x, sr)
    long_path, _ = _long_recording(tmp_path)
    rows = [_row(p, f"r{i:02d}") for i, p in enumerate([*paths, long_path])]
    st = Transcribe(TranscribeConfig(batched=True, decode_batch=4),
                    StageContext("t", str(tmp_path), offline=True))
    st.setup()
    res = st.process(pa.Table.from_pylist(rows))
    assert res.rejects.num_rows == 0
    got = {r["id"]: r for r in res.outputs.to_pylist()}
    seq = {o["id"]: o for row in rows for o in asr.run_row(row).outputs}
    assert set(got) == set(seq)  # same pieces, same ids (incl. the VAD-cut long file)
    wer = jiwer.wer([NORM(seq[k]["text"]) for k in sorted(seq)],
                    [NORM(got[k]["text"]) for k in sorted(seq)])
    print(f"batched vs sequential WER: {wer:.3f}")
    assert wer <= 0.05
    for k, r in got.items():
        assert r["words"] and r["words"][-1]["end"] <= r["duration"] + 0.5, k
        assert r["scores"]["lid_prob"] is None, k  # English-only model: not measured


def test_batched_needs_a_language(tmp_path: Path) -> None:
    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline.errors import ConfigError

    text = f"""
name: b
run_dir: {tmp_path}
stages:
  - {{id: i, uses: ingest, with: {{inputs: ["{tmp_path}"]}}}}
  - {{id: t, uses: transcribe, needs: i, with: {{batched: true, model: large-v3}}}}
"""
    with pytest.raises(ConfigError, match=r"stage 't'.*with.batched"):
        dagmod.loads(text)


# -- language ID: measured only where a detection ran; rules need a model that can ----------


@pytest.fixture(scope="module")
def multilingual_ct2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random multilingual faster-whisper model (vocabulary 51865)."""
    from tests.stages.whisper_models import make_multilingual_ct2

    return make_multilingual_ct2(tmp_path_factory.mktemp("ml-ct2"))


def test_multilingual_model_measures_lid_prob_only_when_it_detects(
        multilingual_ct2: Path, tmp_path: Path) -> None:
    from speechmill.stages.audio_models.asr import DecodeOptions, FasterWhisper, is_multilingual

    assert is_multilingual("faster-whisper", str(multilingual_ct2)) is True
    tiny = resolve(ModelSpec(backend="faster-whisper", name="tiny.en"), offline=True)
    assert is_multilingual("faster-whisper", tiny.location) is False
    fw = FasterWhisper(ModelSpec(backend="faster-whisper", path=str(multilingual_ct2),
                                 device="cpu"), offline=True, cpu_threads=2)
    assert fw.model.model.is_multilingual  # CTranslate2 agrees with the vocabulary size
    audio = sf.read(speech_samples(("fr",))[0], dtype="float32")[0]
    fast = dict(beam_size=1, temperature=(0.0,), word_timestamps=False)
    detected = fw.transcribe(audio, DecodeOptions(**fast))
    assert detected.language_prob is not None and 0.0 < detected.language_prob <= 1.0
    assert detected.language in LANGUAGES
    fixed = fw.transcribe(audio, DecodeOptions(language="fr", **fast))
    assert fixed.language == "fr" and fixed.language_prob is None
    (batched,) = fw.transcribe_batch([audio], DecodeOptions(language="fr", **fast))
    assert batched is None or batched.language_prob is None
    # through the stage: the row's lid_prob is the detection's probability
    st = Transcribe(TranscribeConfig(model_path=str(multilingual_ct2), device="cpu",
                                     beam_size=1, temperature=[0.0], word_timestamps=False),
                    StageContext("t", str(tmp_path), offline=True))
    st.setup()
    out = st.run_row(_row(speech_samples(("fr",))[0]))
    print("random multilingual model:", out.reject or [(o["language"], o["scores"]["lid_prob"])
                                                        for o in out.outputs])
    rows = out.outputs if out.reject is None else []
    assert out.reject is None or out.reject["reason"] == "empty_text"
    for o in rows:
        assert o["scores"]["lid_prob"] == pytest.approx(detected.language_prob, abs=1e-6)


def test_openai_whisper_lid_prob(tmp_path: Path) -> None:
    from speechmill.stages.audio_models.asr import DecodeOptions, OpenAIWhisper, is_multilingual
    from tests.stages.whisper_models import make_openai_whisper_checkpoint

    en = make_openai_whisper_checkpoint(tmp_path / "en.pt", multilingual=False)
    ml = make_openai_whisper_checkpoint(tmp_path / "ml.pt", multilingual=True)
    assert is_multilingual("whisper", str(en)) is False
    assert is_multilingual("whisper", str(ml)) is True
    audio = sf.read(speech_samples(("en",))[0], dtype="float32")[0]
    opts = DecodeOptions(beam_size=1, temperature=(0.0,), word_timestamps=False)
    res = OpenAIWhisper(ModelSpec(backend="whisper", path=str(en), device="cpu"),
                        offline=True).transcribe(audio, opts)
    assert res.language == "en" and res.language_prob is None  # English-only: no detection
    model = OpenAIWhisper(ModelSpec(backend="whisper", path=str(ml), device="cpu"),
                          offline=True)
    assert model.model.is_multilingual
    res = model.transcribe(audio, opts)
    assert res.language in LANGUAGES and 0.0 < res.language_prob <= 1.0


def _dag(tmp_path: Path, transcribe: str, filter_: str = "{}") -> str:
    return f"""
name: lid
run_dir: {tmp_path / 'run'}
stages:
  - {{id: i, uses: ingest, with: {{inputs: ["{tmp_path}"]}}}}
  - {{id: t, uses: transcribe, needs: i, with: {transcribe}}}
  - {{id: a, uses: annotate, needs: t}}
  - {{id: f, uses: filter, needs: a, with: {filter_}}}
"""


def test_language_rules_need_a_multilingual_model(tmp_path: Path, monkeypatch,
                                                  multilingual_ct2: Path) -> None:
    """Validation reads the model (its vocabulary), not its name: an English-only model
    under a multilingual-looking name is refused, a multilingual one named ``*.en`` is
    not; the filter's language rules are checked against the transcribe upstream."""
    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline.errors import ConfigError

    tiny = resolve(ModelSpec(backend="faster-whisper", name="tiny.en"), offline=True)
    models = tmp_path / "models" / "faster-whisper"
    models.mkdir(parents=True)
    (models / "large-v3").symlink_to(tiny.location)  # English-only, whatever its name
    (models / "mine.en").symlink_to(multilingual_ct2)  # multilingual, whatever its name
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path / "models"))

    def refused(transcribe: str, filter_: str, stage: str, key: str,
                why: str = "is English-only (read from its vocabulary)") -> str:
        with pytest.raises(ConfigError) as e:
            dagmod.loads(_dag(tmp_path, transcribe, filter_))
        msg = str(e.value)
        assert f"stage {stage!r}: key 'with.{key}'" in msg and why in msg, msg
        return msg

    refused("{allowed_languages: [en]}", "{}", "t", "allowed_languages")  # tiny.en
    refused("{min_language_prob: 0.5}", "{}", "t", "min_language_prob")
    refused("{model: large-v3, allowed_languages: [en, de]}", "{}", "t", "allowed_languages")
    msg = refused("{}", "{allowed_languages: [en]}", "f", "allowed_languages")
    assert "upstream stage 't'" in msg and "tiny.en" in msg
    refused("{model: large-v3}", "{min_language_prob: 0.8}", "f", "min_language_prob")
    fixed = "`language` is fixed to 'fr'"  # a fixed language: nothing detected
    refused(f"{{model_path: '{multilingual_ct2}', language: fr, min_language_prob: 0.5}}",
            "{}", "t", "min_language_prob", fixed)
    refused(f"{{model_path: '{multilingual_ct2}', language: fr}}",
            "{min_language_prob: 0.5}", "f", "min_language_prob", fixed)
    # a multilingual model: every rule is accepted, here and downstream
    ok = dagmod.loads(_dag(tmp_path, "{model: mine.en, allowed_languages: [en, fr], "
                                     "min_language_prob: 0.8}",
                           "{allowed_languages: [en], min_language_prob: 0.9}"))
    assert ok.stage("f").config.min_language_prob == 0.9
    dagmod.loads(_dag(tmp_path, f"{{model_path: '{multilingual_ct2}'}}",
                      "{allowed_languages: [en]}"))
    # a model that is not on this machine is not inspected (nothing downloads to validate)
    dagmod.loads(_dag(tmp_path, "{model: medium, allowed_languages: [en]}",
                      "{min_language_prob: 0.5}"))
    # openai-whisper checkpoints: dims.n_vocab decides
    from tests.stages.whisper_models import make_openai_whisper_checkpoint

    en = make_openai_whisper_checkpoint(tmp_path / "en.pt", multilingual=False)
    ml = make_openai_whisper_checkpoint(tmp_path / "ml.pt", multilingual=True)
    refused(f"{{backend: whisper, model_path: '{en}'}}", "{allowed_languages: [en]}",
            "f", "allowed_languages")
    dagmod.loads(_dag(tmp_path, f"{{backend: whisper, model_path: '{ml}', "
                                "allowed_languages: [en]}", "{allowed_languages: [en]}"))
