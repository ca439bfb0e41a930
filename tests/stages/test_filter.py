"""Stage filter: every rule at its threshold boundary, per-file IQR, dry run."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from speechmill.pipeline.stage import StageContext
from speechmill.stages.filter import Filter, FilterConfig


def make(prepared: Any = None, **cfg: Any) -> Filter:
    return Filter(FilterConfig(**cfg), StageContext("filter", "/tmp/x", prepared=prepared))


def row(**kw: Any) -> dict[str, Any]:
    base = {"id": "rec1-00000000-00005000", "duration": 5.0, "text": "hello there",
            "language": "en", "scores": {"dnsmos_ovrl": 3.5, "snr_db": 30.0,
                                         "clipping_ratio": 0.0, "bandwidth_hz": 8000.0,
                                         "chars_per_s": 2.0}}
    scores = {**base["scores"], **kw.pop("scores", {})}
    return {**base, **kw, "scores": scores}


def reasons(f: Filter, r: dict[str, Any]) -> list[str]:
    return [x for x, _ in f.verdicts(r)]


@pytest.mark.parametrize(
    ("cfg", "ok_row", "bad_row", "reason"),
    [
        ({"min_duration_s": 3.0}, {"duration": 3.0}, {"duration": 2.99}, "too_short"),
        ({"max_duration_s": 30.0}, {"duration": 30.0}, {"duration": 30.01}, "too_long"),
        ({"min_chars": 3}, {"text": "a b c"}, {"text": "a b"}, "too_few_chars"),
        ({"allowed_languages": ["en", "de"]}, {"language": "de"}, {"language": "es"},
         "language_not_allowed"),
        ({"require_lid_agreement": True, "lid_min_chars": 5}, {"lid_agrees": True},
         {"lid_agrees": False}, "lid_mismatch"),
        ({"require_lid_agreement": True, "lid_min_chars": 11}, {"lid_agrees": True},
         {"lid_agrees": False, "text": "hello there again"}, "lid_mismatch"),
        ({"min_asr_avg_logprob": -0.8}, {"scores": {"asr_avg_logprob": -0.8}},
         {"scores": {"asr_avg_logprob": -0.81}}, "low_asr_confidence"),
        ({"reject_hallucinations": True}, {"hallucination": False}, {"hallucination": True},
         "hallucination"),
        ({"min_dnsmos_ovrl": 3.0}, {"scores": {"dnsmos_ovrl": 3.0}},
         {"scores": {"dnsmos_ovrl": 2.999}}, "low_dnsmos"),
        ({"min_snr_db": 10.0}, {"scores": {"snr_db": 10.0}}, {"scores": {"snr_db": 9.9}},
         "low_snr"),
        ({"max_clipping_ratio": 0.01}, {"scores": {"clipping_ratio": 0.01}},
         {"scores": {"clipping_ratio": 0.0101}}, "clipping"),
        ({"min_bandwidth_hz": 4000}, {"scores": {"bandwidth_hz": 4000.0}},
         {"scores": {"bandwidth_hz": 3999.0}}, "low_bandwidth"),
        ({"min_language_prob": 0.8}, {"scores": {"lid_prob": 0.8}},
         {"scores": {"lid_prob": 0.79}}, "low_language_prob"),
    ],
)
def test_rule_boundaries(cfg, ok_row, bad_row, reason) -> None:
    f = make(**{"speaking_rate_iqr": False, **cfg})
    assert reason not in reasons(f, row(**ok_row))
    assert reasons(f, row(**bad_row)) == [reason]
    out = f.run_row(row(**bad_row))
    assert out.reject["reason"] == reason and out.reject["stage"] == "filter"
    assert out.reject["detail"]  # names the rule's value and threshold


def test_short_text_lid_is_not_trusted() -> None:
    f = make(require_lid_agreement=True, lid_min_chars=20, speaking_rate_iqr=False)
    assert reasons(f, row(lid_agrees=False, text="It is a sunny day.")) == []


def test_detail_names_value_and_threshold() -> None:
    out = make().run_row(row(scores={"dnsmos_ovrl": 2.41}))
    assert out.reject["detail"] == "dnsmos_ovrl 2.41 < 3.0"


def test_speaking_rate_iqr_per_file() -> None:
    rates = [2.0, 2.1, 2.2, 2.3, 2.4, 9.0]  # one outlier in rec1
    ids = [f"rec1-{i:08d}-{i + 5000:08d}" for i in range(6)] + ["rec2-00000000-00005000"]
    scores = [{"chars_per_s": r} for r in rates] + [{"chars_per_s": 9.0}]
    table = pa.table({"id": ids, "scores": scores})
    cfg = FilterConfig()
    prepared = Filter.prepare(cfg, table)
    lo, hi = prepared["rate_bounds"]["rec1"]
    assert lo < 2.0 and 2.4 < hi < 9.0
    assert "rec2" not in prepared["rate_bounds"]  # too few segments: rule skipped
    f = make(prepared)
    assert "speaking_rate_outlier" in reasons(f, row(id=ids[5], scores={"chars_per_s": 9.0}))
    assert "speaking_rate_outlier" not in reasons(f, row(id=ids[2], scores={"chars_per_s": 2.2}))
    assert "speaking_rate_outlier" not in reasons(f, row(id=ids[6], scores={"chars_per_s": 9.0}))


def test_dry_run_keeps_everything_and_reports() -> None:
    f = make(dry_run=True)
    rows = [row(), row(id="rec2-0-1", duration=1.0), row(id="rec3-0-1",
                                                         scores={"dnsmos_ovrl": 2.0})]
    outs = [f.run_row(r) for r in rows]
    assert all(o.reject is None for o in outs)
    would = [o.outputs[0]["filter_would_reject"] for o in outs]
    assert would == [[], ["too_short"], ["low_dnsmos"]]
    table = pa.Table.from_pylist([o.outputs[0] for o in outs])
    s = Filter.summarize(table, pa.table({"reason": [], "duration": []}))
    assert s["mode"] == "dry_run"
    assert s["rules"]["too_short"]["rows"] == 1
    assert s["rules"]["low_dnsmos"]["hours"] == pytest.approx(5.0 / 3600)
    assert s["hours_kept"] == pytest.approx(5.0 / 3600)


def test_filter_summary_counts_rejects_per_rule() -> None:
    rej = pa.table({"reason": ["too_short", "low_dnsmos", "too_short"],
                    "duration": [1.0, 3600.0, None]})
    s = Filter.summarize(pa.table({"id": ["a", "b"], "duration": [7200.0, None]}), rej)
    assert s == {"mode": "filter", "hours_kept": pytest.approx(2.0),
                 "rules": {"low_dnsmos": {"rows": 1, "hours": pytest.approx(1.0)},
                           "too_short": {"rows": 2, "hours": pytest.approx(1 / 3600)}},
                 "unmeasured": {}}
    empty = Filter.summarize(pa.table({"id": pa.array([], pa.string())}),
                             pa.table({"reason": pa.array([], pa.string())}))
    assert empty == {"mode": "filter", "hours_kept": 0.0, "rules": {}, "unmeasured": {}}


def test_unmeasured_scores_are_never_judged_and_are_counted() -> None:
    """A null score (lid_prob of an English-only model) neither passes nor fails its rule
    silently: the row is kept by that rule, marked, and counted in the summary."""
    cfg = dict(min_language_prob=0.8, min_snr_db=10.0, speaking_rate_iqr=False,
               min_asr_avg_logprob=None, min_word_prob=None)
    f = make(**cfg)
    measured = row(id="rec1-00000000-00005000", scores={"lid_prob": 0.95})
    low = row(id="rec2-00000000-00005000", scores={"lid_prob": 0.5})
    null = row(id="rec3-00000000-00004000", duration=4.0,
               scores={"lid_prob": None, "snr_db": None})
    nan = row(id="rec4-00000000-00006000", duration=6.0, scores={"lid_prob": float("nan")})
    missing = row(id="rec5-00000000-00005000")  # no lid_prob at all (no ASR upstream)
    outs = {r["id"]: f.run_row(r) for r in (measured, low, null, nan, missing)}
    assert outs[low["id"]].reject["reason"] == "low_language_prob"
    assert outs[low["id"]].reject["detail"] == "lid_prob 0.50 < 0.8"
    kept = {k: o.outputs[0] for k, o in outs.items() if o.reject is None}
    assert set(kept) == {measured["id"], null["id"], nan["id"], missing["id"]}
    assert kept[measured["id"]]["filter_unmeasured"] == []
    assert kept[null["id"]]["filter_unmeasured"] == ["low_snr", "low_language_prob"]
    assert kept[nan["id"]]["filter_unmeasured"] == ["low_language_prob"]
    assert kept[missing["id"]]["filter_unmeasured"] == ["low_language_prob"]
    rejects = pa.Table.from_pylist([outs[low["id"]].reject])
    s = Filter.summarize(pa.Table.from_pylist(list(kept.values())), rejects)
    assert s["rules"] == {"low_language_prob": {"rows": 1, "hours": pytest.approx(5 / 3600)}}
    assert s["unmeasured"] == {
        "low_language_prob": {"rows": 3, "hours": pytest.approx(15 / 3600)},
        "low_snr": {"rows": 1, "hours": pytest.approx(4 / 3600)}}
    lines = Filter.summary_lines(s)
    assert "low_language_prob: 3 segments not judged (lid_prob not measured)" in lines
    # a dry run marks the same rows and counts them the same way
    d = make(dry_run=True, **cfg)
    rows = [d.run_row(r).outputs[0] for r in (measured, low, null, nan, missing)]
    assert [r["filter_would_reject"] for r in rows] == [[], ["low_language_prob"], [], [], []]
    ds = Filter.summarize(pa.Table.from_pylist(rows), rejects.slice(0, 0))
    assert ds["unmeasured"] == s["unmeasured"]
    # rules that are off never count as unmeasured; the confidence rule is measured by
    # either of its scores
    assert make(speaking_rate_iqr=False, min_dnsmos_ovrl=None, max_clipping_ratio=None,
                min_asr_avg_logprob=None, min_word_prob=None).unmeasured(null) == []
    conf = make(min_dnsmos_ovrl=None, max_clipping_ratio=None)
    assert conf.unmeasured(null) == ["low_asr_confidence"]
    assert conf.unmeasured(row(scores={"asr_mean_word_prob": 0.9})) == []
