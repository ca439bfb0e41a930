"""Audio model adapters shared by the cleaning stages and synthesis: ASR
(:mod:`~speechmill.stages.audio_models.asr`), quality signals such as DNSMOS
(:mod:`~speechmill.stages.audio_models.quality`), speaker embeddings and diarization
(:mod:`~speechmill.stages.audio_models.speaker`) and voice activity detection
(:mod:`~speechmill.stages.audio_models.vad`). Heavy libraries are imported only when a
model loads."""
