"""Fuzz target: ``read_parquet`` never crashes or hangs on hostile Parquet (or non-Parquet).

Inputs, written to files and run as a run does (``ReadParquet.plan``; the runner's
first-copy filter; then :func:`speechmill.pipeline.batch.run_batch` on a run store, in
batches of random size): random bytes named ``.parquet``/``.jsonl``/``.json`` (named
directly, by directory or by glob); Parquet files with an ``id`` of every type (strings,
integers, nulls, lists, structs, bytes that are not UTF-8, a missing ``id``), core
columns (``duration``, ``sample_rate``, ``channels``, ``audio_path``, ``words``...) of
wrong types or with values that do not convert (``"abc"``, NaN, 2**40 channels), other
columns that disagree between files, all-null columns; random ``columns`` and
``paths_relative_to``.

Invariant: a file that cannot be used as a whole is a configuration error (``ValueError``
naming ``key 'paths'``, the runner's ConfigError for the stage) from the plan; otherwise
every planned row ends as outputs (core columns of their canonical types) or exactly one
reject (``missing_id``, ``malformed``), never an ``error`` or ``no_output``; nothing is
written outside the run directory; each example finishes within :data:`DEADLINE_S`.

Budget: the ``ci`` profile's examples (200) shared by the two targets below.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import example, given
from hypothesis import strategies as st

from speechmill.pipeline.batch import run_batch
from speechmill.pipeline.records import CORE_TYPES, first_copies
from speechmill.pipeline.stage import StageContext
from speechmill.pipeline.store import RunStore
from speechmill.stages.read_parquet import ReadParquet, ReadParquetConfig
from tests.fuzz.harness import budget, time_limit

DEADLINE_S = 10.0
N_TARGETS = 2
BUDGET = budget(N_TARGETS)
REASONS = {"missing_id", "malformed"}


_N = itertools.count()


def run_stage(case: Path, paths: list[str], batch_size: int, **cfg: Any
              ) -> str | tuple[int, pa.Table, pa.Table]:
    """The plan's config error, or (planned rows, outputs, rejects); checks the
    invariant."""
    run_dir = case / "run"
    before = set(case.rglob("*"))
    cwd = os.getcwd()
    os.chdir(case)
    try:
        with time_limit(DEADLINE_S):
            stage = ReadParquet(ReadParquetConfig(paths=paths, **cfg),
                                StageContext("src", str(run_dir)))
            try:
                plan = stage.plan()
            except ValueError as e:
                assert str(e).startswith("key 'paths': "), e
                assert len(str(e)) < 2000
                shutil.rmtree(case, ignore_errors=True)
                return str(e)
            planned = plan.num_rows
            plan = plan.filter(first_copies(plan.column("id")))  # as the runner does
            store = RunStore(run_dir)
            stage.setup()
            stats = [run_batch(stage, plan.slice(a, batch_size), store)
                     for a in range(0, plan.num_rows, batch_size)]
            out, rej = store.read_outputs("src"), store.read_rejects("src")
    finally:
        os.chdir(cwd)
    new = {p for p in set(case.rglob("*")) - before if run_dir not in p.parents
           and p != run_dir}
    assert not new, f"files written outside the run dir: {sorted(new)}"
    for s in stats:
        assert not s["errors"], s
    reasons = rej.column("reason").to_pylist()
    assert set(reasons) <= REASONS, rej.to_pylist()
    ids = plan.column("id").to_pylist()
    assert None not in ids
    rids = rej.column("id").to_pylist()
    kept = set(out.column("parent_id").to_pylist()) if out.num_rows else set()
    assert len(rids) == len(set(rids)) and not kept & set(rids)
    assert kept | set(rids) == set(ids)
    for f in out.schema:
        if f.name in CORE_TYPES:
            assert f.type == CORE_TYPES[f.name], (f.name, f.type)
    out.validate(full=True)  # (strings are UTF-8)
    for name in ("duration", "offset"):
        if name in out.column_names:
            v = [x for x in out.column(name).to_pylist() if x is not None]
            assert all(math.isfinite(x) and x >= 0 for x in v), (name, v)
    shutil.rmtree(case, ignore_errors=True)  # (a long run makes thousands)
    return planned, out, rej


# -- random bytes -----------------------------------------------------------------------------


@BUDGET
@given(name=st.sampled_from(["a.parquet", "a.jsonl", "a.json", "part-0.parquet"]),
       head=st.sampled_from([b"", b"PAR1", b"PAR1\x15\x04"]), body=st.binary(max_size=512),
       tail=st.sampled_from([b"", b"PAR1", b"\x08\x00\x00\x00PAR1", b"\xff\xff\xff\x7fPAR1"]),
       how=st.sampled_from(["file", "dir", "glob"]))
@example(name="a.parquet", head=b"PAR1", body=b"", tail=b"\xff\xff\xff\x7fPAR1", how="file")
@example(name="a.jsonl", head=b"", body=b'{"id": "x"}\n', tail=b"", how="file")
def test_random_bytes(tmp_path: Path, name: str, head: bytes, body: bytes, tail: bytes,
                      how: str) -> None:
    case = tmp_path / f"case{next(_N)}"
    (case / "in").mkdir(parents=True)
    (case / "in" / name).write_bytes(head + body + tail)
    spec = {"file": str(case / "in" / name), "dir": str(case / "in"),
            "glob": str(case / "in" / "*")}[how]
    out = run_stage(case, [spec], 3)
    assert isinstance(out, str), "random bytes planned as Parquet rows"


# -- Parquet with odd columns -----------------------------------------------------------------

_WORD = pa.struct([("word", pa.string()), ("start", pa.float64()), ("end", pa.float64())])


def _bad_utf8(n: int) -> pa.Array:
    return pa.array([b"r\xff%d" % i for i in range(n)], pa.binary()).view(pa.string())


KINDS: dict[str, Any] = {
    "str": lambda n: pa.array([f"r{i}" for i in range(n)]),
    "str_nulls": lambda n: pa.array([None if i % 2 else f"r{i}" for i in range(n)]),
    "num_str": lambda n: pa.array(["1.5", "abc", "", "1e400", "-0", "NaN"][:n] * (n // 6 + 1))[
        :n],
    "large_str": lambda n: pa.array([f"r{i}" for i in range(n)], pa.large_string()),
    "dict": lambda n: pa.array([f"r{i % 2}" for i in range(n)]).dictionary_encode(),
    "int": lambda n: pa.array(list(range(n)), pa.int64()),
    "huge_int": lambda n: pa.array([2**40 + i for i in range(n)], pa.int64()),
    "int8": lambda n: pa.array([i % 100 for i in range(n)], pa.int8()),
    "float": lambda n: pa.array([float("nan"), float("inf"), 1e308, -1.0][:n] * n)[:n],
    "bool": lambda n: pa.array([i % 2 == 0 for i in range(n)]),
    "null": lambda n: pa.nulls(n),
    "list_int": lambda n: pa.array([[i] for i in range(n)]),
    "struct": lambda n: pa.array([{"a": i} for i in range(n)]),
    "words": lambda n: pa.array([[{"word": "w", "start": 0.0, "end": 0.5}]] * n,
                                pa.list_(_WORD)),
    "words_odd": lambda n: pa.array([[{"word": 5, "start": "x"}]] * n),
    "bad_utf8": _bad_utf8,
    "binary": lambda n: pa.array([b"\x00\xff"] * n, pa.binary()),
    "timestamp": lambda n: pa.array(list(range(n)), pa.int64()).cast(pa.timestamp("s")),
}
COLUMNS = ["duration", "sample_rate", "channels", "offset", "audio_path", "words", "text",
           "speaker", "language", "tag", "other", "parent_id", "source_url"]

FILES = st.lists(st.fixed_dictionaries({
    "id": st.one_of(st.sampled_from(sorted(KINDS)), st.none()),
    "cols": st.dictionaries(st.sampled_from(COLUMNS), st.sampled_from(sorted(KINDS)),
                            max_size=4),
    "n": st.integers(0, 6),
    "row_group": st.integers(1, 4),
}), min_size=1, max_size=3)


def _write(case: Path, files: list[dict[str, Any]]) -> list[str]:
    paths = []
    for k, f in enumerate(files):
        n = f["n"]
        cols = {} if f["id"] is None else {"id": KINDS[f["id"]](n)}
        cols.update({c: KINDS[kind](n) for c, kind in f["cols"].items()})
        if not cols:
            cols = {"other": pa.nulls(n)}
        p = case / "in" / f"f{k}.parquet"
        pq.write_table(pa.table(cols), p, row_group_size=f["row_group"])
        paths.append(str(p))
    return paths


_F = {"n": 4, "row_group": 2}


@BUDGET
@given(files=FILES, columns=st.one_of(st.none(), st.lists(st.sampled_from(COLUMNS),
                                                          max_size=3)),
       rel=st.sampled_from(["cwd", "file"]), batch_size=st.integers(1, 7),
       as_dir=st.booleans())
@example(files=[{"id": "str", "cols": {}, **_F}], columns=None, rel="cwd", batch_size=3,
         as_dir=False)
# found: null ids were planned as null and their rows came back as `no_output`
@example(files=[{"id": "str_nulls", "cols": {"duration": "float"}, **_F}], columns=None,
         rel="file", batch_size=3, as_dir=False)
# found: a duration of "abc" raised out of process (every row an `error`), and "1e400"
# became an infinite duration
@example(files=[{"id": "str", "cols": {"duration": "num_str"}, **_F}], columns=None,
         rel="cwd", batch_size=4, as_dir=False)
# found: channels of 2**40 (int16 overflow) raised out of process
@example(files=[{"id": "int", "cols": {"channels": "huge_int"}, **_F}], columns=None,
         rel="cwd", batch_size=4, as_dir=False)
# found: an id column of lists raised ArrowNotImplementedError (no config error)
@example(files=[{"id": "list_int", "cols": {}, **_F}], columns=None, rel="cwd", batch_size=4,
         as_dir=False)
# found: ids that are not UTF-8 were planned; the row-by-row retry then raised
# UnicodeDecodeError out of run_batch
@example(files=[{"id": "bad_utf8", "cols": {}, **_F}], columns=None, rel="cwd", batch_size=4,
         as_dir=False)
@example(files=[{"id": "str", "cols": {"text": "bad_utf8", "offset": "float"}, **_F}],
         columns=None, rel="cwd", batch_size=4, as_dir=False)
# found: `tag` int64 in one file and string in another: a batch holding rows of both could
# not be stacked (the row-by-row retry neither), the stage failed
@example(files=[{"id": "str", "cols": {"tag": "int"}, **_F},
                {"id": "int", "cols": {"tag": "str"}, **_F}], columns=None, rel="cwd",
         batch_size=7, as_dir=False)
# found: audio_path of integers with paths_relative_to: file raised TypeError
@example(files=[{"id": "str", "cols": {"audio_path": "int"}, **_F}], columns=None,
         rel="file", batch_size=2, as_dir=False)
def test_parquet_columns(tmp_path: Path, files: list[dict[str, Any]],
                         columns: list[str] | None, rel: str, batch_size: int,
                         as_dir: bool) -> None:
    case = tmp_path / f"case{next(_N)}"
    (case / "in").mkdir(parents=True)
    paths = _write(case, files)
    out = run_stage(case, [str(case / "in")] if as_dir else paths, batch_size,
                    columns=columns, paths_relative_to=rel)
    if isinstance(out, str):
        # a config error only for what the files are as a whole
        assert any(f["id"] in (None, "list_int", "struct", "bad_utf8", "words", "words_odd")
                   for f in files) or "column" in out, out
        return
    planned, outputs, _ = out
    assert planned == sum(f["n"] for f in files)
    if outputs.num_rows and rel == "file" and "audio_path" in outputs.column_names:
        for p in outputs.column("audio_path").to_pylist():
            assert p is None or os.path.isabs(p) or "://" in p, p

