"""`annotate`'s `dnsmos_hop_s`: the stage scores with the hop it is given (real speech,
the shipped DNSMOS models), a longer hop moves scores only slightly, and the key is
validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile as sf
from pydantic import ValidationError

from speechmill.pipeline.audio import load_audio
from speechmill.pipeline.stage import StageContext
from speechmill.stages.annotate import Annotate, AnnotateConfig
from speechmill.stages.audio_models.quality import dnsmos
from testkit.audio import load_speech

SR = 16000
KEYS = ("dnsmos_sig", "dnsmos_bak", "dnsmos_ovrl", "dnsmos_p808")


def _scores(path: Path, run_dir: Path, **cfg: float) -> dict[str, float]:
    st = Annotate(AnnotateConfig(snr=False, clipping=False, bandwidth=False, text_lid=False,
                                 hallucination=False, speaking_rate=False, **cfg),
                  StageContext("annotate", str(run_dir)))
    st.setup()
    out = st.run_row({"id": "seg", "audio_path": str(path), "offset": 1.0,
                      "duration": 19.0, "text": "hello"})
    assert out.reject is None, out.reject
    return {k: out.outputs[0]["scores"][k] for k in KEYS}


def test_dnsmos_hop_is_used_and_moves_scores_little(tmp_path: Path) -> None:
    x = load_speech(21.0, seed=3)
    path = tmp_path / "speech.flac"
    sf.write(path, x, SR)
    clip, _ = load_audio(str(path), 1.0, 19.0, SR)  # the row's offset and duration
    dense = _scores(path, tmp_path)  # default: 1 s hop, 11 windows here
    sparse = _scores(path, tmp_path, dnsmos_hop_s=9.01)  # 2 windows
    # the stage scores exactly what dnsmos() gives with that hop
    for got, hop in ((dense, 1.0), (sparse, 9.01)):
        want = dnsmos(clip, SR, hop_s=hop)
        assert got == pytest.approx({k: want[k] for k in KEYS}, abs=1e-4)
    # different windows, so not the same numbers, but close (measured: SIG/BAK/OVRL
    # <= 0.06 apart, P.808 0.10)
    assert dense != pytest.approx(sparse, abs=1e-4)
    assert all(abs(dense[k] - sparse[k]) < 0.15 for k in KEYS), (dense, sparse)


@pytest.mark.parametrize("hop", [0.0, -1.0, 9.5])
def test_dnsmos_hop_out_of_range_is_refused(hop: float) -> None:
    with pytest.raises(ValidationError, match="dnsmos_hop_s"):
        AnnotateConfig(dnsmos_hop_s=hop)
