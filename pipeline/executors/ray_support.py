"""Ray pieces that a stage's pipeline and a fused chain's pipeline share.

How much CPU a read task reserves, draining a pipeline's rows on the driver, and
telling a worker process that died (crash, OOM kill, lost node or object: worth
retrying, and a row that still kills its worker alone is a ``worker_crash`` reject)
from an application error that Ray wraps (:func:`ray_application_error`: the stage
fails with the original type and message).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from typing import Any

from speechmill.pipeline.errors import StageFailedError

#: CPUs each read task of a streamed stage reserves (an actor pool leaves them free)
READ_TASK_CPUS = 0.25
#: from this many CPUs on, an actor pool leaves a whole CPU to the tasks around it
SMALL_CLUSTER_CPUS = 4.0


def drain_rows(ds: Any, stage_id: str, on_row: Callable[[dict[str, Any]], None]
               ) -> Exception | None:
    """Hand each row of ``ds`` to ``on_row`` as the pipeline yields it. Returns the Ray
    error when a worker process died; an application error in a worker is raised as
    :class:`StageFailedError` of ``stage_id``; the pipeline stops when this returns."""
    rows = iter(ds.iter_rows())
    try:
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return None
            except Exception as e:
                app = ray_application_error(e)
                if app is None:
                    return e
                raise StageFailedError(stage_id, f"{app[0]}: {app[1]}", cause_type=app[0],
                                       cause=app[1]) from e
            on_row(row)
    finally:
        # stop the pipeline now (Ray Data shuts its executor down when the iterator
        # closes): left running after a failure, its thread keeps scheduling work until
        # Ray shuts down, and then even starts a new local Ray instance
        close = getattr(rows, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()


ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE_RE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$")
_RAY_WRAPPERS = ("UserCodeException", "RayTaskError", "RaySystemError", "SystemException")


def _exception_from_traceback(text: str) -> tuple[str, str] | None:
    """(type, message) of the application's exception in a remote traceback's text: the
    outermost exception of a chain that is not one of Ray's wrappers."""
    sections = re.split(r"\n\s*(?:The above exception was the direct cause|During handling "
                        r"of the above exception)", ANSI_RE.sub("", text))
    for section in reversed(sections):
        lines = section.strip().splitlines()
        for i in range(len(lines) - 1, -1, -1):
            m = _EXC_LINE_RE.match(lines[i])
            if m and not lines[i].startswith(" "):
                typ = m.group(1).rsplit(".", 1)[-1]
                if not typ.startswith(_RAY_WRAPPERS):
                    return typ, "\n".join([m.group(2), *lines[i + 1:]]).strip()
                break
    return None


def ray_application_error(e: BaseException) -> tuple[str, str] | None:
    """None when ``e`` means a worker process died (crash, OOM kill, lost node or
    object: worth retrying, and a row that still kills its worker alone is a
    ``worker_crash`` reject); else the application error's original (type, message):
    a task's exception (Ray wraps it in ``RayTaskError``, Ray Data in a
    ``UserCodeException`` whose original survives only as traceback text), an actor
    whose constructor raised, or any other error (not retried)."""
    import ray.exceptions as rx

    system = (rx.WorkerCrashedError, rx.NodeDiedError, rx.ObjectLostError,
              rx.OutOfMemoryError, rx.LocalRayletDiedError, rx.ActorUnavailableError,
              rx.RaySystemError, rx.TaskCancelledError, rx.ObjectStoreFullError)
    for _ in range(8):  # RayTaskError may wrap a system failure of a task it waited on
        if isinstance(e, system):
            return None
        if isinstance(e, rx.RayActorError):
            if not getattr(e, "actor_init_failed", False):
                return None  # the actor's process died
            text = str(e).split("creation task,", 1)[-1]
            return _exception_from_traceback(text) or (type(e).__name__, str(e)[:2000])
        if isinstance(e, rx.RayTaskError):
            cause = e.cause
            if isinstance(cause, rx.UserCodeException) or not isinstance(cause, Exception):
                # (the subclass Ray makes to also be the cause's type forwards attribute
                # lookups to the cause: read the traceback text through str())
                text = e.__dict__.get("traceback_str") or str(e)
                return (_exception_from_traceback(text)
                        or (type(cause).__name__, str(cause)[:2000]))
            if isinstance(cause, rx.RayError):
                e = cause
                continue
            return type(cause).__name__, str(cause)
        mod = type(e).__module__ or ""
        if mod.startswith("ray.data") and type(e).__name__ == "SystemException":
            return None  # Ray Data's own failure around a dead worker
        return type(e).__name__, str(e)
    return type(e).__name__, str(e)


def alive_nodes() -> set[str]:
    """Ids of the cluster's live nodes (a row whose worker died with its node is run
    again, not rejected)."""
    import ray

    try:
        return {str(n["NodeID"]) for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS unreachable for a moment: no node known lost
        return set()
