"""Stage ``split``: train/dev/test by speaker, sized by hours, deterministic for a seed.

Before any batch, the driver-side ``prepare`` pass sums the audio hours of every
speaker over the whole input, orders speakers by a seeded hash and fills ``test`` then
``dev`` with consecutive speakers up to their targets, never past them, with the rest in
``train`` (see :func:`assign_splits`: adding speakers moves only the boundary ones). A
split with a target that no speaker fits under gets the smallest speaker instead, so it
is never empty when asked for. No speaker is in two splits. Rows without a speaker are grouped by their recording
(so one recording never straddles splits). Every row gets a ``split`` column.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any

import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.records import recording_id
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext

SPLITS = ("train", "dev", "test")


class SplitConfig(StageConfig):
    dev_hours: float | None = Field(None, ge=0, description="hours for dev (wins over "
                                    "dev_fraction)")
    test_hours: float | None = Field(None, ge=0, description="hours for test (wins over "
                                     "test_fraction)")
    dev_fraction: float = Field(0.05, ge=0, lt=1, description="share of hours for dev")
    test_fraction: float = Field(0.05, ge=0, lt=1, description="share of hours for test")
    seed: int = Field(0, description="changes which speakers land in dev/test")


def group_key(row: dict[str, Any]) -> str:
    spk = row.get("speaker")
    return f"spk:{spk}" if spk else f"rec:{recording_id(str(row.get('id')))}"


def assign_splits(hours: dict[str, float], dev_target: float, test_target: float,
                  seed: int) -> dict[str, str]:
    """Speaker-group -> split. Pure function of its arguments.

    Speakers are ranked by a seeded hash. A speaker longer than a split's target is never
    put in it. The eligible speakers, in rank order, fill ``test`` until the next one
    would overshoot, then ``dev`` the same way; everything else is ``train``. Adding a
    speaker therefore moves at most the speakers at the test/dev and dev/train
    boundaries, not a reshuffle.
    """
    def rank(k: str) -> str:
        return hashlib.sha256(f"{seed}\x1f{k}".encode()).hexdigest()

    order = sorted(hours, key=rank)
    out: dict[str, str] = dict.fromkeys(order, "train")
    pos = 0
    for split, target in (("test", test_target), ("dev", dev_target)):
        if target <= 0:
            continue
        got = 0.0
        while pos < len(order):
            k = order[pos]
            if out[k] != "train" or hours[k] > target + 1e-9:
                pos += 1  # taken already, or too big for any held-out split of this size
                continue
            if got + hours[k] > target + 1e-9:
                break
            out[k] = split
            got += hours[k]
            pos += 1
        if got == 0.0:  # asked for, but every speaker was too big: take the smallest
            spare = [k for k in order if out[k] == "train"]
            if len(spare) > 1:  # keep at least one speaker for train
                k = min(spare, key=lambda s: (hours[s], rank(s)))
                out[k] = split
    return out


#: rows whose speaker groups are computed at a time
SLICE_ROWS = 1 << 20


def _stringy(col: Any) -> bool:
    t = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)


def group_keys(table: pa.Table) -> Any:
    """:func:`group_key` of every row of ``table`` (``id`` and optional ``speaker``),
    computed with Arrow for string columns (as every stage writes them), row by row
    otherwise (Python's ``str()`` of a number or bool is what :func:`group_key` uses)."""
    import pyarrow.compute as pc

    cols = [table.column(c) for c in ("id", "speaker") if c in table.column_names]
    if not all(_stringy(c) for c in cols):
        rows = table.select([c for c in ("id", "speaker") if c in table.column_names])
        return pa.array([group_key(r) for r in rows.to_pylist()], pa.string())
    ids = pc.cast(table.column("id"), pa.string())
    rec = pc.binary_join_element_wise(
        "rec:", pc.list_element(pc.split_pattern(pc.fill_null(ids, "None"), "-",
                                                 max_splits=1), 0), "")
    if "speaker" not in table.column_names:
        return rec
    spk = pc.cast(table.column("speaker"), pa.string())
    has = pc.fill_null(pc.greater(pc.utf8_length(spk), 0), False)
    return pc.if_else(has, pc.binary_join_element_wise("spk:", spk, ""), rec)


def _seconds_by(table: pa.Table, extra: tuple[str, ...]) -> dict[Any, float]:
    """Seconds of audio per speaker group (per ``(extra..., group)`` when ``extra`` names
    columns), aggregated by Arrow a slice at a time: no Python object per row."""
    if table.num_rows == 0:
        return {}
    parts = []
    for a in range(0, table.num_rows, SLICE_ROWS):
        t = table.slice(a, SLICE_ROWS)
        dur = t.column("duration").cast(pa.float64()) if "duration" in t.column_names \
            else pa.nulls(t.num_rows, pa.float64())
        cols = {c: t.column(c) for c in extra}
        parts.append(pa.table({**cols, "key": group_keys(t), "secs": dur})
                     .group_by([*extra, "key"], use_threads=False)
                     .aggregate([("secs", "sum")]))
    keys = [*extra, "key"]
    total = pa.concat_tables(parts).group_by(keys, use_threads=False) \
        .aggregate([("secs_sum", "sum")])
    vals = [total.column(k).to_pylist() for k in keys]
    secs = total.column("secs_sum_sum").to_pylist()
    out: dict[Any, float] = {}
    for i, s in enumerate(secs):
        k = tuple(v[i] for v in vals)
        out[k if extra else k[0]] = float(s or 0.0)
    return out


class Split(Stage):
    name = "split"
    description = "train/dev/test by speaker, sized by hours (no speaker in two splits)"
    Config = SplitConfig
    resources = Resources(cpus=1)
    default_batch_size = 2048

    config: SplitConfig

    prepare_columns = ("id", "speaker", "duration")

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, SplitConfig)
        hours = {k: float(v) / 3600 for k, v in _seconds_by(inputs, ()).items()}
        total = sum(hours.values())
        dev = config.dev_hours if config.dev_hours is not None \
            else config.dev_fraction * total
        test = config.test_hours if config.test_hours is not None \
            else config.test_fraction * total
        return {"map": assign_splits(hours, dev, test, config.seed),
                "targets": {"dev": dev, "test": test}}

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        mapping = (self.ctx.prepared or {}).get("map", {})
        return {**row, "parent_id": row.get("id"),
                "split": mapping.get(group_key(row), "train")}

    summary_columns = ("id", "speaker", "split", "duration")

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        if outputs.num_rows == 0 or "split" not in outputs.column_names:
            return None
        hours: dict[str, float] = defaultdict(float)
        groups: dict[str, int] = defaultdict(int)
        for (split, _key), secs in _seconds_by(outputs, ("split",)).items():
            hours[split] += float(secs) / 3600
            groups[split] += 1
        return {"hours": {k: round(v, 6) for k, v in sorted(hours.items())},
                "speakers": {k: v for k, v in sorted(groups.items())}}

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        return [f"{s}: {summary['hours'][s]:.3f} h, {summary['speakers'][s]} speakers"
                for s in summary.get("hours", {})]
