"""``sft_import``: every format (and its malformed rows), JSON/JSONL/Parquet, globs,
directories and fsspec URLs, ids, provenance, ``max_rows``/``max_turns``, dedup, QC."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from speechmill.pipeline.records import recording_id
from speechmill.pipeline.stage import StageContext
from speechmill.synth.qc.text_qc import TextQCConfig
from speechmill.synth.text.sft_import import SftImport, SftImportConfig


def _run(tmp_path: Path, offline: bool = False, **cfg: Any
         ) -> tuple[pa.Table, list[dict], list[dict]]:
    stage = SftImport(SftImportConfig(**cfg), StageContext("imp", str(tmp_path), offline))
    plan = stage.plan()
    stage.setup()
    try:
        res = stage.process(plan)
    finally:
        stage.teardown()
    return plan, res.outputs.to_pylist(), res.rejects.to_pylist()


def _dialogues(rows: list[dict]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for r in sorted(rows, key=lambda r: r["id"]):
        out.setdefault(r["dialogue_id"], []).append((r["role"], r["text"]))
    return out


def _jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in rows))
    return path


SHAREGPT = [
    {"id": "a", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello! How can I help?"},
        {"from": "human", "value": "Tell me a joke"}, {"from": "gpt", "value": "Why did the "
                                                       "chicken cross the road?"}]},
    {"id": "b", "conversations": [{"from": "human", "value": "Hi"},
                                  {"from": "tool", "value": "{}"}]},                  # bad_roles
    {"id": "c", "conversations": [{"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "  "}]},                  # empty_turn
    {"id": "d", "conversation": []},                                                # malformed
    {"id": "e", "conversations": [{"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hey"},
                                  {"from": "system", "value": "late"}]},             # bad_roles
    {"id": "f", "conversations": [{"from": "human"}]},                              # malformed
]


def test_sharegpt(tmp_path: Path) -> None:
    f = tmp_path / "sg.json"
    f.write_text(json.dumps(SHAREGPT))
    plan, out, rej = _run(tmp_path, paths=[str(f)])
    assert plan.num_rows == 6
    dlg = _dialogues(out)
    assert list(dlg.values()) == [[
        ("user", "Hi there"), ("assistant", "Hello! How can I help?"),
        ("user", "Tell me a joke"), ("assistant", "Why did the chicken cross the road?")]]
    assert {r["system"] for r in out} == {"Be brief."}
    assert [r["round"] for r in sorted(out, key=lambda r: r["id"])] == [0, 1, 2, 3]
    assert {r["n_rounds"] for r in out} == {4}
    src = json.loads(out[0]["source"])
    assert src == {"stage": "sft_import", "dataset": str(f), "row": 0, "format": "sharegpt",
                   "row_id": "a"}
    reasons = {int(r["detail"].split(" row ")[1].split(":")[0]): r["reason"] for r in rej}
    assert reasons == {1: "bad_roles", 2: "empty_turn", 3: "malformed", 4: "bad_roles",
                       5: "malformed"}
    # every planned row ends as outputs or exactly one reject
    assert len({r["parent_id"] for r in out}) + len(rej) == plan.num_rows


def test_openai_jsonl_with_malformed_lines(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "oa.jsonl", [
        {"messages": [{"role": "user", "content": "What is 2+2?"},
                      {"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                        {"type": "text", "text": "four."}]}]},
        "{not json",                                                                  # malformed
        {"messages": [{"role": "user", "content": "Book it"},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "1"}]}]},                                # bad_roles
        {"messages": [{"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Unanswered"}]},    # trailing turn dropped
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]},
                      {"role": "assistant", "content": "Nice"}]},                     # malformed
        {"messages": [{"role": "assistant", "content": "I start"},
                      {"role": "user", "content": "Odd"}]},                     # qc_alternation
        {"messages": "nope"},                                                         # malformed
    ])
    plan, out, rej = _run(tmp_path, paths=[str(f)])
    assert plan.num_rows == 7
    assert sorted(_dialogues(out).values()) == [
        [("user", "Hi"), ("assistant", "Hello")],
        [("user", "What is 2+2?"), ("assistant", "It is \nfour.")]]
    got = sorted((int(r["detail"].split(" row ")[1].split(":")[0]) if " row " in r["detail"]
                  else -1, r["reason"]) for r in rej)
    assert [g[1] for g in got if g[0] >= 0] == ["malformed", "bad_roles", "malformed",
                                                 "malformed"]
    assert sorted(r["reason"] for r in rej) == sorted(
        ["malformed", "bad_roles", "malformed", "qc_alternation", "malformed"])
    bad_json = next(r for r in rej if "invalid JSON" in r["detail"])
    assert "line 2" in bad_json["detail"]


def test_alpaca(tmp_path: Path) -> None:
    f = tmp_path / "alpaca.json"
    f.write_text(json.dumps([
        {"instruction": "Summarize.", "input": "Cats sleep a lot.", "output": "Cats nap."},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "No answer here.", "input": ""},                              # malformed
        {"instruction": "Empty answer.", "input": "", "output": ""},                 # empty_turn
        {"instruction": "Wrong type.", "input": "", "output": 42},                    # malformed
    ]))
    _, out, rej = _run(tmp_path, paths=[str(f)])
    assert sorted(_dialogues(out).values()) == [
        [("user", "Say hi."), ("assistant", "Hi!")],
        [("user", "Summarize.\n\nCats sleep a lot."), ("assistant", "Cats nap.")]]
    assert sorted(r["reason"] for r in rej) == ["empty_turn", "malformed", "malformed"]


def test_ultrachat_and_max_turns(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "uc.jsonl", [
        {"id": "u1", "data": ["q1", "a1", "q2", "a2", "q3", "a3"]},
        {"id": "u2", "data": ["q", 7]},                                               # malformed
        {"id": "u3", "data": []},                                                     # no_turns
    ])
    _, out, rej = _run(tmp_path, paths=[str(f)], max_turns=5, qc=None)
    # cut to whole rounds: 5 turns allowed -> 2 rounds
    assert list(_dialogues(out).values()) == [[("user", "q1"), ("assistant", "a1"),
                                               ("user", "q2"), ("assistant", "a2")]]
    assert json.loads(out[0]["source"])["row_id"] == "u1"
    assert sorted(r["reason"] for r in rej) == ["malformed", "no_turns"]


def test_format_override_and_unknown_format(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "x.jsonl", [{"foo": 1}, {"bar": 2}])
    _, out, rej = _run(tmp_path, paths=[str(f)])
    assert out == [] and [r["reason"] for r in rej] == ["unknown_format"] * 2
    # a file detected as one format: rows of another shape are malformed, unless overridden
    g = _jsonl(tmp_path / "mixed.jsonl", [{"data": ["Is it?", "Yes."]},
                                          {"instruction": "Hi", "output": "Hello"}])
    _, out, rej = _run(tmp_path, paths=[str(g)])
    assert len(_dialogues(out)) == 1 and [r["reason"] for r in rej] == ["malformed"]
    _, out, rej = _run(tmp_path, paths=[str(g)], format="alpaca")
    assert list(_dialogues(out).values()) == [[("user", "Hi"), ("assistant", "Hello")]]


def test_unreadable_file_is_one_reject(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('[{"data": ["Is it?", "Yes."]}, {"data": ')
    good = _jsonl(tmp_path / "ok.jsonl", [{"data": ["Is it?", "Yes."]}])
    plan, out, rej = _run(tmp_path, paths=[str(bad), str(good)])
    assert plan.num_rows == 2 and len(out) == 2
    assert [r["reason"] for r in rej] == ["unreadable"]
    assert str(bad) in rej[0]["detail"] and rej[0]["source_url"] == str(bad)


def test_parquet_glob_directory_and_gzip(tmp_path: Path) -> None:
    d = tmp_path / "data"
    (d / "sub").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([
        {"messages": [{"role": "user", "content": f"Question {i}?"},
                      {"role": "assistant", "content": f"Answer {i}."}]} for i in range(5)]),
        d / "part-0.parquet", row_group_size=2)
    with gzip.open(d / "sub" / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"data": ["Is it zipped?", "It is."]}) + "\n")
    (d / "notes.txt").write_text("not a data file")
    for spec in (str(d), str(d / "**" / "*"), f"file://{d}"):
        plan, out, rej = _run(tmp_path, paths=[spec])
        assert rej == [], spec
        dlg = _dialogues(out)
        assert len(dlg) == 6, spec
        assert [("user", "Is it zipped?"), ("assistant", "It is.")] in dlg.values()
        assert [("user", "Question 3?"), ("assistant", "Answer 3.")] in dlg.values()
    with pytest.raises(ValueError, match="key 'paths'.*matches no"):
        _run(tmp_path, paths=[str(d / "*.csv")])


def test_fsspec_memory_url(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/sft_test/a.json", json.dumps([{"data": ["Hello from memory", "Hi!"]}]).encode())
    fs.pipe("/sft_test/b.jsonl", (json.dumps(
        {"conversations": [{"from": "human", "value": "Second file"},
                           {"from": "gpt", "value": "Yes."}]}) + "\n").encode())
    try:
        _, out, rej = _run(tmp_path, paths=["memory://sft_test/*"])
        assert rej == []
        assert sorted(_dialogues(out).values()) == [
            [("user", "Hello from memory"), ("assistant", "Hi!")],
            [("user", "Second file"), ("assistant", "Yes.")]]
        names = sorted({json.loads(r["source"])["dataset"] for r in out})
        assert [n.startswith("memory://") for n in names] == [True, True]
        assert [n.rsplit("/", 2)[1:] for n in names] == [["sft_test", "a.json"],
                                                          ["sft_test", "b.jsonl"]]
    finally:
        fs.rm("/sft_test", recursive=True)


def test_ids_deterministic_dedup_max_rows(tmp_path: Path) -> None:
    rows = [{"data": [f"q{i % 3}", f"a{i % 3}"]} for i in range(6)]  # 3 distinct, 3 copies
    f = _jsonl(tmp_path / "d.jsonl", rows)
    plan1, out1, rej1 = _run(tmp_path, paths=[str(f)])
    plan2, out2, _ = _run(tmp_path, paths=[str(f)])
    assert plan1.column("id").to_pylist() == plan2.column("id").to_pylist()
    assert sorted(r["id"] for r in out1) == sorted(r["id"] for r in out2)
    assert len(_dialogues(out1)) == 3
    assert [r["reason"] for r in rej1] == ["duplicate"] * 3
    first = {r["id"]: r for r in plan1.to_pylist()}
    for r in rej1:  # each copy names the kept dialogue it repeats
        kept = r["detail"].rsplit(" ", 1)[1]
        assert kept in first and first[kept]["_row"] < first[r["id"]]["_row"]
    # turn ids group a dialogue as one recording; the planned id is the dialogue id
    for r in out1:
        assert recording_id(r["id"]) == r["dialogue_id"] == r["parent_id"]
        assert "-" not in r["dialogue_id"]
    _, out, rej = _run(tmp_path, paths=[str(f)], dedup=False)
    assert len(_dialogues(out)) == 6 and rej == []
    plan, out, rej = _run(tmp_path, paths=[str(f), str(f)], max_rows=4)
    assert plan.num_rows == 4 and len(_dialogues(out)) + len(rej) == 4


def test_content_qc_rejects_and_masks(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "qc.jsonl", [
        {"data": ["Write a poem.", "As an AI language model, I can't write poems."]},
        {"data": ["My mail is ann@example.com, ok?", "Noted."]},
        {"data": ["Loop?", "go go go go go go go go"]},
    ])
    _, out, rej = _run(tmp_path, paths=[str(f)])
    assert sorted(r["reason"] for r in rej) == ["qc_refusal", "qc_repetition"]
    assert list(_dialogues(out).values()) == [[("user", "My mail is an email address, ok?"),
                                               ("assistant", "Noted.")]]
    _, out, rej = _run(tmp_path, paths=[str(f)], qc=TextQCConfig(pii="reject"))
    assert out == [] and sorted(r["reason"] for r in rej) == [
        "qc_pii", "qc_refusal", "qc_repetition"]


def test_language_column(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "l.jsonl", [
        {"data": ["Hello", "Hi"]},
        {"language": "de", "messages": [{"role": "user", "content": "Hallo"},
                                        {"role": "assistant", "content": "Hi"}]},
    ])
    _, out, _ = _run(tmp_path, paths=[str(f)], language="en", format="ultrachat")
    assert {r["language"] for r in out} == {"en"}
    g = _jsonl(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {"language": "de", "messages": [{"role": "user", "content": "Hallo"},
                                        {"role": "assistant", "content": "Hi"}]},
    ])
    _, out, _ = _run(tmp_path, paths=[str(g)], language="en")
    assert sorted({(r["text"], r["language"]) for r in out if r["role"] == "user"}) == [
        ("Hallo", "de"), ("Hi", "en")]


def test_hub_dataset_refused_offline_and_config_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="key 'hf_dataset'.*--offline"):
        _run(tmp_path, offline=True, hf_dataset="someone/some-sft-set")
    # a hub set that cannot be loaded fails the plan naming the key (no network here:
    # the hub libraries are in offline mode)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="key 'hf_dataset': cannot load 'someone/some-sft"):
        _run(tmp_path, hf_dataset="someone/some-sft-set")
    with pytest.raises(ValueError, match="key 'paths'"):
        SftImportConfig()
    with pytest.raises(ValueError, match="max_turns"):
        SftImportConfig(paths=["x.json"], max_turns=1)


def test_llm_judge_scores_and_rejects(tmp_path: Path) -> None:
    from speechmill.synth.llm.config import LLMConfig
    from speechmill.synth.qc.text_judge import JUDGE_PROMPT, JudgeConfig, judge_prompt_version
    from testkit.fake_llm import FakeLLM

    def answer(body: dict, fault: str | None) -> tuple[str, str]:
        shown = body["messages"][1]["content"]
        if "robot" in shown:
            return json.dumps({"coherence": 4, "naturalness": 2, "reason": "stilted"}), "stop"
        if "broken" in shown and len(body["messages"]) == 2:
            # off the schema first, fixed when the error is fed back
            return json.dumps({"coherence": 9}), "stop"
        return json.dumps({"coherence": 5, "naturalness": 4, "reason": "fine"}), "stop"

    f = _jsonl(tmp_path / "j.jsonl", [
        {"data": ["Where is the station?", "Two streets down, on the left."]},
        {"data": ["Greetings, human.", "I am a robot. Beep. Query received."]},
        {"data": ["Is this broken?", "No, it works fine."]},
    ])
    with FakeLLM(answer) as srv:
        judge = JudgeConfig(llm=LLMConfig(base_url=srv.base_url, model="judge-model",
                                          backoff_base_s=0.01))
        _, out, rej = _run(tmp_path, paths=[str(f)], judge=judge)
        bodies = [h.body for h in srv.chat]
    assert [r["reason"] for r in rej] == ["qc_judge"]
    assert "naturalness 2 < 3" in rej[0]["detail"]
    assert len(_dialogues(out)) == 2
    rec = json.loads(out[0]["judge"])
    assert rec["model"] == "judge-model" and rec["prompt_version"] == judge_prompt_version()
    assert {json.loads(r["judge"])["coherence"] for r in out} == {5}
    assert all(b["messages"][0]["content"] == JUDGE_PROMPT for b in bodies)
    assert bodies[0]["response_format"]["type"] == "json_schema"
    assert len(bodies) == 4  # three dialogues, one asked again after an off-schema answer
    # what the judge cost is committed with the rows: metrics add it up
    summary = SftImport.summarize(pa.Table.from_pylist(out), pa.Table.from_pylist(rej))
    assert summary["dialogues"] == 2
    assert summary["llm"]["requests"] == 4 and summary["llm"]["cache_hits"] == 0
    assert summary["llm"]["prompt_tokens"] > 0
    assert any(b["messages"][1]["content"].endswith(
        "USER: Where is the station?\nASSISTANT: Two streets down, on the left.")
        for b in bodies)


# -- hostile text (issue 21): a bad line, element or value costs its row, not the file ------

_GOOD = [json.dumps({"data": [f"Question number {i}?", f"Answer number {i}."]}).encode()
         for i in range(11)]


@pytest.mark.parametrize(("line", "says"), [
    (b'{"data": ["Caf\xe9?", "Oui."]}', "line 6: not UTF-8 text (byte 0xe9 at column 15)"),
    (b"[" * 100_000, "line 6: invalid JSON: nested too deeply"),
    (b'{"data": ["Hi \\ud800", "Hello."]}', "line 6: data[0]: text is not valid Unicode"),
    (b'{"data": ["Hi", "Hello."], "id": ' + b"7" * 5000 + b"}", "line 6: invalid JSON: "
     "Exceeds the limit"),
], ids=["not-utf8", "deep", "surrogate", "huge-number"])
def test_one_hostile_jsonl_line_is_one_malformed_reject(tmp_path: Path, line: bytes,
                                                        says: str) -> None:
    f = tmp_path / "sft.jsonl"
    f.write_bytes(b"\n".join([*_GOOD[:5], line, *_GOOD[6:]]) + b"\n")
    plan, out, rej = _run(tmp_path, paths=[str(f)])
    assert plan.num_rows == 11
    assert len(_dialogues(out)) == 10
    assert [r["reason"] for r in rej] == ["malformed"]
    assert rej[0]["detail"].startswith(f"{f} row 5: ")
    assert says in rej[0]["detail"], rej[0]["detail"]


def test_json_array_with_bad_elements_keeps_the_others(tmp_path: Path) -> None:
    elems = [*_GOOD[:3], b"[" * 50_000 + b"]" * 50_000, b'{"data": ["\xff", "x"]}',
             b'{"data": ["a", "b",]}', b'{"data": ["\\udfff", "x"]}', *_GOOD[3:6]]
    f = tmp_path / "sft.json"
    f.write_bytes(b"[\n" + b",\n".join(elems) + b"\n]\n")
    plan, out, rej = _run(tmp_path, paths=[str(f)])
    assert plan.num_rows == 10 and len(_dialogues(out)) == 6
    got = {int(r["detail"].split(" row ")[1].split(":")[0]): r for r in rej}
    assert sorted(got) == [3, 4, 5, 6] and {r["reason"] for r in rej} == {"malformed"}
    assert "element 3 (line 5): invalid JSON: nested too deeply" in got[3]["detail"]
    assert "not valid Unicode" in got[4]["detail"] and "not valid Unicode" in got[6]["detail"]
    # an array that never ends is still one unreadable file
    g = tmp_path / "cut.json"
    g.write_bytes(b"[\n" + b",\n".join(elems[:4]))
    _, out, rej = _run(tmp_path, paths=[str(g)])
    assert out == [] and [r["reason"] for r in rej] == ["unreadable"]


def test_parquet_value_not_utf8_and_broken_containers(tmp_path: Path) -> None:
    raw = [f"Question {i}?".encode() for i in range(4)]
    raw[1] = b"Qu\xffestion?"
    flat = [x for q in raw for x in (q, b"Answer.")]
    data = pa.ListArray.from_arrays(pa.array([0, 2, 4, 6, 8], pa.int32()),
                                    pa.array(flat, pa.binary()).view(pa.string()))
    pq.write_table(pa.table({"data": data}), tmp_path / "u.parquet")
    plan, out, rej = _run(tmp_path, paths=[str(tmp_path / "u.parquet")])
    assert plan.num_rows == 4 and len(_dialogues(out)) == 3
    assert [r["reason"] for r in rej] == ["malformed"] and " row 1: " in rej[0]["detail"]
    # a container that is not one: one unreadable reject each, the run goes on
    (tmp_path / "z.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (tmp_path / "z.jsonl.xz").write_bytes(b"\xfd7zXZ\x00garbage")
    (tmp_path / "w.json").write_bytes(b"\xff\xfe[\x00]\x00")
    _, out, rej = _run(tmp_path, paths=[str(tmp_path / n) for n in
                                        ("z.jsonl.gz", "z.jsonl.xz", "w.json")])
    assert out == [] and [r["reason"] for r in rej] == ["unreadable"] * 3
    assert "UTF-16" in rej[2]["detail"]
