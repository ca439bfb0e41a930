"""Content QC of dialogue text: every reject reason, PII masking, and clean text kept."""

from __future__ import annotations

import pytest

from speechmill.synth.qc.text_qc import TextQCConfig, find_pii, luhn_ok, qc_dialogue, qc_turn

CFG = TextQCConfig()


def _dlg(*texts: str) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "text": t}
            for i, t in enumerate(texts)]


def test_a_clean_dialogue_passes_unchanged() -> None:
    turns = _dlg("Could you recommend a book about the ocean for a ten-year-old?",
                 "The Blue Whale by Jenni Desmond is lovely: short, beautifully drawn and "
                 "full of surprising facts.")
    out, reason, detail = qc_dialogue(turns, CFG, "en")
    assert (reason, detail) == (None, "")
    assert out == turns


@pytest.mark.parametrize("turns,detail", [
    ([{"role": "assistant", "text": "Hello."}, {"role": "user", "text": "Hi."}], "turn 0"),
    ([{"role": "user", "text": "Hi."}, {"role": "user", "text": "Hello?"}], "turn 1"),
    ([], "no turns"),
])
def test_alternation(turns: list[dict], detail: str) -> None:
    _, reason, got = qc_dialogue(turns, CFG, None)
    assert reason == "qc_alternation" and detail in got


def test_length_bounds_per_turn() -> None:
    cfg = TextQCConfig(min_chars=5, max_chars=40)
    assert qc_turn("Hi", cfg, None)[1] == "qc_length"
    assert qc_turn("x" * 10 + " is fine", cfg, None)[1] is None
    _, reason, detail = qc_dialogue(_dlg("A fine question?", "word " * 20), cfg, None)
    assert reason == "qc_length" and detail.startswith("turn 1 (assistant)")


@pytest.mark.parametrize("text,why", [
    ("Well, the the the the the the the end.", "repeated 7 times in a row"),
    ("Thanks for asking, that helps. The museum opens at nine and closes at six. "
     "Thanks for asking, that helps. Tickets are cheaper online and children go free. "
     "Thanks for asking, that helps. The café on the top floor has a view of the river.",
     "occurs 3 times"),
    (" ".join(["we can go to the park and then we can go"] * 3), "3-gram ratio"),
])
def test_repetition(text: str, why: str) -> None:
    _, reason, detail = qc_turn(text, CFG, None)
    assert reason == "qc_repetition" and why in detail


def test_ordinary_repetition_is_not_degeneration() -> None:
    text = ("Yes, yes, I know. We went to the market on Monday and to the market again on "
            "Friday, because the bread there is very, very good.")
    assert qc_turn(text, CFG, None)[1] is None


@pytest.mark.parametrize("text", [
    "As an AI language model, I don't have personal opinions.",
    "I’m sorry, but I can’t help with that.",          # curly apostrophes
    "I AM SORRY, BUT I CANNOT do this request.",
])
def test_refusals(text: str) -> None:
    assert qc_turn(text, CFG, None, role="assistant")[1] == "qc_refusal"


def test_refusal_only_on_assistant_turns_and_configurable() -> None:
    text = "I'm sorry, but I can't come to dinner on Friday."
    assert qc_turn(text, CFG, None, role="user")[1] is None
    cfg = TextQCConfig(refusal_patterns=["I cannot comply"])
    assert qc_turn(text, cfg, None, role="assistant")[1] is None
    assert qc_turn("Well, I cannot comply.", cfg, None, role="assistant")[1] == "qc_refusal"


def test_pii_mask_reject_keep() -> None:
    text = ("Write to jo.smith+news@mail.example.co.uk or call +44 20 7946 0958 "
            "or 555-123-4567; my card is 4111 1111 1111 1111.")
    masked, reason, _ = qc_turn(text, CFG, None)
    assert reason is None
    assert masked == ("Write to an email address or call a phone number or a phone number; "
                      "my card is a card number.")
    _, reason, detail = qc_turn(text, TextQCConfig(pii="reject"), None)
    assert reason == "qc_pii" and detail == "contains card, email, phone"
    assert qc_turn(text, TextQCConfig(pii="keep"), None) == (text, None, "")
    out, reason, _ = qc_dialogue(_dlg("Mail me at a@b.org please.", "Sure."), CFG, None)
    assert reason is None and out[0]["text"] == "Mail me at an email address please."


@pytest.mark.parametrize("text", [
    "It cost $1,250,000 in 2024, on 12.05.2024 or 2024-01-15.",
    "Pi is 3.14159265358979 and a million is 1 000 000.",
    "Order 4111111111111112 is not a card: the Luhn check fails.",
    "Between 10:30 and 11:45, 120 km at 20-25 degrees.",
])
def test_numbers_that_are_not_pii(text: str) -> None:
    assert find_pii(text) == []


def test_luhn() -> None:
    assert luhn_ok("4111111111111111") and luhn_ok("79927398713")
    assert not luhn_ok("4111111111111112")


def test_blocklist_matches_words_not_substrings() -> None:
    cfg = TextQCConfig(blocklist=["darn", "Foo Bar"])
    assert qc_turn("Oh DARN, it broke!", cfg, None)[1] == "qc_blocklist"
    assert qc_turn("It is foo-bar time.", cfg, None)[1] == "qc_blocklist"
    assert qc_turn("The darning needle is here.", cfg, None)[1] is None


def test_language() -> None:
    cfg = TextQCConfig(languages=["en", "de"], lid_candidates=["en", "de", "fr"])
    de = "Ich möchte morgen früh mit dem Zug nach Hamburg fahren."
    fr = "Je voudrais réserver une table pour deux personnes ce soir."
    en = "I would like to take the early train to Hamburg tomorrow."
    assert qc_turn(de, cfg, "de")[1] is None
    assert qc_turn(en, cfg, None)[1] is None  # any allowed language
    _, reason, detail = qc_turn(fr, cfg, None)
    assert reason == "qc_language" and detail.startswith("detected fr")
    # the dialogue's declared language must match
    _, reason, detail = qc_dialogue(_dlg(en, de), cfg, "de")
    assert reason == "qc_language" and detail.startswith("turn 0 (user): detected en")
    _, reason, _ = qc_dialogue(_dlg(de, de), cfg, "fr")
    assert reason == "qc_language"
    # too short to judge: not rejected on a guess
    assert qc_turn("Oui, merci.", cfg, "en")[1] is None
    # no languages configured: no check (and no detector loaded)
    assert qc_turn(fr, CFG, "en")[1] is None
