"""Text tokenizers: any Hugging Face ``tokenizer.json`` (``hf``) and Whisper's (``whisper``).

Both return plain text tokens: no BOS/EOS or other special tokens are added, and special
token strings inside the text are encoded as ordinary text, so a trainer adds its own
template tokens. Each names itself with a :class:`TextTokenizerInfo`:

* ``hf``: ``name = "hf:<cfg.name or cfg.path>"``, ``version`` = first 16 hex digits of
  the sha256 of the ``tokenizer.json`` bytes. Found through
  :func:`speechmill.pipeline.models.resolve` (backend ``hf-tokenizer``): ``path`` (a
  ``tokenizer.json`` file or a directory holding one) -> ``$SPEECHMILL_MODELS/
  hf-tokenizer/<name>`` -> the Hugging Face hub cache -> a download of the repo's
  ``tokenizer.json`` (never when offline); a miss is a ModelNotFoundError listing them.
* ``whisper``: openai-whisper's bundled tiktoken vocabularies (no network, ever):
  ``name = "whisper:multilingual"`` (default) or ``"whisper:gpt2"`` (English-only
  models), ``version`` = sha256 prefix of the ``.tiktoken`` vocabulary file.

``tokenizers`` and ``whisper`` are imported only when a tokenizer is loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from speechmill.manifests.tokenizers.base import (
    TextTokenizer,
    TextTokenizerConfig,
    TextTokenizerInfo,
    register_text,
)
from speechmill.pipeline.models import (
    ModelNotFoundError,
    ModelSpec,
    register_cache,
    register_downloader,
    resolve,
)

HF_BACKEND = "hf-tokenizer"  # the backend name in speechmill.pipeline.models
TOKENIZER_FILE = "tokenizer.json"
WHISPER_VOCABS = ("multilingual", "gpt2")


def _sha256_prefix(path: Path, n: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:n]


# -- hf ---------------------------------------------------------------------------------


class HFTextTokenizer(TextTokenizer):
    """A ``tokenizers.Tokenizer`` from one ``tokenizer.json``. Picklable (the tokenizer
    is rebuilt from the file's bytes, which travel with it)."""

    def __init__(self, file: str | os.PathLike[str], display: str, source: str = "path"
                 ) -> None:
        self.file = Path(file)
        self._json = self.file.read_text(encoding="utf-8")
        self._tok: Any = None
        tok = self._tokenizer()
        self.info = TextTokenizerInfo(
            name=f"hf:{display}",
            version=_sha256_prefix(self.file),
            vocab_size=int(tok.get_vocab_size(with_added_tokens=True)),
            extra={"source": source, "file": self.file.name, "add_special_tokens": False,
                   "library": "tokenizers"},
        )

    def _tokenizer(self) -> Any:
        if self._tok is None:
            from tokenizers import Tokenizer

            try:
                self._tok = Tokenizer.from_str(self._json)
            except Exception as e:
                raise ValueError(f"text tokenizer {str(self.file)!r} is not a valid "
                                 f"tokenizer.json ({type(e).__name__}: {e})") from None
        return self._tok

    def _text_only(self) -> Any:
        """The tokenizer without its *special* added tokens: a transcript that contains
        ``<|im_end|>`` or ``</s>`` as text must not turn into control ids."""
        if getattr(self, "_plain", None) is None:
            import json

            from tokenizers import Tokenizer

            self._tokenizer()  # validates the file
            doc = json.loads(self._json)
            doc["added_tokens"] = [t for t in doc.get("added_tokens") or []
                                   if not t.get("special")]
            self._plain = Tokenizer.from_str(json.dumps(doc))
        return self._plain

    def encode(self, text: str) -> list[int]:
        return list(self._text_only().encode(text, add_special_tokens=False).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer().decode(list(ids), skip_special_tokens=False))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None, "_plain": None}


def _hf_cache(name: str) -> Path | None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return None
    try:
        return Path(hf_hub_download(name, TOKENIZER_FILE, local_files_only=True))
    except Exception:
        return None


def _hf_download(name: str) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(name, TOKENIZER_FILE)


register_cache(HF_BACKEND, _hf_cache)
register_downloader(HF_BACKEND, _hf_download)


def _tokenizer_json(location: str, what: str) -> Path:
    p = Path(location)
    if p.is_dir():
        f = p / TOKENIZER_FILE
        if not f.is_file():
            found = sorted(x.name for x in p.iterdir())[:10]
            raise ModelNotFoundError(f"text tokenizer {what!r}: directory {str(p)!r} holds "
                                     f"no {TOKENIZER_FILE} (found: {found})")
        return f
    return p


def load_hf(cfg: TextTokenizerConfig, offline: bool = False) -> HFTextTokenizer:
    if not cfg.path and not cfg.name:
        raise ValueError("text tokenizer 'hf': give `path` (a tokenizer.json or a directory "
                         "holding one) or `name` (a hub repo id)")
    spec = ModelSpec(backend=HF_BACKEND, name=cfg.name, path=cfg.path)
    res = resolve(spec, offline=offline)
    what = cfg.path or cfg.name or ""
    return HFTextTokenizer(_tokenizer_json(res.location, what), display=what,
                           source=res.source)


# -- whisper ----------------------------------------------------------------------------


class WhisperTextTokenizer(TextTokenizer):
    """openai-whisper's tokenizer (tiktoken, vocabulary files shipped in the package)."""

    def __init__(self, vocab: str = "multilingual", num_languages: int = 99) -> None:
        if vocab not in WHISPER_VOCABS:
            raise ValueError(f"text tokenizer 'whisper': key `name` must be one of "
                             f"{list(WHISPER_VOCABS)}, got {vocab!r}")
        self.vocab = vocab
        self.num_languages = int(num_languages)
        self._tok: Any = None
        import whisper.tokenizer as wt

        vocab_file = Path(wt.__file__).parent / "assets" / f"{vocab}.tiktoken"
        tok = self._tokenizer()
        try:
            from importlib.metadata import version

            lib = version("openai-whisper")
        except Exception:
            lib = "unknown"
        self.info = TextTokenizerInfo(
            name=f"whisper:{vocab}",
            version=_sha256_prefix(vocab_file),
            vocab_size=int(tok.encoding.n_vocab),
            extra={"library": f"openai-whisper {lib}", "num_languages": self.num_languages,
                   "eot": int(tok.eot), "add_special_tokens": False},
        )

    def _tokenizer(self) -> Any:
        if self._tok is None:
            import whisper.tokenizer as wt

            self._tok = wt.get_tokenizer(self.vocab == "multilingual",
                                         num_languages=self.num_languages)
        return self._tok

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: "<|endoftext|>" in the text is plain text, never a special id
        return list(self._tokenizer().encoding.encode_ordinary(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer().encoding.decode(list(ids)))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None}


def load_whisper(cfg: TextTokenizerConfig, offline: bool = False) -> WhisperTextTokenizer:
    if cfg.path:
        raise ValueError("text tokenizer 'whisper': key `path` is not used (the vocabulary "
                         "ships inside openai-whisper); set `name: multilingual` or "
                         "`name: gpt2`")
    try:
        import whisper.tokenizer  # noqa: F401
    except ImportError as e:
        raise ModelNotFoundError("text tokenizer 'whisper' needs the openai-whisper package "
                                 f"(pip install 'speechmill[ml]'): {e}") from None
    return WhisperTextTokenizer(cfg.name or "multilingual")


register_text("hf", load_hf)
register_text("whisper", load_whisper)
