"""pyannote.audio 4 speaker diarization behind the ``diarize`` stage (``backend: pyannote``).

**Which pipeline.** A pyannote pipeline is a directory holding ``config.yaml`` (plus, for
``pyannote/speaker-diarization-community-1``, the ``segmentation/``, ``embedding/`` and
``plda/`` sub-folders its config names as ``$model/<sub>``), or a Hugging Face hub id.
It is found with :func:`speechmill.pipeline.models.resolve` (backend ``pyannote``):

1. ``path`` -- a local directory with ``config.yaml`` (or the ``config.yaml`` itself);
2. ``$SPEECHMILL_MODELS/pyannote/<pipeline>`` (e.g.
   ``$SPEECHMILL_MODELS/pyannote/pyannote/speaker-diarization-community-1``);
3. the Hugging Face cache (a snapshot that already holds the pipeline's ``config.yaml``);
4. a download by pyannote itself from the hub (never with ``--offline``), with the token
   read from the environment variable named by ``token_env`` (default ``HF_TOKEN``).

``pyannote/speaker-diarization-3.1`` also loads (pyannote 4 reads its config), but its
config names hub models and pyannote 4 adds the community-1 PLDA by default, so it needs
the hub (or a local copy whose ``config.yaml`` points at local paths and a ``plda``).
With ``offline``, a local ``config.yaml`` that still names hub assets is refused before
any work starts, naming them.

**The token** is read from the environment when the pipeline loads and handed to pyannote
only; it never enters configs, logs, rejects, metrics or error messages (messages from
pyannote/huggingface_hub are scrubbed of it). Note that pyannote ignores tokens that do
not start with ``hf_`` for hub downloads. On a Ray cluster the variable must be set on the
workers (e.g. through the job's runtime environment).

**Telemetry.** pyannote.audio 4 sends usage metrics to pyannote.ai unless
``PYANNOTE_METRICS_ENABLED`` is false; this module sets it to ``false`` before it first
imports pyannote, unless the variable is already set (a batch pipeline should not phone
home, and it may be offline). Set ``PYANNOTE_METRICS_ENABLED=true`` to opt in.

**Output** (:class:`~speechmill.stages.audio_models.speaker.DiarizationResult`, the same as the
``embed-cluster`` backend): turns from ``speaker_diarization`` (turns of different
speakers may overlap), ``overlaps`` = its overlapped-speech regions (``get_overlap()``),
and one L2-normalised embedding per speaker: pyannote's cluster centroid (the mean of the
speaker's chunk embeddings). When pyannote has no usable centroid for a speaker (it pads
missing ones with zeros; a cluster emptied by VBx gives NaN), the speaker's longest
non-overlapped turns (up to :data:`FALLBACK_EMBED_S` seconds; all its turns if it never
speaks alone) are embedded with the pipeline's own embedding model instead. A speaker
with less than :data:`FALLBACK_MIN_S` seconds of speech (too short for any segment
anyway) or whose fallback fails has no embedding; its segments, if any, keep a file-local
speaker id in ``link_speakers``. Labels are ``SPK0``, ``SPK1``, ... in order
of first appearance; times are clipped to the audio.

**Memory.** pyannote processes the whole waveform at once: the 16 kHz float32 signal
(~0.23 GB per hour; pyannote may make working copies), segmentation scores (~25 MB/h) and chunk
embeddings (~11 MB/h with community-1's 1 s step). Clustering (VBx after centroid-linkage
AHC) is quadratic in the number of (chunk, local speaker) embeddings -- up to ~10,800
per hour of speech, i.e. up to ~0.5 GB at 1 h and ~7.5 GB at 4 h. Keep
``max_duration_s`` at 1-2 h for this backend (or cut long recordings first) and size the
stage's ``resources.memory_gb`` accordingly.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    Resolved,
    register_cache,
    register_downloader,
    resolve,
)
from speechmill.stages.audio_models.speaker import DiarizationResult

__all__ = [
    "BACKEND",
    "DEFAULT_PIPELINE",
    "FALLBACK_EMBED_S",
    "FALLBACK_MIN_S",
    "PyannoteDiarizer",
    "hub_references",
    "load",
    "locate",
]

BACKEND = "pyannote"
DEFAULT_PIPELINE = "pyannote/speaker-diarization-community-1"
#: Seconds of a speaker's speech embedded when pyannote gives no usable centroid.
FALLBACK_EMBED_S = 30.0
#: Less speech than this (seconds) is not embedded: the speaker keeps no embedding.
FALLBACK_MIN_S = 0.5
#: File names pyannote reads inside a ``$model/<sub>`` folder, per pipeline parameter.
_ASSET_FILES = {
    "segmentation": ("pytorch_model.bin",),
    "embedding": ("pytorch_model.bin",),
    "plda": ("xvec_transform.npz", "plda.npz"),
}
_REDACTED = "<redacted>"

log = logging.getLogger("speechmill")


class _Secret:
    """Holds the token; its repr never shows it."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value or None

    def __repr__(self) -> str:
        return "<secret>" if self.value else "<none>"

    def scrub(self, text: str) -> str:
        return text.replace(self.value, _REDACTED) if self.value else text


# -- resolution ---------------------------------------------------------------------------


def _hf_cache(name: str) -> Path | None:
    """The cached snapshot directory of hub pipeline ``name`` if its config.yaml is cached."""
    if "/" not in name:
        return None
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        cfg = hf_hub_download(name, "config.yaml", local_files_only=True)
    except Exception:
        return None
    return Path(cfg).parent


def _download(name: str) -> str:
    # pyannote downloads the pipeline itself (with the token) when it loads: keep the id
    return name


register_cache(BACKEND, _hf_cache)
register_downloader(BACKEND, _download)


def _where(stage: str, key: str) -> str:
    return f"stage {stage!r}, key {key!r}: "


def _config_file(location: Path) -> Path:
    return location / "config.yaml" if location.is_dir() else location


def hub_references(config_file: Path) -> tuple[list[str], list[str]]:
    """(hub assets, missing local files) named by a pipeline ``config.yaml``.

    Looks at the ``segmentation``, ``embedding`` and ``plda`` parameters of a
    ``SpeakerDiarization`` pipeline: ``$model/<sub>`` must exist under the config's
    directory with the files pyannote reads there; other strings and ``checkpoint``
    mappings are local when the path exists, hub ids otherwise; a parameter left out
    takes pyannote's default, which is on the hub.
    """
    import yaml

    try:
        cfg = yaml.safe_load(config_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read {str(config_file)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("pipeline"), dict):
        raise ValueError(f"{str(config_file)!r} has no 'pipeline' section")
    name = str(cfg["pipeline"].get("name", ""))
    params = cfg["pipeline"].get("params") or {}
    root = config_file.parent
    hub: list[str] = []
    missing: list[str] = []
    if not name.endswith("SpeakerDiarization"):
        return hub, missing
    for key, files in _ASSET_FILES.items():
        value = params.get(key)
        if value is None:
            hub.append(f"{key} (not set: pyannote's default is on the hub)")
            continue
        if isinstance(value, dict):
            value = value.get("checkpoint")
        if not isinstance(value, str):
            continue
        if value.startswith("$model/"):
            sub = root / value[len("$model/"):].split("@", 1)[0]
            missing += [str(sub / f) for f in files if not (sub / f).exists()]
        elif not Path(value).expanduser().exists():
            hub.append(f"{key}: {value}")
    return hub, missing


def locate(pipeline: str, path: str | None, *, offline: bool, stage: str) -> Resolved:
    """Where the pipeline is (no network, nothing heavy imported).

    Raises :class:`ModelNotFoundError` naming the stage and the config key to fix when it
    cannot be found, a local directory lacks ``config.yaml`` or the files it names, or
    (``offline``) the local config still needs the hub.
    """
    key = "with.path" if path else "with.pipeline"
    spec = ModelSpec(backend=BACKEND, name=pipeline, path=path)
    try:
        res = resolve(spec, offline=offline)
    except ModelNotFoundError as e:
        hint = ("" if path else
                "; set `path:` to a local pipeline directory (with config.yaml), or run "
                "online with the token in the environment variable named by `token_env`")
        raise ModelNotFoundError(_where(stage, key) + f"pyannote pipeline: {e}{hint}") from None
    if res.source == "download":
        return res
    try:
        _check_local(res, offline=offline, where=_where(stage, key))
    except ModelNotFoundError:
        if res.source != "cache" or offline:
            raise
        # a partial hub cache: let pyannote fetch what is missing (and use what is there)
        return Resolved(spec, pipeline, "download", res.tried)
    return res


def _check_local(res: Resolved, *, offline: bool, where: str) -> None:
    cfg = _config_file(Path(res.location))
    if not cfg.is_file():
        raise ModelNotFoundError(
            where + f"pyannote pipeline {res.location!r} ({res.source}) has no "
            "config.yaml; give a pipeline directory (as downloaded from the hub: "
            "config.yaml plus the folders it names) or the config.yaml itself")
    try:
        hub, missing = hub_references(cfg)
    except ValueError as e:
        raise ModelNotFoundError(where + f"pyannote pipeline: {e}") from None
    if missing:
        raise ModelNotFoundError(
            where + f"pyannote pipeline {str(cfg)!r} names files that do not exist: "
            f"{', '.join(missing)}")
    if offline and hub:
        raise ModelNotFoundError(
            where + f"pyannote pipeline {str(cfg)!r} needs the hub, which offline runs "
            f"never use: {'; '.join(hub)}. Point these parameters at local paths (or "
            "$model/<folder>) in its config.yaml")


# -- loading ------------------------------------------------------------------------------

_lock = threading.Lock()
# (location, device) -> (pipeline, lock serialising its use)
_PIPELINES: dict[tuple[str, str], tuple[Any, threading.Lock]] = {}


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(resolved: Resolved, *, token_env: str, device: str, stage: str,
         key: str = "with.path") -> PyannoteDiarizer:
    """Load the pipeline ``resolved`` names (once per process and device).

    The token is read from ``$<token_env>`` now and passed to pyannote only. Raises
    :class:`ModelNotFoundError` (naming the stage and ``key``) when pyannote cannot load it.
    """
    if "pyannote.audio.telemetry.metrics" not in sys.modules:  # sets its default on import
        os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    secret = _Secret(os.environ.get(token_env) if token_env else None)
    dev = _device(device)
    cache_key = (resolved.location, dev)
    with _lock:
        hit = _PIPELINES.get(cache_key)
        if hit is None:
            pipe = _load(resolved, secret, dev, stage, key)
            hit = _PIPELINES[cache_key] = (pipe, threading.Lock())
            log.info("diarize: pyannote pipeline %s (%s) on %s", resolved.location,
                     resolved.source, dev)
    return PyannoteDiarizer(hit[0], hit[1], secret)


def _load(resolved: Resolved, secret: _Secret, device: str, stage: str, key: str) -> Any:
    import torch
    from pyannote.audio import Pipeline

    where = _where(stage, key) + f"pyannote pipeline {resolved.location!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = Pipeline.from_pretrained(resolved.location, token=secret.value)
    except Exception as e:
        hint = (" (is the hub reachable, and does the token in the environment variable "
                "named by `token_env` have access to this gated pipeline?)"
                if resolved.source == "download" else "")
        raise ModelNotFoundError(
            f"{where} could not be loaded{hint}: {type(e).__name__}: "
            f"{secret.scrub(str(e))[:500]}") from None
    if pipe is None:  # pyannote returns None when the hub refuses the download
        raise ModelNotFoundError(
            f"{where} could not be downloaded; accept its conditions on the hub and put a "
            "token with access in the environment variable named by `token_env`")
    if not getattr(pipe, "instantiated", True):  # config.yaml without `params:`
        pipe.instantiate(pipe.default_parameters())
    pipe.to(torch.device(device))
    return pipe


# -- running ------------------------------------------------------------------------------


def _finite_unit(v: Any) -> np.ndarray | None:
    x = np.asarray(v, dtype=np.float64).reshape(-1)
    n = float(np.linalg.norm(x)) if x.size else 0.0
    if not np.all(np.isfinite(x)) or n <= 1e-8:
        return None
    return (x / n).astype(np.float32)


def _clip(s: float, e: float, total: float) -> tuple[float, float] | None:
    s, e = max(0.0, float(s)), min(total, float(e))
    return (s, e) if e - s >= 1e-3 else None


class PyannoteDiarizer:
    """A loaded pyannote pipeline: :meth:`diarize` maps audio to a DiarizationResult."""

    def __init__(self, pipeline: Any, lock: threading.Lock, secret: _Secret) -> None:
        self.pipeline = pipeline
        self._lock = lock
        self._secret = secret

    def __repr__(self) -> str:
        return f"PyannoteDiarizer({type(self.pipeline).__name__})"

    def diarize(self, audio: np.ndarray, sr: int, *, num_speakers: int | None = None,
                min_speakers: int | None = None, max_speakers: int | None = None,
                uri: str = "audio") -> DiarizationResult:
        """Diarize mono float32 ``audio`` at ``sr`` (the whole signal in one pass)."""
        import torch

        x = np.asarray(audio, dtype=np.float32)
        if x.ndim == 2:  # (samples, channels)
            x = x.mean(axis=1)
        x = np.ascontiguousarray(x.reshape(-1))
        total = x.shape[0] / sr
        if x.shape[0] == 0:
            return DiarizationResult()
        hints = {k: v for k, v in (("num_speakers", num_speakers),
                                   ("min_speakers", min_speakers),
                                   ("max_speakers", max_speakers)) if v is not None}
        file = {"waveform": torch.from_numpy(x)[None], "sample_rate": int(sr), "uri": uri}
        try:
            with self._lock, warnings.catch_warnings():
                # numerical chatter of pyannote/numpy on short or silent chunks
                warnings.filterwarnings("ignore", message=r".*degrees of freedom.*")
                warnings.filterwarnings("ignore", message=r"Mean of empty slice")
                warnings.filterwarnings("ignore", message=r"invalid value encountered")
                out = self.pipeline(file, **hints)
        except Exception as e:
            raise RuntimeError(
                f"pyannote failed: {type(e).__name__}: {self._secret.scrub(str(e))[:500]}"
            ) from None
        ann = getattr(out, "speaker_diarization", out)
        exclusive = getattr(out, "exclusive_speaker_diarization", None)
        centroids = getattr(out, "speaker_embeddings", None)
        labels = list(ann.labels())

        raw: list[tuple[float, float, Any]] = []
        for seg, _, lab in ann.itertracks(yield_label=True):
            span = _clip(seg.start, seg.end, total)
            if span is not None:
                raw.append((span[0], span[1], lab))
        raw.sort(key=lambda t: (t[0], t[1], labels.index(t[2])))
        order: dict[Any, str] = {}
        for _, _, lab in raw:
            order.setdefault(lab, f"SPK{len(order)}")
        turns = [(s, e, order[lab]) for s, e, lab in raw]
        overlaps = [span for seg in ann.get_overlap()
                    if (span := _clip(seg.start, seg.end, total)) is not None]

        embeddings: dict[str, np.ndarray] = {}
        for lab, name in order.items():
            vec = None
            if centroids is not None and labels.index(lab) < len(centroids):
                vec = _finite_unit(centroids[labels.index(lab)])
            for source in (exclusive, ann):  # non-overlapped speech first
                if vec is None and source is not None:
                    vec = self._fallback_embedding(x, sr, lab, source, total)
            if vec is not None:
                embeddings[name] = vec
        return DiarizationResult(turns=turns, overlaps=overlaps, embeddings=embeddings)

    def _fallback_embedding(self, x: np.ndarray, sr: int, label: Any, ann: Any,
                            total: float) -> np.ndarray | None:
        """Embed the speaker's longest turns (<= FALLBACK_EMBED_S s) with the pipeline's
        own embedding model; None when there is none or it fails."""
        emb: Callable[..., Any] | None = getattr(self.pipeline, "_embedding", None)
        if emb is None or int(getattr(emb, "sample_rate", sr)) != sr:
            return None
        spans = sorted(((s.end - s.start, s.start, s.end) for s, _, lab
                        in ann.itertracks(yield_label=True) if lab == label), reverse=True)
        parts, have = [], 0
        for _, s, e in spans:
            span = _clip(s, e, total)
            if span is None:
                continue
            a, b = int(span[0] * sr), int(span[1] * sr)
            take = min(b - a, int(FALLBACK_EMBED_S * sr) - have)
            if take <= 0:
                break
            parts.append(x[a:a + take])
            have += take
        if have < int(FALLBACK_MIN_S * sr):  # too little speech for a speaker embedding
            return None
        import torch

        wav = torch.from_numpy(np.concatenate(parts))[None, None]
        try:
            with self._lock, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                vec = emb(wav)
        except Exception as e:
            log.warning("diarize: pyannote fallback speaker embedding failed (%s)",
                        type(e).__name__)
            return None
        return _finite_unit(np.asarray(vec)[0])
