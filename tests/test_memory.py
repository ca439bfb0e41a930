"""Standardizing a 2-hour file keeps peak RSS well under 1 GiB (streaming, not loading)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from testkit.audio import write_long_flac

# Peak RSS is the kernel's high-water mark of this process (VmHWM, KiB). ru_maxrss is not
# used: after fork+exec it still counts the forked copy of the (large) pytest parent.
CHILD = r"""
import json, sys
from pathlib import Path
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
from speechmill.stages.standardize import StandardizeConfig, standardize_file
base = hwm()
r = standardize_file(sys.argv[1], Path(sys.argv[2]),
                     StandardizeConfig(sample_rate=24000, loudness="lufs"))
print(json.dumps({"peak_kib": hwm(), "after_import_kib": base, **r}))
"""


@pytest.mark.slow
def test_two_hour_file_streams_in_bounded_memory(tmp_path: Path) -> None:
    src = tmp_path / "two_hours.flac"
    write_long_flac(src, 2 * 3600, sample_rate=16000)
    out = tmp_path / "out.flac"
    r = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    peak_mib = res["peak_kib"] / 1024
    print(f"2 h standardize: peak RSS {peak_mib:.0f} MiB "
          f"(after imports {res['after_import_kib'] / 1024:.0f} MiB)")
    # the decoded 2 h at 24 kHz float32 alone would be 660 MiB; streaming stays far below
    assert peak_mib < 400, peak_mib
    info = sf.info(out)
    assert info.samplerate == 24000 and info.channels == 1
    assert info.duration == pytest.approx(7200, abs=0.1)
    assert res["duration"] == pytest.approx(7200, abs=0.1)
