"""Benchmark: the ``download`` stage's fetcher vs. ``requests`` loops (sequential, pooled).

Usage::

    python benchmarks/download.py --hosts 4 --files-per-host 16 --seconds 20 \\
        --latency-ms 50 --kbps 2000 --per-host-concurrency 4 --threads 16 --executor local \\
        --repeat 3

What it does
------------
1. **Media.** Writes ``hosts x files-per-host`` distinct MP3 files of real recorded speech
   (``testkit/audio.py``'s :func:`load_speech`, one seed per file, so no two files
   are byte-identical and the stage's content dedup keeps them all), each ``--seconds``
   long, into ``WORKDIR/media``. They are real MP3s because the stage probes every file
   with PyAV after fetching; random bytes would become ``not_audio`` rejects. When
   ``WORKDIR/media/_media.json`` says the same set is already there, nothing is
   regenerated.
2. **Servers.** One ``testkit.http_faults.FaultServer`` per host, bound to 127.0.0.1,
   127.0.0.2, ... (all loopback on Linux). The fetcher keys its process-wide per-host
   limits by host *name* (not host:port), so distinct addresses are what makes the
   servers distinct hosts. (If 127.0.0.2 cannot be bound, every server listens on
   127.0.0.1 with its own port, and a warning says that they then share one per-host
   limit.) Each file has its own URL; every response waits ``--latency-ms`` before its
   headers (time to first byte) and then sends the body in 16 KiB pieces paced to at
   most ``--kbps`` kilobits/s, like a real, slowish server. URLs are listed round-robin
   over the hosts.
3. **Baselines.** (a) A plain sequential loop: ``requests.get(url).content`` written to
   a file, one URL after another (a new connection each time, no fsync). (b) The same
   work on a ``concurrent.futures.ThreadPoolExecutor(--threads)``, the concurrency the
   download stage uses, with one ``requests.Session`` per thread (keep-alive), no
   per-host limits, no retries, no checks: what a careful script without speechmill
   does.
4. **Fetcher.** :class:`speechmill.stages.download_fetch.Fetcher` directly, with ``Fetcher.fetch``
   mapped over a ``ThreadPoolExecutor(--threads)``, under the stage's policy with
   ``--per-host-concurrency`` / ``--per-host-rps``. Each file is streamed into a
   ``.part``, hashed, fsynced and renamed (the directory fsynced too).
5. **Stage.** A one-stage DAG (``download`` with the same URLs, ``threads``,
   ``per_host_concurrency``, ``per_host_rps`` and ``allow_private: [127.0.0.0/8]``)
   built with ``dag.loads`` and run with ``runner.run`` into a fresh
   ``WORKDIR/speechmill_run``. On top of the fetcher the stage plans (normalises and
   dedups the URLs), probes every file with PyAV, writes a provenance sidecar, and
   commits each batch (Parquet outputs/rejects). "whole run" is wall time around
   ``loads()`` + ``run()`` (for Ray this includes Ray start-up); "stage only" is
   ``wall_seconds`` from ``stages/download/metrics.json`` (planning, the executor run and
   commits).

With ``--repeat N`` every phase runs N times (in turn: sequential, pool, fetcher,
stage) and each row shows the median wall.

Reading the numbers
-------------------
* ``files/s`` and ``MB/s`` (1 MB = 10^6 bytes of file content) are throughput over the
  row's wall time; every row moves the same files. Higher is better.
* ``vs sequential`` / ``vs pool`` is a row's throughput divided by that baseline's (=
  baseline wall / row wall). With one request at a time, the sequential loop needs about
  ``sum(latency + size / bandwidth)``: the "modelled serial time" line. The ceiling for
  speechmill is about ``min(threads, hosts x per_host_concurrency)`` requests at once
  (printed as "ideal speed-up"), lower if ``--per-host-rps`` caps request starts at
  ``hosts x rps`` files/s. On loopback nothing else is the bottleneck until the CPU is
  (this script, the servers and the client share it: watch for it with many threads
  or ``--kbps 0``).
* The stage runs ``ceil(files / batch_size)`` batches (the stage's default batch size is
  32; ``--batch-size``) and each batch has its own thread pool of ``min(threads, rows)``.
  The local executor runs batches one after another, so the slowest files of a batch
  hold up the next one, and a batch smaller than ``threads`` cannot fill all slots: for
  few files per batch expect "stage only" below "fetcher". The Ray executor runs
  batches in parallel worker processes, and per-host limits are per *process*: the
  effective per-host concurrency is then up to ``workers x per_host_concurrency``.
* "whole run" minus "stage only" is DAG loading, run-directory set-up, executor start
  and shut-down and the run summary; "stage only" minus "fetcher" is mostly probing,
  commits and batch boundaries.
* ``server max in flight`` is the most requests a server had open at once in each
  phase: for the fetcher and the local-executor stage it must not exceed
  ``--per-host-concurrency``; the thread pool has no per-host limit and may.
  ``requests`` above the file count mean retries.
* The per-host lines come from ``stage_summary.hosts`` in the stage's metrics.json:
  ``files/s`` and ``MB/s`` there are per *fetch slot* (files or bytes divided by the
  summed fetch seconds of that host's files), i.e. the speed of one connection, not the
  host's aggregate.

Nothing here asserts timings; it is a script to run by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import common  # benchmarks/common.py, beside this script

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from testkit.http_faults import FaultServer, Req  # noqa: E402

SEND_CHUNK = 16 * 1024
LOOPBACK_NET = "127.0.0.0/8"


# --------------------------------------------------------------------------------------
# Media
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaFile:
    host_index: int
    name: str      # file name, also the URL path under /h<host>/
    data: bytes
    sha256: str


def media_specs(hosts: int, files_per_host: int) -> list[dict[str, Any]]:
    """One entry per served file; the seed differs for every file."""
    return [{"host": h, "name": f"ep{i:03d}.mp3", "seed": 5000 + h * 1000 + i}
            for h in range(hosts) for i in range(files_per_host)]


def write_mp3(path: Path, seconds: float, sample_rate: int, seed: int) -> None:
    import soundfile as sf

    from testkit.audio import load_speech

    audio = load_speech(seconds, sample_rate, seed=seed)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, audio, sample_rate, format="MP3", subtype="MPEG_LAYER_III")
    tmp.replace(path)


def ensure_media(media_dir: Path, args: argparse.Namespace) -> list[MediaFile]:
    """The served files, written unless ``media_dir`` already holds exactly this set."""
    specs = media_specs(args.hosts, args.files_per_host)
    want = {"specs": specs, "seconds": args.seconds, "sample_rate": args.sample_rate}
    paths = [media_dir / f"h{s['host']}_{s['name']}" for s in specs]
    if not common.reuse_inputs(media_dir, want, paths, "media"):
        t0 = time.perf_counter()
        for p, s in zip(paths, specs, strict=True):
            write_mp3(p, args.seconds, args.sample_rate, int(s["seed"]))
        common.mark_inputs(media_dir, want)
        print(f"media: wrote {len(specs)} MP3s x {args.seconds:g} s to {media_dir} in "
              f"{time.perf_counter() - t0:.1f} s")
    out = []
    for p, s in zip(paths, specs, strict=True):
        data = p.read_bytes()
        out.append(MediaFile(int(s["host"]), str(s["name"]), data,
                             hashlib.sha256(data).hexdigest()))
    if len({m.sha256 for m in out}) != len(out):
        raise SystemExit("media: two generated files are byte-identical; the stage would "
                         "drop one as a duplicate")
    return out


# --------------------------------------------------------------------------------------
# Servers
# --------------------------------------------------------------------------------------


class HostLoad:
    """Requests, bytes sent and requests in flight at one server (per phase)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.bytes_sent = 0
            self.in_flight = 0
            self.max_in_flight = 0

    def enter(self) -> None:
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, sent: int) -> None:
        with self._lock:
            self.in_flight -= 1
            self.bytes_sent += sent


def paced_route(data: bytes, load: HostLoad, latency_s: float,
                kbps: float) -> Callable[[Req], None]:
    """200 with the whole file after ``latency_s``, body paced to ``kbps`` kilobits/s
    (0: as fast as the socket takes it): each piece is held back until the cap would
    have delivered its last byte, so nothing is waited for after the final write and
    the request stops counting as in flight as soon as the last byte is sent (before the
    client can release its per-host slot). No Range support: the fetcher only asks for
    a range when resuming, which does not happen here."""
    bytes_per_s = kbps * 1000 / 8

    def handler(req: Req) -> None:
        load.enter()
        sent = 0
        try:
            if latency_s > 0 and not req.sleep(latency_s):
                return
            req.send_head(200, {"Content-Length": len(data), "Content-Type": "audio/mpeg"})
            t0 = time.monotonic()
            for i in range(0, len(data), SEND_CHUNK):
                piece = data[i:i + SEND_CHUNK]
                if bytes_per_s > 0:  # a piece leaves when the cap would have delivered it
                    wait = t0 + (sent + len(piece)) / bytes_per_s - time.monotonic()
                    if wait > 0 and not req.sleep(wait):
                        return
                if not req.write(piece):
                    return
                sent += len(piece)
        finally:
            load.leave(sent)

    return handler


@dataclass
class Host:
    server: FaultServer
    load: HostLoad

    @property
    def name(self) -> str:
        return self.server.host


def can_bind(addr: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


def start_servers(media: list[MediaFile], args: argparse.Namespace) -> list[Host]:
    distinct = can_bind("127.0.0.2")
    if not distinct:
        print("WARNING: cannot bind 127.0.0.2; all servers listen on 127.0.0.1 (distinct "
              "ports) and so share ONE per-host limit in the fetcher")
    hosts: list[Host] = []
    for h in range(args.hosts):
        load = HostLoad()
        routes = {f"/h{h}/{m.name}": paced_route(m.data, load, args.latency_ms / 1000,
                                                  args.kbps)
                  for m in media if m.host_index == h}
        srv = FaultServer(routes, host=f"127.0.0.{h + 1}" if distinct else "127.0.0.1")
        # socketserver listens with a backlog of 5; allow bursts of new connections
        srv._srv.socket.listen(128)
        hosts.append(Host(srv.start(), load))
    return hosts


def url_list(media: list[MediaFile], hosts: list[Host]) -> list[tuple[str, MediaFile]]:
    """(url, file), round-robin over the hosts."""
    by_host: dict[int, list[MediaFile]] = {}
    for m in media:
        by_host.setdefault(m.host_index, []).append(m)
    out = []
    for i in range(max(len(v) for v in by_host.values())):
        for h, files in sorted(by_host.items()):
            if i < len(files):
                out.append((hosts[h].server.url(f"/h{h}/{files[i].name}"), files[i]))
    return out


def server_loads(hosts: list[Host]) -> dict[str, dict[str, int]]:
    return {h.server.base: {"requests": h.load.requests, "bytes": h.load.bytes_sent,
                            "max_in_flight": h.load.max_in_flight} for h in hosts}


def reset_loads(hosts: list[Host]) -> None:
    for h in hosts:
        h.load.reset()


# --------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------


def run_baseline(urls: list[tuple[str, MediaFile]], out_dir: Path) -> dict[str, Any]:
    """Sequential ``requests.get(url).content``, written to a file."""
    import requests

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    ok = 0
    nbytes = 0
    errors: list[str] = []
    t0 = time.perf_counter()
    for i, (url, m) in enumerate(urls):
        try:
            body = requests.get(url, timeout=(10, 60)).content
        except requests.RequestException as e:
            errors.append(f"{url}: {type(e).__name__}")
            continue
        (out_dir / f"{i:05d}.mp3").write_bytes(body)
        nbytes += len(body)
        if hashlib.sha256(body).hexdigest() == m.sha256:
            ok += 1
        else:
            errors.append(f"{url}: wrong content ({len(body)} bytes)")
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "ok": ok, "bytes": nbytes, "errors": errors}


def run_pool_baseline(urls: list[tuple[str, MediaFile]], out_dir: Path,
                      threads: int) -> dict[str, Any]:
    """``session.get(url).content`` written to a file, on ``threads`` threads (one
    ``requests.Session`` per thread)."""
    import requests

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    local = threading.local()

    def one(item: tuple[int, tuple[str, MediaFile]]) -> tuple[bool, int, str | None]:
        i, (url, m) = item
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        try:
            body = session.get(url, timeout=(10, 60)).content
        except requests.RequestException as e:
            return False, 0, f"{url}: {type(e).__name__}"
        (out_dir / f"{i:05d}.mp3").write_bytes(body)
        if hashlib.sha256(body).hexdigest() != m.sha256:
            return False, len(body), f"{url}: wrong content ({len(body)} bytes)"
        return True, len(body), None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as ex:
        results = list(ex.map(one, enumerate(urls)))
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "ok": sum(r[0] for r in results),
            "bytes": sum(r[1] for r in results),
            "errors": [r[2] for r in results if r[2]]}


def fetch_policy(args: argparse.Namespace) -> Any:
    from speechmill.stages.download import DownloadConfig
    from speechmill.stages.download_policy import FetchPolicy

    c = DownloadConfig(urls=["http://127.0.0.1/x.mp3"])  # the stage's defaults
    return FetchPolicy(
        user_agent=c.user_agent, connect_timeout_s=c.connect_timeout_s,
        read_timeout_s=c.read_timeout_s, max_retries=c.max_retries,
        backoff_base_s=c.backoff_base_s, backoff_max_s=c.backoff_max_s,
        max_retry_after_s=c.max_retry_after_s, max_redirects=c.max_redirects,
        max_bytes=c.max_bytes, per_host_concurrency=args.per_host_concurrency,
        per_host_rps=args.per_host_rps, allow_private=(LOOPBACK_NET,),
    )


def run_fetcher(urls: list[tuple[str, MediaFile]], out_dir: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    """``Fetcher.fetch`` on a thread pool, one destination file per URL."""
    from speechmill.stages.download_fetch import Fetcher
    from speechmill.stages.download_policy import FetchError

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    fetcher = Fetcher(fetch_policy(args))

    def one(item: tuple[int, tuple[str, MediaFile]]) -> tuple[bool, int, str | None]:
        i, (url, m) = item
        host = urlsplit(url).hostname or "host"
        try:
            res = fetcher.fetch(url, out_dir / host / f"{i:05d}.mp3")
        except FetchError as e:
            return False, 0, f"{url}: {e.reason}: {e.detail}"
        if res.sha256 != m.sha256:
            return False, res.size, f"{url}: wrong content ({res.size} bytes)"
        return True, res.size, None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.threads) as ex:
        results = list(ex.map(one, enumerate(urls)))
    wall = time.perf_counter() - t0
    return {"wall_seconds": wall, "ok": sum(r[0] for r in results),
            "bytes": sum(r[1] for r in results),
            "errors": [r[2] for r in results if r[2]], "host_stats": fetcher.host_stats()}


def dag_yaml(args: argparse.Namespace, urls: list[str], run_dir: Path) -> str:
    import yaml

    stage: dict[str, Any] = {
        "id": "download",
        "uses": "download",
        "with": {
            "urls": urls,
            "allow_private": [LOOPBACK_NET],
            "threads": args.threads,
            "per_host_concurrency": args.per_host_concurrency,
            "per_host_rps": args.per_host_rps,
        },
    }
    if args.batch_size:
        stage["batch_size"] = args.batch_size
    executor: dict[str, Any] = {"type": args.executor, "progress": False}
    if args.num_cpus:
        executor["num_cpus"] = args.num_cpus
    dag = {"name": "bench-download", "run_dir": str(run_dir), "executor": executor,
           "stages": [stage]}
    return yaml.safe_dump(dag, sort_keys=False)


def run_stage(urls: list[tuple[str, MediaFile]], run_dir: Path,
              args: argparse.Namespace) -> dict[str, Any]:
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner

    shutil.rmtree(run_dir, ignore_errors=True)
    text = dag_yaml(args, [u for u, _ in urls], run_dir)
    console = Console() if args.verbose else Console(file=io.StringIO())
    t0 = time.perf_counter()
    dag = dagmod.loads(text)
    result = runner.run(dag, executor=args.executor, progress=False, console=console)
    wall = time.perf_counter() - t0
    metrics = json.loads((run_dir / "stages" / "download" / "metrics.json").read_text())
    run_info = json.loads((run_dir / "run.json").read_text())
    return {"wall_seconds": wall, "status": result.status, "metrics": metrics,
            "executor": run_info.get("executor", args.executor), "run_dir": str(run_dir)}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _rate(x: float, wall: float) -> float:
    return x / wall if wall > 0 else math.nan


def report(args: argparse.Namespace, hosts: list[Host], media: list[MediaFile],
           phases: dict[str, dict[str, Any]], loads: dict[str, dict[str, dict[str, int]]]
           ) -> None:
    from speechmill.stages.download import Download

    n = len(media)
    total_bytes = sum(len(m.data) for m in media)
    base, pool = phases["baseline"], phases["pool"]
    fet, stg = phases["fetcher"], phases["stage"]
    m = stg["metrics"]
    bps = args.kbps * 1000 / 8
    serial = sum(args.latency_ms / 1000 + (len(m_.data) / bps if bps else 0.0)
                 for m_ in media)
    slots = min(args.threads, args.hosts * args.per_host_concurrency)
    batch = args.batch_size or Download.default_batch_size

    print()
    print(f"hosts: {args.hosts} ({', '.join(h.name for h in hosts)}), "
          f"{args.files_per_host} files each = {n} files, {total_bytes / 1e6:.2f} MB "
          f"(MP3, {args.seconds:g} s, {args.sample_rate} Hz mono, "
          f"mean {total_bytes / n / 1e3:.0f} kB)")
    print(f"servers: latency {args.latency_ms:g} ms, bandwidth cap "
          + (f"{args.kbps:g} kbit/s ({bps / 1e3:.0f} kB/s) per response" if args.kbps
             else "none"))
    print(f"speechmill: threads={args.threads}, per_host_concurrency="
          f"{args.per_host_concurrency}, per_host_rps={args.per_host_rps:g}"
          f"{' (no cap)' if not args.per_host_rps else ''}, executor={stg['executor']}, "
          f"batch_size={batch} ({math.ceil(n / batch)} batches)")
    print(f"modelled serial time: {serial:.2f} s; ideal speed-up: min(threads, hosts x "
          f"per_host_concurrency) = {slots}")
    print()
    rows = [
        ("baseline: sequential requests", base["wall_seconds"]),
        (f"baseline: requests, {args.threads} threads", pool["wall_seconds"]),
        (f"Fetcher on {args.threads} threads", fet["wall_seconds"]),
        ("download stage, whole run", stg["wall_seconds"]),
        ("download stage, stage only", stg["stage_wall_seconds"]),
    ]
    header = (f"{'':<34} {'wall s':>8} {'files/s':>9} {'MB/s':>8} {'vs sequential':>14} "
              f"{'vs pool':>8}")
    print(f"medians of {args.repeat} run(s)" if args.repeat > 1 else "one run")
    print(header)
    print("-" * len(header))
    base_fps = _rate(n, base["wall_seconds"])
    pool_fps = _rate(n, pool["wall_seconds"])
    for label, wall in rows:
        fps = _rate(n, wall)
        print(f"{label:<34} {wall:>8.2f} {fps:>9.2f} {_rate(total_bytes / 1e6, wall):>8.2f} "
              f"{fps / base_fps:>13.2f}x {fps / pool_fps:>7.2f}x")
    if args.repeat > 1:
        print("walls of each run: " + "; ".join(
            f"{k} " + ", ".join(f"{w:.2f}" for w in phases[k]["walls"])
            for k in ("baseline", "pool", "fetcher", "stage")))
    print()
    print(f"files ok: sequential {base['ok']}/{n}, pool {pool['ok']}/{n}, fetcher "
          f"{fet['ok']}/{n}, stage {m['rows_out']} out / {m['rows_rejected']} rejected "
          f"(status {stg['status']})")
    for label, ph in (("sequential", base), ("pool", pool), ("fetcher", fet)):
        for e in ph["errors"][:5]:
            print(f"  {label} error: {e}")
    if m["rows_rejected"]:
        print(f"  stage reject reasons: {m['reasons']}")
    print("servers (requests / max in flight) per phase:")
    for base_url in (h.server.base for h in hosts):
        cells = ", ".join(f"{ph} {loads[ph][base_url]['requests']}/"
                          f"{loads[ph][base_url]['max_in_flight']}"
                          for ph in ("baseline", "pool", "fetcher", "stage"))
        print(f"  {base_url}: {cells}")
    summary = m.get("stage_summary") or {}
    print("stage_summary.hosts (metrics.json):")
    for line in Download.summary_lines(summary):
        print(f"  {line}")
    print(f"run dir: {stg['run_dir']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=4, help="servers (distinct loopback hosts)")
    ap.add_argument("--files-per-host", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each MP3")
    ap.add_argument("--sample-rate", type=int, default=44100, help="of the MP3s")
    ap.add_argument("--latency-ms", type=float, default=50.0,
                    help="server delay before each response's headers")
    ap.add_argument("--kbps", type=float, default=2000.0,
                    help="per-response bandwidth cap, kilobits/s (0: none)")
    ap.add_argument("--per-host-concurrency", type=int, default=4)
    ap.add_argument("--per-host-rps", type=float, default=0.0,
                    help="request starts/s per host (0: no cap)")
    ap.add_argument("--threads", type=int, default=16,
                    help="fetcher threads (and the stage's threads per worker)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="download stage batch size (default: the stage's, 32)")
    ap.add_argument("--executor", choices=("local", "ray"), default="local")
    ap.add_argument("--num-cpus", type=int, default=None,
                    help="CPUs for the embedded Ray (default: all)")
    ap.add_argument("--workdir", default="runs/bench-download",
                    help="media, downloaded files and the run dir go here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every phase this many times; rows show medians")
    ap.add_argument("--verbose", action="store_true", help="show the runner's summary")
    args = ap.parse_args(argv)
    if args.hosts < 1 or args.hosts > 254 or args.files_per_host < 1:
        ap.error("--hosts must be 1..254 and --files-per-host >= 1")
    if args.seconds <= 0 or args.latency_ms < 0 or args.kbps < 0 or args.per_host_rps < 0:
        ap.error("--seconds must be > 0; --latency-ms, --kbps, --per-host-rps >= 0")
    if args.threads < 1 or args.per_host_concurrency < 1 or args.repeat < 1:
        ap.error("--threads, --per-host-concurrency and --repeat must be >= 1")
    args.workdir = str(Path(args.workdir).resolve())
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    media = ensure_media(workdir / "media", args)
    hosts = start_servers(media, args)
    runs: dict[str, list[dict[str, Any]]] = {}
    loads: dict[str, dict[str, dict[str, int]]] = {}
    try:
        urls = url_list(media, hosts)
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("baseline", lambda: run_baseline(urls, workdir / "baseline")),
            ("pool", lambda: run_pool_baseline(urls, workdir / "pool", args.threads)),
            ("fetcher", lambda: run_fetcher(urls, workdir / "fetcher", args)),
            ("stage", lambda: run_stage(urls, workdir / "speechmill_run", args)),
        ]
        for k in range(args.repeat):
            for name, fn in steps:
                reset_loads(hosts)
                print(f"{name} ({k + 1}/{args.repeat}): running ...", flush=True)
                res = fn()
                if name == "stage":
                    res["stage_wall_seconds"] = float(res["metrics"]["wall_seconds"])
                runs.setdefault(name, []).append(res)
                loads[name] = server_loads(hosts)  # the last run's
                print(f"{name}: {res['wall_seconds']:.2f} s", flush=True)
    finally:
        for h in hosts:
            h.server.stop()
    phases = {name: median_run(rs) for name, rs in runs.items()}
    report(args, hosts, media, phases, loads)


def median_run(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The last run's details with median walls (and every run's wall in ``walls``)."""
    out = dict(rs[-1])
    out["walls"] = [r["wall_seconds"] for r in rs]
    out["wall_seconds"] = statistics.median(out["walls"])
    if "stage_wall_seconds" in out:
        out["stage_wall_seconds"] = statistics.median(r["stage_wall_seconds"] for r in rs)
    if "ok" in out:  # the worst run's count and every run's errors
        out["ok"] = min(r["ok"] for r in rs)
        out["errors"] = [e for r in rs for e in r["errors"]]
    return out


if __name__ == "__main__":
    main()
