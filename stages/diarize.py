"""Stage ``diarize``: who spoke when, per file.

Backend ``embed-cluster`` (the offline default, built only from models shipped in pip
packages): Silero VAD -> Resemblyzer GE2E embeddings on sliding windows -> spectral /
agglomerative clustering with an automatic number of speakers -> turns (see
:mod:`speechmill.stages.audio_models.speaker`). Each output row is the input file with ``turns`` (start, end,
local speaker label), ``overlaps`` (regions where two speakers likely talk at once),
``num_speakers`` and ``speaker_embeddings`` (one L2-normalised mean embedding per local
speaker, used by ``link_speakers`` to give speakers run-wide ids). A file without speech
is rejected as ``no_speech``.

Backend ``pyannote``: a pyannote.audio 4 pipeline (``pipeline``, default
``pyannote/speaker-diarization-community-1``; or 3.1) loaded from a local directory
(``path``, or ``$SPEECHMILL_MODELS/pyannote/<pipeline>``), the Hugging Face cache, or the
hub with the token from the environment variable named by ``token_env`` (see
``diarize_pyannote.py``, which also notes its memory use on long files). Same output
columns; its overlap regions come from pyannote's overlapped-speech detection. Keys of
one backend given with the other are errors, and a pipeline that cannot be found (e.g.
``--offline`` without a local copy) stops the run before any file is processed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from speechmill.pipeline.audio import AudioError, AudioReader, load_audio
from speechmill.pipeline.stage import Reject, Resources, Stage, StageConfig, StageContext

SR = 16000
#: config keys that only one backend reads
_ONLY = {
    "embed-cluster": ("window_s", "step_s", "threshold"),
    "pyannote": ("pipeline", "path", "token_env", "device"),
}


class DiarizeConfig(StageConfig):
    backend: Literal["embed-cluster", "pyannote"] = Field(
        "embed-cluster", description="embed-cluster: Silero VAD + Resemblyzer + clustering "
        "(offline); pyannote: a pyannote.audio 4 pipeline"
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
    pipeline: str = Field(
        "pyannote/speaker-diarization-community-1",
        description="pyannote: hub id (or name under $SPEECHMILL_MODELS/pyannote/)")
    path: str | None = Field(
        None, description="pyannote: local pipeline directory with config.yaml (wins)")
    token_env: str = Field(
        "HF_TOKEN", description="pyannote: environment variable holding the hub token")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="pyannote: auto = cuda when available")


class Diarize(Stage):
    name = "diarize"
    description = "speaker turns, overlap regions and per-speaker embeddings per file"
    Config = DiarizeConfig
    resources = Resources(cpus=1, memory_gb=2.0)
    uses_model = True

    @classmethod
    def gpu_share(cls, config: StageConfig) -> float:
        """pyannote runs on CUDA when there is one; embed-cluster is CPU work."""
        c = config
        return 1.0 if getattr(c, "backend", "") == "pyannote" and \
            getattr(c, "device", "auto") != "cpu" else 0.0
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
        for backend, keys in _ONLY.items():
            if backend != config.backend:
                for k in keys:
                    if k in config.model_fields_set:
                        raise ValueError(f"key 'with.{k}': only read by backend "
                                         f"{backend!r} (backend is {config.backend!r})")
        if config.backend == "pyannote" and not config.pipeline.strip() and not config.path:
            raise ValueError("key 'with.pipeline': empty (give a hub id or `path`)")

    #: prepare() only checks that the model can be located: diarize streams (fuses)
    prepare_reads_inputs = False

    @classmethod
    def prepare(cls, config: StageConfig, inputs: Any,
                ctx: StageContext | None = None) -> Any:
        # driver side, before any worker starts: a pyannote pipeline that cannot be found
        # (or needs the hub while offline) stops the run here, naming stage and key
        assert isinstance(config, DiarizeConfig)
        if config.backend == "pyannote" and ctx is not None:
            from speechmill.stages import diarize_pyannote

            diarize_pyannote.locate(config.pipeline, config.path, offline=ctx.offline,
                                    stage=ctx.stage_id)
        return None

    #: the embed backend reads a recording longer than this (seconds; its ``CHUNK_S``)
    #: a chunk at a time
    _stream_above_s: float = float("inf")
    _stream: Any = None

    def setup(self) -> None:
        c = self.config
        if c.backend == "pyannote":
            from speechmill.stages import diarize_pyannote as dp

            resolved = dp.locate(c.pipeline, c.path, offline=self.ctx.offline,
                                 stage=self.ctx.stage_id)
            pyannote = dp.load(resolved, token_env=c.token_env, device=c.device,
                               stage=self.ctx.stage_id,
                               key="with.path" if c.path else "with.pipeline")

            def run(audio: Any, sr: int, row_id: str) -> Any:
                return pyannote.diarize(audio, sr, num_speakers=c.num_speakers,
                                        min_speakers=c.min_speakers,
                                        max_speakers=c.max_speakers, uri=row_id)
        else:
            from speechmill.stages.audio_models import speaker, vad

            speaker.load_models()

            def run(audio: Any, sr: int, row_id: str) -> Any:
                return speaker.diarize(
                    audio, sr, num_speakers=c.num_speakers, min_speakers=c.min_speakers,
                    max_speakers=c.max_speakers, window_s=c.window_s, step_s=c.step_s,
                    threshold=c.threshold,
                )

            def stream(reader: AudioReader) -> Any:
                return speaker.diarize_stream(
                    reader.read, reader.n, num_speakers=c.num_speakers,
                    min_speakers=c.min_speakers, max_speakers=c.max_speakers,
                    window_s=c.window_s, step_s=c.step_s, threshold=c.threshold,
                    chunk_s=self._stream_above_s,
                )

            self._stream = stream
            self._stream_above_s = vad.CHUNK_S
        self._run = run

    def process_row(self, row: dict[str, Any]) -> dict[str, Any]:
        c = self.config
        dur = float(row.get("duration") or 0.0)
        if dur > c.max_duration_s:
            raise Reject("too_long", f"{dur:.0f} s > max_duration_s")
        try:
            if self._stream is not None and dur > self._stream_above_s:
                # a long recording is read a chunk at a time: memory does not grow
                # with its length
                res = self._stream(AudioReader(row["audio_path"],
                                               float(row.get("offset") or 0.0), dur, SR,
                                               span_s=self._stream_above_s))
            else:
                audio, _ = load_audio(row["audio_path"], float(row.get("offset") or 0.0),
                                      dur or None, SR)
                res = self._run(audio, SR, str(row.get("id") or "audio"))
        except AudioError as e:
            raise Reject(e.reason, e.detail) from None
        if not res.turns:
            raise Reject("no_speech", "no speech found")
        return {
            **row,
            "parent_id": row["id"],
            "num_speakers": len({lab for _, _, lab in res.turns}),
            "turns": [{"start": round(s, 3), "end": round(e, 3), "speaker": lab}
                      for s, e, lab in res.turns],
            "overlaps": [{"start": round(s, 3), "end": round(e, 3)} for s, e in res.overlaps],
            "speaker_embeddings": [{"speaker": lab, "embedding": [float(v) for v in emb]}
                                   for lab, emb in res.embeddings.items()],
            "diarizer": c.backend,
        }
