"""Per-language words for :mod:`speechmill.synth.text.speakable` (English, German, French).

Numbers, ordinals, years and currency names come from ``num2words``; what no maintained
library provides (unit names, common abbreviations, month names, the words joining a
time or a range) is listed here. Other ``num2words`` languages get numbers spelt out
and nothing else (see :func:`lang_data`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: unit symbol -> (singular, plural, grammatical gender of the noun: m / f / n)
Units = dict[str, tuple[str, str, str]]


@dataclass(frozen=True)
class LangData:
    code: str
    decimal: str  # decimal separator the language writes ("." or ",")
    percent: str
    degrees: tuple[str, str]
    and_word: str  # joins currency units and their cents
    range_word: str  # "10-20" -> "ten to twenty"
    units: Units = field(default_factory=dict)
    abbreviations: tuple[tuple[str, str], ...] = ()
    months: tuple[str, ...] = ()
    month_abbr: tuple[str, ...] = ()
    #: words after which a four-digit number is read as a year
    year_context: tuple[str, ...] = ()
    symbols: tuple[tuple[str, str], ...] = ()
    scales: tuple[str, ...] = ()  # "$5 million" -> "five million dollars"
    #: "No. 5" -> "number five": the abbreviations of "number" (before a digit only)
    number_abbr: tuple[str, ...] = ()
    number_word: str = ""
    #: titles ("Dr.", "Mme"): expanded only before a capitalised name
    titles: tuple[str, ...] = ()
    #: currency code -> ((unit singular, plural), (cent singular, plural)) when num2words
    #: has none
    currencies: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = field(
        default_factory=dict)


EN = LangData(
    code="en", decimal=".", percent="percent", degrees=("degree", "degrees"),
    and_word="and", range_word="to",
    units={
        "km/h": ("kilometer per hour", "kilometers per hour", "m"),
        "mph": ("mile per hour", "miles per hour", "m"),
        "km²": ("square kilometer", "square kilometers", "m"),
        "m²": ("square meter", "square meters", "m"),
        "m³": ("cubic meter", "cubic meters", "m"),
        "km": ("kilometer", "kilometers", "m"), "cm": ("centimeter", "centimeters", "m"),
        "mm": ("millimeter", "millimeters", "m"), "m": ("meter", "meters", "m"),
        "mi": ("mile", "miles", "m"), "ft": ("foot", "feet", "m"),
        "kg": ("kilogram", "kilograms", "m"), "mg": ("milligram", "milligrams", "m"),
        "g": ("gram", "grams", "m"), "lbs": ("pound", "pounds", "m"),
        "lb": ("pound", "pounds", "m"), "oz": ("ounce", "ounces", "m"),
        "ml": ("milliliter", "milliliters", "m"), "mL": ("milliliter", "milliliters", "m"),
        "l": ("liter", "liters", "m"), "L": ("liter", "liters", "m"),
        "°C": ("degree Celsius", "degrees Celsius", "m"),
        "°F": ("degree Fahrenheit", "degrees Fahrenheit", "m"),
        "TB": ("terabyte", "terabytes", "m"), "GB": ("gigabyte", "gigabytes", "m"),
        "MB": ("megabyte", "megabytes", "m"), "KB": ("kilobyte", "kilobytes", "m"),
        "kB": ("kilobyte", "kilobytes", "m"),
        "GHz": ("gigahertz", "gigahertz", "m"), "MHz": ("megahertz", "megahertz", "m"),
        "kHz": ("kilohertz", "kilohertz", "m"), "Hz": ("hertz", "hertz", "m"),
        "kWh": ("kilowatt hour", "kilowatt hours", "m"), "kW": ("kilowatt", "kilowatts", "m"),
        "W": ("watt", "watts", "m"), "V": ("volt", "volts", "m"),
        "mAh": ("milliamp hour", "milliamp hours", "m"),
        "ms": ("millisecond", "milliseconds", "m"), "min": ("minute", "minutes", "m"),
        "hrs": ("hour", "hours", "m"), "hr": ("hour", "hours", "m"),
        "h": ("hour", "hours", "m"), "sec": ("second", "seconds", "m"),
        "s": ("second", "seconds", "m"),
    },
    abbreviations=(
        ("e.g.", "for example"), ("i.e.", "that is"), ("etc.", "et cetera"),
        ("vs.", "versus"), ("approx.", "approximately"), ("Dr.", "Doctor"),
        ("Mr.", "Mister"), ("Mrs.", "Missus"), ("Ms.", "Miz"), ("Prof.", "Professor"),
        ("Jr.", "Junior"), ("Sr.", "Senior"),
        ("Ave.", "Avenue"), ("Blvd.", "Boulevard"), ("Dept.", "Department"),
        ("Inc.", "Incorporated"), ("Ltd.", "Limited"), ("Co.", "Company"),
        ("w/o", "without"), ("w/", "with"), ("FAQ", "F A Q"), ("ASAP", "as soon as possible"),
        ("DIY", "do it yourself"), ("ETA", "E T A"), ("approx", "approximately"),
    ),
    months=("January", "February", "March", "April", "May", "June", "July", "August",
            "September", "October", "November", "December"),
    month_abbr=("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct",
                "Nov", "Dec"),
    year_context=("in", "since", "of", "by", "from", "until", "till", "year",
                  "before", "after", "during", "around", "circa", "early", "late", "mid"),
    symbols=(("&", " and "), ("+", " plus "), ("=", " equals "), ("×", " times "),
             ("÷", " divided by "), ("@", " at "), ("≈", " about "), ("~", " about "),
             ("<", " less than "), (">", " more than "), ("≤", " at most "),
             ("≥", " at least "), ("°", " degrees "), ("#", " number ")),
    scales=("thousand", "million", "billion", "trillion"),
    number_abbr=("No.", "no.", "Nr."), number_word="number",
    titles=("Dr.", "Mr.", "Mrs.", "Ms.", "Prof."),
    currencies={"JPY": (("yen", "yen"), None), "CHF": (("Swiss franc", "Swiss francs"),
                                                      ("centime", "centimes")),
                "GBP": (("pound", "pounds"), ("penny", "pence")),
                "EUR": (("euro", "euros"), ("cent", "cents"))},
)

DE = LangData(
    code="de", decimal=",", percent="Prozent", degrees=("Grad", "Grad"),
    and_word="und", range_word="bis",
    units={
        "km/h": ("Kilometer pro Stunde", "Kilometer pro Stunde", "m"),
        "km²": ("Quadratkilometer", "Quadratkilometer", "m"),
        "m²": ("Quadratmeter", "Quadratmeter", "m"),
        "m³": ("Kubikmeter", "Kubikmeter", "m"),
        "km": ("Kilometer", "Kilometer", "m"), "cm": ("Zentimeter", "Zentimeter", "m"),
        "mm": ("Millimeter", "Millimeter", "m"), "m": ("Meter", "Meter", "m"),
        "kg": ("Kilogramm", "Kilogramm", "n"), "mg": ("Milligramm", "Milligramm", "n"),
        "g": ("Gramm", "Gramm", "n"), "ml": ("Milliliter", "Milliliter", "m"),
        "l": ("Liter", "Liter", "m"), "L": ("Liter", "Liter", "m"),
        "°C": ("Grad Celsius", "Grad Celsius", "n"),
        "TB": ("Terabyte", "Terabyte", "n"), "GB": ("Gigabyte", "Gigabyte", "n"),
        "MB": ("Megabyte", "Megabyte", "n"), "kB": ("Kilobyte", "Kilobyte", "n"),
        "GHz": ("Gigahertz", "Gigahertz", "n"), "MHz": ("Megahertz", "Megahertz", "n"),
        "Hz": ("Hertz", "Hertz", "n"),
        "kWh": ("Kilowattstunde", "Kilowattstunden", "f"), "kW": ("Kilowatt", "Kilowatt", "n"),
        "W": ("Watt", "Watt", "n"), "V": ("Volt", "Volt", "n"),
        "Std.": ("Stunde", "Stunden", "f"), "Min.": ("Minute", "Minuten", "f"),
        "Sek.": ("Sekunde", "Sekunden", "f"), "ms": ("Millisekunde", "Millisekunden", "f"),
        "min": ("Minute", "Minuten", "f"), "h": ("Stunde", "Stunden", "f"),
        "s": ("Sekunde", "Sekunden", "f"),
    },
    abbreviations=(
        ("z.B.", "zum Beispiel"), ("z. B.", "zum Beispiel"), ("d.h.", "das heißt"),
        ("d. h.", "das heißt"), ("usw.", "und so weiter"), ("bzw.", "beziehungsweise"),
        ("ca.", "circa"), ("u.a.", "unter anderem"), ("u. a.", "unter anderem"),
        ("etc.", "et cetera"), ("evtl.", "eventuell"), ("ggf.", "gegebenenfalls"),
        ("inkl.", "inklusive"), ("zzgl.", "zuzüglich"), ("vgl.", "vergleiche"),
        ("Dr.", "Doktor"), ("Prof.", "Professor"), ("Str.", "Straße"),
        ("Hr.", "Herr"), ("Fr.", "Frau"), ("bspw.", "beispielsweise"), ("sog.", "so genannte"),
        ("max.", "maximal"), ("min.", "mindestens"), ("mind.", "mindestens"),
        ("Mio.", "Millionen"), ("Mrd.", "Milliarden"), ("Tsd.", "Tausend"),
    ),
    months=("Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August",
            "September", "Oktober", "November", "Dezember"),
    month_abbr=("Jan", "Feb", "Mär", "Apr", "Mai", "Jun", "Jul", "Aug", "Sep", "Okt",
                "Nov", "Dez"),
    year_context=("im", "seit", "bis", "von", "ab", "jahr", "jahre", "um", "vor", "nach",
                  "anno"),
    symbols=(("&", " und "), ("+", " plus "), ("=", " gleich "), ("×", " mal "),
             ("÷", " geteilt durch "), ("@", " at "), ("≈", " ungefähr "),
             ("~", " ungefähr "), ("<", " weniger als "), (">", " mehr als "),
             ("≤", " höchstens "), ("≥", " mindestens "), ("°", " Grad "),
             ("#", " Nummer ")),
    scales=("Tausend", "Million", "Millionen", "Milliarde", "Milliarden", "Mio.", "Mrd."),
    number_abbr=("Nr.",), number_word="Nummer",
    titles=("Dr.", "Prof.", "Hr.", "Fr."),
    currencies={"JPY": (("Yen", "Yen"), None), "CHF": (("Franken", "Franken"),
                                                      ("Rappen", "Rappen")),
                "INR": (("Rupie", "Rupien"), None)},
)

FR = LangData(
    code="fr", decimal=",", percent="pour cent", degrees=("degré", "degrés"),
    and_word="et", range_word="à",
    units={
        "km/h": ("kilomètre par heure", "kilomètres par heure", "m"),
        "km²": ("kilomètre carré", "kilomètres carrés", "m"),
        "m²": ("mètre carré", "mètres carrés", "m"),
        "m³": ("mètre cube", "mètres cubes", "m"),
        "km": ("kilomètre", "kilomètres", "m"), "cm": ("centimètre", "centimètres", "m"),
        "mm": ("millimètre", "millimètres", "m"), "m": ("mètre", "mètres", "m"),
        "kg": ("kilogramme", "kilogrammes", "m"), "mg": ("milligramme", "milligrammes", "m"),
        "g": ("gramme", "grammes", "m"), "ml": ("millilitre", "millilitres", "m"),
        "l": ("litre", "litres", "m"), "L": ("litre", "litres", "m"),
        "°C": ("degré Celsius", "degrés Celsius", "m"),
        "To": ("téraoctet", "téraoctets", "m"), "Go": ("gigaoctet", "gigaoctets", "m"),
        "Mo": ("mégaoctet", "mégaoctets", "m"), "Ko": ("kilooctet", "kilooctets", "m"),
        "GHz": ("gigahertz", "gigahertz", "m"), "MHz": ("mégahertz", "mégahertz", "m"),
        "Hz": ("hertz", "hertz", "m"),
        "kWh": ("kilowattheure", "kilowattheures", "m"), "kW": ("kilowatt", "kilowatts", "m"),
        "W": ("watt", "watts", "m"), "V": ("volt", "volts", "m"),
        "ms": ("milliseconde", "millisecondes", "f"), "min": ("minute", "minutes", "f"),
        "s": ("seconde", "secondes", "f"),
    },
    abbreviations=(
        ("p. ex.", "par exemple"), ("p.ex.", "par exemple"), ("c.-à-d.", "c'est-à-dire"),
        ("c-à-d", "c'est-à-dire"), ("etc.", "et cetera"), ("env.", "environ"),
        ("M.", "Monsieur"), ("MM.", "Messieurs"), ("Mme", "Madame"), ("Mlle", "Mademoiselle"),
        ("Dr", "Docteur"), ("Pr", "Professeur"),
        ("av.", "avenue"), ("bd", "boulevard"), ("cf.", "voir"), ("svp", "s'il vous plaît"),
        ("SVP", "s'il vous plaît"), ("min.", "minimum"), ("max.", "maximum"),
    ),
    months=("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
            "septembre", "octobre", "novembre", "décembre"),
    month_abbr=("janv", "févr", "mars", "avr", "mai", "juin", "juil", "août", "sept", "oct",
                "nov", "déc"),
    year_context=("en", "depuis", "de", "jusqu'en", "année", "vers", "avant", "après"),
    symbols=(("&", " et "), ("+", " plus "), ("=", " égale "), ("×", " fois "),
             ("÷", " divisé par "), ("@", " arobase "), ("≈", " environ "),
             ("~", " environ "), ("<", " moins de "), (">", " plus de "),
             ("≤", " au plus "), ("≥", " au moins "), ("°", " degrés "),
             ("#", " numéro ")),
    scales=("mille", "million", "millions", "milliard", "milliards"),
    number_abbr=("No", "no", "N°", "n°"), number_word="numéro",
    titles=("M.", "MM.", "Mme", "Mlle", "Dr", "Pr"),
    currencies={"JPY": (("yen", "yens"), None), "CHF": (("franc suisse", "francs suisses"),
                                                       ("centime", "centimes"))},
)

LANGS: dict[str, LangData] = {"en": EN, "de": DE, "fr": FR}


def lang_data(code: str) -> LangData:
    """The word lists of ``code``; a ``num2words`` language without lists gets empty
    ones (its numbers are still spelt out, with the decimal separator it writes)."""
    base = code.split("-")[0].split("_")[0].lower()
    if base in LANGS:
        return LANGS[base]
    decimal = "," if base in _DECIMAL_COMMA else "."
    return LangData(code=base, decimal=decimal, percent="%", degrees=("°", "°"),
                    and_word="", range_word="-")


#: languages that write "1.500,5" (or "1 500,5"): a decimal comma
_DECIMAL_COMMA = frozenset({
    "es", "it", "pt", "nl", "pl", "ru", "uk", "be", "cs", "sk", "sl", "hr", "sr", "bs", "mk",
    "bg", "ro", "hu", "da", "no", "nb", "nn", "sv", "fi", "is", "et", "lv", "lt", "tr", "az",
    "kk", "ka", "el", "id", "vi", "ca", "eu", "gl"
})
