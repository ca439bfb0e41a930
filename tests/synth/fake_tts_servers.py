"""Fake TTS servers on 127.0.0.1 (real HTTP, threaded) for the HTTP backends' tests.

Each route checks that the request carries what a real server needs (the text, the prompt
audio, the prompt text) and answers 400 otherwise; a good request gets audio *derived
from the request*: the prompt audio reversed, followed by a 440 Hz tone of 10 ms per
character of text. So a test can tell from the returned audio alone that the prompt and
the text arrived. Every request is recorded (path, headers, JSON/form fields, files).

Routes:

* ``/v1/audio/speech`` — OpenAI-compatible with a reference voice (vLLM-Omni convention:
  JSON ``input``, ``ref_audio`` as a data URI or ``file://`` URI, ``ref_text``). Without
  ``ref_audio`` it acts as OpenAI's preset API (``model``/``voice``/``input``) and answers
  a streaming-style WAV whose RIFF/data sizes are 0xFFFFFFFF placeholders.
* ``/inference_zero_shot`` — CosyVoice's FastAPI form (``tts_text``, ``prompt_text``,
  ``prompt_wav`` file); raw int16 PCM with ``X-Custom-Header-sampleRate``.
* ``/clone`` — a generic single multipart request (``text``, ``prompt_text``, ``audio``).
* ``/upload_reference`` + ``/tts`` — Chatterbox-TTS-Server's two steps (multipart upload
  of ``files``; JSON ``text`` + ``reference_audio_filename``).

``fail_first[path] = (n, status, retry_after)`` makes the first n requests to a path fail;
``delay_s`` slows every answer (concurrency tests read ``max_in_flight``).
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import http.server
import io
import json
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import soundfile as sf

TONE_HZ = 440.0
MS_PER_CHAR = 10


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    json: dict[str, Any] | None = None
    form: dict[str, str] = field(default_factory=dict)
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)


def tone(n_chars: int, sr: int) -> np.ndarray:
    n = int(sr * MS_PER_CHAR * n_chars / 1000)
    return (0.3 * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / sr)).astype(np.float32)


def derived_audio(prompt: np.ndarray, text: str, sr: int) -> np.ndarray:
    """What every route answers: the prompt reversed, then the text's tone."""
    return np.concatenate([prompt[::-1], tone(len(text), sr)]).astype(np.float32)


def wav(x: np.ndarray, sr: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def streaming_wav(x: np.ndarray, sr: int) -> bytes:
    """A 16-bit WAV with 0xFFFFFFFF RIFF/data sizes, as streaming TTS APIs send it."""
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, sr, sr * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", 0xFFFFFFFF) + pcm)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    return x.mean(axis=1), int(sr)


def parse_multipart(body: bytes, ctype: str) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\nMIME-Version: 1.0\r\n\r\n".encode() + body)
    form: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            files[name] = (part.get_filename(), payload)
        else:
            form[name] = payload.decode("utf-8")
    return form, files


class FakeTTSServer:
    def __init__(self, delay_s: float = 0.0, pcm_rate: int = 22050,
                 echo_auth_on_error: bool = False) -> None:
        self.echo_auth_on_error = echo_auth_on_error
        self.requests: list[Request] = []
        self.fail_first: dict[str, tuple[int, int, str | None]] = {}
        self.delay_s = delay_s
        self.pcm_rate = pcm_rate
        self.uploads: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                server._handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> FakeTTSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests_to(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.path == path]

    # -- dispatch -------------------------------------------------------------------------

    def _handle(self, h: http.server.BaseHTTPRequestHandler) -> None:
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n)
        path = urlsplit(h.path).path
        req = Request(path=path, headers={k.lower(): v for k, v in h.headers.items()})
        ctype = h.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            req.json = json.loads(body or b"{}")
        elif ctype.startswith("multipart/form-data"):
            req.form, req.files = parse_multipart(body, ctype)
        elif ctype.startswith("application/x-www-form-urlencoded"):
            req.form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
        with self._lock:
            self.requests.append(req)
            self.hits[path] = self.hits.get(path, 0) + 1
            hit = self.hits[path]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            fail = self.fail_first.get(path)
            if fail and hit <= fail[0]:
                headers = {"Retry-After": fail[2]} if fail[2] is not None else {}
                return self._send(h, fail[1], b'{"error": "busy"}', "application/json",
                                  headers)
            route = {"/v1/audio/speech": self._speech, "/inference_zero_shot": self._cosy,
                     "/clone": self._clone, "/upload_reference": self._upload,
                     "/tts": self._tts}.get(path)
            if route is None:
                return self._send(h, 404, b"not found", "text/plain")
            status, data, ctype_out, headers = route(req)
            if status >= 400 and self.echo_auth_on_error:  # a careless server echoing the key
                data += f" (authorization: {req.headers.get('authorization')})".encode()
            self._send(h, status, data, ctype_out, headers)
        finally:
            with self._lock:
                self.in_flight -= 1

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, data: bytes, ctype: str,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def _bad(msg: str) -> tuple[int, bytes, str, dict[str, str]]:
        return 400, json.dumps({"error": msg}).encode(), "application/json", {}

    # -- routes ---------------------------------------------------------------------------

    def _speech(self, req: Request) -> tuple[int, bytes, str, dict[str, str]]:
        body = req.json or {}
        text = body.get("input")
        if not text:
            return self._bad("input is required")
        ref = body.get("ref_audio")
        if ref is None:  # OpenAI's preset-voice API
            if not body.get("voice") or not body.get("model"):
                return self._bad("model and voice are required")
            return 200, streaming_wav(tone(len(text), 24000), 24000), "audio/wav", {}
        if not body.get("ref_text"):
            return self._bad("ref_text is required with ref_audio")
        if ref.startswith("data:audio/wav;base64,"):
            prompt, sr = read_wav(base64.b64decode(ref.split(",", 1)[1]))
        elif ref.startswith("file://"):
            prompt, sr = read_wav(Path(unquote(urlsplit(ref).path)).read_bytes())
        else:
            return self._bad(f"unsupported ref_audio {ref[:30]!r}")
        return 200, wav(derived_audio(prompt, text, sr), sr), "audio/wav", {}

    def _cosy(self, req: Request) -> tuple[int, bytes, str, dict[str, str]]:
        if not req.form.get("tts_text") or not req.form.get("prompt_text"):
            return self._bad("tts_text and prompt_text are required")
        if "prompt_wav" not in req.files:
            return self._bad("prompt_wav file is required")
        prompt, _ = read_wav(req.files["prompt_wav"][1])
        out = derived_audio(prompt, req.form["tts_text"], self.pcm_rate)
        pcm = (np.clip(out, -1, 1) * 32767).astype("<i2").tobytes()
        return 200, pcm, "application/octet-stream", {
            "X-Custom-Header-sampleRate": str(self.pcm_rate)}

    def _clone(self, req: Request) -> tuple[int, bytes, str, dict[str, str]]:
        if not req.form.get("text") or not req.form.get("prompt_text"):
            return self._bad("text and prompt_text are required")
        if "audio" not in req.files:
            return self._bad("audio file is required")
        prompt, sr = read_wav(req.files["audio"][1])
        return 200, wav(derived_audio(prompt, req.form["text"], sr), sr), "audio/wav", {}

    def _upload(self, req: Request) -> tuple[int, bytes, str, dict[str, str]]:
        if "files" not in req.files:
            return self._bad("files is required")
        name, data = req.files["files"]
        self.uploads[name] = data
        return 200, json.dumps({"message": "ok", "uploaded_files": [name]}).encode(), \
            "application/json", {}

    def _tts(self, req: Request) -> tuple[int, bytes, str, dict[str, str]]:
        body = req.json or {}
        ref = body.get("reference_audio_filename")
        if not body.get("text") or body.get("voice_mode") != "clone" or ref not in self.uploads:
            return self._bad("text, voice_mode=clone and an uploaded reference are required")
        prompt, sr = read_wav(self.uploads[ref])
        return 200, wav(derived_audio(prompt, body["text"], sr), sr), "audio/wav", {}
