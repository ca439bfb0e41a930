"""Benchmark: the clean DAG on one Ray node vs two nodes with the same total CPUs, and
with its run directory on object storage vs a local one.

Usage::

    python benchmarks/cluster.py --files 4 --turns 8
    python benchmarks/cluster.py --files 8 --repeat 3 --cpus 8
    python benchmarks/cluster.py --compare store --repeat 3

What it does
------------
1. **Inputs.** ``--files`` synthetic conversations (``benchmarks/clean.py``'s inputs:
   Piper + eSpeak NG voices, ``--turns`` turns each), reused when already there.
2. **The DAG.** ``ingest -> standardize -> diarize -> segment -> transcribe -> annotate
   -> filter`` with ``benchmarks/clean.py``'s settings (faster-whisper tiny.en,
   ``cpu_threads: 1``, DNSMOS every ``--dnsmos-hop`` s).
3. **Two layouts of a real local cluster** (``testkit/ray_cluster.py``: raylets started
   with the ``ray`` CLI on 127.0.0.1): one node with ``--cpus`` CPUs, and two nodes with
   half of them each (logical CPUs: Ray reserves them, the OS shares the machine's
   cores; the default 4 = 1 x 4 vs 2 x 2, because pools are sized from the cluster's
   total CPUs and nodes of 1 CPU cannot hold a read task beside an actor).
   For each, a fresh cluster is started (not timed), then
   ``speechmill run --ray-address`` runs the DAG in a subprocess into a fresh run
   directory (timed: the whole command, driver start and connection included), and the
   cluster is stopped. The layouts alternate within each repetition (the order flips on
   odd repetitions) so load drift on a shared machine hits both.
4. **Figures.** Per stage: ``wall_seconds`` from ``metrics.json`` and on how many nodes
   its batches ran (``nodes``); the whole run's wall. ``2 nodes / 1 node`` above 1x is
   the cost of distribution (object transfer between raylets, two schedulers, actors
   placed apart from the data). Medians over ``--repeat``.
5. **Object store vs local run directory** (``--compare store``, or ``all``: the
   default). The same DAG, inputs and executor (``--store-executor``: the in-process
   ``local`` one by default, or the embedded Ray with ``--cpus`` CPUs), run once with a
   local run directory and once with ``run_dir: s3://BUCKET/run`` on an S3 server that
   this script starts in its own process (moto's server mode on 127.0.0.1, fake
   credentials in the environment of the run and its workers). Every part, marker, media
   file and metric then goes through the S3 API, and model stages read their input
   media from it. The order flips on odd repetitions. ``s3 / local`` above 1x is the
   cost of the object store: request overhead of a Python S3 server on the same CPUs
   (no network latency: a real bucket adds round trips, and takes the server's CPU off
   the machine). Besides each stage's wall, the CPU seconds of the whole run (its
   process, plus this one's: the S3 server) are shown: on a loaded machine the steadier
   figure.
6. **Consistency.** The filter stage's ids and texts must be identical in every run.

Nothing here asserts timings; it is a script to run by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import clean  # benchmarks/clean.py, beside this script: inputs and stage settings

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STAGES = ("ingest", "standardize", "diarize", "segment", "transcribe", "annotate", "filter")
LAYOUTS = ("1 node", "2 nodes")
STORES = ("local", "s3")
_KEY, _SECRET = "AKIABENCHFAKEKEY0001", "bench-fake-secret-not-a-credential"


def dag_yaml(args: argparse.Namespace, input_dir: Path, run_dir: Path | str,
             executor: dict[str, Any] | None = None) -> str:
    import yaml

    stages: list[dict[str, Any]] = [
        {"id": "ingest", "uses": "ingest", "with": {"inputs": [str(input_dir)]}},
        {"id": "standardize", "uses": "standardize", "with": clean.standardize_cfg()},
        {"id": "diarize", "uses": "diarize"},
        {"id": "segment", "uses": "segment", "with": clean.segment_cfg(args)},
        {"id": "transcribe", "uses": "transcribe",
         "with": clean.transcribe_cfg(args, args.cpu_threads)},
        {"id": "annotate", "uses": "annotate", "with": clean.annotate_cfg(args)},
        {"id": "filter", "uses": "filter", "with": {"min_duration_s": args.min_s}},
    ]
    for prev, st in zip(stages, stages[1:], strict=False):
        st["needs"] = [prev["id"]]
    return yaml.safe_dump({"name": "bench-cluster", "run_dir": str(run_dir),
                           "executor": executor or {"type": "ray", "progress": False},
                           "stages": stages}, sort_keys=False)


def start_cluster(layout: str, cpus: int) -> Any:
    from testkit.ray_cluster import LocalCluster

    c = LocalCluster()
    try:
        if layout == "1 node":
            c.start(cpus=cpus)
        else:
            c.start(cpus=cpus / 2)
            c.add_node(cpus=cpus / 2)
    except BaseException:
        c.stop()
        raise
    return c


def run_once(args: argparse.Namespace, layout: str, rep: int) -> dict[str, Any]:
    from speechmill.pipeline.store import RunStore

    workdir = Path(args.workdir)
    run_dir = workdir / f"run_{layout.replace(' ', '')}_{rep}"
    shutil.rmtree(run_dir, ignore_errors=True)
    dag = workdir / f"{run_dir.name}.yaml"
    dag.write_text(dag_yaml(args, workdir / "input", run_dir))
    cluster = start_cluster(layout, args.cpus)
    try:
        cmd = [str(Path(sys.executable).with_name("speechmill")), "run", str(dag),
               "--no-progress", "--ray-address", cluster.address]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True)
        wall = time.perf_counter() - t0
    finally:
        cluster.stop()
    if r.returncode != 0:
        raise SystemExit(f"{layout}: run failed\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    if args.verbose:
        print(r.stdout)
    metrics = {}
    for sid in STAGES:
        m = json.loads((run_dir / "stages" / sid / "metrics.json").read_text())
        metrics[sid] = {"wall_seconds": m["wall_seconds"], "nodes": len(m.get("nodes") or {}),
                        "rows_in": m["rows_in"]}
    t = RunStore(str(run_dir)).read_outputs("filter", ["id", "text"])
    texts = sorted(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    return {"layout": layout, "wall_seconds": wall, "metrics": metrics, "texts": texts}


def start_s3() -> tuple[Any, dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a thread of this process) with a fresh bucket; the
    environment a run needs to use it."""
    import logging
    import socket

    from moto.server import ThreadedMotoServer

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": _KEY, "AWS_SECRET_ACCESS_KEY": _SECRET,
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    os.environ.update(env)  # this process reads the metrics back from the bucket
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).call_s3("create_bucket", Bucket="bench")
    return server, env


def run_store_once(args: argparse.Namespace, store: str, rep: int, s3_env: dict[str, str]
                   ) -> dict[str, Any]:
    from speechmill.pipeline.store import open_store

    workdir = Path(args.workdir)
    name = f"run_{store}_{rep}"
    if store == "s3":
        run_dir: str = f"s3://bench/{name}-{time.time_ns()}"
    else:
        run_dir = str(workdir / name)
        shutil.rmtree(run_dir, ignore_errors=True)
    executor: dict[str, Any] = {"type": args.store_executor, "progress": False}
    if args.store_executor == "ray":
        executor["num_cpus"] = args.cpus
    dag = workdir / f"{name}.yaml"
    dag.write_text(dag_yaml(args, (workdir / "input").resolve(), run_dir, executor))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(s3_env, TMPDIR=str((workdir / "tmp").resolve()))  # the runs' local cache
    (workdir / "tmp").mkdir(exist_ok=True)
    cmd = [str(Path(sys.executable).with_name("speechmill")), "run", str(dag), "--no-progress"]
    import resource

    def child_cpu() -> float:
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime

    c0, s0, t0 = child_cpu(), time.process_time(), time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    # CPU: the run's process (and the children it waited for) plus this process, i.e.
    # the S3 server's threads: on a loaded machine steadier than wall time
    cpu = child_cpu() - c0 + time.process_time() - s0
    if r.returncode != 0:
        raise SystemExit(f"{store}: run failed\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    st = open_store(run_dir)
    metrics = {sid: {"wall_seconds": (st.read_metrics(sid) or {})["wall_seconds"]}
               for sid in STAGES}
    t = st.read_outputs("filter", ["id", "text"])
    texts = sorted(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))
    return {"store": store, "wall_seconds": wall, "cpu_seconds": cpu, "metrics": metrics,
            "texts": texts}


def compare_stores(args: argparse.Namespace) -> bool:
    server, s3_env = start_s3()
    loads = [_load()]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in STORES}
    try:
        for rep in range(args.repeat):
            for store in (STORES if rep % 2 == 0 else STORES[::-1]):
                res = run_store_once(args, store, rep, s3_env)
                runs[store].append(res)
                loads.append(_load())
                print(f"rep {rep + 1}: {store} run dir: {res['wall_seconds']:.1f} s, CPU "
                      f"{res['cpu_seconds']:.1f} s (load {loads[-1]})")
    finally:
        server.stop()
    ref = runs["local"][0]["texts"]
    same = all(r["texts"] == ref for rs in runs.values() for r in rs)
    print(f"\nrun directory local vs s3:// (moto on 127.0.0.1), executor "
          f"{args.store_executor}{f' ({args.cpus} CPUs)' if args.store_executor == 'ray' else ''}"
          f"; {len(ref)} segments kept by filter; identical ids/texts in every run: {same}")
    print(f"load average (1/5/15 min) before and after each run: {'; '.join(loads)}")
    print(f"{'stage':<12}" + "".join(f"{k + ' wall':>14}" for k in STORES)
          + f"{'s3 / local':>13}")
    for sid in STAGES:
        walls = [statistics.median(r["metrics"][sid]["wall_seconds"] for r in runs[k])
                 for k in STORES]
        print(f"{sid:<12}" + "".join(f"{w:>12.1f} s" for w in walls)
              + f"{walls[1] / walls[0]:>12.2f}x")
    whole = [statistics.median(r["wall_seconds"] for r in runs[k]) for k in STORES]
    print(f"{'whole run':<12}" + "".join(f"{w:>12.1f} s" for w in whole)
          + f"{whole[1] / whole[0]:>12.2f}x")
    cpu = [statistics.median(r["cpu_seconds"] for r in runs[k]) for k in STORES]
    print(f"{'CPU':<12}" + "".join(f"{w:>12.1f} s" for w in cpu)
          + f"{cpu[1] / cpu[0]:>12.2f}x   (the run + the S3 server)")
    return same


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=4, help="number of conversations")
    ap.add_argument("--turns", type=int, default=8, help="turns per conversation")
    ap.add_argument("--cpus", type=int, default=4,
                    help="total CPUs of the cluster (one node, or two with half each)")
    ap.add_argument("--cpu-threads", type=int, default=1, help="transcribe cpu_threads")
    ap.add_argument("--dnsmos-hop", type=float, default=9.01, help="annotate dnsmos_hop_s")
    ap.add_argument("--min-s", type=float, default=1.0, help="segment min_s")
    ap.add_argument("--max-s", type=float, default=30.0, help="segment max_s")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--compare", choices=("nodes", "store", "all"), default="all",
                    help="1 node vs 2 nodes, local vs object-store run directory, or both")
    ap.add_argument("--store-executor", choices=("local", "ray"), default="local",
                    help="executor of the run-directory comparison (local: in-process, "
                    "as the tests run on a bucket; ray: embedded, --cpus CPUs)")
    ap.add_argument("--workdir", default="runs/bench-cluster")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.cpus < 2 or args.cpus % 2:
        ap.error("--cpus must be even and at least 2 (two nodes get half each)")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    clean.ensure_inputs(workdir / "input", args.files, args.turns)
    same_store = compare_stores(args) if args.compare in ("store", "all") else True
    if args.compare == "store":
        return 0 if same_store else 1
    print()
    loads = [_load()]
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in LAYOUTS}
    for rep in range(args.repeat):
        for layout in (LAYOUTS if rep % 2 == 0 else LAYOUTS[::-1]):
            res = run_once(args, layout, rep)
            runs[layout].append(res)
            loads.append(_load())
            print(f"rep {rep + 1}: {layout}: {res['wall_seconds']:.1f} s (load {loads[-1]})")

    ref = runs["1 node"][0]["texts"]
    same = all(r["texts"] == ref for rs in runs.values() for r in rs)
    print(f"\n{args.files} conversations x {args.turns} turns; {args.cpus} CPUs in total; "
          f"{len(ref)} segments kept by filter; identical ids/texts in every run: {same}")
    print(f"load average (1/5/15 min) before and after each run: {'; '.join(loads)}")
    hdr = f"{'stage':<12}" + "".join(f"{k + ' wall':>16}{'nodes':>7}" for k in LAYOUTS)
    print(hdr + f"{'2 nodes / 1 node':>18}")
    for sid in STAGES:
        cells, walls = "", []
        for k in LAYOUTS:
            w = statistics.median(r["metrics"][sid]["wall_seconds"] for r in runs[k])
            n = max(r["metrics"][sid]["nodes"] for r in runs[k])
            walls.append(w)
            cells += f"{w:>14.1f} s{n:>7}"
        print(f"{sid:<12}{cells}{walls[1] / walls[0]:>17.2f}x")
    whole = [statistics.median(r["wall_seconds"] for r in runs[k]) for k in LAYOUTS]
    print(f"{'whole run':<12}" + "".join(f"{w:>14.1f} s{'':>7}" for w in whole)
          + f"{whole[1] / whole[0]:>17.2f}x")
    return 0 if same and same_store else 1


if __name__ == "__main__":
    sys.exit(main())
