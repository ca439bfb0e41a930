"""Source stage ``sft_import``: dialogues from existing text SFT sets.

Reads ShareGPT, OpenAI messages, Alpaca and UltraChat rows (see
:mod:`speechmill.synth.sft_formats`) from local files, directories, globs or fsspec URLs
(JSON arrays, JSON Lines, Parquet; ``.gz``/``.bz2``/``.xz``/``.zst`` compressed), or from
the Hugging Face hub by name (``hf_dataset``; refused under ``--offline``). The format is
detected per file from its first rows unless ``format`` names it.

The plan holds one row per input row (its file and row number, and the dialogue it
parsed to, so a resume finishes exactly the planned work even if the files changed);
the planned ``id`` is the dialogue id, derived from the file name and row number, so a
rerun gives the same ids. Exact duplicates (same system prompt, roles and texts after
``max_turns``) are found while planning: the first copy is kept, the others are
``duplicate`` rejects. Workers run the content QC (:mod:`speechmill.synth.text_qc`) and
emit one turn row per turn (:func:`speechmill.synth.turns.turn_rows`), with ``source``
provenance ``{"stage": "sft_import", "dataset", "row", "format", "row_id"}``.

Reject reasons: ``unreadable`` (a file that cannot be read or parsed at all),
``unknown_format`` (a file none of whose first rows has a known shape), ``malformed``,
``bad_roles``, ``empty_turn``, ``no_turns`` (see :mod:`~speechmill.synth.sft_formats`),
``duplicate`` and the ``qc_*`` reasons of :mod:`~speechmill.synth.text_qc`; with
``judge`` set, ``qc_judge`` and the LLM client's reasons (:mod:`~speechmill.synth.
text_judge`; the scores land in a ``judge`` column).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from speechmill.pipeline.errors import is_fatal
from speechmill.pipeline.records import reject, rejects_table
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageResult
from speechmill.synth.llm_usage import (
    committed_usage,
    usage_columns,
    usage_line,
    usage_tail,
    usage_values,
)
from speechmill.synth.sft_formats import RowError, detect, to_dialogue
from speechmill.synth.text_judge import JudgeConfig
from speechmill.synth.text_qc import TextQCConfig, qc_dialogue
from speechmill.synth.turns import alternation_error, dialogue_id, turn_rows

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


def read_rows(path: str, storage_options: dict[str, Any] | None = None
              ) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a file; a JSONL line that does not parse comes as a
    :class:`RowError` in place of the row. Raises ``OSError``/``ValueError`` when the
    file cannot be read at all."""
    import fsspec

    kind = _kind(path)
    so = storage_options or {}
    if kind == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", **so) as f:
            pf = pq.ParquetFile(f)
            i = 0
            for batch in pf.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield i, row
                    i += 1
        return
    with fsspec.open(path, "rt", encoding="utf-8-sig", compression="infer", **so) as f:
        if kind == "json":
            text = f.read()
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as e:
                if e.msg != "Extra data":  # not JSON Lines either
                    raise ValueError(f"not JSON: {e}") from None
                lines = text.splitlines()
            else:
                rows = doc if isinstance(doc, list) else [doc]
                yield from enumerate(rows)
                return
        else:
            lines = f  # type: ignore[assignment]
        i = 0
        for line_no, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, RowError("malformed", f"line {line_no}: invalid JSON: {e}")
            i += 1


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

        def plan_row(i: int, **kw: Any) -> dict[str, Any]:
            return {"id": dialogue_id("sft_import", name, str(i)), "source_url": name,
                    "_row": i, "_format": None, "_dialogue": None, "_reason": None,
                    "_detail": None, "_dup_of": None, **kw}

        raw: list[tuple[int, Any]] = []
        try:
            for i, r in it if it is not None else read_rows(name, c.storage_options):
                if budget is not None and len(raw) >= budget:
                    break
                raw.append((i, r))
        except (OSError, ValueError, UnicodeDecodeError, pa.ArrowException) as e:
            # the file as a whole is bad: one reject stands for it (and its rows read)
            return [plan_row(-1, _reason="unreadable",
                             _detail=f"{name}: {type(e).__name__}: {e}"[:2000])]
        fmt = c.format
        if fmt == "auto":
            fmt = next((f for f in (detect(r) for _, r in raw[:_DETECT_ROWS]
                                    if not isinstance(r, RowError)) if f), None)
        out = []
        for i, r in raw:
            if fmt is None:
                out.append(plan_row(i, _reason="unknown_format", _detail=(
                    f"none of the first {_DETECT_ROWS} rows of {name} is ShareGPT, OpenAI "
                    "messages, Alpaca or UltraChat")))
                continue
            if isinstance(r, RowError):
                out.append(plan_row(i, _format=fmt, _reason=r.reason, _detail=r.detail))
                continue
            try:
                d = to_dialogue(r, fmt)
            except RowError as e:
                out.append(plan_row(i, _format=fmt, _reason=e.reason, _detail=e.detail))
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

            from speechmill.synth.llm import LLMClient

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
        from speechmill.synth.text_judge import judge_column, judge_request, judge_verdict

        cfg = self.config.judge
        assert cfg is not None and getattr(self, "client", None) is not None
        reqs = [judge_request(row["id"], rows, rows[0]["system"], rows[0]["language"])
                for row, rows in kept]
        out = []
        for (row, rows), res in zip(kept, self.client.run(reqs), strict=True):
            record, reason, detail = judge_verdict(res, cfg)
            if reason is not None:
                rejects.append(reject(row, self.ctx.stage_id, reason,
                                      f"judge: {detail}"[:1700] + usage_tail(res.usage)))
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


def plan_id(name: str, row: int) -> str:
    """The planned id (= dialogue id) of row ``row`` of file ``name``."""
    return dialogue_id("sft_import", name, str(row))

