"""``rules`` rewriting, table-driven: numbers, currencies, dates, times, units,
abbreviations and markdown in English, German and French; what cannot be spoken."""

from __future__ import annotations

import pytest

from speechmill.synth.text.speakable import has_unspoken, make_speakable, sentences, unspeakable

EN = [
    # numbers
    ("I have 3 apples and 1,000,000 reasons.", "I have three apples and one million reasons."),
    ("It is -5 outside.", "It is minus five outside."),
    ("About 2.5 times more.", "About two point five times more."),
    ("Version 2.0 of MP3.", "Version two of MP three."),
    ("Roughly 20-30 cases.", "Roughly twenty to thirty cases."),
    ("She came 1st, he came 22nd.", "She came first, he came twenty-second."),
    ("5 apples are enough.", "Five apples are enough."),
    # currencies
    ("It costs $1,250.50.", "It costs one thousand two hundred and fifty dollars and fifty "
     "cents."),
    ("Only €3 or £20!", "Only three euros or twenty pounds!"),
    ("They raised $5 million.", "They raised five million dollars."),
    ("A ticket is USD 300.", "A ticket is three hundred dollars."),
    ("That is $1.", "That is one dollar."),
    # percent
    ("About 50% agree.", "About fifty percent agree."),
    # dates and years
    ("We meet on 2024-03-15.", "We meet on March fifteenth, twenty twenty-four."),
    ("Due 12/25/2023.", "Due December twenty-fifth, twenty twenty-three."),
    ("On March 3rd, 2021 it rained.", "On March third, twenty twenty-one it rained."),
    ("Born on the 15th of March.", "Born on the fifteenth of March."),
    ("In 1999 it changed.", "In nineteen ninety-nine it changed."),
    # times
    ("Meet at 10:30.", "Meet at ten thirty."),
    ("Call at 3pm or 10:05 a.m. please.", "Call at three p m or ten oh five a m please."),
    ("Leave by 7 a.m. Then relax.", "Leave by seven a m. Then relax."),
    ("Open 9:00-17:00.", "Open nine o'clock to five p m."),
    # units
    ("Run 5 km at 12.5 km/h.", "Run five kilometers at twelve point five kilometers per hour."),
    ("It weighs 1 kg.", "It weighs one kilogram."),
    ("It is 70°F or 25 °C.", "It is seventy degrees Fahrenheit or twenty-five degrees "
     "Celsius."),
    ("A 40 min drive.", "A forty minute drive."),
    ("Add 300 ml milk and 200 g flour.", "Add three hundred milliliters milk and two hundred "
     "grams flour."),
    ("It has 16 GB.", "It has sixteen gigabytes."),
    # abbreviations
    ("Fruit, e.g. apples, i.e. fresh ones.", "Fruit, for example apples, that is fresh ones."),
    ("Ask Dr. Smith vs. Mr. Jones.", "Ask Doctor Smith versus Mister Jones."),
    ("Herbs etc. Then water.", "Herbs et cetera. Then water."),
    ("Room No. 12.", "Room number twelve."),
    # markdown, URLs, emoji, parentheses
    ("## Tips\n- **Drink** water\n- Sleep *well*", "Tips. Drink water. Sleep well."),
    ("1. First step\n2. Second step", "First step. Second step."),
    ("See [the guide](https://example.com) today.", "See the guide today."),
    ("Read more at https://example.org/a?b=1 now.", "Read more at now."),
    ("Great job 🎉🚀!", "Great job!"),
    ("The lift (on the left) works.", "The lift, on the left, works."),
    ("> A quote with `pip install`.", "A quote with pip install."),
    ("Salt & pepper.", "Salt and pepper."),
]

DE = [
    ("Es kostet 1.250,50 €.", "Es kostet eintausendzweihundertfünfzig Euro und fünfzig Cent."),
    ("Das sind 2,5 Mio. €.", "Das sind zwei Komma fünf Millionen Euro."),
    ("Am 15.03.2024 um 10:30 Uhr.", "Am fünfzehnten März zweitausendvierundzwanzig um zehn Uhr "
     "dreißig."),
    ("Der 3. Mai 2020 war schön.", "Der dritte Mai zweitausendzwanzig war schön."),
    ("Von 10-20 Uhr geöffnet.", "Von zehn bis zwanzig Uhr geöffnet."),
    ("Wir fahren 5 km mit 12,5 km/h.", "Wir fahren fünf Kilometer mit zwölf Komma fünf "
     "Kilometer pro Stunde."),
    ("Nimm 1 kg Äpfel und 1 Stunde Zeit.", "Nimm ein Kilogramm Äpfel und eine Stunde Zeit."),
    ("Es sind ca. 25 °C.", "Es sind circa fünfundzwanzig Grad Celsius."),
    ("Obst, z.B. Äpfel, bzw. Birnen usw.", "Obst, zum Beispiel Äpfel, beziehungsweise Birnen "
     "und so weiter."),
    ("Das sind 50 %.", "Das sind fünfzig Prozent."),
    ("Seit 1999 in der Str. Nr. 5.", "Seit neunzehnhundertneunundneunzig in der Straße "
     "Nummer fünf."),
    ("Ich habe 3 Katzen.", "Ich habe drei Katzen."),
    ("## Einkauf\n- **Brot**\n- Milch", "Einkauf. Brot. Milch."),
]

FR = [
    ("Ça coûte 1 250,50 €.", "Ça coûte mille deux cent cinquante euros et cinquante centimes."),
    ("Le 15/03/2024 à 10h30.", "Le quinze mars deux mille vingt-quatre à dix heures trente."),
    ("Le 1er mars, M. Dupont a payé 50 %.", "Le premier mars, Monsieur Dupont a payé cinquante "
     "pour cent."),
    ("Il fait 25 °C, p. ex. à Lyon.", "Il fait vingt-cinq degrés Celsius, par exemple à Lyon."),
    ("Il a couru 5 km en 1 h.", "Il a couru cinq kilomètres en une heure."),
    ("Depuis 1999, la 2e fois.", "Depuis mille neuf cent quatre-vingt-dix-neuf, la deuxième "
     "fois."),
]


@pytest.mark.parametrize("text,want", EN)
def test_english(text: str, want: str) -> None:
    assert make_speakable(text, "en") == want


@pytest.mark.parametrize("text,want", DE)
def test_german(text: str, want: str) -> None:
    assert make_speakable(text, "de") == want


@pytest.mark.parametrize("text,want", FR)
def test_french(text: str, want: str) -> None:
    assert make_speakable(text, "fr") == want


@pytest.mark.parametrize("lang,cases", [("en", EN), ("de", DE), ("fr", FR)])
def test_nothing_unspoken_is_left(lang: str, cases: list[tuple[str, str]]) -> None:
    for text, _ in cases:
        assert has_unspoken(make_speakable(text, lang)) is None, text


def test_other_num2words_languages_get_their_numbers_spelt_out() -> None:
    assert make_speakable("Tengo 3 gatos y 1.500 libros.", "es") == (
        "Tengo tres gatos y mil quinientos libros.")
    assert make_speakable("Ik heb 2,5 katten.", "nl") == "Ik heb twee komma vijf katten."


@pytest.mark.parametrize("text,reason", [
    ("Try this:\n```python\nprint(1)\n```", "unspeakable_code"),
    ("Use `x = f(y)` here.", "unspeakable_code"),
    ("def f(x):\n    return x;\nclass A {}", "unspeakable_code"),
    ("| Plan | Price |\n|------|-------|\n| Basic | $15 |", "unspeakable_table"),
    ("Solve $x^2 + 1 = 0$ now.", "unspeakable_math"),
    ("Then \\frac{a}{b} follows.", "unspeakable_math"),
    ("E = mc² is famous.", "unspeakable_math"),
    ("The integral ∫ f dx.", "unspeakable_math"),
])
def test_unspeakable(text: str, reason: str) -> None:
    got = unspeakable(text)
    assert got is not None and got[0] == reason


@pytest.mark.parametrize("text", [
    "Just run `pip install speechmill` first.", "The flat has 60 m² and a 2 km walk.",
    "Two plus two is four.", "Costs $5 (plus tax).",
])
def test_speakable_text_is_not_rejected(text: str) -> None:
    assert unspeakable(text) is None


def test_sentences_split_long_answers() -> None:
    text = ("Short one. Then a question? " + "A clause that goes on, " * 12
            + "and finally ends.")
    got = sentences(text, max_chars=80)
    assert got[:2] == ["Short one.", "Then a question?"]
    assert all(len(s) <= 80 for s in got)
    assert " ".join(got) == text


@pytest.mark.parametrize("text,problem", [
    ("It costs 5 dollars.", "digits"), ("See www.example.com", "URL"),
    ("- a list item", "markdown"), ("A **bold** claim", "markdown"),
    ("It is nice (really).", "parentheses"), ("Fifty %", "symbols"),
])
def test_has_unspoken(text: str, problem: str) -> None:
    got = has_unspoken(text)
    assert got is not None and problem in got
