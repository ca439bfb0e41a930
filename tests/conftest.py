"""Shared fixtures: real speech in every format, bad inputs, and DAG helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from testkit.audio import make_unreadable, write_bad_files, write_good_files

# Fuzz targets (tests/fuzz): a small budget in `make test`; a long local run with
# `pytest tests/fuzz --hypothesis-profile=long`. Failing examples found are committed as
# @example regression cases next to the target.
_FUZZ_CHECKS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                HealthCheck.data_too_large]
settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=_FUZZ_CHECKS, print_blob=True)
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=_FUZZ_CHECKS, print_blob=True)
settings.load_profile(os.environ.get("SPEECHMILL_HYPOTHESIS_PROFILE", "ci"))

# reasons the pipeline must give for each bad-input category of the audio factory
EXPECTED_REASON = {
    "empty_file": {"empty_file"},
    "not_audio": {"not_audio"},
    "truncated": {"truncated"},
    "truncated_header": {"not_audio", "truncated", "corrupt"},
    "nonfinite": {"nonfinite_samples"},
    "zero_length": {"zero_length"},
    "unsupported_codec": {"unsupported_codec"},
    "unreadable": {"unreadable"},
}


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A folder with every good format and every bad input; (dir, good, bad)."""
    d = tmp_path_factory.mktemp("media")
    good = write_good_files(d / "good")
    bad = write_bad_files(d / "bad")
    make_unreadable(d / "bad")
    bad["unreadable.wav"] = "unreadable"
    return d, good, bad


@pytest.fixture
def media_copy(media_dir: tuple[Path, dict, dict], tmp_path: Path) -> tuple[Path, dict, dict]:
    d, good, bad = media_dir
    dst = tmp_path / "media"
    shutil.copytree(d, dst, symlinks=True)
    return dst, good, bad


@pytest.fixture(autouse=True)
def _no_network_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def dag_yaml(input_dir: Path | str, run_dir: Path | str, executor: str = "local",
             extra_std: str = "", batch: int = 2) -> str:
    return f"""
name: test
run_dir: {run_dir}
executor: {{type: {executor}, stall_timeout_s: 300, num_cpus: 2}}
stages:
  - id: ingest
    uses: ingest
    batch_size: {batch}
    with:
      inputs: ["{input_dir}"]
  - id: standardize
    uses: standardize
    needs: [ingest]
    batch_size: {batch}
    with:
      sample_rate: 24000
{extra_std}
"""


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env
