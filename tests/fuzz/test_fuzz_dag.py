"""Fuzz target: the DAG loader (``speechmill.pipeline.dag.loads``) and the ``--set``
parser never crash, hang or write on any input.

Inputs: random YAML-ish text (the characters and tokens YAML gives meaning to, anchors
and aliases, tags, deep nesting), random structures dumped as YAML (any top-level keys,
with ``name`` / ``run_dir`` / ``executor`` / ``stages`` of any shape), DAGs of real
stages (the installed entry points) with random stage ids, ``needs``, engine keys
(``batch_size``, ``resources``, ...) and random keys and values under ``with:``, and
random ``--set`` strings (``key.path=value``) over a valid DAG.

Invariant: each input ends as a valid :class:`Dag` (whose resolved YAML, what a run
writes as ``dag.yaml``, can be made) or a :class:`ConfigError` with a message; never
another exception, never a hang (each example has a deadline), never a file or folder
written (the working directory and the run directory's parent stay as they were).

Budget: the ``ci`` profile (tests/conftest.py) gives 200 examples, split over the four
targets (a few seconds); ``--hypothesis-profile=long`` runs 100x more.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.errors import ConfigError

#: seconds one example may take (a DAG loads in milliseconds)
DEADLINE_S = 10.0
N_TARGETS = 4
BUDGET = settings(max_examples=max(1, settings.default.max_examples // N_TARGETS))

#: the real stages (entry points only: test modules may register more in this process)
STAGES = sorted(ep.name for ep in entry_points(group=registry.GROUP))
ENGINE_KEYS = ["batch_size", "batch_seconds", "concurrency", "resources",
               "max_error_fraction", "needs", "uses", "id", "with"]
EXECUTOR_KEYS = ["type", "ray_address", "num_cpus", "stall_timeout_s", "progress", "fuse",
                 "colocate", "wave_rows", "max_error_fraction", "transient_retries"]
TOP_KEYS = ["name", "run_dir", "executor", "stages"]

# -- a deadline and a write check around every example --------------------------------


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang


_WORK: dict[str, Path] = {}


_CLASSES: dict[str, Any] = {}


def _get(name: str) -> Any:
    """``registry.get`` without its scan of every installed distribution's entry points
    per call (tens of ms: most of a DAG load), for the real stages; any other name is
    unknown, as the registry would say."""
    if name in _CLASSES:
        return _CLASSES[name]
    raise ConfigError(f"unknown stage {name!r} (known: {', '.join(STAGES)})")


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every example runs in an empty working directory; its run dirs point below."""
    if not _CLASSES:
        _CLASSES.update({n: registry.get(n) for n in STAGES})
    monkeypatch.setattr(registry, "get", _get)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _WORK["cwd"] = cwd
    _WORK["root"] = tmp_path
    yield
    _WORK.clear()


def _snapshot() -> list[str]:
    root = _WORK["root"]
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def load(text: str, overrides: list[str] | None = None,
         env: dict[str, str] | None = None) -> dagmod.Dag | ConfigError:
    """``loads`` under the invariant: a Dag or a ConfigError, in time, nothing written."""
    before = _snapshot()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, DEADLINE_S)
    try:
        try:
            d = dagmod.loads(text, overrides=overrides, env=env if env is not None else {})
            out: dagmod.Dag | ConfigError = d
            d.resolved_yaml()  # what a run writes as dag.yaml
        except ConfigError as e:
            assert str(e).strip(), "a ConfigError without a message"
            out = e
        except _Hang:
            pytest.fail(f"the loader hung (> {DEADLINE_S:g} s) on {text[:500]!r} "
                        f"{overrides!r}")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert _snapshot() == before, "the loader wrote a file"
    return out


def _run_dir() -> str:
    return str(_WORK["root"] / "run")


def _valid(run_dir: str) -> str:
    return f"""name: fuzz
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - id: ingest
    uses: ingest
    with: {{inputs: ["{_WORK['root']}/in"]}}
  - id: standardize
    uses: standardize
    needs: [ingest]
    with: {{sample_rate: 24000}}
"""


# -- strategies -----------------------------------------------------------------------

_TOKENS = ["\n", " ", "  ", "- ", ": ", "{", "}", "[", "]", ",", "&a ", "*a", "&b ", "*b",
           "!!str ", "!!binary ", "!!python/object:os.system ", "!!set ", "!!float ", "? ",
           "|", ">", "'", '"', "#", "%YAML 1.1\n", "---\n", "...\n", "<<: ", "${X}",
           "${Y:-}", "${HOME}", "\\", "\t", "\x00", "\x85", "\u2028", "~", "null", ".nan",
           ".inf", "-.inf", "1e999", "0x1F", "0o17", "2020-01-01", "yes", "no",
           "name", "run_dir", "stages", "executor", "id", "uses", "needs", "with",
           "resources", "gpus", "ingest", "standardize", "..", "/", "-"]

yaml_text = st.one_of(
    st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join),
    st.text(max_size=200),
    st.integers(1, 300).map(lambda n: "[" * n + "]" * n),  # deep nesting
    st.integers(1, 3000).map(lambda n: "a:\n" + "".join(" " * i + "b:\n"
                                                         for i in range(1, n % 200 + 1))),
)

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(["", ".", "..", "-1", "a/b", "abc\n", "${X}",
                                           "${NOPE}", "${Y:-}", "0", "true"]),
)
structures = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4),
                           st.dictionaries(st.one_of(st.sampled_from(ENGINE_KEYS + TOP_KEYS),
                                                     st.text(max_size=8)), kids,
                                           max_size=4)),
    max_leaves=20,
)

stage_ids = st.one_of(
    st.sampled_from(["ingest", "standardize", "a", "A-1", "x_y"]),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
    st.text(alphabet="ab/.\\-_\n\x00 ", max_size=6),
)


@st.composite
def stage_specs(draw: Any, ids: list[Any]) -> dict[str, Any]:
    uses = draw(st.one_of(st.sampled_from(STAGES), st.text(max_size=8)))
    spec: dict[str, Any] = {"id": draw(st.sampled_from(ids)), "uses": uses}
    fields: list[str] = []
    if uses in STAGES:
        fields = list(registry.get(uses).Config.model_fields)
    if draw(st.booleans()) and fields:  # real keys of the stage, random values
        keys = draw(st.lists(st.sampled_from(fields), max_size=4, unique=True))
        spec["with"] = {k: draw(structures) for k in keys}
    elif draw(st.booleans()):
        spec["with"] = draw(structures)
    if draw(st.booleans()):
        spec["needs"] = draw(st.one_of(st.lists(st.sampled_from(ids), max_size=3),
                                       st.sampled_from(ids), structures))
    for k in draw(st.lists(st.sampled_from(["batch_size", "batch_seconds", "concurrency",
                                            "max_error_fraction", "resources"]),
                           max_size=2, unique=True)):
        spec[k] = draw(st.one_of(
            structures,
            st.dictionaries(st.sampled_from(["cpus", "gpus", "memory_gb", "tpus"]),
                            st.one_of(st.floats(), st.integers(-5, 5), st.text(max_size=3)),
                            max_size=3)))
    return spec


@st.composite
def dags(draw: Any) -> dict[str, Any]:
    ids = draw(st.lists(stage_ids, min_size=1, max_size=4))
    d: dict[str, Any] = {
        "name": draw(st.one_of(st.just("fuzz"), scalars)),
        "run_dir": draw(st.one_of(st.just(_run_dir()), scalars,
                                  st.sampled_from(["http://x/r", "zip://r", "s3:/b",
                                                   "memory://r", "s3://", "."]))),
        "stages": draw(st.lists(stage_specs(ids), max_size=4)),
    }
    if draw(st.booleans()):
        d["executor"] = draw(st.one_of(
            structures, st.dictionaries(st.sampled_from(EXECUTOR_KEYS), structures,
                                        max_size=3)))
    return d


overrides = st.lists(st.one_of(
    st.text(max_size=30),
    st.tuples(
        st.lists(st.one_of(st.sampled_from(["ingest", "standardize", "executor", "run_dir",
                                            "name", "with", "resources", "gpus",
                                            "batch_size", "needs", "uses", "inputs",
                                            "sample_rate", "type", ""]),
                           st.text(max_size=6)), min_size=1, max_size=4).map(".".join),
        st.one_of(st.text(max_size=20),
                  st.sampled_from(["", "-1", ".nan", "[1, 2", "{a: 1}", "&a [*a]",
                                   "!!binary AA==", "${X}", "null", "[[[[[[[[[]]]]]]]]]",
                                   "http://x", "..", "abc\n"]))
    ).map(lambda kv: f"{kv[0]}={kv[1]}"),
), max_size=4)


# -- targets ----------------------------------------------------------------------------


@BUDGET
@given(text=yaml_text)
@example(text="")
@example(text="[" * 1500 + "]" * 1500)  # nesting deeper than PyYAML can recurse
@example(text="a: &a [*a]\n")  # a list that holds itself
@example(text="a: &a [x,x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
              "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
              "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]\n"
              "stages: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]\n")  # a billion values
@example(text="!!python/object/apply:os.system [touch pwned]")
@example(text="name: x\nrun_dir: !!binary AAAA\nstages: []\n")
@example(text="\x00")
@example(text="!!float ")  # PyYAML: IndexError
@example(text="a: !!float ''\n")
def test_fuzz_yaml_text(text: str) -> None:
    load(text)


@BUDGET
@given(doc=structures)
@example(doc={"name": "x", "run_dir": "r", "stages": "abc"})
@example(doc={"name": "x", "run_dir": "r", "stages": [{"id": ["a"], "uses": 1}]})
def test_fuzz_structures(doc: Any) -> None:
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    load(text)


@BUDGET
@given(doc=dags())
@example(doc={"name": "x", "run_dir": "RUN", "stages": [
    {"id": "abc\n", "uses": "ingest", "with": {"inputs": ["in"]}}]})
@example(doc={"name": "x", "run_dir": "RUN", "stages": [
    {"id": "a", "uses": "ingest", "with": {"inputs": ["in"]},
     "resources": {"gpus": -1.0, "cpus": float("nan")}}]})
@example(doc={"name": "x", "run_dir": "RUN", "stages": [
    {"id": "a", "uses": "ingest", "with": {"inputs": ["in"], "x": b"\xff\xfe"}}]})
@example(doc={"name": "x", "run_dir": "", "stages": []})
def test_fuzz_stage_configs(doc: dict[str, Any]) -> None:
    if doc.get("run_dir") == "RUN":
        doc["run_dir"] = _run_dir()
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except yaml.YAMLError:
        return
    load(text, env={"X": "1", "HOME": "/nonexistent"})


@BUDGET
@given(sets=overrides)
@example(sets=["executor=1", "executor.type=ray"])
@example(sets=["stages=1", "ingest.batch_size=2"])
@example(sets=["ingest..batch_size=1"])
@example(sets=["=1"])
@example(sets=["ingest.resources.gpus=-1"])
@example(sets=["run_dir="])
@example(sets=["ingest.with.inputs=&a [*a]"])
@example(sets=["standardize.needs=standardize"])
@example(sets=["ingest.batch_size=!!float "])
@example(sets=["ingest.batch_size=" + "[" * 300 + "]" * 300])
def test_fuzz_set_overrides(sets: list[str]) -> None:
    load(_valid(_run_dir()), overrides=sets, env={})


def test_valid_dag_still_loads() -> None:
    """The fuzz harness's base DAG is valid (so the targets reach the deep checks)."""
    d = load(_valid(_run_dir()))
    assert isinstance(d, dagmod.Dag) and [s.id for s in d.stages] == ["ingest",
                                                                      "standardize"]
    assert not os.path.exists(_run_dir())
