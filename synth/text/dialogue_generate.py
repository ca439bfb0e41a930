"""Source stage ``dialogue_generate``: multi-turn dialogues written by an LLM.

The plan has one row per requested dialogue (``count``): a topic (topics are used in a
seeded shuffled order, evenly), a persona and a speaking style drawn with a seeded
random generator, and a round count in ``[min_turns, max_turns]`` (a round = one user
turn and the assistant's answer). Its id is a hash of (topic, persona, style, index,
seed, prompt version), so a rerun plans the same ids.

Each dialogue is one chat request through :class:`speechmill.synth.llm.client.LLMClient` with
structured output (``{"turns": [{"role", "text"}]}`` validated by pydantic, the round
count and the user/assistant alternation checked; a bad answer is asked again with the
error fed back). A kept dialogue passes content QC (:mod:`speechmill.synth.qc.text_qc`), the
optional LLM judge and the near-duplicate check (:mod:`speechmill.synth.text.dialogue_dedup`)
and becomes one row per turn (:func:`speechmill.synth.text.turns.turn_rows`; ``parent_id`` is
the plan row's id). The LLM usage of a dialogue (``llm_requests``, ``llm_cache_hits``,
``llm_prompt_tokens``, ``llm_completion_tokens``, ``llm_cost_usd``) is on its round-0 row
only (null on the others), so column sums are the stage's totals; a rejected dialogue's
usage is at the end of its reject detail (``[llm requests=... cost_usd=...]``).

Reject reasons: ``llm_error``, ``llm_invalid_output``, ``llm_refusal`` (from the client),
the ``qc_*`` reasons of the content QC (``qc_judge`` from the optional LLM judge,
:mod:`speechmill.synth.qc.text_judge`, whose scores go in the ``judge`` column) and
``near_duplicate``.

Transient and data rejects: ``llm_error`` is *transient* (``kind`` "transient": counted
toward the error budget, retried by a rerun) when the service failed after the client's
retries (connection refused, timeouts, 408/409/425/429/5xx; the generator's or the
judge's), and a *data* reject when the server answered 4xx or something that is not a
chat completion. ``llm_invalid_output`` (after the allowed re-asks), ``llm_refusal``,
``qc_*`` and ``near_duplicate`` are always data rejects. Reject details are redacted
(:func:`speechmill.pipeline.redact.redact_text`) before they are cut short.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any, ClassVar, Literal

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator

from speechmill.pipeline.records import reject, rejects_table, stable_hash
from speechmill.pipeline.redact import redact_text
from speechmill.pipeline.stage import Resources, Stage, StageConfig, StageContext, StageResult
from speechmill.synth.llm.client import LLMClient
from speechmill.synth.llm.config import LLMConfig, estimate
from speechmill.synth.llm.conversation import (
    ChatRequest,
    ChatResult,
    add_usage,
    estimate_tokens,
)
from speechmill.synth.llm.usage import (
    committed_usage,
    usage_columns,
    usage_line,
    usage_tail,
    usage_values,
)
from speechmill.synth.qc.text_judge import (
    JudgeConfig,
    judge_column,
    judge_request,
    judge_transient,
    judge_verdict,
)
from speechmill.synth.qc.text_qc import TextQCConfig, qc_dialogue
from speechmill.synth.text.turns import alternation_error, dialogue_id, turn_rows

#: bump when the prompt templates' meaning changes (it is part of every id and cache key)
PROMPT_VERSION = "dialogue_generate/1"

DEFAULT_SYSTEM_PROMPT = (
    "You write realistic spoken conversations between a user and a voice assistant, "
    "for training speech models. Everything is said aloud: no markdown, lists, tables, "
    "code, URLs, emoji or stage directions; numbers, dates and units as a person would "
    "say them. The user talks naturally (short sentences, the odd filler or "
    "self-correction); the assistant is helpful, warm and concise (one to four "
    "sentences a turn). Reply with JSON only."
)

DEFAULT_USER_PROMPT = (
    "Write a conversation in {language_name} of exactly {rounds} rounds (a round is one "
    "user turn followed by one assistant turn, so {n_turns} turns in all, starting with "
    "the user).\n"
    "Topic: {topic}\n"
    "The user: {persona}\n"
    "Style: {style}\n"
    "{instruction}"
    'Answer as JSON: {{"turns": [{{"role": "user", "text": "..."}}, '
    '{{"role": "assistant", "text": "..."}}, ...]}}'
)

DEFAULT_PERSONA = "a curious adult"
DEFAULT_STYLE = "casual and friendly"

_LANGUAGE_NAMES = {
    "en": "English", "de": "German", "fr": "French", "es": "Spanish", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "pl": "Polish", "ru": "Russian", "uk": "Ukrainian",
    "cs": "Czech", "sv": "Swedish", "da": "Danish", "no": "Norwegian", "fi": "Finnish",
    "tr": "Turkish", "ar": "Arabic", "he": "Hebrew", "hi": "Hindi", "zh": "Chinese",
    "ja": "Japanese", "ko": "Korean", "vi": "Vietnamese", "th": "Thai",
    "id": "Indonesian", "el": "Greek", "hu": "Hungarian", "ro": "Romanian",
}

_USAGE_PREFIX = "llm_"
_USAGE_COLUMNS = usage_columns(_USAGE_PREFIX)


class TurnOut(BaseModel):
    role: Literal["user", "assistant"]
    text: str = Field(..., min_length=1)


class DialogueOut(BaseModel):
    """What the LLM must answer."""

    turns: list[TurnOut] = Field(..., min_length=2)


class DialogueGenerateConfig(StageConfig):
    topics: str | list[str | dict[str, Any]] = Field(
        ..., description="topics: a file (YAML/JSON/JSONL/CSV/TSV/txt) or an inline list; "
        "an entry is a topic string or a mapping with topic and optional persona, style, "
        "instruction; a YAML mapping may also hold personas: and styles: lists")
    personas: str | list[str] | None = Field(
        None, description="user personas (a file or a list) drawn per dialogue")
    styles: str | list[str] | None = Field(
        None, description="speaking styles (a file or a list) drawn per dialogue")
    count: int = Field(..., ge=1, description="dialogues to generate")
    min_turns: int = Field(2, ge=1, description="fewest rounds (user + assistant turns)")
    max_turns: int = Field(4, ge=1, description="most rounds")
    language: str = Field("en", description="ISO 639-1 code of the dialogues")
    seed: int = Field(0, description="sampling of topics/personas/styles/rounds and the "
                      "per-dialogue LLM seed (llm.seed + index)")
    llm: LLMConfig
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    user_prompt: str = Field(
        DEFAULT_USER_PROMPT, description="template: {topic} {persona} {style} "
        "{instruction} {rounds} {n_turns} {language} {language_name}")
    dialogue_system_prompt: str | None = Field(
        None, description="system prompt stored with each dialogue (column 'system')")
    dedup_threshold: float | None = Field(
        0.8, gt=0, le=1, description="reject a dialogue whose word n-gram Jaccard "
        "similarity (MinHash) to a kept one reaches this; null: off")
    dedup_ngram: int = Field(3, ge=1)
    qc: TextQCConfig = Field(default_factory=TextQCConfig)
    judge: JudgeConfig | None = Field(
        None, description="optional LLM-as-judge (coherence/naturalness 1-5): a second "
        "request per dialogue; see speechmill.synth.qc.text_judge")

    @field_validator("language")
    @classmethod
    def _lang(cls, v: str) -> str:
        return v.strip().lower()


# -- inputs ----------------------------------------------------------------------------------


def _read_entries(spec: str | list[Any], what: str) -> tuple[list[Any], dict[str, Any]]:
    """Entries of a list-or-file key, plus extra lists a YAML/JSON mapping holds."""
    if isinstance(spec, list):
        return list(spec), {}
    import fsspec

    path = str(spec)
    with fsspec.open(path, "rt", encoding="utf-8-sig") as f:
        text = f.read()
    ext = Path(path.split("?")[0]).suffix.lower()
    extra: dict[str, Any] = {}
    if ext in (".yaml", ".yml", ".json"):
        import yaml

        doc = yaml.safe_load(text)
        if isinstance(doc, dict):
            extra = {k: v for k, v in doc.items() if k in ("personas", "styles")}
            doc = doc.get(what)
        if not isinstance(doc, list):
            raise ValueError(f"key {what!r}: {path!r} holds no list of {what}")
        return doc, extra
    if ext == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"key {what!r}: {path!r} line {i + 1}: {e}") from None
        return out, {}
    if ext in (".csv", ".tsv"):
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if ext == ".tsv"
                                   else ","))
        return rows, {}
    return [ln.strip() for ln in text.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")], {}


def _entry(e: Any, what: str, i: int) -> dict[str, str | None]:
    if isinstance(e, str):
        return {"topic": e.strip()}
    if isinstance(e, dict):
        keys = {"topic", "persona", "style", "instruction"}
        main = e.get("topic") or e.get("instruction") or e.get("text")
        if not main:
            raise ValueError(f"key {what!r}: entry {i + 1} has no topic/instruction")
        out = {k: (str(e[k]).strip() if e.get(k) not in (None, "") else None) for k in keys}
        out["topic"] = str(main).strip()
        return out
    raise ValueError(f"key {what!r}: entry {i + 1} is {type(e).__name__}, not a string "
                     "or a mapping")


def _strings(spec: str | list[str] | None, what: str, extra: Any) -> list[str]:
    if spec is None:
        spec = extra
    if spec is None:
        return []
    entries, _ = _read_entries(spec, what)
    out = []
    for i, e in enumerate(entries):
        if isinstance(e, dict):
            e = e.get(what[:-1]) or e.get("text") or e.get("name")
        if not isinstance(e, str) or not e.strip():
            raise ValueError(f"key {what!r}: entry {i + 1} is not a non-empty string")
        out.append(e.strip())
    return out


def _rng(*parts: Any) -> random.Random:
    return random.Random(stable_hash(*parts))


def prompt_version(config: DialogueGenerateConfig) -> str:
    """Hash of what the prompts say (templates, schema, language, the dialogue system
    prompt): part of every id and cache key."""
    doc = json.dumps([PROMPT_VERSION, config.system_prompt, config.user_prompt,
                      DialogueOut.model_json_schema(), config.min_turns, config.max_turns],
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:12]


def plan_rows(config: DialogueGenerateConfig) -> list[dict[str, Any]]:
    """The dialogues to generate (deterministic from the config)."""
    raw, extra = _read_entries(config.topics, "topics")
    topics = [_entry(e, "topics", i) for i, e in enumerate(raw)]
    if not topics:
        raise ValueError("key 'topics': no topics")
    personas = _strings(config.personas, "personas", extra.get("personas")) or [
        DEFAULT_PERSONA]
    styles = _strings(config.styles, "styles", extra.get("styles")) or [DEFAULT_STYLE]
    pv = prompt_version(config)
    order: list[int] = []
    rows = []
    for i in range(config.count):
        if not order:  # each pass over the topics in a new seeded order
            order = list(range(len(topics)))
            _rng("topics", config.seed, i).shuffle(order)
        t = topics[order.pop(0)]
        rng = _rng("dialogue", config.seed, i)
        persona = t.get("persona") or rng.choice(personas)
        style = t.get("style") or rng.choice(styles)
        rounds = rng.randint(config.min_turns, config.max_turns)
        topic = t["topic"] or ""
        rows.append({
            "id": dialogue_id(topic, persona, style, str(i), str(config.seed), pv),
            "index": i,
            "topic": topic,
            "persona": persona,
            "style": style,
            "instruction": t.get("instruction"),
            "rounds": rounds,
            "language": config.language,
        })
    return rows


_PLAN_SCHEMA = pa.schema([("id", pa.string()), ("index", pa.int64()),
                          ("topic", pa.string()), ("persona", pa.string()),
                          ("style", pa.string()), ("instruction", pa.string()),
                          ("rounds", pa.int32()), ("language", pa.string())])


class DialogueGenerate(Stage):
    #: its LLM cache and dedup index live under RUN_DIR by local path (URL run dirs: refused)
    local_run_dir_only: ClassVar[bool] = True
    name = "dialogue_generate"
    description = ("source: multi-turn user/assistant dialogues from an LLM (topics x "
                   "personas x styles), validated, QC'd and near-deduplicated")
    Config = DialogueGenerateConfig
    resources = Resources(cpus=1)
    is_source = True
    unique_output_ids = False
    default_batch_size = 64
    summary_columns: ClassVar[tuple[str, ...] | None] = ("dialogue_id", "round",
                                                          *_USAGE_COLUMNS)

    config: DialogueGenerateConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, DialogueGenerateConfig)
        if config.min_turns > config.max_turns:
            raise ValueError("key 'with.min_turns': larger than max_turns")
        config.llm.check()
        if config.judge is not None:
            config.judge.llm.check()
        try:
            config.user_prompt.format(**_prompt_fields({}, config))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"key 'with.user_prompt': bad placeholder {e}") from None

    def __init__(self, config: StageConfig, ctx: StageContext) -> None:
        super().__init__(config, ctx)
        self.client: LLMClient | None = None
        self.judge_client: LLMClient | None = None
        self.claims: Any = None
        self._pv: str | None = None

    @property
    def pv(self) -> str:
        """This config's prompt version (computed once: it hashes a JSON schema)."""
        if self._pv is None:
            self._pv = prompt_version(self.config)
        return self._pv

    # -- plan ------------------------------------------------------------------------------
    def plan(self) -> pa.Table:
        return pa.Table.from_pylist(plan_rows(self.config), schema=_PLAN_SCHEMA)

    @classmethod
    def cache_dir(cls, run_dir: str | Path, stage_id: str) -> Path:
        return Path(run_dir) / "cache" / "llm" / stage_id

    # -- work ------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.config
        cache = self.cache_dir(self.ctx.run_dir, self.ctx.stage_id)
        self.client = LLMClient(cfg.llm, cache, self.ctx.stage_id)
        if cfg.judge is not None:
            self.judge_client = LLMClient(cfg.judge.llm, cache, self.ctx.stage_id)
        if cfg.dedup_threshold is not None:
            from speechmill.synth.text.dialogue_dedup import ClaimIndex

            d = Path(self.ctx.run_dir) / "stages" / self.ctx.stage_id / "_dedup"
            self.claims = ClaimIndex(d, cfg.dedup_threshold)

    def teardown(self) -> None:
        for c in (self.client, self.judge_client):
            if c is not None:
                c.close()
        self.client = self.judge_client = None

    def request(self, row: dict[str, Any]) -> ChatRequest:
        return build_request(self.config, row, self.pv)

    def process(self, batch: pa.Table) -> StageResult:
        if self.client is None:
            self.setup()
        assert self.client is not None
        cfg = self.config
        sid = self.ctx.stage_id
        rows = batch.to_pylist()
        results = self.client.run([self.request(r) for r in rows])
        rejects: list[dict[str, Any]] = []
        kept: list[tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]] = []
        for row, res in zip(rows, results, strict=True):
            if not res.ok:
                rejects.append(reject(row, sid, res.reason or "llm_error",
                                      redact_text(res.detail or "", limit=1700)
                                      + usage_tail(res.usage), transient=res.transient))
                continue
            turns = [t.model_dump() for t in res.parsed.turns]
            turns, reason, detail = qc_dialogue(turns, cfg.qc, cfg.language)
            if reason is not None:
                rejects.append(reject(row, sid, reason, detail[:1700] + usage_tail(res.usage)))
                continue
            kept.append((row, turns, dict(res.usage)))
        scores: dict[str, dict[str, Any]] = {}
        if cfg.judge is not None and kept:
            kept, scores = self._judge(kept, rejects)
        if self.claims is not None and kept:
            from speechmill.synth.text.dialogue_dedup import signature

            verdicts = self.claims.claim([
                (row["id"], signature(" ".join(t["text"] for t in turns), cfg.dedup_ngram))
                for row, turns, _ in kept])
            still = []
            for row, turns, usage in kept:
                v = verdicts.get(row["id"])
                if v is not None:
                    rejects.append(reject(row, sid, "near_duplicate",
                                          f"similarity {v[1]:.2f} >= {cfg.dedup_threshold:g} "
                                          f"with dialogue {v[0]}" + usage_tail(usage)))
                else:
                    still.append((row, turns, usage))
            kept = still
        outputs: list[dict[str, Any]] = []
        for row, turns, usage in kept:
            outputs.extend(self._rows(row, turns, usage, scores.get(row["id"]), self.pv))
        return StageResult(self.outputs_table(outputs), rejects_table(rejects))

    def _rows(self, row: dict[str, Any], turns: list[dict[str, Any]], usage: dict[str, Any],
              score: dict[str, Any] | None, pv: str) -> list[dict[str, Any]]:
        cfg = self.config
        source = {"generator": self.name, "model": cfg.llm.model, "prompt_version": pv,
                  "seed": _llm_seed(cfg, row), "plan_seed": cfg.seed, "index": row["index"],
                  "style": row["style"]}
        if row.get("instruction"):
            source["instruction"] = row["instruction"]
        out = turn_rows(row["id"], turns, parent_id=row["id"], language=cfg.language,
                        system=cfg.dialogue_system_prompt, topic=row["topic"],
                        persona=row["persona"], source=source)
        for i, r in enumerate(out):
            r["style"] = row["style"]
            r.update(usage_values(usage, _USAGE_PREFIX) if i == 0 else
                     dict.fromkeys(_USAGE_COLUMNS))
            r["judge"] = judge_column(score)
        return out

    def _judge(self, kept: list[tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]],
               rejects: list[dict[str, Any]]
               ) -> tuple[list[tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]],
                          dict[str, dict[str, Any]]]:
        """Score ``kept`` with the judge; the low ones and the unscored go to
        ``rejects``."""
        cfg = self.config
        assert cfg.judge is not None and self.judge_client is not None
        results: list[ChatResult] = self.judge_client.run([
            judge_request(row["id"], turns, cfg.dialogue_system_prompt, cfg.language)
            for row, turns, _ in kept])
        out = []
        scores: dict[str, dict[str, Any]] = {}
        for (row, turns, usage), res in zip(kept, results, strict=True):
            add_usage(usage, res.usage)
            record, reason, detail = judge_verdict(res, cfg.judge)
            if reason is not None:
                rejects.append(reject(row, self.ctx.stage_id, reason,
                                      redact_text(f"judge: {detail}", limit=1700)
                                      + usage_tail(usage), transient=judge_transient(res)))
                continue
            assert record is not None
            scores[row["id"]] = record
            out.append((row, turns, usage))
        return out, scores

    # -- summary ---------------------------------------------------------------------------
    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        n_dialogues = 0
        if outputs.num_rows and "dialogue_id" in outputs.column_names:
            import pyarrow.compute as pc

            n_dialogues = pc.count_distinct(outputs.column("dialogue_id")).as_py()
        return {"dialogues": int(n_dialogues), "turns": int(outputs.num_rows),
                "llm": committed_usage(outputs, rejects, _USAGE_PREFIX)}

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        return [f"{summary.get('dialogues', 0)} dialogues, {summary.get('turns', 0)} turns",
                usage_line(summary.get("llm") or {})]

    # -- dry run ---------------------------------------------------------------------------
    @classmethod
    def dry_run(cls, config: StageConfig, run_dir: str | Path | None = None,
                stage_id: str = "dialogue_generate") -> dict[str, Any]:
        """What the stage would send, before anything is spent: requests, prompt tokens
        (from the real prompts), completion tokens (expected: about 45 tokens a turn;
        and at most: ``max_tokens`` each) and the estimated cost. With ``run_dir``,
        requests the run's cache already answers are left out (``cached``)."""
        assert isinstance(config, DialogueGenerateConfig)
        cls.validate_config(config)
        rows = plan_rows(config)
        pv = prompt_version(config)
        cache = None
        client = None
        if run_dir is not None and cls.cache_dir(run_dir, stage_id).is_dir():
            client = LLMClient(config.llm, cls.cache_dir(run_dir, stage_id), stage_id)
            cache = client.cache
        prompt = completion = n = cached = 0
        for r in rows:
            req = build_request(config, r, pv)
            if client is not None and cache is not None:
                from speechmill.synth.llm.conversation import Conversation

                conv = Conversation(req, client.start_format())
                if client.key(conv, client.body(conv)) in cache:
                    cached += 1
                    continue
            n += 1
            prompt += estimate_tokens(req.messages)
            completion += min(config.llm.max_tokens, 45 * 2 * int(r["rounds"]) + 10)
        per_p = prompt // n if n else 0
        per_c = completion // n if n else 0
        out = estimate(config.llm, n, per_p, per_c)
        out.update(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion, dialogues=len(rows), cached=cached)
        if out["cost_usd"] is not None:
            out["cost_usd"] = round(config.llm.cost(prompt, completion,
                                                    config.llm.batch_api), 6)
        worst = estimate(config.llm, n, per_p, config.llm.max_tokens)
        out["completion_tokens_max"] = worst["completion_tokens"]
        out["cost_usd_max"] = (None if worst["cost_usd"] is None else round(
            config.llm.cost(prompt, n * config.llm.max_tokens, config.llm.batch_api), 6))
        if config.judge is not None:
            out["judge"] = estimate(config.judge.llm, n, per_c + 200, 40)
        return out


def _language_name(code: str) -> str:
    return _LANGUAGE_NAMES.get(code, code)


def _prompt_fields(row: dict[str, Any], config: DialogueGenerateConfig) -> dict[str, Any]:
    rounds = int(row.get("rounds") or config.min_turns)
    instr = row.get("instruction")
    return {
        "topic": row.get("topic") or "",
        "persona": row.get("persona") or DEFAULT_PERSONA,
        "style": row.get("style") or DEFAULT_STYLE,
        "instruction": f"Include: {instr}\n" if instr else "",
        "rounds": rounds,
        "n_turns": 2 * rounds,
        "language": config.language,
        "language_name": _language_name(config.language),
    }


def _llm_seed(config: DialogueGenerateConfig, row: dict[str, Any]) -> int | None:
    return None if config.llm.seed is None else config.llm.seed + int(row["index"])


def build_request(config: DialogueGenerateConfig, row: dict[str, Any], pv: str
                  ) -> ChatRequest:
    """The chat request of plan row ``row``."""
    lo, hi = config.min_turns, config.max_turns

    def check(d: DialogueOut) -> None:
        n = len(d.turns)
        err = alternation_error([t.model_dump() for t in d.turns])
        if err is not None:
            raise ValueError(f"turns must alternate user/assistant starting with the user: "
                             f"{err}")
        if n % 2:
            raise ValueError(f"{n} turns: the last turn must be the assistant's")
        if not lo <= n // 2 <= hi:
            raise ValueError(f"{n // 2} rounds; between {lo} and {hi} were asked for "
                             f"({row.get('rounds')} rounds = {2 * int(row['rounds'])} turns)")

    seed = _llm_seed(config, row)
    return ChatRequest(
        key=str(row["id"]),
        messages=[{"role": "system", "content": config.system_prompt},
                  {"role": "user", "content": config.user_prompt.format(
                      **_prompt_fields(row, config))}],
        schema=DialogueOut,
        validate=check,
        prompt_version=pv,
        overrides={} if seed is None else {"seed": seed},
    )
