"""Benchmark: clips per minute and realtime factor of the ``tts`` stage (Piper + voice
matching, synthesis QC on / off) vs plain loops over the same backend and QC models.

Usage::

    python benchmarks/synth.py                       # 6 dialogues (12 clips), 2 workers
    python benchmarks/synth.py --dialogues 24 --workers 3 --batch-size 4
    python benchmarks/synth.py --qc on --contenders sequential speechmill-local

What it does
------------
1. **Inputs** (built once, outside every timing). A voice bank of ``--voices`` eSpeak NG
   speakers (``testkit/voice_bank_data.py``: segment rows over real eSpeak NG speech,
   the ``voice_bank`` sink run as the engine runs it), and ``--dialogues`` two-turn
   dialogues (a question and an answer, short everyday texts; turn rows of
   :mod:`speechmill.synth.text.turns`) written to ``turns.parquet``. User turns are spoken by
   Piper's joe matched to the dialogue's bank voice (``voice_match``), assistant turns by
   Piper's joe itself. The voice-match calibration (the preset speaking its sentence once
   per grid point) is made once into a cache directory every contender reads.
2. **Contenders**, each in its own Python process (no model, session or cache left warm
   by another contender), heavy libraries imported before its clock starts:

   * ``sequential``: one process, one turn after the other. Loads the same models the
     stage loads (``load_backend`` of the same ``TTSSpec``, ``SynthQC`` with the same
     ``QCConfig``: faster-whisper tiny.en, Resemblyzer, DNSMOS; the voice bank), deals
     the voices with the same ``VoiceBank.assign_all``, then per turn: synthesize,
     measure, retry a failing clip with the next seed up to ``max_attempts`` (stopping
     when the backend repeats itself, as the stage does), write the kept clip as FLAC.
   * ``pool``: the same per-turn work over a ``multiprocessing`` pool (spawn) of
     ``--workers`` processes, each loading its own models in its initializer, turns
     handed out one at a time (``imap_unordered``). Workers run with
     ``OMP_NUM_THREADS=1``, as Ray starts its actors.
   * ``speechmill-local``: the DAG ``read_parquet -> tts`` with the same config on the
     local executor (one worker, in process: the engine's cost over the sequential loop).
   * ``speechmill-ray``: the same DAG on embedded Ray with ``num_cpus = workers + 1`` (a
     model stage's actor pool leaves one CPU to the reads and commits, so the pool has
     ``--workers`` actors, each with its own models), ``--batch-size`` turns a batch.

   Every contender's time starts before its models load and includes writing the clips:
   loops from model load to the last clip (the load is also shown apart), speechmill
   "stage" is the ``tts`` stage's ``wall_seconds`` from ``metrics.json`` (reading its
   input, worker start, ``setup()``, the turns, commits); "whole run" adds DAG loading,
   the ``read_parquet`` stage and for Ray its start and stop.
3. **QC on / off** (``--qc``): ``qc: {}`` (the stage's defaults) vs ``qc: {enabled:
   false}`` (synthesize and write only: no ASR, no speaker or DNSMOS check, one attempt).

Reading the numbers
-------------------
* ``clips/min``: kept clips over the wall time, higher is better.
* ``RTF``: wall seconds per second of audio kept (below 1 = faster than realtime).
* ``TTS RTF``: the sequential loop's time inside ``synthesize()`` alone (Piper + WORLD
  voice matching) per second of audio it made: the backend's own speed.
* ``vs sequential`` / ``vs pool``: the contender's clips/min over the sequential loop's /
  the pool's at the same QC setting (above 1 = more clips per minute).
* With QC on a turn may take several attempts; every contender applies the same rule, so
  they make about the same clips (``clips`` column; Piper's noise can move a borderline
  clip across a threshold).

Nothing here asserts timings; it is a script to run by hand. Other processes on the
machine move the figures: note ``uptime`` with them.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

CONTENDERS = ("sequential", "pool", "speechmill-local", "speechmill-ray")
ESPEAK_VOICES = ["en-us+f3", "en-gb+m3", "en-us+klatt2", "en+iven", "en-us+grandma",
                 "en+Lee"]
PAIRS = [
    ("Could you tell me how long it takes to bake a loaf of bread?",
     "It usually takes about forty minutes in a hot oven."),
    ("What should I pack for a weekend in the mountains?",
     "Bring warm layers, good shoes and a rain jacket."),
    ("How do I keep basil fresh?", "Keep it in a glass of water on the counter."),
    ("Is it better to walk or take the bus to work?",
     "Walking is good exercise if the weather is kind and the distance is short."),
    ("What is a good way to learn new words in a language?",
     "Read a little every day and write down the words you do not know."),
    ("Why does my tea go cold so quickly?",
     "A thin cup loses heat fast, so try a thicker mug with a lid."),
    ("How often should I water a cactus?", "Once every two or three weeks is plenty."),
    ("Can you suggest a quick dinner for two people?",
     "Fry some vegetables with rice and two eggs, and dinner is ready in fifteen minutes."),
]


# --------------------------------------------------------------------------------------
# inputs and configs
# --------------------------------------------------------------------------------------


def turn_table(n: int) -> Any:
    import pyarrow as pa

    from speechmill.synth.text.turns import dialogue_id, turn_rows

    rows: list[dict[str, Any]] = []
    for i in range(n):
        q, a = PAIRS[i % len(PAIRS)]
        did = dialogue_id("bench-synth", str(i))
        rows += turn_rows(did, [{"role": "user", "text": q}, {"role": "assistant", "text": a}],
                          parent_id=did, language="en", source={"model": "bench-fixture"})
    return pa.Table.from_pylist(rows)


def build_inputs(a: argparse.Namespace) -> dict[str, Any]:
    """Voice bank, turns, warm voice-match cache: ``WORKDIR/inputs``."""
    import pyarrow.parquet as pq

    from testkit.voice_bank_data import export, make_segments

    root = a.workdir / "inputs"
    want = {"version": 1, "dialogues": a.dialogues, "voices": a.voices}
    saved = root / "inputs.json"
    if saved.exists():
        inputs = json.loads(saved.read_text())
        if inputs.get("want") == want and all(Path(inputs[k]).exists()
                                              for k in ("bank", "turns", "vm_cache")):
            return inputs
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    voices = {f"spk-{v.replace('+', '-')}": f"espeak:{v}" for v in ESPEAK_VOICES[:a.voices]}
    bank, _ = export(make_segments(root / "segments", voices, clips=1), root / "cleaning")
    turns = root / "turns.parquet"
    pq.write_table(turn_table(a.dialogues), turns)
    inputs = {"bank": str(bank / "voices.parquet"), "turns": str(turns),
              "vm_cache": str(root / "vm-cache"), "voices": len(voices),
              "dialogues": a.dialogues, "want": want}
    from speechmill.synth.tts import load_backend

    load_backend(stage_with(inputs, True, a)["backend"], offline=True)  # calibrates, caches
    saved.write_text(json.dumps(inputs))
    return inputs


def stage_with(inputs: dict[str, Any], qc: bool, a: argparse.Namespace) -> dict[str, Any]:
    """The ``tts`` stage's ``with:``; the loops build the same objects from it."""
    n = inputs["dialogues"]  # each voice may take its even share (rounded up)
    share = min(1.0, -(-n // inputs["voices"]) / n + 1e-6)
    return {"voice_bank": inputs["bank"], "max_share": share, "languages": ["en"],
            "backend": {"backend": "piper", "voice_match": {"cache_dir": inputs["vm_cache"]}},
            "max_attempts": a.max_attempts, "qc": {} if qc else {"enabled": False}}


# --------------------------------------------------------------------------------------
# the loops
# --------------------------------------------------------------------------------------

_MODELS: dict[str, Any] = {}


def load_models(with_: dict[str, Any]) -> dict[str, Any]:
    from speechmill.synth.qc.synth_qc import SynthQC
    from speechmill.synth.tts import load_backend
    from speechmill.synth.tts.stage import REFERENCE_TEXT, TTSStageConfig
    from speechmill.synth.voices.bank import load_voice_bank
    from speechmill.synth.voices.voice_match import embed

    cfg = TTSStageConfig(**with_)
    tts = load_backend(cfg.backend, offline=True)
    qc = SynthQC(cfg.qc, offline=True)
    qc.load()
    ref = None  # the assistant's preset reference, as the stage makes it (once per worker)
    if cfg.qc.enabled and cfg.qc.min_speaker_sim is not None:
        out = tts.synthesize(REFERENCE_TEXT, None, seed=0)
        ref = embed(out.audio, out.sample_rate)
    return {"cfg": cfg, "tts": tts, "qc": qc, "bank": load_voice_bank(cfg.voice_bank or ""),
            "ref": ref}


def voice_plan(with_: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, str]:
    from speechmill.synth.tts.stage import TTSStageConfig
    from speechmill.synth.voices.bank import load_voice_bank

    cfg = TTSStageConfig(**with_)
    bank = load_voice_bank(cfg.voice_bank or "")
    ds = {r["dialogue_id"]: {"dialogue_id": r["dialogue_id"], "language": r["language"]}
          for r in turns if r["role"] == "user"}
    return bank.assign_all(ds.values(), seed=cfg.seed, max_share=cfg.max_share,
                           match_language=cfg.match_language)


def speak(m: dict[str, Any], row: dict[str, Any], voice_id: str | None, out_dir: str
          ) -> dict[str, Any]:
    """One turn: synthesize, measure, retry as the stage does; write the kept clip."""
    import hashlib

    import numpy as np
    import soundfile as sf

    from speechmill.pipeline.records import stable_hash

    cfg, tts, qc, bank = m["cfg"], m["tts"], m["qc"], m["bank"]
    prompt = emb = None
    if row["role"] == "user" and voice_id is not None:
        prompt = bank.prompt(voice_id, tuple(tts.prompt_seconds))
        emb = bank.clip(voice_id, tuple(tts.prompt_seconds)).embedding
    base = stable_hash("tts", cfg.seed, row["id"]) % (2**31 - 1000)
    tried: list[tuple[Any, Any]] = []
    hashes: set[str] = set()
    t_syn = 0.0
    for attempt in range(cfg.max_attempts):
        t0 = time.perf_counter()
        syn = tts.synthesize(row["text"], prompt, seed=base + attempt, language=row["language"])
        t_syn += time.perf_counter() - t0
        ref = m["ref"] if syn.voice_source == "preset" else emb
        res = qc.measure(syn.audio, syn.sample_rate, row["text"], row["language"], ref,
                         syn.voice_source)
        tried.append((res, syn))
        h = hashlib.sha256(np.ascontiguousarray(syn.audio).tobytes()).hexdigest()
        if res.passed or h in hashes:
            break
        hashes.add(h)
    res, syn = min(tried, key=lambda t: t[0].rank_key())
    kept = res.passed
    if kept:
        d = Path(out_dir) / row["dialogue_id"]
        d.mkdir(parents=True, exist_ok=True)
        sf.write(d / f"{row['id']}.flac", np.clip(syn.audio, -1, 1), syn.sample_rate,
                 subtype="PCM_16")
    return {"kept": kept, "seconds": syn.audio.shape[0] / syn.sample_rate if kept else 0.0,
            "made_seconds": sum(s.audio.shape[0] / s.sample_rate for _, s in tried),
            "synth_s": t_syn, "attempts": len(tried)}


def _pool_init(with_: dict[str, Any]) -> None:
    _MODELS["m"] = load_models(with_)


def _pool_speak(job: tuple[dict[str, Any], str | None, str]) -> dict[str, Any]:
    return speak(_MODELS["m"], *job)


def run_loop(with_: dict[str, Any], turns_path: str, out_dir: Path, workers: int
             ) -> dict[str, Any]:
    import pyarrow.parquet as pq

    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    turns = pq.read_table(turns_path).to_pylist()
    t0 = time.perf_counter()
    plan = voice_plan(with_, turns)
    jobs = [(r, plan.get(r["dialogue_id"]), str(out_dir)) for r in turns]
    if workers <= 1:
        m = load_models(with_)
        load_s = time.perf_counter() - t0
        results = [speak(m, *j) for j in jobs]
    else:
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_pool_init, initargs=(with_,)) as pool:
            load_s = None
            results = list(pool.imap_unordered(_pool_speak, jobs))
    wall = time.perf_counter() - t0
    return {"wall": wall, "load_s": load_s, "clips": sum(r["kept"] for r in results),
            "audio_s": sum(r["seconds"] for r in results),
            "made_s": sum(r["made_seconds"] for r in results),
            "synth_s": sum(r["synth_s"] for r in results),
            "attempts": sum(r["attempts"] for r in results), "turns": len(results)}


# --------------------------------------------------------------------------------------
# speechmill
# --------------------------------------------------------------------------------------


def run_speechmill(with_: dict[str, Any], turns_path: str, run_dir: Path, executor: str,
                   workers: int, batch_size: int) -> dict[str, Any]:
    import yaml
    from rich.console import Console

    from speechmill.pipeline import dag as dagmod
    from speechmill.pipeline import runner
    from speechmill.pipeline.store import RunStore

    shutil.rmtree(run_dir, ignore_errors=True)
    ex: dict[str, Any] = {"type": executor, "progress": False}
    if executor == "ray":
        ex |= {"num_cpus": workers + 1, "stall_timeout_s": 1800}
    d = {"name": "bench-synth", "run_dir": str(run_dir), "executor": ex, "stages": [
        {"id": "turns", "uses": "read_parquet", "with": {"paths": [turns_path]}},
        {"id": "tts", "uses": "tts", "needs": ["turns"], "batch_size": batch_size,
         "with": with_}]}
    t0 = time.perf_counter()
    res = runner.run(dagmod.loads(yaml.safe_dump(d)), offline=True, progress=False,
                     console=Console(file=io.StringIO()))
    whole = time.perf_counter() - t0
    if res.status != "succeeded":
        raise SystemExit(f"speechmill run {res.status}: {res.error}")
    m = json.loads((run_dir / "stages/tts/metrics.json").read_text())
    out = RunStore(run_dir).read_outputs("tts", ["duration", "attempts"]).to_pylist()
    return {"wall": float(m["wall_seconds"]), "whole": whole, "clips": len(out),
            "audio_s": sum(r["duration"] for r in out),
            "attempts": sum(r["attempts"] for r in out), "turns": int(m["rows_in"])}


# --------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------


def one(a: argparse.Namespace) -> None:
    """Child process: one contender at one QC setting; JSON on the last stdout line."""
    import faster_whisper  # noqa: F401 - heavy imports before the clock starts
    import onnxruntime  # noqa: F401
    import piper  # noqa: F401
    import pyworld  # noqa: F401
    import resemblyzer  # noqa: F401
    import torch  # noqa: F401

    inputs = json.loads(a.inputs_json)
    with_ = stage_with(inputs, a.one_qc == "on", a)
    out = a.workdir / f"{a.one}-qc-{a.one_qc}"
    if a.one == "sequential":
        r = run_loop(with_, inputs["turns"], out, 1)
    elif a.one == "pool":
        r = run_loop(with_, inputs["turns"], out, a.workers)
    else:
        if a.one == "speechmill-ray":
            import ray  # noqa: F401
        executor = a.one.split("-")[1]
        r = run_speechmill(with_, inputs["turns"], out, executor, a.workers, a.batch_size)
    print(json.dumps(r))


def spawn(a: argparse.Namespace, inputs: dict[str, Any], who: str, qc: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_one", who, "--_qc", qc, "--_inputs",
           json.dumps(inputs), "--workdir", str(a.workdir), "--workers", str(a.workers),
           "--batch-size", str(a.batch_size), "--max-attempts", str(a.max_attempts)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("RAY_ADDRESS", None)
    for attempt in (1, 2):  # once more: an embedded Ray may time out starting on a busy box
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{who} (qc {qc}) failed (attempt {attempt}):\n{p.stderr[-2000:]}", flush=True)
    raise SystemExit(f"{who} (qc {qc}) failed twice")


def report(a: argparse.Namespace, res: dict[tuple[str, str], dict[str, Any]]) -> None:
    print(f"\n{a.dialogues} dialogues ({2 * a.dialogues} turns: user voice-matched Piper, "
          f"assistant Piper joe), {a.voices} bank voices, {a.workers} workers, batch "
          f"{a.batch_size}, max {a.max_attempts} attempts, {os.cpu_count()} CPUs")
    print(f"{'qc':4}{'contender':30}{'workers':>8}{'wall s':>9}{'clips':>7}{'clips/min':>11}"
          f"{'RTF':>7}{'attempts':>10}{'vs seq':>8}{'vs pool':>9}")
    for qc in a.qc:
        seq, pool = res.get(("sequential", qc)), res.get(("pool", qc))
        lines: list[tuple[str, int, dict[str, Any], float]] = []
        for who in a.contenders:
            r = res.get((who, qc))
            if r is None:
                continue
            w = 1 if who in ("sequential", "speechmill-local") else a.workers
            if who.startswith("speechmill"):
                lines.append((f"{who} (stage)", w, r, r["wall"]))
                lines.append((f"{who} (whole run)", w, r, r["whole"]))
            else:
                lines.append((who if who == "sequential" else f"pool ({a.workers} procs)", w,
                              r, r["wall"]))
        for name, w, r, t in lines:
            rate = r["clips"] / t * 60

            def vs(b: dict[str, Any] | None, rate: float = rate) -> str:
                return f"{rate / (b['clips'] / b['wall'] * 60):.2f}" if b and b["clips"] \
                    else "-"

            rtf = t / r["audio_s"] if r["audio_s"] else float("nan")
            print(f"{qc:4}{name:30}{w:8d}{t:9.1f}{r['clips']:7d}{rate:11.1f}{rtf:7.2f}"
                  f"{r['attempts']:10d}{vs(seq):>8}{vs(pool):>9}")
        if seq is not None:
            print(f"     sequential: model load {seq['load_s']:.1f} s; TTS RTF (synthesize() "
                  f"only, Piper + voice_match) {seq['synth_s'] / max(seq['made_s'], 1e-9):.3f}"
                  f" over {seq['made_s']:.1f} s of audio made")
    for who in a.contenders:
        on, off = res.get((who, "on")), res.get((who, "off"))
        if on and off and on["clips"] and off["clips"]:
            key = "wall"
            print(f"QC cost, {who}: clips/min with QC off / on = "
                  f"{(off['clips'] / off[key]) / (on['clips'] / on[key]):.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dialogues", type=int, default=6, help="two-turn dialogues")
    ap.add_argument("--voices", type=int, default=3, choices=range(1, len(ESPEAK_VOICES) + 1))
    ap.add_argument("--workers", type=int, default=2, help="pool processes / Ray actors")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-attempts", type=int, default=3)
    ap.add_argument("--qc", nargs="+", choices=["on", "off"], default=["on", "off"])
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "synth-bench")
    ap.add_argument("--_one", dest="one", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--_qc", dest="one_qc", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--_inputs", dest="inputs_json", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one(a)
        return
    a.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    inputs = build_inputs(a)
    print(f"inputs: {inputs['voices']}-voice bank, {2 * a.dialogues} turns, voice-match "
          f"calibration cached ({time.perf_counter() - t0:.0f} s, not timed; reused when "
          f"{a.workdir / 'inputs'} holds the same set)")
    res: dict[tuple[str, str], dict[str, Any]] = {}
    for qc in a.qc:
        for who in a.contenders:
            res[(who, qc)] = r = spawn(a, inputs, who, qc)
            print(f"qc {qc:3} {who:18} {r['wall']:7.1f} s, {r['clips']}/{r['turns']} clips, "
                  f"{r['audio_s']:.1f} s of audio", flush=True)
    report(a, res)


if __name__ == "__main__":
    main()
