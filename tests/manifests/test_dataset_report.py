"""The dataset report (``speechmill report`` and the ``report`` sink) over a real run:
ingest -> standardize -> report on real good and bad audio, plus a segment-level stage
written from :func:`testkit.segments.make_segments` (speaker, language,
DNSMOS, speaking rate, split). Every number is checked against pyarrow."""

from __future__ import annotations

import base64
import glob
import io
import json
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.manifests.dataset_report import build_report, source_of
from speechmill.manifests.report import Report, ReportConfig
from speechmill.pipeline import dag as dagmod
from speechmill.pipeline import registry
from speechmill.pipeline.cli import main
from speechmill.pipeline.records import conform, rejects_table
from speechmill.pipeline.runner import run
from speechmill.pipeline.stage import StageContext
from testkit.segments import make_segments
from tests.conftest import dag_yaml

SEG = "segments"  # the synthetic segment-level stage (not in dag.yaml: it comes last)
SPLITS = ["train", "train", "dev", "test"]


def _source_url(i: int) -> tuple[str, str]:
    """(source_url, the source the report must derive from it) for segment row i."""
    if i % 3 == 0:
        return f"https://Media.Example.org:8443/show/{i}.mp3", "media.example.org"
    if i % 3 == 1:
        return f"/data/podcasts/show{i % 2}/ep{i}.wav", f"/data/podcasts/show{i % 2}"
    return f"s3://bucket-x/raw/{i}.flac", "s3://bucket-x"


def _write_segments_stage(run_dir: Path, work: Path) -> dict[str, Any]:
    """RUN_DIR/stages/segments: two part files (+ a zero-row one) of make_segments() rows
    with a split column, two languages, a null speaker, language and DNSMOS; rejects."""
    table = make_segments(work / "segs", n_recordings=4, per_recording=3)
    rows = table.to_pylist()
    expect_source = []
    for i, r in enumerate(rows):
        r["split"] = SPLITS[i % len(SPLITS)]
        r["language"] = "en" if i < 6 else "de"
        r["source_url"], src = _source_url(i)
        expect_source.append(src)
    rows[4]["speaker"] = None
    rows[7]["language"] = None
    rows[9]["scores"] = {**rows[9]["scores"], "dnsmos_ovrl": None}
    t = conform(pa.Table.from_pylist(rows))
    d = run_dir / "stages" / SEG
    (d / "rejects").mkdir(parents=True)
    pq.write_table(t.slice(0, 7), d / "part-00000.parquet")
    pq.write_table(t.slice(7), d / "part-00001.parquet")
    pq.write_table(t.slice(0, 0), d / "part-00002.parquet")  # zero rows: harmless
    rej = rejects_table([
        {"id": "r1", "stage": SEG, "reason": "too_short", "detail": "", "duration": 0.4},
        {"id": "r2", "stage": SEG, "reason": "too_short", "detail": "", "duration": 0.7},
        {"id": "r3", "stage": SEG, "reason": "overlap", "detail": "", "duration": None},
    ])
    pq.write_table(rej, d / "rejects" / "part-00000.parquet")
    (d / "_SUCCESS").write_bytes(b"")
    return {"rows": t.to_pylist(), "sources": expect_source}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory,
             media_dir: tuple[Path, dict, dict]) -> dict[str, Any]:
    """A real run ending with the report sink, then a segment-level stage added."""
    work = tmp_path_factory.mktemp("report")
    run_dir = work / "run"
    had = registry._extra.get("report")
    registry.register(Report)  # until pyproject.toml's entry point is installed
    try:
        extra = ("  - id: report\n    uses: report\n    needs: [standardize]\n"
                 "    with: {bins: 12, top_n: 5}\n")
        res = run(dagmod.loads(dag_yaml(media_dir[0], run_dir) + extra), progress=False)
    finally:
        if had is None:
            registry._extra.pop("report", None)
        else:
            registry._extra["report"] = had
    assert res.status == "succeeded"
    sink = json.loads((run_dir / "report/report/report.json").read_text())
    seg = _write_segments_stage(run_dir, work)
    return {"run_dir": run_dir, "work": work, "sink": sink, **seg}


def _reads(pattern: str, columns: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in sorted(glob.glob(pattern)):
        out += pq.read_table(p, columns=columns).to_pylist()
    return out


def _expected_rejects(run_dir: Path, skip: tuple[str, ...] = ()
                      ) -> dict[tuple[str, str], tuple[int, float]]:
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for r in _reads(str(run_dir / "stages/*/rejects/part-*.parquet"),
                    ["stage", "reason", "duration"]):
        if r["stage"] in skip:
            continue
        a = acc[(r["stage"], r["reason"])]
        a[0] += 1
        a[1] += r["duration"] or 0.0
    return {k: (int(v[0]), v[1]) for k, v in acc.items()}


def _check_rejects(rep: dict[str, Any], run_dir: Path, skip: tuple[str, ...] = ()) -> None:
    expected = _expected_rejects(run_dir, skip)
    got = {(sid, reason): (a["rows"], a["seconds"])
           for sid, st in rep["rejects"]["by_stage"].items()
           for reason, a in st["by_reason"].items()}
    assert set(got) == set(expected)
    for k, (n, secs) in expected.items():
        assert got[k][0] == n, k
        assert got[k][1] == pytest.approx(secs, abs=1e-3), k
        a = rep["rejects"]["by_stage"][k[0]]["by_reason"][k[1]]
        assert a["hours"] == pytest.approx(secs / 3600, abs=1e-6)
    assert rep["rejects"]["rows"] == sum(n for n, _ in expected.values())
    assert rep["rejects"]["hours"] == pytest.approx(
        sum(s for _, s in expected.values()) / 3600, abs=1e-6)


def _group(rows: list[dict[str, Any]], key: Any) -> dict[str, tuple[int, float]]:
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for i, r in enumerate(rows):
        k = key(i, r)
        acc["(unknown)" if k is None else k][0] += 1
        acc["(unknown)" if k is None else k][1] += r["duration"]
    return {k: (int(v[0]), v[1]) for k, v in acc.items()}


def _check_group(got: dict[str, Any], expected: dict[str, tuple[int, float]]) -> None:
    assert set(got) == set(expected)
    for k, (n, secs) in expected.items():
        assert got[k]["rows"] == n, k
        assert got[k]["seconds"] == pytest.approx(secs, abs=1e-3), k
        assert got[k]["hours"] == pytest.approx(secs / 3600, abs=1e-6), k


def test_report_sink_ends_a_real_dag(real_run: dict[str, Any]) -> None:
    run_dir, rep = real_run["run_dir"], real_run["sink"]
    out = run_dir / "report" / "report"
    assert {"index.html", "report.json", "duration_s.png", "rejects.png"} <= {
        p.name for p in out.iterdir()}
    assert not list((run_dir / "report").glob(".*partial*"))
    # the dataset is the last stage with rows before the sink: standardize
    assert rep["dataset"]["stage"] == "standardize"
    std = _reads(str(run_dir / "stages/standardize/part-*.parquet"), ["duration"])
    assert rep["totals"]["rows"] == len(std) > 0
    assert rep["totals"]["seconds"] == pytest.approx(sum(r["duration"] for r in std), abs=1e-3)
    assert sum(rep["histograms"]["duration_s"]["counts"]) == len(std)
    assert len(rep["histograms"]["duration_s"]["edges"]) == 12 + 1
    # files have no speaker/language yet: all of it is "(unknown)"
    assert set(rep["hours_by"]["speaker"]) == {"(unknown)"} and rep["totals"]["speakers"] == 0
    assert rep["hours_by"]["split"] is None and rep["histograms"]["dnsmos_ovrl"] is None
    _check_rejects(rep, run_dir, skip=(SEG,))  # the sink ran before SEG was added
    assert {"not_audio", "empty_file"} <= set(rep["rejects"]["by_stage"]["ingest"]["by_reason"])
    # the report stage itself is running while it writes: the run is still complete
    assert rep["run"]["complete"] and rep["notes"] == []
    states = {s["stage"]: s["state"] for s in rep["stages"]}
    assert states == {"ingest": "done", "standardize": "done",
                      "report": "running (this report)"}
    m = json.loads((run_dir / "stages/report/metrics.json").read_text())
    assert m["rows_out"] == len(std) and m["stage_summary"]["dataset_stage"] == "standardize"
    assert m["output_dir"] == str(out)


def test_numbers_match_pyarrow(real_run: dict[str, Any], tmp_path: Path) -> None:
    run_dir = real_run["run_dir"]
    rep = build_report(run_dir, tmp_path / "rep", top_n=2, bins=7)
    assert rep["dataset"]["stage"] == SEG and rep["dataset"]["parts"] == 3
    # independent: the part files as written, read back with pyarrow
    rows = _reads(str(run_dir / f"stages/{SEG}/part-*.parquet"),
                  ["duration", "speaker", "language", "split", "source_url", "scores"])
    assert len(rows) == len(real_run["rows"]) == 12
    tot = rep["totals"]
    assert tot["rows"] == 12 and tot["rows_without_duration"] == 0
    assert tot["seconds"] == pytest.approx(sum(r["duration"] for r in rows), abs=1e-3)
    _check_group(rep["hours_by"]["speaker"], _group(rows, lambda i, r: r["speaker"]))
    _check_group(rep["hours_by"]["language"], _group(rows, lambda i, r: r["language"]))
    _check_group(rep["hours_by"]["split"], _group(rows, lambda i, r: r["split"]))
    srcs = real_run["sources"]
    _check_group(rep["hours_by"]["source"], _group(rows, lambda i, r: srcs[i]))
    assert set(rep["hours_by"]["language"]) == {"en", "de", "(unknown)"}
    assert tot["languages"] == 2 and tot["splits"] == 3 and tot["sources"] == 4
    # top speakers: by hours, top_n of them
    by_spk = _group(rows, lambda i, r: r["speaker"])
    ranked = sorted(by_spk, key=lambda k: (-by_spk[k][1], k))[:2]
    assert [s["speaker"] for s in rep["top_speakers"]] == ranked
    assert rep["top_speakers"][0]["share"] == pytest.approx(by_spk[ranked[0]][1] /
                                                            sum(r["duration"] for r in rows),
                                                            abs=1e-5)
    # histograms: 7 bins; counts sum to the rows that have a value
    h = rep["histograms"]
    assert len(h["duration_s"]["edges"]) == 8 and len(h["duration_s"]["counts"]) == 7
    assert sum(h["duration_s"]["counts"]) == 12
    dns = [r["scores"]["dnsmos_ovrl"] for r in rows if r["scores"]["dnsmos_ovrl"] is not None]
    assert sum(h["dnsmos_ovrl"]["counts"]) == h["dnsmos_ovrl"]["count"] == len(dns) == 11
    assert h["dnsmos_ovrl"]["missing"] == 1
    assert h["dnsmos_ovrl"]["min"] == pytest.approx(min(dns))
    assert h["dnsmos_ovrl"]["max"] == pytest.approx(max(dns))
    assert h["dnsmos_ovrl"]["edges"][0] <= 1.0 and h["dnsmos_ovrl"]["edges"][-1] >= 5.0
    cps = [r["scores"]["chars_per_s"] for r in rows]
    assert sum(h["chars_per_s"]["counts"]) == len(cps)
    assert h["chars_per_s"]["mean"] == pytest.approx(sum(cps) / len(cps))
    assert h["words_per_s"] is None  # make_segments has no words_per_s score
    _check_rejects(rep, run_dir)
    assert rep["rejects"]["by_stage"][SEG]["by_reason"]["overlap"]["rows_without_duration"] == 1
    # report.json on disk is the same dict, with sorted keys
    text = (tmp_path / "rep" / "report.json").read_text()
    assert json.loads(text) == rep
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"


def test_html_is_self_contained_with_valid_pngs(real_run: dict[str, Any],
                                                tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "rep"
    rep = build_report(real_run["run_dir"], out)
    assert set(rep["plots"]) == {"duration_s", "dnsmos_ovrl", "speaking_rate",
                                 "hours_by_language", "hours_by_source", "hours_by_split",
                                 "top_speakers", "rejects"}
    page = (out / "index.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "<link" not in page and "url(" not in page and "@import" not in page
    refs = re.findall(r"""(?:src|href)\s*=\s*["']?([^"'\s>]+)""", page)
    assert refs and all(r.startswith("data:") for r in refs)
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    files = {name: (out / f).read_bytes() for name, f in rep["plots"].items()}
    assert sorted(base64.b64decode(e) for e in embedded) == sorted(files.values())
    for data in files.values():
        img = Image.open(io.BytesIO(data))
        img.verify()
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
    # readable tables: numbers, the dataset stage, each reject reason
    for text in ("Hours by language", "Top speakers", "too_short", "not_audio", SEG,
                 "media.example.org", "s3://bucket-x"):
        assert text in page


def test_deterministic_and_schedulers_agree(real_run: dict[str, Any], tmp_path: Path) -> None:
    a = build_report(real_run["run_dir"], tmp_path / "a", scheduler="threads")
    b = build_report(real_run["run_dir"], tmp_path / "b", scheduler="local")
    assert {**a, "config": None} == {**b, "config": None}
    c = build_report(real_run["run_dir"], tmp_path / "c", scheduler="threads")
    for name in ["report.json", "index.html", *a["plots"].values()]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "c" / name).read_bytes()
    assert c == a


@pytest.mark.ray
def test_dask_on_ray(real_run: dict[str, Any], tmp_path: Path) -> None:
    import ray

    before = ray.is_initialized()
    a = build_report(real_run["run_dir"], tmp_path / "a", scheduler="threads")
    r = build_report(real_run["run_dir"], tmp_path / "r", scheduler="ray")
    assert ray.is_initialized() == before  # an embedded Ray it started is shut down
    assert r["config"]["scheduler"] == "ray"
    assert {**a, "config": None} == {**r, "config": None}


@pytest.mark.ray
def test_report_sink_on_the_runs_ray(media_dir: tuple[Path, dict, dict],
                                     tmp_path: Path) -> None:
    """A Ray-executor DAG whose report stage uses Dask-on-Ray on the run's own Ray."""
    run_dir = tmp_path / "run"
    had = registry._extra.get("report")
    registry.register(Report)
    try:
        extra = ("  - id: report\n    uses: report\n    needs: [standardize]\n"
                 "    with: {scheduler: ray}\n")
        res = run(dagmod.loads(dag_yaml(media_dir[0], run_dir, executor="ray") + extra),
                  progress=False)
    finally:
        if had is None:
            registry._extra.pop("report", None)
        else:
            registry._extra["report"] = had
    assert res.status == "succeeded"
    rep = json.loads((run_dir / "report/report/report.json").read_text())
    assert rep["config"]["scheduler"] == "ray" and rep["dataset"]["stage"] == "standardize"
    local = build_report(run_dir, tmp_path / "local", scheduler="local")
    for key in ("totals", "hours_by", "histograms", "rejects", "top_speakers", "dataset"):
        assert rep[key] == local[key], key
    _check_rejects(rep, run_dir)


def test_stage_override_and_source_of(real_run: dict[str, Any], tmp_path: Path) -> None:
    rep = build_report(real_run["run_dir"], tmp_path / "r", stage="ingest")
    ing = _reads(str(real_run["run_dir"] / "stages/ingest/part-*.parquet"),
                 ["duration", "source_url"])
    assert rep["dataset"]["stage"] == "ingest" and rep["totals"]["rows"] == len(ing)
    # local files: the source is their folder
    assert set(rep["hours_by"]["source"]) == {str(Path(r["source_url"]).parent) for r in ing}
    assert source_of("https://feeds.Example.com/a/b.mp3?x=1") == "feeds.example.com"
    assert source_of("sftp://user:s3cret@host.example/x.wav") == "sftp://host.example"
    assert source_of("file:///data/x%20y/a.wav") == "/data/x y"
    assert source_of("gs://bkt/a/b.opus") == "gs://bkt"
    assert source_of("rel/dir/a.wav") == "rel/dir"
    assert source_of(None) == source_of("") == "(unknown)"


def test_report_stage_export_directly(real_run: dict[str, Any], tmp_path: Path) -> None:
    ctx = StageContext(stage_id="report", run_dir=str(real_run["run_dir"]))
    stage = Report(ReportConfig(stage=SEG, bins=5), ctx)
    res = stage.export(pa.table({"id": pa.array([], pa.string())}), tmp_path)
    rep = json.loads((tmp_path / "report.json").read_text())
    assert res.rows_out == rep["totals"]["rows"] == 12
    assert res.seconds_out == pytest.approx(rep["totals"]["seconds"])
    assert res.summary["dataset_stage"] == SEG and (tmp_path / "index.html").exists()
    assert Report.summary_lines(res.summary)
    with pytest.raises(ValueError):
        ReportConfig(scheduler="dask-cloud")  # type: ignore[arg-type]


def test_partial_failed_and_empty_runs(tmp_path: Path) -> None:
    # failed run: stage a finished, b committed one part (no language/speaker/scores), c
    # never started; no rejects anywhere
    rd = tmp_path / "failed"
    (rd / "stages/a").mkdir(parents=True)
    (rd / "stages/b").mkdir()
    (rd / "run.json").write_text(json.dumps({"name": "f", "status": "failed"}))
    (rd / "dag.yaml").write_text(
        "name: f\nrun_dir: x\nstages:\n  - {id: c, uses: u, needs: [b]}\n"
        "  - {id: a, uses: u}\n  - {id: b, uses: u, needs: a}\n")
    pq.write_table(pa.table({"id": ["1", "2"], "duration": [1.0, 2.0]}),
                   rd / "stages/a/part-0.parquet")
    (rd / "stages/a/_SUCCESS").write_bytes(b"")
    pq.write_table(pa.table({"id": ["1"], "duration": [1.5],
                             "source_url": ["https://h.org/x.mp3"]}),
                   rd / "stages/b/part-0.parquet")
    rep = build_report(rd, tmp_path / "out1")
    assert [s["stage"] for s in rep["stages"]] == ["a", "b", "c"]
    assert [s["state"] for s in rep["stages"]] == ["done", "partial", "pending"]
    assert rep["dataset"]["stage"] == "b" and rep["totals"]["rows"] == 1
    assert not rep["run"]["complete"]
    notes = " ".join(rep["notes"])
    assert "'failed'" in notes and "b, c" in notes and "has not finished" in notes
    assert rep["hours_by"]["language"] is None and rep["hours_by"]["source"] == {
        "h.org": {"rows": 1, "seconds": 1.5, "hours": round(1.5 / 3600, 6)}}
    assert rep["histograms"]["dnsmos_ovrl"] is None and rep["rejects"]["rows"] == 0
    page = (tmp_path / "out1/index.html").read_text()
    assert "no data" in page and "failed" in page

    # a run that has just started: nothing committed
    rd2 = tmp_path / "empty"
    (rd2 / "stages").mkdir(parents=True)
    (rd2 / "run.json").write_text(json.dumps({"name": "e", "status": "running"}))
    rep = build_report(rd2, tmp_path / "out2")
    assert rep["dataset"]["stage"] is None and rep["totals"]["rows"] == 0
    assert rep["plots"] == {} and rep["top_speakers"] == []
    assert all(v is None for v in rep["histograms"].values())
    assert "no data" in (tmp_path / "out2/index.html").read_text()

    # a finished stage that kept nothing: its (empty) outputs are the dataset
    shutil.rmtree(rd / "stages/b")
    (rd / "stages/b").mkdir()
    (rd / "stages/b/_SUCCESS").write_bytes(b"")
    rep = build_report(rd, tmp_path / "out3")
    assert rep["dataset"]["stage"] == "b" and rep["totals"]["rows"] == 0


def test_cli(real_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_dir = real_run["run_dir"]
    assert main(["report", str(run_dir), "--out", str(tmp_path / "o"), "--top-n", "3"]) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "o" / "index.html").resolve()) in out.replace("\n", "")
    assert f"stage {SEG}" in out and "too_short" in out
    assert json.loads((tmp_path / "o/report.json").read_text())["config"]["top_n"] == 3
    # default: RUN_DIR/report/cli, replaced atomically
    assert main(["report", str(run_dir), "--stage", "standardize"]) == 0
    rep = json.loads((run_dir / "report/cli/report.json").read_text())
    assert rep["dataset"]["stage"] == "standardize"
    assert not list((run_dir / "report").glob(".cli*"))
    capsys.readouterr()
    assert main(["report", str(run_dir), "--stage", "nope"]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2  # exists but is not a run directory
    # the installed command: a missing run directory is a clear error, exit code 2
    r = subprocess.run([sys.executable, "-m", "speechmill.pipeline.cli", "report",
                        str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and "no run directory" in r.stderr


def test_many_speakers_are_bounded_in_json(tmp_path: Path) -> None:
    """A crawl with more speakers than report.json should list: the 1000 largest plus
    `(other)` in JSON, every speaker in hours_by_speaker.parquet, totals exact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from speechmill.manifests import dataset_report as dr

    run_dir = tmp_path / "run"
    d = run_dir / "stages" / "segments"
    d.mkdir(parents=True)
    n = 1500
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(n)],
                             "duration": [1.0 + i % 7 for i in range(n)],
                             "speaker": [f"spk{i:05d}" for i in range(n)]}),
                   d / "part-0.parquet")
    (d / "_SUCCESS").write_text("")
    rep = dr.build_report(run_dir, tmp_path / "out", scheduler="local")
    assert rep["totals"]["speakers"] == n
    on_disk = json.loads((tmp_path / "out/report.json").read_text())
    spk = on_disk["hours_by"]["speaker"]
    assert len(spk) == dr.JSON_GROUP_LIMIT + 1 and "(other)" in spk
    assert sum(a["rows"] for a in spk.values()) == n
    full = pq.read_table(tmp_path / "out" / on_disk["hours_by_files"]["speaker"])
    assert full.num_rows == n
    assert abs(sum(full.column("seconds").to_pylist()) - sum(1.0 + i % 7 for i in range(n))) < 1e-6
