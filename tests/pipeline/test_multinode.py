"""`speechmill run --ray-address` against a real multi-node Ray cluster started with the
`ray` CLI on this machine (one cluster for the whole module: Ray starts are the slow part).

The head node has 1 CPU and no GPU; the second node 3 CPUs and two logical GPUs. The DAG
asks for half a GPU per transcribe actor while the model runs on CPU, so one run proves
that outputs equal an in-process run's (no Ray), that CPU stages used both nodes and that model
actors were placed only on the GPU node and got GPU ids (all from the per-batch
``node_id``/``gpu_ids`` in ``metrics.json``). Then a third node joins and is SIGKILLed in
the middle of transcribe (node loss), and a driver is SIGKILLed mid-stage and a new one
resumes (driver loss); both end with the in-process run's outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speechmill.pipeline.store import RunStore
from testkit.conversations import espeak_available, make_conversation
from testkit.ray_cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not espeak_available(),
                                 reason="needs espeak-ng (apt) for two voices")]

SPEECHMILL = str(Path(sys.executable).with_name("speechmill"))


def _dag(input_dir: Path, run_dir: Path) -> str:
    # batch_size 1 where it spreads work (two files; a dozen segments to transcribe)
    return f"""
name: multinode
run_dir: {run_dir}
executor: {{type: ray, stall_timeout_s: 600}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{input_dir}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest, batch_size: 1,
      with: {{sample_rate: 16000}}}}
  - {{id: diarize, uses: diarize, needs: standardize}}
  - {{id: segment, uses: segment, needs: diarize, batch_size: 1, with: {{min_s: 1.0}}}}
  - {{id: transcribe, uses: transcribe, needs: segment, batch_size: 1,
      with: {{device: cpu}}, resources: {{gpus: 0.5}}}}
"""


def _texts(run_dir: Path) -> dict[str, str]:
    t = RunStore(run_dir).read_outputs("transcribe", columns=["id", "text"])
    return dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))


def _metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / stage / "metrics.json").read_text())


def _run(cluster: LocalCluster | None, dag: Path, *extra: str,
         wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [SPEECHMILL, "run", str(dag), "--no-progress", *extra]
    if cluster is not None:
        env = cluster.env()
        cmd += ["--ray-address", cluster.address]
    else:  # embedded Ray: no token auth
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                                "RAY_AUTH_MODE")}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _wait_parts(run_dir: Path, stage: str, n: int, proc: subprocess.Popen,
                timeout: float = 600) -> int:
    """Block until ``stage`` has committed at least ``n`` parts (mid-stage)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = len(list((run_dir / "stages" / stage).glob("part-*.parquet")))
        if got >= n:
            return got
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {stage} had {n} parts: "
                                 f"{proc.stdout.read()[-3000:] if proc.stdout else ''}")
        time.sleep(0.2)
    raise AssertionError(f"{stage} never reached {n} parts")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    w = tmp_path_factory.mktemp("multinode")
    src = w / "in"
    src.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        make_conversation(src / f"{name}.wav", 2, 5, seed=seed,
                          voices=["piper:joe", "espeak:en-us+f3"])
    return w


@pytest.fixture(scope="module")
def embedded(work: Path) -> dict[str, str]:
    """The reference: the same DAG in one process (no Ray at all)."""
    (work / "e.yaml").write_text(_dag(work / "in", work / "e"))
    _run(None, work / "e.yaml", "--executor", "local")
    texts = _texts(work / "e")
    assert len(texts) >= 6
    return texts


@pytest.fixture(scope="module")
def cluster() -> LocalCluster:
    c = LocalCluster()
    try:
        # (each node must hold a read task beside its actors: Ray reserves per node)
        c.start(cpus=1, gpus=0)
        c.add_node(cpus=3, gpus=2)
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def cluster_run(work: Path, cluster: LocalCluster) -> tuple[Path, str]:
    """The whole DAG on the two-node cluster: its run directory and stdout."""
    (work / "c.yaml").write_text(_dag(work / "in", work / "c"))
    r = _run(cluster, work / "c.yaml")
    return work / "c", r.stdout


def _copy_run(work: Path, name: str) -> Path:
    """A copy of the cluster run's directory without transcribe (its upstream stages
    done), and a DAG file for it: a run of it is a run resumed at transcribe."""
    def skip(folder: str, names: list[str]) -> list[str]:
        return ["transcribe"] if Path(folder).name in ("stages", "media") else []

    shutil.copytree(work / "c", work / name, ignore=skip)
    (work / f"{name}.yaml").write_text(_dag(work / "in", work / name))
    return work / name


def test_two_nodes_same_outputs_cpu_stages_spread_model_on_gpu_node(
        cluster: LocalCluster, cluster_run: tuple[Path, str],
        embedded: dict[str, str]) -> None:
    run_dir, stdout = cluster_run
    assert "4 CPUs, 2 GPUs" in stdout  # the driver saw both nodes
    assert _texts(run_dir) == embedded

    nodes = {n["NodeID"]: n["Resources"] for n in cluster.node_table() if n["Alive"]}
    gpu_nodes = {k for k, r in nodes.items() if r.get("GPU")}
    assert len(nodes) == 2 and len(gpu_nodes) == 1

    # model actors (half a GPU each) ran only on the GPU node, and Ray gave them GPU ids
    tr = _metrics(run_dir, "transcribe")["nodes"]
    assert set(tr) == gpu_nodes
    assert sum(v["rows"] for v in tr.values()) == len(embedded)
    assert set(tr[next(iter(gpu_nodes))]["gpu_ids"]) <= {"0", "1"}
    assert tr[next(iter(gpu_nodes))]["gpu_ids"]
    # the CPU stages (no GPU asked) used both nodes (Ray places each batch where CPUs are
    # free: which stage spreads varies from run to run)
    cpu_stages = ("standardize", "diarize", "segment")
    spread = {s: _metrics(run_dir, s)["nodes"] for s in cpu_stages}
    assert set().union(*spread.values()) == set(nodes), spread
    assert "gpu_ids" not in json.dumps(spread)

    st = subprocess.run([SPEECHMILL, "status", str(run_dir)], capture_output=True,
                        text=True, timeout=120)
    assert st.returncode == 0, st.stderr
    flat = " ".join(st.stdout.split())
    for s, per_node in spread.items():  # "rows per node" for each stage on two nodes
        assert (f"{s}: rows per node:" in flat) == (len(per_node) > 1), flat


def test_node_loss_mid_transcribe_finishes_on_the_rest(
        work: Path, cluster: LocalCluster, cluster_run: tuple[Path, str],
        embedded: dict[str, str]) -> None:
    # a third node like the second: the 6 transcribe actors (7 CPUs, one spare) fill the
    # two GPU nodes' CPUs, so half of them run on the node that dies
    third = cluster.add_node(cpus=3, gpus=2)
    run_dir = _copy_run(work, "loss")
    proc = _run(cluster, work / "loss.yaml", wait=False)
    try:
        _wait_parts(run_dir, "transcribe", 1, proc)
        killed = cluster.kill_node(third)
        assert killed
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]

    assert _texts(run_dir) == embedded  # nothing lost, nothing duplicated
    t = RunStore(run_dir).read_outputs("transcribe", columns=["id"])
    assert t.num_rows == len(embedded)
    assert RunStore(run_dir).read_rejects("transcribe").num_rows == 0  # no worker_crash
    m = _metrics(run_dir, "transcribe")
    rec = m["recovery"]  # the summary says what ran again and why
    assert rec["batches_rerun"] >= 1 and rec["rows_rerun"] >= 1
    assert rec["failures"] and all(f["error"] for f in rec["failures"])
    # every batch this attempt ran (before and after the loss) ran on a GPU node
    cpu_only = {n["NodeID"] for n in cluster.node_table()
                if n["Alive"] and not n["Resources"].get("GPU")}
    assert m["nodes"] and not set(m["nodes"]) & cpu_only
    flat = " ".join(out.split())
    assert "transcribe: recovered from" in flat and "not yet committed ran again" in flat
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "succeeded"


def test_driver_killed_mid_stage_then_a_new_driver_resumes(
        work: Path, cluster: LocalCluster, cluster_run: tuple[Path, str],
        embedded: dict[str, str]) -> None:
    run_dir = _copy_run(work, "drv")
    proc = _run(cluster, work / "drv.yaml", wait=False)
    try:
        done = _wait_parts(run_dir, "transcribe", 1, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert done < len(embedded)
    assert not (run_dir / "stages" / "transcribe" / "_SUCCESS").exists()

    r = _run(cluster, work / "drv.yaml")  # a new driver, same cluster and run dir
    assert "resuming:" in r.stdout
    assert _texts(run_dir) == embedded
    assert RunStore(run_dir).read_rejects("transcribe").num_rows == 0
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "succeeded" and info["attempt"] == 3
