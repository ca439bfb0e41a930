"""Benchmark: utterances/s of every exporter and tokenizer on CPU.

Usage::

    python benchmarks/export.py --recordings 12 --per-recording 5 --workdir /tmp/bexport
    python benchmarks/export.py --skip-codecs          # exporters + k-means units only

What it does
------------
1. **Inputs.** Real speech (Piper's joe voice and, with eSpeak NG installed, two more
   voices), ``--recordings`` 24 kHz FLAC files of ``--per-recording`` sentences each, and
   one segment row per sentence (offset/duration into its recording, text, speaker,
   words, scores): what ``filter`` leaves (``tests/manifests/segments_factory.py``).
   A ``split`` column is added by the ``split`` stage's own assignment.
2. **Baseline.** A plain loop over the same rows that reads each clip (seek + decode,
   the same ``read_clip`` the exporters use) and encodes it to 16-bit FLAC bytes in
   memory: the least work an export that carries audio can do. Its utterances/s is the
   reference every exporter is divided by (``vs baseline``).
3. **Exporters.** Each sink stage's ``export()`` over the whole table into a fresh
   directory (what the engine calls, without its bookkeeping): ``nemo`` (offsets, no
   audio copied), ``nemo`` tarred, ``lhotse``, ``lhotse_shar`` (audio + token fields),
   ``parquet`` (Hugging Face, FLAC bytes), ``shards`` (speechgpt layout).
4. **Tokenizers.** Encode every clip with each audio tokenizer: ``kmeans-mel`` (codebook
   fitted first, fit time shown apart), and SNAC / Mimi / EnCodec / HuBERT+k-means built
   at their *published* sizes with random weights (real compute cost; weights cannot be
   downloaded here) and loaded through the same loader a DAG uses; plus whisper text
   ids. ``x realtime`` = audio seconds / wall seconds. The ``tokenize`` stage itself
   (one worker, in process) is compared with a plain loop that reads each clip and
   encodes it with the same tokenizer.
Numbers are medians over ``--repeat`` runs; this machine's other load shows in them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _median_time(fn: Any, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_inputs(workdir: Path, recordings: int, per: int) -> Any:
    import pyarrow.parquet as pq

    from tests.manifests.segments_factory import make_segments

    cache = workdir / "segments.parquet"
    want = {"recordings": recordings, "per": per}
    meta = workdir / "segments.json"
    if cache.exists() and meta.exists() and json.loads(meta.read_text()) == want:
        return pq.read_table(cache)
    shutil.rmtree(workdir / "audio", ignore_errors=True)
    t = make_segments(workdir / "audio", n_recordings=recordings, per_recording=per)
    pq.write_table(t, cache)
    meta.write_text(json.dumps(want))
    return t


def _ctx(sid: str, run_dir: Path, prepared: Any = None) -> Any:
    from speechmill.pipeline.stage import StageContext

    return StageContext(stage_id=sid, run_dir=str(run_dir), offline=True, prepared=prepared)


def with_splits(table: Any) -> Any:
    from speechmill.manifests.splits import Split, SplitConfig

    cfg = SplitConfig(dev_fraction=0.1, test_fraction=0.1)
    st = Split(cfg, _ctx("split", Path("."), Split.prepare(cfg, table)))
    return st.process(table).outputs


def baseline(table: Any) -> None:
    from speechmill.manifests.common import encode_audio, read_clip

    for row in table.to_pylist():
        x, sr = read_clip(row)
        encode_audio(x, sr, "flac")


def run_sink(cls: Any, cfg: dict[str, Any], table: Any, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    st = cls(cls.Config(**cfg), _ctx(out.name, out.parent))
    st.setup()
    res = st.export(table, out)
    st.teardown()
    if res.rejects is not None and res.rejects.num_rows:
        raise SystemExit(f"{out.name}: {res.rejects.num_rows} rejects")


def build_codecs(d: Path) -> dict[str, Path]:
    """Published-size configs, random weights, saved the way the loaders read them."""
    import torch
    from snac import SNAC
    from transformers import (
        EncodecConfig,
        EncodecModel,
        HubertConfig,
        HubertModel,
        MimiConfig,
        MimiModel,
    )

    out = {}
    torch.manual_seed(0)
    p = d / "snac_24khz"
    if not (p / "pytorch_model.bin").exists():
        conf = {"sampling_rate": 24000, "encoder_dim": 48, "encoder_rates": [2, 4, 8, 8],
                "decoder_dim": 1024, "decoder_rates": [8, 8, 4, 2], "attn_window_size": None,
                "codebook_size": 4096, "codebook_dim": 8, "vq_strides": [4, 2, 1],
                "noise": True, "depthwise": True}
        p.mkdir(parents=True, exist_ok=True)
        (p / "config.json").write_text(json.dumps(conf))
        torch.save(SNAC(**conf).state_dict(), p / "pytorch_model.bin")
    out["snac"] = p
    for name, cfg_cls, model_cls in (("mimi", MimiConfig, MimiModel),
                                     ("encodec_24khz", EncodecConfig, EncodecModel),
                                     ("hubert-base", HubertConfig, HubertModel)):
        p = d / name
        if not (p / "config.json").exists():
            model_cls(cfg_cls()).save_pretrained(p)
        out[name] = p
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recordings", type=int, default=12)
    ap.add_argument("--per-recording", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("runs/bench-export"))
    ap.add_argument("--skip-codecs", action="store_true")
    args = ap.parse_args()
    import numpy as np

    from speechmill.manifests.common import read_clip
    from speechmill.manifests.lhotse_export import LhotseExport, LhotseShar
    from speechmill.manifests.nemo import NemoManifest
    from speechmill.manifests.parquet_export import ParquetExport
    from speechmill.manifests.shards import Shards
    from speechmill.manifests.tokenize import Tokenize, TokenizeConfig
    from speechmill.manifests.tokenizers.base import (
        AudioTokenizerConfig,
        TextTokenizerConfig,
        load_audio_tokenizer,
        load_text_tokenizer,
    )

    wd = args.workdir
    wd.mkdir(parents=True, exist_ok=True)
    table = with_splits(make_inputs(wd, args.recordings, args.per_recording))
    n = table.num_rows
    audio_s = float(sum(table.column("duration").to_pylist()))
    print(f"{n} utterances, {audio_s / 60:.1f} min of audio, {args.repeat} repeats\n")

    base = _median_time(lambda: baseline(table), args.repeat)
    rows: list[tuple[str, float, str]] = [("baseline: read + FLAC-encode loop", n / base, "")]

    # tokenize once (k-means units + whisper text ids) so token-carrying exports have input
    tcfg = TokenizeConfig(audio=AudioTokenizerConfig(n_units=100, fit_max_frames=50_000),
                          text=TextTokenizerConfig(backend="whisper"))
    shutil.rmtree(wd / "fit", ignore_errors=True)  # a kept codebook would be reused
    t0 = time.perf_counter()
    prepared = Tokenize.prepare(tcfg, table, _ctx("tokenize", wd / "fit"))
    fit_s = time.perf_counter() - t0
    tok = Tokenize(tcfg, _ctx("tokenize", wd, prepared))
    tok.setup()
    tokenized = tok.process(table).outputs
    tok.teardown()

    sinks = [
        ("nemo (offsets)", NemoManifest, {}, table),
        ("nemo tarred", NemoManifest, {"tarred": True, "shard_size": 50}, table),
        ("lhotse", LhotseExport, {}, table),
        ("lhotse_shar (+tokens)", LhotseShar, {"shard_size": 50}, tokenized),
        ("parquet (HF datasets)", ParquetExport, {}, table),
        ("shards (speechgpt)", Shards, {"layout": "speechgpt"}, tokenized),
    ]
    for label, cls, cfg, inp in sinks:
        out = wd / "out" / label.split()[0]
        secs = _median_time(lambda cls=cls, cfg=cfg, inp=inp, out=out:
                            run_sink(cls, cfg, inp, out), args.repeat)
        rows.append((f"export {label}", n / secs, f"{(n / secs) / (n / base):.2f}x"))

    clips = [read_clip(r) for r in table.to_pylist()]

    def encode_all(t: Any) -> None:
        for x, sr in clips:
            t.encode(x, sr)

    km = load_audio_tokenizer(tcfg.audio.model_copy(update={"codebook": prepared["codebook"]}))
    secs = _median_time(lambda: encode_all(km), args.repeat)
    rows.append(("tokenizer kmeans-mel (100 units)", n / secs,
                 f"{audio_s / secs:.0f}x realtime; fit {fit_s:.1f} s"))

    def stage_run() -> None:
        st = Tokenize(TokenizeConfig(audio=km_cfg, text=None), _ctx("t", wd))
        st.setup()
        st.process(table)
        st.teardown()

    km_cfg = tcfg.audio.model_copy(update={"codebook": prepared["codebook"]})

    def read_encode_loop() -> None:
        sr = km.info.sample_rate
        for r in table.to_pylist():
            x, _ = read_clip(r, sample_rate=sr)
            km.encode(x, sr)

    s_loop = _median_time(read_encode_loop, args.repeat)
    s_stage = _median_time(stage_run, args.repeat)
    rows.append(("plain loop: read clip + kmeans-mel encode", n / s_loop, ""))
    rows.append(("tokenize stage (kmeans-mel), one worker", n / s_stage,
                 f"{(n / s_stage) / (n / s_loop):.2f}x of the plain loop"))
    text = load_text_tokenizer(TextTokenizerConfig(backend="whisper"))
    texts = table.column("text").to_pylist()
    secs = _median_time(lambda: [text.encode(t) for t in texts], args.repeat)
    rows.append(("text tokenizer whisper", n / secs, ""))

    if not args.skip_codecs:
        paths = build_codecs(wd / "codecs")
        import numpy as np  # noqa: F811

        specs = [("snac", "snac", {}), ("mimi", "mimi", {}),
                 ("encodec", "encodec_24khz", {}), ("hubert-kmeans", "hubert-base", {})]
        for backend, key, extra in specs:
            cfg = AudioTokenizerConfig(backend=backend, path=str(paths[key]), device="cpu",
                                       **extra)
            t = load_audio_tokenizer(cfg, offline=True)
            if backend == "hubert-kmeans":
                rng = np.random.default_rng(0)
                t.codebook = rng.normal(size=(500, 768)).astype(np.float32)
            few = clips[: min(len(clips), 12)]
            few_s = sum(len(x) / sr for x, sr in few)

            def enc(t: Any = t, few: Any = few) -> None:
                for x, sr in few:
                    t.encode(x, sr)

            secs = _median_time(enc, max(1, args.repeat - 1))
            rows.append((f"tokenizer {backend} (published size, random weights)",
                         len(few) / secs, f"{few_s / secs:.1f}x realtime"))
            t.close()

    w = max(len(r[0]) for r in rows)
    print(f"{'what':<{w}}  {'utt/s':>8}  notes")
    for label, ups, note in rows:
        print(f"{label:<{w}}  {ups:8.1f}  {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
