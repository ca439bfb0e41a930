from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.manifests.segments_factory import make_segments


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
