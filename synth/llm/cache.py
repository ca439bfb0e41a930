"""The LLM client's persistent response cache and its file-locking helper.

One JSON file per request key under ``cache_dir/<key[:2]>/<key>.json``, written to a
temporary name and renamed into place, so a reader sees a whole answer or none, several
worker processes (and hosts sharing the run directory) can write side by side, and a
process killed at any moment leaves nothing half-written. The key is a sha256 of the
request as sent (base URL, model, messages, every sampling parameter including the seed,
the response format with its JSON schema, server-specific extras) and the caller's prompt
version; the API key is never part of it and never written here (an answer is stored as
:meth:`LLMClient.response_dict
<speechmill.synth.llm.client.LLMClient.response_dict>` made it:
with the secrets the process registered, :mod:`speechmill.pipeline.redact`, taken out).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("speechmill")


def request_key(base_url: str, body: dict[str, Any], prompt_version: str) -> str:
    """Cache key of one chat request (``body``: the JSON the server receives)."""
    doc = {"base_url": base_url.rstrip("/"), "body": body, "prompt_version": prompt_version}
    blob = json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def write_atomic(path: Path, data: bytes, mkdir: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (no fsync: a
    killed process cannot lose what the kernel already has; a power cut can lose the
    newest answers, which then are simply asked again)."""
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class ResponseCache:
    """Answers by request key (see :func:`request_key`)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._dirs: set[str] = set()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            data = self.path(key).read_bytes()
        except FileNotFoundError:
            return None
        try:
            val = json.loads(data)
        except ValueError:  # damaged by a crash of the machine: ask again
            return None
        return val if isinstance(val, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        p = self.path(key)
        if key[:2] not in self._dirs:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(key[:2])
        write_atomic(p, json.dumps(value, ensure_ascii=False).encode("utf-8"), mkdir=False)

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` (created if missing). Yields False, unlocked,
    where the filesystem has no locks (some network filesystems): callers then fall back
    to what one process can guarantee."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.warning("no file locks on %s (%s): limits hold per process", path, e)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
