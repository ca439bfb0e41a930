"""The tokenizer interfaces every exporter and the ``tokenize`` stage use.

An audio tokenizer maps mono float32 audio at any sample rate to integer codes shaped
``[n_codebooks, frames]`` and describes itself with a :class:`CodecInfo` that is written
into every shard's metadata (name, version, sample rate, frame rate, codebook sizes), so a
trainer can check what it reads. A text tokenizer maps text to token ids and names
itself the same way.

Backends register a loader with :func:`register_audio` / :func:`register_text`; the
``tokenize`` stage looks them up by the ``backend`` key of its config. Tokenizers that
quantise features with k-means (log-mel units, HuBERT units) subclass
:class:`FeatureKMeansTokenizer`: they need a codebook, which is either given (a ``.npy``
/ ``.npz`` path) or fitted on the corpus by the stage's driver-side ``prepare`` pass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class CodecInfo:
    """Identity of an audio tokenizer, recorded with every code it produced."""

    name: str  # e.g. "snac_24khz", "kmeans-mel"
    version: str  # library version and/or a hash of the weights / codebook
    sample_rate: int  # the rate the tokenizer consumes (audio is resampled to it)
    frame_rate: float  # code frames per second (per codebook 0 for multi-rate codecs)
    codebook_sizes: list[int] = field(default_factory=list)  # one per codebook
    #: frames per second of each codebook when they differ (SNAC: 12, 23, 47 Hz)
    codebook_frame_rates: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_codebooks(self) -> int:
        return len(self.codebook_sizes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CodecInfo:
        return cls(**d)


@dataclass(frozen=True)
class TextTokenizerInfo:
    name: str  # e.g. "hf:Qwen/Qwen2-0.5B", "whisper:multilingual"
    version: str  # sha256 prefix of tokenizer.json, or library version
    vocab_size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TextTokenizerInfo:
        return cls(**d)


class AudioTokenizer(ABC):
    info: CodecInfo

    @abstractmethod
    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray | list[np.ndarray]:
        """Codes of mono float32 ``audio`` at ``sr``: an int array ``[n_codebooks, frames]``,
        or, for codecs whose codebooks run at different frame rates (SNAC), a list of
        1-D int arrays, one per codebook."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release models (GPU memory)."""


class FeatureKMeansTokenizer(AudioTokenizer):
    """Units = nearest k-means centroid of per-frame features (one codebook)."""

    codebook: np.ndarray | None = None  # [k, dim] float32

    @abstractmethod
    def features(self, audio: np.ndarray, sr: int) -> np.ndarray:
        """Per-frame features ``[frames, dim]`` (float32)."""


class TextTokenizer(ABC):
    info: TextTokenizerInfo

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        ...


class AudioTokenizerConfig(BaseModel):
    """How a DAG names an audio tokenizer (``tokenize.with.audio``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["kmeans-mel", "hubert-kmeans", "snac", "mimi", "encodec"] = "kmeans-mel"
    name: str | None = Field(None, description="model name on the HF hub (online) e.g. "
                             "hubertsiuzdak/snac_24khz, kyutai/mimi, facebook/encodec_24khz")
    path: str | None = Field(None, description="local model directory (wins over name)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # k-means backends
    n_units: int = Field(500, ge=2, le=65535, description="k-means codebook size")
    codebook: str | None = Field(None, description="a fitted codebook (.npy); absent: fit "
                                 "one on this stage's input")
    fit_max_frames: int = Field(200_000, ge=100, description="frames sampled for fitting")
    seed: int = 0
    dedup: bool = Field(False, description="drop consecutive duplicate units (SpeechGPT)")
    n_mels: int = Field(80, ge=8, le=256)
    hubert_layer: int = Field(6, ge=1, description="HuBERT hidden layer to quantise")
    # neural codecs
    n_codebooks: int | None = Field(None, ge=1, description="Mimi/EnCodec: codebooks kept")
    bandwidth: float | None = Field(None, description="EnCodec target bandwidth (kbps)")


class TextTokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["hf", "whisper"] = "whisper"
    path: str | None = Field(None, description="hf: a tokenizer.json file or a directory "
                             "holding one")
    name: str | None = Field(None, description="hf: hub repo id (online); whisper: "
                             "'multilingual' or 'gpt2' (English)")


AudioLoader = Callable[[AudioTokenizerConfig, bool], AudioTokenizer]
TextLoader = Callable[[TextTokenizerConfig, bool], TextTokenizer]
_AUDIO: dict[str, AudioLoader] = {}
_TEXT: dict[str, TextLoader] = {}


def register_audio(backend: str, loader: AudioLoader) -> None:
    _AUDIO[backend] = loader


def register_text(backend: str, loader: TextLoader) -> None:
    _TEXT[backend] = loader


def load_audio_tokenizer(cfg: AudioTokenizerConfig, offline: bool = False) -> AudioTokenizer:
    """``offline`` forbids downloads (a missing model raises ModelNotFoundError)."""
    from speechmill.manifests.tokenizers import ensure_registered

    ensure_registered()
    if cfg.backend not in _AUDIO:
        raise ValueError(_missing("audio", cfg.backend))
    return _AUDIO[cfg.backend](cfg, offline)


def load_text_tokenizer(cfg: TextTokenizerConfig, offline: bool = False) -> TextTokenizer:
    from speechmill.manifests.tokenizers import ensure_registered

    ensure_registered()
    if cfg.backend not in _TEXT:
        raise ValueError(_missing("text", cfg.backend))
    return _TEXT[cfg.backend](cfg, offline)


def _missing(kind: str, backend: str) -> str:
    from speechmill.manifests.tokenizers import IMPORT_ERRORS

    why = "; ".join(f"{m}: {e}" for m, e in IMPORT_ERRORS.items()) or "not registered"
    return f"{kind} tokenizer backend {backend!r} is unavailable ({why})"


def as_code_list(codes: np.ndarray | list[np.ndarray]) -> list[list[int]]:
    """Codes as nested Python lists (one per codebook), for Arrow columns."""
    if isinstance(codes, np.ndarray):
        return [[int(v) for v in row] for row in np.atleast_2d(codes)]
    return [[int(v) for v in np.asarray(c).ravel()] for c in codes]
