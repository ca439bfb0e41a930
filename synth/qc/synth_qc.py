"""Synthesis QC: is a synthesized clip the text, in the voice, without artefacts?

Every clip the ``tts`` stage makes is measured and judged here; a failing clip is made
again with a new seed (up to ``max_attempts``), and a turn whose every attempt fails is
rejected with the reason of its best attempt. The checks, each with its own reject reason
and each disabled by setting its threshold(s) to ``null``:

============== =============================================================================
reason         check
============== =============================================================================
``qc_duration`` speech seconds per character of the text (``min_sec_per_char`` ..
               ``max_sec_per_char``: too fast = truncated or dropped words, too slow =
               runaway generation, repeated sentences, long hallucinated endings), and the
               silence before / after the speech (``max_lead_silence_s``,
               ``max_trail_silence_s``)
``qc_clipping`` fraction of samples in clipped runs (``max_clipped_frac``;
               :func:`speechmill.stages.audio_models.quality.clipping_ratio`)
``qc_wer``     ASR round trip with the ``transcribe`` stage's backends (faster-whisper
               ``tiny.en`` offline): word / character error rate of the transcript against
               the spoken text (``max_wer``, ``max_cer``; per language with
               ``max_wer_by_language`` / ``max_cer_by_language``), both normalised by
               :func:`normalize_words` (lower case, no punctuation, numbers in the
               transcript spelt out with num2words, as the rewrite spells them in the text)
``qc_speaker`` Resemblyzer cosine between the clip and its reference: the prompt clip's
               embedding for user turns (``min_speaker_sim`` for cloned voices,
               ``min_speaker_sim_voice_match`` for matched presets), the assistant
               reference for assistant turns and plain preset voices (a clip the voice
               spoke once at setup: a preset was never given a prompt, so it is checked
               for consistency with itself)
``qc_dnsmos``  DNSMOS P.835 overall (``min_dnsmos``; ``min_dnsmos_voice_match`` for
               matched presets); TTS speech scores lower than recordings, see
               :data:`DEFAULT_MIN_DNSMOS` for how the defaults were chosen
============== =============================================================================

An English-only ASR model (``tiny.en``) measures nothing on turns in other languages: their
``wer``/``cer`` stay null and the WER check is skipped for them (use a multilingual model,
e.g. ``asr_model: small``, to check them).
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

#: DNSMOS P.835 OVRL minimum for synthesized speech, and for voice-matched presets (WORLD
#: resynthesis costs DNSMOS points). Calibrated on this project's offline voices (README,
#: "Dialogue synthesis: voices and TTS"): Piper's joe 3.05-3.42 over 30 sentences, eSpeak
#: NG 2.04-3.12 (8 voices, 5th percentile 2.32), voice-matched Piper 1.70-2.86 (8 prompt
#: speakers, 5th percentile 1.75); broken audio: Piper + white noise (sigma 0.05 / 0.1 /
#: 0.3) 1.75-1.97 / 1.58-1.78 / 1.10-1.55, noise alone 1.07-1.12. 2.0 keeps every clean
#: voice but eSpeak's worst sentences and rejects noisy speech; 1.5 keeps every
#: voice-matched clip and rejects what is mostly noise. Neural cloning backends score like
#: recordings (3+): raise ``min_dnsmos`` for them (e.g. 2.8).
DEFAULT_MIN_DNSMOS = 2.0
DEFAULT_MIN_DNSMOS_VOICE_MATCH = 1.5

#: reject reasons in the order a failing attempt is labelled (the first that failed)
REASONS = ("tts_error", "qc_duration", "qc_clipping", "qc_wer", "qc_speaker", "qc_dnsmos")

QC_FIELDS = ("wer", "cer", "speaker_sim", "dnsmos", "sec_per_char", "lead_silence_s",
             "trail_silence_s", "clipped_frac")
QC_TYPE = pa.struct([(f, pa.float64()) for f in QC_FIELDS])


class QCConfig(BaseModel):
    """Thresholds of the synthesis QC (``qc:`` of the ``tts`` stage). ``null`` disables a
    check; ``enabled: false`` disables all of them (nothing is measured)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    # -- ASR round trip --
    round_trip: bool = Field(True, description="transcribe every clip (words + WER/CER); "
                             "false: no ASR, no words, no WER check")
    asr_backend: Literal["faster-whisper", "whisper"] = "faster-whisper"
    asr_model: str = Field("tiny.en", description="the transcribe stage's model names")
    asr_model_path: str | None = None
    asr_device: Literal["auto", "cpu", "cuda"] = "auto"
    asr_compute_type: str = "default"
    asr_beam_size: int = Field(5, ge=1)
    cpu_threads: int = Field(1, ge=0, description="ASR threads per worker")
    max_wer: float | None = Field(0.15, ge=0, description="word error rate of the round "
                                  "trip (looser than what good voices reach: ~0.05)")
    max_cer: float | None = Field(None, ge=0, description="character error rate")
    max_wer_by_language: dict[str, float] = Field(default_factory=dict)
    max_cer_by_language: dict[str, float] = Field(default_factory=dict)
    # -- speaker --
    min_speaker_sim: float | None = Field(
        0.75, ge=-1, le=1, description="cosine to the prompt (cloned voices) or to the "
        "voice's reference clip (assistant, presets)")
    min_speaker_sim_voice_match: float | None = Field(
        0.4, ge=-1, le=1, description="cosine to the prompt for voice-matched presets "
        "(matching moves a preset towards a speaker, it does not become that speaker)")
    # -- DNSMOS --
    min_dnsmos: float | None = Field(DEFAULT_MIN_DNSMOS, description="DNSMOS P.835 OVRL")
    min_dnsmos_voice_match: float | None = Field(
        DEFAULT_MIN_DNSMOS_VOICE_MATCH, description="DNSMOS minimum of voice-matched presets "
        "(WORLD resynthesis scores ~0.8 lower than the preset itself)")
    # -- duration --
    min_sec_per_char: float | None = Field(0.035, ge=0, description="speech seconds per "
                                           "character: below = truncated / dropped words")
    max_sec_per_char: float | None = Field(0.15, ge=0, description="above = runaway "
                                           "generation, repeats, hallucinated endings")
    max_lead_silence_s: float | None = Field(1.0, ge=0)
    max_trail_silence_s: float | None = Field(1.0, ge=0)
    # -- clipping --
    max_clipped_frac: float | None = Field(0.001, ge=0, le=1)

    def wer_limit(self, language: str | None) -> float | None:
        return self.max_wer_by_language.get(_lang(language) or "", self.max_wer)

    def cer_limit(self, language: str | None) -> float | None:
        return self.max_cer_by_language.get(_lang(language) or "", self.max_cer)


def _lang(code: str | None) -> str | None:
    return code.split("-")[0].split("_")[0].lower() if code else None


# -- text normalisation and error rates ------------------------------------------------------
_DIGITS = re.compile(r"\d+(?:[.,]\d+)?(?:st|nd|rd|th)?")


#: what an ASR writes as a symbol next to a number, in words (as the rewrite says it)
_SYMBOLS = {"en": {"$": "dollars", "€": "euros", "£": "pounds", "%": "percent"},
            "de": {"$": "dollar", "€": "euro", "£": "pfund", "%": "prozent"},
            "fr": {"$": "dollars", "€": "euros", "£": "livres", "%": "pour cent"}}
_CENTS = {"en": {"$": "cents", "€": "cents", "£": "pence"}, "de": {"$": "cent", "€": "cent"},
          "fr": {"$": "cents", "€": "centimes"}}
#: written forms an ASR prefers, as spoken words (applied to both texts, English)
_SPOKEN = {"etc": "et cetera", "eg": "for example", "ie": "that is", "vs": "versus",
           "mr": "mister", "mrs": "missus", "dr": "doctor", "ok": "okay",
           "km": "kilometers", "kg": "kilograms", "cm": "centimeters", "mm": "millimeters",
           "mph": "miles per hour", "kmh": "kilometers per hour"}


def _spell_numbers(text: str, language: str | None) -> str:
    """Digits in ``text`` as words (num2words in ``language``; left alone if unsupported);
    ``$5`` / ``5 %`` as ``5 dollars`` / ``5 percent`` first."""
    if not any(ch.isdigit() for ch in text):
        return text
    lang = _lang(language) or "en"
    if lang == "en":  # thousands separators
        text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    words_for = _SYMBOLS.get(lang, {})
    cents = _CENTS.get(lang, {})
    text = re.sub(r"([$€£])\s?(\d+)[.,](\d\d)\b", lambda m: (
        f"{m.group(2)} {words_for.get(m.group(1), '')} and {int(m.group(3))} "
        f"{cents.get(m.group(1), '')}") if m.group(1) in cents else m.group(0), text)
    text = re.sub(r"([$€£])\s?(\d+(?:[.,]\d+)?)",
                  lambda m: f"{m.group(2)} {words_for.get(m.group(1), '')}", text)
    text = re.sub(r"(\d)\s?%", lambda m: f"{m.group(1)} {words_for.get('%', '')}", text)

    def words(m: re.Match[str]) -> str:
        tok = m.group(0)
        try:
            from num2words import num2words

            ordinal = re.match(r"(\d+)(st|nd|rd|th)$", tok)
            if ordinal:
                return f" {num2words(int(ordinal.group(1)), to='ordinal', lang=lang)} "
            if "." in tok or "," in tok:
                return f" {num2words(float(tok.replace(',', '.')), lang=lang)} "
            return f" {num2words(int(tok), lang=lang)} "
        except Exception:  # a language num2words lacks: keep the digits
            return f" {tok} "

    return _DIGITS.sub(words, text)


def normalize_words(text: str, language: str | None = None) -> list[str]:
    """Words for WER: numbers spelt out, lower case, apostrophes dropped (``don't`` ==
    ``dont``), hyphens and other punctuation as spaces, accents kept; runs of single letters
    joined (``p m`` == ``pm``, ``e.g.`` == ``eg``) and, in English, common written forms
    as spoken (``etc`` -> ``et cetera``, ``km`` -> ``kilometers``)."""
    english = (_lang(language) or "en") == "en"
    # 8pm -> 8 pm (not 1st); e.g. / p.m. -> eg / pm
    t = re.sub(r"(?<=\d)(?!(?:st|nd|rd|th)\b)(?=[^\W\d_]{2,}\b)", " ", str(text or ""))
    t = re.sub(r"\b([^\W\d_])\.([^\W\d_])\.?", r"\1\2", t)
    t = unicodedata.normalize("NFKC", _spell_numbers(t, language)).lower()
    t = re.sub(r"['’`´]", "", t)
    t = "".join(ch if ch.isalnum() else " " for ch in t)
    if not english:
        return t.split()
    words: list[str] = []
    run: list[str] = []
    for w in [*t.split(), ""]:
        if len(w) == 1 and w.isalpha() and w not in ("a", "i"):  # spelt letters: p m
            run.append(w)
            continue
        if len(run) > 1:
            words.append("".join(run))
        else:
            words.extend(run)
        run = []
        if w:
            words.append(w)
    return [x for w in words for x in _SPOKEN.get(w, w).split()]


def edit_distance(ref: list[str] | str, hyp: list[str] | str) -> int:
    """Levenshtein distance between two sequences (words or characters)."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def error_rates(ref: str, hyp: str, language: str | None = None) -> tuple[float, float, int]:
    """(WER, CER, reference words) of ``hyp`` against ``ref`` after :func:`normalize_words`."""
    rw, hw = normalize_words(ref, language), normalize_words(hyp, language)
    if not rw:
        return (0.0 if not hw else 1.0), (0.0 if not hw else 1.0), 0
    wer = edit_distance(rw, hw) / len(rw)
    rc, hc = " ".join(rw), " ".join(hw)
    cer = edit_distance(rc, hc) / max(1, len(rc))
    return wer, cer, len(rw)


def spoken_chars(text: str) -> int:
    """Characters that take time to say: letters and digits."""
    return sum(1 for ch in str(text or "") if ch.isalnum())


# -- signal measures ---------------------------------------------------------------------------
def silence_bounds(audio: np.ndarray, sr: int, rel_db: float = -40.0, floor_db: float = -60.0,
                   frame_ms: float = 10.0) -> tuple[float, float]:
    """(leading, trailing) silence in seconds: 10 ms frames quieter than ``rel_db`` below
    the loudest frame (and than ``floor_db`` dBFS) at either end. All silent: the whole
    clip is leading silence."""
    x = np.asarray(audio, np.float32).reshape(-1)
    hop = max(1, int(sr * frame_ms / 1000))
    n = x.shape[0] // hop
    if n == 0:
        return x.shape[0] / sr if sr else 0.0, 0.0
    rms = np.sqrt(np.mean(np.square(x[: n * hop].reshape(n, hop), dtype=np.float64),
                          axis=1) + 1e-20)
    thr = max(float(rms.max()) * 10 ** (rel_db / 20), 10 ** (floor_db / 20))
    active = np.flatnonzero(rms > thr)
    total = x.shape[0] / sr
    if active.size == 0:
        return total, 0.0
    lead = active[0] * hop / sr
    trail = max(0.0, total - (active[-1] + 1) * hop / sr)
    return float(lead), float(trail)


@dataclass
class QCResult:
    """One attempt's measurements and verdict."""

    scores: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(QC_FIELDS))
    words: list[dict[str, Any]] | None = None
    transcript: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)
    #: a tts_error that is a failure of the service (see synth.tts.base.TTSError)
    transient: bool = False

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def reason(self) -> str | None:
        return self.failures[0][0] if self.failures else None

    def detail(self) -> str:
        return "; ".join(d for _, d in self.failures)

    def rank_key(self) -> tuple[Any, ...]:
        """Smaller is better: fewer failed checks, then the least severe first failure,
        then lower WER, then higher speaker similarity."""
        s = self.scores
        first = REASONS.index(self.reason) if self.reason in REASONS else len(REASONS)
        return (len(self.failures), -first, _nz(s.get("wer"), 1.0),
                -_nz(s.get("speaker_sim"), -1.0))


def _nz(v: float | None, default: float) -> float:
    return default if v is None or not math.isfinite(v) else float(v)


def judge(res: QCResult, cfg: QCConfig, language: str | None, speaker_limit: float | None,
          voice_source: str | None = None) -> QCResult:
    """Fill ``res.failures`` from its scores (ordered as :data:`REASONS`)."""
    s = res.scores
    fails: list[tuple[str, str]] = []
    spc, lo, hi = s.get("sec_per_char"), cfg.min_sec_per_char, cfg.max_sec_per_char
    if spc is not None and lo is not None and spc < lo:
        fails.append(("qc_duration", f"sec_per_char {spc:.4f} < {lo:g} (truncated?)"))
    elif spc is not None and hi is not None and spc > hi:
        fails.append(("qc_duration", f"sec_per_char {spc:.4f} > {hi:g} (runaway?)"))
    for key, lim, what in (("lead_silence_s", cfg.max_lead_silence_s, "leading"),
                           ("trail_silence_s", cfg.max_trail_silence_s, "trailing")):
        v = s.get(key)
        if v is not None and lim is not None and v > lim:
            fails.append(("qc_duration", f"{what} silence {v:.2f} s > {lim:g} s"))
    v = s.get("clipped_frac")
    if v is not None and cfg.max_clipped_frac is not None and v > cfg.max_clipped_frac:
        fails.append(("qc_clipping", f"clipped_frac {v:.4f} > {cfg.max_clipped_frac:g}"))
    for key, lim in (("wer", cfg.wer_limit(language)), ("cer", cfg.cer_limit(language))):
        v = s.get(key)
        if v is not None and lim is not None and v > lim:
            fails.append(("qc_wer", f"{key} {v:.3f} > {lim:g}"))
    v = s.get("speaker_sim")
    if v is not None and speaker_limit is not None and v < speaker_limit:
        fails.append(("qc_speaker", f"speaker_sim {v:.3f} < {speaker_limit:g}"))
    v = s.get("dnsmos")
    lim = cfg.min_dnsmos_voice_match if voice_source == "voice_match" else cfg.min_dnsmos
    if v is not None and lim is not None and v < lim:
        fails.append(("qc_dnsmos", f"dnsmos {v:.2f} < {lim:g}"))
    fails.sort(key=lambda f: REASONS.index(f[0]))
    res.failures = fails
    return res


class SynthQC:
    """The QC models of one worker (ASR, speaker encoder, DNSMOS) and the measurements."""

    ASR_SR = 16000

    def __init__(self, cfg: QCConfig, offline: bool = False) -> None:
        self.cfg = cfg
        self.offline = offline
        self.asr: Any = None
        self.english_only = False

    # -- setup --
    @property
    def measures_words(self) -> bool:
        return self.cfg.enabled and self.cfg.round_trip

    def load(self) -> None:
        """Load what the enabled checks need (fail fast: a missing model stops the stage)."""
        if not self.cfg.enabled:
            return
        if self.measures_words:
            from speechmill.pipeline.models import ModelSpec
            from speechmill.stages.audio_models.asr import is_multilingual, load_backend

            c = self.cfg
            spec = ModelSpec(backend=c.asr_backend,
                             name=None if c.asr_model_path else c.asr_model,
                             path=c.asr_model_path, device=c.asr_device,
                             compute_type=c.asr_compute_type)
            self.asr = load_backend(spec, offline=self.offline, cpu_threads=c.cpu_threads)
            multi = is_multilingual(c.asr_backend, self.asr.resolved.location)
            self.english_only = (multi is False) or (
                multi is None and not c.asr_model_path and c.asr_model.endswith(".en"))
        if self.cfg.min_dnsmos is not None or self.cfg.min_dnsmos_voice_match is not None:
            from speechmill.stages.audio_models.quality import dnsmos

            dnsmos(np.zeros(1600, np.float32), 16000)  # builds the ONNX sessions
        if self.cfg.min_speaker_sim is not None or \
                self.cfg.min_speaker_sim_voice_match is not None:
            from speechmill.synth.voices.voice_match import speaker_encoder

            speaker_encoder("cpu")

    def dnsmos_limit(self, voice_source: str) -> float | None:
        if voice_source == "voice_match":
            return self.cfg.min_dnsmos_voice_match
        return self.cfg.min_dnsmos

    def speaker_limit(self, voice_source: str) -> float | None:
        if voice_source == "voice_match":
            return self.cfg.min_speaker_sim_voice_match
        return self.cfg.min_speaker_sim

    # -- measuring --
    def transcribe(self, audio: np.ndarray, sr: int, language: str | None) -> Any:
        from speechmill.stages.audio_models.asr import DecodeOptions
        from speechmill.synth.tts.audio import resample

        opts = DecodeOptions(language="en" if self.english_only else _lang(language),
                             beam_size=self.cfg.asr_beam_size, word_timestamps=True,
                             temperature=(0.0,))  # no fallback: what the clip says, as is
        return self.asr.transcribe(resample(audio, sr, self.ASR_SR), opts)

    def measure(self, audio: np.ndarray, sr: int, text: str, language: str | None,
                reference: np.ndarray | None, voice_source: str) -> QCResult:
        """Measure one clip and judge it. ``reference``: the unit-norm speaker embedding the
        clip should match (None: no speaker check)."""
        res = QCResult()
        if not self.cfg.enabled:
            return res
        s = res.scores
        x = np.asarray(audio, np.float32).reshape(-1)
        dur = x.shape[0] / sr if sr else 0.0
        lead, trail = silence_bounds(x, sr)
        s["lead_silence_s"], s["trail_silence_s"] = round(lead, 4), round(trail, 4)
        speech = max(0.0, dur - lead - trail)
        s["sec_per_char"] = round(speech / max(1, spoken_chars(text)), 5)
        from speechmill.stages.audio_models.quality import clipping_ratio

        s["clipped_frac"] = float(clipping_ratio(x))
        if speech <= 0.0:  # nothing to transcribe or embed
            return judge(res, self.cfg, language, None)
        english = _lang(language) in (None, "en")
        if self.asr is not None and (english or not self.english_only):
            r = self.transcribe(x, sr, language)
            res.transcript = r.text
            res.words = list(r.words)
            wer, cer, _ = error_rates(text, r.text, language)
            s["wer"], s["cer"] = round(wer, 4), round(cer, 4)
        limit = self.speaker_limit(voice_source)
        if reference is not None and limit is not None:
            from speechmill.synth.voices.voice_match import embed

            try:
                s["speaker_sim"] = round(float(embed(x, sr) @ reference), 4)
            except Exception:  # too little speech to embed: measured as no similarity
                s["speaker_sim"] = -1.0
        if self.dnsmos_limit(voice_source) is not None:
            from speechmill.stages.audio_models.quality import dnsmos

            v = dnsmos(x, sr)["dnsmos_ovrl"]
            s["dnsmos"] = round(float(v), 4) if math.isfinite(v) else None
        return judge(res, self.cfg, language, limit if reference is not None else None,
                     voice_source)


def tts_error_result(message: str, transient: bool = False) -> QCResult:
    """A failed synthesis as an attempt's verdict (``transient``: the service failed);
    the message is redacted whole, then cut short."""
    from speechmill.pipeline.redact import redact_text

    return QCResult(failures=[("tts_error", redact_text(message, limit=500))],
                    transient=transient)


def qc_struct(scores: dict[str, float | None] | None) -> dict[str, float | None]:
    """The ``qc`` column's value (every field present, null when not measured)."""
    s = scores or {}
    return {f: (None if s.get(f) is None or not math.isfinite(float(s[f])) else float(s[f]))
            for f in QC_FIELDS}
