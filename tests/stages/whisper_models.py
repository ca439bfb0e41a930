"""Small randomly initialised Whisper models for tests, built offline with the libraries'
own classes and saved in the formats users' model paths point at.

* :func:`make_multilingual_ct2` -- a multilingual faster-whisper (CTranslate2) model
  directory: a tiny random ``transformers`` ``WhisperForConditionalGeneration`` with the
  multilingual vocabulary size (51865), converted by CTranslate2's own Transformers
  converter. Its ``tokenizer.json`` carries the vocabulary of openai-whisper's
  ``multilingual.tiktoken`` (shipped inside the ``openai-whisper`` package) with Whisper's
  special tokens in their multilingual places (``<|endoftext|>`` 50257,
  ``<|startoftranscript|>`` 50258, 99 language tokens, ..., ``<|notimestamps|>`` 50363);
  BPE merges are left out (encoding falls back to byte tokens; decoding is exact), which is
  all a random model needs.
* :func:`make_openai_whisper_checkpoint` -- a random openai-whisper ``.pt`` checkpoint,
  English-only (vocabulary 51864) or multilingual (51865).

Random weights transcribe nothing useful: tests check plumbing (language detection runs
and yields a probability, validation reads the model's vocabulary), not text.
"""

from __future__ import annotations

import json
from pathlib import Path

MULTILINGUAL_VOCAB = 51865
ENGLISH_VOCAB = 51864


def _multilingual_tokenizer() -> object:
    import whisper
    from tiktoken.load import load_tiktoken_bpe
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from whisper.tokenizer import LANGUAGES, get_encoding

    asset = Path(whisper.__file__).parent / "assets" / "multilingual.tiktoken"
    ranks = load_tiktoken_bpe(str(asset))
    # GPT-2's byte -> printable character map, as byte-level BPE vocabularies spell tokens
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, (chr(c) for c in cs), strict=True))
    vocab = {"".join(table[c] for c in tok): rank for tok, rank in ranks.items()}
    tk = Tokenizer(models.BPE(vocab, [], fuse_unk=False, ignore_merges=True))
    pattern = get_encoding("multilingual", num_languages=99)._pat_str
    from tokenizers import Regex

    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    langs = list(LANGUAGES)[:99]
    specials = ["<|endoftext|>", "<|startoftranscript|>", *(f"<|{x}|>" for x in langs),
                "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>",
                "<|nospeech|>", "<|notimestamps|>"]
    tk.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    assert tk.token_to_id("<|startoftranscript|>") == 50258
    assert tk.token_to_id("<|notimestamps|>") == 50363
    return tk, langs


def make_multilingual_ct2(root: Path, seed: int = 0) -> Path:
    """A random multilingual faster-whisper model directory under ``root`` (~3 s)."""
    import ctranslate2
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    root.mkdir(parents=True, exist_ok=True)
    hf = root / "hf"
    hf.mkdir(exist_ok=True)
    tk, langs = _multilingual_tokenizer()
    tk.save(str(hf / "tokenizer.json"))  # type: ignore[attr-defined]
    (hf / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 448}))
    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=MULTILINGUAL_VOCAB, num_mel_bins=80, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=1500,
        max_target_positions=448, decoder_start_token_id=50258, bos_token_id=50257,
        eos_token_id=50257, pad_token_id=50257)
    model = WhisperForConditionalGeneration(cfg)
    gen = model.generation_config
    gen.lang_to_id = {f"<|{x}|>": 50259 + i for i, x in enumerate(langs)}
    gen.alignment_heads = [[0, 0], [0, 1]]
    gen.suppress_tokens = []
    gen.begin_suppress_tokens = [220, 50257]
    model.save_pretrained(hf)
    out = root / "ct2"
    ctranslate2.converters.TransformersConverter(
        str(hf), copy_files=["tokenizer.json"]).convert(str(out), force=True)
    # the converter reads the language token ids from the generation config, which this
    # transformers release does not keep: write them as converted hub models have them
    conf = json.loads((out / "config.json").read_text())
    conf["lang_ids"] = list(gen.lang_to_id.values())
    (out / "config.json").write_text(json.dumps(conf))
    return out


def make_openai_whisper_checkpoint(path: Path, multilingual: bool, seed: int = 0) -> Path:
    """A random tiny openai-whisper checkpoint (what ``whisper.load_model(path)`` reads)."""
    from dataclasses import asdict

    import torch
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(seed)
    dims = ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=32, n_audio_head=2, n_audio_layer=1,
        n_vocab=MULTILINGUAL_VOCAB if multilingual else ENGLISH_VOCAB, n_text_ctx=64,
        n_text_state=32, n_text_head=2, n_text_layer=1)
    model = Whisper(dims)
    # the decoder's positional embedding is made with torch.empty (uninitialised memory:
    # sometimes NaN); give it seeded values so the checkpoint is the same on every run
    with torch.no_grad():
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.02)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path
