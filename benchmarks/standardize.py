"""Benchmark: the ``standardize`` stage under speechmill vs. a plain single-process loop.

Usage::

    python benchmarks/standardize.py --files 16 --seconds 120 --executor ray --workdir /tmp/b

What it does
------------
1. **Inputs.** Writes ``--files`` files of real recorded speech (``pytest_audioeval``'s
   clips via ``testkit/audio.py``'s :func:`load_speech`), each ``--seconds`` long,
   into ``WORKDIR/input``. Formats cycle flac / mp3 / wav / ogg (Vorbis), sample rates
   cycle 44.1 / 48 / 16 kHz, every other file is stereo; every file has different
   content (ingest would drop byte-identical copies). Files are streamed to disk from a
   <= 60 s tile, so memory stays small for long ``--seconds``. When
   ``WORKDIR/input/_inputs.json`` says the same set is already there, nothing is
   regenerated.
2. **Baseline.** A child Python process runs a plain ``for`` loop over the same files,
   calling exactly the code the stage calls per row
   (:func:`speechmill.stages.standardize.standardize_file` with the same
   :class:`StandardizeConfig`), and reports its wall seconds and its peak RSS
   (``getrusage(RUSAGE_SELF).ru_maxrss``). It runs in its own process so that the peak
   RSS covers only imports + the loop, not input generation or Ray.
3. **speechmill.** ``ingest -> standardize`` built with ``dag.loads`` and run with
   ``runner.run`` into a fresh ``WORKDIR/speechmill_run``. "whole run" is wall time
   around ``loads()`` + ``run()``: Ray start-up and shut-down, ingest (hashing and
   probing every file), scheduling, the standardize stage and all commits. "stage
   only" is ``wall_seconds`` from ``stages/standardize/metrics.json``: the runner's own
   timer around the standardize stage (reading upstream outputs, the executor run,
   commits), without Ray start-up or ingest.

Reading the numbers
-------------------
* ``audio h / wall h`` is throughput: hours of input audio processed per hour of wall
  time (the same as "x realtime"). Higher is better. All rows use the same audio
  amount: the decoded input duration the baseline measured.
* ``vs baseline`` is speechmill's throughput divided by the baseline's (equivalently
  baseline wall / speechmill wall). Above 1 the pipeline is faster than one process;
  the ceiling is about the number of standardize workers running at once. The Ray
  executor runs task stages (like standardize) on every CPU, actor-pool (model) stages
  on ``CPUs - 1``, and never more workers than batches
  (``ceil(files / batch_size)``; the stage's default batch size is 4). On a machine with
  few CPUs, or with few files, expect a ratio at or below 1: the pipeline pays for Ray
  start-up, ingest's hashing/probing and per-batch commits, and gains no parallelism.
* The "whole run" ratio includes fixed costs (Ray start-up is several seconds), so it
  improves with more and longer files; the "stage only" ratio is the fairer measure of
  the engine's steady-state overhead/parallelism.
* ``baseline peak RSS`` shows the memory one worker needs for these files; the stage
  decodes in ``chunk_seconds`` chunks and spools to disk, so it should not grow with
  ``--seconds``.

Nothing here asserts timings; it is a script to run by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common  # noqa: E402  (benchmarks/common.py, beside this script)
import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# (extension, libsndfile major format, subtype)
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("flac", "FLAC", "PCM_16"),
    ("mp3", "MP3", "MPEG_LAYER_III"),
    ("wav", "WAV", "PCM_16"),
    ("ogg", "OGG", "VORBIS"),
)
RATES: tuple[int, ...] = (44100, 48000, 16000)
TILE_SECONDS = 60.0
WRITE_BLOCK = 65536  # frames per SoundFile.write


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def input_specs(n_files: int) -> list[dict[str, Any]]:
    """Name, format, rate and channels of each input file (deterministic)."""
    specs = []
    for i in range(n_files):
        ext, fmt, subtype = FORMATS[i % len(FORMATS)]
        rate = RATES[i % len(RATES)]
        channels = 2 if i % 2 else 1
        specs.append({
            "name": f"speech_{i:03d}_{rate // 1000}k_{channels}ch.{ext}",
            "format": fmt,
            "subtype": subtype,
            "sample_rate": rate,
            "channels": channels,
            "seed": 1000 + i,
        })
    return specs


def _stereo(mono: np.ndarray, sample_rate: int) -> np.ndarray:
    """(n, 2): the right channel ~0.7 ms later and a little quieter."""
    delay = max(1, int(0.0007 * sample_rate))
    right = np.concatenate([np.zeros(delay, np.float32), mono[:-delay]]) * np.float32(0.85)
    return np.ascontiguousarray(np.stack([mono, right], axis=1), dtype=np.float32)


def write_speech_file(path: Path, spec: dict[str, Any], seconds: float) -> None:
    """Stream ``seconds`` of speech into ``path`` from a tile of at most 60 s."""
    import soundfile as sf

    from testkit.audio import load_speech

    rate, channels = int(spec["sample_rate"]), int(spec["channels"])
    tile = load_speech(min(TILE_SECONDS, max(seconds, 1.0)), rate, seed=int(spec["seed"]))
    frames: np.ndarray = _stereo(tile, rate) if channels == 2 else tile[:, None]
    total = round(seconds * rate)
    fmt = spec["format"]
    if fmt == "WAV" and total * channels * 2 > 4_000_000_000:
        fmt = "RF64"  # a RIFF/WAVE file cannot hold more than 4 GiB
    rng = np.random.default_rng(int(spec["seed"]) + 7)
    written = 0
    tmp = path.with_name(f".{path.name}.tmp")
    with sf.SoundFile(tmp, "w", samplerate=rate, channels=channels, format=fmt,
                      subtype=spec["subtype"]) as f:
        while written < total:
            n = min(frames.shape[0], total - written)
            rep = frames[:n] * np.float32(rng.uniform(0.8, 1.0))
            # small writes: libsndfile's Vorbis encoder segfaults on a ~2.6 M-frame write
            for start in range(0, n, WRITE_BLOCK):
                f.write(rep[start:start + WRITE_BLOCK])
            written += n
    os.replace(tmp, path)


def ensure_inputs(input_dir: Path, n_files: int, seconds: float) -> list[Path]:
    """Write the inputs unless ``input_dir`` already holds exactly this set."""
    specs = input_specs(n_files)
    want = {"files": n_files, "seconds": seconds, "specs": specs}
    paths = [input_dir / s["name"] for s in specs]
    if common.reuse_inputs(input_dir, want, paths, "inputs"):
        return paths
    t0 = time.perf_counter()
    for p, s in zip(paths, specs, strict=True):
        write_speech_file(p, s, seconds)
    common.mark_inputs(input_dir, want)
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"inputs: wrote {n_files} x {seconds:g} s ({size_mb:.1f} MB) to {input_dir} "
          f"in {time.perf_counter() - t0:.1f} s")
    return paths


# --------------------------------------------------------------------------------------
# Baseline (runs in a child process)
# --------------------------------------------------------------------------------------


def stage_config(args: argparse.Namespace) -> dict[str, Any]:
    """The standardize config used by both the baseline and the DAG."""
    return {"sample_rate": args.sample_rate, "loudness": args.loudness}


def run_baseline(args: argparse.Namespace) -> dict[str, Any]:
    """Single-process loop over the inputs with the stage's own per-file function."""
    from speechmill.pipeline.stage import Reject
    from speechmill.stages.standardize import StandardizeConfig, standardize_file

    cfg = StandardizeConfig(**stage_config(args))
    workdir = Path(args.workdir)
    paths = [workdir / "input" / s["name"] for s in input_specs(args.files)]
    out_dir = workdir / "baseline" / "out"
    tmp_dir = workdir / "baseline" / "tmp"
    shutil.rmtree(workdir / "baseline", ignore_errors=True)
    out_dir.mkdir(parents=True)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    decoded = 0.0
    out_seconds = 0.0
    rejected: list[str] = []
    t0 = time.perf_counter()
    for p in paths:
        try:
            r = standardize_file(str(p), out_dir / f"{p.stem}.flac", cfg, tmp_dir=tmp_dir)
        except Reject as e:
            rejected.append(f"{p.name}: {e}")
            continue
        decoded += float(r["decoded_seconds_in"])
        out_seconds += float(r["duration"])
    wall = time.perf_counter() - t0
    return {
        "wall_seconds": wall,
        "files": len(paths),
        "rows_out": len(paths) - len(rejected),
        "rejected": rejected,
        "decoded_seconds_in": decoded,
        "output_seconds": out_seconds,
        # Linux reports ru_maxrss in KiB
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_before_loop_mib": rss_before_kb / 1024,
    }


def baseline_in_child(args: argparse.Namespace) -> dict[str, Any]:
    result_path = Path(args.workdir) / "baseline_result.json"
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", "baseline",
           "--files", str(args.files), "--seconds", str(args.seconds),
           "--workdir", str(args.workdir), "--sample-rate", str(args.sample_rate),
           "--loudness", args.loudness]
    subprocess.run(cmd, check=True)
    return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------
# speechmill
# --------------------------------------------------------------------------------------


def dag_yaml(args: argparse.Namespace, input_dir: Path, run_dir: Path) -> str:
    stage = {"id": "standardize", "uses": "standardize", "with": stage_config(args)}
    return common.dag_yaml("bench-standardize", run_dir,
                           common.ingest_then(stage, input_dir, args.batch_size),
                           args.executor, args.num_cpus)


def run_speechmill(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(args.workdir)
    run_dir = workdir / "speechmill_run"
    text = dag_yaml(args, workdir / "input", run_dir)
    res = common.run_timed(text, run_dir, args.executor, ["ingest", "standardize"],
                           args.verbose)
    res.pop("dag")
    return res


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _throughput(audio_s: float, wall_s: float) -> float:
    return audio_s / wall_s if wall_s > 0 else math.nan


def report(args: argparse.Namespace, base: dict[str, Any], sm: dict[str, Any]) -> None:
    audio_s = base["decoded_seconds_in"]
    std_m, ing_m = sm["metrics"]["standardize"], sm["metrics"]["ingest"]
    base_tp = _throughput(audio_s, base["wall_seconds"])
    rows = [
        ("baseline (1 process loop)", base["wall_seconds"]),
        ("speechmill whole run", sm["wall_seconds"]),
        ("speechmill standardize stage", float(std_m["wall_seconds"])),
    ]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print()
    print(f"CPUs: os.cpu_count()={os.cpu_count()}, usable (affinity)={affinity}")
    print(f"executor: {sm['executor']}")
    print(f"input: {args.files} files x {args.seconds:g} s = {audio_s / 3600:.4f} h decoded "
          f"audio (flac/mp3/wav/ogg, 44.1/48/16 kHz, mono+stereo) -> "
          f"{args.sample_rate} Hz mono FLAC, loudness={args.loudness}")
    print()
    header = f"{'':<30} {'wall s':>9} {'audio h / wall h':>17} {'vs baseline':>12}"
    print(header)
    print("-" * len(header))
    for label, wall in rows:
        tp = _throughput(audio_s, wall)
        print(f"{label:<30} {wall:>9.2f} {tp:>17.1f} {tp / base_tp:>11.2f}x")
    print()
    print(f"speechmill ingest stage wall: {float(ing_m['wall_seconds']):.2f} s; "
          f"whole run minus both stages (executor start-up/shut-down, planning, summary): "
          f"{sm['wall_seconds'] - float(ing_m['wall_seconds']) - float(std_m['wall_seconds']):.2f} s")
    print(f"baseline peak RSS: {base['peak_rss_mib']:.1f} MiB "
          f"(after imports, before the loop: {base['rss_before_loop_mib']:.1f} MiB)")
    print(f"rows out / rejected: baseline {base['rows_out']}/{len(base['rejected'])}, "
          f"speechmill standardize {std_m['rows_out']}/{std_m['rows_rejected']} "
          f"(status {sm['status']}); output audio: baseline {base['output_seconds']:.1f} s, "
          f"speechmill {float(std_m['audio_hours_out']) * 3600:.1f} s")
    for r in base["rejected"]:
        print(f"  baseline rejected {r}")
    if std_m["rows_rejected"]:
        print(f"  speechmill reject reasons: {std_m['reasons']}")
    print(f"run dir: {sm['run_dir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=16, help="number of input files")
    ap.add_argument("--seconds", type=float, default=120.0, help="length of each file")
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    ap.add_argument("--workdir", default="runs/bench-standardize",
                    help="inputs, baseline outputs and the run dir go here")
    ap.add_argument("--sample-rate", type=int, default=24000, help="output sample rate")
    ap.add_argument("--loudness", choices=("dbfs", "lufs", "none"), default="dbfs")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="standardize batch size (default: the stage's, 4)")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs for the embedded Ray (default: all)")
    ap.add_argument("--verbose", action="store_true", help="show the runner's summary")
    ap.add_argument("--phase", choices=("all", "baseline"), default="all",
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.files < 1 or args.seconds <= 0:
        ap.error("--files must be >= 1 and --seconds > 0")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    if args.phase == "baseline":
        result = run_baseline(args)
        (workdir / "baseline_result.json").write_text(json.dumps(result, indent=1))
        return
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_inputs(workdir / "input", args.files, args.seconds)
    print("baseline: running ...", flush=True)
    base = baseline_in_child(args)
    print(f"baseline: {base['wall_seconds']:.2f} s", flush=True)
    print(f"speechmill ({args.executor}): running ...", flush=True)
    sm = run_speechmill(args)
    print(f"speechmill: {sm['wall_seconds']:.2f} s", flush=True)
    report(args, base, sm)


if __name__ == "__main__":
    main()
