"""Stage ``filter``: drop segments by configurable rules over the scores.

Each rule is a reject reason; the detail names the rule, the value and the threshold
(``dnsmos_ovrl 2.41 < 3.0``). Rules run in a fixed order and the first failing rule is
the reason. Defaults follow Emilia-Pipe (3-30 s, DNSMOS OVRL >= 3.0, per-file speaking
rate inside Q1-1.5*IQR..Q3+1.5*IQR). ``dry_run: true`` keeps every row and records in
``filter_would_reject`` what each rule would drop, with counts and hours per rule in
``metrics.json`` (``stage_summary``), so thresholds can be tuned before dropping.

A score that was not measured is null (e.g. ``lid_prob`` from an English-only model or a
fixed ``language``: no language detection ran). A rule never judges a null score: the row
is not rejected by that rule, its output row lists the rule in ``filter_unmeasured``, and
the summary counts such rows per rule under ``unmeasured``. Validation refuses language
rules (``allowed_languages``, ``min_language_prob``) whose upstream ``transcribe`` cannot
measure them (an English-only model; a fixed ``language`` for ``min_language_prob``).

The per-file speaking-rate rule needs every segment of a file at once: the engine's
``prepare`` pass computes each file's quartiles over the whole input before any batch
(files are keyed by the recording id, the part of a segment id before the first ``-``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field

from speechmill.pipeline.records import recording_id
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig, StageContext

RULES = ("too_short", "too_long", "clipping", "low_bandwidth", "low_snr", "low_dnsmos",
         "too_few_chars", "language_not_allowed", "low_language_prob", "lid_mismatch",
         "hallucination", "low_asr_confidence", "speaking_rate_outlier")
#: score rules: (config key of a threshold, the score it reads); a row whose scores are
#: null for every configured threshold of a rule is unmeasured for that rule
RULE_SCORES: dict[str, tuple[tuple[str, str], ...]] = {
    "clipping": (("max_clipping_ratio", "clipping_ratio"),),
    "low_bandwidth": (("min_bandwidth_hz", "bandwidth_hz"),),
    "low_snr": (("min_snr_db", "snr_db"),),
    "low_dnsmos": (("min_dnsmos_ovrl", "dnsmos_ovrl"),),
    "low_language_prob": (("min_language_prob", "lid_prob"),),
    "low_asr_confidence": (("min_asr_avg_logprob", "asr_avg_logprob"),
                           ("min_word_prob", "asr_mean_word_prob")),
}


class FilterConfig(StageConfig):
    min_duration_s: float | None = Field(3.0, ge=0, description="Emilia: 3 s")
    max_duration_s: float | None = Field(30.0, gt=0, description="Emilia: 30 s")
    min_chars: int | None = Field(1, ge=0, description="characters of text (no spaces)")
    allowed_languages: list[str] = Field(default_factory=list, description="ASR language")
    min_language_prob: float | None = Field(
        None, ge=0, le=1, description="ASR language-ID probability (scores.lid_prob); needs "
        "a multilingual model detecting the language. Null lid_prob: not judged, counted "
        "as unmeasured"
    )
    require_lid_agreement: bool = Field(True, description="text LID must match ASR language")
    lid_min_chars: int = Field(
        20, ge=0, description="text LID is trusted only on transcripts this long"
    )
    reject_hallucinations: bool = True
    min_asr_avg_logprob: float | None = Field(
        -0.7, description="ASR confidence (Whisper's own cut is -1.0). Calibrated on tiny.en: "
        "English -0.22..-0.64, foreign speech -0.75..-1.29; tune per model with dry_run"
    )
    min_word_prob: float | None = Field(
        0.72, ge=0, le=1, description="mean word probability (tiny.en: English >= 0.76, "
        "foreign <= 0.71)"
    )
    min_dnsmos_ovrl: float | None = Field(3.0, description="Emilia: 3.0; TTS speech scores lower")
    min_snr_db: float | None = None
    max_clipping_ratio: float | None = Field(0.01, ge=0, le=1)
    min_bandwidth_hz: float | None = None
    speaking_rate_iqr: bool = Field(True, description="per-file Q1-k*IQR..Q3+k*IQR rule")
    iqr_k: float = Field(1.5, gt=0)
    min_segments_for_iqr: int = Field(4, ge=2, description="files with fewer skip the rule")
    dry_run: bool = Field(False, description="drop nothing; report what would be dropped")


class Filter(Stage):
    name = "filter"
    description = "drop segments by rules over the scores (each rule a reject reason)"
    Config = FilterConfig
    resources = Resources(cpus=1)
    default_batch_size = 256

    config: FilterConfig

    prepare_columns = ("id", "scores")

    @classmethod
    def validate_dag(cls, config: StageConfig,
                     upstream: dict[str, tuple[type[Stage], StageConfig]]) -> None:
        """Language rules need an upstream stage that measures what they read."""
        assert isinstance(config, FilterConfig)
        for sid, (up_cls, up_cfg) in upstream.items():
            check = getattr(up_cls, "check_language_rules", None)
            if check is not None:
                check(up_cfg, allowed_languages=config.allowed_languages,
                      min_language_prob=config.min_language_prob, upstream_id=sid)

    @classmethod
    def prepare(cls, config: StageConfig, inputs: pa.Table,
                ctx: StageContext | None = None) -> Any:
        assert isinstance(config, FilterConfig)
        if not config.speaking_rate_iqr or "scores" not in inputs.column_names:
            return None
        rates: dict[str, list[float]] = defaultdict(list)
        for rid, sc in zip(inputs.column("id").to_pylist(),
                           inputs.column("scores").to_pylist(), strict=True):
            r = (sc or {}).get("chars_per_s")
            if r is not None and math.isfinite(r):
                rates[recording_id(rid)].append(float(r))
        bounds = {}
        for rec, vals in rates.items():
            if len(vals) >= config.min_segments_for_iqr:
                q1, q3 = np.percentile(vals, [25, 75])
                iqr = q3 - q1
                bounds[rec] = (float(q1 - config.iqr_k * iqr), float(q3 + config.iqr_k * iqr))
        return {"rate_bounds": bounds}

    def verdicts(self, row: dict[str, Any]) -> list[tuple[str, str]]:
        """Every failing rule as (reason, detail), in rule order."""
        c = self.config
        sc = row.get("scores") or {}
        out: list[tuple[str, str]] = []
        dur = float(row.get("duration") or 0.0)
        if c.min_duration_s is not None and dur < c.min_duration_s:
            out.append(("too_short", f"duration {dur:.2f} s < {c.min_duration_s}"))
        if c.max_duration_s is not None and dur > c.max_duration_s:
            out.append(("too_long", f"duration {dur:.2f} s > {c.max_duration_s}"))
        # audio faults first (their text is a symptom), then text rules
        v = sc.get("clipping_ratio")
        if c.max_clipping_ratio is not None and v is not None and v > c.max_clipping_ratio:
            out.append(("clipping", f"clipping_ratio {v:.4f} > {c.max_clipping_ratio}"))
        _min(out, "low_bandwidth", "bandwidth_hz", sc.get("bandwidth_hz"), c.min_bandwidth_hz)
        _min(out, "low_snr", "snr_db", sc.get("snr_db"), c.min_snr_db)
        _min(out, "low_dnsmos", "dnsmos_ovrl", sc.get("dnsmos_ovrl"), c.min_dnsmos_ovrl)
        text = row.get("text") or ""
        n_chars = sum(1 for ch in text if ch.isalnum())
        if c.min_chars is not None and n_chars < c.min_chars:
            out.append(("too_few_chars", f"chars {n_chars} < {c.min_chars}"))
        lang = row.get("language")
        if c.allowed_languages and lang not in c.allowed_languages:
            out.append(("language_not_allowed",
                        f"language {lang} not in {','.join(c.allowed_languages)}"))
        _min(out, "low_language_prob", "lid_prob", sc.get("lid_prob"), c.min_language_prob)
        if (c.require_lid_agreement and row.get("lid_agrees") is False
                and n_chars >= c.lid_min_chars):
            out.append(("lid_mismatch",
                        f"text language {row.get('text_language')} != ASR language {lang}"))
        if c.reject_hallucinations and row.get("hallucination"):
            out.append(("hallucination",
                        f"hallucination: {row.get('hallucination_reason') or 'signals'}"))
        lp, wp = sc.get("asr_avg_logprob"), sc.get("asr_mean_word_prob")
        if c.min_asr_avg_logprob is not None and lp is not None and lp < c.min_asr_avg_logprob:
            out.append(("low_asr_confidence",
                        f"asr_avg_logprob {lp:.2f} < {c.min_asr_avg_logprob}"))
        elif c.min_word_prob is not None and wp is not None and wp < c.min_word_prob:
            out.append(("low_asr_confidence",
                        f"asr_mean_word_prob {wp:.2f} < {c.min_word_prob}"))
        bounds = ((self.ctx.prepared or {}).get("rate_bounds") or {}).get(
            recording_id(row["id"]))
        rate = sc.get("chars_per_s")
        if c.speaking_rate_iqr and bounds and rate is not None and not (
                bounds[0] <= rate <= bounds[1]):
            out.append(("speaking_rate_outlier",
                        f"chars_per_s {rate:.2f} outside [{bounds[0]:.2f}, {bounds[1]:.2f}] "
                        "of its file"))
        return out

    def unmeasured(self, row: dict[str, Any]) -> list[str]:
        """The configured score rules that could not judge ``row``: their scores are null
        (or NaN), so the row passes them unjudged."""
        sc = row.get("scores") or {}
        out = []
        for rule, checks in RULE_SCORES.items():
            scores = [key for attr, key in checks if getattr(self.config, attr) is not None]
            if scores and not any(_finite(sc.get(k)) for k in scores):
                out.append(rule)
        return out

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        fails = self.verdicts(row)
        if self.config.dry_run:
            return {**row, "parent_id": row["id"],
                    "filter_would_reject": [r for r, _ in fails],
                    "filter_unmeasured": self.unmeasured(row)}
        if fails:
            raise Reject(*fails[0])
        return {**row, "parent_id": row["id"], "filter_unmeasured": self.unmeasured(row)}

    summary_columns = ("id", "duration", "filter_would_reject", "filter_unmeasured")

    @classmethod
    def summarize(cls, outputs: pa.Table, rejects: pa.Table) -> dict[str, Any] | None:
        """Rows and hours per rule, aggregated with Arrow (no Python object per row)."""
        import pyarrow.compute as pc

        def dur(t: pa.Table) -> Any:
            return pc.fill_null(t.column("duration").cast(pa.float64()), 0.0) \
                if "duration" in t.column_names else pa.array(np.zeros(t.num_rows))

        if "filter_would_reject" in outputs.column_names:  # dry run
            col = outputs.column("filter_would_reject").combine_chunks() \
                if outputs.num_rows else pa.array([], pa.list_(pa.string()))
            d = dur(outputs)
            parents = pc.list_parent_indices(col)
            hits = pa.table({"reason": pc.list_flatten(col), "duration": pc.take(d, parents)})
            n_rules = pc.fill_null(pc.list_value_length(col), 0)
            kept_s = pc.sum(pc.filter(d, pc.equal(n_rules, 0))).as_py() or 0.0
            mode = "dry_run"
        else:
            hits = pa.table({"reason": rejects.column("reason"), "duration": dur(rejects)}) \
                if rejects.num_rows else pa.table({"reason": pa.array([], pa.string()),
                                                   "duration": pa.array([], pa.float64())})
            kept_s = (pc.sum(dur(outputs)).as_py() or 0.0) if outputs.num_rows else 0.0
            mode = "filter"
        unmeasured = pa.table({"reason": pa.array([], pa.string()),
                               "duration": pa.array([], pa.float64())})
        if "filter_unmeasured" in outputs.column_names and outputs.num_rows:
            col = outputs.column("filter_unmeasured").combine_chunks()
            if not pa.types.is_null(col.type):
                unmeasured = pa.table({"reason": pc.list_flatten(col), "duration": pc.take(
                    dur(outputs), pc.list_parent_indices(col))})
        return {"mode": mode, "hours_kept": float(kept_s) / 3600,
                "rules": _per_reason(hits), "unmeasured": _per_reason(unmeasured)}

    @classmethod
    def summary_lines(cls, summary: dict[str, Any]) -> list[str]:
        verb = "would drop" if summary.get("mode") == "dry_run" else "dropped"
        lines = [f"hours kept: {summary['hours_kept']:.3f}"]
        for rule, e in summary.get("rules", {}).items():
            lines.append(f"{rule}: {verb} {int(e['rows'])} segments, {e['hours']:.3f} h")
        for rule, e in summary.get("unmeasured", {}).items():
            what = "/".join(key for _, key in RULE_SCORES.get(rule, ()))
            lines.append(f"{rule}: {int(e['rows'])} segments not judged ({what} not "
                         "measured)")
        return lines


def _per_reason(hits: pa.Table) -> dict[str, dict[str, float]]:
    """{reason: {rows, hours}} of a (reason, duration) table, sorted by reason."""
    per: dict[str, dict[str, float]] = {}
    if hits.num_rows:
        g = hits.group_by("reason", use_threads=False).aggregate(
            [("reason", "count"), ("duration", "sum")])
        for r, n, s in zip(g.column("reason").to_pylist(), g.column("reason_count").to_pylist(),
                           g.column("duration_sum").to_pylist(), strict=True):
            per[r] = {"rows": int(n), "hours": float(s or 0.0) / 3600}
    return dict(sorted(per.items()))


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _min(out: list[tuple[str, str]], reason: str, key: str, value: float | None,
         threshold: float | None) -> None:
    if threshold is not None and value is not None and value < threshold:
        out.append((reason, f"{key} {value:.2f} < {threshold}"))
