"""Tiny randomly initialised TTS checkpoints, built with each library's own classes and
saved to disk in the layout users download, so tests load them through exactly the code
path a user's config hits (``load_backend(TTSSpec(...))``).

The models are untrained: their audio is noise. Tests check shapes, sample rates,
durations and that the voice prompt reaches the model, never what the audio sounds like.
Each builder returns the checkpoint directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

# -- F5-TTS ------------------------------------------------------------------------------

F5_ARCH = {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "ff_mult": 2, "text_dim": 16,
           "text_mask_padding": True, "qk_norm": None, "conv_layers": 1,
           "pe_attn_head": None, "attn_backend": "torch", "attn_mask_enabled": False,
           "checkpoint_activations": False}


def build_f5(root: Path) -> Path:
    """An F5-TTS checkpoint dir: ``model_1.safetensors`` (EMA weights), ``vocab.txt``,
    ``F5TTS_tiny.yaml`` (F5's training-config format) and a tiny Vocos vocoder in
    ``vocos/`` (``config.yaml`` + ``pytorch_model.bin``)."""
    from importlib.resources import files

    import torch
    from f5_tts.model import CFM, DiT
    from f5_tts.model.utils import get_tokenizer
    from safetensors.torch import save_file
    from vocos import Vocos

    torch.manual_seed(0)
    d = root / "f5_tiny"
    d.mkdir(parents=True, exist_ok=True)
    vocab = d / "vocab.txt"
    shutil.copy(str(files("f5_tts").joinpath("infer/examples/vocab.txt")), vocab)
    cfg = {"model": {"name": "F5TTS_tiny", "tokenizer": "custom", "backbone": "DiT",
                     "arch": F5_ARCH,
                     "mel_spec": {"target_sample_rate": 24000, "n_mel_channels": 100,
                                  "hop_length": 256, "win_length": 1024, "n_fft": 1024,
                                  "mel_spec_type": "vocos"}}}
    (d / "F5TTS_tiny.yaml").write_text(yaml.safe_dump(cfg))
    vocab_map, vocab_size = get_tokenizer(str(vocab), "custom")
    model = CFM(
        transformer=DiT(**F5_ARCH, text_num_embeds=vocab_size, mel_dim=100),
        mel_spec_kwargs={"n_fft": 1024, "hop_length": 256, "win_length": 1024,
                         "n_mel_channels": 100, "target_sample_rate": 24000,
                         "mel_spec_type": "vocos"},
        vocab_char_map=vocab_map,
    )
    state = {f"ema_model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / "model_1.safetensors"))

    voc = d / "vocos"
    voc.mkdir(exist_ok=True)
    vcfg = {
        "feature_extractor": {"class_path": "vocos.feature_extractors.MelSpectrogramFeatures",
                              "init_args": {"sample_rate": 24000, "n_fft": 1024,
                                            "hop_length": 256, "n_mels": 100,
                                            "padding": "center"}},
        "backbone": {"class_path": "vocos.models.VocosBackbone",
                     "init_args": {"input_channels": 100, "dim": 16, "intermediate_dim": 32,
                                   "num_layers": 1}},
        "head": {"class_path": "vocos.heads.ISTFTHead",
                 "init_args": {"dim": 16, "n_fft": 1024, "hop_length": 256,
                               "padding": "center"}},
    }
    (voc / "config.yaml").write_text(yaml.safe_dump(vcfg))
    vocoder = Vocos.from_hparams(str(voc / "config.yaml"))
    torch.save(vocoder.state_dict(), voc / "pytorch_model.bin")
    return d


# -- Kyutai pocket-tts ---------------------------------------------------------------------

POCKET_BINS = 64


def _pocket_tokenizer(path: Path, n_bins: int) -> None:
    """A word-piece tokenizer.json with exactly ``n_bins`` entries (pocket-tts asserts the
    tokenizer's size equals ``lookup_table.n_bins``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    letters = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,!?'")
    vocab = {"[UNK]": 0}
    for ch in letters:
        if len(vocab) < n_bins:
            vocab[ch] = len(vocab)
    for ch in letters:
        if len(vocab) < n_bins:
            vocab[f"##{ch}"] = len(vocab)
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def build_pocket(root: Path) -> Path:
    """A pocket-tts checkpoint dir: ``pocket_tiny.yaml`` whose ``weights_path`` and
    ``tokenizer_path`` are relative to the directory, ``model.safetensors`` (the whole
    TTSModel, Mimi included) and ``tokenizer.json``."""
    import safetensors.torch
    import torch
    from pocket_tts import TTSModel

    torch.manual_seed(0)
    d = root / "pocket_tiny"
    d.mkdir(parents=True, exist_ok=True)
    _pocket_tokenizer(d / "tokenizer.json", POCKET_BINS)
    seanet = {"dimension": 32, "channels": 1, "n_filters": 4, "n_residual_layers": 1,
              "ratios": [6, 5, 4], "kernel_size": 3, "residual_kernel_size": 3,
              "last_kernel_size": 3, "dilation_base": 2, "pad_mode": "constant",
              "compress": 2}
    mimi_tf = {"d_model": 32, "num_heads": 2, "num_layers": 1, "layer_scale": 0.01,
               "context": 50, "dim_feedforward": 32, "input_dimension": 32,
               "output_dimensions": [32]}
    cfg = {
        "flow_lm": {
            "insert_bos_before_voice": True, "dtype": "float32",
            "flow": {"depth": 1, "dim": 16},
            "transformer": {"d_model": 32, "hidden_scale": 1, "max_period": 10000,
                            "num_heads": 2, "num_layers": 1},
            "lookup_table": {"dim": 32, "n_bins": POCKET_BINS, "tokenizer": "tokenizers",
                             "tokenizer_path": "tokenizer.json"},
        },
        "mimi": {"dtype": "float32", "sample_rate": 24000, "channels": 1,
                 "frame_rate": 12.5, "inner_dim": 8, "outer_dim": 32, "seanet": seanet,
                 "transformer": mimi_tf,
                 "quantizer": {"dimension": 8, "output_dimension": 32}},
        "weights_path": "model.safetensors",
    }
    # build the random model from a weightless copy of the config (paths made absolute
    # so the library can read the tokenizer from any working directory)
    tmp_cfg = json.loads(json.dumps(cfg))
    tmp_cfg.pop("weights_path")
    tmp_cfg["flow_lm"]["lookup_table"]["tokenizer_path"] = str(d / "tokenizer.json")
    build = d / "_build.yaml"
    build.write_text(yaml.safe_dump(tmp_cfg))
    model = TTSModel.load_model(config=str(build))
    with torch.no_grad():  # the library starts the prompt projection at zero: randomise it
        model.flow_lm.speaker_proj_weight.normal_(0.0, 0.5)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    safetensors.torch.save_file(state, str(d / "model.safetensors"))
    build.unlink()
    (d / "pocket_tiny.yaml").write_text(yaml.safe_dump(cfg))
    return d


# -- XTTS v2 (coqui-tts) ----------------------------------------------------------------------


def _xtts_vocab(path: Path) -> None:
    """A character-level BPE vocab.json with the special tokens XTTS needs."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["[STOP]", "[UNK]", "[SPACE]", "[START]", "[en]", "[fr]", "[de]", "[es]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;\"")
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    tok.save(str(path))


def build_xtts(root: Path) -> Path:
    """An XTTS v2 checkpoint dir: ``config.json``, ``model.pth`` (``{"model": state}``)
    and ``vocab.json``. The GPT is tiny; the HiFi-GAN decoder and its speaker encoder
    have a fixed size in coqui-tts (~97 MB on disk)."""
    import torch
    from TTS.tts.configs.xtts_config import XttsArgs, XttsConfig
    from TTS.tts.layers.xtts.tokenizer import VoiceBpeTokenizer
    from TTS.tts.models.xtts import Xtts

    torch.manual_seed(0)
    d = root / "xtts_tiny"
    d.mkdir(parents=True, exist_ok=True)
    _xtts_vocab(d / "vocab.json")
    args = XttsArgs(gpt_layers=1, gpt_n_model_channels=32, gpt_n_heads=2,
                    gpt_max_audio_tokens=12, gpt_max_text_tokens=200,
                    gpt_max_prompt_tokens=70, gpt_num_audio_tokens=64,
                    gpt_start_audio_token=62, gpt_stop_audio_token=63,
                    gpt_use_perceiver_resampler=True, gpt_code_stride_len=1024,
                    decoder_input_dim=32, input_sample_rate=22050,
                    output_sample_rate=24000, output_hop_length=256, d_vector_dim=512)
    config = XttsConfig(model_args=args, languages=["en", "fr", "de", "es"])
    config.save_json(str(d / "config.json"))
    model = Xtts.init_from_config(config)
    # init_from_config has no tokenizer yet; with it the GPT gets its text-token sizes
    model.tokenizer = VoiceBpeTokenizer(vocab_file=str(d / "vocab.json"))
    model.init_models()
    torch.save({"model": model.state_dict()}, d / "model.pth")
    return d
