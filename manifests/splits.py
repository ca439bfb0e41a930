"""Stage ``split``: train/dev/test by speaker, sized by hours, deterministic for a seed.

Before any batch, the driver-side ``prepare`` pass sums the audio hours of every
speaker over the whole input, orders speakers by a seeded hash and fills ``test`` then
``dev`` with consecutive speakers up to their targets, never past them, with the rest in
``train`` (see :func:`assign_splits`: adding speakers moves only the boundary ones). A
split with a target that no speaker fits under gets the smallest speaker instead, so it
is never empty when asked for. No speaker is in two splits. Rows without a speaker are grouped by their recording
(so one recording never straddles splits). Every row gets a ``split`` column.

``mode: dialogue`` splits synthesized dialogue turns (rows with ``dialogue_id``) instead:
all turns of a dialogue land in one split, and dialogues are grouped by the voice of
their user turns (``voice_id``, else ``speaker``), so every user voice's dialogues go to
one split and no user voice is in two splits. The assistant's voice is shared by every
dialogue by design and is ignored. Dialogues whose user voices overlap are grouped
together (connected components); the groups are sized by hours and assigned exactly as
speakers are. Where the bank has too few user voices to fill every requested split (fewer
voice groups than splits asked for), each dialogue is its own group instead (voices are
then shared across splits; the summary says ``voices_disjoint: false``). Rows without a
``dialogue_id`` are grouped as in speaker mode.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from typing import Any, Literal

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
    mode: Literal["speaker", "dialogue"] = Field(
        "speaker", description="speaker: no speaker in two splits; dialogue: synthesized "
        "turns, a dialogue's turns in one split and no user voice in two splits")


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
    description = ("train/dev/test by speaker, sized by hours (no speaker in two splits); "
                   "mode: dialogue for synthesized dialogues")
    Config = SplitConfig
    resources = Resources(cpus=1)
    default_batch_size = 2048

    config: SplitConfig

    prepare_columns = ("id", "speaker", "duration", "dialogue_id", "role", "voice_id")

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, SplitConfig)
        if config.mode == "dialogue":
            return _prepare_dialogues(config, inputs, ctx)
        hours = {k: float(v) / 3600 for k, v in _seconds_by(inputs, ()).items()}
        total = sum(hours.values())
        dev, test = _targets(config, total)
        return {"map": assign_splits(hours, dev, test, config.seed),
                "targets": {"dev": dev, "test": test}}

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        prepared = self.ctx.prepared or {}
        mapping = prepared.get("map", {})
        did = row.get("dialogue_id") if prepared.get("mode") == "dialogue" else None
        if did is not None:
            split = prepared.get("dialogues", {}).get(str(did), "train")
        else:
            split = mapping.get(group_key(row), "train")
        return {**row, "parent_id": row.get("id"), "split": split}

    summary_columns = ("id", "speaker", "split", "duration", "dialogue_id", "role",
                       "voice_id")

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        if outputs.num_rows == 0 or "split" not in outputs.column_names:
            return None
        hours: dict[str, float] = defaultdict(float)
        groups: dict[str, int] = defaultdict(int)
        for (split, _key), secs in _seconds_by(outputs, ("split",)).items():
            hours[split] += float(secs) / 3600
            groups[split] += 1
        out: dict[str, Any] = {
            "hours": {k: round(v, 6) for k, v in sorted(hours.items())},
            "speakers": {k: v for k, v in sorted(groups.items())}}
        if "dialogue_id" in outputs.column_names:
            out.update(_dialogue_summary(outputs))
        return out

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        lines = []
        for s in summary.get("hours", {}):
            line = f"{s}: {summary['hours'][s]:.3f} h, {summary['speakers'][s]} speakers"
            if "dialogues" in summary:
                line += (f", {summary['dialogues'].get(s, 0)} dialogues, "
                         f"{summary['user_voices'].get(s, 0)} user voices")
            lines.append(line)
        shared = summary.get("user_voices_in_several_splits")
        if shared:
            lines.append(f"{shared} user voices are in more than one split")
        return lines


def _targets(config: SplitConfig, total: float) -> tuple[float, float]:
    dev = config.dev_hours if config.dev_hours is not None else config.dev_fraction * total
    test = config.test_hours if config.test_hours is not None \
        else config.test_fraction * total
    return dev, test


def _voice_column(table: pa.Table) -> Any:
    """Each row's voice: ``voice_id``, else ``speaker`` (null when neither)."""
    import pyarrow.compute as pc

    cols = [pc.cast(table.column(c), pa.string()) for c in ("voice_id", "speaker")
            if c in table.column_names]
    if not cols:
        return pa.nulls(table.num_rows, pa.string())
    return cols[0] if len(cols) == 1 else pc.coalesce(*cols)


def _dialogue_units(table: pa.Table) -> tuple[dict[str, str], dict[str, float]]:
    """``dialogue id -> unit`` where a unit joins every dialogue that shares a user voice
    (connected components over dialogues and user voices; a dialogue without a user voice
    is its own unit), and the seconds of each dialogue."""
    import pyarrow.compute as pc

    has = pc.is_valid(table.column("dialogue_id"))
    t = table.filter(has)
    did = pc.cast(t.column("dialogue_id"), pa.string())
    dur = t.column("duration").cast(pa.float64()) if "duration" in t.column_names \
        else pa.nulls(t.num_rows, pa.float64())
    secs_t = pa.table({"d": did, "s": dur}).group_by("d", use_threads=False) \
        .aggregate([("s", "sum")])
    secs = {d: float(s or 0.0) for d, s in zip(secs_t.column("d").to_pylist(),
                                               secs_t.column("s_sum").to_pylist(),
                                               strict=True)}
    role = pc.cast(t.column("role"), pa.string()) if "role" in t.column_names \
        else pa.nulls(t.num_rows, pa.string())
    voice = _voice_column(t)
    user = pc.and_(pc.fill_null(pc.equal(role, "user"), False), pc.is_valid(voice))
    pairs = pa.table({"d": did, "v": voice}).filter(user) \
        .group_by(["d", "v"], use_threads=False).aggregate([])
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for d in secs:
        find("dlg:" + d)
    for d, v in zip(pairs.column("d").to_pylist(), pairs.column("v").to_pylist(),
                    strict=True):
        a, b = find("dlg:" + d), find("voice:" + v)
        if a != b:  # the smaller name is the root: components are named stably
            parent[max(a, b)] = min(a, b)
    # a component that holds a voice is named after its smallest voice
    name: dict[str, str] = {}
    for x in sorted(parent):
        if x.startswith("voice:"):
            name.setdefault(find(x), x)
    units = {d: name.get(find("dlg:" + d), "dlg:" + d) for d in secs}
    return units, secs


def _prepare_dialogues(config: SplitConfig, table: pa.Table,
                       ctx: StageContext | None) -> dict[str, Any]:
    from speechmill.pipeline.errors import ConfigError

    if table.num_rows and "dialogue_id" not in table.column_names:
        raise ConfigError("mode 'dialogue' needs turn rows with a dialogue_id column (the "
                          "output of the synthesis stages); use mode: speaker for other rows",
                          stage=ctx.stage_id if ctx is not None else None, key="mode")
    units, secs = _dialogue_units(table) if table.num_rows else ({}, {})
    other: dict[str, float] = {}
    if "dialogue_id" in table.column_names:
        import pyarrow.compute as pc

        rest = table.filter(pc.is_null(table.column("dialogue_id")))
    else:
        rest = table
    if rest.num_rows:
        other = {k: float(v) for k, v in _seconds_by(rest, ()).items()}
    total = (sum(secs.values()) + sum(other.values())) / 3600
    dev, test = _targets(config, total)
    wanted = 1 + (dev > 0) + (test > 0)
    by_voice = {u for u in units.values() if u.startswith("voice:")}
    disjoint = len(set(units.values())) + len(other) >= wanted
    if not disjoint:  # too few user voices for every split: split by dialogue instead
        units = {d: "dlg:" + d for d in units}
    hours: dict[str, float] = defaultdict(float)
    for d, u in units.items():
        hours[u] += secs[d] / 3600
    for k, v in other.items():
        hours[k] += v / 3600
    assigned = assign_splits(dict(hours), dev, test, config.seed)
    return {"mode": "dialogue",
            "dialogues": {d: assigned[u] for d, u in units.items()},
            "map": {k: assigned[k] for k in other},
            "targets": {"dev": dev, "test": test},
            "voices_disjoint": disjoint, "user_voice_groups": len(by_voice)}


def _dialogue_summary(outputs: pa.Table) -> dict[str, Any]:
    """Dialogues and distinct user voices per split, and how many user voices are in
    more than one split."""
    import pyarrow.compute as pc

    t = outputs.filter(pc.is_valid(outputs.column("dialogue_id")))
    split = pc.cast(t.column("split"), pa.string())
    dlg = pa.table({"s": split, "d": pc.cast(t.column("dialogue_id"), pa.string())}) \
        .group_by("s", use_threads=False).aggregate([("d", "count_distinct")])
    role = pc.cast(t.column("role"), pa.string()) if "role" in t.column_names \
        else pa.nulls(t.num_rows, pa.string())
    voice = _voice_column(t)
    user = pc.and_(pc.fill_null(pc.equal(role, "user"), False), pc.is_valid(voice))
    uv = pa.table({"s": split, "v": voice}).filter(user) \
        .group_by(["s", "v"], use_threads=False).aggregate([])
    per_split = uv.group_by("s", use_threads=False).aggregate([("v", "count")])
    per_voice = uv.group_by("v", use_threads=False).aggregate([("s", "count")])
    return {
        "dialogues": dict(sorted(zip(dlg.column("s").to_pylist(),
                                     dlg.column("d_count_distinct").to_pylist(),
                                     strict=True))),
        "user_voices": dict(sorted(zip(per_split.column("s").to_pylist(),
                                       per_split.column("v_count").to_pylist(),
                                       strict=True))),
        "user_voices_in_several_splits": int(pc.sum(pc.greater(
            per_voice.column("s_count"), 1)).as_py() or 0) if per_voice.num_rows else 0,
    }
