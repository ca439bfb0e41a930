"""Source stage ``sft_import``: dialogues from existing text SFT sets.

Reads ShareGPT, OpenAI messages, Alpaca and UltraChat rows (see
:mod:`speechmill.synth.text.sft_formats`) from local files, directories, globs or fsspec URLs
(JSON arrays, JSON Lines, Parquet; ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), or from
the Hugging Face hub by name (``hf_dataset``; refused under ``--offline``). The format is
detected per file from its first rows unless ``format`` names it.

The plan holds one row per input row (its file and row number, and the dialogue it
parsed to, so a resume finishes exactly the planned work even if the files changed);
the planned ``id`` is the dialogue id, derived from the file name and row number, so a
rerun gives the same ids. Exact duplicates (same system prompt, roles and texts after
``max_turns``) are found while planning: the first copy is kept, the others are
``duplicate`` rejects. Workers run the content QC (:mod:`speechmill.synth.qc.text_qc`) and
emit one turn row per turn (:func:`speechmill.synth.text.turns.turn_rows`), with ``source``
provenance ``{"stage": "sft_import", "dataset", "row", "format", "row_id"}``.

Reject reasons: ``unreadable`` (a file that cannot be read or parsed at all: a broken
compressed stream, an array that never ends, UTF-16 text; a JSON Lines line or array
element that is not UTF-8 or not JSON, nests too deeply or holds a lone surrogate is one
``malformed`` row naming its line, the rest of the file is kept),
``unknown_format`` (a file none of whose first rows has a known shape), ``malformed``,
``bad_roles``, ``empty_turn``, ``no_turns`` (see :mod:`~speechmill.synth.text.sft_formats`),
``duplicate`` and the ``qc_*`` reasons of :mod:`~speechmill.synth.qc.text_qc`; with
``judge`` set, ``qc_judge`` and the LLM client's reasons (:mod:`~speechmill.synth.
text_judge`; the scores land in a ``judge`` column).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult
from speechmill.synth.llm.usage import (
    committed_usage,
    usage_columns,
    usage_line,
    usage_tail,
    usage_values,
)
from speechmill.synth.qc.text_judge import JudgeConfig
from speechmill.synth.qc.text_qc import TextQCConfig, qc_dialogue
from speechmill.synth.text.sft_formats import RowError, detect, to_dialogue
from speechmill.synth.text.turns import alternation_error, dialogue_id, turn_rows

_EXTS = (".json", ".jsonl", ".ndjson", ".parquet", ".pq")
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
#: rows of a file looked at to detect its format
_DETECT_ROWS = 50

_PLAN_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_url", pa.string()),
    ("_row", pa.int64()),
    ("_format", pa.string()),
    ("_dialogue", pa.string()),
    ("_reason", pa.string()),
    ("_detail", pa.string()),
    ("_dup_of", pa.string()),
])


class SftImportConfig(StageConfig):
    paths: list[str] = Field(
        default_factory=list,
        description="files, directories, globs or fsspec URLs (JSON, JSONL, Parquet)")
    hf_dataset: str | None = Field(
        None, description="a Hugging Face hub dataset name (needs the network)")
    hf_config: str | None = Field(None, description="the hub dataset's config name")
    hf_split: str = Field("train", description="the hub dataset's split")
    hf_revision: str | None = None
    format: Literal["auto", "sharegpt", "openai", "alpaca", "ultrachat"] = Field(
        "auto", description="auto: detected per file from its first rows")
    language: str | None = Field(
        None, description="the dialogues' language (ISO 639-1), unless a row says")
    max_rows: int | None = Field(None, ge=1, description="input rows read at most")
    max_turns: int | None = Field(
        None, ge=2, description="longer dialogues are cut to whole rounds within this")
    dedup: bool = Field(True, description="reject exact-duplicate dialogues")
    qc: TextQCConfig | None = Field(
        default_factory=TextQCConfig, description="content QC (null: none)")
    judge: JudgeConfig | None = Field(
        None, description="LLM-as-judge scoring of each dialogue (off: null)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for remote paths")

    @model_validator(mode="after")
    def _some_input(self) -> SftImportConfig:
        if not self.paths and not self.hf_dataset:
            raise ValueError("key 'paths': give files (or 'hf_dataset')")
        return self


# -- reading -------------------------------------------------------------------------

def _is_url(p: str) -> bool:
    return "://" in p and not p.startswith("file://")


def _kind(path: str) -> str:
    name = path.split("?")[0].lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return "json"


def _wanted(path: str) -> bool:
    name = path.lower()
    for c in _COMPRESSED:
        if name.endswith(c):
            name = name[: -len(c)]
    return name.endswith(_EXTS)


def expand(spec: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The files ``spec`` names (sorted); a named file is taken even if missing."""
    has_glob = any(c in spec for c in "*?[")
    if _is_url(spec):
        import fsspec

        fs, _, paths = fsspec.get_fs_token_paths(spec, storage_options=storage_options or {})
        if not has_glob:
            try:
                is_dir = fs.isdir(paths[0])
            except Exception:  # unreachable: planned as is, rejected when read
                is_dir = False
            if not is_dir:
                return [spec]
            paths = fs.find(paths[0])
        return sorted(p if "://" in p else fs.unstrip_protocol(p) for p in paths if _wanted(p))
    spec = os.path.expanduser(spec.removeprefix("file://"))
    if has_glob:
        return sorted(h for h in glob.glob(spec, recursive=True)
                      if os.path.isfile(h) and _wanted(h))
    if os.path.isdir(spec):
        found = []
        for root, dirs, files in os.walk(spec):
            dirs.sort()
            found.extend(os.path.join(root, f) for f in files if _wanted(f))
        return sorted(found)
    return [spec]


#: a row's JSON that the decoder cannot take (too deep, a 5000-digit number...)
_JSON_ERRORS = (ValueError, RecursionError)
#: JSON structure: a whole string, a bracket or comma, or a string that never ends
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]|"', re.S)
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
         b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _not_utf8(head: bytes) -> None:
    """A UTF-16/32 file is not read line by line as garbage: it is ``unreadable``."""
    for bom, enc in _BOMS.items():
        if head.startswith(bom):
            raise ValueError(f"{enc} text, not UTF-8 (convert the file to UTF-8)")


def _json_error(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply"
    return str(e)[:300]


def _load_row(text: str, where: str) -> Any:
    """One row's JSON, or a ``malformed`` :class:`RowError` naming ``where``."""
    try:
        return json.loads(text)
    except _JSON_ERRORS as e:
        return RowError("malformed", f"{where}: invalid JSON: {_json_error(e)}")


#: (row number, row or RowError, where in the file: "line 6", "element 3 (line 5)", None)
Located = Iterator[tuple[int, Any, str | None]]


def _jsonl_rows(chunks: Iterator[bytes] | list[bytes]) -> Located:
    """(row number, row or :class:`RowError`, where) of JSON Lines given as byte chunks
    (each one or more lines): every line is decoded and parsed on its own, so a line that
    is not UTF-8 or not JSON is one ``malformed`` row naming its line and the others are
    kept."""
    i = 0
    line_no = 0
    first = True
    for chunk in chunks:
        for raw in chunk.splitlines() or [b""]:
            line_no += 1
            if first:
                _not_utf8(raw[:4])
                raw = raw.removeprefix(b"\xef\xbb\xbf")
                first = False
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield i, RowError("malformed", f"line {line_no}: not UTF-8 text (byte "
                                  f"0x{raw[e.start]:02x} at column {e.start + 1})"), None
            else:
                yield i, _load_row(line, f"line {line_no}"), f"line {line_no}"
            i += 1


def _array_elements(text: str) -> list[tuple[int, int]] | None:
    """The (start, end) spans of the elements of the JSON array ``text`` is, found from
    its structure alone (strings, brackets, commas), so one element that does not parse
    (too deep, a bad escape, invalid JSON) leaves the others readable; None when the
    document is not one whole array (unbalanced, an unterminated string, trailing data)."""
    start = len(text) - len(text.lstrip())
    if not text.startswith("[", start):
        return None
    spans: list[tuple[int, int]] = []
    depth = 0
    elem = start + 1
    for m in _JSON_TOKEN.finditer(text, start):
        c = text[m.start()]
        if c == '"':
            if m.end() - m.start() == 1:  # a string that never ends
                return None
            continue
        if c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                if text[m.end():].strip():
                    return None
                spans.append((elem, m.start()))
                if len(spans) == 1 and not text[elem:m.start()].strip():
                    return []
                return spans
        elif depth == 1:  # a comma between elements
            spans.append((elem, m.start()))
            elem = m.end()
    return None


def _array_rows(text: str, spans: list[tuple[int, int]]) -> Located:
    line, pos = 1, 0
    for k, (a, b) in enumerate(spans):
        body = text[a:b]
        at = a + len(body) - len(body.lstrip())
        line += text.count("\n", pos, at)
        pos = at
        where = f"element {k} (line {line})"
        if not body.strip():
            yield k, RowError("malformed", f"{where}: empty (a stray comma)"), where
        else:
            yield k, _load_row(body, where), where


def _json_doc_rows(data: bytes) -> Located:
    """Rows of a ``.json`` file: one JSON array (or object), or JSON Lines."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    # bytes that are not UTF-8 become lone surrogates: the row holding one is malformed
    # (sft_formats.check_row), the rest of the document still parses
    text = data.decode("utf-8", "surrogateescape")
    try:
        doc = json.loads(text)
    except _JSON_ERRORS as e:
        if isinstance(e, json.JSONDecodeError) and e.msg == "Extra data":  # JSON Lines
            yield from _jsonl_rows(data.splitlines())
            return
        spans = _array_elements(text)
        if spans is not None:  # one array, some of whose elements are bad
            yield from _array_rows(text, spans)
            return
        if (isinstance(e, RecursionError) and not text.lstrip().startswith("[")
                and len(text.strip().splitlines()) > 1):
            yield from _jsonl_rows(data.splitlines())  # JSON Lines, its first line deep
            return
        raise ValueError(f"not JSON: {_json_error(e)}") from None
    for i, row in enumerate(doc if isinstance(doc, list) else [doc]):
        yield i, row, None


def _parquet_rows(f: Any) -> Located:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(f)
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        try:
            rows: list[Any] = batch.to_pylist()
        except Exception:  # one value Python cannot hold (bad UTF-8, a year 0 date...)
            rows = []
            for k in range(batch.num_rows):
                try:
                    rows.append(batch.slice(k, 1).to_pylist()[0])
                except Exception as e:
                    rows.append(RowError("malformed", f"a value cannot be read: "
                                         f"{type(e).__name__}: {str(e)[:200]}"))
        for row in rows:
            yield i, row, None
            i += 1


def read_rows(path: str, storage_options: dict[str, Any] | None = None
              ) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a file: :func:`read_located` without the places."""
    for i, row, _ in read_located(path, storage_options):
        yield i, row


def read_located(path: str, storage_options: dict[str, Any] | None = None) -> Located:
    """(row number, row, where) of a file (where: ``"line 6"`` of JSON Lines,
    ``"element 3 (line 5)"`` of an array read element by element, else None). A row that
    cannot be read (a JSON Lines line or an array element that is not UTF-8 or not JSON,
    a Parquet value Python cannot hold) comes as a :class:`RowError` in place of the
    row. Raises (``OSError``, ``ValueError``, a decompressor's or Arrow's error) when the
    file cannot be read at all."""
    import fsspec

    kind = _kind(path)
    so = storage_options or {}
    if kind == "parquet":
        with fsspec.open(path, "rb", **so) as f:
            yield from _parquet_rows(f)
        return
    from fsspec.utils import infer_compression

    ext = next((c for c in _COMPRESSED if path.split("?")[0].lower().endswith(c)), None)
    if ext and infer_compression(path.split("?")[0]) is None:
        raise ValueError(f"cannot decompress {ext} here (its Python package is missing)")
    with fsspec.open(path, "rb", compression="infer", **so) as f:
        if kind == "json":
            data = f.read()
            _not_utf8(data[:4])
            yield from _json_doc_rows(data)
            return
        yield from _jsonl_rows(f)


def _hf_rows(cfg: SftImportConfig) -> Iterator[tuple[int, Any]]:
    """The hub dataset's rows, streamed; loading errors raise here (not while iterating)
    so a wrong name fails the plan with a message naming the key."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ValueError(f"key 'hf_dataset': the 'datasets' package is missing ({e})") from None
    try:
        ds = datasets.load_dataset(cfg.hf_dataset, cfg.hf_config, split=cfg.hf_split,
                                   revision=cfg.hf_revision, streaming=True)
    except Exception as e:  # the hub's errors are many; all are "cannot plan"
        raise ValueError(f"key 'hf_dataset': cannot load {cfg.hf_dataset!r} "
                         f"split {cfg.hf_split!r}: {type(e).__name__}: {e}") from None
    return enumerate(ds)


# -- planning ------------------------------------------------------------------------

def _printable(s: str) -> str:
    """``s`` storable as UTF-8: lone surrogates (a non-UTF-8 file name) escaped."""
    return s if s.isascii() else s.encode("utf-8", "backslashreplace").decode("utf-8")


def _content_hash(system: str | None, turns: list[dict[str, str]]) -> str:
    key = json.dumps([system, [[t["role"], t["text"]] for t in turns]], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _cut(turns: list[dict[str, str]], max_turns: int | None) -> list[dict[str, str]]:
    if max_turns is None or len(turns) <= max_turns:
        return turns
    return turns[: max_turns - max_turns % 2]


class SftImport(Stage):
    #: its LLM cache lives under RUN_DIR by local path (URL run dirs: refused)
    local_run_dir_only: ClassVar[bool] = True
    name = "sft_import"
    description = ("source: dialogues from text SFT sets (ShareGPT, OpenAI messages, Alpaca, "
                   "UltraChat; JSON/JSONL/Parquet, fsspec, HF hub) with content QC")
    Config = SftImportConfig
    resources = Resources(cpus=1)
    is_source = True
    default_batch_size = 256

    config: SftImportConfig

    def plan(self) -> pa.Table:
        c = self.config
        rows: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        budget = c.max_rows
        sources: list[tuple[str, Any]] = []
        for spec in c.paths:
            files = expand(spec, c.storage_options)
            if not files:
                raise ValueError(f"key 'paths': {spec!r} matches no JSON/JSONL/Parquet file")
            sources.extend((f, None) for f in files)
        if c.hf_dataset:
            if self.ctx.offline:
                raise ValueError(
                    "key 'hf_dataset': the Hugging Face hub needs the network and this run "
                    "is --offline; download the set and name its files in 'paths'")
            sources.append((f"hf:{c.hf_dataset}/{c.hf_config or 'default'}/{c.hf_split}",
                            _hf_rows(c)))
        for name, it in sources:
            if budget is not None and budget <= 0:
                break
            got = self._plan_file(name, it, budget, seen)
            rows.extend(got)
            if budget is not None:
                budget -= len(got)
        return pa.Table.from_pylist(rows, schema=_PLAN_SCHEMA)

    def _plan_file(self, name: str, it: Iterator[tuple[int, Any]] | None,
                   budget: int | None, seen: dict[str, str]) -> list[dict[str, Any]]:
        c = self.config
        label = _printable(name)  # a file name that is not UTF-8 is still stored

        def plan_row(i: int, **kw: Any) -> dict[str, Any]:
            if kw.get("_detail"):
                kw["_detail"] = _printable(kw["_detail"][:2000])
            return {"id": dialogue_id("sft_import", label, str(i)), "source_url": label,
                    "_row": i, "_format": None, "_dialogue": None, "_reason": None,
                    "_detail": None, "_dup_of": None, **kw}

        raw: list[tuple[int, Any, str | None]] = []
        rows = (((i, r, None) for i, r in it) if it is not None
                else read_located(name, c.storage_options))
        try:
            for i, r, where in rows:
                if budget is not None and len(raw) >= budget:
                    break
                raw.append((i, r, where))
        except Exception as e:  # a decompressor's, Arrow's, fsspec's errors are many
            if is_fatal(e):
                raise
            # the file as a whole is bad: one reject stands for it (and its rows read)
            return [plan_row(-1, _reason="unreadable",
                             _detail=f"{label}: {type(e).__name__}: {e}")]
        fmt = c.format
        if fmt == "auto":
            fmt = next((f for f in (detect(r) for _, r, _ in raw[:_DETECT_ROWS]
                                    if not isinstance(r, RowError)) if f), None)
        out = []
        for i, r, where in raw:
            if isinstance(r, RowError):  # a line / element / value that cannot be read
                out.append(plan_row(i, _format=fmt, _reason=r.reason, _detail=r.detail))
                continue
            if fmt is None:
                out.append(plan_row(i, _reason="unknown_format", _detail=(
                    f"none of the first {_DETECT_ROWS} rows of {label} is ShareGPT, OpenAI "
                    "messages, Alpaca or UltraChat")))
                continue
            try:
                d = to_dialogue(r, fmt)
            except RowError as e:  # (named by its line where the file has lines)
                out.append(plan_row(i, _format=fmt, _reason=e.reason,
                                    _detail=f"{where}: {e.detail}" if where else e.detail))
                continue
            turns = _cut(d.turns, c.max_turns)
            pr = plan_row(i, _format=fmt, _dialogue=json.dumps(
                {"turns": turns, "system": d.system, "language": d.language,
                 "row_id": d.row_id}, ensure_ascii=False))
            if c.dedup:
                h = _content_hash(d.system, turns)
                if h in seen:
                    pr["_dup_of"] = seen[h]
                else:
                    seen[h] = pr["id"]
            out.append(pr)
        return out

    # -- work --------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, SftImportConfig)
        if config.judge is not None:
            try:
                config.judge.llm.check()
            except ValueError as e:
                raise ValueError(str(e).replace("key 'llm.", "key 'judge.llm.")) from None

    def setup(self) -> None:
        self.client = None
        if self.config.judge is not None:
            from pathlib import Path

            from speechmill.synth.llm.client import LLMClient

            cache = Path(self.ctx.run_dir) / "cache" / "llm" / self.ctx.stage_id
            self.client = LLMClient(self.config.judge.llm, cache, self.ctx.stage_id)

    def teardown(self) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
            self.client = None

    def process(self, batch: pa.Table) -> StageResult:
        outputs: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        kept: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
        sid = self.ctx.stage_id
        for row in batch.to_pylist():
            if row["_reason"]:
                where = f"{row['source_url']} row {row['_row']}: " if row["_row"] >= 0 else ""
                rejects.append(reject(row, sid, row["_reason"], where + (row["_detail"] or "")))
                continue
            if row["_dup_of"]:
                rejects.append(reject(row, sid, "duplicate",
                                      f"{row['source_url']} row {row['_row']} repeats "
                                      f"dialogue {row['_dup_of']}"))
                continue
            try:
                got = self._dialogue_rows(row)
            except Exception as e:  # one row's failure never kills the run...
                if is_fatal(e):  # ...but a full disk or an engine error is no row's
                    raise
                rejects.append(reject(row, sid, "error", f"{type(e).__name__}: {e}"))
                continue
            if isinstance(got, tuple):
                rejects.append(reject(row, sid, got[0], got[1]))
            else:
                kept.append((row, got))
        if self.config.judge is not None and kept:
            kept = self._judge(kept, rejects)
        for _, rows in kept:
            outputs.extend(rows)
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def _judge(self, kept: list[tuple[dict[str, Any], list[dict[str, Any]]]],
               rejects: list[dict[str, Any]]
               ) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
        from speechmill.synth.qc.text_judge import (
            judge_column,
            judge_request,
            judge_transient,
            judge_verdict,
        )

        cfg = self.config.judge
        assert cfg is not None and getattr(self, "client", None) is not None
        reqs = [judge_request(row["id"], rows, rows[0]["system"], rows[0]["language"])
                for row, rows in kept]
        out = []
        for (row, rows), res in zip(kept, self.client.run(reqs), strict=True):
            record, reason, detail = judge_verdict(res, cfg)
            if reason is not None:
                rejects.append(reject(row, self.ctx.stage_id, reason,
                                      f"judge: {detail}"[:1700] + usage_tail(res.usage),
                                      transient=judge_transient(res)))
                continue
            col = judge_column(record)
            # the judge's usage on the dialogue's first turn (llm_requests, ...)
            usage = usage_values(res.usage, "llm_")
            out.append((row, [{**r, "judge": col, **(usage if i == 0 else dict.fromkeys(
                usage))} for i, r in enumerate(rows)]))
        return out

    def _dialogue_rows(self, row: dict[str, Any]) -> list[dict[str, Any]] | tuple[str, str]:
        c = self.config
        d = json.loads(row["_dialogue"])
        language = d.get("language") or c.language
        turns = d["turns"]
        if c.qc is not None:
            turns, reason, detail = qc_dialogue(turns, c.qc, language)
            if reason is not None:
                return reason, detail
        else:
            err = alternation_error(turns)
            if err is not None:
                return "qc_alternation", err
        source = {"stage": "sft_import", "dataset": row["source_url"], "row": row["_row"],
                  "format": row["_format"]}
        if d.get("row_id") is not None:
            source["row_id"] = d["row_id"]
        return turn_rows(row["id"], turns, parent_id=row["id"], language=language,
                         system=d.get("system"), source=source)

    summary_columns = ("round", *usage_columns("llm_"))

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        import pyarrow.compute as pc

        out: dict[str, Any] = {"dialogues": 0, "turns": outputs.num_rows}
        if "round" in outputs.column_names and outputs.num_rows:
            out["dialogues"] = int(pc.sum(pc.equal(outputs.column("round"), 0)).as_py() or 0)
        if "llm_requests" in outputs.column_names or any(
                "[llm requests=" in (d or "") for d in (
                    rejects.column("detail").to_pylist() if rejects.num_rows else [])):
            out["llm"] = committed_usage(outputs, rejects, "llm_")
        return out

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = [f"{summary['dialogues']} dialogues, {summary['turns']} turns"]
        if summary.get("llm"):
            lines.append(usage_line(summary["llm"]))
        return lines
