"""`speechmill run --ray-address` against a real two-node Ray cluster started with the
`ray` CLI on this machine: the same outputs (ids, texts) as an embedded run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from speechmill.pipeline.store import RunStore
from tests.conversation_factory import espeak_available, make_conversation
from tests.ray_cluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPEECHMILL = str(Path(sys.executable).with_name("speechmill"))


def _dag(input_dir: Path, run_dir: Path) -> str:
    return f"""
name: multinode
run_dir: {run_dir}
executor: {{type: ray, stall_timeout_s: 600}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{input_dir}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest, with: {{sample_rate: 16000}}}}
  - {{id: diarize, uses: diarize, needs: standardize}}
  - {{id: segment, uses: segment, needs: diarize, with: {{min_s: 1.0}}}}
  - {{id: transcribe, uses: transcribe, needs: segment}}
"""


def _texts(run_dir: Path) -> dict[str, str]:
    t = RunStore(run_dir).read_outputs("transcribe", columns=["id", "text"])
    return dict(zip(t.column("id").to_pylist(), t.column("text").to_pylist(), strict=True))


@pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng (apt) for two voices")
def test_two_node_cluster_gives_the_embedded_outputs(tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    make_conversation(src / "a.wav", 2, 6, seed=1, voices=["piper:joe", "espeak:en-us+f3"])

    cluster = LocalCluster()
    try:
        cluster.start(cpus=1)
        cluster.add_node(cpus=1, resources='{"second_node": 1}')
        (tmp_path / "c.yaml").write_text(_dag(src, tmp_path / "c"))
        r = subprocess.run([SPEECHMILL, "run", str(tmp_path / "c.yaml"), "--no-progress",
                            "--ray-address", cluster.address], env=cluster.env(),
                           capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "2 CPUs" in r.stdout  # the driver saw both nodes' CPUs
    finally:
        cluster.stop()

    (tmp_path / "e.yaml").write_text(_dag(src, tmp_path / "e"))
    env = {k: v for k, v in cluster.env().items() if k != "RAY_AUTH_MODE"}
    r = subprocess.run([SPEECHMILL, "run", str(tmp_path / "e.yaml"), "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    on_cluster, embedded = _texts(tmp_path / "c"), _texts(tmp_path / "e")
    assert len(embedded) >= 3
    assert on_cluster == embedded
