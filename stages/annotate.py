"""Stage ``annotate``: quality scores for every segment; drops nothing.

Adds to ``scores``: ``dnsmos_sig``/``dnsmos_bak``/``dnsmos_ovrl`` (DNSMOS P.835, the ONNX
models shipped in ``speechmos``), ``snr_db`` (blind estimate), ``clipping_ratio``,
``bandwidth_hz``, ``chars_per_s``/``words_per_s``, ``text_lid_prob``,
``repeat_ngram_ratio`` and ``text_compression_ratio``; and the columns ``text_language``
(offline text LID), ``lid_agrees`` (text LID equals the ASR language) and
``hallucination``/``hallucination_reason`` (known Whisper phrases, repeats, compression
ratio > 2.4, high no-speech probability with text). ``filter`` decides with them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from speechmill.pipeline.audio import AudioError, load_audio
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig

SR = 16000


class AnnotateConfig(StageConfig):
    dnsmos: bool = Field(True, description="DNSMOS P.835 SIG/BAK/OVRL")
    dnsmos_hop_s: float = Field(
        1.0, gt=0, le=9.01, description="seconds between DNSMOS's 9.01 s windows: 1 (as "
        "DNSMOS, what thresholds are calibrated on); 9.01 scores non-overlapping windows, "
        "up to ~9x cheaper on long segments, scores move by hundredths")
    snr: bool = True
    clipping: bool = True
    bandwidth: bool = True
    speaking_rate: bool = True
    text_lid: bool = Field(True, description="offline text language ID (lingua)")
    lid_languages: list[str] = Field(
        default_factory=list, description="restrict text LID to these ISO 639-1 codes"
    )
    hallucination: bool = True


class Annotate(Stage):
    name = "annotate"
    description = "quality scores: DNSMOS, SNR, clipping, bandwidth, rate, text LID, hallucination"
    Config = AnnotateConfig
    # the all-languages lingua detector alone takes ~0.9 GB; `lid_languages` shrinks it
    resources = Resources(cpus=1, memory_gb=1.5)
    uses_model = True
    #: segments per batch: enough batches that a pool's actors finish together
    default_batch_size = 16
    default_batch_seconds = 900.0

    config: AnnotateConfig

    def setup(self) -> None:
        from speechmill.stages import text_signals
        from speechmill.stages.audio_models import quality

        self.q = quality
        self.t = text_signals
        if self.config.dnsmos:  # load the ONNX sessions once per worker, not per row
            import numpy as np

            quality.dnsmos(np.zeros(int(9.01 * SR), np.float32), SR)

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        c, q, t = self.config, self.q, self.t
        need_audio = c.dnsmos or c.snr or c.clipping or c.bandwidth
        scores: dict[str, Any] = dict(row.get("scores") or {})
        if need_audio:
            try:
                audio, _ = load_audio(row["audio_path"], float(row.get("offset") or 0.0),
                                      row.get("duration"), SR)
            except AudioError as e:
                raise Reject(e.reason, e.detail) from None
            if audio.shape[0] == 0:
                raise Reject("zero_length", "no samples in the segment")
            if c.dnsmos:
                scores.update(q.dnsmos(audio, SR, hop_s=c.dnsmos_hop_s))
            if c.snr:
                scores["snr_db"] = q.snr_db(audio, SR)
            if c.clipping:
                scores["clipping_ratio"] = q.clipping_ratio(audio)
            if c.bandwidth:
                scores["bandwidth_hz"] = q.bandwidth_hz(audio, SR)
        text = row.get("text") or ""
        out: dict[str, Any] = {**row}
        if c.speaking_rate:
            rate = t.speaking_rate(text, float(row.get("duration") or 0.0))
            scores.update({k: rate[k] for k in ("chars_per_s", "words_per_s")})
        if c.text_lid:
            lang, prob = t.text_language(text, tuple(c.lid_languages) or None)
            out["text_language"] = lang
            scores["text_lid_prob"] = prob
            asr_lang = row.get("language")
            out["lid_agrees"] = (None if lang is None or not asr_lang
                                 else lang == str(asr_lang).split("-")[0])
        if c.hallucination:
            h = t.hallucination_signals(text, scores.get("asr_compression_ratio"),
                                        scores.get("asr_no_speech_prob"))
            scores["repeat_ngram_ratio"] = h["repeat_ngram_ratio"]
            scores["text_compression_ratio"] = h["text_compression_ratio"]
            out["hallucination"] = bool(h["hallucination"])
            out["hallucination_reason"] = _why(h)
        out["scores"] = {k: (float(v) if isinstance(v, int | float) and not isinstance(v, bool)
                             else v) for k, v in scores.items()}
        out["parent_id"] = row["id"]
        return out


def _why(h: dict[str, Any]) -> str | None:
    if not h.get("hallucination"):
        return None
    reasons = list(h.get("reasons") or [])
    if h.get("known_phrase"):
        reasons = [f"known phrase '{h['known_phrase']}'" if r == "known_phrase" else r
                   for r in reasons]
    return ", ".join(reasons) or "signals"
