"""Text tokenizers: a locally built Hugging Face tokenizer.json through the real loader,
the hub path offline (a clear ModelNotFoundError), and Whisper's bundled tokenizer with
the network blocked."""

from __future__ import annotations

import hashlib
import pickle
import socket

import pytest

from speechmill.manifests.tokenizers import base
from speechmill.manifests.tokenizers import text as tt
from speechmill.manifests.tokenizers.base import TextTokenizerConfig
from speechmill.pipeline.models import ModelNotFoundError

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "speech data pipelines turn audio into training data",
    "a dog and a fox talk about speech",
    "training data for speech language models",
] * 5


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a socket fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny BPE tokenizer.json trained here with the `tokenizers` library."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "[BOS]", "[EOS]"])
    tok.train_from_iterator(SENTENCES, trainer)
    # a post-processor that adds BOS/EOS: the loader must not add them
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", 1), ("[EOS]", 2)])
    d = tmp_path_factory.mktemp("hf_tok")
    tok.save(str(d / "tokenizer.json"))
    return d, tok


def test_hf_tokenizer_from_dir_and_file(tokenizer_dir, no_network):
    d, ref = tokenizer_dir
    assert base._TEXT["hf"] is tt.load_hf  # registered at import
    file = d / "tokenizer.json"
    sha = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    text = "the lazy fox talks about training speech"
    for path in (str(d), str(file)):
        tok = tt.load_hf(TextTokenizerConfig(backend="hf", path=path), offline=True)
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False).ids
        assert ids and all(isinstance(i, int) for i in ids)
        assert 1 not in ids and 2 not in ids  # no BOS/EOS
        assert tok.decode(ids) == ref.decode(ids)
        assert tok.info.name == f"hf:{path}"
        assert tok.info.version == sha
        assert tok.info.vocab_size == ref.get_vocab_size(with_added_tokens=True)
        assert tok.info.extra["source"] == "path"
        # identity round trip through shard metadata
        assert base.TextTokenizerInfo.from_dict(tok.info.to_dict()) == tok.info
    # picklable (Ray ships it to workers)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(text) == ids and clone.info == tok.info


def test_hf_tokenizer_local_models_dir(tokenizer_dir, tmp_path, monkeypatch, no_network):
    d, ref = tokenizer_dir
    target = tmp_path / "hf-tokenizer" / "acme" / "tiny-bpe"
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path))
    tok = tt.load_hf(TextTokenizerConfig(backend="hf", name="acme/tiny-bpe"), offline=True)
    assert tok.info.name == "hf:acme/tiny-bpe" and tok.info.extra["source"] == "local_dir"
    assert tok.encode("a dog") == ref.encode("a dog", add_special_tokens=False).ids


def test_hf_tokenizer_missing_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("SPEECHMILL_MODELS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelNotFoundError) as e:
        tt.load_hf(TextTokenizerConfig(backend="hf", name="nobody/no-such-tokenizer"),
                   offline=True)
    msg = str(e.value)
    assert "nobody/no-such-tokenizer" in msg and "SPEECHMILL_MODELS" in msg
    assert "cache" in msg and "offline" in msg
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        tt.load_hf(TextTokenizerConfig(backend="hf", path=str(tmp_path / "nope.json")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no tokenizer.json"):
        tt.load_hf(TextTokenizerConfig(backend="hf", path=str(tmp_path / "empty")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        tt.load_hf(TextTokenizerConfig(backend="hf", path=str(tmp_path / "bad.json")))
    with pytest.raises(ValueError, match="`path`.*`name`"):
        tt.load_hf(TextTokenizerConfig(backend="hf"))


@pytest.mark.parametrize("vocab", ["multilingual", "gpt2"])
def test_whisper_tokenizer_offline_round_trip(vocab, no_network):
    name = None if vocab == "multilingual" else vocab  # multilingual is the default
    # through the public entry point the tokenize stage uses
    tok = base.load_text_tokenizer(TextTokenizerConfig(backend="whisper", name=name),
                                   offline=True)
    assert isinstance(tok, tt.WhisperTextTokenizer)
    assert base._TEXT["whisper"] is tt.load_whisper
    assert tok.info.name == f"whisper:{vocab}"
    assert len(tok.info.version) == 16
    text = "Hello world, this is speechmill: 123 clips, naïve café."
    ids = tok.encode(text)
    assert ids and tok.decode(ids) == text
    # plain text tokens only: no <|startoftranscript|>, <|endoftext|> ... ids
    eot = tok.info.extra["eot"]
    assert max(ids) < eot
    # a special-token string in the data is just text
    weird = "say <|endoftext|> please"
    assert eot not in tok.encode(weird) and tok.decode(tok.encode(weird)) == weird
    assert tok.info.vocab_size > eot


def test_whisper_tokenizer_bad_keys():
    with pytest.raises(ValueError, match="`name`"):
        tt.load_whisper(TextTokenizerConfig(backend="whisper", name="klingon"))
    with pytest.raises(ValueError, match="`path`"):
        tt.load_whisper(TextTokenizerConfig(backend="whisper", path="/x/vocab.tiktoken"))
