"""F5-TTS (flow-matching DiT + Vocos), zero-shot cloning in process.

Loading follows ``f5_tts.api.F5TTS.__init__`` step by step (``load_vocoder`` +
``load_model`` from ``f5_tts.infer.utils_infer``), with the files resolved first:

* checkpoint directory: ``path`` (or ``$SPEECHMILL_MODELS/f5-tts/<name>``, the HF cache, a
  download) holding ``model_*.safetensors`` / ``*.pt`` (or ``ckpt_file``), ``vocab.txt``
  (or ``vocab_file``; else the package's), optionally a training-config YAML with
  ``model.arch`` (fine-tunes and custom sizes), else the package config ``model``
  (default: ``name`` when it is one, else ``F5TTS_v1_Base``);
* vocoder: ``vocoder_path``, a ``vocos/`` folder in the checkpoint directory, or
  ``charactr/vocos-mel-24khz`` (cache, else download).

Synthesis hands the prompt audio (in memory, so no FFmpeg is needed) and its text to
``infer_batch_process``, as ``F5TTS.infer`` does after its preprocessing. The prompt text
must not be empty: F5 would download an ASR model to transcribe the prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from speechmill.pipeline.models import ModelNotFoundError
from speechmill.synth.tts.audio import load_prompt
from speechmill.synth.tts.base import (
    TTSBackend,
    TTSError,
    VoicePrompt,
    fingerprint,
    package_version,
)
from speechmill.synth.tts.resolve import F5_OFFICIAL, VOCOS_REPO, resolve_model

SAMPLE_RATE = 24000
DEFAULT_MODEL = "F5TTS_v1_Base"


def _checkpoint_in(d: Path) -> Path | None:
    cands = sorted(d.glob("model_*.safetensors")) + sorted(d.glob("model_*.pt"))
    if not cands:
        cands = sorted(d.glob("*.safetensors")) + sorted(d.glob("*.pt"))

    def step(p: Path) -> int:
        tail = p.stem.rsplit("_", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    return max(cands, key=step) if cands else None


class F5Backend(TTSBackend):
    name = "f5_tts"
    max_chars = 200
    needs_prompt = True
    prompt_seconds = (2.0, 12.0)

    def load(self) -> None:
        from hydra.utils import get_class
        from omegaconf import OmegaConf

        spec = self.spec
        name = spec.name or DEFAULT_MODEL
        res = resolve_model("f5-tts", name if not spec.path else None, spec.path, spec.device,
                            self.offline)
        loc = Path(res.location)
        d = loc if loc.is_dir() else loc.parent
        ckpt = Path(spec.ckpt_file) if spec.ckpt_file else (loc if loc.is_file()
                                                              else _checkpoint_in(d))
        if ckpt is None or not ckpt.is_file():
            raise ModelNotFoundError(f"f5_tts: no checkpoint (model_*.safetensors or *.pt) "
                                     f"in {str(d)!r}; set `ckpt_file`")
        vocab = Path(spec.vocab_file) if spec.vocab_file else d / "vocab.txt"
        if spec.vocab_file and not vocab.is_file():
            raise ModelNotFoundError(f"f5_tts: vocab_file {str(vocab)!r} does not exist")
        vocab_arg = str(vocab) if vocab.is_file() else ""  # "" -> the package's vocab

        from importlib.resources import files

        yamls = [p for p in sorted(d.glob("*.yaml")) if "arch" in
                 (OmegaConf.load(p).get("model") or {})]
        if spec.model or not yamls:
            cfg_name = spec.model or (name if name in F5_OFFICIAL else DEFAULT_MODEL)
            cfg_file = Path(str(files("f5_tts").joinpath(f"configs/{cfg_name}.yaml")))
            if not cfg_file.exists():
                raise ModelNotFoundError(f"f5_tts: unknown model config {cfg_name!r}")
        else:
            cfg_file = yamls[0]
        cfg = OmegaConf.load(cfg_file)
        mel_type = cfg.model.mel_spec.mel_spec_type
        if mel_type != "vocos":
            raise ModelNotFoundError(f"f5_tts: only the vocos vocoder is supported "
                                     f"(config {cfg_file.name} uses {mel_type!r})")
        voc_path = spec.vocoder_path or (str(d / "vocos") if (d / "vocos" / "config.yaml")
                                         .exists() else None)
        vres = resolve_model("vocos", VOCOS_REPO if not voc_path else None, voc_path,
                             spec.device, self.offline)

        import contextlib
        import io

        from f5_tts.infer.utils_infer import load_model, load_vocoder

        self.device = res.device
        model_cls = get_class(f"f5_tts.model.{cfg.model.backbone}")
        arch = OmegaConf.to_container(cfg.model.arch, resolve=True)
        with contextlib.redirect_stdout(io.StringIO()):  # F5 prints its file names
            self.vocoder = load_vocoder(mel_type, True, vres.location, self.device)
            self.model = load_model(model_cls, arch, str(ckpt), mel_type, vocab_arg,
                                    "euler", True, self.device)
        self.mel_type = mel_type
        self.sample_rate = int(cfg.model.mel_spec.target_sample_rate)
        vfiles = [Path(vres.location) / "pytorch_model.bin"]
        self.version = (f"{package_version('f5-tts')}+{cfg_file.stem}:"
                        f"{fingerprint([ckpt, *vfiles])}")
        self.checkpoint = str(ckpt)

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        import torch
        from f5_tts.infer import utils_infer

        assert voice is not None
        ref_text = voice.text.strip()
        if not ref_text:
            raise TTSError(f"voice {voice.voice_id!r}: F5-TTS needs the prompt's text")
        # F5's own preprocessing: the prompt text ends with a sentence end and a space
        if not ref_text.endswith((". ", "。")):
            ref_text = ref_text + (" " if ref_text.endswith(".") else ". ")
        ref, sr = load_prompt(voice, self.sample_rate, max_seconds=self.prompt_seconds[1])
        with self.model_lock:
            if seed is not None:
                from f5_tts.model.utils import seed_everything

                seed_everything(seed)
            out: Any = next(utils_infer.infer_batch_process(
                (torch.from_numpy(ref)[None, :], sr), ref_text, [text], self.model,
                self.vocoder, mel_spec_type=self.mel_type, progress=None,
                nfe_step=self.spec.nfe_step, cfg_strength=self.spec.cfg_strength,
                sway_sampling_coef=self.spec.sway_sampling_coef, speed=self.spec.speed,
                device=self.device,
            ))
        wav = out[0]
        if wav is None:
            raise TTSError("F5-TTS produced no audio")
        return np.asarray(wav, np.float32).reshape(-1)
