"""TTS config validation (errors name the key) and model resolution errors."""

from __future__ import annotations

import pytest

from speechmill.pipeline.errors import ConfigError
from speechmill.pipeline.models import ModelNotFoundError
from speechmill.synth.tts import TTSSpec, load_backend, parse_tts_spec


@pytest.mark.parametrize(("data", "key", "words"), [
    ({"backend": "piper", "base_url": "http://x"}, "tts.base_url", "does not apply"),
    ({"backend": "xtts", "nfe_step": 8}, "tts.nfe_step", "does not apply"),
    ({"backend": "f5_tts", "ckpt": "x"}, "tts.ckpt", "Extra inputs"),
    ({"backend": "cosyvoice"}, "tts.base_url", "needs the server's base_url"),
    ({"backend": "openai_compat", "base_url": "ftp://x"}, "tts.base_url", "http://"),
    ({"backend": "multipart", "base_url": "http://x", "fields": {"txt": "t"}},
     "tts.fields", "unknown field 'txt'"),
    ({"backend": "multipart", "base_url": "http://x", "body": "json"}, "tts.body",
     "upload_path"),
    ({"backend": "piper", "speed": 0}, "tts.speed", "greater than"),
    ({"backend": "nope"}, "tts.backend", "Input should be"),
    ({"backend": "piper", "voice_match": {"pitch_factors": [9.0]}},
     "tts.voice_match.pitch_factors", "between 0.3 and 3.0"),
])
def test_bad_keys_are_named(data: dict, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_tts_spec(data, stage="tts")
    assert ei.value.key == key, str(ei.value)
    assert ei.value.stage == "tts"
    assert words in str(ei.value)


def test_good_specs_parse() -> None:
    s = parse_tts_spec({"backend": "f5_tts", "path": "/m", "nfe_step": 16, "device": "cpu"})
    assert isinstance(s, TTSSpec) and s.nfe_step == 16
    s = parse_tts_spec({"backend": "multipart", "base_url": "http://h:1", "body": "json",
                        "upload_path": "/up", "fields": {"prompt_text": None}})
    assert s.fields == {"prompt_text": None}
    assert parse_tts_spec(s) is s


@pytest.mark.parametrize(("backend", "lib", "name"), [
    ("f5_tts", "f5-tts", "nobody/no-such-f5-model"),
    ("pocket_tts", "pocket-tts", "no_such_pocket_config"),
    ("xtts", "xtts", "nobody/no-such-xtts"),
])
def test_missing_model_lists_every_place_tried(backend: str, lib: str, name: str, tmp_path,
                                               monkeypatch) -> None:
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path))
    with pytest.raises(ModelNotFoundError) as ei:
        load_backend({"backend": backend, "name": name}, offline=True)
    msg = str(ei.value)
    assert name in msg
    assert str(tmp_path / lib / name) in msg
    assert f"{lib} library cache" in msg and "download (skipped: offline)" in msg


@pytest.mark.parametrize("backend", ["f5_tts", "pocket_tts", "xtts", "piper"])
def test_missing_path_is_clear(backend: str, tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as ei:
        load_backend({"backend": backend, "path": str(tmp_path / "absent")}, offline=True)
    assert "does not exist" in str(ei.value) and "absent" in str(ei.value)
