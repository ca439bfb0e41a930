"""Test stages with injectable faults, and a ``speechmill`` entry point that knows them.

Faults come from a JSON file named in the stage config (``faults``), keyed by stage id,
read in ``setup()``: the test "fixes" a fault by rewriting the file, so the stage's
config (and its resume fingerprint) stays the same between runs. The file is read in
whatever process runs the stage (Ray workers too), and injected store failures patch
the run store inside that process. Per stage id::

    {"setup": "message"}            setup() raises RuntimeError(message)
    {"fail_mod": 5, "fail_rem": [0, 1]}  rows whose number % fail_mod is in fail_rem raise
                                    (ValueError for the first remainder, then
                                    ZeroDivisionError)
    {"crash": ["r001"]}             these rows kill their worker process (os._exit)
    {"reject": "no_speech"}         every row is rejected with this (data) reason
    {"enospc_store": true}          writing the stage's parts fails with ENOSPC
    {"enospc_process": true}        processing a row fails with ENOSPC (a media write)
    {"slow_s": 0.2}                 each row takes this long
    {"teardown_s": 60}              teardown() takes this long

``python -m tests.pipeline.fault_stages run DAG ...`` is ``speechmill`` with these
stages registered.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from ray import cloudpickle

from speechmill.pipeline import registry
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig
from speechmill.pipeline.store import parts as store_mod


def read_faults(path: str, stage_id: str) -> dict[str, Any]:
    p = Path(path)
    if not path or not p.exists():
        return {}
    return dict(json.loads(p.read_text()).get(stage_id) or {})


def write_faults(path: Path, faults: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(faults))
    os.replace(tmp, path)


class RowsConfig(StageConfig):
    n: int = 40
    audio_path: str = "none.wav"
    duration: float = 1.0


class Rows(Stage):
    """Source: rows r000..r{n-1}."""

    name = "t_rows"
    Config = RowsConfig
    is_source = True
    config: RowsConfig

    def plan(self) -> pa.Table:
        n = self.config.n
        return pa.table({"id": [f"r{i:03d}" for i in range(n)]})

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "audio_path": self.config.audio_path,
                "duration": self.config.duration}


class FaultyConfig(StageConfig):
    faults: str = ""


_ORIGINAL_WRITE = store_mod.atomic_write_parquet


class Faulty(Stage):
    """Copies rows; misbehaves as its fault file says."""

    name = "t_faulty"
    description = "test stage with injectable faults"
    Config = FaultyConfig
    config: FaultyConfig
    resources = Resources(cpus=1)
    default_batch_size = 2

    def setup(self) -> None:
        self.faults = read_faults(self.config.faults, self.ctx.stage_id)
        if self.faults.get("setup"):
            raise RuntimeError(self.faults["setup"])
        if self.faults.get("enospc_store"):
            stage_dir = str(Path(self.ctx.run_dir) / "stages" / self.ctx.stage_id)

            def full_disk(path: Path, table: pa.Table) -> None:
                if str(path).startswith(stage_dir + os.sep):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                _ORIGINAL_WRITE(path, table)

            store_mod.atomic_write_parquet = full_disk  # this process only

    def teardown(self) -> None:
        store_mod.atomic_write_parquet = _ORIGINAL_WRITE
        time.sleep(float(self.faults.get("teardown_s", 0)))

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        f = self.faults
        time.sleep(float(f.get("slow_s", 0)))
        if row["id"] in f.get("crash", []):
            os._exit(11)  # like a segfault in a native library
        if f.get("reject"):
            raise Reject(f["reject"], "injected")
        if f.get("enospc_process"):
            media = self.ctx.media_dir / f"{row['id']}.flac"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(media))
        mod = int(f.get("fail_mod", 0))
        if mod:
            rems = list(f.get("fail_rem", [0]))
            i = int(row["id"][1:])
            if i % mod in rems:
                if i % mod == rems[0]:
                    raise ValueError(f"bad value in row {row['id']}")
                raise ZeroDivisionError("division by zero")
        return {"id": row["id"], "duration": row.get("duration"),
                "audio_path": row.get("audio_path")}


class FaultyModel(Faulty):
    """The same as an actor pool (a model stage: setup once per actor)."""

    name = "t_faulty_model"
    uses_model = True


class Versioned(Stage):
    """A stage whose behaviour version tests bump."""

    name = "t_versioned"
    Config = StageConfig
    version: ClassVar[int] = 1

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        return {"id": row["id"], "duration": row.get("duration"), "text": f"v{self.version}"}


for _cls in (Rows, Faulty, FaultyModel, Versioned):
    registry.register(_cls)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get the classes


if __name__ == "__main__":
    from speechmill.pipeline.cli import main

    sys.exit(main())
