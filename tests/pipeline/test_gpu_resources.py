"""Model stages that can use CUDA ask Ray for a GPU when the cluster has GPUs (and only
then); `device: cpu` or the DAG's `resources.gpus` decide otherwise."""

from __future__ import annotations

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.executors.ray import RayExecutor


def _plan(stages: str) -> dict:
    d = dagmod.loads(f"""
name: g
run_dir: /tmp/unused-gpu-plan
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: [/tmp]}}}}
{stages}
""")
    return {s.id: s for s in d.stages}


def test_gpu_share_per_stage_and_overrides() -> None:
    p = _plan("""
  - {id: sep, uses: separate, needs: ingest}
  - {id: sep_cpu, uses: separate, needs: ingest, with: {device: cpu}}
  - {id: asr, uses: transcribe, needs: ingest}
  - {id: dia, uses: diarize, needs: ingest}
  - {id: dia_py, uses: diarize, needs: ingest, with: {backend: pyannote}}
  - {id: km, uses: tokenize, needs: ingest}
  - {id: snac, uses: tokenize, needs: ingest, with: {audio: {backend: snac}}}
  - {id: half, uses: separate, needs: ingest, resources: {gpus: 0.5}}
  - {id: std, uses: standardize, needs: ingest}
""")
    gpus = {k: v.resources.gpus for k, v in p.items()}
    assert gpus == {"ingest": 0.0, "sep": 1.0, "sep_cpu": 0.0, "asr": 1.0, "dia": 0.0,
                    "dia_py": 1.0, "km": 0.0, "snac": 1.0, "half": 0.5, "std": 0.0}


def test_pool_size_follows_gpus() -> None:
    p = _plan("  - {id: sep, uses: separate, needs: ingest}")
    st = p["sep"]
    ex = RayExecutor.__new__(RayExecutor)  # no Ray start: only the sizing rule
    ex.cluster_cpus, ex.cluster_gpus = 16.0, 2.0
    assert ex.pool_size(st.cls, None, 100, st.resources) == 2  # one actor per GPU
    ex.cluster_gpus = 0.0
    assert ex.pool_size(st.cls, None, 100, st.resources) == 15  # CPU cluster: CPUs bound
