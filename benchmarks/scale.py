"""Driver memory and speed as the number of segments grows.

A synthetic corpus of N segment rows (transcripts, word lists, scores; all pointing into
one real audio file, since this measures the engine, not audio work) goes through
``read_parquet -> split -> nemo`` (a reference manifest) on the local executor, each run
in a fresh subprocess so its peak RSS is its own. The baseline, in the same way, is a
plain script: pyarrow reads the same Parquet, sorts by id and writes the same manifest
lines. Printed per N: wall seconds, peak RSS, and the growth of peak RSS per extra row
(bytes/row between the two sizes), for speechmill at two ``executor.wave_rows`` settings
(in-memory exports, and exports sorted on disk) and for the baseline.

    python benchmarks/scale.py [--rows 50000 200000] [--workdir runs/bench-scale]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MAKE = r"""
import sys
from pathlib import Path
import numpy as np, pyarrow as pa, pyarrow.parquet as pq, soundfile as sf
out, n = Path(sys.argv[1]), int(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
wav = out / "speech.wav"
if not wav.exists():
    sf.write(wav, np.zeros(16000 * 60, np.float32), 16000)
rng = np.random.default_rng(0)
order = rng.permutation(n)
per = 20000
words = [{"word": "w", "start": 0.1 * k, "end": 0.1 * k + 0.08, "score": 0.9}
         for k in range(12)]
for k in range(0, n, per):
    idx = order[k:k + per]
    pq.write_table(pa.table({
        "id": [f"rec{i // 20:07d}-{(i % 20) * 3000:08d}-{(i % 20) * 3000 + 2500:08d}"
               for i in idx],
        "parent_id": [f"rec{i // 20:07d}" for i in idx],
        "audio_path": [str(wav)] * len(idx),
        "offset": [float((i % 20) * 3) for i in idx],
        "duration": [2.5] * len(idx),
        "sample_rate": [16000] * len(idx),
        "speaker": [f"spk{i % 997:04d}" for i in idx],
        "language": ["en"] * len(idx),
        "text": [f"utterance number {i} says something about the weather today"
                 for i in idx],
        "words": [words] * len(idx),
        "scores": [{"dnsmos_ovrl": 3.2, "snr_db": 20.0, "wer_proxy": 0.1}] * len(idx),
    }), out / f"part-{k // per:05d}.parquet")
print("{}")
"""

BASELINE = r"""
import json, resource, sys, time
from pathlib import Path
import pyarrow.parquet as pq, pyarrow.compute as pc
src, out = Path(sys.argv[1]), Path(sys.argv[2])
t0 = time.perf_counter()
t = pq.read_table(sorted(src.glob("part-*.parquet")))
t = t.take(pc.sort_indices(t, sort_keys=[("id", "ascending")]))
out.parent.mkdir(parents=True, exist_ok=True)
with open(out, "w") as f:
    for a in range(0, t.num_rows, 4096):
        for r in t.slice(a, 4096).to_pylist():
            e = {"audio_filepath": r["audio_path"], "duration": r["duration"],
                 "offset": r["offset"], "text": r["text"], "lang": r["language"],
                 "speaker": r["speaker"], "id": r["id"], **r["scores"]}
            f.write(json.dumps(e) + "\n")
print(json.dumps({"wall": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RUN = r"""
import io, json, resource, sys, time
from rich.console import Console
from speechmill.pipeline import dag as dagmod, runner
t0 = time.perf_counter()
res = runner.run(dagmod.loads(open(sys.argv[1]).read()), progress=False,
                 console=Console(file=io.StringIO()))
assert res.status == "succeeded", res.status
print(json.dumps({"wall": time.perf_counter() - t0,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

DAG = """
name: scale
run_dir: {run}
executor: {{type: local, progress: false, wave_rows: {wave}}}
stages:
  - {{id: src, uses: read_parquet, with: {{paths: ["{src}"]}}}}
  - {{id: split, uses: split, needs: [src], with: {{dev_fraction: 0.05, test_fraction: 0.05}}}}
  - {{id: nemo, uses: nemo, needs: [split], with: {{by_split: false}}}}
"""


def child(code: str, *args: str) -> dict:
    p = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=ROOT)
    if p.returncode:
        sys.exit(p.stderr[-4000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs=2, default=[50_000, 200_000])
    ap.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-scale")
    args = ap.parse_args()
    import shutil

    res: dict[str, dict[int, dict]] = {}
    for n in args.rows:
        src = args.workdir / f"in-{n}"
        if not (src / "part-00000.parquet").exists():
            child(MAKE, str(src), str(n))
        res.setdefault("baseline (pyarrow + json loop)", {})[n] = child(
            BASELINE, str(src), str(args.workdir / f"base-{n}" / "manifest.json"))
        for label, wave in (("speechmill, exports in memory", 10**9),
                            ("speechmill, wave_rows=20000", 20_000)):
            run = args.workdir / f"run-{n}-{wave}"
            shutil.rmtree(run, ignore_errors=True)
            dag = args.workdir / f"dag-{n}-{wave}.yaml"
            dag.write_text(DAG.format(run=run, wave=wave, src=src))
            res.setdefault(label, {})[n] = child(RUN, str(dag))
    lo, hi = args.rows
    base = res["baseline (pyarrow + json loop)"]
    print(f"{'':34s} {'rows':>8s} {'wall s':>8s} {'x base':>7s} {'peak RSS MB':>12s}")
    for label, by_n in res.items():
        for n in (lo, hi):
            r = by_n[n]
            print(f"{label:34s} {n:8d} {r['wall']:8.1f} {r['wall'] / base[n]['wall']:7.2f} "
                  f"{r['rss_mb']:12.0f}")
        grow = (by_n[hi]["rss_mb"] - by_n[lo]["rss_mb"]) * 2**20 / (hi - lo)
        print(f"{label:34s} peak RSS growth: {grow:.0f} bytes per extra row")


if __name__ == "__main__":
    main()
