"""Stage ``diarize``: who spoke when, per file.

Backend ``embed-cluster`` (the offline default, built only from models shipped in pip
packages): Silero VAD -> Resemblyzer GE2E embeddings on sliding windows -> spectral /
agglomerative clustering with an automatic number of speakers -> turns (see
``diarize_embed.py``). Each output row is the input file with ``turns`` (start, end,
local speaker label), ``overlaps`` (regions where two speakers likely talk at once),
``num_speakers`` and ``speaker_embeddings`` (one L2-normalised mean embedding per local
speaker, used by ``link_speakers`` to give speakers run-wide ids). A file without speech
is rejected as ``no_speech``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from speechmill.pipeline.audio import AudioError, load_audio
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig

SR = 16000


class DiarizeConfig(StageConfig):
    backend: Literal["embed-cluster"] = Field(
        "embed-cluster", description="embed-cluster: Silero VAD + Resemblyzer + clustering"
    )
    num_speakers: int | None = Field(None, ge=1, description="fixed number of speakers")
    min_speakers: int | None = Field(None, ge=1)
    max_speakers: int | None = Field(None, ge=1)
    window_s: float = Field(1.5, gt=0, description="embedding window")
    step_s: float = Field(0.75, gt=0, description="embedding hop")
    threshold: float | None = Field(
        None, gt=-1, lt=1, description="cosine cut for agglomerative clustering; "
        "None: number of speakers from the eigengap"
    )
    max_duration_s: float = Field(4 * 3600.0, gt=0, description="longer files: rejected")


class Diarize(Stage):
    name = "diarize"
    description = "speaker turns, overlap regions and per-speaker embeddings per file"
    Config = DiarizeConfig
    resources = Resources(cpus=1, memory_gb=2.0)
    uses_model = True
    default_batch_size = 4

    config: DiarizeConfig

    @classmethod
    def validate_config(cls, config: StageConfig) -> None:
        assert isinstance(config, DiarizeConfig)
        if config.step_s > config.window_s:
            raise ValueError("key 'with.step_s': must be <= window_s")
        if (config.min_speakers and config.max_speakers
                and config.min_speakers > config.max_speakers):
            raise ValueError("key 'with.min_speakers': greater than max_speakers")

    def setup(self) -> None:
        from speechmill.stages import diarize_embed

        diarize_embed.load_models()
        self.backend = diarize_embed

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        dur = float(row.get("duration") or 0.0)
        if dur > c.max_duration_s:
            raise Reject("too_long", f"{dur:.0f} s > max_duration_s")
        try:
            audio, _ = load_audio(row["audio_path"], float(row.get("offset") or 0.0),
                                  dur or None, SR)
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        res = self.backend.diarize(
            audio, SR, num_speakers=c.num_speakers, min_speakers=c.min_speakers,
            max_speakers=c.max_speakers, window_s=c.window_s, step_s=c.step_s,
            threshold=c.threshold,
        )
        if not res.turns:
            raise Reject("no_speech", "no speech found")
        return {
            **row,
            "parent_id": row["id"],
            "num_speakers": res.num_speakers,
            "turns": [{"start": round(s, 3), "end": round(e, 3), "speaker": lab}
                      for s, e, lab in res.turns],
            "overlaps": [{"start": round(s, 3), "end": round(e, 3)} for s, e in res.overlaps],
            "speaker_embeddings": [{"speaker": lab, "embedding": [float(v) for v in emb]}
                                   for lab, emb in res.embeddings.items()],
            "diarizer": c.backend,
        }
