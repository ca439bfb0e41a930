"""The engine never reports success for a broken stage.

A ``setup()`` that raises, a missing model, or a full disk stop the stage (exit 1, the
cause in the message and in run.json) on both executors and never turn into per-row
rejects; too many rows failing with errors exceed the stage's error budget. Every
committed batch is kept, and a rerun after the fix completes with nothing duplicated.

The full disks are real: tmpfs filesystems (mounted by the test, which needs root; it
skips otherwise) filled to their last block, one under the stage's directory in the run
store and one under its media directory, so the writes fail in the kernel with
``ENOSPC`` the way they do on a full volume. A run directory whose filesystem fills up in the
middle of a stage fails the run naming the stage, and run.json records it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from ray import cloudpickle

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.audio_write import write_audio
from speechmill.pipeline.errors import ErrorBudgetExceeded
from speechmill.pipeline.runner import run
from speechmill.pipeline.store import RunStore
from testkit.audio import load_speech
from tests.pipeline.fault_stages import FaultyModel, write_faults


class MediaModel(FaultyModel):
    """``t_faulty_model`` (faults and all) that also writes each row's audio, as a real
    media stage does: one second of noise (about 30 KB of FLAC) under its media
    directory, through :func:`write_audio`, which keeps a failed write's ``OSError``."""

    name = "t_media_model"

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        out = super().process_row(row)
        path = self.ctx.media_dir / f"{row['id']}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(int(row["id"][1:])).uniform(-0.5, 0.5, 16000)
        write_audio(path, noise, 16000, format="FLAC")
        return {**out, "audio_path": str(path)}


registry.register(MediaModel)
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers get the class


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A real filesystem of ``size`` (a tmpfs) mounted at ``path`` while the block runs;
    skips the test where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                            str(path)], capture_output=True, text=True, timeout=30)
        why = p.stderr.strip() if p.returncode else ""
    except OSError as e:  # no mount(8)
        why = str(e)
    if why:
        pytest.skip(f"a real full disk needs a tmpfs mount, which needs root "
                    f"(CAP_SYS_ADMIN): mount failed: {why}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=True)  # a file still open


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the filesystem at ``disk`` with one file until the kernel refuses a write
    (``ENOSPC``), then free ``leave`` bytes of it again. Returns the file."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as e:
        while True:
            f.write(bytes(1 << 16))
    assert e.value.errno == errno.ENOSPC
    assert os.statvfs(disk).f_bavail == 0  # not a block left
    if leave:
        os.truncate(filler, filler.stat().st_size - leave)
    return filler


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One embedded Ray for this module's Ray runs (the executor uses a Ray it finds
    running and leaves it up), instead of starting one per run."""
    import ray

    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # inherited by the workers
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    if started:
        ray.shutdown()
    if old is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = old


@pytest.fixture(scope="module", params=["local", pytest.param("ray", marks=pytest.mark.ray)])
def executor(request: pytest.FixtureRequest) -> str:
    """Each test that takes it runs on both executors (module scope: Ray starts before
    any test's output capture)."""
    if request.param == "ray":
        request.getfixturevalue("ray_session")
    return str(request.param)


def cli(capsys: pytest.CaptureFixture, dag: Path, *args: str) -> tuple[int, str]:
    """``speechmill run`` in this process (so the test stages are registered): exit code
    and everything it printed."""
    from speechmill.pipeline.cli import main

    rc = main(["run", str(dag), "--no-progress", *args])
    out, err = capsys.readouterr()
    return rc, out + err


def run_json(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def out_ids(store: RunStore, sid: str) -> list[str]:
    return sorted(store.read_outputs(sid, ["id"]).column("id").to_pylist())


def parts(store: RunStore, sid: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in store.output_parts(sid)}


def test_broken_stage_fails_and_rerun_after_fix_completes(
        tmp_path: Path, executor: str, capsys: pytest.CaptureFixture) -> None:
    import tests.pipeline.fault_stages  # noqa: F401 - registers the test stages

    run_dir, faults = tmp_path / "run", tmp_path / "faults.json"
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: faults
run_dir: {run_dir}
executor: {{type: {executor}, stall_timeout_s: 300, fuse: false}}
stages:
  - {{id: src, uses: t_rows, batch_size: 8, with: {{n: 40}}}}
  - {{id: m, uses: t_faulty_model, needs: [src], with: {{faults: "{faults}"}}}}
  - {{id: t, uses: t_faulty, needs: [m], with: {{faults: "{faults}"}}}}
""")
    store = RunStore(run_dir)
    want = [f"r{i:03d}" for i in range(40)]
    # unfused, so each step fails one stage after its upstream finished (fused members
    # fail the same way: tests/pipeline/test_fused.py)

    # 1. the model stage's setup() raises: exit 1, the original error, nothing rejected
    write_faults(faults, {"m": {"setup": "CUDA error: no CUDA-capable device is detected"}})
    rc, text = cli(capsys, dag)
    cause = "stage 'm': setup() failed: RuntimeError: CUDA error: no CUDA-capable device"
    assert rc == 1 and cause in text, text
    info = run_json(run_dir)
    assert info["status"] == "failed" and cause in info["error"]
    assert "RuntimeError" in info["error_traceback"]
    assert out_ids(store, "src") == want
    assert store.count_rows("m") == (0, 0)

    # 2. 40 % of the rows raise: the error budget (5 %) stops the stage
    write_faults(faults, {"m": {"fail_mod": 5, "fail_rem": [0, 1]}})
    rc, text = cli(capsys, dag)
    m = re.search(r"stage 'm': (\d+) of (\d+) rows failed with errors \(([\d.]+)% > "
                  r"max_error_fraction 5%\); most frequent: (\w+) x\d+ \(e\.g\. row 'r\d{3}'\)"
                  r", (\w+) x\d+ \(e\.g\. row 'r\d{3}'\)", text)
    assert rc == 1 and m, text
    failed, rows, pct = int(m.group(1)), int(m.group(2)), float(m.group(3))
    assert rows >= 20 and pct == pytest.approx(100 * failed / rows, abs=0.1) and pct > 5
    assert {m.group(4), m.group(5)} == {"ValueError", "ZeroDivisionError"}
    assert "ErrorBudgetExceeded" in run_json(run_dir)["error"]
    rejects = store.read_rejects("m").to_pylist()
    assert rejects and {r["reason"] for r in rejects} == {"error"}
    assert all(r["detail"].startswith(("ValueError: bad value in row",
                                       "ZeroDivisionError: division by zero"))
               for r in rejects)
    kept = parts(store, "m")
    assert kept  # the good rows' batches are committed
    # (a full disk: test_full_disk_fails_the_stage_and_keeps_every_batch)

    # 3. the task stage's setup() raises (Ray: tasks, not an actor pool); m's error rows
    # were retried first and completed
    write_faults(faults, {"t": {"setup": "bad checkpoint"}})
    rc, text = cli(capsys, dag)
    assert rc == 1 and "stage 't': setup() failed: RuntimeError: bad checkpoint" in text, text
    assert out_ids(store, "m") == want and store.count_rows("m")[1] == 0
    now = parts(store, "m")
    assert {p: now.get(p) for p in kept} == kept  # the committed batches, untouched
    assert store.count_rows("t") == (0, 0)

    # 4. fixed: the rerun completes, every row exactly once, nothing rejected
    write_faults(faults, {})
    rc, text = cli(capsys, dag)
    assert rc == 0, text
    assert run_json(run_dir)["status"] == "succeeded"
    for sid in ("m", "t"):
        assert out_ids(store, sid) == want
        assert store.count_rows(sid) == (40, 0)
    assert not list(run_dir.rglob("*.tmp"))


def test_full_disk_fails_the_stage_and_keeps_every_batch(
        tmp_path: Path, executor: str, capsys: pytest.CaptureFixture) -> None:
    """Real full filesystems: under the stage's directory in the run store, then under
    its media directory. Each stops the run (exit 1, ENOSPC in the message and in
    run.json, status failed), no row is rejected for it, the committed batches stay
    untouched, and once space is freed the rerun completes every row exactly once."""
    run_dir, faults = tmp_path / "run", tmp_path / "faults.json"
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: full
run_dir: {run_dir}
executor: {{type: {executor}, stall_timeout_s: 300}}
stages:
  - {{id: src, uses: t_rows, batch_size: 8, with: {{n: 40}}}}
  - {{id: m, uses: t_media_model, needs: [src], with: {{faults: "{faults}"}}}}
""")
    store = RunStore(run_dir)
    want = [f"r{i:03d}" for i in range(40)]

    def rejected() -> list[tuple[str, str]]:
        return sorted((r["id"], r["reason"]) for r in store.read_rejects("m").to_pylist())

    # a first attempt makes run_dir a run directory (a run writes into no other
    # non-empty folder) and m's directory; then m gets a disk of its own for each
    write_faults(faults, {"m": {"setup": "not yet"}})
    rc, text = cli(capsys, dag)
    assert rc == 1 and "stage 'm': setup() failed: RuntimeError: not yet" in text, text
    assert store.count_rows("m") == (0, 0)
    with small_disk(run_dir / "stages" / "m", "4m") as stage_disk, \
            small_disk(run_dir / "media" / "m", "8m") as media_disk:
        # an earlier attempt: committed batches, and `error` rejects to retry
        write_faults(faults, {"m": {"fail_mod": 5, "fail_rem": [0, 1]}})
        rc, text = cli(capsys, dag)
        assert rc == 1 and "ErrorBudgetExceeded" in run_json(run_dir)["error"], text
        kept, errors = parts(store, "m"), rejected()
        assert kept and errors and {why for _, why in errors} == {"error"}
        write_faults(faults, {})  # nothing is wrong with the stage from here on

        # 1. the filesystem under the stage's directory in the run store is full
        filler = fill(stage_disk)
        rc, text = cli(capsys, dag)
        assert rc == 1 and "OSError: [Errno 28] No space left on device" in text, text
        info = run_json(run_dir)
        assert info["status"] == "failed", info
        assert "No space left on device" in info["error"], info
        assert parts(store, "m") == kept  # every committed batch is there, untouched
        assert rejected() == errors  # no row rejected for it
        filler.unlink()

        # 2. the filesystem under the stage's media directory is full: its first clip's
        # write fails, which stops the stage instead of rejecting the row
        filler = fill(media_disk)
        rc, text = cli(capsys, dag)
        cause = "stage 'm': OSError: [Errno 28] No space left on device"
        assert rc == 1 and cause in text, text
        info = run_json(run_dir)
        assert info["status"] == "failed" and cause in info["error"], info
        assert parts(store, "m") == kept
        assert rejected() == []  # the error rows were cleared for retry, none rejected
        filler.unlink()

        # 3. space freed: the rerun completes, every row exactly once, with its clip
        rc, text = cli(capsys, dag)
        assert rc == 0, text
        assert run_json(run_dir)["status"] == "succeeded"
        assert out_ids(store, "m") == want and store.count_rows("m") == (40, 0)
        now = parts(store, "m")
        assert {p: now.get(p) for p in kept} == kept
        for r in store.read_outputs("m", ["audio_path"]).to_pylist():
            assert sf.info(r["audio_path"]).frames == 16000
        assert not list(run_dir.rglob("*.tmp"))


def test_run_dir_filling_up_during_a_stage(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    """One filesystem for the whole run directory, with 16 KiB left when the stage
    starts: the run's own bookkeeping fits, the stage's first clip (about 30 KB of
    FLAC) does not and fills it. The run must fail naming the stage and ENOSPC, with
    run.json saying so, and no row rejected."""
    run_dir, faults = tmp_path / "run", tmp_path / "faults.json"
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: fills
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: src, uses: t_rows, batch_size: 8, with: {{n: 40}}}}
  - {{id: m, uses: t_media_model, needs: [src], with: {{faults: "{faults}"}}}}
""")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with small_disk(run_dir, "8m") as disk:
            write_faults(faults, {"m": {"setup": "not yet"}})  # src runs, m does not
            rc, text = cli(capsys, dag)
            assert rc == 1 and "stage 'm': setup() failed" in text, text
            write_faults(faults, {})
            fill(disk, leave=16 * 1024)
            rc, text = cli(capsys, dag)
            assert rc == 1 and "No space left on device" in text, text
            assert RunStore(run_dir).count_rows("m")[1] == 0  # no row rejected
            info = run_json(run_dir)
            assert info["status"] == "failed", info
            assert "stage 'm'" in info["error"] and "No space left on device" in \
                info["error"], info
            assert "run failed: stage 'm'" in text, text
    finally:  # the failed run's `finally` never restored them
        for s, h in handlers.items():
            signal.signal(s, h)


def test_missing_model_fails_the_stage(tmp_path: Path, executor: str,
                                       capsys: pytest.CaptureFixture) -> None:
    import tests.pipeline.fault_stages  # noqa: F401

    wav = tmp_path / "speech.wav"
    sf.write(wav, load_speech(3.0, 16000, seed=3).astype(np.float32), 16000)
    run_dir = tmp_path / "run"
    dag = tmp_path / "dag.yaml"

    def write(model: str) -> None:
        dag.write_text(f"""
name: asr
run_dir: {run_dir}
executor: {{type: {executor}, stall_timeout_s: 300}}
stages:
  - {{id: src, uses: t_rows, with: {{n: 2, audio_path: "{wav}", duration: 3.0}}}}
  - {{id: asr, uses: transcribe, needs: [src], with: {{{model}cpu_threads: 1}}}}
""")

    write("model_path: /nonexistent, ")
    rc, text = cli(capsys, dag, "--offline")
    cause = ("stage 'asr': setup() failed: ModelNotFoundError: model '/nonexistent' for "
             "backend 'faster-whisper' not found")
    assert rc == 1 and cause in text, text
    assert cause in run_json(run_dir)["error"]
    assert RunStore(run_dir).count_rows("asr") == (0, 0)  # no row blamed for it
    if executor == "ray":
        return  # the fix and rerun below is the same on both executors
    # the fix changes the stage's config; it committed nothing, so that is allowed
    write("")
    rc, text = cli(capsys, dag, "--offline")
    assert rc == 0, text
    outs = RunStore(run_dir).read_outputs("asr", ["parent_id", "text"]).to_pylist()
    assert sorted(r["parent_id"] for r in outs) == ["r000", "r001"]
    assert all(r["text"].strip() for r in outs)


def _budget_dag(tmp_path: Path, faults: Path, n: int, stage_extra: str = "") -> Any:
    return f"""
name: budget
run_dir: {tmp_path / 'run'}
executor: {{type: local}}
stages:
  - {{id: src, uses: t_rows, batch_size: 8, with: {{n: {n}}}}}
  - {{id: f, uses: t_faulty, needs: [src], {stage_extra}with: {{faults: "{faults}"}}}}
"""


def test_error_budget_is_configurable_per_stage_and_executor(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import tests.pipeline.fault_stages  # noqa: F401

    faults = tmp_path / "faults.json"
    write_faults(faults, {"f": {"fail_mod": 5, "fail_rem": [0, 1]}})  # 16 of 40 rows
    # the stage's own key
    d = dagmod.loads(_budget_dag(tmp_path / "a", faults, 40, "max_error_fraction: 0.5, "))
    assert run(d, progress=False).status == "succeeded"
    m = json.loads((tmp_path / "a/run/stages/f/metrics.json").read_text())
    assert m["reasons"] == {"error": 16} and m["rows_out"] == 24
    # the executor's key, and a stage's own key wins over it
    dag = tmp_path / "b.yaml"
    dag.write_text(_budget_dag(tmp_path / "b", faults, 40))
    rc, text = cli(capsys, dag, "--set", "executor.max_error_fraction=0.5")
    assert rc == 0, text
    dag = tmp_path / "c.yaml"
    dag.write_text(_budget_dag(tmp_path / "c", faults, 40))
    rc, text = cli(capsys, dag, "--set", "executor.max_error_fraction=0.5",
                   "--set", "f.max_error_fraction=0.1")
    assert rc == 1 and re.search(r"stage 'f': \d+ of \d+ rows failed with errors "
                                 r"\([\d.]+% > max_error_fraction 10%\)", text), text
    # out of range: a configuration error naming the stage and key
    rc, text = cli(capsys, dag, "--set", "f.max_error_fraction=2")
    assert rc == 2 and "stage 'f': key 'max_error_fraction'" in text, text


def test_small_stages_fail_only_when_every_row_fails(tmp_path: Path) -> None:
    import tests.pipeline.fault_stages  # noqa: F401

    faults = tmp_path / "faults.json"
    # 1 of 3 rows raises: below 20 rows the fraction is not judged
    write_faults(faults, {"f": {"fail_mod": 3, "fail_rem": [0]}})
    res = run(dagmod.loads(_budget_dag(tmp_path / "a", faults, 3)), progress=False)
    assert res.status == "succeeded"
    # both rows of a 2-row stage raise: the stage fails whatever the count
    write_faults(faults, {"f": {"fail_mod": 1, "fail_rem": [0]}})
    with pytest.raises(ErrorBudgetExceeded,
                       match=r"stage 'f': 2 of 2 rows failed with errors \(every row "
                             r"failed.*ValueError x2"):
        run(dagmod.loads(_budget_dag(tmp_path / "b", faults, 2)), progress=False)
    # data-quality rejects are not errors: a stage may reject every row
    write_faults(faults, {"f": {"reject": "no_speech"}})
    res = run(dagmod.loads(_budget_dag(tmp_path / "c", faults, 30)), progress=False)
    assert res.status == "succeeded"
    assert RunStore(tmp_path / "c/run").count_rows("f") == (0, 30)


@pytest.mark.ray
def test_worker_crashes_count_in_the_budget(tmp_path: Path, ray_session: None) -> None:
    """A row that kills its worker even alone is a `worker_crash` reject, counted in
    the budget: when every row does, the stage fails; fixed, the rows are retried."""
    import tests.pipeline.fault_stages  # noqa: F401

    faults = tmp_path / "faults.json"
    write_faults(faults, {"m": {"crash": ["r000"]}})
    d = dagmod.loads(f"""
name: crash
run_dir: {tmp_path / 'run'}
executor: {{type: ray, stall_timeout_s: 300}}
stages:
  - {{id: src, uses: t_rows, with: {{n: 1}}}}
  - {{id: m, uses: t_faulty_model, needs: [src], with: {{faults: "{faults}"}}}}
""")
    with pytest.raises(ErrorBudgetExceeded, match=r"stage 'm': 1 of 1 rows failed with "
                       r"errors \(every row failed.*most frequent: \w+Error x1"):
        run(d, progress=False)
    store = RunStore(tmp_path / "run")
    assert [r["reason"] for r in store.read_rejects("m").to_pylist()] == ["worker_crash"]
    write_faults(faults, {})
    assert run(d, progress=False).status == "succeeded"
    assert store.count_rows("m") == (1, 0)


@pytest.mark.ray
def test_ray_errors_are_told_apart(ray_session: None) -> None:
    """Real Ray exceptions: a task's or an actor constructor's exception is the
    application's (its original type and message), a dead worker process is not."""
    import ray.data

    from speechmill.pipeline.executors.ray_support import ray_application_error

    def raises(batch: Any) -> Any:
        raise KeyError("no such column 'x'")

    def dies(batch: Any) -> Any:
        os._exit(11)

    class NoModel:
        def __init__(self) -> None:
            raise FileNotFoundError("no model at /nonexistent")

        def __call__(self, batch: Any) -> Any:
            return batch

    def error_of(fn: Any, **kw: Any) -> BaseException:
        ds = ray.data.from_items([{"x": 1}]).map_batches(fn, batch_size=1, **kw)
        with pytest.raises(Exception) as e:  # noqa: PT011 - whatever Ray raises
            ds.take_all()
        return e.value

    assert ray_application_error(error_of(raises)) == ("KeyError", "\"no such column 'x'\"")
    assert ray_application_error(error_of(
        NoModel, compute=ray.data.ActorPoolStrategy(size=1), max_restarts=0)) == (
        "FileNotFoundError", "no model at /nonexistent")
    assert ray_application_error(error_of(dies, max_retries=0)) is None


def test_budget_arithmetic() -> None:
    from speechmill.pipeline.failures import ErrorBudget

    def budget(failed: int, rows: int, total: int | None = None) -> ErrorBudget:
        b = ErrorBudget("s", 0.05, total=total)
        for i in range(rows):
            bad = i < failed
            b.add({"rows_in": 1, "reasons": {"error": 1} if bad else {},
                   "errors": {"ValueError": [1, f"r{i}"]} if bad else {}})
        return b

    assert not budget(1, 20).exceeded(final=True)  # 5 % is within 5 %
    assert budget(2, 20).exceeded(final=True)  # 10 % is not...
    assert not budget(2, 20).exceeded()  # ...but 2 of 20 is no proof while running
    assert budget(7, 20).exceeded()  # 7 of 20 is
    assert budget(3, 20, total=40).exceeded()  # over 5 % of the whole stage already
    assert not budget(3, 10, total=40).exceeded()  # not before 20 rows
    assert not budget(2, 3).exceeded(final=True) and budget(3, 3).exceeded(final=True)
    msg = str(budget(7, 20).error())
    assert msg.startswith("stage 's': 7 of 20 rows failed with errors (35% > "
                          "max_error_fraction 5%); most frequent: ValueError x7 (e.g. row "
                          "'r0')")
