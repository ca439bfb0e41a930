"""An OpenAI-compatible fake LLM server on 127.0.0.1, with scripted answers and faults.

Real HTTP (a threaded ``http.server``), so the ``openai`` package talks to it exactly as
to a real endpoint. Routes: ``POST /v1/chat/completions``, the Batch API (``POST
/v1/files``, ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET
/v1/files/{id}/content``) and ``GET /_stats`` (counters as JSON, for a server in another
process).

Answers are deterministic from the request: the default answer is a dialogue
``{"turns": [{"role", "text"}, ...]}`` whose round count is the first ``N rounds`` in the
prompt and whose words are drawn from a small English vocabulary with a random generator
seeded by the conversation (its first user message) and the request's ``seed``, so two
prompts never give near-duplicate dialogues. Pass ``answer=`` for other scripts.

Faults are scripted in the prompt: a user message containing ``[[fault:SPEC]]`` where
SPEC is a comma-separated list of ``kind`` (every request) or ``kindxN`` (the next N
requests of that conversation), consumed in order. ``[[fault:429x2,invalidx1]]``: the
first two requests get 429, the third an invalid answer, later ones are answered. The
conversation is identified by its first user message, so follow-up requests (errors fed
back) count as its later requests. Kinds: ``429`` (with ``Retry-After``), ``500``,
``502``, ``503``, ``400``, ``401``, ``timeout`` (answers after ``timeout_s``),
``truncated`` (cut JSON, ``finish_reason: length``), ``invalid`` (prose, no JSON),
``offschema`` (JSON of the wrong shape), ``refusal`` ("I'm sorry, but I can't..."),
``refusalfield`` (the API's ``message.refusal``), ``rounds`` (one round too many),
``copy`` (the same dialogue for every conversation that asks for it: near duplicates),
``empty``, ``dull`` (a dialogue the judge script scores 2) and ``pii`` (an e-mail address
in the first turn). A judge request (its prompt or schema mentions ``coherence``) gets
``{"coherence": 5, "naturalness": 4}``, or coherence 2 when the dialogue is dull. ``[[hold]]`` in a prompt, or ``hold_after=N`` (every chat request after the
first N), makes a request wait until :meth:`FakeLLM.release` (for killing a client while
requests are in flight); with ``drop_held`` set before the release, held requests are
dropped unanswered (and unrecorded), as if the client had died first.

``echo_auth=True`` makes the server careless about secrets: every error it answers (401
for a wrong key, the scripted 4xx/5xx faults) has a long message (> 2000 characters,
:func:`testkit.http_faults.leaky_body`) echoing the request's ``Authorization`` header, in
the middle and across the points where clients cut error texts short; the ``echo`` fault
answers 200 with that text as the completion (an answer that is no dialogue).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from testkit.http_faults import leaky_body


def _words(s: str) -> list[str]:
    return s.split()


WORDS = _words(
    "time year people way day man thing woman life child world school state family "
    "student group country problem hand part place case week company system program "
    "question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head "
    "house service friend father power hour game line end member law car city "
    "community name president team minute idea kid body information back parent face "
    "others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education garden "
    "kitchen coffee music river mountain weather train window letter market doctor "
    "travel dinner summer winter picture language bread holiday journey island library "
    "village museum bicycle recipe planet ocean forest season"
)
VERBS = _words("make know think take see come want look use find give tell work call try "
         "ask need feel become leave put mean keep let begin seem help talk turn start "
         "show hear play run move like live believe hold bring happen write provide sit "
         "stand lose pay meet include continue set learn change lead understand watch "
         "follow stop create speak read spend grow open walk win offer remember love "
         "consider appear buy wait serve die send expect build stay fall cut reach")
ADJS = _words("good new first last long great little own other old right big high different "
        "small large next early young important few public bad same able quiet warm "
        "bright gentle simple careful useful strange friendly busy cheap fresh")


def _rng(*parts: Any) -> random.Random:
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "big"))


def _sentence(rng: random.Random, n: int, question: bool) -> str:
    words = []
    for i in range(n):
        pool = (WORDS, VERBS, ADJS, WORDS)[i % 4]
        words.append(rng.choice(pool))
    words[0] = ("could you" if question else "the") + " " + words[0]
    s = " ".join(words)
    return s[0].upper() + s[1:] + ("?" if question else ".")


def dialogue(seed_text: str, rounds: int) -> dict[str, Any]:
    """A deterministic random dialogue of ``rounds`` user/assistant rounds."""
    rng = _rng("dialogue", seed_text)
    turns = []
    for _ in range(rounds):
        turns.append({"role": "user", "text": _sentence(rng, rng.randint(7, 11), True)})
        ans = " ".join(_sentence(rng, rng.randint(8, 12), False) for _ in range(2))
        turns.append({"role": "assistant", "text": ans})
    return {"turns": turns}


_FAULT_RE = re.compile(r"\[\[fault:([^\]]*)\]\]")


def parse_faults(text: str) -> list[tuple[str, float]]:
    """``[[fault:429x2,invalid]]`` -> [("429", 2), ("invalid", inf)]."""
    m = _FAULT_RE.search(text)
    if not m:
        return []
    out = []
    for item in m.group(1).split(","):
        item = item.strip()
        if not item:
            continue
        km = re.fullmatch(r"(\d{3}|[a-z]+?)(?:x(\d+))?", item)
        if not km:
            raise ValueError(f"bad fault spec {item!r}")
        out.append((km.group(1), float(km.group(2)) if km.group(2) else float("inf")))
    return out


def fault_for(faults: list[tuple[str, float]], n: int) -> str | None:
    """The fault of request number ``n`` (1-based) of a conversation."""
    cum = 0.0
    for kind, k in faults:
        if n <= cum + k:
            return kind
        cum += k
    return None


@dataclass
class ChatHit:
    conv: str  # sha256 of the conversation's first user message
    n: int  # request number of this conversation (1-based)
    body_key: str  # sha256 of the request body
    fault: str | None
    status: int
    t: float
    batch: bool = False
    body: dict[str, Any] | None = None


def default_answer(body: dict[str, Any], fault: str | None) -> tuple[str, str]:
    """(content, finish_reason) of the default dialogue script."""
    msgs = body.get("messages") or []
    first = next((m.get("content", "") for m in msgs if m.get("role") == "user"), "")
    if "coherence" in json.dumps(body.get("response_format") or {}) or \
            "coherence (1-5)" in first:  # a judge: low scores for dull dialogues
        dull = "this is dull" in first.lower()
        return json.dumps({"coherence": 2 if dull else 5, "naturalness": 4}), "stop"
    m = re.search(r"(\d+) rounds?", first)
    rounds = int(m.group(1)) if m else 2
    seed = body.get("seed")
    if fault == "copy":
        return json.dumps(dialogue("copy", rounds)), "stop"
    if fault == "rounds":
        rounds += 1
    d = dialogue(f"{first}\x1f{seed}", rounds)
    if fault == "dull":
        d["turns"][0]["text"] = "This is dull. " + d["turns"][0]["text"]
    if fault == "pii":
        d["turns"][0]["text"] += " Write to jane.doe@example.com please."
    text = json.dumps(d)
    if fault == "truncated":
        return text[: max(10, len(text) // 2)], "length"
    if fault == "invalid":
        return "Sure! Here is a lovely conversation about that topic, enjoy.", "stop"
    if fault == "offschema":
        return json.dumps({"dialogue": [t["text"] for t in d["turns"]]}), "stop"
    if fault == "refusal":
        return "I'm sorry, but I can't help with that request.", "stop"
    if fault == "empty":
        return "", "stop"
    return text, "stop"


class FakeLLM:
    """The server. ``with FakeLLM() as srv: LLMConfig(base_url=srv.base_url, ...)``."""

    def __init__(self, answer: Callable[[dict[str, Any], str | None], tuple[str, str]]
                 | None = None, *, latency_s: float = 0.0, retry_after: str | None = "1",
                 retry_after_ms: str | None = None, timeout_s: float = 2.0,
                 json_schema: bool = True, json_object: bool = True,
                 api_key: str | None = None, batch_polls: int = 1,
                 hold_after: int | None = None, echo_auth: bool = False,
                 port: int = 0) -> None:
        self.answer = answer or default_answer
        self.latency_s = latency_s
        self.retry_after = retry_after
        self.retry_after_ms = retry_after_ms
        self.timeout_s = timeout_s
        self.json_schema = json_schema
        self.json_object = json_object
        self.api_key = api_key
        self.echo_auth = echo_auth
        self.batch_polls = batch_polls
        self.hold_after = hold_after
        self.drop_held = False
        self.max_in_flight = 0
        self._arrived = 0
        self.stopping = threading.Event()
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.chat: list[ChatHit] = []
        self.in_flight = 0
        self.held = 0
        self.auth_failures = 0
        self._conv_n: Counter[str] = Counter()
        self.files: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._srv = _Server(("127.0.0.1", port), _Handler)
        self._srv.fake = self
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._srv.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.released.set()
        self._srv.shutdown()
        self._srv.server_close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release(self) -> None:
        """Let held requests (``[[hold]]``) go on."""
        self.released.set()

    @property
    def base_url(self) -> str:
        host, port = self._srv.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- what happened ----------------------------------------------------------------------
    def chat_requests(self) -> int:
        with self.lock:
            return len(self.chat)

    def answered_keys(self) -> Counter[str]:
        """Request bodies answered with 200 (online or in a batch), by body hash."""
        with self.lock:
            return Counter(h.body_key for h in self.chat if h.status == 200)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {"hits": dict(self.hits), "chat": len(self.chat),
                    "answered": sum(1 for h in self.chat if h.status == 200),
                    "statuses": dict(Counter(h.status for h in self.chat)),
                    "batches": len(self.batches)}

    def reset(self) -> None:
        with self.lock:
            self.hits.clear()
            self.chat.clear()
            self.max_in_flight = 0

    # -- chat --------------------------------------------------------------------------------
    def error_message(self, message: str, auth: str | None) -> str:
        """``message``, or with ``echo_auth`` a long text echoing ``auth``."""
        if self.echo_auth and auth:
            return f"{message}: " + leaky_body(auth)
        return message

    def complete(self, body: dict[str, Any], batch: bool = False, auth: str | None = None
                 ) -> tuple[int, dict[str, Any], dict[str, str], float]:
        """(status, JSON answer, headers, seconds to wait before answering) of one chat
        request; records it. ``auth``: the request's Authorization header."""
        msgs = body.get("messages") or []
        users = [str(m.get("content", "")) for m in msgs if m.get("role") == "user"]
        first = users[0] if users else ""
        conv = hashlib.sha256(first.encode()).hexdigest()
        bkey = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        faults = parse_faults(first)
        with self.lock:
            self._conv_n[conv] += 1
            n = self._conv_n[conv]
        fault = fault_for(faults, n)
        wait = 0.0 if batch else self.latency_s
        headers: dict[str, str] = {}
        status = 200
        payload: dict[str, Any]
        rf = (body.get("response_format") or {}).get("type")
        if (rf == "json_schema" and not self.json_schema) or \
                (rf == "json_object" and not self.json_object):
            status = 400
            payload = _err(f"response_format type {rf} is not supported by this server",
                           "invalid_request_error")
        elif fault in ("429", "500", "502", "503", "400", "401"):
            status = int(fault)
            if fault == "429":
                if self.retry_after is not None:
                    headers["Retry-After"] = self.retry_after
                if self.retry_after_ms is not None:
                    headers["retry-after-ms"] = self.retry_after_ms
            payload = _err(self.error_message(f"scripted fault {fault}", auth),
                           "server_error")
        else:
            if fault == "timeout" and not batch:
                wait = max(wait, self.timeout_s)
            if fault == "refusalfield":
                msg = {"role": "assistant", "content": None,
                       "refusal": "I'm sorry, I cannot assist with that request."}
                finish = "stop"
                text = ""
            elif fault == "echo":
                text, finish = leaky_body(auth or "no authorization"), "stop"
                msg = {"role": "assistant", "content": text}
            else:
                text, finish = self.answer(body, fault)
                msg = {"role": "assistant", "content": text}
            prompt_chars = sum(len(str(m.get("content", ""))) for m in msgs)
            payload = {
                "id": "chatcmpl-" + bkey[:12], "object": "chat.completion",
                "created": int(time.time()), "model": body.get("model", "fake"),
                "choices": [{"index": 0, "message": msg, "finish_reason": finish,
                             "logprobs": None}],
                "usage": {"prompt_tokens": prompt_chars // 4 + 1,
                          "completion_tokens": len(text) // 4 + 1,
                          "total_tokens": prompt_chars // 4 + len(text) // 4 + 2},
            }
        with self.lock:
            self.chat.append(ChatHit(conv, n, bkey, fault, status, time.monotonic(), batch,
                                     body))
        return status, payload, headers, wait

    # -- batch ----------------------------------------------------------------------------------
    def run_batch(self, b: dict[str, Any]) -> None:
        lines = self.files[b["input_file_id"]].decode().splitlines()
        out, err = [], []
        for line in lines:
            if not line.strip():
                continue
            req = json.loads(line)
            status, payload, _, _ = self.complete(req["body"], batch=True)
            rec = {"id": f"req-{len(out) + len(err)}", "custom_id": req["custom_id"],
                   "response": {"status_code": status, "request_id": "r", "body": payload},
                   "error": None}
            (out if status == 200 else err).append(json.dumps(rec))
        oid = self._new_file("\n".join(out).encode() + b"\n")
        b["output_file_id"] = oid
        if err:
            b["error_file_id"] = self._new_file("\n".join(err).encode() + b"\n")
        b["status"] = "completed"
        b["request_counts"] = {"total": len(out) + len(err), "completed": len(out),
                               "failed": len(err)}

    def _new_file(self, data: bytes) -> str:
        with self.lock:
            fid = f"file-{len(self.files) + 1:06d}"
            self.files[fid] = data
        return fid


def kill_run_while_held(srv: FakeLLM, cmd: list[str], cwd: Any, env: dict[str, str],
                        run_dir: Any, stage: str, held: int = 2, parts: int = 2,
                        timeout_s: float = 180) -> tuple[str, str]:
    """Start ``cmd`` (a ``speechmill run``), wait until the server holds ``held`` requests
    and ``stage`` has committed ``parts`` parts, then SIGKILL it; returns its (stdout,
    stderr). Fails if the run ended before that point."""
    import signal
    import subprocess

    from speechmill.pipeline.store import RunStore

    def reached() -> bool:
        return srv.held == held and len(RunStore(run_dir).output_parts(stage)) == parts

    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and p.poll() is None and not reached():
            time.sleep(0.05)
        assert p.poll() is None, p.communicate()
        assert reached()
    finally:
        p.send_signal(signal.SIGKILL)
        out, err = p.communicate()
    return out, err


def _err(message: str, typ: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": typ, "param": None, "code": None}}


def _file_obj(fid: str, data: bytes, name: str, purpose: str) -> dict[str, Any]:
    return {"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
            "filename": name, "purpose": purpose, "status": "processed"}


def _parse_multipart(body: bytes, ctype: str) -> dict[str, tuple[str | None, bytes]]:
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not m:
        return {}
    boundary = b"--" + m.group(1).encode()
    out: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(boundary)[1:]:
        if part.startswith(b"--"):
            break
        head, _, data = part.lstrip(b"\r\n").partition(b"\r\n\r\n")
        data = data[:-2] if data.endswith(b"\r\n") else data
        h = head.decode("utf-8", "replace")
        nm = re.search(r'name="([^"]*)"', h)
        fn = re.search(r'filename="([^"]*)"', h)
        if nm:
            out[nm.group(1)] = (fn.group(1) if fn else None, data)
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def handle(self) -> None:
        with contextlib.suppress(OSError):
            super().handle()

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None,
              raw: bytes | None = None) -> None:
        data = raw if raw is not None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream" if raw is not None
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)
            self.wfile.flush()

    def _authorized(self) -> bool:
        fake = self.server.fake
        if fake.api_key is None:
            return True
        if self.headers.get("Authorization") == f"Bearer {fake.api_key}":
            return True
        with fake.lock:
            fake.auth_failures += 1
        self._send(401, _err(fake.error_message(
            "bad key", self.headers.get("Authorization")), "invalid_request_error"))
        return False

    def do_GET(self) -> None:
        fake = self.server.fake
        path = urlsplit(self.path).path
        with fake.lock:  # ids folded: /v1/batches/batch_*, /v1/files/file-*/content
            fake.hits[re.sub(r"/(batch_|file-)[^/]+", r"/\1*", path)] += 1
        if path == "/_stats":
            self._send(200, fake.stats())
            return
        if not self._authorized():
            return
        m = re.fullmatch(r"/v1/batches/([^/]+)", path)
        if m:
            b = fake.batches.get(m.group(1))
            if b is None:
                self._send(404, _err("no such batch", "invalid_request_error"))
                return
            b["_polls"] += 1
            if b["status"] != "completed":
                b["status"] = "in_progress"
                if b["_polls"] >= fake.batch_polls:
                    fake.run_batch(b)
            self._send(200, {k: v for k, v in b.items() if not k.startswith("_")})
            return
        m = re.fullmatch(r"/v1/files/([^/]+)/content", path)
        if m and m.group(1) in fake.files:
            self._send(200, None, raw=fake.files[m.group(1)])
            return
        self._send(404, _err("no such route", "invalid_request_error"))

    def do_POST(self) -> None:
        fake = self.server.fake
        path = urlsplit(self.path).path
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        with fake.lock:
            fake.hits[path] += 1
        if not self._authorized():
            return
        if path == "/v1/chat/completions":
            req = json.loads(body)
            first = next((str(m.get("content", "")) for m in req.get("messages", [])
                          if m.get("role") == "user"), "")
            with fake.lock:
                fake.in_flight += 1
                fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                fake._arrived += 1
                hold = "[[hold]]" in first or (fake.hold_after is not None
                                               and fake._arrived > fake.hold_after)
            try:
                if hold and not fake.released.is_set():
                    with fake.lock:
                        fake.held += 1
                    fake.released.wait()
                    if fake.drop_held:
                        self.close_connection = True
                        return
                status, payload, headers, wait = fake.complete(
                    req, auth=self.headers.get("Authorization"))
                if wait and fake.stopping.wait(wait):
                    return
            finally:
                with fake.lock:
                    fake.in_flight -= 1
            self._send(status, payload, headers)
            return
        if path == "/v1/files":
            parts = _parse_multipart(body, self.headers.get("Content-Type", ""))
            name, data = parts.get("file", ("batch.jsonl", b""))
            purpose = parts.get("purpose", (None, b"batch"))[1].decode()
            fid = fake._new_file(data)
            self._send(200, _file_obj(fid, data, name or "batch.jsonl", purpose))
            return
        if path == "/v1/batches":
            req = json.loads(body)
            if req.get("input_file_id") not in fake.files:
                self._send(400, _err("no such file", "invalid_request_error"))
                return
            with fake.lock:
                bid = f"batch_{len(fake.batches) + 1:06d}"
                b = {"id": bid, "object": "batch", "endpoint": req.get("endpoint"),
                     "input_file_id": req["input_file_id"],
                     "completion_window": req.get("completion_window", "24h"),
                     "status": "validating", "created_at": int(time.time()),
                     "output_file_id": None, "error_file_id": None, "errors": None,
                     "metadata": req.get("metadata"), "_polls": 0}
                fake.batches[bid] = b
            self._send(200, {k: v for k, v in b.items() if not k.startswith("_")})
            return
        self._send(404, _err("no such route", "invalid_request_error"))


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256
    fake: FakeLLM

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


def main() -> None:
    """``python tests/synth/fake_llm.py --latency 0.5``: serve until killed; prints the
    base URL on the first line of stdout."""
    import argparse
    import sys

    ap = argparse.ArgumentParser()
    ap.add_argument("--latency", type=float, default=0.0)
    a = ap.parse_args()
    srv = FakeLLM(latency_s=a.latency).start()
    print(srv.base_url, flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        sys.stdin.read()  # until the parent closes our stdin (or dies)
    srv.stop()


if __name__ == "__main__":
    main()
