"""F5-TTS, Kyutai pocket-tts and XTTS v2 loaded through ``load_backend(TTSSpec(...))``
(the path a user's config takes) from tiny random checkpoints built with the libraries'
own classes (:mod:`tests.synth.tts_models`).

Untrained models make noise, so the tests check what does not depend on training:
shapes, sample rates, durations, determinism under a seed, and that the prompt clip (and,
for F5, its text) reaches the model: by spying on the library call that receives it, and
through F5's output length, which it derives from the prompt's duration and text length.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pytest_audioeval.samples import registry

from speechmill.pipeline.audio import load_audio
from speechmill.pipeline.models import ModelNotFoundError
from speechmill.synth.tts import TTSError, TTSSpec, VoicePrompt, load_backend
from tests.synth import tts_models

pytest.importorskip("f5_tts")
pytest.importorskip("pocket_tts")
pytest.importorskip("TTS")

SAMPLE = Path(registry.__file__).parent / "audio" / "en" / "counting.wav"
SAMPLE_TEXT = "One two three four five six seven eight nine ten."


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tts_models")


@pytest.fixture(scope="module")
def f5_dir(models: Path) -> Path:
    return tts_models.build_f5(models)


@pytest.fixture(scope="module")
def pocket_dir(models: Path) -> Path:
    return tts_models.build_pocket(models)


@pytest.fixture(scope="module")
def xtts_dir(models: Path) -> Path:
    return tts_models.build_xtts(models)


def voice(duration: float | None = None, text: str = "One two three.", offset: float = 0.0,
          vid: str = "spk") -> VoicePrompt:
    return VoicePrompt(vid, str(SAMPLE), text, offset=offset, duration=duration)


# -- F5-TTS ----------------------------------------------------------------------------------


def test_f5_loads_and_clones(f5_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from f5_tts.infer import utils_infer

    tts = load_backend(TTSSpec(backend="f5_tts", path=str(f5_dir), device="cpu", nfe_step=2),
                       offline=True)
    assert tts.sample_rate == 24000 and tts.version.startswith("f5-tts==")
    assert "F5TTS_tiny" in tts.version  # the arch came from the checkpoint's own YAML
    seen: list[tuple[np.ndarray, int, str, list[str]]] = []
    real = utils_infer.infer_batch_process

    def spy(ref_audio, ref_text, gen_text_batches, *a, **kw):  # type: ignore[no-untyped-def]
        audio, sr = ref_audio
        seen.append((audio.numpy().copy(), sr, ref_text, list(gen_text_batches)))
        return real(ref_audio, ref_text, gen_text_batches, *a, **kw)

    monkeypatch.setattr(utils_infer, "infer_batch_process", spy)
    v = voice(duration=1.0, offset=0.5, text="two three")
    out = tts.synthesize("This is a short test sentence.", v, seed=1)
    assert out.sample_rate == 24000 and out.voice_source == "clone" and out.backend == "f5_tts"
    assert out.audio.dtype == np.float32 and out.audio.ndim == 1 and out.duration > 0.1
    audio, sr, ref_text, gen = seen[0]
    want, _ = load_audio(str(SAMPLE), offset=0.5, duration=1.0, sample_rate=24000)
    assert sr == 24000 and audio.shape == (1, want.shape[0])
    np.testing.assert_allclose(audio[0], want, atol=1e-6)  # exactly the prompt clip
    assert ref_text == "two three. " and gen == ["This is a short test sentence."]
    again = tts.synthesize("This is a short test sentence.", v, seed=1)
    np.testing.assert_array_equal(again.audio, out.audio)  # seeded: reproducible


def test_f5_output_length_follows_prompt_duration_and_text(f5_dir: Path) -> None:
    """F5 sizes its output from the prompt: frames per prompt byte x text bytes."""
    tts = load_backend({"backend": "f5_tts", "path": str(f5_dir), "device": "cpu",
                        "nfe_step": 1}, offline=True)
    text = "A sentence of a fixed length for this test."
    d1 = tts.synthesize(text, voice(1.0, "two three four"), seed=0).duration
    d2 = tts.synthesize(text, voice(2.0, "two three four"), seed=0).duration
    d_long_text = tts.synthesize(text, voice(2.0, "two three four five six seven eight"),
                                 seed=0).duration
    assert d2 == pytest.approx(2 * d1, rel=0.08)  # twice the prompt audio per prompt char
    assert d_long_text < 0.6 * d2  # more prompt text per second: faster speech assumed


def test_f5_needs_prompt_text_and_bounds(f5_dir: Path) -> None:
    tts = load_backend({"backend": "f5_tts", "path": str(f5_dir), "device": "cpu",
                        "nfe_step": 1}, offline=True)
    with pytest.raises(TTSError, match="needs the prompt's text"):
        tts.synthesize("Hello.", voice(1.0, text="  "))
    with pytest.raises(TTSError, match="needs a voice prompt"):
        tts.synthesize("Hello.")
    with pytest.raises(TTSError, match="cannot read prompt audio"):
        tts.synthesize("Hello.", VoicePrompt("x", "/no/such.wav", "hi"))


def test_f5_resolves_from_speechmill_models(f5_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(f5_dir, tmp_path / "f5-tts" / "my-f5")
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path))
    tts = load_backend({"backend": "f5_tts", "name": "my-f5", "device": "cpu",
                        "nfe_step": 1}, offline=True)
    assert tts.checkpoint.startswith(str(tmp_path))  # type: ignore[attr-defined]
    assert tts.synthesize("Hi there, you.", voice(1.0), seed=0).duration > 0


# -- pocket-tts --------------------------------------------------------------------------------


def test_pocket_loads_and_clones(pocket_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from pocket_tts import TTSModel

    threads = torch.get_num_threads()
    tts = load_backend(TTSSpec(backend="pocket_tts", path=str(pocket_dir), device="cpu"),
                       offline=True)
    assert torch.get_num_threads() == threads  # pocket-tts's import-time change undone
    assert tts.sample_rate == 24000 and "pocket_tiny" in tts.version
    seen: list[np.ndarray] = []
    states: list[object] = []
    real_encode, real_generate = TTSModel._encode_audio, TTSModel.generate_audio

    def encode(self, audio):  # type: ignore[no-untyped-def]
        seen.append(audio.detach().numpy().copy())
        return real_encode(self, audio)

    def generate(self, model_state, text, *a, **kw):  # type: ignore[no-untyped-def]
        states.append(model_state)
        return real_generate(self, model_state, text, *a, **kw)

    monkeypatch.setattr(TTSModel, "_encode_audio", encode)
    monkeypatch.setattr(TTSModel, "generate_audio", generate)
    va, vb = voice(1.5, vid="a"), voice(1.5, offset=1.4, vid="b")
    a = tts.synthesize("Hello there.", va, seed=7)
    a2 = tts.synthesize("Hello there.", va, seed=7)
    tts.synthesize("Hello there.", vb, seed=7)
    assert len(seen) == 2  # encoded once per voice, then cached
    want, _ = load_audio(str(SAMPLE), duration=1.5, sample_rate=24000)
    got = seen[0].reshape(-1)
    # pocket-tts ends the prompt on a pause: the same samples up to its trimmed end
    assert 0.5 * want.shape[0] < got.shape[0] <= want.shape[0] + int(0.1 * 24000)
    n = min(got.shape[0], want.shape[0]) // 2
    np.testing.assert_allclose(got[:n], want[:n], atol=1e-5)
    # generation runs from the state the prompt produced, and prompts give different states
    cache = tts._states  # type: ignore[attr-defined]
    assert states == [cache[va.key], cache[va.key], cache[vb.key]]
    caches = [[t for m in cache[v.key].values() for t in m.values() if t.dtype.is_floating_point]
              for v in (va, vb)]
    assert any(x.shape != y.shape or not np.allclose(x.numpy(), y.numpy(), equal_nan=True)
               for x, y in zip(*caches, strict=True))
    assert a.voice_source == "clone" and a.sample_rate == 24000
    # the generator stops at EOS or at its length cap (tokens / 3 + 2 s of 80 ms frames)
    assert 0 < a.duration <= 12.0
    # seeded: the same audio (up to float noise of the decoder thread's frame batching)
    np.testing.assert_allclose(a.audio, a2.audio, atol=1e-5)


def test_pocket_config_without_weights_is_refused(pocket_dir: Path, tmp_path: Path) -> None:
    import yaml

    cfg = yaml.safe_load((pocket_dir / "pocket_tiny.yaml").read_text())
    cfg.pop("weights_path")
    cfg["flow_lm"]["lookup_table"]["tokenizer_path"] = str(pocket_dir / "tokenizer.json")
    p = tmp_path / "noweights.yaml"
    p.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ModelNotFoundError, match="model would be random"):
        load_backend({"backend": "pocket_tts", "config": str(p)}, offline=True)


# -- XTTS v2 --------------------------------------------------------------------------------------


def test_xtts_loads_and_clones(xtts_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from TTS.tts.models.xtts import Xtts

    tts = load_backend(TTSSpec(backend="xtts", path=str(xtts_dir), device="cpu"), offline=True)
    assert tts.sample_rate == 24000 and tts.version.startswith("coqui-tts==")
    seen: dict[str, list[tuple[int, int]]] = {"gpt": [], "spk": []}
    real_gpt, real_spk = Xtts.get_gpt_cond_latents, Xtts.get_speaker_embedding

    def gpt(self, audio, sr, *a, **kw):  # type: ignore[no-untyped-def]
        seen["gpt"].append((audio.shape[-1], sr))
        return real_gpt(self, audio, sr, *a, **kw)

    def spk(self, audio, sr):  # type: ignore[no-untyped-def]
        seen["spk"].append((audio.shape[-1], sr))
        return real_spk(self, audio, sr)

    monkeypatch.setattr(Xtts, "get_gpt_cond_latents", gpt)
    monkeypatch.setattr(Xtts, "get_speaker_embedding", spk)
    a = tts.synthesize("Hello there.", voice(1.5, vid="a"), seed=3, language="en")
    a2 = tts.synthesize("Hello there.", voice(1.5, vid="a"), seed=3, language="en")
    b = tts.synthesize("Hello there.", voice(1.5, offset=1.4, vid="b"), seed=3, language="en")
    assert seen["gpt"] == seen["spk"] == [(int(1.5 * 22050), 22050)] * 2  # once per voice
    assert a.sample_rate == 24000 and a.voice_source == "clone"
    # at most gpt_max_audio_tokens codes of 1024 samples at 22.05 kHz, decoded at 24 kHz
    assert 0 < a.duration <= 12 * 1024 / 22050 + 0.1
    np.testing.assert_array_equal(a.audio, a2.audio)
    assert not np.allclose(a.audio[: min(a.audio.size, b.audio.size)],
                           b.audio[: min(a.audio.size, b.audio.size)])
    with pytest.raises(TTSError, match="does not speak 'ja'"):
        tts.synthesize("Konnichiwa.", voice(1.5), language="ja")


def test_xtts_incomplete_checkpoint(xtts_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "xtts"
    d.mkdir()
    shutil.copy(xtts_dir / "config.json", d)
    shutil.copy(xtts_dir / "vocab.json", d)
    with pytest.raises(ModelNotFoundError, match="lacks model.pth"):
        load_backend({"backend": "xtts", "path": str(d)}, offline=True)


def test_prompt_longer_than_backend_bound(f5_dir: Path, tmp_path: Path) -> None:
    x, sr = sf.read(SAMPLE, dtype="float32")
    long = tmp_path / "long.wav"
    sf.write(long, np.tile(x, 5), sr)  # ~15 s: over F5's 12 s
    tts = load_backend({"backend": "f5_tts", "path": str(f5_dir), "device": "cpu",
                        "nfe_step": 1}, offline=True)
    with pytest.raises(TTSError, match="at most 12 s"):
        tts.synthesize("Hello.", VoicePrompt("l", str(long), SAMPLE_TEXT * 5))
