"""Fixtures shared by the engine tests."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    """An S3-compatible server (moto's server mode, the S3 HTTP API) on 127.0.0.1, one per
    test module; yields its endpoint URL."""
    s3fs = pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    # fsspec caches filesystems by their arguments, not the environment: one made for
    # another module's server (its AWS_ENDPOINT_URL) would be handed back here
    s3fs.S3FileSystem.clear_instance_cache()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()
