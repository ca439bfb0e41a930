"""Kyutai pocket-tts: small, CPU-friendly zero-shot cloning, in process.

The model is named by a pocket-tts YAML config: ``path`` (a checkpoint directory holding
one ``*.yaml``, or the YAML itself), ``config`` (a YAML path), or ``name`` (a config
shipped in the package: ``english``, ``english_2m_2026-10``..., or a folder
``$SPEECHMILL_MODELS/pocket-tts/<name>``). Before loading, the config's file references
are made local: paths relative to the YAML's folder become absolute and ``hf://``
references become files of the Hugging Face cache (downloaded only when online), so
``TTSModel.load_model(config=...)`` never touches the network offline. The weights must
be the voice-cloning ones (``weights_path``; Kyutai gates them on the Hub).

The prompt is passed as audio (pocket-tts does not use the prompt's text); its encoded
state is cached per voice.
"""

from __future__ import annotations

import tempfile
from collections import OrderedDict
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
from speechmill.synth.tts.resolve import hf_ref_path, hf_refs, resolve_model

_PATH_KEYS = [("weights_path",), ("weights_path_without_voice_cloning",),
              ("flow_lm", "weights_path"), ("mimi", "weights_path"),
              ("flow_lm", "lookup_table", "tokenizer_path")]


def _get(cfg: dict, key: tuple[str, ...]) -> Any:
    for k in key:
        if not isinstance(cfg, dict) or k not in cfg:
            return None
        cfg = cfg[k]
    return cfg


def _set(cfg: dict, key: tuple[str, ...], value: Any) -> None:
    for k in key[:-1]:
        cfg = cfg[k]
    cfg[key[-1]] = value


def localize_config(yaml_path: Path, offline: bool) -> tuple[dict, list[Path]]:
    """The config with every file reference local; also the weight files (fingerprint)."""
    import yaml

    cfg = yaml.safe_load(yaml_path.read_text()) or {}
    base = yaml_path.parent
    refs = dict(hf_refs(cfg))
    files: list[Path] = []
    for key in _PATH_KEYS:
        v = _get(cfg, key)
        if not isinstance(v, str):
            continue
        if key in refs:
            p = hf_ref_path(v, local_only=True)
            if p is None and not offline:
                try:
                    p = hf_ref_path(v, local_only=False)
                except Exception as e:
                    if key == ("weights_path_without_voice_cloning",):
                        p = None
                    else:
                        raise ModelNotFoundError(
                            f"pocket_tts: cannot download {v} ({type(e).__name__}); the "
                            "voice-cloning weights are gated: accept the terms at "
                            "https://huggingface.co/kyutai/pocket-tts and log in") from None
            if p is None:
                if key == ("weights_path_without_voice_cloning",):
                    _set(cfg, key, None)
                    continue
                raise ModelNotFoundError(
                    f"pocket_tts: {'.'.join(key)} {v} is not in the Hugging Face cache"
                    + (" (offline: no download)" if offline else ""))
        elif v.startswith(("http://", "https://")):
            if offline:
                raise ModelNotFoundError(f"pocket_tts: {'.'.join(key)} is a URL ({v}); "
                                         "offline runs need local files")
            continue
        else:
            p = Path(v).expanduser()
            if not p.is_absolute():
                p = base / p
            if not p.exists():
                raise ModelNotFoundError(f"pocket_tts: {'.'.join(key)} {str(p)!r} does not "
                                         f"exist (config {str(yaml_path)!r})")
        _set(cfg, key, str(p))
        if key != ("flow_lm", "lookup_table", "tokenizer_path"):
            files.append(p)
    return cfg, files


class PocketBackend(TTSBackend):
    name = "pocket_tts"
    max_chars = 400
    needs_prompt = True
    prompt_seconds = (1.0, 30.0)

    def load(self) -> None:
        import yaml

        spec = self.spec
        if spec.config:
            yaml_path = Path(spec.config).expanduser()
            if not yaml_path.is_file():
                raise ModelNotFoundError(f"pocket_tts: config {str(yaml_path)!r} does not "
                                         "exist")
        else:
            res = resolve_model("pocket-tts", None if spec.path else (spec.name or "english"),
                                spec.path, spec.device, self.offline)
            loc = Path(res.location)
            if loc.is_dir():
                ymls = sorted(loc.glob("*.yaml")) + sorted(loc.glob("*.yml"))
                if len(ymls) != 1:
                    raise ModelNotFoundError(f"pocket_tts: {str(loc)!r} must hold exactly "
                                             f"one YAML config (found {len(ymls)})")
                loc = ymls[0]
            yaml_path = loc
        cfg, files = localize_config(yaml_path, self.offline)
        if not cfg.get("weights_path") and not _get(cfg, ("flow_lm", "weights_path")):
            raise ModelNotFoundError(f"pocket_tts: config {str(yaml_path)!r} names no "
                                     "weights (weights_path): the model would be random")
        self._tmp = tempfile.TemporaryDirectory(prefix="speechmill-pocket-")
        local_yaml = Path(self._tmp.name) / yaml_path.name
        local_yaml.write_text(yaml.safe_dump(cfg))

        import torch

        threads = torch.get_num_threads()
        from pocket_tts import TTSModel  # sets torch's thread count to 1 on import

        torch.set_num_threads(threads)
        kw: dict[str, Any] = {"config": str(local_yaml), "quantize": spec.quantize}
        if spec.temperature is not None:
            kw["temp"] = spec.temperature
        model = TTSModel.load_model(**kw)
        if not model.has_voice_cloning:
            raise ModelNotFoundError("pocket_tts: only the weights without voice cloning "
                                     "are available; accept the terms at "
                                     "https://huggingface.co/kyutai/pocket-tts and log in")
        from speechmill.pipeline.models import cuda_available

        self.device = spec.device if spec.device != "auto" else (
            "cuda" if cuda_available() else "cpu")
        self.model = model.to(self.device) if self.device != "cpu" else model
        self.sample_rate = int(model.sample_rate)
        self.version = f"{package_version('pocket-tts')}+{yaml_path.stem}:{fingerprint(files)}"
        self._states: OrderedDict[Any, Any] = OrderedDict()
        if spec.voice:
            self.needs_prompt = False

    def _state(self, voice: VoicePrompt | None) -> Any:
        import torch

        key: Any = voice.key if voice is not None else ("preset", self.spec.voice)
        st = self._states.get(key)
        if st is None:
            if voice is not None:
                audio, _ = load_prompt(voice, self.sample_rate,
                                       max_seconds=self.prompt_seconds[1])
                cond: Any = torch.from_numpy(audio)[None, :]
            else:  # a predefined voice name or an audio file from the config
                cond = self.spec.voice
            st = self.model.get_state_for_audio_prompt(cond)
            self._states[key] = st
            while len(self._states) > 32:
                self._states.popitem(last=False)
        self._states.move_to_end(key)
        return st

    def _synthesize_chunk(self, text: str, voice: VoicePrompt | None, seed: int | None,
                          language: str | None) -> np.ndarray:
        import torch

        with self.model_lock:  # pocket-tts generation is not thread-safe
            state = self._state(voice)
            if seed is not None:
                torch.manual_seed(seed)
            audio = self.model.generate_audio(state, text, copy_state=True)
        out = audio.detach().float().cpu().numpy().reshape(-1)
        if out.shape[0] == 0:
            raise TTSError("pocket-tts produced no audio")
        return out
