"""A real multi-node Ray cluster on this machine, started with the `ray` CLI.

Each node is a real raylet (``ray start --head`` + ``ray start --address=...``) with its
own CPUs, GPUs and custom resources, bound to 127.0.0.1. Teardown kills exactly this
cluster's processes (never ``ray stop``, which would kill every Ray on the machine,
including other tests' embedded ones). Ray 2.60 turns on token auth for ``ray start
--head``: drivers need ``RAY_AUTH_MODE=token`` (set in :meth:`LocalCluster.env`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pids_matching(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd and int(d.name) != os.getpid():
            out.append(int(d.name))
    return out


def _descendants(roots: list[int]) -> list[int]:
    parent: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    todo = list(roots)
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out += kids
        todo += kids
    return out


class LocalCluster:
    """``LocalCluster().start()`` -> address; ``add_node(...)``; ``kill_node(i)``; ``stop()``."""

    def __init__(self) -> None:
        # short path: Ray's unix sockets live under it (108-byte limit)
        self.temp_dir = tempfile.mkdtemp(prefix="smray", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[dict] = []

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.pop("RAY_ADDRESS", None)
        return env

    def _ray_start(self, args: list[str]) -> bool:
        """Start a node; False when ``ray start`` gave up waiting (its fixed 30 s) for
        the raylet to register, which a loaded machine can exceed: the raylet keeps
        starting, and the caller waits for it with :meth:`wait_nodes`."""
        cmd = [RAY, "start", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
               "--object-store-memory=200000000", *args]
        r = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=240)
        if r.returncode != 0:
            if "timed out during startup" in r.stdout + r.stderr:
                return False
            raise RuntimeError(f"ray start failed ({r.returncode}): {r.stdout[-2000:]}"
                               f"{r.stderr[-2000:]}")
        return True

    def start(self, cpus: float = 1, gpus: float = 0, resources: str = "{}",
              attempts: int = 3) -> str:
        """Start the head. On a loaded machine its raylet may never register: then its
        processes are killed and it starts anew on a fresh port (``attempts`` times)."""
        for attempt in range(attempts):
            started = self._ray_start([
                "--head", f"--port={self.port}", f"--num-cpus={cpus:g}",
                f"--num-gpus={gpus:g}", f"--resources={resources}",
                f"--temp-dir={self.temp_dir}", "--include-dashboard=false"])
            try:
                if not started:
                    self.wait_nodes(1, timeout=90)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                self._kill(_pids_matching(self.temp_dir))
                self.port = _free_port()
                self.address = f"127.0.0.1:{self.port}"
                continue
            self.nodes = [{"manager_port": None, "head": True}]
            return self.address
        raise AssertionError("unreachable")

    def add_node(self, cpus: float = 1, gpus: float = 0, resources: str = "{}",
                 attempts: int = 3) -> int:
        """Add a node (index returned); retried like :meth:`start`."""
        for attempt in range(attempts):
            mp, op = _free_port(), _free_port()
            self._ray_start([f"--address={self.address}", f"--num-cpus={cpus:g}",
                             f"--num-gpus={gpus:g}", f"--resources={resources}",
                             f"--node-manager-port={mp}", f"--object-manager-port={op}"])
            self.nodes.append({"manager_port": mp, "head": False})
            try:
                self.wait_nodes(self.alive_target(), timeout=120)
            except RuntimeError:
                self.nodes.pop()
                pids = _pids_matching(f"node_manager_port={mp}")
                self._kill(pids + _descendants(pids))
                if attempt == attempts - 1:
                    raise
                continue
            return len(self.nodes) - 1
        raise AssertionError("unreachable")

    def alive_target(self) -> int:
        """Nodes that should be alive: every node started and not killed."""
        return sum(1 for n in self.nodes if not n.get("killed"))

    @staticmethod
    def _kill(pids: list[int]) -> None:
        for p in set(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                alive = sum(1 for x in self.node_table() if x["Alive"])
            except RuntimeError:
                alive = -1
            if alive >= n:
                return
            if time.time() > deadline:
                raise RuntimeError(f"cluster has {alive} live nodes, wanted {n}")
            time.sleep(1)

    def node_table(self) -> list[dict]:
        """``ray.nodes()`` of the cluster (NodeID, Alive, Resources), read by a driver in
        a subprocess (this test process may hold an embedded Ray of its own)."""
        import json

        # Ray may print notices on stdout too (lagging heartbeats on a busy machine): the
        # table is the one line that carries the marker
        mark = "NODE-TABLE "
        code = ("import json,ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
                f"print({mark!r} + json.dumps([{{k: n[k] for k in ('NodeID', 'Alive', "
                "'Resources')} for n in ray.nodes()]), flush=True)")
        r = subprocess.run([sys.executable, "-c", code, self.address], env=self.env(),
                           capture_output=True, text=True, timeout=120)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith(mark)]
        if r.returncode != 0 or not lines:
            raise RuntimeError(f"cannot list the cluster's nodes: {r.stdout[-1000:]}"
                               f"{r.stderr[-2000:]}")
        return json.loads(lines[-1][len(mark):])

    def raylet_pids(self, i: int) -> list[int]:
        node = self.nodes[i]
        if node["head"]:
            return [p for p in _pids_matching(self.temp_dir) if p in _pids_matching("raylet")
                    and not any(p in _pids_matching(f"node_manager_port={n['manager_port']}")
                                for n in self.nodes if not n["head"])]
        return _pids_matching(f"node_manager_port={node['manager_port']}")

    def kill_node(self, i: int) -> list[int]:
        """SIGKILL node ``i``'s raylet and every process under it (its workers, actors
        and agents) at once, as a preempted spot instance would lose them."""
        pids = self.raylet_pids(i)
        pids += _descendants(pids)
        self.nodes[i]["killed"] = True
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        return pids

    def stop(self) -> None:
        for _ in range(3):
            pids = _pids_matching(self.temp_dir)
            for n in self.nodes:
                if n["manager_port"]:
                    pids += _pids_matching(f"node_manager_port={n['manager_port']}")
            if not pids:
                break
            for p in set(pids):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
