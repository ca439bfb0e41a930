"""Run a DAG: stage by stage in dependency order, each stage resumable.

The runner opens the run directory (its lock, ``run.json``, the resolved ``dag.yaml``),
checks that the finished stages still match the DAG (:func:`check_resumable`), starts
the executor and runs each stage that has no ``_SUCCESS`` through one stage attempt
(:mod:`.attempt`: open, read input, prepare, run, finish), consecutive row-local stages
as one fused chain (:mod:`.fused`). A stage with ``_SUCCESS`` is skipped, so rerunning a
finished run does no work.

A stage fails loudly instead of finishing with rows it could not process: a fatal error
(``setup()`` raised, the run directory cannot be written) stops it at once, and so does
its error budget (``max_error_fraction`` of rows rejected as ``error`` /
``worker_crash``, see :mod:`.failures`), checked as batch stats arrive and at the end.
Every committed batch stays; when the stage runs again, the rows it rejected with those
engine reasons are retried (their rejects removed first, :mod:`.stage_end`), so a rerun
after the fix completes without duplicates. SIGINT / SIGTERM mark the run
``interrupted`` (:mod:`.signals`).
"""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import sys
from dataclasses import dataclass, field
from typing import Any

from speechmill.pipeline.attempt import RunSession, run_chain, run_stage, sink_dir
from speechmill.pipeline.dag import Dag, written_by_version
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.executors.base import Executor
from speechmill.pipeline.executors.local import LocalExecutor
from speechmill.pipeline.fused import plan_chains
from speechmill.pipeline.report import render_summary
from speechmill.pipeline.signals import GracefulSignals, RunInterrupted
from speechmill.pipeline.stage_end import now_iso
from speechmill.pipeline.store import RunStore, open_store
from speechmill.pipeline.store.layout import is_url


@dataclass
class RunResult:
    run_dir: str
    status: str
    stages: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def rejected(self) -> int:
        return sum(int(s.get("rows_rejected", 0)) for s in self.stages)


def _state(metrics: dict[str, Any]) -> str:
    return "incomplete" if metrics.get("incomplete") else "done"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("speechmill", "ray", "pyarrow", "av", "soxr", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


def make_executor(dag: Dag, executor: str | None = None, ray_address: str | None = None
                  ) -> Executor:
    kind = executor or dag.spec.executor.type
    if kind == "local":
        return LocalExecutor()
    if kind == "ray":
        from speechmill.pipeline.executors.ray import RayExecutor

        return RayExecutor(
            address=ray_address or dag.spec.executor.ray_address,
            num_cpus=dag.spec.executor.num_cpus,
        )
    raise ConfigError(f"unknown executor {kind!r} (ray | local)", key="executor.type")


def check_resumable(dag: Dag, store: RunStore) -> None:
    """Fail fast when a stage's config or behaviour version changed since its outputs
    were written. A stage that committed nothing (say its ``setup()`` failed on a wrong
    model path) may change freely: its directory is cleared and it starts afresh."""
    for st in dag.stages:
        fp = store.read_fingerprint(st.id)
        if fp is not None and fp == st.legacy_fingerprint != st.fingerprint:
            store.write_fingerprint(st.id, st.fingerprint)  # same config, newer formula
            continue
        if (fp is not None and fp != st.fingerprint and not store.is_done(st.id)
                and not store.output_parts(st.id) and not store.reject_parts(st.id)):
            for d in (store.stage_dir(st.id), store.media_dir(st.id)):
                store.remove_tree(d)
            if st.cls.is_sink:
                store.remove_tree(sink_dir(store, st))
            continue
        if fp is not None and fp != st.fingerprint:
            old = written_by_version(dag, st, fp)
            if old is not None:
                raise ConfigError(
                    f"its behaviour version changed: {str(store.stage_dir(st.id))!r} was "
                    f"written by version {old} of stage {st.spec.uses!r}, this speechmill "
                    f"has version {st.cls.version}; rerun with --restart-from {st.id} to "
                    "redo it and everything after it with the new behaviour (or use a new "
                    "run directory)",
                    stage=st.id,
                )
            raise ConfigError(
                f"its config changed since {str(store.stage_dir(st.id))!r} was written; "
                f"use a new run directory, or --restart-from {st.id} to redo it and "
                "everything after it",
                stage=st.id,
                key="with",
            )


def check_store_support(dag: Dag, store: RunStore) -> None:
    """Before anything runs: refuse a stage that needs a local run directory (it reads or
    writes it by local paths) when the run directory is on object storage."""
    if not is_url(dag.run_dir):
        return
    for st in dag.stages:
        if st.cls.local_run_dir_only:
            raise ConfigError(
                f"stage {st.spec.uses!r} needs a local (or shared POSIX) run directory; "
                f"it does not run with a run directory on object storage "
                f"({dag.run_dir!r}) yet: run it on a copy of the run directory, or drop it",
                stage=st.id, key="run_dir")


def restart_from(dag: Dag, store: RunStore, stage_id: str) -> list[str]:
    """Delete ``stage_id`` and every stage downstream of it from the run directory."""
    if stage_id not in {s.id for s in dag.stages}:
        raise ConfigError(f"--restart-from: no stage {stage_id!r}")
    doomed = {stage_id}
    for s in dag.stages:  # topological order: downstream stages come later
        if set(s.spec.needs) & doomed:
            doomed.add(s.id)
    by_id = {s.id: s for s in dag.stages}
    for sid in doomed:
        store.remove_tree(store.stage_dir(sid))
        store.remove_tree(store.media_dir(sid))
        if by_id[sid].cls.is_sink:
            store.remove_tree(sink_dir(store, by_id[sid]))
    return sorted(doomed)


def run(
    dag: Dag,
    *,
    executor: str | None = None,
    ray_address: str | None = None,
    offline: bool = False,
    progress: bool | None = None,
    restart: str | None = None,
    console: Any = None,
) -> RunResult:
    from rich.console import Console

    console = console or Console(stderr=False)
    store = open_store(dag.run_dir)
    check_store_support(dag, store)
    show = dag.spec.executor.progress if progress is None else progress
    result = RunResult(run_dir=str(store.root), status="running")
    with store.lock():
        if restart:
            gone = restart_from(dag, store, restart)
            console.print(f"restarting from {restart}: cleared {', '.join(gone)}")
        check_resumable(dag, store)
        store.write_root_file("dag.yaml", dag.resolved_yaml().encode())
        prev = store.read_run() or {}
        info: dict[str, Any] = {
            "name": dag.name,
            "status": "running",
            "started_at": now_iso(),
            "first_started_at": prev.get("first_started_at") or now_iso(),
            "attempt": int(prev.get("attempt", 0)) + 1,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "argv": safe_argv(dag),
            "dag_file": dag.source_path,
            "versions": _versions(),
        }
        store.write_run(info)
        exe: Executor | None = None
        session: RunSession | None = None  # the stage attempts' shared state

        def force_exit(signal_name: str) -> None:  # a second signal: exit at once
            info.update(status="interrupted", ended_at=now_iso(),
                        error=f"interrupted by {signal_name} (second signal: exited at once)")
            store.write_run(info)

        signals = GracefulSignals(on_force=force_exit).install()
        try:
            pending_stages = [s for s in dag.stages if not store.is_done(s.id)]
            if pending_stages:
                exe = make_executor(dag, executor, ray_address)
                signals.install()  # ray.init replaces the driver's SIGTERM handler
                info["executor"] = exe.describe()
                store.write_run(info)
                console.print(f"[bold]{dag.name}[/] -> {store.root}  ({exe.describe()})")
                session = RunSession(dag, store, exe, offline=offline, show=show,
                                     console=console)
            chains, fused = plan_chains(dag, store), set()
            for st in dag.stages:
                if st.id in fused:  # ran with its chain
                    continue
                if store.is_done(st.id):
                    m = store.read_metrics(st.id) or {"stage": st.id}
                    result.stages.append({**m, "state": "done earlier"})
                    continue
                assert session is not None
                if st.id in chains:  # consecutive row-local stages: one pipeline
                    for m in run_chain(session, chains[st.id]):
                        result.stages.append({**m, "state": _state(m)})
                    fused.update(s.id for s in chains[st.id])
                    continue
                m = run_stage(session, st)
                result.stages.append({**m, "state": _state(m)})
            result.status = "succeeded"
            retry = sum(int(m.get("rows_transient") or 0) for m in result.stages)
            if retry:
                info["transient_rejects"] = retry
                console.print(
                    f"[yellow]{retry} rows failed transiently (a service or resource failed "
                    "after its retries); they are not final: rerun the same command to "
                    "retry them[/]")
        except KeyboardInterrupt as e:
            result.status = "interrupted"
            result.error = str(e) if isinstance(e, RunInterrupted) else "interrupted"
            raise
        except BaseException as e:
            result.status = "failed"
            result.error = f"{type(e).__name__}: {e}"
            tb = getattr(e, "traceback", None)  # a worker's, for a StageFailedError
            if tb:
                info["error_traceback"] = str(tb)[-4000:]
            raise
        finally:
            info.update(status=result.status, ended_at=now_iso())
            if result.error:
                info["error"] = result.error[:2000]
            try:
                store.write_run(info)
            except OSError as e:  # never hides the error that stopped the run
                if sys.exc_info()[0] is None:
                    raise
                console.print(f"[red]cannot record the run's end in run.json: {e}[/]")
            try:
                if exe is not None:
                    exe.close()  # stops the workers
            finally:
                signals.restore()
    render_summary(result.stages, console=console, run_dir=str(store.root))
    return result


def safe_argv(dag: Dag, argv: list[str] | None = None) -> list[str]:
    """The command line for run.json, with secrets out: env values, --set of secret keys,
    secret keys inside a --set value that is a mapping or list (``gen.llm.extra_body=
    {"api_key": ...}``, parsed as YAML/JSON like the override itself and redacted with
    :func:`speechmill.pipeline.dag.redact`), then every argument through
    :func:`speechmill.pipeline.redact.redact_text` (registered secrets, URL credentials,
    ``api_key=...``-looking values)."""
    import json

    import yaml

    from speechmill.pipeline.dag import REDACTED, is_secret_key, redact
    from speechmill.pipeline.redact import redact_text

    env = [v for v in dag.secret_env.values() if v and len(v) >= 4]
    out = []
    prev = ""
    for raw in sys.argv if argv is None else argv:
        a = raw
        body = a[len("--set="):] if a.startswith("--set=") else (a if prev == "--set" else None)
        if body is not None and "=" in body:
            path, value = body.split("=", 1)
            parts = path.strip().split(".")
            if any(is_secret_key(p) for p in parts):
                value = REDACTED
            else:
                try:
                    parsed = yaml.safe_load(value)
                except (yaml.YAMLError, ValueError, TypeError, OverflowError, RecursionError):
                    parsed = None
                if isinstance(parsed, dict | list):
                    red = redact(parsed, parts[-1])
                    if red != parsed:
                        value = json.dumps(red, ensure_ascii=False, default=str)
            a = a[: len(a) - len(body)] + f"{path}={value}"
        out.append(redact_text(a, env))
        prev = raw
    return out
