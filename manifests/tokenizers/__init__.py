"""Audio and text tokenizers (see :mod:`speechmill.manifests.tokenizers.base`)."""

from __future__ import annotations

import importlib

# backend modules; each calls register_audio/register_text at import
_BACKEND_MODULES = (
    "speechmill.manifests.tokenizers.kmeans_mel",
    "speechmill.manifests.tokenizers.codecs",
    "speechmill.manifests.tokenizers.text",
)
_done = False
#: module -> why it could not be imported (reported when one of its backends is asked for)
IMPORT_ERRORS: dict[str, str] = {}


def ensure_registered() -> None:
    """Import every backend module once; one that fails to import does not stop the
    others (its backends then raise a clear error when requested)."""
    global _done
    if _done:
        return
    for m in _BACKEND_MODULES:
        try:
            importlib.import_module(m)
        except ImportError as e:
            IMPORT_ERRORS[m] = f"{type(e).__name__}: {e}"
    _done = True
