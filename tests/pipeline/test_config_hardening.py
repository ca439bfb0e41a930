"""Misconfiguration fails fast: exit code 2 and one line naming the DAG stage and key (or
``run_dir``), no traceback, nothing written (issue 21).

1. stage ids that cannot name a directory, negative / non-finite resources;
2. run directories: ``run_dir: .`` beside the user's DAG file (a folder of other files)
   is refused and the DAG file is left byte for byte; ``''`` / an unset ``${VAR:-}``;
   URLs a run directory cannot live on (``http://``, ``ftp://``, ``zip://``, ...); an
   S3 endpoint that cannot be reached;
3. the embedded Ray executor beside a ``ray start`` cluster of this machine;
4. an object-store lease left by a run killed on this host is taken over at once;
   another host's is refused (naming ``--break-lease``) until the flag breaks it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.cli import EXIT_CONFIG, EXIT_FAILED, main
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.store import RunStore
from speechmill.pipeline.store.checks import check_run_dir_contents
from speechmill.pipeline.store.layout import RUN_MARKER
from tests.conftest import cli_env, dag_yaml

ROOT = Path(__file__).resolve().parents[2]
SPEECHMILL = str(Path(sys.executable).with_name("speechmill"))

_DAG = """name: t
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - id: ingest
    uses: ingest
    with: {{inputs: ["{inputs}"]}}
"""


def _inputs(d: Path, n: int = 2) -> Path:
    """``n`` one-second WAV files."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sf.write(d / f"f{i}.wav", (rng.standard_normal(16000) * 0.1).astype(np.float32),
                 16000)
    return d


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """``speechmill ...`` in this process: exit code and stderr."""
    rc = main(list(argv))
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


# -- 1. stage ids and resources --------------------------------------------------------


@pytest.mark.parametrize(("stage", "what", "shown"), [
    ('id: "abc\\n"', "control character", "'abc\\n'"),
    ('id: "x\\0y"', "control character", "'x\\x00y'"),
    ('id: "a/b"', "path separator", "'a/b'"),
    ('id: "a\\\\b"', "path separator", "'a\\\\b'"),
    ('id: ".."', "'..'", "'..'"),
    ('id: "-x"', "starts with '-'", "'-x'"),
    ('id: ".hidden"', "starts with '.'", "'.hidden'"),
    ('id: ""', "is empty", "''"),
    ('id: "ok ok"', "must start with a letter", "'ok ok'"),
])
def test_bad_stage_id_is_refused(stage: str, what: str, shown: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    text = _DAG.format(run_dir=tmp_path / "run", inputs=tmp_path).replace(
        "  - id: ingest\n", f"  - {stage}\n")
    (tmp_path / "d.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    for cmd in ("validate", "run"):
        rc, err = _cli(capsys, cmd, "d.yaml")
        line = _one_line(err)
        assert rc == EXIT_CONFIG, err
        assert f"stage {shown}: key 'id': " in line and what in line, line
    assert _listing(tmp_path) == before  # no run dir, no stages/abc\n/
    with pytest.raises(ConfigError) as ei:
        dagmod.loads(text)
    assert ei.value.key == "id" and repr(ei.value.stage) == shown


@pytest.mark.parametrize(("res", "key"), [
    ("{gpus: -1}", "gpus"), ("{cpus: -0.5}", "cpus"), ("{memory_gb: -8}", "memory_gb"),
    ("{gpus: .nan}", "gpus"), ("{cpus: .inf}", "cpus"), ("{memory_gb: -.inf}", "memory_gb"),
    ("{gpus: 1e999}", "gpus"),
])
def test_negative_or_non_finite_resources_are_refused(
        res: str, key: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = _DAG.format(run_dir=tmp_path / "run", inputs=tmp_path) + f"    resources: {res}\n"
    (tmp_path / "d.yaml").write_text(text)
    rc, err = _cli(capsys, "run", str(tmp_path / "d.yaml"))
    line = _one_line(err)
    assert rc == EXIT_CONFIG
    assert f"stage 'ingest': key 'resources.{key}': must be a finite number >= 0" in line
    assert not (tmp_path / "run").exists()
    # --set goes through the same check
    ok = _DAG.format(run_dir=tmp_path / "run", inputs=tmp_path)
    with pytest.raises(ConfigError) as ei:
        dagmod.loads(ok, overrides=[f"ingest.resources.{key}=-1"])
    assert (ei.value.stage, ei.value.key) == ("ingest", f"resources.{key}")
    dagmod.loads(ok, overrides=["ingest.resources.gpus=0", "ingest.resources.cpus=0.5"])


# -- 2. run directories ----------------------------------------------------------------


def test_run_dir_dot_beside_the_dag_is_refused_and_the_dag_is_untouched(
        tmp_path: Path) -> None:
    """The real CLI in a project folder: ``run_dir: .`` would have written the resolved
    DAG over the user's ``dag.yaml``; now nothing there changes."""
    proj = tmp_path / "proj"
    _inputs(proj / "in")
    dag = proj / "dag.yaml"
    dag.write_text(_DAG.format(run_dir=".", inputs="in") + "# my notes\n")
    original = dag.read_bytes()
    before = _listing(proj)
    r = subprocess.run([SPEECHMILL, "run", "dag.yaml", "--no-progress"], cwd=proj,
                       env={**cli_env(), "PYTHONPATH": str(ROOT)}, capture_output=True,
                       text=True, timeout=300)
    line = _one_line(r.stderr)
    assert r.returncode == EXIT_CONFIG, r.stderr
    assert "key 'run_dir'" in line and "is not empty and is not a speechmill run" in line
    assert "pick a new or empty directory" in line
    assert dag.read_bytes() == original
    assert _listing(proj) == before


@pytest.mark.parametrize(("run_dir", "expect"), [
    ("''", "is empty"),
    ("${SPEECHMILL_TEST_UNSET_DIR:-}", "is empty"),
    ("'   '", "is empty"),
    ("http://127.0.0.1:9/run", "cannot live on http://"),
    ("https://example.invalid/run", "cannot live on https://"),
    ("ftp://127.0.0.1/run", "cannot live on ftp://"),
    ("zip://run", "cannot live on zip://"),
    ("memory://run", "cannot live on memory://"),
    ("nosuchfs://b/run", "unknown filesystem"),
    ("s3:/bucket/run", "mistyped URL"),
    ("s3://", "names no bucket"),
    ('"run\\tdir"', "control character"),
])
def test_run_dir_that_cannot_be_one_is_refused(
        run_dir: str, expect: str, tmp_path: Path, capsys: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPEECHMILL_TEST_UNSET_DIR", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    _inputs(tmp_path / "in", 1)
    dag = tmp_path / "d.yaml"
    dag.write_text(_DAG.format(run_dir=run_dir, inputs=tmp_path / "in"))
    monkeypatch.chdir(cwd)
    for argv in (["run", str(dag)], ["validate", str(dag)], ["run", str(dag), "--dry-run"]):
        rc, err = _cli(capsys, *argv)
        line = _one_line(err)
        assert rc == EXIT_CONFIG, err
        assert "key 'run_dir'" in line and expect in line, line
    assert os.listdir(cwd) == []  # zip:// used to open the working directory
    # --run-dir '' (an unset shell variable) too
    ok = tmp_path / "ok.yaml"
    ok.write_text(_DAG.format(run_dir=tmp_path / "r", inputs=tmp_path / "in"))
    rc, err = _cli(capsys, "run", str(ok), "--run-dir", "")
    assert rc == EXIT_CONFIG and "key 'run_dir': is empty" in _one_line(err)


def test_run_dir_that_is_a_file_is_refused(tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("mine\n")
    dag = tmp_path / "d.yaml"
    dag.write_text(_DAG.format(run_dir=f, inputs=_inputs(tmp_path / "in", 1)))
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    assert rc == EXIT_CONFIG and "is a file, not a directory" in _one_line(err)
    assert f.read_text() == "mine\n"


def test_new_empty_and_earlier_run_dirs_are_used(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    """What is accepted: a new folder, an empty one, a run directory (marked by the run
    that made it), and one of an older version (run.json + stages/, no marker)."""
    inp = _inputs(tmp_path / "in", 2)
    dag = tmp_path / "d.yaml"
    run_dir = tmp_path / "runs" / "a"
    dag.write_text(_DAG.format(run_dir=run_dir, inputs=inp))
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    assert rc == 0, err
    assert json.loads((run_dir / RUN_MARKER).read_text())["speechmill_run_dir"] == 1
    # an older version's run directory: no marker; its run.json says what it is
    (run_dir / RUN_MARKER).unlink()
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    assert rc == 0, err
    assert json.loads((run_dir / "run.json").read_text())["attempt"] == 2
    # an empty folder
    (tmp_path / "empty").mkdir()
    rc, err = _cli(capsys, "run", str(dag), "--no-progress", "--run-dir",
                   str(tmp_path / "empty"))
    assert rc == 0, err
    # the check itself
    for name, files in [("lock-only", {"run.lock": '{"pid": 1, "host": "h"}'}),
                        ("old", {"run.json": '{"status": "failed", "attempt": 1}'})]:
        d = tmp_path / name
        d.mkdir()
        for fn, body in files.items():
            (d / fn).write_text(body)
        check_run_dir_contents(d)
    for name, files in [("user", {"dag.yaml": "name: x\n"}),
                        ("their-json", {"run.json": '{"my": "data"}', "a.txt": ""}),
                        ("dotfile", {".env": "X=1"})]:
        d = tmp_path / name
        d.mkdir()
        for fn, body in files.items():
            (d / fn).write_text(body)
        with pytest.raises(ConfigError, match="key 'run_dir'.*not a speechmill run"):
            RunStore(d).lock().__enter__()
        assert sorted(os.listdir(d)) == sorted(files)  # no run.lock, no marker left


# -- object stores (moto's S3 server on 127.0.0.1) ----------------------------------------

_KEY, _SECRET = "AKIAFAKEFAKEFAKE", "s3cr3t-fake-credential-1234"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Sets the AWS environment for an endpoint (``aws(url)``); fsspec's cached S3
    filesystems (made for another endpoint) are dropped before and after."""
    s3fs = pytest.importorskip("s3fs")

    def use(endpoint: str) -> None:
        for k, v in dict(AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET,
                         AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1",
                         AWS_EC2_METADATA_DISABLED="true", AWS_MAX_ATTEMPTS="1").items():
            monkeypatch.setenv(k, v)
        s3fs.S3FileSystem.clear_instance_cache()

    yield use
    s3fs.S3FileSystem.clear_instance_cache()


def _bucket(endpoint: str) -> tuple[Any, str]:
    import s3fs

    fs = s3fs.S3FileSystem(key=_KEY, secret=_SECRET, skip_instance_cache=True,
                           client_kwargs={"endpoint_url": endpoint,
                                          "region_name": "us-east-1"})
    name = f"cfg-{uuid.uuid4().hex[:10]}"
    fs.call_s3("create_bucket", Bucket=name)
    return fs, name


def test_unreachable_s3_run_dir_is_one_line(tmp_path: Path, aws: Any,
                                            capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    aws(f"http://127.0.0.1:{port}")
    dag = tmp_path / "d.yaml"
    dag.write_text(_DAG.format(run_dir="s3://bucket/run", inputs=_inputs(tmp_path / "in", 1)))
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    line = _one_line(err)
    assert rc == EXIT_CONFIG
    assert "key 'run_dir': 's3://bucket/run': cannot list the run directory" in line, line
    assert "EndpointConnectionError" in line and _SECRET not in line


def test_s3_prefix_of_other_objects_is_refused(s3_server: str, tmp_path: Path, aws: Any,
                                               capsys: pytest.CaptureFixture) -> None:
    aws(s3_server)
    fs, bucket = _bucket(s3_server)
    fs.pipe_file(f"{bucket}/data/dag.yaml", b"name: mine\n")
    dag = tmp_path / "d.yaml"
    dag.write_text(_DAG.format(run_dir=f"s3://{bucket}/data",
                               inputs=_inputs(tmp_path / "in", 1)))
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    line = _one_line(err)
    assert rc == EXIT_CONFIG and "key 'run_dir'" in line and "not a speechmill run" in line
    assert fs.cat_file(f"{bucket}/data/dag.yaml") == b"name: mine\n"
    assert sorted(fs.ls(f"{bucket}/data", refresh=True)) == [f"{bucket}/data/dag.yaml"]


# -- 4. the lease of a killed run ---------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _lease(fs: Any, path: str, **fields: Any) -> None:
    now = time.time()
    fs.pipe_file(path, json.dumps({"owner": uuid.uuid4().hex, "since": now,
                                   "expires": now + 110, **fields}).encode())


def test_lease_of_a_dead_pid_on_this_host_is_taken_over_at_once(
        s3_server: str, tmp_path: Path, aws: Any, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    from speechmill.pipeline.store.lock import machine_ident

    aws(s3_server)
    fs, bucket = _bucket(s3_server)
    dag = tmp_path / "d.yaml"
    url = f"s3://{bucket}/run"
    dag.write_text(_DAG.format(run_dir=url, inputs=_inputs(tmp_path / "in", 2)))
    me = socket.gethostname()
    ident = {k: v for k, v in machine_ident(os.getpid()).items() if k != "pid_start"}
    # a run SIGKILLed a moment ago (its lease has 110 s to go), as this version and an
    # older one (host and pid only) write it
    for extra in (ident, {}):
        dead = _dead_pid()
        _lease(fs, f"{bucket}/run/run.lock", pid=dead, host=me, **extra)
        t0 = time.time()
        rc, err = _cli(capsys, "run", str(dag), "--no-progress")
        assert rc == 0, err
        assert time.time() - t0 < 60
        said = err + caplog.text  # a warning of the "speechmill" logger (stderr in the CLI)
        assert f"took over the lease of pid {dead} on {me}: that process is gone" in said
        assert not fs.exists(f"{bucket}/run/run.lock")  # released at the end
    # a pid of this host that lives on as another process (reused): gone as well
    _lease(fs, f"{bucket}/run/run.lock", pid=os.getpid(), host=me, pid_start="1",
           **ident)
    caplog.clear()
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    assert rc == 0 and "that process is gone" in caplog.text, err
    # a live run of this host is never taken over, not even with --break-lease
    _lease(fs, f"{bucket}/run/run.lock", pid=os.getpid(), host=me,
           **machine_ident(os.getpid()))
    for flags in ([], ["--break-lease"]):
        rc, err = _cli(capsys, "run", str(dag), "--no-progress", *flags)
        assert rc == EXIT_FAILED, err
        assert f"in use by pid {os.getpid()} on {me}" in err
        assert "still running on this host" in err and "Traceback" not in err


def test_lease_of_another_host_waits_or_is_broken_with_the_flag(
        s3_server: str, tmp_path: Path, aws: Any, capsys: pytest.CaptureFixture,
        caplog: pytest.LogCaptureFixture) -> None:
    aws(s3_server)
    fs, bucket = _bucket(s3_server)
    dag = tmp_path / "d.yaml"
    url = f"s3://{bucket}/run"
    dag.write_text(_DAG.format(run_dir=url, inputs=_inputs(tmp_path / "in", 2)))
    lock = f"{bucket}/run/run.lock"
    _lease(fs, lock, pid=4242, host="other-host.example", boot_id="x")
    rc, err = _cli(capsys, "run", str(dag), "--no-progress")
    line = _one_line(err)
    assert rc == EXIT_FAILED
    assert "in use by pid 4242 on other-host.example" in line
    assert "expires in 1" in line and "--break-lease" in line, line
    assert json.loads(fs.cat_file(lock))["host"] == "other-host.example"  # untouched
    assert "--break-lease" in subprocess.run(
        [SPEECHMILL, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    rc, err = _cli(capsys, "run", str(dag), "--no-progress", "--break-lease")
    assert rc == 0, err
    assert "broke the lease of pid 4242 on other-host.example" in err + caplog.text
    assert RunStore(url).read_run()["status"] == "succeeded"
    assert not fs.exists(lock)


# -- 3. the embedded Ray beside a `ray start` cluster -----------------------------------


@pytest.mark.ray
def test_embedded_ray_runs_beside_a_ray_start_cluster(tmp_path: Path) -> None:
    """``ray start --head`` on this machine records its address where a bare
    ``ray.init()`` finds it (``$RAY_TMPDIR/ray/ray_current_cluster``); the embedded
    executor used to join it and fail (``num_cpus ... must not be provided``). It now
    starts a Ray of its own and says that a cluster was found."""
    from testkit.ray_cluster import LocalCluster

    base = Path(__import__("tempfile").mkdtemp(prefix="smrt", dir="/tmp"))
    cluster = LocalCluster()
    os.rmdir(cluster.temp_dir)
    cluster.temp_dir = str(base / "ray")  # the default temp dir under RAY_TMPDIR=base
    try:
        address = cluster.start(cpus=1)
        assert (base / "ray" / "ray_current_cluster").read_text().strip().endswith(
            address.rsplit(":", 1)[1])
        dag = tmp_path / "d.yaml"
        dag.write_text(dag_yaml(_inputs(tmp_path / "in", 2), tmp_path / "run", "ray"))
        env = {k: v for k, v in cli_env().items() if k != "RAY_AUTH_MODE"}
        env.update(RAY_TMPDIR=str(base), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        r = subprocess.run([SPEECHMILL, "run", str(dag), "--no-progress"], env=env,
                           capture_output=True, text=True, timeout=420)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "must not be provided" not in r.stderr
        assert "recorded a cluster at" in r.stderr and "--ray-address" in r.stderr
        assert "embedded local Ray" in r.stdout
        info = json.loads((tmp_path / "run" / "run.json").read_text())
        assert info["status"] == "succeeded"
        assert RunStore(tmp_path / "run").count_rows("standardize") == (2, 0)
    finally:
        cluster.stop()
        import shutil

        shutil.rmtree(base, ignore_errors=True)
