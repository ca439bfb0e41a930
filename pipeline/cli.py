"""``speechmill`` command line. Heavy libraries are imported only by the subcommand
that needs them, so ``speechmill --help`` starts fast."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _add_dag_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dag", help="DAG YAML file (see dags/)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="STAGE.KEY=VALUE",
                   help="override a stage key (also executor.KEY=V, run_dir=V); repeatable")
    p.add_argument("--run-dir", help="run directory (overrides the DAG's run_dir): a new or "
                   "empty folder, an earlier run's directory (resumed), or s3://, gs://, "
                   "abfs://, file:// URLs; a folder of other files is refused")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speechmill",
        description="Turn web audio into speech-LM training data: run DAGs of stages, "
        "resumable, on one machine or a Ray cluster.",
    )
    parser.add_argument("--version", action="store_true", help="print the version")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND")

    p = sub.add_parser("run", help="run a DAG (resumes an interrupted run in its run_dir)")
    _add_dag_args(p)
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan only")
    p.add_argument("--executor", choices=["ray", "local"], help="override executor.type")
    p.add_argument("--ray-address", default=None,
                   help="run on this existing Ray cluster (default: $RAY_ADDRESS, else an "
                   "embedded Ray of the run's own, even where `ray start` runs a cluster)")
    p.add_argument("--offline", action="store_true", help="never download models")
    p.add_argument("--restart-from", metavar="STAGE",
                   help="discard STAGE and everything downstream of it, then run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--break-lease", action="store_true",
                   help="object-store run dir (s3://...): take over the lease of a run on "
                   "another host now instead of waiting for it to expire (up to "
                   "$SPEECHMILL_LEASE_TTL_S, 120 s); only when you know that run is gone. "
                   "A lease of a killed run on this host is taken over without it; a live "
                   "run on this host is never broken")

    p = sub.add_parser("validate", help="check a DAG and print its plan")
    _add_dag_args(p)

    p = sub.add_parser("status", help="state and counts of each stage of a run directory")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("stages", help="list registered stages, their parameters and defaults")
    p.add_argument("name", nargs="?", help="show one stage in detail")

    p = sub.add_parser("report", help="dataset report of a run directory: hours by "
                       "language/speaker/source/split, histograms, rejects (HTML + JSON)")
    p.add_argument("run_dir")
    p.add_argument("--out", metavar="DIR",
                   help="output folder (default: RUN_DIR/report/cli, replaced atomically)")
    p.add_argument("--stage", metavar="ID", help="stage whose outputs are the dataset "
                   "(default: the last stage whose outputs have a duration column)")
    p.add_argument("--scheduler", choices=["threads", "local", "ray"], default="threads",
                   help="Dask scheduler: threads (default), local (synchronous) or ray "
                   "(Dask-on-Ray)")
    p.add_argument("--ray-address", default=None, help="Ray cluster for --scheduler ray "
                   "(default: the run's executor.ray_address, $RAY_ADDRESS, else embedded)")
    p.add_argument("--top-n", type=int, default=20, help="speakers/sources in tables (20)")
    p.add_argument("--bins", type=int, default=30, help="histogram bins (30)")

    p = sub.add_parser("demo-data", help="write the demo's input audio (speech in many "
                       "formats, plus bad files) into a folder")
    p.add_argument("out_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from importlib.metadata import version

        print(version("speechmill"))
        return 0
    if not args.cmd:
        parser.print_help()
        return 0
    from speechmill.pipeline.errors import ConfigError, SpeechmillError, StageFailedError

    try:
        return int(_dispatch(args) or 0)
    except ConfigError as e:
        print(f"speechmill: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except StageFailedError as e:
        print(f"speechmill: run failed: {e}", file=sys.stderr)
        if args.cmd == "run":
            print("speechmill: the run directory keeps every committed batch; fix the cause "
                  "and rerun the same command to resume (details: run.json)", file=sys.stderr)
        return EXIT_FAILED
    except SpeechmillError as e:
        print(f"speechmill: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:
        why = f" by {e.signal_name}" if hasattr(e, "signal_name") else ""
        print(f"speechmill: interrupted{why}; committed batches are kept, rerun the same "
              "command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug or an unexpected environment error: say it, exit 1
        import traceback

        traceback.print_exc()
        print(f"speechmill: failed: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED


def _dispatch(args: argparse.Namespace) -> int:
    if args.cmd in ("run", "validate"):
        return _run(args)
    if args.cmd == "status":
        return _status(args)
    if args.cmd == "stages":
        return _stages(args)
    if args.cmd == "report":
        return _report(args)
    if args.cmd == "demo-data":
        from speechmill.pipeline.registry import command

        files = command("demo-data")(args.out_dir)
        print(f"wrote {len(files)} files to {args.out_dir}")
        return 0
    raise AssertionError(args.cmd)


def _console() -> Any:
    from rich.console import Console

    c = Console()
    if not c.is_terminal:  # logs and CI: wide enough that tables don't wrap
        c = Console(width=160)
    return c


def _run(args: argparse.Namespace) -> int:
    from speechmill.pipeline import dag as dagmod

    console = _console()
    d = dagmod.load(args.dag, overrides=args.overrides, run_dir=args.run_dir)
    if args.cmd == "validate" or args.dry_run:
        _print_plan(d, console)
        if args.cmd == "run":
            _print_estimates(d, console)
            console.print("dry run: nothing executed")
        return 0
    if args.break_lease:
        from speechmill.pipeline.store import open_store
        from speechmill.pipeline.store.layout import is_url

        if is_url(d.run_dir):  # take the lease over and hand it back: the run takes it
            with open_store(d.run_dir).lock(break_lease=True):
                pass
    from speechmill.pipeline.runner import run

    run(d, executor=args.executor, ray_address=args.ray_address, offline=args.offline,
        progress=False if args.no_progress else None, restart=args.restart_from,
        console=console)
    return 0


def _print_estimates(d: Any, console: Any) -> None:
    """``--dry-run``: what stages that pay per request (LLM sources) would send, before
    anything is spent. A stage opts in with a ``dry_run(config, run_dir, stage_id)``
    classmethod returning a dict (requests, tokens, estimated cost, cache hits)."""
    for st in d.stages:
        fn = getattr(st.cls, "dry_run", None)
        if fn is None:
            continue
        est = fn(st.config, run_dir=d.run_dir, stage_id=st.id)
        cost = est.get("cost_usd")
        worst = est.get("cost_usd_max")
        money = ("cost unknown (no price for the model: set llm.prices)" if cost is None
                 else f"~${cost:.4f} (at most ${worst:.4f})" if worst is not None
                 else f"~${cost:.4f}")
        console.print(
            f"estimate {st.id}: {est.get('requests', 0)} requests "
            f"({est.get('cached', 0)} already cached), "
            f"{est.get('prompt_tokens', 0)} prompt + {est.get('completion_tokens', 0)} "
            f"completion tokens, {money}")


def _print_plan(d: Any, console: Any) -> None:
    from rich.table import Table

    from speechmill.pipeline.dag import redact
    from speechmill.pipeline.store import RunStore

    store = RunStore(d.run_dir)  # a local path or a URL run dir
    unreachable: list[str] = []  # an object store that did not answer: asked once only
    console.print(f"DAG [bold]{d.name}[/]  run_dir: {d.run_dir}  executor: "
                  f"{d.spec.executor.type}")
    t = Table(title="plan", title_justify="left")
    for c in ("#", "stage", "uses", "needs", "kind", "batch", "state", "config"):
        t.add_column(c)
    for i, st in enumerate(d.stages, 1):
        kind = "actor pool (model)" if st.cls.uses_model else (
            "source" if st.cls.is_source else "tasks")
        if st.cls.is_sink:
            kind = f"sink -> {st.cls.output_root}/"
        state = _stage_state(store, st.id, unreachable)
        cfg = st.config.model_dump(mode="json", exclude_defaults=True)
        cfg = redact(cfg)
        t.add_row(str(i), st.id, st.spec.uses, ",".join(st.spec.needs) or "-", kind,
                  "-" if st.cls.is_sink else str(st.batch_size), state,
                  ", ".join(f"{k}={v}" for k, v in cfg.items()) or "(defaults)")
    console.print(t)


def _stage_state(store: Any, stage_id: str, unreachable: list[str]) -> str:
    """done / partial / pending; ``unknown`` when an object store cannot be reached (a
    dry run must not fail on it: credentials may only exist on the cluster)."""
    if unreachable:
        return unreachable[0]
    try:
        return "done" if store.is_done(stage_id) else (
            "partial" if store.has_stage_dir(stage_id) else "pending")
    except Exception as e:  # noqa: BLE001 - unreachable store, no credentials here
        if store.local:
            raise
        unreachable.append(f"unknown ({type(e).__name__})")
        return unreachable[0]


def _run_dir_exists(run_dir: str) -> bool:
    from speechmill.pipeline.store import open_store
    from speechmill.pipeline.store.layout import is_url

    if not is_url(run_dir):
        return os.path.isdir(run_dir)
    from speechmill.pipeline.errors import SpeechmillError

    try:
        return open_store(run_dir).exists()
    except (SpeechmillError, OSError, ValueError) as e:
        print(f"speechmill: cannot read {run_dir!r}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return False


def _status(args: argparse.Namespace) -> int:
    import json

    from speechmill.pipeline.report import status_rows, summary_table

    if not _run_dir_exists(args.run_dir):
        print(f"speechmill: no run directory {args.run_dir!r}", file=sys.stderr)
        return EXIT_FAILED
    info, rows = status_rows(args.run_dir)
    if args.json:
        print(json.dumps({"run": info, "stages": rows}, indent=2))
        return 0
    console = _console()
    console.print(f"run {info.get('name', '?')}: {info.get('status', 'unknown')} "
                  f"(attempt {info.get('attempt', '?')}, started {info.get('started_at', '?')}"
                  f", ended {info.get('ended_at', '-')})")
    if info.get("error"):
        console.print(f"error: {info['error']}")
    console.print(summary_table(rows, title=f"stages of {args.run_dir}"))
    from rich.markup import escape

    for r in rows:
        for line in [*(r.get("summary_lines") or []), *(r.get("cluster_lines") or [])]:
            console.print(f"  {r['stage']}: {escape(line)}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from speechmill.pipeline.store import open_store
    from speechmill.pipeline.store.layout import is_url

    url = is_url(args.run_dir)
    if not url and not os.path.isdir(args.run_dir):
        print(f"speechmill: no run directory {args.run_dir!r}", file=sys.stderr)
        return EXIT_CONFIG
    from speechmill.pipeline import registry

    report_stage: Any = registry.get("report")  # the `report` sink builds it
    kw = dict(stage=args.stage, top_n=args.top_n, bins=args.bins, scheduler=args.scheduler,
              ray_address=args.ray_address)
    if args.out:  # a folder the user named: written into, never deleted
        out = Path(args.out)
        rep = report_stage.build(args.run_dir, out, atomic=False, **kw)
        where = str(out.resolve() / "index.html")
    elif url:  # made locally, then uploaded to RUN_DIR/report/cli/
        store: Any = open_store(args.run_dir)
        final = store.sink_dir("report", "cli")
        scratch = store.export_scratch(final)
        rep = report_stage.build(args.run_dir, scratch, atomic=False, **kw)
        where = store.publish_export(scratch, final) + "/index.html"
    else:
        out = Path(args.run_dir) / "report" / "cli"
        rep = report_stage.build(args.run_dir, out, atomic=True, **kw)
        where = str(out.resolve() / "index.html")
    from rich.markup import escape

    def hrs(h: float) -> str:
        return f"{h:,.2f} h" if h >= 1 else f"{h * 60:.1f} min"

    console = _console()
    tot, rej, ds = rep["totals"], rep["rejects"], rep["dataset"]
    console.print(f"run {rep['run'].get('name') or '?'}: {rep['run']['status']}; dataset: "
                  f"stage {ds['stage'] or '-'}")
    console.print(f"  {tot['rows']:,} rows, {hrs(tot['hours'])}; languages "
                  f"{tot['languages'] if tot['languages'] is not None else '-'}, speakers "
                  f"{tot['speakers'] if tot['speakers'] is not None else '-'}, splits "
                  f"{tot['splits'] if tot['splits'] is not None else '-'}")
    for lang, a in sorted((rep["hours_by"]["language"] or {}).items(),
                          key=lambda kv: (-kv[1]["seconds"], kv[0]))[:5]:
        console.print(f"    {escape(lang)}: {hrs(a['hours'])} ({a['rows']:,} rows)")
    console.print(f"  rejected {rej['rows']:,} rows, {hrs(rej['hours'])}")
    for sid, st in rej["by_stage"].items():
        top = sorted(st["by_reason"].items(), key=lambda kv: (-kv[1]["rows"], kv[0]))[:3]
        console.print(f"    {escape(sid)}: "
                      + ", ".join(f"{escape(r)} {a['rows']}" for r, a in top))
    for note in rep["notes"]:
        console.print(f"  [yellow]note[/]: {escape(note)}")
    console.print(f"report: {escape(where)}", soft_wrap=True)
    return 0


def _stages(args: argparse.Namespace) -> int:
    from rich.table import Table

    from speechmill.pipeline import registry
    from speechmill.pipeline.stage import config_fields

    console = _console()
    names = [args.name] if args.name else list(registry.available())
    for name in names:
        cls = registry.get(name)
        kind = "model (actor pool)" if cls.uses_model else "tasks"
        if cls.is_source:
            kind += ", source"
        res = cls.resources
        t = Table(title=f"{name}: {cls.description}  [{kind}; cpus={res.cpus:g} "
                  f"gpus={res.gpus:g} memory={res.memory_gb:g} GB; batch "
                  f"{cls.default_batch_size}]", title_justify="left")
        for c in ("key", "type", "default", "description"):
            t.add_column(c)
        for key, typ, default, desc in config_fields(cls.Config):
            t.add_row(key, typ, repr(default), desc)
        console.print(t)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
