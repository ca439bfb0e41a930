"""Issue 21: WAVs with 8 or more channels on the local executor are decoded, never a crash.

PyAV's ``AudioFrame.to_ndarray`` segfaulted on planar frames with >= 8 channels (exit
139, run.json left ``running``). The DAG runs through the CLI in a subprocess, so such a
crash shows as exit 139 instead of killing pytest.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechmill.pipeline.store import RunStore
from testkit.audio import load_speech
from tests.conftest import cli_env

SECONDS = 3.0


def _write_multichannel(path: Path, channels: int, rate: int, seed: int) -> np.ndarray:
    """Real speech in every channel (a different gain and delay each); returns the
    channel mean, what a mono downmix must give."""
    mono = load_speech(SECONDS, rate, seed=seed)
    cols = []
    for c in range(channels):
        d = 7 * c
        shifted = np.concatenate([np.zeros(d, np.float32), mono[: mono.size - d]])
        cols.append(shifted * np.float32(0.4 + 0.5 * c / channels))
    x = np.stack(cols, axis=1)
    sf.write(path, x, rate, subtype="PCM_16")
    return x.mean(axis=1)


def test_8_and_16_channel_wavs_are_downmixed(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    mean8 = _write_multichannel(inp / "eight.wav", 8, 16000, seed=1)
    _write_multichannel(inp / "sixteen.wav", 16, 48000, seed=2)
    sf.write(inp / "mono.wav", load_speech(SECONDS, 16000, seed=3), 16000, subtype="PCM_16")
    run_dir = tmp_path / "run"
    dag = tmp_path / "dag.yaml"
    dag.write_text(f"""
name: many-channels
run_dir: {run_dir}
executor: {{type: local}}
stages:
  - {{id: ingest, uses: ingest, with: {{inputs: ["{inp}"]}}}}
  - {{id: standardize, uses: standardize, needs: ingest, with: {{sample_rate: 16000}}}}
""")
    r = subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", "run", str(dag)],
                       capture_output=True, text=True, timeout=300, env=cli_env())
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "succeeded"

    store = RunStore(run_dir)
    rejects = [rj for sid in ("ingest", "standardize")
               for rj in store.read_rejects(sid).to_pylist()]
    assert rejects == [], rejects
    outs = {Path(o["source_url"]).name: o for o in store.read_outputs("standardize").to_pylist()}
    assert set(outs) == {"eight.wav", "sixteen.wav", "mono.wav"}
    for name, channels, rate in (("eight.wav", 8, 16000), ("sixteen.wav", 16, 48000),
                                 ("mono.wav", 1, 16000)):
        o = outs[name]
        assert o["source_channels"] == channels and o["source_sample_rate"] == rate, o
        assert o["channels"] == 1 and o["sample_rate"] == 16000
        y, sr = sf.read(o["audio_path"], dtype="float32", always_2d=True)
        assert sr == 16000 and y.shape[1] == 1, name
        assert y.shape[0] / sr == pytest.approx(SECONDS, abs=0.01), name
        assert np.sqrt(np.mean(y**2)) > 0.01, name  # speech, not silence
    # the downmix is the channel mean (up to standardize's one gain)
    y = sf.read(outs["eight.wav"]["audio_path"], dtype="float32")[0]
    assert np.corrcoef(y, mean8[: y.size])[0, 1] > 0.999
