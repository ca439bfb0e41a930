"""Dialogues from turn rows: grouping, completeness and provenance, for the dialogue sinks.

Every dialogue sink (``dialogue_assemble``, ``voice_assistant``, ``nemo_conversation``)
reads its input through :func:`iter_dialogues`, so they all keep and reject the same
dialogues:

- A sink's input is sorted by (split, id) and a turn id is ``{dialogue_id}-{round:03d}``
  (:mod:`speechmill.synth.text.turns`), so a dialogue's turns are adjacent and in round order.
- A dialogue is complete when every round ``0 .. n_rounds-1`` reached the sink. An
  incomplete one is rejected whole: each of its turns becomes a ``dialogue_incomplete``
  reject whose detail names the missing round(s) and, when the run directory says so, the
  stage and reason that rejected them upstream (``round 2 (assistant): tts qc_wer``).
- With ``truncate_incomplete`` the rounds before the first missing one are kept, ending on
  an assistant turn; the turns after it become ``dialogue_truncated`` rejects. A dialogue
  left without a (user, assistant) pair is rejected whole (``dialogue_incomplete``).
- A dialogue whose turns carry different ``split`` values (a ``split`` stage in speaker
  mode put its user and assistant turns apart) is rejected whole by a sink that writes
  per split (``by_split``): ``dialogue_mixed_splits`` (use ``split`` with ``mode:
  dialogue``).
- Turns that are not a user/assistant alternation starting with the user are rejected
  whole (``dialogue_invalid``); rows without ``dialogue_id``/``round``/``n_rounds`` are
  ``not_a_turn``.

Provenance: every synthetic export carries ``synthetic: true`` and what made it
(:func:`turn_provenance`, :func:`dialogue_provenance`): the LLM (from the ``synth``
JSON of the ``tts`` stage, else the turn's ``source``), the text source, and per turn the
TTS backend and version, the voice id and the voice source (``clone`` | ``preset`` |
``voice_match``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.records import reject
from speechmill.synth.text.turns import ROLES

#: the columns that make a row a dialogue turn
TURN_COLUMNS = ("id", "dialogue_id", "round", "n_rounds", "role")
#: provenance columns of ``tts`` rows (``synth``: JSON; ``source``: the text's JSON)
PROVENANCE_COLUMNS = ("synthetic", "synth", "source", "tts_backend", "tts_version",
                      "voice_id", "voice_source")
#: dialogue-level text columns (repeated on every turn)
DIALOGUE_COLUMNS = ("system", "topic", "persona", "language")


@dataclass
class Dialogue:
    """The kept turns of one dialogue (in round order) and how they were kept."""

    dialogue_id: str
    split: str | None
    turns: list[dict[str, Any]]
    n_rounds: int  # rounds the dialogue was made with
    truncated: bool = False

    @property
    def rounds(self) -> int:
        return len(self.turns)

    def pairs(self) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(user turn, assistant turn) pairs in order (a trailing user turn is left out)."""
        return [(self.turns[i], self.turns[i + 1]) for i in range(0, len(self.turns) - 1, 2)]


@dataclass
class Survey:
    """What a pass over the id columns found: dialogues split across splits, and the
    missing rounds of incomplete dialogues (with the upstream reason when known)."""

    mixed: dict[str, list[str]] = field(default_factory=dict)
    missing: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # turn id -> "stage reason"


def check_turn_columns(table: pa.Table, stage_id: str) -> None:
    """Fail fast when the input is not turn rows (no dialogue columns at all)."""
    if table.num_rows == 0:
        return
    missing = [c for c in TURN_COLUMNS if c not in table.column_names]
    if missing:
        raise ConfigError(f"the input has no {', '.join(missing)} column(s): dialogue sinks "
                          "read turn rows (the output of `tts`, or of tokenize/split after "
                          "it)", stage=stage_id, key="needs")


def _plain(col: Any) -> Any:
    if pa.types.is_dictionary(col.type):
        return col.cast(col.type.value_type)
    return col


def survey(table: pa.Table, run_dir: str | None = None, splits: bool = True) -> Survey:
    """Dialogues whose turns span several splits (when ``splits``: a sink that writes per
    split), and the rounds missing from incomplete dialogues, computed with Arrow (Python
    objects per incomplete dialogue only); the upstream reject reasons of the missing
    turns are read from ``run_dir`` when given."""
    out = Survey()
    if table.num_rows == 0 or any(c not in table.column_names for c in TURN_COLUMNS[1:4]):
        return out
    t = pa.table({"d": _plain(table.column("dialogue_id")).cast(pa.string()),
                  "r": table.column("round").cast(pa.int64()),
                  "n": table.column("n_rounds").cast(pa.int64())})
    t = t.filter(pc.and_(pc.is_valid(t.column("d")),
                         pc.and_(pc.is_valid(t.column("r")), pc.is_valid(t.column("n")))))
    if splits and "split" in table.column_names:
        s = pa.table({"d": _plain(table.column("dialogue_id")).cast(pa.string()),
                      "s": pc.fill_null(_plain(table.column("split")).cast(pa.string()), "")})
        g = s.group_by("d", use_threads=False).aggregate([("s", "count_distinct")])
        many = g.filter(pc.greater(g.column("s_count_distinct"), 1)).column("d")
        if len(many):
            sub = s.filter(pc.is_in(s.column("d"), value_set=many))
            pairs = sub.group_by(["d", "s"], use_threads=False).aggregate([])
            for d, sp in zip(pairs.column("d").to_pylist(), pairs.column("s").to_pylist(),
                             strict=True):
                out.mixed.setdefault(d, []).append(sp or "(none)")
            for d in out.mixed:
                out.mixed[d] = sorted(out.mixed[d])
    g = t.group_by("d", use_threads=False).aggregate(
        [("r", "count_distinct"), ("n", "max")])
    short = g.filter(pc.less(g.column("r_count_distinct"), g.column("n_max")))
    if short.num_rows:
        sub = t.filter(pc.is_in(t.column("d"), value_set=short.column("d")))
        have: dict[str, set[int]] = {}
        for d, r in zip(sub.column("d").to_pylist(), sub.column("r").to_pylist(), strict=True):
            have.setdefault(d, set()).add(int(r))
        for d, n in zip(short.column("d").to_pylist(), short.column("n_max").to_pylist(),
                        strict=True):
            out.missing[d] = [r for r in range(int(n)) if r not in have.get(d, set())]
    if out.missing and run_dir:
        ids = [f"{d}-{r:03d}" for d, rs in out.missing.items() for r in rs]
        out.reasons = upstream_reasons(run_dir, ids)
    return out


def upstream_reasons(run_dir: str, ids: Iterable[str]) -> dict[str, str]:
    """``id -> "stage reason"`` for the ``ids`` some stage of ``run_dir`` rejected (read
    from the rejects parts, only their id/stage/reason columns, filtered with Arrow). The
    run directory may be local or on object storage (read through its store)."""
    from speechmill.pipeline.store import open_store

    want = pa.array(sorted(set(ids)), pa.string())
    found: dict[str, str] = {}
    if not len(want):
        return found
    try:
        store = open_store(run_dir)
        stage_ids = store.stage_ids()
    except Exception:  # noqa: BLE001 - a detail is best effort, never an export failure
        return found
    for sid in stage_ids:
        try:
            t = store.read_rejects(sid, ["id", "stage", "reason"])
        except Exception:  # noqa: BLE001 - as above
            continue
        if t.num_rows == 0 or "id" not in t.column_names:
            continue
        t = t.filter(pc.fill_null(
            pc.is_in(t.column("id").cast(pa.string()), value_set=want), False))
        cols = [t.column(c).to_pylist() if c in t.column_names else [None] * t.num_rows
                for c in ("id", "stage", "reason")]
        for i, st, rs in zip(*cols, strict=True):
            found.setdefault(i, f"{st or sid} {rs}")
    return found


def iter_dialogues(table: pa.Table, stage_id: str, rejects: list[dict[str, Any]], *,
                   truncate_incomplete: bool = False, columns: Iterable[str] | None = None,
                   info: Survey | None = None, size: int = 1024) -> Iterator[Dialogue]:
    """The dialogues of ``table`` (one split, sorted by id: a sink's group), complete or
    truncated; every other turn goes to ``rejects`` (see the module docstring). Rows
    become Python dicts ``size`` at a time (``columns`` only, plus the turn columns)."""
    from speechmill.pipeline.row_slices import iter_rows

    info = info if info is not None else survey(table)
    cols = None if columns is None else list(dict.fromkeys([*TURN_COLUMNS, "split",
                                                            *columns]))
    group: list[dict[str, Any]] = []
    for row in iter_rows(table, cols, size=size):
        did = row.get("dialogue_id")
        if did is None or row.get("round") is None or row.get("n_rounds") is None:
            rejects.append(reject(row, stage_id, "not_a_turn",
                                  "no dialogue_id/round/n_rounds: dialogue sinks read turn "
                                  "rows"))
            continue
        if group and group[0]["dialogue_id"] != did:
            yield from _finish(group, stage_id, rejects, truncate_incomplete, info)
            group = []
        group.append(row)
    if group:
        yield from _finish(group, stage_id, rejects, truncate_incomplete, info)


def _missing_detail(did: str, missing: list[int], n: int, info: Survey,
                    roles: Mapping[int, str]) -> str:
    parts = []
    for r in missing:
        role = roles.get(r) or ROLES[r % 2]
        why = info.reasons.get(f"{did}-{r:03d}")
        parts.append(f"round {r} ({role})" + (f": {why}" if why else ""))
    return (f"dialogue {did}: {len(missing)} of {n} rounds missing: " + "; ".join(parts))


def _finish(group: list[dict[str, Any]], stage_id: str, rejects: list[dict[str, Any]],
            truncate: bool, info: Survey) -> Iterator[Dialogue]:
    did = str(group[0]["dialogue_id"])

    def reject_all(rows: Iterable[dict[str, Any]], reason: str, detail: str) -> None:
        for r in rows:
            rejects.append(reject(r, stage_id, reason, detail))

    if did in info.mixed:
        reject_all(group, "dialogue_mixed_splits",
                   f"dialogue {did} has turns in splits {', '.join(info.mixed[did])}: "
                   "split dialogues with `split` mode: dialogue")
        return
    n = max(int(r["n_rounds"]) for r in group)
    by_round: dict[int, dict[str, Any]] = {}
    for r in group:
        k = int(r["round"])
        if k < 0 or k >= n:
            rejects.append(reject(r, stage_id, "not_a_turn",
                                  f"round {k} outside 0..{n - 1} (n_rounds {n})"))
            continue
        if k in by_round:  # two rows for one round (other ids): the first one counts
            rejects.append(reject(r, stage_id, "duplicate", f"round {k} of dialogue {did} "
                                  f"already came as {by_round[k].get('id')}"))
            continue
        by_round[k] = r
    missing = [k for k in range(n) if k not in by_round]
    present = [by_round[k] for k in sorted(by_round)]
    split = group[0].get("split")
    roles = {k: str(r.get("role")) for k, r in by_round.items()}
    bad = _alternation(present)
    if bad is not None:
        reject_all(present, "dialogue_invalid", f"dialogue {did}: {bad}")
        return
    if not missing:
        yield Dialogue(did, split, present, n)
        return
    detail = _missing_detail(did, missing, n, info, roles)
    if not truncate:
        reject_all(present, "dialogue_incomplete", detail)
        return
    first = missing[0]
    keep = [by_round[k] for k in range(first)]
    if keep and keep[-1].get("role") != "assistant":
        keep = keep[:-1]
    if len(keep) < 2:
        reject_all(present, "dialogue_incomplete",
                   detail + f"; nothing to keep before round {first}")
        return
    kept = {int(r["round"]) for r in keep}
    reject_all([r for r in present if int(r["round"]) not in kept], "dialogue_truncated",
               f"truncated after round {len(keep) - 1}: " + detail)
    yield Dialogue(did, split, keep, n, truncated=True)


def _alternation(turns: list[dict[str, Any]]) -> str | None:
    for r in turns:
        k = int(r["round"])
        want = ROLES[k % 2]
        if r.get("role") != want:
            return f"round {k} is {r.get('role')!r}, expected {want!r}"
    return None


# -- provenance ----------------------------------------------------------------------------


def parse_json(v: Any) -> dict[str, Any]:
    """A JSON-object column value (string or struct) as a dict ({} otherwise)."""
    if isinstance(v, Mapping):
        return dict(v)
    if isinstance(v, str) and v.strip().startswith("{"):
        try:
            d = json.loads(v)
        except ValueError:
            return {}
        return d if isinstance(d, dict) else {}
    return {}


def _dig(d: Mapping[str, Any], *keys: str) -> Any:
    cur: Any = d
    for k in keys:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(k)
    return cur


def llm_name(v: Any) -> str | None:
    """The model named by an LLM provenance value (a name, or a mapping with ``model``);
    None when it names none (text imported from a dataset, not generated)."""
    if v is None or isinstance(v, str):
        return v or None
    if isinstance(v, Mapping):
        m = v.get("model") or v.get("name")
        return str(m) if m else None
    return str(v)


def turn_provenance(row: Mapping[str, Any]) -> dict[str, Any]:
    """What made one turn: ``synthetic`` (true unless the row says otherwise), ``llm``,
    ``text_source`` (the turn's ``source`` JSON), ``tts_backend``, ``tts_version``,
    ``voice_id``, ``voice_source`` and ``synth`` (the ``tts`` stage's JSON, as given)."""
    synth = parse_json(row.get("synth"))
    source = parse_json(row.get("source"))
    syn = row.get("synthetic")
    return {
        "synthetic": True if syn is None else bool(syn),
        "llm": llm_name(synth.get("llm")) or llm_name(source.get("model")),
        "text_source": source or None,
        "tts_backend": row.get("tts_backend") or _dig(synth, "tts", "backend")
        or synth.get("tts_backend"),
        "tts_version": row.get("tts_version") or _dig(synth, "tts", "version")
        or synth.get("tts_version"),
        "voice_id": row.get("voice_id") or row.get("speaker"),
        "voice_source": row.get("voice_source") or synth.get("voice_source"),
        "synth": synth or None,
    }


def tts_label(p: Mapping[str, Any]) -> str | None:
    """``"<backend> <version>"`` of a :func:`turn_provenance` (None when unknown)."""
    parts = [str(x) for x in (p.get("tts_backend"), p.get("tts_version")) if x]
    return " ".join(parts) or None


def dialogue_provenance(turns: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """A dialogue's provenance: ``synthetic`` (true when any turn is), the LLM and text
    source (first turn that names them), and per turn its round, role, TTS backend and
    version, voice id and voice source."""
    per = [(t, turn_provenance(t)) for t in turns]
    llm = next((p["llm"] for _, p in per if p["llm"]), None)
    text = next((p["text_source"] for _, p in per if p["text_source"]), None)
    return {
        "synthetic": any(p["synthetic"] for _, p in per) if per else True,
        "llm": llm,
        "text_source": text,
        "turns": [{"round": t.get("round"), "role": t.get("role"),
                   "tts_backend": p["tts_backend"], "tts_version": p["tts_version"],
                   "voice_id": p["voice_id"], "voice_source": p["voice_source"]}
                  for t, p in per],
    }


def user_voice(d: Dialogue) -> str | None:
    """The voice of the dialogue's user turns (the first one that names a voice)."""
    for t in d.turns:
        if t.get("role") == "user":
            v = t.get("voice_id") or t.get("speaker")
            if v:
                return str(v)
    return None
