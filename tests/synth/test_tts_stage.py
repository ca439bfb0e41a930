"""The ``tts`` stage: voices from a voice bank (one per dialogue, balanced), Piper with
offline voice matching, the synthesis QC with retries and rejects, clips written once."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from speechmill.pipeline.stage import StageContext
from speechmill.synth.qc.synth_qc import QC_FIELDS
from speechmill.synth.text.turns import dialogue_id, turn_rows
from speechmill.synth.tts.stage import TTS, TTSStageConfig
from testkit.conversations import espeak_available
from testkit.voice_bank_data import export, make_segments

needs_espeak = pytest.mark.skipif(not espeak_available(), reason="needs espeak-ng voices")
SMALL_GRID = {"pitch_factors": [0.8, 1.0, 1.4], "formant_factors": [1.0, 1.15]}
DIALOGUES = [
    ("Could you tell me how long it takes to bake a loaf of bread?",
     "It usually takes about forty minutes in a hot oven."),
    ("What should I pack for a weekend in the mountains?",
     "Bring warm layers, good shoes and a rain jacket."),
    ("How do I keep basil fresh?", "Keep it in a glass of water on the counter."),
]


def turns(dialogues: list[tuple[str, str]] = DIALOGUES) -> pa.Table:
    rows = []
    for i, pair in enumerate(dialogues):
        did = dialogue_id("test", str(i))
        rows += turn_rows(did, [{"role": "user", "text": pair[0]},
                                {"role": "assistant", "text": pair[1]}], parent_id=did,
                          language="en", source={"model": "fixture-llm", "seed": i})
    return pa.Table.from_pylist(rows)


def run_stage(table: pa.Table, run_dir: Path, **cfg: Any) -> tuple[pa.Table, pa.Table, TTS]:
    """prepare (driver) -> setup -> process, as a worker of the engine does."""
    config = TTSStageConfig(**cfg)
    TTS.validate_config(config)
    ctx = StageContext(stage_id="tts", run_dir=str(run_dir), offline=True)
    prepared = TTS.prepare(config, table.select(["dialogue_id", "language", "role"]), ctx)
    stage = TTS(config, StageContext(stage_id="tts", run_dir=str(run_dir), offline=True,
                                     prepared=prepared))
    stage.setup()
    res = stage.process(table)
    return res.outputs, res.rejects, stage


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bank")
    voices = {"spk-f3": "espeak:en-us+f3", "spk-m3": "espeak:en-gb+m3",
              "spk-klatt": "espeak:en-us+klatt2"}
    out, _ = export(make_segments(d / "segments", voices, clips=1), d / "cleaning")
    return out


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="with.voice_bank"):
        TTS.validate_config(TTSStageConfig(backend={"backend": "f5_tts"}))
    with pytest.raises(ValueError, match="with.voice_bank"):
        TTS.validate_config(TTSStageConfig(backend={"backend": "piper", "voice_match": {}}))
    with pytest.raises(ValueError, match="with.voice_bank.*assistant backend 'xtts'"):
        TTS.validate_config(TTSStageConfig(assistant_backend={"backend": "xtts"}))
    with pytest.raises(ValueError, match="with.assistant_voice"):
        TTS.validate_config(TTSStageConfig(assistant_voice="spk-1"))
    with pytest.raises(ValueError, match="with.voice_bank"):
        TTS.validate_dag(TTSStageConfig(voice_bank=str(tmp_path / "missing")), {})
    TTS.validate_config(TTSStageConfig())  # plain Piper: preset voices, no bank needed
    assert TTS.gpu_share(TTSStageConfig()) == 0.0
    assert TTS.gpu_share(TTSStageConfig(voice_bank="v", assistant_voice="a",
                                        backend={"backend": "f5_tts"})) == 1.0


@needs_espeak
def test_tts_stage_voice_matched_users_and_preset_assistant(bank: Path, tmp_path: Path) -> None:
    table = turns()
    vm = {"backend": "piper", "voice_match": {**SMALL_GRID, "cache_dir": str(tmp_path / "vm")}}
    out, rej, stage = run_stage(table, tmp_path / "run", backend=vm, voice_bank=str(bank),
                                max_share=0.34, qc={"asr_beam_size": 1})
    assert rej.num_rows == 0, rej.to_pylist()
    rows = {r["id"]: r for r in out.to_pylist()}
    assert sorted(rows) == sorted(table.column("id").to_pylist())
    users = [r for r in rows.values() if r["role"] == "user"]
    # one voice per dialogue, every dialogue another bank voice (3 voices, share <= 1/3)
    assert sorted(r["voice_id"] for r in users) == ["spk-f3", "spk-klatt", "spk-m3"]
    media = tmp_path / "run" / "media" / "tts"
    for r in rows.values():
        p = Path(r["audio_path"])
        assert p.is_absolute() and p.is_file() and media in p.parents
        assert p.parent.name == r["dialogue_id"] and p.name == f"{r['id']}.flac"
        x, sr = sf.read(p, dtype="float32")
        assert x.ndim == 1 and sr == r["sample_rate"] and r["channels"] == 1
        assert r["duration"] == pytest.approx(x.shape[0] / sr, abs=1e-3)
        assert r["offset"] == 0.0 and r["synthetic"] is True and r["speaker"] == r["voice_id"]
        assert set(r["qc"]) == set(QC_FIELDS) and r["qc"]["wer"] <= 0.15
        assert r["qc"]["dnsmos"] is not None and r["qc"]["speaker_sim"] is not None
        assert r["words"] and r["words"][-1]["end"] <= r["duration"] + 0.05
        assert r["tts_backend"] == "piper" and "+voice_match:" in r["tts_version"]
        assert 1 <= r["attempts"] <= 3 and r["parent_id"] == r["id"]
        synth = json.loads(r["synth"])
        assert synth["llm"]["model"] == "fixture-llm"
        assert synth["voice_source"] == r["voice_source"] and synth["tts"]["seed"] == r["tts_seed"]
        if r["role"] == "user":
            assert r["voice_source"] == "voice_match" and synth["voice_match"]["pitch_factor"]
            assert synth["prompt"]["voice_id"] == r["voice_id"]
        else:  # one configured assistant voice: the preset, checked against its reference
            assert r["voice_source"] == "preset" and r["voice_id"] == "piper:default"
            assert r["qc"]["speaker_sim"] >= 0.75
        assert "clone" not in r["synth"]
    summary = TTS.summarize(out, rej)
    assert summary["user_voices"] == 3 and summary["voices"] == 4
    assert summary["wer"] <= 0.15 and summary["qc_reject_share"] == 0.0
    # the same batch again (a resume after a crash): the same files, overwritten in place
    before = sorted(media.rglob("*"))
    again = stage.process(table).outputs
    assert sorted(media.rglob("*")) == before
    assert sorted(again.column("audio_path").to_pylist()) == \
        sorted(out.column("audio_path").to_pylist())
    assert not list(media.rglob("*.tmp"))


@needs_espeak
def test_tts_stage_rejects_with_the_best_attempts_reason(bank: Path, tmp_path: Path) -> None:
    table = turns(DIALOGUES[:2])
    # a DNSMOS bar no TTS clears: every attempt fails, the turn is rejected with the reason
    # and the best attempt's scores (WER gate off: tiny.en with beam 1 may miss a word of
    # a short turn, which would make qc_wer the reason)
    out, rej, _ = run_stage(table, tmp_path / "run", voice_bank=str(bank), max_attempts=2,
                            qc={"asr_beam_size": 1, "min_dnsmos": 4.9, "max_wer": None,
                                "max_cer": None, "min_dnsmos_voice_match": 4.9},
                            backend={"backend": "piper", "voice_match": {
                                **SMALL_GRID, "cache_dir": str(tmp_path / "vm")}})
    assert out.num_rows == 0
    r = rej.to_pylist()
    assert {x["reason"] for x in r} == {"qc_dnsmos"} and len(r) == table.num_rows
    assert all("best of 2 attempts" in x["detail"] and "dnsmos" in x["detail"] for x in r)
    assert not list((tmp_path / "run" / "media" / "tts").rglob("*.flac"))
    # a bank voice whose prompt clip is gone: tts_error for its user turns, nothing else
    broken = tmp_path / "broken"
    broken.mkdir()
    t = pq.read_table(bank / "voices.parquet")
    paths = [str(broken / "gone.wav") if v == "spk-m3" else p for v, p in
             zip(t.column("voice_id").to_pylist(), t.column("audio_path").to_pylist(),
                 strict=True)]
    t = t.set_column(t.schema.get_field_index("audio_path"), "audio_path", pa.array(paths))
    pq.write_table(t, broken / "voices.parquet")
    out, rej, stage = run_stage(turns(), tmp_path / "run2", voice_bank=str(broken),
                                max_share=0.34, qc={"enabled": False},
                                backend={"backend": "piper", "voice_match": {
                                    **SMALL_GRID, "cache_dir": str(tmp_path / "vm")}})
    reasons = Counter(x["reason"] for x in rej.to_pylist())
    assert reasons == {"tts_error": 1}
    assert "spk-m3" in rej.to_pylist()[0]["detail"]
    assert out.num_rows == 5 and all(r["attempts"] == 1 for r in out.to_pylist())
    assert all(r["words"] is None and r["qc"]["wer"] is None for r in out.to_pylist())


def test_plain_preset_needs_no_bank_and_other_languages_are_rejected(tmp_path: Path) -> None:
    rows = turns(DIALOGUES[:1]).to_pylist()
    rows[1] = {**rows[1], "language": "de"}
    out, rej, _ = run_stage(pa.Table.from_pylist(rows), tmp_path / "run", languages=["en"],
                            qc={"enabled": False})
    assert [r["reason"] for r in rej.to_pylist()] == ["unsupported_language"]
    (r,) = out.to_pylist()
    assert r["voice_source"] == "preset" and r["voice_id"] == "piper:default"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_full_disk_under_the_clips_fails_the_stage(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A clip that cannot be written (ENOSPC) stops the stage with the OSError; it never
    becomes a reject row (libsndfile alone would report its own error, errno dropped)."""
    import errno

    from speechmill.pipeline import audio_write
    from speechmill.pipeline.errors import is_fatal

    real = audio_write.write_audio
    monkeypatch.setattr(audio_write, "write_audio",
                        lambda path, *a, **kw: real("/dev/full", *a, **kw))
    with pytest.raises(OSError) as ei:
        run_stage(turns(DIALOGUES[:1]), tmp_path / "run", qc={"enabled": False})
    assert ei.value.errno == errno.ENOSPC and is_fatal(ei.value)
