"""Where everything of a run lives: :class:`RunLayout` names every path of a run directory.

::

    RUN_DIR/
      dag.yaml  run.json  _SPEECHMILL_RUN  run.lock
      stages/<id>/part-*.parquet          outputs
      stages/<id>/rejects/part-*.parquet  rejects
      stages/<id>/_plan.parquet  <table>  a source's plan, a stage's side tables
      stages/<id>/metrics.json  _SUCCESS  _fingerprint  _wall_seconds
      media/<id>/...                      audio written by the stage
      tmp/<id>/                           a stage's scratch files
      cache/<kind>/<id>/                  a stage's caches (LLM responses, ...)
      models/                             models a run keeps
      <output_root>/<id>/                 a sink's export (``exports/<id>``, ...)

A local run directory is laid out with :class:`~pathlib.Path` objects (relative when the
run directory was given relative); one on an object store with ``/``-joined filesystem
paths without the protocol (``bucket/prefix/stages/asr``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Generic, TypeVar

# s3://..., gs://..., abfs://..., file://... and fsspec chains (simplecache::s3://...)
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*(://|::)")

#: written into a run directory when a run first claims it (before anything else)
RUN_MARKER = "_SPEECHMILL_RUN"
#: the run's lock file (local) or lease object (object store)
LOCK_NAME = "run.lock"
#: the run's state: status, attempt, stages
RUN_JSON = "run.json"
#: the file that marks a stage complete (written after its last part and its metrics)
SUCCESS = "_SUCCESS"
#: a part file's name: ``part-<name>.parquet``
PART_PREFIX, PART_SUFFIX = "part-", ".parquet"

P = TypeVar("P", Path, str)


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a location by URL (``s3://bucket/run``) rather than a local path."""
    return bool(_URL_RE.match(os.fspath(path)))


def url_scheme(url: str | os.PathLike[str]) -> str:
    """The first protocol of a URL (``s3`` for ``s3://b/p``, ``simplecache`` for a chain)."""
    return re.split(r"://|::", os.fspath(url), maxsplit=1)[0].lower()


def local_cache_dir(url: str) -> Path:
    """The local directory where files for the run at ``url`` are made before upload
    (``$TMPDIR/speechmill/<hash of the URL>``): media a stage writes, exports, spills.
    The same on every process of a node, so a worker's stage and its store agree."""
    import hashlib
    import tempfile

    h = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "speechmill" / h


def is_part_name(name: str) -> bool:
    """Whether a file name (no folder) is a committed part (never a dot/temp name)."""
    return name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)


class RunLayout(Generic[P]):
    """Every path of one run directory under ``root``: a :class:`~pathlib.Path` for a local
    run directory, a filesystem path (``bucket/prefix``) for one on an object store."""

    def __init__(self, root: P) -> None:
        self.root: P = root

    def at(self, *parts: str) -> P:
        """A path under the run directory."""
        if isinstance(self.root, Path):
            return self.root.joinpath(*parts)
        return "/".join([self.root, *parts])

    # -- the run's own files ------------------------------------------------------------
    @property
    def run_json(self) -> P:
        return self.at(RUN_JSON)

    @property
    def marker(self) -> P:
        return self.at(RUN_MARKER)

    @property
    def lock(self) -> P:
        return self.at(LOCK_NAME)

    @property
    def stages(self) -> P:
        return self.at("stages")

    @property
    def models_dir(self) -> P:
        """The run's own model directory (``models/``), for models a stage fetches into
        the run rather than into a shared cache."""
        return self.at("models")

    # -- a stage's files -------------------------------------------------------------------
    def stage_dir(self, stage_id: str) -> P:
        return self.at("stages", stage_id)

    def rejects_dir(self, stage_id: str) -> P:
        return self.at("stages", stage_id, "rejects")

    def media_dir(self, stage_id: str) -> P:
        return self.at("media", stage_id)

    def tmp_dir(self, stage_id: str) -> P:
        return self.at("tmp", stage_id)

    def cache_dir(self, kind: str, stage_id: str) -> P:
        """A stage's cache of one ``kind`` (``cache/llm/<id>``: LLM responses, spend)."""
        return self.at("cache", kind, stage_id)

    def output_part(self, stage_id: str, name: str) -> P:
        return self.at("stages", stage_id, f"{PART_PREFIX}{name}{PART_SUFFIX}")

    def reject_part(self, stage_id: str, name: str) -> P:
        return self.at("stages", stage_id, "rejects", f"{PART_PREFIX}{name}{PART_SUFFIX}")

    def stage_file(self, stage_id: str, name: str) -> P:
        """A file of the stage's own (``stages/<id>/<name>``): side tables, markers."""
        return self.at("stages", stage_id, name)

    def plan(self, stage_id: str) -> P:
        return self.stage_file(stage_id, "_plan.parquet")

    def success(self, stage_id: str) -> P:
        return self.stage_file(stage_id, SUCCESS)

    def fingerprint(self, stage_id: str) -> P:
        return self.stage_file(stage_id, "_fingerprint")

    def metrics(self, stage_id: str) -> P:
        return self.stage_file(stage_id, "metrics.json")

    def wall_seconds(self, stage_id: str) -> P:
        return self.stage_file(stage_id, "_wall_seconds")

    # -- exports -----------------------------------------------------------------------------
    def export_dir(self, output_root: str, stage_id: str) -> P:
        """Where a sink publishes its export (``<output_root>/<id>``)."""
        return self.at(output_root, stage_id)
