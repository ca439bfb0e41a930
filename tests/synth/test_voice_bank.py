"""The ``voice_bank`` sink on real multi-speaker speech (Piper + eSpeak NG voices) and the
voice bank's Python API (prompts, the balanced per-dialogue voice deal)."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.synth.qc.synth_qc import silence_bounds
from speechmill.synth.voices.bank import Clip, VoiceBankError, load_voice_bank
from speechmill.synth.voices.bank import VoiceBank as Bank
from speechmill.synth.voices.voice_bank import VoiceBank, VoiceBankConfig, fit_span
from testkit.conversations import SENTENCES, espeak_available
from testkit.voice_bank_data import export, segment_row, words_over, write_segment

SR = 16000
needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng voices")
VOICES = {"spk-joe": "piper:joe", "spk-f3": "espeak:en-us+f3", "spk-m3": "espeak:en-gb+m3",
          "spk-klatt": "espeak:en-us+klatt2", "spk-dev": "espeak:en-us+grandma"}


@pytest.fixture(scope="module")
def segments(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, Path]:
    d = tmp_path_factory.mktemp("segments")
    rows = []
    for i, (spk, voice) in enumerate(VOICES.items()):
        pair = [SENTENCES[2 * i], SENTENCES[2 * i + 1]]
        dur, w = write_segment(d / f"{spk}-a.wav", voice, pair, lead=0.8, trail=1.5)
        rows.append(segment_row(f"{spk}-a", d / f"{spk}-a.wav", spk, dur, w, 3.2,
                         "dev" if spk == "spk-dev" else "train"))
        long_one = SENTENCES[(15, 27, 0, 23, 2)[i]]  # one long sentence: 3.5-5 s
        dur, w = write_segment(d / f"{spk}-b.wav", voice, [long_one], 0.3, 0.3)
        rows.append(segment_row(f"{spk}-b", d / f"{spk}-b.wav", spk, dur, w, 2.9,
                         "dev" if spk == "spk-dev" else "train"))
        dur, w = write_segment(d / f"{spk}-c.wav", voice, ["Yes, thanks."], 0.1, 0.1)
        rows.append(segment_row(f"{spk}-c", d / f"{spk}-c.wav", spk, dur, w, 3.5))  # too short
    # a long segment (about 15 s) of joe: its first sentence(s) make a clip
    long_s = [SENTENCES[30], SENTENCES[31], SENTENCES[32], SENTENCES[33]]
    dur, w = write_segment(d / "spk-joe-long.wav", "piper:joe", long_s, 0.2, 0.2, gap=0.6)
    rows.append(segment_row("spk-joe-long", d / "spk-joe-long.wav", "spk-joe", dur, w, 3.4))
    # an opted-out source: never in the bank, whatever its quality
    rows.append({**rows[0], "id": "spk-f3-z", "speaker": "spk-f3",
                 "source_url": "https://optout.example/ep1.mp3",
                 "scores": {"dnsmos_ovrl": 4.5, "asr_avg_logprob": -0.1}})
    # many poorer candidates of one speaker whose files do not exist: the bank keeps only
    # a bounded heap of the best candidates and never reads these
    for k in range(300):
        rows.append({**rows[3], "id": f"spk-f3-x{k:03d}", "audio_path": str(d / "nope.wav"),
                     "scores": {"dnsmos_ovrl": 2.0 + k / 1000, "asr_avg_logprob": -0.5}})
    # user voices in folders: name/*.wav with same-name .txt
    folders = d / "folders"
    (folders / "alice").mkdir(parents=True)
    for k, s in enumerate((SENTENCES[38], SENTENCES[39] + " " + SENTENCES[40])):
        write_segment(folders / "alice" / f"c{k}.wav", "espeak:en-us+f3", [s], 0.5, 0.5)
        (folders / "alice" / f"c{k}.txt").write_text(s + "\n")
    shutil.copy(folders / "alice" / "c0.wav", folders / "alice" / "untranscribed.wav")
    return pa.Table.from_pylist(rows), folders


@needs_espeak
def test_voice_bank_from_cleaning_segments(segments: tuple[pa.Table, Path],
                                           tmp_path: Path) -> None:
    table, folders = segments
    out, summary = export(table, tmp_path / "run", clips_per_voice=2,
                          exclude_speakers=["spk-klatt"],
                          exclude_sources=["https://optout.example/*"],
                          folders=[str(folders)], folder_language="en")
    bank = pq.read_table(out / "voices.parquet").to_pylist()
    by_voice: dict[str, list[dict[str, Any]]] = {}
    for r in bank:
        by_voice.setdefault(r["voice_id"], []).append(r)
    # dev speakers and opted-out speakers/sources never enter
    assert sorted(by_voice) == ["alice", "spk-f3", "spk-joe", "spk-m3"]
    assert summary["held_out_speakers"] == 1 and summary["opted_out_speakers"] == 1
    assert all(r["source_id"] != "spk-f3-z" for r in bank)
    assert summary["skipped"].get("unreadable", 0) == 0  # the 300 poor ones never read
    assert summary["skipped"]["folder_no_text"] == 1
    assert summary["voices"] == 4 and summary["from_folders"] == 1
    for r in bank:
        p = Path(r["audio_path"])
        assert p.is_absolute() and p.is_file() and p.parent.parent == out / "clips"
        x, sr = sf.read(p, dtype="float32")
        assert x.ndim == 1 and sr == r["sample_rate"] == SR
        assert r["duration"] == pytest.approx(x.shape[0] / sr, abs=1e-3)
        assert 3.0 <= r["duration"] <= 10.0
        lead, trail = silence_bounds(x, sr)  # trimmed to the 0.15 s pad (+ VAD slack)
        assert lead <= 0.35 and trail <= 0.45, (r["clip_id"], lead, trail)
        emb = np.asarray(r["embedding"], np.float32)
        assert emb.shape == (256,) and np.linalg.norm(emb) == pytest.approx(1.0, abs=1e-4)
        assert r["text"] and r["language"] == "en" and r["gender"] in ("male", "female")
    # ranks: the best-scored clip first; the 1-s clips never (too short)
    assert [r["rank"] for r in by_voice["spk-m3"]] == [0, 1]
    assert by_voice["spk-m3"][0]["source_id"] == "spk-m3-a"
    assert not any(r["source_id"].endswith("-c") for r in bank)
    # joe's 15-s segment became its first sentence(s), cut at a sentence end, <= 10 s
    joe = {r["source_id"]: r for r in by_voice["spk-joe"]}
    long_clip = joe["spk-joe-long"]
    assert long_clip["rank"] == 0 and long_clip["text"] in (
        SENTENCES[30], f"{SENTENCES[30]} {SENTENCES[31]}",
        f"{SENTENCES[30]} {SENTENCES[31]} {SENTENCES[32]}")
    # the embeddings tell the voices apart; f0 tells f3 (a female variant) from m3
    e = {v: np.mean([r["embedding"] for r in rs], axis=0) for v, rs in by_voice.items()}
    same = float(np.dot(by_voice["spk-joe"][0]["embedding"], by_voice["spk-joe"][1]["embedding"]))
    assert same > max(float(np.dot(e["spk-joe"], e[v]) / np.linalg.norm(e[v]))
                      for v in ("spk-f3", "spk-m3"))
    assert by_voice["spk-f3"][0]["f0_hz"] > by_voice["spk-m3"][0]["f0_hz"]
    assert by_voice["spk-m3"][0]["gender"] == "male"
    # the folder voice: its transcribed clips, text from the .txt files
    assert {r["text"] for r in by_voice["alice"]} <= {SENTENCES[38],
                                                       f"{SENTENCES[39]} {SENTENCES[40]}"}
    listing = json.loads((out / "voices.json").read_text())
    assert [v["voice_id"] for v in listing["voice_list"]] == sorted(by_voice)
    # deterministic: the same input gives the same bank, byte for byte
    out2, _ = export(table, tmp_path / "run", stage_id="voices2", clips_per_voice=2,
                     exclude_speakers=["spk-klatt"],
                     exclude_sources=["https://optout.example/*"],
                     folders=[str(folders)], folder_language="en")
    a = pq.read_table(out / "voices.parquet").drop(["audio_path"])
    b = pq.read_table(out2 / "voices.parquet").drop(["audio_path"])
    assert a.equals(b)
    # the Python API the tts stage uses
    vb = load_voice_bank(out)
    assert vb.voice_ids == sorted(by_voice) and vb.gender("spk-m3") == "male"
    p = vb.prompt("spk-joe", (2.0, 12.0))
    assert p.voice_id == "spk-joe" and p.audio_path == long_clip["audio_path"]
    assert p.text == long_clip["text"] and p.language == "en"
    short = min(by_voice["spk-joe"], key=lambda r: r["duration"])
    assert vb.prompt("spk-joe", (0.5, short["duration"])).audio_path == short["audio_path"]
    with pytest.raises(VoiceBankError, match="no prompt clip of 0.5-1 s"):
        vb.prompt("spk-m3", (0.5, 1.0))
    with pytest.raises(VoiceBankError, match="not in the bank"):
        vb.prompt("spk-dev")


@needs_espeak
def test_backend_bounds_and_validation(segments: tuple[pa.Table, Path], tmp_path: Path) -> None:
    table, _ = segments
    # Chatterbox wants at least 5 s: the one-sentence clips (~3-4 s) are out
    out, summary = export(table, tmp_path / "run", backend="chatterbox")
    assert summary["bounds_s"] == [5.0, 10.0]
    assert all(r["duration"] >= 5.0 for r in pq.read_table(out / "voices.parquet").to_pylist())
    with pytest.raises(ValueError, match="with.backend"):
        VoiceBank.validate_config(VoiceBankConfig(backend="nope"))
    with pytest.raises(ValueError, match="with.min_s"):
        VoiceBank.validate_config(VoiceBankConfig(min_s=8, max_s=5))


def test_fit_span_cuts_at_sentence_ends() -> None:
    words = words_over("One two three. Four five six seven. Eight nine ten eleven twelve.", 0.5,
                   12.5)
    a, b, text = fit_span(words, 3.0, 10.0, 0.15)
    assert text == "One two three. Four five six seven." and a == 0.5 and b <= 10.0
    assert fit_span(words, 3.0, 2.0, 0.15) is None


def _bank(n: int, genders: tuple[str, ...] = ("male", "female"),
          languages: tuple[str | None, ...] = ("en",)) -> Bank:
    return Bank([Clip(f"v{i:02d}", f"c{i}", f"/x/{i}.wav", 5.0, "hi",
                      languages[i % len(languages)], genders[i % len(genders)], 0)
                 for i in range(n)])


def test_assign_all_is_balanced_deterministic_and_capped() -> None:
    bank = _bank(6)
    dialogues = [f"{i:016x}" for i in range(20)]
    plan = bank.assign_all(dialogues, seed=3, max_share=0.2)
    counts = Counter(plan.values())
    assert len(counts) == 6 and max(counts.values()) - min(counts.values()) <= 1
    assert max(counts.values()) <= 0.2 * 20
    # the deal depends on the set of dialogues and the seed only: not on their order or
    # on which batch/worker asks
    assert bank.assign_all(list(reversed(dialogues)), seed=3, max_share=0.2) == plan
    assert bank.assign_all(dialogues, seed=4, max_share=0.2) != plan
    # too few voices for the share: a clear error
    with pytest.raises(VoiceBankError, match="max_share"):
        _bank(3).assign_all(dialogues, max_share=0.2)
    # the assistant's voice is left out of the user pool
    assert "v00" not in set(bank.assign_all(dialogues, max_share=0.25, exclude=["v00"]).values())
    # the assistant of a cloning backend without a voice: the bank's best-scored voice
    scored = Bank([Clip(f"v{i}", "c", "/x.wav", 5.0, "hi", "en", None, 0, dnsmos=d)
                   for i, d in enumerate((2.5, 3.1, 3.1, 2.9))])
    assert scored.best_voice() == "v1" and scored.best_voice(exclude=["v1"]) == "v2"
    # single-dialogue assignment: deterministic, spread over the bank
    one = [bank.assign(d, seed=3) for d in dialogues]
    assert one == [bank.assign(d, seed=3) for d in dialogues] and len(set(one)) >= 4


def test_assign_all_matches_language_and_gender() -> None:
    bank = _bank(8, languages=("en", "de"))  # v00 en male, v01 de female, v02 en male...
    ds = [{"dialogue_id": f"d{i}", "language": "de" if i % 4 == 0 else "en",
           "gender": "female" if i % 2 else None} for i in range(40)]
    plan = bank.assign_all(ds, seed=0, max_share=0.5, match_language=True, match_gender=True)
    for d in ds:
        v = plan[d["dialogue_id"]]
        assert bank.language(v) == d["language"]
    # matching is a preference: without the flag every voice is dealt
    assert len(set(bank.assign_all(ds, max_share=0.5).values())) == 8
    # full matching voices overflow to others instead of passing max_share
    tight = bank.assign_all(ds, seed=0, max_share=0.15, match_language=True)
    assert max(Counter(tight.values()).values()) <= 6


@needs_espeak
def test_voice_bank_from_folders_alone(segments: tuple[pa.Table, Path], tmp_path: Path) -> None:
    """A bank of the user's own voices only: a DAG whose ``voice_bank`` needs no stage."""
    import yaml

    from speechmill.pipeline.dag import loads
    from speechmill.pipeline.runner import run

    _, folders = segments
    dag = {"name": "folder-bank", "run_dir": str(tmp_path / "run"),
           "executor": {"type": "local"},
           "stages": [{"id": "voices", "uses": "voice_bank",
                       "with": {"folders": [str(folders)], "folder_language": "en"}}]}
    res = run(loads(yaml.safe_dump(dag)), progress=False)
    assert res.status == "succeeded", res
    bank = pq.read_table(tmp_path / "run/voices/voices/voices.parquet").to_pylist()
    assert {r["voice_id"] for r in bank} == {"alice"}
    assert {r["source"] for r in bank} == {"folder"} and len(bank) == 2
    assert all(Path(r["audio_path"]).is_file() and r["text"] for r in bank)
    # neither an upstream stage nor folders: refused when the DAG loads, naming the key
    from speechmill.pipeline.errors import ConfigError

    del dag["stages"][0]["with"]["folders"]
    with pytest.raises(ConfigError, match=r"stage 'voices': key 'with.folders'"):
        loads(yaml.safe_dump(dag))


def test_folder_voices_with_clashing_names_and_a_latin1_transcript(tmp_path: Path) -> None:
    """Voice folders ``张三`` / ``李四`` and ``Anna Smith`` / ``Anna_Smith`` used to share one
    clip file (the second overwrote the first); a Latin-1 transcript used to fail the stage
    with a ``UnicodeDecodeError`` naming no file."""
    text = f"{SENTENCES[39]} {SENTENCES[40]}"
    src = tmp_path / "src.wav"
    write_segment(src, "piper:joe", [text], 0.5, 0.5)
    folders = tmp_path / "folders"
    names = ["张三", "李四", "Anna Smith", "Anna_Smith"]
    for n in names:
        (folders / n).mkdir(parents=True)
        shutil.copy(src, folders / n / "a.wav")
        (folders / n / "a.txt").write_text(text + "\n", encoding="utf-8")
    latin1 = "Ça va? Crème brûlée, s'il vous plaît."
    (folders / "Anna Smith" / "a.txt").write_bytes(latin1.encode("latin-1"))
    out, summary = export(pa.table({"id": pa.array([], pa.string())}), tmp_path / "run",
                          folders=[str(folders)], folder_language="en")
    bank = {r["voice_id"]: r for r in pq.read_table(out / "voices.parquet").to_pylist()}
    assert sorted(bank) == sorted(names) and summary["from_folders"] == 4
    paths = [Path(r["audio_path"]) for r in bank.values()]
    assert len(set(paths)) == 4 and all(p.is_file() for p in paths)
    assert all(p.parent.parent == out / "clips" for p in paths)
    dirs = {p.parent.name for p in paths}
    assert {"张三", "李四", "Anna_Smith"} <= dirs and len(dirs) == 4  # readable + unique
    assert bank["Anna Smith"]["text"] == latin1 and bank["张三"]["text"] == text
    # no fallback: the clip is skipped and its transcript named
    lone = tmp_path / "lone" / "Anna Smith"
    shutil.copytree(folders / "Anna Smith", lone)
    _, summary = export(pa.table({"id": pa.array([], pa.string())}), tmp_path / "run",
                        stage_id="voices2", folders=[str(lone.parent)],
                        transcript_encoding=None)
    assert summary["voices"] == 0 and summary["skipped"]["folder_bad_encoding"] == 1
    assert summary["bad_transcripts"] == [str(lone / "a.txt")]
    with pytest.raises(ValueError, match="with.transcript_encoding"):
        VoiceBank.validate_config(VoiceBankConfig(transcript_encoding="no-such-codec"))


def test_read_transcript_encodings(tmp_path: Path) -> None:
    from speechmill.synth.voices.voice_bank import TranscriptEncodingError, read_transcript

    p = tmp_path / "t.txt"
    s = "Grüße, 张三 — naïve café"
    for data in (s.encode("utf-8"), b"\xef\xbb\xbf" + s.encode("utf-8"),
                 s.encode("utf-16"), b"\xfe\xff" + (s + "\n").encode("utf-16-be")):
        p.write_bytes(data)
        assert read_transcript(p) == s and read_transcript(p, None) == s
    p.write_bytes("naïve café “quoted”".encode("cp1252"))
    assert read_transcript(p, "cp1252") == "naïve café “quoted”"
    assert read_transcript(p).startswith("naïve café ")  # latin-1: never fails
    with pytest.raises(TranscriptEncodingError, match=r"t\.txt.*not UTF-8"):
        read_transcript(p, None)
    p.write_bytes(b"\x81\x8d")  # undefined in cp1252, not UTF-8: named, not a crash
    with pytest.raises(TranscriptEncodingError, match="not UTF-8 or cp1252"):
        read_transcript(p, "cp1252")
