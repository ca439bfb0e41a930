"""DAG validation: every problem is caught before work starts and names stage and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from speechmill.pipeline import dag as dagmod
from speechmill.pipeline.errors import ConfigError

GOOD = """
name: t
run_dir: {run_dir}
stages:
  - id: ingest
    uses: ingest
    with: {{inputs: ["{inp}"]}}
  - id: std
    uses: standardize
    needs: ingest
    with: {{sample_rate: 16000}}
"""


def good(tmp_path: Path) -> str:
    return GOOD.format(run_dir=tmp_path / "run", inp=tmp_path / "in")


def test_good_dag_plans_in_dependency_order(tmp_path: Path) -> None:
    d = dagmod.loads(good(tmp_path))
    assert [s.id for s in d.stages] == ["ingest", "std"]
    assert d.stage("std").config.sample_rate == 16000  # type: ignore[attr-defined]
    assert d.stage("std").config.loudness == "dbfs"  # type: ignore[attr-defined]
    assert d.stage("ingest").downstream == ["std"]


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda t: t.replace("uses: standardize", "uses: standardise"),
         ["stage 'std'", "'uses'", "unknown stage 'standardise'"]),
        (lambda t: t.replace("sample_rate: 16000", "sample_rat: 16000"),
         ["stage 'std'", "with.sample_rat", "unknown key"]),
        (lambda t: t.replace("sample_rate: 16000", "sample_rate: fast"),
         ["stage 'std'", "with.sample_rate", "integer"]),
        (lambda t: t.replace("sample_rate: 16000", "sample_rate: 100"),
         ["stage 'std'", "with.sample_rate", "greater than or equal"]),
        (lambda t: t.replace("needs: ingest", "needs: fetch"),
         ["stage 'std'", "'needs'", "unknown stage 'fetch'"]),
        (lambda t: t.replace("    uses: ingest\n", "    uses: ingest\n    needs: std\n"),
         ["stage 'ingest'", "'needs'", "source stage"]),
        (lambda t: t.replace("    needs: ingest\n", ""),
         ["stage 'std'", "'needs'", "needs an upstream"]),
        (lambda t: t.replace("id: std", "id: ingest"),
         ["duplicate stage id"]),
        (lambda t: t.replace("name: t", "name: t\nbogus: 1"), ["'bogus'", "unknown key"]),
        (lambda t: t.replace("    with: {inputs", "    batch_size: 0\n    with: {inputs"),
         ["stage 'ingest'", "batch_size"]),
        # a stage id names its directories (stages/<id>/): `$` let "std\n" through
        (lambda t: t.replace("id: std", 'id: "std\\n"'),
         ["stage 'std\\n'", "key 'id'", "control character"]),
        (lambda t: t.replace("id: std", "id: ../std"), ["stage '../std'", "key 'id'"]),
        (lambda t: t.replace("    with: {inputs", "    resources: {gpus: -1}\n    with: {inputs"),
         ["stage 'ingest'", "key 'resources.gpus'", "finite number >= 0"]),
        (lambda t: t.replace("    with: {inputs", "    resources: {cpus: .inf}\n    with: {inputs"),
         ["stage 'ingest'", "key 'resources.cpus'", "finite number >= 0"]),
        (lambda t: t.replace("name: t", "name: t\nbad: [unclosed"), ["not valid YAML", "line"]),
    ],
)
def test_broken_dags_name_stage_and_key(tmp_path: Path, mutate, needle: list[str]) -> None:
    text = mutate(good(tmp_path))
    with pytest.raises(ConfigError) as e:
        dagmod.loads(text)
    msg = str(e.value)
    for n in needle:
        assert n in msg, msg
    assert "\n" not in msg, msg  # one problem: one line


def test_cycle_between_three_stages(tmp_path: Path) -> None:
    text = f"""
name: c
run_dir: {tmp_path}
stages:
  - {{id: a, uses: standardize, needs: [c]}}
  - {{id: b, uses: standardize, needs: [a]}}
  - {{id: c, uses: standardize, needs: [b]}}
"""
    with pytest.raises(ConfigError, match=r"cycle in 'needs': a -> c -> b -> a"):
        dagmod.loads(text)


def test_env_interpolation_and_defaults(tmp_path: Path) -> None:
    text = good(tmp_path).replace("sample_rate: 16000", "sample_rate: \"${SR}\"")
    text = text.replace(str(tmp_path / "in"), "${IN_DIR:-/data/default}")
    d = dagmod.loads(text, env={"SR": "22050"})
    assert d.stage("std").config.sample_rate == 22050  # type: ignore[attr-defined]
    assert d.stage("ingest").config.inputs == ["/data/default"]  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as e:
        dagmod.loads(text, env={})
    assert "stage 'std'" in str(e.value) and "'SR'" in str(e.value)
    assert "with.sample_rate" in str(e.value)


def test_set_overrides(tmp_path: Path) -> None:
    d = dagmod.loads(
        good(tmp_path),
        overrides=["std.sample_rate=8000", "std.loudness=lufs", "executor.type=local",
                   "std.batch_size=7", f"run_dir={tmp_path / 'other'}"],
    )
    st = d.stage("std")
    assert st.config.sample_rate == 8000 and st.config.loudness == "lufs"  # type: ignore[attr-defined]
    assert st.batch_size == 7
    assert d.spec.executor.type == "local"
    assert d.run_dir == str(tmp_path / "other")
    with pytest.raises(ConfigError, match="no stage with id 'nope'"):
        dagmod.loads(good(tmp_path), overrides=["nope.x=1"])
    with pytest.raises(ConfigError, match=r"stage 'std'.*with.loudness"):
        dagmod.loads(good(tmp_path), overrides=["std.loudness=loud"])


def test_fingerprint_changes_with_config_and_upstream(tmp_path: Path) -> None:
    a = dagmod.loads(good(tmp_path))
    b = dagmod.loads(good(tmp_path), overrides=["std.sample_rate=8000"])
    c = dagmod.loads(good(tmp_path), overrides=["ingest.max_bytes=10"])
    assert a.stage("ingest").fingerprint == b.stage("ingest").fingerprint
    assert a.stage("std").fingerprint != b.stage("std").fingerprint
    assert a.stage("std").fingerprint != c.stage("std").fingerprint  # upstream changed


def test_secrets_never_reach_resolved_dag(tmp_path: Path) -> None:
    text = good(tmp_path).replace(str(tmp_path / "in"),
                                  "s3://bucket/x?token=${MY_API_TOKEN}")
    d = dagmod.loads(text, env={"MY_API_TOKEN": "sk-very-secret-123"})
    assert "sk-very-secret-123" in d.stage("ingest").config.inputs[0]  # type: ignore[attr-defined]
    out = d.resolved_yaml()
    assert "sk-very-secret-123" not in out
    assert "${MY_API_TOKEN}" in out
    red = dagmod.redact({"api_key": "abc", "nested": {"hf_token": "x"}, "ok": 1})
    assert red == {"api_key": dagmod.REDACTED, "nested": {"hf_token": dagmod.REDACTED},
                   "ok": 1}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_validate_and_dry_run(tmp_path: Path) -> None:
    f = tmp_path / "dag.yaml"
    f.write_text(good(tmp_path))
    r = _cli("validate", str(f))
    assert r.returncode == 0, r.stderr
    assert "ingest" in r.stdout and "std" in r.stdout and "pending" in r.stdout
    r = _cli("run", str(f), "--dry-run", "--set", "std.sample_rate=8000")
    assert r.returncode == 0, r.stderr
    assert "sample_rate=8000" in r.stdout and "dry run" in r.stdout
    assert not (tmp_path / "run").exists()  # nothing executed, nothing written


def test_cli_broken_dag_exits_nonzero_before_any_work(tmp_path: Path) -> None:
    f = tmp_path / "dag.yaml"
    f.write_text(good(tmp_path).replace("sample_rate: 16000", "sample_rate: 16000, x: 1"))
    r = _cli("run", str(f))
    assert r.returncode == 2
    assert "stage 'std'" in r.stderr and "with.x" in r.stderr
    assert not (tmp_path / "run").exists()


def test_shipped_dags_validate(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2] / "dags"
    files = sorted(root.glob("*.yaml"))
    assert files
    for f in files:
        d = dagmod.load(f, env={"INPUT": str(tmp_path), "FEED": "https://example.org/feed.xml"})
        assert d.stages, f
        yaml.safe_load(d.resolved_yaml())


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys; from speechmill.pipeline.cli import build_parser; build_parser();"
        "heavy=[m for m in ('ray','pyarrow','av','numpy','torch','pydantic','rich') "
        "if m in sys.modules]; print(heavy)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_stages_register_through_entry_points_and_list_params() -> None:
    from importlib.metadata import entry_points

    from speechmill.pipeline import registry

    eps = {ep.name for ep in entry_points(group="speechmill.stages")}
    assert {"ingest", "standardize"} <= eps
    assert registry.get("standardize").name == "standardize"
    r = _cli("stages")
    assert r.returncode == 0, r.stderr
    for needle in ("ingest", "standardize", "sample_rate", "24000", "'dbfs' | 'lufs' | 'none'",
                   "max_bytes"):
        assert needle in r.stdout, needle


def test_fingerprint_ignores_defaults_spelled_out_or_added(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    from pydantic import Field

    from speechmill.stages.standardize import Standardize

    a = dagmod.loads(good(tmp_path))
    default = Standardize.Config.model_fields["target_dbfs"].default
    b = dagmod.loads(good(tmp_path), overrides=[f"std.target_dbfs={default}"])
    assert b.stage("std").config.model_fields_set >= {"target_dbfs"}
    assert a.stage("std").fingerprint == b.stage("std").fingerprint
    # a release adds a key with a default: run directories stay resumable

    class Newer(Standardize.Config):
        brand_new_knob: int = Field(7)

    monkeypatch.setattr(Standardize, "Config", Newer)
    c = dagmod.loads(good(tmp_path))
    assert c.stage("std").config.brand_new_knob == 7  # type: ignore[attr-defined]
    assert c.stage("std").fingerprint == a.stage("std").fingerprint
    assert c.stage("std").legacy_fingerprint != a.stage("std").legacy_fingerprint
    d = dagmod.loads(good(tmp_path), overrides=["std.brand_new_knob=8"])
    assert d.stage("std").fingerprint != a.stage("std").fingerprint


def test_redaction_hides_credentials_but_not_look_alike_settings() -> None:
    from speechmill.pipeline.dag import REDACTED, redact

    cfg = {"llm": {"api_key": "sk-1", "max_tokens": 256, "tokens_per_minute": 9000,
                   "max_total_tokens": 10},
           "hf_token": "hf_x", "token": "t", "auth_token": "a", "token_env": "HF_TOKEN",
           "text_tokenizer": "whisper", "allow_private": ["127.0.0.1"], "author": "me",
           "private_key": "pk", "storage_options": {"key": "AK", "secret": "SK"}}
    out = redact(cfg)
    assert out["llm"] == {"api_key": REDACTED, "max_tokens": 256, "tokens_per_minute": 9000,
                          "max_total_tokens": 10}
    for k in ("hf_token", "token", "auth_token", "token_env", "private_key",
              "storage_options"):
        assert out[k] == REDACTED, k
    for k in ("text_tokenizer", "allow_private", "author"):
        assert out[k] == cfg[k], k


def test_the_engine_imports_no_stage_or_feature_module() -> None:
    """pipeline/ knows no concrete stage, exporter or synthesis module: stages and helper
    commands (demo-data) reach it through entry points."""
    import re

    root = Path(__file__).resolve().parents[2] / "pipeline"
    pat = re.compile(r"^\s*(from|import)\s+speechmill\.(stages|manifests|synth)\b", re.M)
    offenders = [p.name for p in root.glob("*.py") if pat.search(p.read_text())]
    assert offenders == []
