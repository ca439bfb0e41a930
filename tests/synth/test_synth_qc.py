"""Synthesis QC on real speech: the checks catch what TTS gets wrong (truncation, runaway
generation, clipping, noise, the wrong speaker) and pass a good clip; each check has its
own reason and can be disabled."""

from __future__ import annotations

import numpy as np
import pytest

from speechmill.synth.qc.synth_qc import (
    QCConfig,
    QCResult,
    SynthQC,
    edit_distance,
    error_rates,
    judge,
    normalize_words,
    qc_struct,
    silence_bounds,
)
from testkit.conversations import espeak_available, synthesize

TEXT = "The museum opens at nine and closes at five on weekdays."
SR = 16000


def test_text_normalisation_and_error_rates() -> None:
    assert normalize_words("It's twenty-five past Nine, OK?") == \
        ["its", "twenty", "five", "past", "nine", "okay"]
    # what an ASR writes vs what the rewrite spells out
    assert error_rates("From March first it opens at eight p m, et cetera, for example today.",
                       "From March 1st it opens at 8pm, etc., e.g. today.")[0] == 0.0
    assert error_rates("It costs one hundred and eighty-seven dollars and fifty cents.",
                       "It costs $187.50.")[0] == 0.0
    # the rewrite spells numbers out; the ASR may write digits: both normalise alike
    assert error_rates(TEXT, "The museum opens at 9 and closes at 5 on weekdays.")[0] == 0.0
    assert normalize_words("the 3rd of 1,250 cats", "en") == \
        ["the", "third", "of", "one", "thousand", "two", "hundred", "and", "fifty", "cats"]
    assert normalize_words("am 15 März", "de") == ["am", "fünfzehn", "märz"]
    assert edit_distance(["kitten"], ["sitting"]) == 1
    assert edit_distance("kitten", "sitting") == 3
    wer, cer, n = error_rates("one two three four", "one too three")
    assert n == 4 and wer == pytest.approx(0.5) and 0 < cer < wer
    assert error_rates("", "")[:2] == (0.0, 0.0) and error_rates("", "noise")[0] == 1.0


def test_silence_bounds_on_speech() -> None:
    x = synthesize("piper:joe", TEXT, SR)  # trimmed of its own silence
    padded = np.concatenate([np.zeros(int(0.5 * SR), np.float32), x,
                             np.zeros(int(1.2 * SR), np.float32)])
    lead, trail = silence_bounds(padded, SR)
    assert lead == pytest.approx(0.5, abs=0.03) and trail == pytest.approx(1.2, abs=0.03)
    assert silence_bounds(np.zeros(SR, np.float32), SR) == (1.0, 0.0)


def test_judge_orders_reasons_and_null_disables() -> None:
    cfg = QCConfig(max_wer=0.15, min_dnsmos=2.0, min_sec_per_char=0.035, max_clipped_frac=0.001)
    res = judge(QCResult(scores=qc_struct({"wer": 0.4, "dnsmos": 1.5, "sec_per_char": 0.02,
                                           "clipped_frac": 0.0})), cfg, "en", 0.75)
    assert [r for r, _ in res.failures] == ["qc_duration", "qc_wer", "qc_dnsmos"]
    assert res.reason == "qc_duration" and "0.0200 < 0.035" in res.detail()
    off = QCConfig(max_wer=None, min_dnsmos=None, min_sec_per_char=None)
    res2 = judge(QCResult(scores=qc_struct({"wer": 0.4, "dnsmos": 1.5, "sec_per_char": 0.02})),
                 off, "en", None)
    assert res2.passed
    # voice-matched presets have their own DNSMOS bar (WORLD resynthesis scores lower)
    low = qc_struct({"dnsmos": 1.7})
    assert judge(QCResult(scores=dict(low)), cfg, "en", None, "voice_match").passed
    assert judge(QCResult(scores=dict(low)), cfg, "en", None, "clone").reason == "qc_dnsmos"
    # per-language limits
    de = QCConfig(max_wer_by_language={"de": 0.5})
    assert judge(QCResult(scores=qc_struct({"wer": 0.4})), de, "de-DE", None).passed
    assert not judge(QCResult(scores=qc_struct({"wer": 0.4})), de, "en", None).passed
    # ranking: a pass beats everything; fewer failures beat more; lower WER breaks ties
    ok = judge(QCResult(scores=qc_struct({"wer": 0.1})), cfg, "en", None)
    one = judge(QCResult(scores=qc_struct({"wer": 0.2})), cfg, "en", None)
    worse = judge(QCResult(scores=qc_struct({"wer": 0.3})), cfg, "en", None)
    assert sorted([worse, res, ok, one], key=QCResult.rank_key) == [ok, one, worse, res]


@pytest.fixture(scope="module")
def qc() -> SynthQC:
    q = SynthQC(QCConfig(asr_beam_size=1), offline=True)
    q.load()
    return q


def test_qc_on_real_speech(qc: SynthQC) -> None:
    from speechmill.synth.voices.voice_match import embed

    x = synthesize("piper:joe", TEXT, SR)
    ref = embed(synthesize("piper:joe", "Thanks, I will call you back after lunch.", SR), SR)
    good = qc.measure(x, SR, TEXT, "en", ref, "preset")
    s = good.scores
    assert good.passed, good.failures
    assert s["wer"] <= 0.1 and s["speaker_sim"] >= 0.8 and s["dnsmos"] >= 2.5
    assert 0.04 < s["sec_per_char"] < 0.12 and s["clipped_frac"] == 0.0
    assert [w["word"] for w in good.words][:2] == ["The", "museum"]
    assert good.words[-1]["end"] <= x.shape[0] / SR + 0.05

    # truncated generation: the second half is missing
    cut = qc.measure(x[: int(0.45 * x.shape[0])], SR, TEXT, "en", ref, "preset")
    assert cut.reason == "qc_duration" and "truncated" in cut.detail()
    assert any(r == "qc_wer" for r, _ in cut.failures)
    # runaway generation: the sentence over and over
    loop = qc.measure(np.concatenate([x, x, x]), SR, TEXT, "en", ref, "preset")
    assert loop.reason == "qc_duration" and "runaway" in loop.detail()
    # long trailing silence (a hallucinated pause at the end)
    tail = qc.measure(np.concatenate([x, np.zeros(2 * SR, np.float32)]), SR, TEXT, "en", ref,
                      "preset")
    assert tail.reason == "qc_duration" and "trailing silence" in tail.detail()
    # clipping
    hot = qc.measure(np.clip(x * 12, -1, 1), SR, TEXT, "en", ref, "preset")
    assert any(r == "qc_clipping" for r, _ in hot.failures)
    # noise instead of speech: DNSMOS and the round trip fail
    rng = np.random.default_rng(0)
    noisy = qc.measure(x + rng.normal(0, 0.3, x.shape).astype(np.float32), SR, TEXT, "en",
                       ref, "preset")
    assert any(r == "qc_dnsmos" for r, _ in noisy.failures), noisy.scores


@pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng for a second voice")
def test_qc_speaker_check_and_voice_match_limit(qc: SynthQC) -> None:
    from speechmill.synth.voices.voice_match import embed

    x = synthesize("piper:joe", TEXT, SR)
    other = embed(synthesize("espeak:en-us+f3", "Thanks, I will call you back after lunch.",
                             SR), SR)
    res = qc.measure(x, SR, TEXT, "en", other, "clone")
    assert res.reason == "qc_speaker" and res.scores["speaker_sim"] < 0.75
    # a voice-matched preset is held to its own, lower bar; no reference: no check
    vm = qc.measure(x, SR, TEXT, "en", other, "voice_match")
    assert vm.scores["speaker_sim"] == res.scores["speaker_sim"]
    assert (vm.reason == "qc_speaker") == (res.scores["speaker_sim"] < 0.4)
    assert qc.measure(x, SR, TEXT, "en", None, "clone").scores["speaker_sim"] is None


def test_english_only_asr_skips_other_languages(qc: SynthQC) -> None:
    x = synthesize("piper:joe", TEXT, SR)
    res = qc.measure(x, SR, "Das Museum öffnet um neun Uhr.", "de", None, "preset")
    assert qc.english_only and res.scores["wer"] is None and res.words is None
    assert res.scores["dnsmos"] is not None  # the other checks still run


def test_disabled_qc_measures_nothing() -> None:
    q = SynthQC(QCConfig(enabled=False))
    q.load()
    res = q.measure(np.zeros(SR, np.float32), SR, TEXT, "en", None, "preset")
    assert res.passed and all(v is None for v in res.scores.values()) and res.words is None
