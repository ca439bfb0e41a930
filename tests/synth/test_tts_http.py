"""Cloning over HTTP and OpenAI presets, against fake servers on 127.0.0.1.

The fake servers answer with audio derived from the request (the prompt reversed, then a
tone of 10 ms per character), so each test checks from the returned audio that the
prompt clip and the text reached the server.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from pytest_audioeval.samples import registry

from speechmill.pipeline.errors import ConfigError
from speechmill.synth.tts import TTSError, TTSRequest, VoicePrompt, load_backend
from tests.synth.fake_tts_servers import FakeTTSServer, derived_audio, read_wav, tone

SAMPLE = Path(registry.__file__).parent / "audio" / "en" / "counting.wav"
SAMPLE_TEXT = "One two three four five six seven eight nine ten."


@pytest.fixture(scope="module")
def prompt_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, sr = sf.read(SAMPLE, dtype="float32")
    p = tmp_path_factory.mktemp("prompt") / "speaker one.wav"
    sf.write(p, x, sr, subtype="PCM_16")
    return p


@pytest.fixture
def server():
    with FakeTTSServer() as srv:
        yield srv


def clip(path: Path, offset: float, duration: float | None) -> tuple[np.ndarray, int]:
    x, sr = sf.read(path, dtype="float32")
    a = int(round(offset * sr))
    b = None if duration is None else a + int(round(duration * sr))
    return x[a:b], sr


def assert_derived(audio: np.ndarray, prompt: np.ndarray, text: str, sr: int) -> None:
    want = derived_audio(prompt, text, sr)
    assert audio.shape == want.shape
    np.testing.assert_allclose(audio, want, atol=3e-4)


def test_openai_compat_sends_prompt_clip_and_text(server: FakeTTSServer,
                                                  prompt_path: Path) -> None:
    tts = load_backend({"backend": "openai_compat", "base_url": server.base_url,
                        "model": "Qwen/Qwen3-TTS-Base", "extra_fields": {"task_type": "Base"},
                        "fields": {"language": "language"}})
    voice = VoicePrompt("spk1", str(prompt_path), "three four five", offset=0.7, duration=1.0)
    out = tts.synthesize("Hello there, friend.", voice, seed=3, language="English")
    prompt, sr = clip(prompt_path, 0.7, 1.0)
    assert out.sample_rate == sr and out.voice_source == "clone"
    assert_derived(out.audio, prompt, "Hello there, friend.", sr)
    body = server.requests_to("/v1/audio/speech")[0].json
    assert body["ref_text"] == "three four five" and body["input"] == "Hello there, friend."
    assert body["ref_audio"].startswith("data:audio/wav;base64,")
    assert body["model"] == "Qwen/Qwen3-TTS-Base" and body["task_type"] == "Base"
    assert body["language"] == "English" and body["response_format"] == "wav"
    assert "seed" not in body  # not mapped: not sent
    assert out.backend == "openai_compat" and server.base_url in out.backend_version


def test_openai_compat_file_uri(server: FakeTTSServer, prompt_path: Path) -> None:
    tts = load_backend({"backend": "openai_compat", "base_url": server.base_url,
                        "ref_audio_as": "file_uri"})
    whole = VoicePrompt("w", str(prompt_path), SAMPLE_TEXT)
    part = VoicePrompt("p", str(prompt_path), "one two", offset=0.0, duration=0.8)
    out_w = tts.synthesize("Whole file.", whole)
    out_p = tts.synthesize("Part of it.", part)
    refs = [r.json["ref_audio"] for r in server.requests_to("/v1/audio/speech")]
    assert refs[0] == prompt_path.resolve().as_uri()  # the file itself, no copy
    assert refs[1].startswith("file://") and refs[1] != refs[0]  # the cut clip, written out
    assert_derived(out_w.audio, clip(prompt_path, 0, None)[0], "Whole file.", out_w.sample_rate)
    assert_derived(out_p.audio, clip(prompt_path, 0, 0.8)[0], "Part of it.", out_p.sample_rate)


def test_cosyvoice_form_and_raw_pcm(prompt_path: Path) -> None:
    with FakeTTSServer(pcm_rate=24000) as srv:
        tts = load_backend({"backend": "cosyvoice", "base_url": srv.base_url})
        voice = VoicePrompt("c", str(prompt_path), "one two three", duration=1.2)
        out = tts.synthesize("Ni hao, how are you?", voice)
        req = srv.requests_to("/inference_zero_shot")[0]
    assert req.form == {"tts_text": "Ni hao, how are you?", "prompt_text": "one two three"}
    sent, sent_sr = read_wav(req.files["prompt_wav"][1])
    assert sent_sr == 16000 and abs(sent.shape[0] - 1.2 * 16000) <= 1  # resampled to 16 kHz
    assert out.sample_rate == 24000  # the server's X-Custom-Header-sampleRate
    assert_derived(out.audio, sent, "Ni hao, how are you?", 24000)


def test_multipart_single_request(server: FakeTTSServer, prompt_path: Path) -> None:
    tts = load_backend({"backend": "multipart", "base_url": server.base_url,
                        "url_path": "/clone", "extra_fields": {"exaggeration": 0.5}})
    voice = VoicePrompt("m", str(prompt_path), "one two three", duration=1.0)
    out = tts.synthesize("A short line.", voice)
    req = server.requests_to("/clone")[0]
    assert req.form == {"text": "A short line.", "prompt_text": "one two three",
                        "exaggeration": "0.5"}
    assert_derived(out.audio, clip(prompt_path, 0, 1.0)[0], "A short line.", out.sample_rate)


def test_multipart_upload_once_then_reference(server: FakeTTSServer, prompt_path: Path) -> None:
    """Chatterbox-TTS-Server: upload the reference once per voice, then name it."""
    tts = load_backend({
        "backend": "multipart", "base_url": server.base_url, "url_path": "/tts",
        "body": "json", "upload_path": "/upload_reference", "upload_field": "files",
        "upload_name_key": "uploaded_files.0",
        "fields": {"prompt_audio": "reference_audio_filename", "prompt_text": None},
        "extra_fields": {"voice_mode": "clone", "output_format": "wav"}})
    voice = VoicePrompt("chatter box", str(prompt_path), "unused", duration=1.5)
    a = tts.synthesize("First line.", voice)
    b = tts.synthesize("Second line here.", voice)
    assert server.hits["/upload_reference"] == 1 and server.hits["/tts"] == 2
    body = server.requests_to("/tts")[1].json
    # the uploaded name: the voice id through safe_name (a readable part and, since the
    # id had a space, a short hash: "chatter box" and "chatter_box" stay two files)
    name = body["reference_audio_filename"]
    assert re.fullmatch(r"chatter_box-h[0-9a-f]{12}\.wav", name) and "prompt_text" not in body
    prompt = clip(prompt_path, 0, 1.5)[0]
    assert_derived(a.audio, prompt, "First line.", a.sample_rate)
    assert_derived(b.audio, prompt, "Second line here.", b.sample_rate)


def test_long_text_is_split_at_sentences_and_joined(server: FakeTTSServer,
                                                    prompt_path: Path) -> None:
    tts = load_backend({"backend": "multipart", "base_url": server.base_url,
                        "url_path": "/clone", "max_chars": 40, "pause_ms": 250})
    voice = VoicePrompt("m", str(prompt_path), "one two", duration=0.5)
    text = ("This is the first sentence. Here comes a second one. "
            "And the third sentence closes it.")
    out = tts.synthesize(text, voice)
    sent = [r.form["text"] for r in server.requests_to("/clone")]
    assert sent == ["This is the first sentence.", "Here comes a second one.",
                    "And the third sentence closes it."]
    sr = out.sample_rate
    parts = [derived_audio(clip(prompt_path, 0, 0.5)[0], s, sr) for s in sent]
    assert out.audio.shape[0] == sum(p.shape[0] for p in parts) + 2 * int(0.25 * sr)
    gap = out.audio[parts[0].shape[0] : parts[0].shape[0] + int(0.25 * sr)]
    assert np.all(gap == 0)
    assert out.details["chunks"] == 3


def test_retry_after_is_honoured(server: FakeTTSServer, prompt_path: Path) -> None:
    server.fail_first["/clone"] = (1, 429, "1")
    tts = load_backend({"backend": "multipart", "base_url": server.base_url,
                        "url_path": "/clone", "backoff_s": 0, "max_backoff_s": 5})
    t = time.monotonic()
    out = tts.synthesize("Retry me.", VoicePrompt("m", str(prompt_path), "one", duration=0.5))
    assert time.monotonic() - t >= 0.9  # waited as the server asked (backoff alone: 0 s)
    assert server.hits["/clone"] == 2 and out.duration > 0.5


def test_5xx_retried_then_gives_up(server: FakeTTSServer, prompt_path: Path) -> None:
    server.fail_first["/clone"] = (99, 503, None)
    tts = load_backend({"backend": "multipart", "base_url": server.base_url,
                        "url_path": "/clone", "backoff_s": 0.01, "max_retries": 2})
    with pytest.raises(TTSError, match="gave up after 3 attempts"):
        tts.synthesize("No luck.", VoicePrompt("m", str(prompt_path), "one", duration=0.5))
    assert server.hits["/clone"] == 3


def test_4xx_fails_at_once(server: FakeTTSServer, prompt_path: Path) -> None:
    tts = load_backend({"backend": "multipart", "base_url": server.base_url,
                        "url_path": "/clone", "fields": {"prompt_text": None}})
    with pytest.raises(TTSError, match="HTTP 400"):
        tts.synthesize("Missing text.", VoicePrompt("m", str(prompt_path), "one", duration=0.5))
    assert server.hits["/clone"] == 1


def test_batch_runs_concurrently_up_to_the_limit(prompt_path: Path) -> None:
    with FakeTTSServer(delay_s=0.3) as srv:
        tts = load_backend({"backend": "openai_compat", "base_url": srv.base_url,
                            "max_concurrency": 2})
        voice = VoicePrompt("v", str(prompt_path), "one two", duration=0.5)
        texts = ["a" * (5 + i) + "." for i in range(6)]
        reqs = [TTSRequest(t, voice) for t in texts]
        reqs.insert(3, TTSRequest("Bad prompt.", VoicePrompt("x", "/nonexistent.wav", "x")))
        out = tts.synthesize_batch(reqs)
        assert srv.max_in_flight == 2
    assert isinstance(out[3], TTSError) and "cannot read prompt audio" in str(out[3])
    good = [o for i, o in enumerate(out) if i != 3]
    prompt = clip(prompt_path, 0, 0.5)[0]
    for t, o in zip(texts, good, strict=True):  # results in request order
        assert not isinstance(o, TTSError)
        assert_derived(o.audio, prompt, t, o.sample_rate)


TTS_KEY = "sk-tts-Lk4Jh7Gf2Ds9Aq3Wz8Xc5Vb1Nm6Po0Iu4Yt7Re2We9"  # 48 characters


def test_api_key_echoed_by_the_server_never_leaks(prompt_path: Path, monkeypatch,
                                                  caplog, capfd) -> None:
    """Servers that echo the Authorization header in long (> 2000 characters) 401, 500 and
    503 bodies, the key in the middle and across the points where messages are cut: no
    8-character piece of it in an error, a log line, the output or a version string.
    500 forever is a transient failure, 401 a data one."""
    from testkit.http_faults import FaultServer, echo_auth_route, find_pieces
    from tests.synth.fake_tts_servers import tone, wav

    monkeypatch.setenv("FAKE_TTS_KEY", TTS_KEY)
    caplog.set_level(logging.DEBUG)
    good = wav(tone(10, 16000), 16000)
    busy = echo_auth_route(503, headers={"Retry-After": "0"})

    def flaky(req) -> None:  # 503 echoing the key, then audio
        if req.n == 1:
            busy(req)
        else:
            req.send(200, good, content_type="audio/wav")

    routes = {
        "/flaky": flaky,
        "/unauthorized": echo_auth_route(401),
        "/broken": echo_auth_route(500),
        "/text": echo_auth_route(400, json_error=False),
        "/v1/audio/speech": echo_auth_route(500),
    }
    voice = VoicePrompt("v", str(prompt_path), "one", duration=0.5)
    errors: dict[str, TTSError] = {}
    with FaultServer(routes) as srv:
        def backend(path: str):  # noqa: ANN202
            return load_backend({"backend": "openai_compat", "base_url": srv.base,
                                 "url_path": path, "api_key_env": "FAKE_TTS_KEY",
                                 "backoff_s": 0, "max_retries": 1})

        out = backend("/flaky").synthesize("Fine.", voice)
        assert srv.log("/flaky")[0].headers["Authorization"] == f"Bearer {TTS_KEY}"
        for path in ("/unauthorized", "/broken", "/text"):
            with pytest.raises(TTSError) as ei:
                backend(path).synthesize("Rejected.", voice)
            errors[path] = ei.value
        openai_tts = load_backend({"backend": "openai", "base_url": srv.base + "/v1",
                                   "api_key_env": "FAKE_TTS_KEY", "max_retries": 0})
        with pytest.raises(TTSError) as ei:
            openai_tts.synthesize("Rejected too.")
        errors["openai"] = ei.value
    assert out.duration > 0
    assert "HTTP 401" in str(errors["/unauthorized"]) and not errors["/unauthorized"].transient
    assert "HTTP 400" in str(errors["/text"]) and not errors["/text"].transient
    assert "gave up after 2 attempts (HTTP 500" in str(errors["/broken"])
    assert errors["/broken"].transient
    assert "HTTP 500" in str(errors["openai"]) and errors["openai"].transient
    cap = capfd.readouterr()
    texts = [str(e) for e in errors.values()] + [out.backend_version, caplog.text, cap.out,
                                                 cap.err]
    assert not find_pieces(TTS_KEY, *texts), find_pieces(TTS_KEY, *texts)


def test_openai_presets_through_the_openai_package(monkeypatch) -> None:
    monkeypatch.setenv("MY_OPENAI_KEY", "sk-openai-test")
    with FakeTTSServer() as srv:
        tts = load_backend({"backend": "openai", "base_url": srv.base_url + "/v1",
                            "api_key_env": "MY_OPENAI_KEY", "model": "tts-1", "voice": "nova"})
        out = tts.synthesize("Hello from a preset voice.")
        req = srv.requests_to("/v1/audio/speech")[0]
    assert req.json == {"model": "tts-1", "voice": "nova", "input": "Hello from a preset voice.",
                        "response_format": "wav"}
    assert req.headers["authorization"] == "Bearer sk-openai-test"
    # the streaming WAV (placeholder sizes) decodes to the server's tone
    assert out.sample_rate == 24000 and out.voice_source == "preset"
    np.testing.assert_allclose(out.audio, tone(len("Hello from a preset voice."), 24000),
                               atol=1e-4)


def test_openai_without_key_fails_fast_naming_the_variable(monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY is not set"):
        load_backend({"backend": "openai"})


def test_prompt_needed_and_empty_text(server: FakeTTSServer, prompt_path: Path) -> None:
    tts = load_backend({"backend": "openai_compat", "base_url": server.base_url})
    with pytest.raises(TTSError, match="needs a voice prompt"):
        tts.synthesize("No voice given.")
    with pytest.raises(TTSError, match="empty text"):
        tts.synthesize("   ", VoicePrompt("v", str(prompt_path), "one"))
    assert not server.requests
