"""Paths inside a published export.

An export is made in a scratch directory and published (renamed or uploaded) to its final
place; :func:`published_dir` names that place, and :func:`rel_or_abs` writes media paths
relative to a manifest's directory or absolute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from speechmill.pipeline.audio import is_url, local_path

if TYPE_CHECKING:
    from speechmill.pipeline.stage import StageContext


def abs_audio_path(path: str) -> str:
    """An absolute local path (records may hold paths relative to the run's cwd, or
    ``file://`` URLs: a run directory given as one); other URLs as they are."""
    return path if is_url(path) else os.path.abspath(local_path(path))


def rel_or_abs(path: str, base: Path, relative: bool) -> str:
    """``path`` relative to directory ``base`` (NeMo and Lhotse resolve relative paths
    against the manifest's directory) when ``relative``, else absolute."""
    p = abs_audio_path(path)
    if not relative or is_url(p):
        return p
    return os.path.relpath(p, os.path.abspath(base))


def published_dir(out_dir: Path, ctx: StageContext, output_root: str) -> Path:
    """Where ``out_dir`` ends up: the engine exports into ``.<id>.partial`` next to
    ``RUN_DIR/<output_root>/<id>`` and renames it afterwards, so absolute paths into the
    export must name the final directory. Any other ``out_dir`` is its own final place.
    A ``file://`` run directory is a local one; on object storage (``s3://``) the export
    is made in a local cache and uploaded, and only paths relative to it (or the media's
    own URLs) resolve there."""
    from speechmill.pipeline.store.layout import is_url as is_run_url

    run_dir = local_path(ctx.run_dir)
    if is_run_url(run_dir):
        return Path(os.path.abspath(out_dir))
    final = Path(os.path.abspath(Path(run_dir) / output_root / ctx.stage_id))
    if out_dir.name == f".{ctx.stage_id}.partial" and is_run_url(ctx.run_dir):
        return final  # file://: made in the local cache, then copied there
    if (out_dir.name == f".{ctx.stage_id}.partial"
            and out_dir.parent.resolve() == final.parent.resolve()):
        return final  # abspath, not resolve(): relative paths survive moving the run dir
    return Path(os.path.abspath(out_dir))
