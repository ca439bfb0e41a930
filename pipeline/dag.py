"""DAG files: load, interpolate, override, validate, plan.

A DAG is YAML::

    name: demo
    run_dir: runs/demo
    executor: {type: ray, num_cpus: null, stall_timeout_s: 900}
    stages:
      - id: ingest
        uses: ingest
        with: {inputs: ["${DATA:-data}/**/*.wav"]}
      - id: standardize
        uses: standardize
        needs: [ingest]
        with: {sample_rate: 24000}

Everything is checked before any work starts; each problem is reported with the
stage id and key it concerns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from speechmill.pipeline import registry
from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.redact import is_secret_key
from speechmill.pipeline.stage import Resources, Stage, StageConfig

_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_\-]*")  # whole id (fullmatch): a directory name
#: values a DAG (after YAML aliases, env and --set) may hold: aliases can make a small
#: file expand to billions of values (validation would never end)
MAX_DAG_VALUES = 200_000
#: nesting a DAG may have (a real one has less than 10): deeper is refused while parsing,
#: before PyYAML's recursion (and its scanner, quadratic in the depth) gets there
MAX_DAG_DEPTH = 100
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# Keys the resume fingerprint ignores. Broader than what is redacted (it is the pattern
# 0.2 used for both), so fingerprints of existing run directories stay the same.
_FINGERPRINT_SKIP_RE = re.compile(
    r"(api_?key|token|secret|password|passwd|credential|auth|private|access_?key|"
    r"account_?key|conn(ection)?_?str|^key$|_key$|-key$|cookie|^storage_options$|"
    r"^headers$|^client_kwargs$)",
    re.I,
)
REDACTED = "<redacted>"


class ExecutorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["ray", "local"] = "ray"
    ray_address: str | None = Field(None, description="existing cluster; default: embedded")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded Ray")
    stall_timeout_s: float = Field(900.0, gt=0, description="fail when nothing advances")
    progress: bool = True
    fuse: bool = Field(
        True, description="run consecutive row-local stages as one streamed pipeline "
        "(false: every stage finishes before the next starts, for debugging)")
    colocate: bool | None = Field(
        None, description="run every stage of a fused chain in the same Ray workers "
        "(one operator, a pool of one worker per CPU, each holding every stage's model) "
        "instead of one operator per stage; default: only on a single machine of fewer "
        "than 4 CPUs with no GPU stage and no stage with its own `concurrency`")
    wave_rows: int = Field(
        200_000, ge=1, description="input rows a stage holds in memory at once where it "
        "runs in waves (local executor; Ray after a worker died; each wave starts its "
        "workers anew), and the rows an export sorts in memory (larger: on disk)")
    max_error_fraction: float = Field(
        0.05, ge=0, le=1, description="error budget of every stage (a stage's own "
        "`max_error_fraction` wins): the stage fails when more of its rows than this fail "
        "with `error` / `worker_crash` or as transient rejects (a service failed after its "
        "retries; counted from 20 rows on; a stage whose every row fails always fails)")
    transient_retries: int = Field(
        3, ge=0, description="runs that retry a row rejected as transient (a service or "
        "resource failed after its retries); after that many, its reject is final and the "
        "stage can complete")


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    id: str
    uses: str
    needs: list[str] = Field(default_factory=list)
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    batch_size: int | None = Field(None, ge=1)
    batch_seconds: float | None = Field(None, gt=0, description="audio seconds per batch")
    concurrency: int | None = Field(None, ge=1)
    resources: dict[str, float] | None = None
    max_error_fraction: float | None = Field(
        None, ge=0, le=1, description="this stage's error budget (default: the executor's)")

    @field_validator("needs", mode="before")
    @classmethod
    def _one_need(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("with_", mode="before")
    @classmethod
    def _null_with(cls, v: Any) -> Any:
        return {} if v is None else v


class DagSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    run_dir: str
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)
    stages: list[StageSpec]


@dataclass
class PlannedStage:
    spec: StageSpec
    cls: type[Stage]
    config: StageConfig
    fingerprint: str = ""
    legacy_fingerprint: str = ""  # accepted when resuming a run directory of 0.1
    downstream: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def batch_size(self) -> int:
        return self.spec.batch_size or self.cls.default_batch_size

    @property
    def batch_seconds(self) -> float | None:
        return self.spec.batch_seconds or self.cls.default_batch_seconds

    @property
    def resources(self) -> Resources:
        """The stage class's declared resources, with the DAG's ``resources:`` over them.
        A model stage that can use CUDA asks for its :meth:`Stage.gpu_share` (the executor
        drops GPU requests on a cluster without GPUs)."""
        base = self.cls.resources.to_dict()
        if not base.get("gpus"):
            base["gpus"] = self.cls.gpu_share(self.config)
        return Resources(**{**base, **(self.spec.resources or {})})


@dataclass
class Dag:
    spec: DagSpec
    stages: list[PlannedStage]  # topological order
    source_path: str | None = None
    secret_env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def run_dir(self) -> str:
        return self.spec.run_dir

    def stage(self, stage_id: str) -> PlannedStage:
        for s in self.stages:
            if s.id == stage_id:
                return s
        raise KeyError(stage_id)

    def resolved_dict(self, hide_secrets: bool = True) -> dict[str, Any]:
        """The DAG after defaults, env and overrides; secrets redacted for writing."""
        d = self.spec.model_dump(by_alias=True, exclude_none=False)
        for raw, st in zip(d["stages"], self.stages, strict=True):
            raw["with"] = st.config.model_dump(mode="json")
        return redact(d) if hide_secrets else d

    def resolved_yaml(self) -> str:
        text = yaml.safe_dump(self.resolved_dict(), sort_keys=False)
        for var, value in self.secret_env.items():
            if value and len(value) >= 4:
                text = text.replace(value, "${" + var + "}")
        return text


# -- loading --------------------------------------------------------------------------


def load(
    path: str | os.PathLike[str],
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    run_dir: str | None = None,
) -> Dag:
    """Load, interpolate, override and validate a DAG file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read DAG file {str(p)!r}: {e.strerror}") from None
    return loads(text, overrides=overrides, env=env, run_dir=run_dir, source=str(p))


def loads(
    text: str,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
    run_dir: str | None = None,
    source: str | None = None,
) -> Dag:
    """Like :func:`load`, from the DAG's text. Every problem is a :class:`ConfigError`
    (nothing else escapes, whatever the text, overrides or environment)."""
    try:
        try:
            raw = _safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"DAG is not valid YAML: {_yaml_problem(e)}") from None
        except (ConfigError, RecursionError):
            raise
        except Exception as e:  # PyYAML failing on a value (`!!float ''`: IndexError)
            raise ConfigError(f"DAG is not valid YAML: {type(e).__name__}: "
                              f"{_one_line(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError("DAG must be a mapping with name, run_dir and stages")
        _check_size(raw)
        secret_env: dict[str, str] = {}
        raw = _interpolate(raw, os.environ if env is None else env, [], secret_env)
        for ov in overrides or []:
            _apply_override(raw, ov)
        if run_dir is not None:
            raw["run_dir"] = run_dir
        _check_size(raw)
        dag = build(raw)
    except RecursionError:
        raise ConfigError("DAG is nested too deeply") from None
    dag.source_path = source
    dag.secret_env = secret_env
    return dag


def _safe_load(text: str) -> Any:
    """``yaml.safe_load``, refusing more than :data:`MAX_DAG_DEPTH` levels of nesting
    (checked on the parser's events, which need no recursion) first."""
    depth = 0
    for ev in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(ev, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DAG_DEPTH:
                raise ConfigError(f"DAG is nested too deeply (more than {MAX_DAG_DEPTH} "
                                  "levels)")
        elif isinstance(ev, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    what = getattr(e, "problem", None) or getattr(e, "context", None)
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if what and mark is not None:
        return f"{_one_line(what)} (line {mark.line + 1}, column {mark.column + 1})"
    return _one_line(e)


def _check_size(raw: Any) -> None:
    """Refuse a DAG of more than :data:`MAX_DAG_VALUES` values once YAML aliases are
    expanded (a few lines of ``&a``/``*a`` can name billions): counted without expanding,
    by walking at most that many nodes."""
    n = 0
    todo = [raw]
    while todo:
        obj = todo.pop()
        n += 1
        if n > MAX_DAG_VALUES:
            raise ConfigError(f"DAG is too large (more than {MAX_DAG_VALUES:,} values "
                              "once YAML aliases are expanded)")
        if isinstance(obj, dict):
            todo.extend(obj.values())
            n += len(obj)
        elif isinstance(obj, list | tuple | set):
            todo.extend(obj)


def build(raw: dict[str, Any]) -> Dag:
    try:
        spec = DagSpec.model_validate(raw)
    except ValidationError as e:
        raise _invalid(_format_validation(e, raw)) from None
    from speechmill.pipeline.store.checks import check_run_dir

    check_run_dir(spec.run_dir)

    errors: list[str] = []
    ids: dict[str, StageSpec] = {}
    for st in spec.stages:
        bad_id = _id_problem(st.id)
        if bad_id:
            errors.append(f"stage {st.id!r}: key 'id': {bad_id}")
        if st.id in ids:
            errors.append(f"stage {st.id!r}: key 'id': duplicate stage id")
        ids[st.id] = st
    planned: dict[str, PlannedStage] = {}
    for st in spec.stages:
        for need in st.needs:
            if need not in ids:
                errors.append(f"stage {st.id!r}: key 'needs': unknown stage {need!r}")
        try:
            cls = registry.get(st.uses)
        except ConfigError as e:
            errors.append(f"stage {st.id!r}: key 'uses': {e}")
            continue
        try:
            config = cls.Config.model_validate(st.with_)
            cls.validate_config(config)
        except RecursionError:
            raise
        except ValidationError as e:
            for err in e.errors():
                key = ".".join(str(x) for x in err["loc"]) or "with"
                msg = err["msg"]
                if err["type"] == "extra_forbidden":
                    known = ", ".join(cls.Config.model_fields)
                    msg = f"unknown key (known: {known})"
                errors.append(f"stage {st.id!r}: key 'with.{key}': {msg}")
            continue
        except (ValueError, ConfigError) as e:
            errors.append(f"stage {st.id!r}: {e}")
            continue
        except Exception as e:  # a stage's validator choked on a value: still the config's
            errors.append(f"stage {st.id!r}: key 'with': invalid config "
                          f"({type(e).__name__}: {_one_line(e)})")
            continue
        bad_res = set(st.resources or {}) - {"cpus", "gpus", "memory_gb"}
        if bad_res:
            errors.append(f"stage {st.id!r}: key 'resources.{sorted(bad_res)[0]}': unknown "
                          "resource (cpus, gpus, memory_gb)")
        for k, v in sorted((st.resources or {}).items()):
            if k in ("cpus", "gpus", "memory_gb") and not (math.isfinite(v) and v >= 0):
                errors.append(f"stage {st.id!r}: key 'resources.{k}': must be a finite "
                              f"number >= 0, not {v!r}")
        if cls.is_source and st.needs:
            errors.append(f"stage {st.id!r}: key 'needs': {st.uses!r} is a source stage")
        if not cls.is_source and not st.needs and not cls.inputs_optional:
            errors.append(f"stage {st.id!r}: key 'needs': {st.uses!r} needs an upstream stage")
        planned[st.id] = PlannedStage(spec=st, cls=cls, config=config)
    if errors:
        raise _invalid(errors)

    order = _toposort(spec.stages)
    stages = [planned[i] for i in order]
    upstream: dict[str, set[str]] = {}
    for s in stages:  # topological order: a stage's needs are done before it
        upstream[s.id] = set(s.spec.needs).union(*(upstream[n] for n in s.spec.needs))
        try:
            s.cls.validate_dag(s.config, {u: (planned[u].cls, planned[u].config)
                                          for u in sorted(upstream[s.id])})
        except (ValueError, ConfigError) as e:
            errors.append(f"stage {s.id!r}: {e}")
        except RecursionError:
            raise
        except Exception as e:  # noqa: BLE001 - as for validate_config above
            errors.append(f"stage {s.id!r}: invalid config ({type(e).__name__}: "
                          f"{_one_line(e)})")
    if errors:
        raise _invalid(errors)
    for s in stages:
        for need in sorted(s.spec.needs):
            planned[need].downstream.append(s.id)
        try:
            s.fingerprint = _fingerprint(s, planned, legacy=False)
            s.legacy_fingerprint = _fingerprint(s, planned, legacy=True)
        except (ValueError, TypeError) as e:  # a value with no JSON form (binary data)
            raise ConfigError(f"a value cannot be stored ({type(e).__name__}: "
                              f"{_one_line(e)})", stage=s.id, key="with") from None
    return Dag(spec=spec, stages=stages)


def _one_line(e: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."


_ERR_RE = re.compile(r"^stage (?P<stage>'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")"
                     r"(?:: key '(?P<key>[^']*)')?")


def _invalid(errors: list[str]) -> ConfigError:
    """The problems :func:`build` found, as one error: one line for one problem (with
    its ``stage`` and ``key``), a list for several (``stage`` / ``key`` of the first)."""
    lines = [_one_line(x, 1000) for x in errors]
    e = ConfigError("invalid DAG: " + lines[0] if len(lines) == 1 else
                    "invalid DAG:\n  " + "\n  ".join(lines))
    m = _ERR_RE.match(lines[0])
    if m:
        import ast

        with contextlib.suppress(ValueError, SyntaxError):
            e.stage = ast.literal_eval(m.group("stage"))
        e.key = m.group("key")
    elif m := re.match(r"^key '(?P<key>[^']*)'", lines[0]):
        e.key = m.group("key")
    return e


def _id_problem(sid: str) -> str | None:
    """Why ``sid`` cannot be a stage id (it names the stage's directories), or None."""
    if not sid:
        return "is empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in sid):
        return "has a control character"
    if "/" in sid or "\\" in sid:
        return "has a path separator"
    if ".." in sid:
        return "has '..'"
    if sid[0] in "-.":
        return f"starts with {sid[0]!r}"
    if not _ID_RE.fullmatch(sid):
        return ("must start with a letter and have only letters, digits, '_' and '-' "
                f"(it names the stage's directories): {_ID_RE.pattern}")
    return None


def _fingerprint(s: PlannedStage, planned: dict[str, PlannedStage], legacy: bool,
                 version: int | None = None) -> str:
    """What a stage's outputs depend on: its ``uses``, its behaviour version
    (:attr:`Stage.version`), the config keys that differ from their defaults (so a release
    that adds a key, or a config that spells out a default, keeps run directories
    resumable) and its upstream stages' fingerprints. ``legacy``: the formula of 0.1,
    which hashed every key with its default. ``version``: hash this behaviour version
    instead of the class's (to tell a version change from a config change)."""
    h = hashlib.sha256()
    h.update(s.spec.uses.encode())
    v = s.cls.version if version is None else version
    if v != 1:
        # version 1 (every stage's first) adds nothing to the hash: run directories
        # written before stages had versions keep their fingerprints and stay resumable,
        # while a bumped version changes this stage's fingerprint and, through theirs,
        # every downstream stage's
        h.update(f"\x00version={v}".encode())
    dumped = _drop_runtime_keys(s.config,
                                s.config.model_dump(mode="json", exclude_defaults=not legacy))
    h.update(json.dumps(_fingerprint_view(dumped), sort_keys=True).encode())
    for need in sorted(s.spec.needs):
        up = planned[need]
        h.update((up.legacy_fingerprint if legacy else up.fingerprint).encode())
    return h.hexdigest()[:16]


def written_by_version(dag: Dag, st: PlannedStage, fingerprint: str) -> int | None:
    """The behaviour version of ``st`` that wrote a stage directory with ``fingerprint``,
    when everything else (config, upstream) is the same and only the version differs;
    None otherwise."""
    planned = {s.id: s for s in dag.stages}
    for v in range(1, max(st.cls.version, 1) + 100):
        if v == st.cls.version:
            continue
        for legacy in (False, True):
            if _fingerprint(st, planned, legacy=legacy, version=v) == fingerprint:
                return v
    return None


def _toposort(specs: list[StageSpec]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}
    by_id = {s.id: s for s in specs}

    def visit(sid: str, path: list[str]) -> None:
        if state.get(sid) == 2:
            return
        if state.get(sid) == 1:
            cycle = " -> ".join([*path[path.index(sid) :], sid])
            raise ConfigError(f"cycle in 'needs': {cycle}", stage=sid, key="needs")
        state[sid] = 1
        for n in by_id[sid].needs:
            visit(n, [*path, sid])
        state[sid] = 2
        order.append(sid)

    for s in specs:
        visit(s.id, [])
    return order


# -- interpolation and overrides ------------------------------------------------------


def _interpolate(obj: Any, env: Any, loc: list[str], secret_env: dict[str, str]) -> Any:
    if isinstance(obj, dict):
        return {k: _interpolate(v, env, [*loc, str(k)], secret_env) for k, v in obj.items()}
    if isinstance(obj, list):
        sid = None
        out = []
        for i, v in enumerate(obj):
            if loc == ["stages"] and isinstance(v, dict):
                sid = v.get("id", f"#{i}")
                out.append(_interpolate(v, env, ["stages", str(sid)], secret_env))
            else:
                out.append(_interpolate(v, env, [*loc, str(i)], secret_env))
        return out
    if isinstance(obj, str) and "${" in obj:

        def sub(m: re.Match[str]) -> str:
            var, default = m.group(1), m.group(2)
            if var in env:
                if is_secret_key(var):
                    secret_env[var] = env[var]
                return env[var]
            if default is not None:
                return default
            stage, key = _loc_stage_key(loc)
            raise ConfigError(
                f"environment variable {var!r} is not set (use ${{{var}:-default}} "
                "for a default)",
                stage=stage,
                key=key,
            )

        value = _ENV_RE.sub(sub, obj)
        # values stay strings ("no", "0777" are not booleans or octal): pydantic converts
        # them where a field wants a number or boolean
        return value
    return obj


def _loc_stage_key(loc: list[str]) -> tuple[str | None, str | None]:
    if len(loc) >= 2 and loc[0] == "stages":
        return loc[1], ".".join(loc[2:]) or None
    return None, ".".join(loc) or None


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """``stage_id.key[.sub]=value``, ``executor.key=value`` or ``run_dir=value``."""
    if not isinstance(override, str) or "=" not in override:
        raise ConfigError(f"--set {override!r}: expected KEY=VALUE")
    path, _, text = override.partition("=")
    try:
        value = _safe_load(text) if text != "" else ""
    except (ConfigError, RecursionError):
        raise
    except Exception:  # not YAML (or PyYAML fails on it): the text itself
        value = text
    if isinstance(value, dict | list):
        _check_size(value)
    parts = path.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {override!r}: empty key in {path.strip()!r} "
                          "(expected STAGE.KEY=VALUE)")
    if parts[0] in ("name", "run_dir") and len(parts) == 1:
        raw[parts[0]] = value
        return
    if parts[0] == "executor":
        if not isinstance(raw.get("executor", {}), dict):
            raise ConfigError(f"--set {override!r}: 'executor' is not a mapping",
                              key="executor")
        _set_path(raw.setdefault("executor", {}), parts[1:], value, override)
        return
    stages = raw.get("stages") or []
    if not isinstance(stages, list):
        raise ConfigError(f"--set {override!r}: 'stages' is not a list", key="stages")
    for st in stages:
        if isinstance(st, dict) and st.get("id") == parts[0]:
            if len(parts) < 2:
                raise ConfigError(f"--set {override!r}: expected {parts[0]}.KEY=VALUE")
            if parts[1] in ("batch_size", "batch_seconds", "concurrency", "needs", "uses",
                            "resources", "max_error_fraction"):
                _set_path(st, parts[1:], value, override)
            else:
                if not isinstance(st.get("with"), dict):
                    st["with"] = {}
                _set_path(st["with"], parts[1:], value, override)
            return
    known = ", ".join(str(s.get("id")) for s in stages if isinstance(s, dict))
    raise ConfigError(f"--set {override!r}: no stage with id {parts[0]!r} (stages: {known})")


def _set_path(d: dict[str, Any], parts: list[str], value: Any, override: str) -> None:
    if not parts:
        raise ConfigError(f"--set {override!r}: missing key")
    for p in parts[:-1]:
        nxt = d.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {override!r}: {p!r} is not a mapping")
        d = nxt
    d[parts[-1]] = value


def _format_validation(e: ValidationError, raw: dict[str, Any]) -> list[str]:
    lines = []
    stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
    for err in e.errors():
        loc = list(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
            st = stages[loc[1]] if loc[1] < len(stages) else {}
            sid = st.get("id", f"#{loc[1]}") if isinstance(st, dict) else f"#{loc[1]}"
            key = ".".join(str(x) for x in loc[2:]) or "(stage)"
            lines.append(f"stage {sid!r}: key {key!r}: {msg}")
        else:
            lines.append(f"key {'.'.join(str(x) for x in loc)!r}: {msg}")
    return lines


def redact(obj: Any, key: str = "") -> Any:
    """``obj`` with the values of secret-looking keys replaced by :data:`REDACTED`; the
    strings it keeps go through :func:`speechmill.pipeline.redact.redact_text` (secrets
    the process registered, credentials in URLs)."""
    if is_secret_key(key) and obj not in (None, "", False, {}, []):
        return REDACTED  # the whole subtree: a secret may be a mapping (service account)
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str) and len(obj) >= 4:
        from speechmill.pipeline.redact import redact_text

        return redact_text(obj, patterns=False, min_chars=8)
    return obj


def _drop_runtime_keys(model: Any, dumped: Any) -> Any:
    """Leave out of ``dumped`` the keys a config model lists in its ``fingerprint_exclude``
    ClassVar (runtime knobs such as an LLM client's concurrency, rate limits or budget:
    they never change outputs, so a resume with a bigger budget is the same work), at any
    depth of nested config models."""
    from pydantic import BaseModel

    if not isinstance(model, BaseModel) or not isinstance(dumped, dict):
        return dumped
    skip = getattr(type(model), "fingerprint_exclude", frozenset())
    out = {}
    for k, v in dumped.items():
        if k in skip:
            continue
        out[k] = _drop_runtime_keys(getattr(model, k, None), v)
    return out


def _fingerprint_view(obj: Any, key: str = "") -> Any:
    """Config as hashed for resume checks: credentials may rotate between attempts."""
    if (key and _FINGERPRINT_SKIP_RE.search(key)) or key == "storage_options":
        return None
    if isinstance(obj, dict):
        return {k: _fingerprint_view(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fingerprint_view(v, key) for v in obj]
    return obj
