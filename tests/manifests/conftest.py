from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from testkit.segments import make_segments


@pytest.fixture(scope="session")
def segments_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    """Real speech recordings + the segment rows over them, written as Parquet."""
    d = tmp_path_factory.mktemp("segments")
    t = make_segments(d / "audio", n_recordings=6, per_recording=3)
    pq.write_table(t, d / "segments.parquet")
    return d, t


def dag_with(tmp_path: Path, parquet: Path, stages_yaml: str, executor: str = "local") -> Path:
    """A DAG file: ``read_parquet`` over ``parquet`` followed by ``stages_yaml``."""
    text = f"""
name: t
run_dir: {tmp_path / 'run'}
executor: {{type: {executor}, progress: false}}
stages:
  - id: src
    uses: read_parquet
    with: {{paths: ["{parquet}"]}}
{stages_yaml}
"""
    p = tmp_path / "dag.yaml"
    p.write_text(text)
    return p


def tones_then(tmp_path: Path, sinks_yaml: str, sample_rate: int = 16000,
               ext: str = "wav") -> str:
    """A DAG text: two 2 s tones written as ``ext`` files -> ingest -> standardize (16 kHz)
    -> ``sinks_yaml`` (stage lines that need ``standardize``)."""
    import numpy as np
    import soundfile as sf

    src = tmp_path / "in"
    src.mkdir()
    t = np.arange(sample_rate * 2) / sample_rate
    for i, f in enumerate((220.0, 330.0)):
        sf.write(src / f"tone{i}.{ext}", (0.3 * np.sin(2 * np.pi * f * t)).astype(np.float32),
                 sample_rate)
    return f"""
name: sink-test
run_dir: {tmp_path / 'run'}
executor: {{type: local, stall_timeout_s: 300}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{src}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest,
      with: {{sample_rate: 16000, silence_dbfs: null}}}}
{sinks_yaml}"""
