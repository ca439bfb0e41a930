"""Sentence splitting under a character budget and joining with pauses."""

from __future__ import annotations

import numpy as np
import pytest

from speechmill.synth.tts.text import join_with_pauses, sentences, split_text


def test_sentences_keep_abbreviations_and_decimals() -> None:
    text = "Dr. Smith paid 3.50 dollars.  Was it worth it?  Yes! E.g. it was."
    assert sentences(text) == ["Dr. Smith paid 3.50 dollars.", "Was it worth it?", "Yes!",
                               "E.g. it was."]


def test_split_packs_whole_sentences_up_to_budget() -> None:
    text = ("The first sentence is here. The second one follows it. "
            "A third sentence ends the paragraph.")
    chunks = split_text(text, 60)
    assert [c.text for c in chunks] == [
        "The first sentence is here. The second one follows it.",
        "A third sentence ends the paragraph."]
    assert all(c.ends_sentence for c in chunks)
    assert [c.text for c in split_text(text, 500)] == [text]


def test_split_long_sentence_at_clauses_then_words() -> None:
    long = ("When the rain finally stopped, we walked down to the harbour, bought some "
            "bread and cheese, and sat on the wall watching the fishing boats come home.")
    chunks = split_text(long, 50)
    assert all(len(c.text) <= 50 for c in chunks)
    assert " ".join(c.text for c in chunks) == long  # nothing lost, order kept
    assert [c.ends_sentence for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[0].text == "When the rain finally stopped,"  # clause boundary first


def test_split_unbreakable_word_is_cut_hard() -> None:
    chunks = split_text("See " + "x" * 70 + " now.", 30)
    assert all(len(c.text) <= 30 for c in chunks)
    assert "".join(c.text.replace(" ", "") for c in chunks) == "See" + "x" * 70 + "now."


def test_split_rejects_bad_budget() -> None:
    with pytest.raises(ValueError):
        split_text("hi", 0)
    assert split_text("   ", 10) == []


def test_join_inserts_sentence_and_clause_pauses() -> None:
    sr = 1000
    parts = [np.ones(100, np.float32), np.ones(50, np.float32), np.ones(20, np.float32)]
    out = join_with_pauses(parts, sr, [True, False, True], pause_ms=300, clause_pause_ms=90,
                           fade_ms=0)
    assert out.shape[0] == 100 + 300 + 50 + 90 + 20
    assert np.all(out[100:400] == 0) and np.all(out[450:540] == 0)
    assert np.all(out[:100] == 1) and np.all(out[400:450] == 1)


def test_join_fades_chunk_edges() -> None:
    sr = 1000
    out = join_with_pauses([np.ones(100, np.float32)] * 2, sr, [True, True], pause_ms=10,
                           fade_ms=10)
    assert out[0] == 0 and out[50] == 1 and out[99] == 0  # ramps at both ends
    assert join_with_pauses([], sr, []).shape == (0,)
