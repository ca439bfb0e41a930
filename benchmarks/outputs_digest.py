"""Behaviour check for refactors: run ``dags/demo.yaml`` and ``dags/voice_assistant.yaml``
offline as ``make demo`` does and write a digest of what they produced (per stage: row ids,
texts, speakers, segment times and reject reasons; per export: file names), so two
checkouts can be compared.

    python benchmarks/outputs_digest.py run --out before.json      # at the old commit
    python benchmarks/outputs_digest.py run --out after.json       # at the new one
    python benchmarks/outputs_digest.py compare before.json after.json

``compare`` exits 1 and prints the first differences when the digests differ. Timing
columns, absolute paths and run ids are left out: they change from run to run. The demo's
input audio is synthesized with sampling noise, so two checkouts must read the same input:
``--input DIR`` makes it once there and reuses it. For the same reason the durations of
synthesized dialogue clips are left out (Piper samples noise on every call).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the columns that say what a row is; anything else (timings, paths) may differ between runs
KEEP = ("id", "source_id", "recording_id", "text", "speaker", "speaker_id", "start", "end",
        "duration", "split", "reason", "role", "dialogue_id", "voice_id", "language", "round")
EXPORT_SKIP = {"metrics.json", "run.json"}


def _round(v: Any) -> Any:
    return round(v, 3) if isinstance(v, float) else v


def _stage_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    rows: list[dict[str, Any]] = []
    for part in sorted(path.glob("part-*.parquet")):
        t = pq.read_table(part)
        cols = [c for c in KEEP if c in t.column_names]
        rows += [{c: _round(r[c]) for c in cols} for r in t.select(cols).to_pylist()]
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def digest(run: Path, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """What ``run`` holds, without what changes between two runs of the same inputs (and
    without the columns in ``drop``)."""
    out: dict[str, Any] = {"stages": {}, "exports": []}
    for d in sorted((run / "stages").iterdir()):
        rows = {"outputs": _stage_rows(d), "rejects": _stage_rows(d / "rejects")}
        out["stages"][d.name] = {k: [{c: v for c, v in r.items() if c not in drop} for r in x]
                                 for k, x in rows.items()}
    exports = run / "exports"
    if exports.is_dir():
        out["exports"] = sorted(str(p.relative_to(exports)) for p in exports.rglob("*")
                                if p.is_file() and p.name not in EXPORT_SKIP)
    return out


def run_all(work: Path, demo_input: Path | None = None) -> dict[str, Any]:
    demo_input = demo_input or work / "in"
    env = {**os.environ, "SPEECHMILL_DEMO_INPUT": str(demo_input),
           "SPEECHMILL_RUN_DIR": str(work / "demo"), "PYTHONHASHSEED": "0"}
    cli = [sys.executable, "-m", "speechmill.pipeline.cli"]
    if not (demo_input / ".done").exists():
        subprocess.run([*cli, "demo-data", str(demo_input)], check=True, env=env, cwd=ROOT)
        (demo_input / ".done").touch()
    subprocess.run([*cli, "run", "dags/demo.yaml", "--offline", "--no-progress"],
                   check=True, env=env, cwd=ROOT)
    env_va = {**env, "SPEECHMILL_VOICES_FROM": str(work / "demo"),
              "DIALOGUES": "dags/data/dialogues/ultrachat.jsonl",
              "SPEECHMILL_RUN_DIR": str(work / "dialogues")}
    subprocess.run([*cli, "run", "dags/voice_assistant.yaml", "--offline", "--no-progress",
                    "--executor", "local", "--set", "import.max_rows=5",
                    "--set", "tts.max_share=1", "--set", "tokenize.audio=null",
                    "--set", "shards.layout=plain"], check=True, env=env_va, cwd=ROOT)
    return {"demo": digest(work / "demo"),
            "voice_assistant": digest(work / "dialogues", drop=("duration",))}


def _diff(a: Any, b: Any, where: str, out: list[str]) -> None:
    if len(out) >= 20:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}/{k}: only in {'after' if k not in a else 'before'}")
            else:
                _diff(a[k], b[k], f"{where}/{k}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{where}[{i}]", out)
    elif a != b:
        out.append(f"{where}: {json.dumps(a, default=str)[:200]} != "
                   f"{json.dumps(b, default=str)[:200]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run both DAGs and write their digest")
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--work", type=Path, help="keep the runs here (default: a temp dir)")
    r.add_argument("--input", type=Path, help="the demo's input audio: made here once, then "
                   "reused (give the same DIR to both checkouts)")
    c = sub.add_parser("compare", help="compare two digests")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        if args.work:
            result = run_all(args.work, args.input)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                result = run_all(Path(tmp), args.input)
        args.out.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
        n = sum(len(s["outputs"]) for d in result.values() for s in d["stages"].values())
        print(f"digest of {n} output rows written to {args.out}")
        return 0
    before = json.loads(args.before.read_text())
    after = json.loads(args.after.read_text())
    diffs: list[str] = []
    _diff(before, after, "", diffs)
    if diffs:
        print("outputs differ:\n  " + "\n  ".join(diffs))
        return 1
    print("outputs identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
