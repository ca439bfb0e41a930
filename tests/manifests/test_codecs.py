"""Codec tokenizers (``speechmill.manifests.tokenizers.codecs``) on tiny random models.

Each model is built with its library's own classes (SNAC, MimiConfig/MimiModel,
EncodecConfig/EncodecModel, HubertConfig/HubertModel) at toy sizes, saved in exactly the
layout the real loaders read (SNAC: ``config.json`` + ``pytorch_model.bin``; transformers:
``save_pretrained``) and loaded through ``load_audio_tokenizer`` offline, the code a
user's config hits. Codebooks of the random RVQs are filled with random vectors (the
libraries initialise them to zeros, which would map every frame to code 0). Real speech
is encoded at a sample rate other than the codec's, so resampling is exercised too.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from speechmill.manifests.tokenizers.base import (
    AudioTokenizerConfig,
    CodecInfo,
    FeatureKMeansTokenizer,
    load_audio_tokenizer,
)
from speechmill.manifests.tokenizers.codecs import DEFAULT_NAMES
from speechmill.pipeline.models import ModelNotFoundError
from testkit.audio import load_speech
from testkit.snac import build_snac

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("snac")
pytest.importorskip("soxr")

SECONDS = 3.0


def _sha12(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _randomise_codebooks(model: torch.nn.Module, scale: float) -> None:
    """Random centroids for every Mimi/EnCodec Euclidean codebook (zeros by default)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith(".embed_sum") or name.endswith("codebook.embed"):
                buf.copy_(torch.randn(buf.shape, generator=g) * scale)


def _build_mimi(d: Path) -> Path:
    from transformers import MimiConfig, MimiModel

    conf = MimiConfig(hidden_size=32, num_filters=4, codebook_size=64, codebook_dim=16,
                      num_quantizers=16, vector_quantization_hidden_dimension=16,
                      upsample_groups=32, num_hidden_layers=1, intermediate_size=32,
                      num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = MimiModel(conf)
    _randomise_codebooks(model, 1.0)
    model.save_pretrained(d)
    return d


def _build_encodec(d: Path) -> Path:
    from transformers import EncodecConfig, EncodecModel

    # time_group_norm (encodec_48khz's norm): a tiny random weight-norm encoder gives
    # nearly constant latents, so every frame would get the same code
    conf = EncodecConfig(hidden_size=16, num_filters=4, codebook_size=1024,
                         num_lstm_layers=1, target_bandwidths=[1.5, 3.0, 6.0, 12.0, 24.0],
                         norm_type="time_group_norm")
    torch.manual_seed(0)
    model = EncodecModel(conf)
    _randomise_codebooks(model, 1.0)
    model.save_pretrained(d)
    return d


def _build_hubert(d: Path, stable: bool = False) -> Path:
    from transformers import HubertConfig, HubertModel

    conf = HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                        num_conv_pos_embedding_groups=2, do_stable_layer_norm=stable,
                        feat_extract_norm="layer" if stable else "group")
    torch.manual_seed(0)
    HubertModel(conf).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("codec_models")
    return {"snac": build_snac(root / "snac_24khz"), "mimi": _build_mimi(root / "mimi"),
            "encodec": _build_encodec(root / "encodec_24khz"),
            "hubert": _build_hubert(root / "hubert-tiny")}


@pytest.fixture(scope="module")
def speech16() -> np.ndarray:
    return load_speech(SECONDS, 16000, seed=3)


def _load(backend: str, path: Path, **kw) -> object:
    cfg = AudioTokenizerConfig(backend=backend, path=str(path), device="cpu", **kw)
    return load_audio_tokenizer(cfg, offline=True)


def _check_codes(codes: np.ndarray, info: CodecInfo) -> None:
    assert isinstance(codes, np.ndarray) and codes.ndim == 2
    assert np.issubdtype(codes.dtype, np.integer)
    assert codes.shape[0] == info.n_codebooks
    frames = codes.shape[1]
    assert abs(frames - SECONDS * info.frame_rate) <= 2, (frames, info.frame_rate)
    for row, size in zip(codes, info.codebook_sizes, strict=True):
        assert row.min() >= 0 and row.max() < size
    assert len(np.unique(codes[0])) > 1  # the random codec really encodes the speech


# -- SNAC --------------------------------------------------------------------------------


def test_snac_multirate_codes(models: dict[str, Path], speech16: np.ndarray) -> None:
    tok = _load("snac", models["snac"])
    info = tok.info
    assert info.name == "snac_24khz"
    from importlib.metadata import version

    # the installed package's version at run time: never a hard-coded release
    assert info.version == f"snac-{version('snac')}+{_sha12(models['snac'] / 'pytorch_model.bin')}"
    assert info.sample_rate == 24000
    assert info.codebook_sizes == [4096] * 3
    assert info.codebook_frame_rates == pytest.approx([24000 / 512 / s for s in (4, 2, 1)])
    assert info.frame_rate == pytest.approx(info.codebook_frame_rates[0])
    CodecInfo.from_dict(json.loads(json.dumps(info.to_dict())))  # serialisable

    speech44 = load_speech(SECONDS, 44100, seed=3)
    codes = tok.encode(speech44, 44100)
    assert isinstance(codes, list) and len(codes) == 3
    n0 = codes[0].size
    assert [c.size for c in codes] == [n0, 2 * n0, 4 * n0]  # 1:2:4
    for c, rate in zip(codes, info.codebook_frame_rates, strict=True):
        assert c.ndim == 1 and np.issubdtype(c.dtype, np.integer)
        assert c.min() >= 0 and c.max() < 4096
        # SNAC pads to 2048 samples: at most one coarse frame over the exact count
        assert SECONDS * rate - 1 <= c.size <= SECONDS * rate + 4
    assert len(np.unique(codes[2])) > 1
    again = tok.encode(speech44, 44100)
    assert all(np.array_equal(a, b) for a, b in zip(codes, again, strict=True))
    # the same speech at 16 kHz resamples to (nearly) the same codes' shape
    assert [c.size for c in tok.encode(speech16, 16000)] == [c.size for c in codes]
    # encode_batch == encode, item by item
    batch = tok.encode_batch([speech44, speech44[:24000]], 44100)
    assert all(np.array_equal(a, b) for a, b in zip(batch[0], codes, strict=True))
    n = -(-round(24000 * 24000 / 44100) // 2048)  # 0.54 s: 13061 samples -> 7 x 2048
    assert [c.size for c in batch[1]] == [n, 2 * n, 4 * n]
    assert [c.size for c in tok.encode(np.zeros(0, np.float32), 16000)] == [0, 0, 0]
    tok.close()


def test_snac_local_model_dir_by_name(models: dict[str, Path], speech16: np.ndarray,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``name`` only, found in $SPEECHMILL_MODELS/snac/<name> (offline)."""
    dst = tmp_path / "models" / "snac" / "hubertsiuzdak" / "snac_24khz"
    shutil.copytree(models["snac"], dst)
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path / "models"))
    tok = load_audio_tokenizer(AudioTokenizerConfig(backend="snac",
                                                    name="hubertsiuzdak/snac_24khz"),
                               offline=True)
    assert tok.info.name == "snac_24khz"
    assert len(tok.encode(speech16, 16000)) == 3


# -- Mimi ------------------------------------------------------------------------------


def test_mimi_codes(models: dict[str, Path], speech16: np.ndarray) -> None:
    tok = _load("mimi", models["mimi"])
    info = tok.info
    assert info.name == "mimi"
    import transformers

    assert info.version == (
        f"transformers-{transformers.__version__}+{_sha12(models['mimi'] / 'model.safetensors')}")
    assert (info.sample_rate, info.frame_rate) == (24000, 12.5)
    assert info.codebook_sizes == [64] * 8  # Moshi's 8 codebooks by default
    assert info.codebook_frame_rates is None
    codes = tok.encode(speech16, 16000)
    _check_codes(codes, info)
    assert np.array_equal(codes, tok.encode(speech16, 16000))
    assert tok.encode(np.zeros(0, np.float32), 16000).shape == (8, 0)

    tok4 = _load("mimi", models["mimi"], n_codebooks=4)
    assert tok4.info.n_codebooks == 4
    codes4 = tok4.encode(speech16, 16000)
    assert np.array_equal(codes4, codes[:4])  # residual VQ: a prefix of the 8
    with pytest.raises(ValueError, match="n_codebooks"):
        _load("mimi", models["mimi"], n_codebooks=17)


# -- EnCodec ---------------------------------------------------------------------------


def test_encodec_bandwidth_codes(models: dict[str, Path], speech16: np.ndarray) -> None:
    tok = _load("encodec", models["encodec"])
    info = tok.info
    assert info.name == "encodec_24khz"
    assert info.version.startswith("transformers-")
    assert info.version.endswith(_sha12(models["encodec"] / "model.safetensors"))
    assert (info.sample_rate, info.frame_rate) == (24000, 75.0)
    assert info.codebook_sizes == [1024] * 8 and info.extra["bandwidth_kbps"] == 6.0
    codes = tok.encode(speech16, 16000)
    _check_codes(codes, info)
    assert codes.shape[1] == int(np.ceil(SECONDS * 24000 / 320))
    assert np.array_equal(codes, tok.encode(speech16, 16000))

    assert _load("encodec", models["encodec"], bandwidth=1.5).info.n_codebooks == 2
    tok4 = _load("encodec", models["encodec"], n_codebooks=4)  # -> 3 kbps
    assert tok4.info.extra["bandwidth_kbps"] == 3.0
    assert np.array_equal(tok4.encode(speech16, 16000), codes[:4])
    with pytest.raises(ValueError, match="bandwidth"):
        _load("encodec", models["encodec"], bandwidth=5.0)


# -- HuBERT + k-means ------------------------------------------------------------------


@pytest.fixture(scope="module")
def codebook(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    from speechmill.manifests.tokenizers import kmeans

    cb = np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32)
    p = tmp_path_factory.mktemp("codebook") / "hubert_km20.npy"
    kmeans.save_codebook(p, cb)
    return p, cb


def test_hubert_kmeans_units(models: dict[str, Path], codebook: tuple[Path, np.ndarray]
                             ) -> None:
    from speechmill.manifests.tokenizers import kmeans

    path, cb = codebook
    tok = _load("hubert-kmeans", models["hubert"], hubert_layer=1, codebook=str(path))
    assert isinstance(tok, FeatureKMeansTokenizer)
    info = tok.info
    assert info.name == "hubert-tiny-l1-km20"
    assert _sha12(models["hubert"] / "model.safetensors") in info.version
    assert info.version.endswith(kmeans.codebook_hash(cb))
    assert (info.sample_rate, info.frame_rate, info.codebook_sizes) == (16000, 50.0, [20])
    assert info.extra["layer"] == 1 and info.extra["dedup"] is False

    speech = load_speech(SECONDS, 22050, seed=4)
    feats = tok.features(speech, 22050)
    assert feats.dtype == np.float32 and feats.shape[1] == 32
    assert abs(feats.shape[0] - SECONDS * 50) <= 2
    units = tok.encode(speech, 22050)
    _check_codes(units, info)
    assert np.array_equal(units, tok.encode(speech, 22050))
    # units are the nearest centroids of the features
    d = ((feats[:, None, :] - cb[None]) ** 2).sum(-1)
    assert np.array_equal(units[0], d.argmin(1))

    dd = _load("hubert-kmeans", models["hubert"], hubert_layer=1, codebook=str(path),
               dedup=True)
    assert dd.info.extra["dedup"] is True
    short = dd.encode(speech, 22050)[0]
    runs = units[0][np.r_[True, units[0][1:] != units[0][:-1]]]
    assert short.size < units.shape[1] and np.array_equal(short, runs)
    assert np.all(short[1:] != short[:-1])


def test_hubert_layer_matches_full_model(models: dict[str, Path], tmp_path: Path) -> None:
    """Dropping the layers above ``hubert_layer`` gives the full model's hidden state at
    that layer (post-norm base and pre-norm 'stable' variants); a layer-norm feature
    encoder (hubert-large style) gets its input normalised as its feature extractor
    would (Wav2Vec2FeatureExtractor, do_normalize=True)."""
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    x = load_speech(1.0, 16000, seed=5)
    for stable in (False, True):
        d = models["hubert"] if not stable else _build_hubert(tmp_path / "stable", True)
        fe = Wav2Vec2FeatureExtractor(do_normalize=stable)
        inp = fe(x, sampling_rate=16000, return_tensors="pt").input_values
        full = HubertModel.from_pretrained(str(d)).eval()
        with torch.inference_mode():
            hs = full(inp, output_hidden_states=True).hidden_states
        for layer in (1, 2):
            tok = _load("hubert-kmeans", d, hubert_layer=layer)
            assert tok.do_normalize is stable
            np.testing.assert_allclose(tok.features(x, 16000), hs[layer][0].numpy(),
                                       rtol=1e-4, atol=2e-5)
    with pytest.raises(ValueError, match="hubert_layer"):
        _load("hubert-kmeans", models["hubert"], hubert_layer=3)


def test_hubert_codebook_fitted_later(models: dict[str, Path]) -> None:
    """No codebook: features work, encode refuses; kmeans.fit_codebook (what the tokenize
    stage runs on the corpus) sets one, and ``info`` follows it."""
    from speechmill.manifests.tokenizers import kmeans

    cfg = AudioTokenizerConfig(backend="hubert-kmeans", path=str(models["hubert"]),
                               device="cpu", hubert_layer=2, n_units=7, fit_max_frames=100)
    tok = load_audio_tokenizer(cfg, offline=True)
    assert tok.codebook is None and tok.info.codebook_sizes == [7]
    assert "unfitted" in tok.info.version
    x = load_speech(1.5, 16000, seed=6)
    with pytest.raises(RuntimeError, match="codebook"):
        tok.encode(x, 16000)
    clips = [(x, 16000), (load_speech(1.0, 8000, seed=7), 8000)]
    meta: dict = {}
    centroids = kmeans.fit_codebook(tok, clips, cfg, meta_out=meta)
    assert tok.codebook is not None and np.array_equal(tok.codebook, centroids)
    assert tok.info.codebook_sizes == [7]
    assert tok.info.version.endswith(kmeans.codebook_hash(centroids))
    assert meta["features"]["layer"] == 2 and meta["frames_used"] == 100
    units = tok.encode(x, 16000)
    assert units.shape == (1, tok.features(x, 16000).shape[0])
    assert np.array_equal(units[0], kmeans.assign(tok.features(x, 16000), centroids))
    assert units.min() >= 0 and units.max() < 7
    with pytest.raises(ValueError, match="codebook"):
        tok.codebook = np.zeros((4, 5), np.float32)


# -- model resolution ------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["snac", "mimi", "encodec", "hubert-kmeans"])
def test_offline_name_without_cache(backend: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = AudioTokenizerConfig(backend=backend, name="someorg/absent-codec")
    with pytest.raises(ModelNotFoundError) as e:
        load_audio_tokenizer(cfg, offline=True)
    msg = str(e.value)
    for part in ("someorg/absent-codec", "SPEECHMILL_MODELS", "library cache",
                 "download (skipped: offline)", "path:"):
        assert part in msg, msg
    # neither name nor path: the backend's usual model is what is looked for
    with pytest.raises(ModelNotFoundError, match=DEFAULT_NAMES[backend]):
        load_audio_tokenizer(AudioTokenizerConfig(backend=backend), offline=True)


def test_hf_cache_is_used_offline(models: dict[str, Path], tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, speech16: np.ndarray
                                  ) -> None:
    """A model in the Hugging Face cache layout (as a download leaves it) loads by name."""
    repo = tmp_path / "hf" / "models--kyutai--mimi"
    shutil.copytree(models["mimi"], repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("SPEECHMILL_MODELS", raising=False)
    tok = load_audio_tokenizer(AudioTokenizerConfig(backend="mimi", name="kyutai/mimi",
                                                    n_codebooks=2), offline=True)
    assert tok.info.name == "mimi" and tok.encode(speech16, 16000).shape[0] == 2


def test_bad_model_dirs(models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        _load("snac", tmp_path / "nowhere")
    half = tmp_path / "half_snac"
    half.mkdir()
    shutil.copy(models["snac"] / "config.json", half)
    with pytest.raises(ModelNotFoundError, match="pytorch_model.bin"):
        _load("snac", half)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        _load("encodec", empty)
