"""Neural audio codecs and HuBERT units as audio tokenizers.

Backends (``tokenize.with.audio.backend``), each a :class:`AudioTokenizer` loaded by
:func:`speechmill.manifests.tokenizers.base.load_audio_tokenizer`:

* ``snac``: the ``snac`` package's SNAC (``hubertsiuzdak/snac_24khz``, Mini-Omni). Codes
  are multi-rate: a list of 1-D arrays, one per codebook (12/23/47 Hz at 24 kHz, a 1:2:4
  ratio); the directory holds ``config.json`` + ``pytorch_model.bin`` (the hub layout
  ``SNAC.from_pretrained`` reads).
* ``mimi``: transformers ``MimiModel`` (``kyutai/mimi``, Moshi), 12.5 Hz at 24 kHz; keeps
  ``n_codebooks`` codebooks (default 8, as Moshi uses).
* ``encodec``: transformers ``EncodecModel`` (``facebook/encodec_24khz``), 75 Hz;
  ``bandwidth`` (kbps) picks the number of codebooks (default 6 kbps = 8 codebooks, as
  VALL-E uses), or ``n_codebooks`` picks the smallest bandwidth giving at least that many.
* ``hubert-kmeans``: transformers ``HubertModel`` (``facebook/hubert-base-ls960``,
  mHuBERT, ...) hidden layer ``hubert_layer`` at 50 Hz (16 kHz input), quantised to the
  nearest centroid of a k-means codebook (``codebook``: a file, or fitted on the corpus by
  the ``tokenize`` stage through :class:`FeatureKMeansTokenizer`); ``dedup`` drops
  consecutive repeats (SpeechGPT).

Weights come from ``path`` (a local directory in the hub layout, e.g. a
``save_pretrained`` directory) or ``name`` (a hub id) through
:func:`speechmill.pipeline.models.resolve`: ``$SPEECHMILL_MODELS/<backend>/<name>``, then
the Hugging Face cache (``$HF_HUB_CACHE`` / ``$HF_HOME/hub``), then a download unless
offline. Without either, a backend's usual model name is used. A missing model is a
:class:`~speechmill.pipeline.models.ModelNotFoundError` naming what was tried.

Audio is mono float32 at any rate; it is resampled (soxr, HQ) to the codec's rate. One
utterance is encoded at a time (no padding, so codes never depend on batch neighbours);
:func:`encode_batch` encodes several. Heavy libraries are imported on first use only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from speechmill.manifests.tokenizers.base import (
    AudioTokenizer,
    AudioTokenizerConfig,
    CodecInfo,
    FeatureKMeansTokenizer,
    register_audio,
)
from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    Resolved,
    register_cache,
    register_downloader,
    resolve,
)

#: model used when a config gives neither ``name`` nor ``path``
DEFAULT_NAMES = {
    "snac": "hubertsiuzdak/snac_24khz",
    "mimi": "kyutai/mimi",
    "encodec": "facebook/encodec_24khz",
    "hubert-kmeans": "facebook/hubert-base-ls960",
}
#: the ModelSpec backend (and ``$SPEECHMILL_MODELS`` sub-directory) of each tokenizer backend
MODEL_BACKENDS = {"snac": "snac", "mimi": "mimi", "encodec": "encodec",
                  "hubert-kmeans": "hubert"}
MIMI_DEFAULT_CODEBOOKS = 8  # Moshi models the first 8 of Mimi's 32 codebooks
ENCODEC_DEFAULT_BANDWIDTH = 6.0  # kbps: 8 codebooks at 24 kHz (VALL-E)
HUBERT_SAMPLE_RATE = 16000
HUBERT_MIN_SAMPLES = 400  # the conv front end's receptive field (one frame)

SNAC_FILES = ("config.json", "pytorch_model.bin")
# transformers weight files, in the order from_pretrained prefers them
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
              "pytorch_model.bin.index.json")


# -- helpers -----------------------------------------------------------------------------


def to_mono(audio: np.ndarray) -> np.ndarray:
    """Float32 mono: 2-D input is ``(samples, channels)`` and is averaged."""
    x = np.asarray(audio, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)
    elif x.ndim != 1:
        raise ValueError(f"audio must be 1-D (mono) or 2-D (samples, channels), got {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def resample(audio: np.ndarray, sr: int, target: int) -> np.ndarray:
    """Mono float32 ``audio`` at ``target`` Hz (soxr HQ)."""
    x = to_mono(audio)
    if int(sr) == int(target) or x.size == 0:
        return x
    import soxr

    return np.ascontiguousarray(soxr.resample(x, int(sr), int(target), quality="HQ"),
                                dtype=np.float32)


def sha256_file(path: str | os.PathLike[str], block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _lib_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _version(dist: str, weights: Path) -> str:
    """``<library>-<version>+<sha256 of the weights, 12 hex>``."""
    return f"{dist}-{_lib_version(dist)}+{sha256_file(weights)[:12]}"


def _hf_weights(d: Path) -> Path | None:
    for f in HF_WEIGHTS:
        if (d / f).is_file():
            return d / f
    return None


def _model_name(cfg: AudioTokenizerConfig, location: str) -> str:
    """``snac_24khz`` for ``hubertsiuzdak/snac_24khz``; else the model directory's name
    (``models--org--name/snapshots/<sha>`` in the HF cache gives ``name``)."""
    if cfg.name and not cfg.path:
        return cfg.name.rstrip("/").split("/")[-1]
    p = Path(location)
    if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
        return p.parent.parent.name.split("--")[-1]
    return p.name


def _device(resolved: Resolved) -> str:
    dev = resolved.device
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' asked for, but torch sees no CUDA device")
    return dev


def _resolve(cfg: AudioTokenizerConfig, offline: bool) -> Resolved:
    name = cfg.name or (None if cfg.path else DEFAULT_NAMES[cfg.backend])
    spec = ModelSpec(backend=MODEL_BACKENDS[cfg.backend], name=name, path=cfg.path,
                     device=cfg.device)
    return resolve(spec, offline=offline)


def _require(d: Path, files: Sequence[str], what: str, hint: str) -> None:
    if not d.is_dir():
        raise ModelNotFoundError(f"{what}: {str(d)!r} is not a directory ({hint})")
    missing = [f for f in files if not (d / f).is_file()]
    if missing:
        raise ModelNotFoundError(f"{what}: {str(d)!r} lacks {', '.join(missing)} ({hint})")


# -- Hugging Face cache and download (one per model backend) ---------------------------


def hf_cache_dir() -> Path:
    """The hub cache, read from the environment at call time (as huggingface_hub does at
    import): ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return Path(os.environ.get("HF_HOME", xdg / "huggingface")).expanduser() / "hub"


def _complete(d: Path, snac: bool) -> bool:
    if snac:
        return all((d / f).is_file() for f in SNAC_FILES)
    return (d / "config.json").is_file() and _hf_weights(d) is not None


def _hf_cache(snac: bool) -> Callable[[str], Path | None]:
    def cached(name: str) -> Path | None:
        if "/" not in name:
            return None
        try:
            from huggingface_hub import snapshot_download

            p = Path(snapshot_download(name, cache_dir=hf_cache_dir(), local_files_only=True))
        except Exception:  # not cached (LocalEntryNotFoundError), or no huggingface_hub
            return None
        return p if _complete(p, snac) else None

    return cached


def _hf_download(snac: bool) -> Callable[[str], str]:
    def download(name: str) -> str:
        from huggingface_hub import snapshot_download

        kw: dict[str, Any] = {"cache_dir": hf_cache_dir()}
        if snac:
            return snapshot_download(name, allow_patterns=list(SNAC_FILES), **kw)
        p = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"], **kw))
        if _hf_weights(p) is None:  # an older repo with only PyTorch pickles
            p = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"],
                                       **kw))
        return str(p)

    return download


for _backend in ("snac", "mimi", "encodec", "hubert"):
    register_cache(_backend, _hf_cache(_backend == "snac"))
    register_downloader(_backend, _hf_download(_backend == "snac"))


# -- common torch plumbing -------------------------------------------------------------


class _TorchTokenizer(AudioTokenizer):
    """Holds one torch model on one device; subclasses implement :meth:`_encode`."""

    model: Any = None
    device: str = "cpu"
    sample_rate: int = 24000

    def _tensor(self, audio: np.ndarray, sr: int) -> Any:
        import torch

        x = resample(audio, sr, self.sample_rate)
        return torch.from_numpy(x).to(self.device)

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray | list[np.ndarray]:
        import torch

        if self.model is None:
            raise RuntimeError(f"{type(self).__name__} is closed")
        x = self._tensor(audio, sr)
        with torch.inference_mode():
            return self._encode(x)

    def _encode(self, x: Any) -> np.ndarray | list[np.ndarray]:
        raise NotImplementedError

    def encode_batch(self, audios: Sequence[np.ndarray], sr: int | Sequence[int]
                     ) -> list[np.ndarray | list[np.ndarray]]:
        """Codes of several utterances (each exactly as :meth:`encode` gives it)."""
        return encode_batch(self, audios, sr)

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def encode_batch(tokenizer: AudioTokenizer, audios: Sequence[np.ndarray],
                 sr: int | Sequence[int]) -> list[np.ndarray | list[np.ndarray]]:
    """Codes of several utterances with any audio tokenizer, one at a time: the codecs
    here take no padding mask (Mimi's transformer would attend to padding), so padded
    batches would change the codes; per-utterance encoding keeps them exact."""
    srs = [int(sr)] * len(audios) if isinstance(sr, int | np.integer) else [int(s) for s in sr]
    if len(srs) != len(audios):
        raise ValueError(f"{len(audios)} utterances but {len(srs)} sample rates")
    return [tokenizer.encode(a, s) for a, s in zip(audios, srs, strict=True)]


def _codes(t: Any) -> np.ndarray:
    return t.detach().to("cpu").numpy().astype(np.int64, copy=False)


# -- SNAC --------------------------------------------------------------------------------


class SnacTokenizer(_TorchTokenizer):
    """SNAC codes: a list of 1-D int64 arrays, coarse to fine (rates 1:2:4 for 24 kHz).

    SNAC pads the input to a multiple of ``hop_length * vq_strides[0]`` samples (2048 at
    24 kHz), so each codebook has ``ceil(samples / 2048) * (vq_strides[0] / stride)``
    frames, as SNAC itself (and Mini-Omni) produce them."""

    def __init__(self, location: str, name: str, device: str) -> None:
        from snac import SNAC

        d = Path(location)
        _require(d, SNAC_FILES, "SNAC model", "the layout of hubertsiuzdak/snac_24khz: "
                 "config.json with SNAC's constructor arguments + pytorch_model.bin")
        model = SNAC.from_pretrained(str(d))  # the library's loader (local directory)
        self.model = model.to(device).eval()
        self.device = device
        self.sample_rate = int(model.sampling_rate)
        hop = int(model.hop_length)
        strides = [int(s) for s in model.vq_strides]
        rates = [self.sample_rate / hop / s for s in strides]
        self.info = CodecInfo(
            name=name,
            version=_version("snac", d / "pytorch_model.bin"),
            sample_rate=self.sample_rate,
            frame_rate=rates[0],
            codebook_sizes=[int(model.codebook_size)] * len(strides),
            codebook_frame_rates=rates,
            extra={"hop_length": hop, "vq_strides": strides,
                   "pad_multiple": hop * math.lcm(strides[0], model.attn_window_size or 1)},
        )

    def _encode(self, x: Any) -> list[np.ndarray]:
        if x.numel() == 0:
            return [np.zeros(0, np.int64) for _ in self.info.codebook_sizes]
        codes = self.model.encode(x.view(1, 1, -1))
        return [_codes(c[0]) for c in codes]


def _load_snac(cfg: AudioTokenizerConfig, offline: bool) -> AudioTokenizer:
    r = _resolve(cfg, offline)
    return SnacTokenizer(r.location, _model_name(cfg, r.location), _device(r))


# -- transformers codecs ---------------------------------------------------------------


def _hf_dir(location: str, what: str, hint: str) -> tuple[Path, Path]:
    d = Path(location)
    _require(d, ["config.json"], what, hint)
    w = _hf_weights(d)
    if w is None:
        raise ModelNotFoundError(f"{what}: {str(d)!r} lacks weights (one of "
                                 f"{', '.join(HF_WEIGHTS)}; {hint})")
    return d, w


class MimiTokenizer(_TorchTokenizer):
    """Mimi codes ``[n_codebooks, frames]`` (12.5 Hz; codebook 0 is the semantic one)."""

    def __init__(self, location: str, name: str, device: str, n_codebooks: int | None) -> None:
        from transformers import MimiConfig, MimiModel

        d, weights = _hf_dir(location, "Mimi model", "a MimiModel.save_pretrained directory, "
                             "e.g. kyutai/mimi")
        kw: dict[str, Any] = {}
        if isinstance(getattr(MimiConfig, "decoder_config", None), property):
            kw["decoder_config"] = None  # encoder only: half the memory
        model = MimiModel.from_pretrained(str(d), **kw)
        conf = model.config
        n = int(n_codebooks or MIMI_DEFAULT_CODEBOOKS)
        lo, hi = int(conf.num_semantic_quantizers), int(conf.num_quantizers)
        if not lo <= n <= hi:
            raise ValueError(f"Mimi n_codebooks must be in [{lo}, {hi}], got {n}")
        self.n_codebooks = n
        self.model = model.to(device).eval()
        self.device = device
        self.sample_rate = int(conf.sampling_rate)
        self.info = CodecInfo(
            name=name,
            version=_version("transformers", weights),
            sample_rate=self.sample_rate,
            frame_rate=float(conf.frame_rate),
            codebook_sizes=[int(conf.codebook_size)] * n,
            extra={"num_quantizers": hi, "num_semantic_quantizers": lo},
        )

    def _encode(self, x: Any) -> np.ndarray:
        if x.numel() == 0:
            return np.zeros((self.n_codebooks, 0), np.int64)
        out = self.model.encode(x.view(1, 1, -1), num_quantizers=self.n_codebooks)
        return _codes(out.audio_codes[0])


def _load_mimi(cfg: AudioTokenizerConfig, offline: bool) -> AudioTokenizer:
    r = _resolve(cfg, offline)
    return MimiTokenizer(r.location, _model_name(cfg, r.location), _device(r), cfg.n_codebooks)


class EncodecTokenizer(_TorchTokenizer):
    """EnCodec codes ``[n_codebooks, frames]`` (75 Hz for the 24 kHz model). Models that
    encode in overlapping chunks (``chunk_length_s``, the 48 kHz model) are refused: their
    codes do not form one sequence."""

    def __init__(self, location: str, name: str, device: str, bandwidth: float | None,
                 n_codebooks: int | None) -> None:
        from transformers import EncodecModel

        d, weights = _hf_dir(location, "EnCodec model", "an EncodecModel.save_pretrained "
                             "directory, e.g. facebook/encodec_24khz")
        model = EncodecModel.from_pretrained(str(d))
        conf = model.config
        if conf.chunk_length is not None:
            raise ValueError(f"EnCodec model {name!r} encodes in overlapping chunks "
                             f"(chunk_length_s={conf.chunk_length_s}); use a model without "
                             "chunking such as facebook/encodec_24khz")
        bws = [float(b) for b in conf.target_bandwidths]
        per_bw = {b: model.quantizer.get_num_quantizers_for_bandwidth(b) for b in bws}
        if bandwidth is not None:
            if float(bandwidth) not in per_bw:
                raise ValueError(f"EnCodec bandwidth {bandwidth} kbps is not one of {bws}")
            bw = float(bandwidth)
            n = per_bw[bw] if n_codebooks is None else int(n_codebooks)
            if n > per_bw[bw]:
                raise ValueError(f"EnCodec at {bw} kbps has {per_bw[bw]} codebooks; "
                                 f"n_codebooks={n} asks for more")
        elif n_codebooks is not None:
            n = int(n_codebooks)
            ok = [b for b in bws if per_bw[b] >= n]
            if not ok:
                raise ValueError(f"EnCodec has at most {max(per_bw.values())} codebooks "
                                 f"({bws} kbps); n_codebooks={n}")
            bw = min(ok, key=lambda b: per_bw[b])
        else:
            bw = ENCODEC_DEFAULT_BANDWIDTH if ENCODEC_DEFAULT_BANDWIDTH in per_bw else bws[0]
            n = per_bw[bw]
        self.bandwidth, self.n_codebooks = bw, n
        self.channels = int(conf.audio_channels)
        self.model = model.to(device).eval()
        self.device = device
        self.sample_rate = int(conf.sampling_rate)
        self.info = CodecInfo(
            name=name,
            version=_version("transformers", weights),
            sample_rate=self.sample_rate,
            frame_rate=float(conf.frame_rate),
            codebook_sizes=[int(conf.codebook_size)] * n,
            extra={"bandwidth_kbps": bw},
        )

    def _encode(self, x: Any) -> np.ndarray:
        if x.numel() == 0:
            return np.zeros((self.n_codebooks, 0), np.int64)
        x = x.view(1, 1, -1).expand(1, self.channels, -1)
        out = self.model.encode(x, bandwidth=self.bandwidth, return_dict=True)
        return _codes(out.audio_codes[0, 0, : self.n_codebooks])


def _load_encodec(cfg: AudioTokenizerConfig, offline: bool) -> AudioTokenizer:
    r = _resolve(cfg, offline)
    return EncodecTokenizer(r.location, _model_name(cfg, r.location), _device(r),
                            cfg.bandwidth, cfg.n_codebooks)


# -- HuBERT + k-means --------------------------------------------------------------------


class HubertKMeansTokenizer(FeatureKMeansTokenizer):
    """HuBERT units: layer ``hubert_layer``'s output (50 Hz) quantised to the nearest
    k-means centroid; codes ``[1, frames]`` (fewer frames with ``dedup``).

    The codebook is given (``codebook``: a file :func:`kmeans.load_codebook` reads) or set
    later (``tok.codebook = centroids``, after fitting on :meth:`features` of the corpus);
    ``info`` follows the codebook in place (its size and hash). Layers above
    ``hubert_layer`` are dropped at load: they would not change the features.
    """

    def __init__(self, location: str, name: str, device: str, cfg: AudioTokenizerConfig) -> None:
        from torch import nn
        from transformers import HubertModel

        d, weights = _hf_dir(location, "HuBERT model", "a HubertModel.save_pretrained "
                             "directory, e.g. facebook/hubert-base-ls960")
        model = HubertModel.from_pretrained(str(d))
        conf = model.config
        n_layers = int(conf.num_hidden_layers)
        layer = int(cfg.hubert_layer)
        if layer > n_layers:
            raise ValueError(f"hubert_layer={layer} but the model has {n_layers} layers")
        # keep layers 1..layer: the last hidden state is then layer `layer`'s output
        # (hidden_states[layer]); pre-norm models apply a final LayerNorm after the last
        # layer, which fairseq's extract_features(output_layer=L) leaves out: so do we
        model.encoder.layers = model.encoder.layers[:layer]
        if conf.do_stable_layer_norm:
            model.encoder.layer_norm = nn.Identity()
        self.model = model.to(device).eval()
        self.device = device
        self.layer, self.dedup, self.n_units = layer, bool(cfg.dedup), int(cfg.n_units)
        self.dim = int(conf.hidden_size)
        self.do_normalize = _do_normalize(d, conf)
        self.frame_rate = HUBERT_SAMPLE_RATE / math.prod(int(s) for s in conf.conv_stride)
        self._base = {"name": f"{name}-l{layer}", "model": name,
                      "weights": _version("transformers", weights)}
        self._codebook: np.ndarray | None = None
        self._codebook_hash = ""
        self._info: CodecInfo | None = None
        if cfg.codebook:
            from speechmill.manifests.tokenizers.kmeans import load_codebook

            self.codebook = load_codebook(cfg.codebook)[0]

    # the codebook, validated and hashed whenever it is set
    @property  # type: ignore[override]
    def codebook(self) -> np.ndarray | None:
        return self._codebook

    @codebook.setter
    def codebook(self, value: np.ndarray | None) -> None:
        if value is None:
            self._codebook, self._codebook_hash = None, ""
        else:
            from speechmill.manifests.tokenizers.kmeans import codebook_hash

            cb = np.ascontiguousarray(value, dtype=np.float32)
            if cb.ndim != 2 or cb.shape[1] != self.dim or cb.shape[0] < 1:
                raise ValueError(f"HuBERT codebook must be [k, {self.dim}] (hidden size), "
                                 f"got {cb.shape}")
            self._codebook = cb
            self._codebook_hash = codebook_hash(cb)
        self._info = None

    @property  # type: ignore[override]
    def info(self) -> CodecInfo:
        """``name`` ``<model>-l<layer>-km<k>``; ``version`` the weights' and the codebook's
        hashes (``km-unfitted`` until a codebook is set)."""
        if self._info is None:
            k = self.n_units if self._codebook is None else int(self._codebook.shape[0])
            self._info = CodecInfo(
                name=f"{self._base['name']}-km{k}",
                version=f"{self._base['weights']};{self._codebook_hash or 'km-unfitted'}",
                sample_rate=HUBERT_SAMPLE_RATE,
                frame_rate=self.frame_rate,
                codebook_sizes=[k],
                extra={"model": self._base["model"], "layer": self.layer,
                       "dedup": self.dedup, "do_normalize": self.do_normalize},
            )
        return self._info

    def features(self, audio: np.ndarray, sr: int) -> np.ndarray:
        """Layer ``hubert_layer`` output ``[frames, hidden_size]`` float32 (50 Hz)."""
        import torch

        if self.model is None:
            raise RuntimeError("HubertKMeansTokenizer is closed")
        x = resample(audio, sr, HUBERT_SAMPLE_RATE)
        if x.size == 0:
            return np.zeros((0, self.dim), np.float32)
        if x.size < HUBERT_MIN_SAMPLES:
            x = np.pad(x, (0, HUBERT_MIN_SAMPLES - x.size))
        if self.do_normalize:  # as Wav2Vec2FeatureExtractor(do_normalize=True)
            x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
        t = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)[None]
        with torch.inference_mode():
            h = self.model(t).last_hidden_state[0]
        return h.float().cpu().numpy()

    def encode(self, audio: np.ndarray, sr: int) -> np.ndarray:
        if self._codebook is None:
            raise RuntimeError("hubert-kmeans has no codebook: give `codebook:` or let the "
                               "tokenize stage fit one (set `.codebook`)")
        from speechmill.manifests.tokenizers.kmeans import assign, dedup_consecutive

        feats = self.features(audio, sr)
        if feats.shape[0] == 0:
            return np.zeros((1, 0), np.int64)
        units = np.asarray(assign(feats, self._codebook), dtype=np.int64).ravel()
        if self.dedup:
            units = np.asarray(dedup_consecutive(units), dtype=np.int64).ravel()
        return units[None, :]

    def encode_batch(self, audios: Sequence[np.ndarray], sr: int | Sequence[int]
                     ) -> list[np.ndarray | list[np.ndarray]]:
        return encode_batch(self, audios, sr)

    def close(self) -> None:
        dev, self.model = self.device, None
        if dev.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


def _do_normalize(d: Path, conf: Any) -> bool:
    """The waveform normalisation the model was trained with: its feature extractor's
    ``do_normalize`` (``preprocessor_config.json``), else what the HF conversion of
    fairseq checkpoints writes there: True for a layer-norm feature encoder (hubert-large),
    False for a group-norm one (hubert-base, mHuBERT)."""
    p = d / "preprocessor_config.json"
    if p.is_file():
        try:
            v = json.loads(p.read_text()).get("do_normalize")
        except (OSError, ValueError):
            v = None
        if v is not None:
            return bool(v)
    return getattr(conf, "feat_extract_norm", "group") == "layer"


def _load_hubert(cfg: AudioTokenizerConfig, offline: bool) -> AudioTokenizer:
    r = _resolve(cfg, offline)
    return HubertKMeansTokenizer(r.location, _model_name(cfg, r.location), _device(r), cfg)


register_audio("snac", _load_snac)
register_audio("mimi", _load_mimi)
register_audio("encodec", _load_encodec)
register_audio("hubert-kmeans", _load_hubert)
