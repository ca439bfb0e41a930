"""How a config names a TTS backend: one flat, strict model (:class:`TTSSpec`).

Every key is checked: unknown keys, and keys that do not apply to the chosen backend
(``base_url`` for ``piper``, ``nfe_step`` for ``xtts``...), are errors that name the key.
:func:`parse_tts_spec` turns them into a :class:`ConfigError` naming the stage and key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from speechmill.pipeline.errors import ConfigError

Backend = Literal["f5_tts", "pocket_tts", "xtts", "openai_compat", "cosyvoice", "multipart",
                  "openai", "piper", "espeak"]

CLONING_BACKENDS = ("f5_tts", "pocket_tts", "xtts", "openai_compat", "cosyvoice", "multipart")
PRESET_BACKENDS = ("openai", "piper", "espeak")


class VoiceMatchSpec(BaseModel):
    """Offline voice matching for preset backends (see
    :mod:`speechmill.synth.voices.voice_match`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pitch_factors: list[float] = Field(
        default=[0.65, 0.75, 0.86, 1.0, 1.15, 1.32, 1.52, 1.75, 2.0],
        description="f0 scale factors searched")
    formant_factors: list[float] = Field(
        default=[0.9, 1.0, 1.1, 1.2],
        description="spectral-envelope (vocal tract length) warp factors searched")
    pitch_window: float = Field(
        1.3, ge=1.0, description="only pitch factors within this ratio of the prompt/preset "
        "median-f0 ratio are candidates (natural pitch); 1.0 disables the prior")
    calibration_text: str = Field(
        "We walked along the river and talked about our plans for the weekend.",
        min_length=10, description="sentence the preset voice speaks once for calibration")
    cache_dir: str | None = Field(None, description="keep calibrations here across runs")

    @model_validator(mode="after")
    def _grid(self) -> VoiceMatchSpec:
        for key in ("pitch_factors", "formant_factors"):
            vals = getattr(self, key)
            if not vals or any(not 0.3 <= v <= 3.0 for v in vals):
                raise PydanticCustomError(
                    "tts_key", "key '{key}': give factors between 0.3 and 3.0", {"key": key})
        return self


_HTTP = {"base_url", "api_key_env", "url_path", "fields", "extra_fields", "response_format",
         "sample_rate", "timeout_s", "max_retries", "backoff_s", "max_backoff_s",
         "max_concurrency"}
_COMMON = {"backend", "language", "speed", "max_chars", "pause_ms"}
KEYS: dict[str, set[str]] = {
    "f5_tts": {"name", "path", "model", "ckpt_file", "vocab_file", "vocoder_path", "device",
               "nfe_step", "cfg_strength", "sway_sampling_coef"},
    "pocket_tts": {"name", "path", "config", "device", "temperature", "quantize", "voice"},
    "xtts": {"name", "path", "device", "temperature"},
    "openai_compat": _HTTP | {"model", "voice", "ref_audio_as"},
    "cosyvoice": _HTTP | {"prompt_sample_rate"},
    "multipart": _HTTP | {"body", "upload_path", "upload_field", "upload_name_key",
                          "reference_template", "prompt_sample_rate", "model", "voice"},
    "openai": {"base_url", "api_key_env", "model", "voice", "instructions", "timeout_s",
               "max_retries", "max_concurrency", "voice_match"},
    "piper": {"name", "path", "config", "voice", "noise_scale", "noise_w_scale", "voice_match"},
    "espeak": {"voice", "pitch", "voice_match"},
}
# logical request fields each HTTP backend maps to the server's names (`fields:`)
FIELD_NAMES: dict[str, set[str]] = {
    "openai_compat": {"input", "ref_audio", "ref_text", "model", "voice", "response_format",
                      "speed", "language", "seed"},
    "cosyvoice": {"text", "prompt_audio", "prompt_text", "language", "speed", "seed"},
    "multipart": {"text", "prompt_audio", "prompt_text", "language", "speed", "seed",
                  "model", "voice"},
}


class TTSSpec(BaseModel):
    """One TTS backend and its settings. Which keys apply depends on ``backend``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend
    # -- model files (in-process backends, piper) --
    name: str | None = Field(None, description="model name or hub id (resolved like other "
                             "models: $SPEECHMILL_MODELS, library cache, download)")
    path: str | None = Field(None, description="local checkpoint directory or file")
    model: str | None = Field(None, description="f5_tts: config name (F5TTS_v1_Base...); "
                              "openai/HTTP: the server's model name")
    ckpt_file: str | None = None
    vocab_file: str | None = None
    vocoder_path: str | None = Field(None, description="f5_tts: local Vocos directory")
    config: str | None = Field(None, description="pocket_tts: YAML config; piper: .onnx.json")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # -- generation --
    language: str | None = Field(None, description="default language (xtts needs one)")
    voice: str | None = Field(None, description="preset voice (openai/piper speaker/espeak "
                              "voice+variant; pocket_tts: voice used without a prompt)")
    speed: float = Field(1.0, gt=0.2, le=4.0)
    temperature: float | None = Field(None, ge=0.0)
    nfe_step: int = Field(32, ge=1, le=128)
    cfg_strength: float = 2.0
    sway_sampling_coef: float = -1.0
    quantize: bool = False
    noise_scale: float | None = Field(None, ge=0.0)
    noise_w_scale: float | None = Field(None, ge=0.0, description="piper: phoneme-duration "
                                        "noise (0 with noise_scale 0: the same clip each call)")
    pitch: int | None = Field(None, ge=0, le=99, description="espeak pitch (0-99)")
    instructions: str | None = Field(None, description="openai: speaking-style instructions")
    max_chars: int | None = Field(None, ge=20, description="characters per call (backend "
                                  "default when unset); longer text is split at sentences")
    pause_ms: int = Field(300, ge=0, le=3000, description="pause between split sentences")
    # -- HTTP --
    base_url: str | None = None
    api_key_env: str | None = Field(None, description="env var holding the API key")
    url_path: str | None = None
    fields: dict[str, str | None] = Field(default_factory=dict, description="request field "
                                          "names: logical name -> server name (null: omit)")
    extra_fields: dict[str, Any] = Field(default_factory=dict)
    ref_audio_as: Literal["data_uri", "file_uri", "url"] = "data_uri"
    response_format: Literal["wav", "pcm", "flac", "mp3"] | None = None
    sample_rate: int | None = Field(None, ge=8000, le=192000,
                                    description="sample rate of pcm responses")
    prompt_sample_rate: int | None = Field(None, ge=8000, le=192000)
    body: Literal["multipart", "json"] = "multipart"
    upload_path: str | None = None
    upload_field: str = "file"
    upload_name_key: str | None = None
    reference_template: str = "{name}"
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0, le=20)
    backoff_s: float = Field(1.0, ge=0)
    max_backoff_s: float = Field(30.0, ge=0)
    max_concurrency: int = Field(4, ge=1, le=256)
    # -- offline voice matching (preset backends) --
    voice_match: VoiceMatchSpec | None = None

    @model_validator(mode="after")
    def _applicable(self) -> TTSSpec:
        allowed = KEYS[self.backend] | _COMMON
        for key in sorted(self.model_fields_set - allowed):
            raise PydanticCustomError(
                "tts_key", "key '{key}' does not apply to backend '{backend}' (its keys: "
                "{keys})", {"key": key, "backend": self.backend,
                            "keys": ", ".join(sorted(allowed - {"backend"}))})
        if self.backend in ("openai_compat", "cosyvoice", "multipart") and not self.base_url:
            raise PydanticCustomError("tts_key", "key '{key}': backend '{backend}' needs the "
                                      "server's base_url", {"key": "base_url",
                                                            "backend": self.backend})
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise PydanticCustomError("tts_key", "key '{key}': must start with http:// or "
                                      "https://", {"key": "base_url"})
        names = FIELD_NAMES.get(self.backend, set())
        for k in self.fields:
            if k not in names:
                raise PydanticCustomError(
                    "tts_key", "key '{key}': unknown field '{field}' (known: {known})",
                    {"key": "fields", "field": k, "known": ", ".join(sorted(names))})
        if self.upload_path and self.backend != "multipart":
            raise PydanticCustomError("tts_key", "key '{key}' applies to backend "
                                      "'multipart' only", {"key": "upload_path"})
        if self.body == "json" and not self.upload_path:
            raise PydanticCustomError("tts_key", "key '{key}': a json body cannot carry the "
                                      "prompt file; set upload_path (upload first, then "
                                      "reference it)", {"key": "body"})
        if self.response_format == "pcm" and self.backend == "openai_compat" \
                and not self.sample_rate:
            raise PydanticCustomError("tts_key", "key '{key}': pcm responses need "
                                      "sample_rate", {"key": "sample_rate"})
        return self


def parse_tts_spec(data: Mapping[str, Any] | TTSSpec, *, stage: str | None = None,
                   prefix: str = "tts") -> TTSSpec:
    """A :class:`TTSSpec` from config data, or a :class:`ConfigError` naming the stage and
    the offending key (``tts.base_url``...)."""
    if isinstance(data, TTSSpec):
        return data
    try:
        return TTSSpec.model_validate(dict(data))
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        key = (err.get("ctx") or {}).get("key")
        parts = [prefix, *loc] + ([key] if key and key not in loc else [])
        raise ConfigError(err.get("msg", str(e)), stage=stage,
                          key=".".join(p for p in parts if p)) from None
