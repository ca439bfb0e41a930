"""deploy/: the Dockerfile, the KubeRay RayJob and the `ray up` cluster YAML.

There is no container engine, Kubernetes or cloud account here, so these tests check what
can be checked without one: the Dockerfile installs from uv.lock with the Makefile's own
commands (same pinned uv, same `uv lock --check` / `uv sync` flags, nothing installed
past the lock); the manifests parse (the cluster YAML against Ray's own schema); their
job is a `speechmill` command line that speechmill's parser accepts, and the DAG it names
validates (a dry run of the exact command) with the environment the manifest sets.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from speechmill.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SECRET_PLACEHOLDER = "from-a-kubernetes-secret"
OPS = {"&&", "||", ";", "|", "&", "(", ")"}


# -- parsing helpers -------------------------------------------------------------------


def _commands(script: str) -> list[list[str]]:
    """Simple shell commands of ``script`` (split at && || ; | and parentheses)."""
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[list[str]] = [[]]
    for tok in lex:
        if tok in OPS:
            out.append([])
        else:
            out[-1].append(tok)
    return [c for c in out if c]


def _substitute(text: str, variables: dict[str, str], pattern: str) -> str:
    for _ in range(10):
        new = re.sub(pattern, lambda m: variables.get(m.group(1), f"__{m.group(1)}__"), text)
        if new == text:
            break
        text = new
    return text


def _makefile() -> tuple[dict[str, str], dict[str, str], list[list[str]]]:
    """(variables, exported variables, recipe commands) of the Makefile."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    variables: dict[str, str] = {}
    exported: dict[str, str] = {}
    recipes: list[str] = []
    for line in text.splitlines():
        if line.startswith("\t"):
            recipes.append(line.strip().lstrip("@-"))
            continue
        m = re.match(r"(export\s+)?([A-Z_]+)\s*[:?]?=\s*(.*)$", line)
        if m:
            value = m.group(3).strip()
            variables[m.group(2)] = "__shell__" if "$(shell" in value else value
            if m.group(1):
                exported[m.group(2)] = value
    resolved = {k: _substitute(v, variables, r"\$\((\w+)\)") for k, v in variables.items()}
    cmds = [c for r in recipes for c in _commands(_substitute(r, resolved, r"\$\((\w+)\)"))]
    return resolved, {k: resolved[k] for k in exported}, cmds


def _dockerfile() -> list[tuple[str, str, str]]:
    """(stage, INSTRUCTION, arguments) of deploy/Dockerfile; stage '' before any FROM."""
    lines = [ln for ln in (DEPLOY / "Dockerfile").read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    out, stage = [], ""
    for line in text.splitlines():
        if not line.strip():
            continue
        instr, _, args = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            stage = m.group(1) if m else args
        out.append((stage, instr, args.strip()))
    return out


def _docker_vars(instrs: list[tuple[str, str, str]]) -> dict[str, str]:
    """ARG defaults and ENV values (last wins), for substituting into RUN lines."""
    env: dict[str, str] = {}
    for _, instr, args in instrs:
        if instr in ("ARG", "ENV"):
            for tok in shlex.split(args):
                k, sep, v = tok.partition("=")
                if sep:
                    env[k] = v
    return env


def _docker_run_commands(stage: str | None = None) -> list[list[str]]:
    instrs = _dockerfile()
    variables = _docker_vars(instrs)
    cmds = []
    for st, instr, args in instrs:
        if instr != "RUN" or (stage is not None and st != stage):
            continue
        args = re.sub(r"^(--\S+\s+)+", "", args)  # --mount=... options of RUN
        args = _substitute(args, variables, r"\$\{?(\w+)\}?")
        cmds += _commands(args)
    return cmds


def _uv_invocations(cmds: list[list[str]]) -> list[tuple[str, list[str]]]:
    """(subcommand, sorted options) of every uv call; --python's value is left out."""
    out = []
    for c in cmds:
        if Path(c[0]).name != "uv" or len(c) < 2:
            continue
        opts, skip = [], False
        for tok in c[2:]:
            if skip:
                skip = False
                continue
            if tok == "--python":
                skip = True
            opts.append(tok.split("=")[0] if tok.startswith("--python=") else tok)
        out.append((c[1], sorted(opts)))
    return out


def _uv_bootstrap_versions(cmds: list[list[str]]) -> list[str]:
    return [tok.split("==", 1)[1] for c in cmds if "pip" in c and "install" in c
            for tok in c if tok.startswith("uv==")]


def _lock() -> dict[str, Any]:
    return tomllib.loads((ROOT / "uv.lock").read_text())


def _locked_version(name: str) -> str:
    return next(p["version"] for p in _lock()["package"] if p["name"] == name)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_dirs() -> list[str]:
    dirs = _pyproject()["tool"]["setuptools"]["package-dir"].values()
    return sorted({d.split("/")[0] for d in dirs})


def _app_dir() -> str:
    return _docker_vars(_dockerfile())["APP_DIR"]


# -- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_installs_with_the_makefiles_commands() -> None:
    mvars, mexports, mcmds = _makefile()
    dcmds = _docker_run_commands()
    # the same pinned uv, bootstrapped the same way (pip into a venv), as pyproject pins
    assert _uv_bootstrap_versions(mcmds) == [mvars["UV_VERSION"]]
    assert _uv_bootstrap_versions(dcmds) == [mvars["UV_VERSION"]]
    dev_pins = [d for d in _pyproject()["project"]["optional-dependencies"]["dev"]
                if d.startswith("uv==")]
    assert dev_pins == [f"uv=={mvars['UV_VERSION']}"]
    # the install recipe's uv calls (`make install` = lock-check + sync), flag for flag
    make_install = [u for u in _uv_invocations(mcmds)
                    if u[0] == "sync" or (u[0] == "lock" and "--check" in u[1])]
    assert [u[0] for u in make_install] == ["lock", "sync"]
    docker_uv = _uv_invocations(dcmds)
    assert docker_uv == make_install, (docker_uv, make_install)
    assert "--locked" in dict(docker_uv)["sync"]
    # the Makefile's uv settings: no Python downloads, the project venv in the app dir
    denv = _docker_vars(_dockerfile())
    assert denv["UV_PYTHON_DOWNLOADS"] == mexports["UV_PYTHON_DOWNLOADS"] == "never"
    venv = f"{_app_dir()}/{mvars['VENV']}"
    assert mexports["UV_PROJECT_ENVIRONMENT"] == mvars["VENV"]
    assert denv["UV_PROJECT_ENVIRONMENT"] == venv
    assert denv["PATH"].split(":")[0] == f"{venv}/bin"  # ENTRYPOINT speechmill is that venv's


def test_dockerfile_installs_nothing_past_the_lock() -> None:
    for c in _docker_run_commands():
        if "pip" in c and "install" in c:
            pkgs = [t for t in c[c.index("install") + 1:] if not t.startswith("-")]
            assert pkgs and all(p.startswith("uv==") for p in pkgs), c
        if Path(c[0]).name == "uv":
            assert c[1] in ("sync", "lock"), c
            if c[1] == "lock":
                assert "--check" in c, f"`uv lock` without --check re-resolves: {c}"


def test_dockerfile_variants_user_and_entrypoint() -> None:
    instrs = _dockerfile()
    froms = {st: args.split()[0] for st, instr, args in instrs if instr == "FROM"}
    requires = _pyproject()["project"]["requires-python"]
    minor = re.search(r">=\s*(3\.\d+)", requires).group(1)
    assert _docker_vars(instrs)["VARIANT"] == "cpu"
    assert froms["base-cpu"].startswith(f"python:{minor}-")
    assert froms["base-cuda"].startswith("nvidia/cuda:")
    cuda_installs = {t for c in _docker_run_commands("base-cuda") for t in c}
    assert {f"python{minor}", f"python{minor}-venv"} <= cuda_installs
    assert froms["base"] == "base-${VARIANT}"
    assert froms["build"] == froms["runtime"] == "base"
    run = [(instr, args) for st, instr, args in instrs if st == "runtime"]
    assert ("COPY", f"--from=build {_app_dir()} {_app_dir()}") in run
    assert ("COPY", f". {_app_dir()}") in [(i, a) for st, i, a in instrs if st == "build"]
    users = [args for instr, args in run if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [json.loads(args) for instr, args in run if instr == "ENTRYPOINT"]
    assert entry == [["speechmill"]]
    assert "speechmill" in _pyproject()["project"]["scripts"]
    apt = {t for c in _docker_run_commands("base") for t in c}
    assert {"ffmpeg", "sox", "wget", "bash"} <= apt  # wget + bash: KubeRay's probes


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.split("/")
    for pat in patterns:
        if pat.startswith("**/"):
            if any(fnmatch("/".join(parts[j:i]), pat[3:])
                   for i in range(1, len(parts) + 1) for j in range(i)):
                return True
        elif any(fnmatch("/".join(parts[:i]), pat) for i in range(1, len(parts) + 1)):
            return True
    return False


def test_build_context_has_the_sources_and_lock_but_no_local_environments() -> None:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert not any(p.startswith("!") for p in patterns)  # the matcher below has no `!`
    for rel in (".venv/bin/python", ".tools/bin/uv", "runs/demo/run.json", ".git/HEAD",
                "pipeline/__pycache__/cli.cpython-311.pyc"):
        assert _ignored(rel, patterns), rel
    needed = ["pyproject.toml", "uv.lock", "README.md", "Makefile"]
    for top in [*_package_dirs(), "dags"]:
        needed += [str(p.relative_to(ROOT)) for p in (ROOT / top).rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts]
    assert "dags/emilia.yaml" in needed
    assert [rel for rel in needed if _ignored(rel, patterns)] == []


# -- the job both manifests run --------------------------------------------------------


def _parse_cli(argv: list[str]) -> Any:
    try:
        return cli.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of saying the command line is wrong
        pytest.fail(f"not a valid speechmill command line: {shlex.join(argv)} ({e})")


def _check_job(argv: list[str], image_root: str, env: dict[str, str],
               monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
               tmp_path: Path) -> None:
    """``argv`` (after the program) is a `speechmill run` against an S3 run directory and
    a Ray cluster; its DAG (a path under ``image_root`` on the nodes) validates, and the
    exact command passes a dry run with ``env``."""
    args = _parse_cli(argv)
    assert args.cmd == "run" and args.ray_address == "auto"
    assert args.run_dir and args.run_dir.startswith("s3://")
    assert args.dag.startswith(image_root.rstrip("/") + "/"), (args.dag, image_root)
    dag = ROOT / args.dag[len(image_root.rstrip("/")) + 1:]
    assert dag == ROOT / "dags" / "emilia.yaml"

    for k in ("DEMUCS_MODEL", "ASR_MODEL", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    # nothing may reach a real object store from a test: a closed local port
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert env["INPUT"].startswith("s3://")
    monkeypatch.chdir(tmp_path)

    # the DAG with the command's overrides, without its run directory, then the command
    sets = [x for o in args.overrides for x in ("--set", o)]
    assert cli.main(["validate", str(dag), *sets]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "DAG emilia" in out and env["INPUT"] in out

    rc = cli.main([str(dag) if a == args.dag else a for a in argv] + ["--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"run_dir: {args.run_dir}" in captured.out
    assert "dry run: nothing executed" in captured.out
    assert list(tmp_path.iterdir()) == []  # no local `s3:` directory, nothing written


# -- KubeRay RayJob --------------------------------------------------------------------


def _rayjob() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kuberay-rayjob.yaml").read_text())


def _ray_containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = job["spec"]["rayClusterSpec"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [g["template"]["spec"]["containers"][0] for g in groups]


def test_rayjob_structure() -> None:
    job = _rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _locked_version("ray")  # the image's Ray
    assert cluster["authOptions"]["mode"] == "token"
    gpu_groups = []
    for g in cluster["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = res.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:
            assert res["requests"]["nvidia.com/gpu"] == gpus  # extended resources: equal
            gpu_groups.append((g["groupName"], int(gpus)))
    assert gpu_groups and all(n >= 1 for _, n in gpu_groups)
    containers = _ray_containers(job)
    assert len({c["image"] for c in containers}) == 1  # one image on every node
    for c in containers:  # every node reads inputs and writes the run dir itself
        env = {e["name"]: e for e in c["env"]}
        assert env["INPUT"]["value"].startswith("s3://")
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert "value" not in env[key]
            ref = env[key]["valueFrom"]["secretKeyRef"]
            assert ref["name"] and ref["key"] == key
        for name, e in env.items():  # no literal secret in the manifest
            if re.search(r"SECRET|TOKEN|PASSWORD|_KEY", name):
                assert "value" not in e, name


def test_rayjob_entrypoint_is_a_valid_speechmill_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        tmp_path: Path) -> None:
    job = _rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "speechmill"  # on PATH in the image (its venv)
    head = _ray_containers(job)[0]
    env = {e["name"]: e.get("value", SECRET_PLACEHOLDER) for e in head["env"]}
    _check_job(argv[1:], _app_dir(), env, monkeypatch, capsys, tmp_path)


def test_lock_has_the_ray_dashboard_that_kuberay_needs() -> None:
    """KubeRay's probes, the RayJob submitter and the dashboard need ray's `default` extra."""
    pkg = next(p for p in _lock()["package"] if p["name"] == "speechmill")
    deps = list(pkg.get("dependencies", []))
    for extra in pkg.get("optional-dependencies", {}).values():
        deps += extra
    extras = {x for d in deps if d["name"] == "ray" for x in d.get("extra", [])}
    assert "default" in extras


# -- `ray up` cluster YAML -------------------------------------------------------------


def _cluster() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _cluster()
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs first
    assert cfg["provider"]["type"] == "aws"
    workers = [t for name, t in cfg["available_node_types"].items()
               if name != cfg["head_node_type"]]
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers)


def test_ray_cluster_installs_from_the_lock_with_make() -> None:
    cfg = _cluster()
    makes = [c for cmd in cfg["setup_commands"] for c in _commands(cmd) if c[0] == "make"]
    assert makes == [["make", "-C", "~/speechmill", "install", "PYTHON=python3.11"]]
    # every file `make install` reads is mounted, at its path in the checkout
    mounts = cfg["file_mounts"]
    for rel in ["Makefile", "pyproject.toml", "uv.lock", "README.md", "dags",
                *_package_dirs()]:
        assert mounts.get(f"~/speechmill/{rel}") == rel, rel
        assert (ROOT / rel).exists()
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token, every node


def _env_and_argv(cmd: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while cmd and re.match(r"^[A-Z_]+=", cmd[0]):
        k, _, v = cmd.pop(0).partition("=")
        env[k] = v
    return env, cmd


def test_ray_cluster_starts_ray_with_token_auth_from_the_venv() -> None:
    cfg = _cluster()
    ports = {}
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [_env_and_argv(c) for cmd in cfg[key] for c in _commands(cmd)
                  if "start" in c and any(t.endswith("/ray") for t in c)]
        assert len(starts) == 1, cfg[key]
        env, argv = starts[0]
        assert env["RAY_AUTH_MODE"] == "token"
        assert argv[:2] == ["~/speechmill/.venv/bin/ray", "start"]
        opts = dict(a.split("=", 1) for a in argv[2:] if "=" in a)
        ports[key] = opts.get("--port") or opts["--address"].rsplit(":", 1)[1]
        assert ("--head" in argv) == (key == "head_start_ray_commands")
    assert ports["head_start_ray_commands"] == ports["worker_start_ray_commands"]


def test_ray_cluster_job_is_a_valid_speechmill_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
        tmp_path: Path) -> None:
    job = _cluster()["metadata"]["speechmill"]
    argv = shlex.split(job["command"])
    assert Path(argv[0]).name == "speechmill"
    assert job["env"]["RAY_AUTH_MODE"] == "token"
    # the command runs in the synced checkout (workdir); its DAG path is relative to it
    argv = [f"{job['workdir']}/{a}" if a.endswith(".yaml") else a for a in argv[1:]]
    _check_job(argv, job["workdir"], job["env"], monkeypatch, capsys, tmp_path)
