"""Translation corpora: an offline default corpus generated from CLDR data (via Babel), TSV I/O, splits.

The generated corpus is a function: every source string has exactly one target. Where CLDR renders
two different things identically in the source language (English medium and long dates of May;
"May" as a wide and as an abbreviated month name), the target is chosen by construction: the
highest-priority format that renders the same source supplies it, and a static name that means two
different things ("Nauru": a country and a language) is dropped. Sources are compared as they are
written (normalize_source: French long "440 ans" and short "440\xa0ans" are one source).
generate_corpus checks the result.
"""

from __future__ import annotations

import codecs
import datetime as dt
import hashlib
import math
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field, replace
from decimal import Decimal
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import babel
from babel import Locale, UnknownLocaleError, dates, numbers, units

from nmtserve.normalize import is_blank, normalize_source
from nmtserve.settings import flag


class CorpusError(ValueError):
    """A corpus that cannot be had: a user file that is malformed (the message names the file and line), or a built-in
    corpus its locales cannot make."""


@dataclass
class CorpusSettings:
    """The built-in corpus: what `nmtserve corpus` writes, and `nmtserve train` generates from the same values."""

    corpus_size: int = field(default=200_000, metadata={"help": "pairs to generate, all splits together"})
    source_lang: str = field(default="en", metadata={"help": "source locale (any Babel locale)"})
    target_lang: str = field(default="de", metadata={"help": "target locale (any Babel locale); one per corpus directory"})
    seed: int = field(default=0, metadata={"help": "seed of the generation and the shuffle: the same seed, the same corpus"})
    valid_size: int = field(default=1000, metadata={"help": "pairs held out for validation"})
    test_size: int = field(default=1000, metadata={"help": "pairs held out for the final test"})

    def problems(self) -> list[str]:
        """What is wrong with the settings, one sentence per problem, named by their flags (empty when they can generate)."""
        found = [f"{flag(name)} must be at least 1" for name in ("corpus_size", "valid_size", "test_size") if getattr(self, name) < 1]
        if self.corpus_size <= self.valid_size + self.test_size:
            found.append(f"--corpus-size {self.corpus_size} leaves no training pairs after --valid-size {self.valid_size} "
                         f"and --test-size {self.test_size}")
        targets = target_languages(self.target_lang)
        for name, tag in [("--source-lang", self.source_lang), *(("--target-lang", target) for target in targets)]:
            try:
                _locale(tag)
            except ValueError as error:
                found.append(f"{name}: {error} (a Babel locale such as de, fr_CA or zh_Hant)")
        if len(set(targets)) != len(targets):
            found.append(f"--target-lang {self.target_lang}: a language is named twice")
        return found

    def splits(self) -> Splits:
        """The corpus, generated and split into train / valid / test."""
        pairs = generate_corpus(self.corpus_size, source_lang=self.source_lang, target_lang=self.target_lang, seed=self.seed)
        return split_corpus(pairs, valid_size=self.valid_size, test_size=self.test_size)


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    category: str
    language: str = ""  # the target's locale, in a corpus of several target languages ("" in one of one)
    line: int = field(default=0, compare=False)  # its line in the TSV file it was read from (0: generated)


@dataclass(frozen=True)
class Splits:
    train: list[Pair]
    valid: list[Pair]
    test: list[Pair]


CATEGORIES: tuple[str, ...] = (
    "date", "time", "weekday", "month", "number", "percent", "currency", "unit", "territory", "language",
    "phrase-date", "phrase-time", "phrase-weekday", "phrase-month", "phrase-currency", "phrase-percent",
    "phrase-unit", "phrase-number", "phrase-territory", "phrase-language",
)  # fmt: skip


class _Text(NamedTuple):
    source: str
    target: str
    value: object  # what was rendered: phrase grammar may depend on it (Spanish "a la 1:30")


@dataclass(frozen=True)
class _Slot:
    """A finite space of renderings: render(i) for i in range(size), None where CLDR has none."""

    size: int
    render: Callable[[int], _Text | None]


_Formats = tuple[Callable[..., str], ...]
_Kind = tuple[str, int, _Slot]  # (category, weight, slot): one kind of pair, drawn in proportion to its weight

# Formats of one value, highest priority first: where two render the same source text, the first
# one's target is used (English "May 16, 2003" is medium and long; German "16. Mai 2003" is long).
_DATE_WIDTHS = ("full", "long", "medium", "short")
_DATE_FORMATS = tuple(partial(dates.format_date, format=w) for w in _DATE_WIDTHS)
_TIME_FORMATS = tuple(partial(dates.format_time, format=w) for w in ("short", "medium"))
_WEEKDAY_DATE_FORMATS = tuple(partial(dates.format_skeleton, s) for s in ("MMMEd", "MEd", "Ed"))
_MONTH_YEAR_FORMATS = tuple(partial(dates.format_skeleton, s) for s in ("yMMMM", "yMMM"))
_MONTH_DAY_FORMATS = tuple(partial(dates.format_skeleton, s) for s in ("MMMMd", "MMMd"))
_NUMBER_FORMATS = (numbers.format_decimal,)
_PERCENT_FORMATS = (partial(numbers.format_percent, decimal_quantization=False),)  # keep "48.5%"
_UNIT_WIDTHS = ("long", "short", "narrow")

_FIRST_DAY, _LAST_DAY = dt.date(1900, 1, 1), dt.date(2099, 12, 31)
# Two-digit years ("5/16/03") are only generated for 1950-2049, so that they name one year.
_CENTURY = (dt.date(1950, 1, 1), dt.date(2049, 12, 31))
# The calendar repeats every 28 years within 1901-2099: these hold every weekday/month/day combination.
_CYCLE = (dt.date(2000, 1, 1), dt.date(2027, 12, 31))
_LEAP_YEAR = (dt.date(2000, 1, 1), dt.date(2000, 12, 31))

_CURRENCIES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "CNY", "INR", "BRL", "MXN", "SEK")
_UNITS = (
    "length-kilometer", "length-meter", "length-centimeter", "length-millimeter", "length-mile",
    "length-foot", "length-inch", "mass-kilogram", "mass-gram", "mass-pound", "duration-hour",
    "duration-minute", "duration-second", "duration-day", "duration-week", "duration-month",
    "duration-year", "temperature-celsius", "temperature-fahrenheit", "volume-liter",
    "volume-milliliter", "speed-kilometer-per-hour", "speed-mile-per-hour", "area-square-meter",
    "area-square-kilometer", "area-hectare", "digital-megabyte", "digital-gigabyte",
    "energy-kilowatt-hour", "power-watt",
)  # fmt: skip
_DISTANCES = ("length-kilometer", "length-meter", "length-mile")
_UNIT_VALUES = 1999  # integers 1..1000, then tenths 0.1..99.9
# Numbers in every plural category of common locales: unit patterns are compared on these.
_PLURAL_PROBES = (0, 1, 2, 3, 5, 11, 21, 100, Decimal("1.5"))

# Countries named without an article in German and Spanish ("nach Deutschland", "hasta Alemania").
# French needs the gender: "en Allemagne", "de l'Allemagne", but "au Japon", "du Japon".
_COUNTRIES = frozenset({
    "AR", "AT", "AU", "BR", "CA", "CL", "CN", "DE", "DK", "EG", "ES", "FI", "FR", "GR", "HU", "IE",
    "IT", "JP", "LU", "MA", "MX", "NO", "PL", "PT", "RU", "SE",
})  # fmt: skip
_FR_MASCULINE = frozenset({"BR", "CA", "CL", "DK", "JP", "LU", "MA", "MX", "PT"})

# (category, weight, English template, target templates). Slot names are the keys of the phrase
# slots in _kinds; {las}, {au} and {du} are words that agree with a slot value (see _grammar).
_PHRASE_LANGUAGES = ("de", "fr", "es")
_PHRASES = (
    ("phrase-date", 3, "on {date}", ("am {date}", "le {date}", "el {date}")),
    ("phrase-date", 3, "The contract was signed on {date}.", (
        "Der Vertrag wurde am {date} unterschrieben.",
        "Le contrat a été signé le {date}.",
        "El contrato se firmó el {date}.")),
    ("phrase-time", 2, "the meeting starts at {time}", (
        "das Treffen beginnt um {time}",
        "la réunion commence à {time}",
        "la reunión empieza a {las} {time}")),
    ("phrase-time", 2, "The train leaves at {time}.", (
        "Der Zug fährt um {time} ab.", "Le train part à {time}.", "El tren sale a {las} {time}.")),
    ("phrase-weekday", 4, "every {weekday} at {time}", (
        "jeden {weekday} um {time}", "chaque {weekday} à {time}", "cada {weekday} a {las} {time}")),
    ("phrase-month", 4, "The shop opens in {month}.", (
        "Der Laden öffnet im {month}.", "Le magasin ouvre en {month}.", "La tienda abre en {month}.")),
    ("phrase-currency", 2, "It costs {currency}.", (
        "Es kostet {currency}.", "Cela coûte {currency}.", "Cuesta {currency}.")),
    ("phrase-currency", 2, "The price is {currency}.", (
        "Der Preis beträgt {currency}.", "Le prix est de {currency}.", "El precio es de {currency}.")),
    ("phrase-percent", 2, "{percent} of the votes", (
        "{percent} der Stimmen", "{percent} des voix", "el {percent} de los votos")),
    ("phrase-percent", 2, "Prices rose by {percent}.", (
        "Die Preise stiegen um {percent}.",
        "Les prix ont augmenté de {percent}.",
        "Los precios subieron un {percent}.")),
    ("phrase-unit", 4, "{distance} to {country}", (
        "{distance} bis nach {country}", "{distance} jusqu'{au} {country}", "{distance} hasta {country}")),
    ("phrase-number", 4, "The population of {country} is {integer}.", (
        "Die Einwohnerzahl von {country} beträgt {integer}.",
        "La population {du}{country} est de {integer}.",
        "La población de {country} es de {integer}.")),
    # Names are a closed list, each appearing once standalone: labelled, they appear a second time,
    # so a name held out in one form was still learnt in the other.
    ("phrase-territory", 2, "Region: {territory}", ("Region: {territory}", "Région : {territory}", "Región: {territory}")),
    ("phrase-language", 2, "Language: {language}", ("Sprache: {language}", "Langue : {language}", "Idioma: {language}")),
)  # fmt: skip


def _render(value: object, formats: _Formats, k: int, src: Locale, tgt: Locale) -> _Text:
    """Render value in formats[k]; the first format rendering the same source, as written, supplies the target."""
    source = formats[k](value, locale=src)
    written = normalize_source(source)
    for fmt in formats[:k]:
        if normalize_source(fmt(value, locale=src)) == written:
            return _Text(source, fmt(value, locale=tgt), value)
    return _Text(source, formats[k](value, locale=tgt), value)


def _slot(formats: _Formats, k: int, size: int, value_of: Callable, src: Locale, tgt: Locale) -> _Slot:
    return _Slot(size, lambda i: _render(value_of(i), formats, k, src, tgt))


def _format_slots(formats: _Formats, size: int, value_of: Callable, src: Locale, tgt: Locale) -> list[_Slot]:
    """One slot per format, all over the same values."""
    return [_slot(formats, k, size, value_of, src, tgt) for k in range(len(formats))]


def _days(first: dt.date, last: dt.date) -> tuple[int, Callable[[int], dt.date]]:
    return (last - first).days + 1, lambda i: first + dt.timedelta(i)


def _second(i: int) -> dt.time:
    return dt.time(i // 3600, i // 60 % 60, i % 60)


def _month_start(i: int) -> dt.date:
    return dt.date(1900 + i // 12, i % 12 + 1, 1)


def _concat(*slots: _Slot) -> _Slot:
    """The renderings of all the slots, one after the other."""

    def render(i: int) -> _Text | None:
        for slot in slots:
            if i < slot.size:
                return slot.render(i)
            i -= slot.size
        raise IndexError(i)

    return _Slot(sum(s.size for s in slots), render)


def _list_slot(texts: list[_Text]) -> _Slot:
    return _Slot(len(texts), texts.__getitem__)


def _amount(i: int, digits: int, decimals: int) -> Decimal:
    """Decode i into a number of up to `digits` integer digits, each length equally likely."""
    length, rest = i % digits + 1, i // digits
    whole, fraction = rest % 10**length, rest // 10**length % 10**decimals
    return Decimal(whole * 10**decimals + fraction).scaleb(-decimals)


@lru_cache(maxsize=None)
def _names(src: Locale, tgt: Locale) -> dict[tuple[str, str | None], list[_Text]]:
    """Static CLDR names by (category, width); a name is kept once, under its highest-priority width,
    and dropped if it names two different things."""
    entries = []  # (category, width, key, source, target), highest priority first
    for width in ("wide", "abbreviated", "short"):  # narrow ones ("M", "T") are ambiguous by nature
        s, t = (dates.get_day_names(width, "stand-alone", loc) for loc in (src, tgt))
        entries += [("weekday", width, k, s[k], t[k]) for k in sorted(s)]
    for width in ("wide", "abbreviated"):
        s, t = (dates.get_month_names(width, "stand-alone", loc) for loc in (src, tgt))
        entries += [("month", width, k, s[k], t[k]) for k in sorted(s)]
    for category, s, t in (
        ("territory", src.territories, tgt.territories),
        ("language", src.languages, tgt.languages),
    ):
        entries += [(category, None, k, s[k], t[k]) for k in sorted(s) if t.get(k)]
    first: dict[str, tuple] = {}  # source as written -> its highest-priority entry
    ambiguous = set()
    for category, width, key, source, target in entries:
        written = normalize_source(source)
        seen = first.setdefault(written, (category, width, key, source, target))
        if (seen[0], seen[2]) != (category, key):
            ambiguous.add(written)
    table: dict[tuple[str, str | None], list[_Text]] = {}
    for written, (category, width, key, source, target) in first.items():
        if written not in ambiguous:
            table.setdefault((category, width), []).append(_Text(source, target, key))
    return table


@lru_cache(maxsize=None)
def _ambiguous_units(src: Locale) -> frozenset[tuple[str, str]]:
    """(unit, width) whose source text another unit renders too (English narrow "12m": meters, minutes)."""
    rendered_by: dict[str, tuple[str, str]] = {}
    ambiguous = set()
    for unit in _UNITS:
        for width in _UNIT_WIDTHS:
            for value in _PLURAL_PROBES:
                text = normalize_source(units.format_unit(value, unit, width, locale=src))
                other = rendered_by.setdefault(text, (unit, width))
                if other[0] != unit:
                    ambiguous |= {(unit, width), other}
    return frozenset(ambiguous)


def _unit_slot(unit_ids: tuple[str, ...], src: Locale, tgt: Locale) -> _Slot:
    formats = {
        u: tuple(partial(units.format_unit, measurement_unit=u, length=w) for w in _UNIT_WIDTHS)
        for u in unit_ids
    }
    ambiguous = _ambiguous_units(src)

    def render(i: int) -> _Text | None:
        i, n = divmod(i, len(unit_ids))
        unit, (i, k) = unit_ids[n], divmod(i, len(_UNIT_WIDTHS))
        if (unit, _UNIT_WIDTHS[k]) in ambiguous:
            return None
        value = Decimal(i + 1) if i < 1000 else Decimal(i - 999) / 10
        text = _render(value, formats[unit], k, src, tgt)
        # Babel writes "12 length-kilometer" where CLDR lacks a pattern (German narrow units).
        return None if unit in text.source or unit in text.target else text

    return _Slot(len(unit_ids) * len(_UNIT_WIDTHS) * _UNIT_VALUES, render)


def _currency_slot(src: Locale, tgt: Locale) -> _Slot:
    formats = {
        c: tuple(partial(numbers.format_currency, currency=c, format_type=t) for t in ("standard", "name"))
        for c in _CURRENCIES
    }

    def render(i: int) -> _Text:
        i, n = divmod(i, len(_CURRENCIES))
        currency, (i, k) = _CURRENCIES[n], divmod(i, 2)
        amount = _amount(i, 6, numbers.get_currency_precision(currency))  # no cents for yen
        return _render(amount, formats[currency], k, src, tgt)

    return _Slot(len(_CURRENCIES) * 2 * 6 * 10**8, render)


def _date_slot(k: int, src: Locale, tgt: Locale) -> _Slot:
    two_digit_year = re.search(r"(?<!y)yy(?!y)", dates.get_date_format(_DATE_WIDTHS[k], src).pattern)
    days = _days(*_CENTURY) if two_digit_year else _days(_FIRST_DAY, _LAST_DAY)
    return _slot(_DATE_FORMATS, k, *days, src, tgt)


def _grammar(texts: dict[str, _Text]) -> dict[str, str]:
    """Words of the phrase targets that agree with a slot value."""
    words = {}
    if "time" in texts:  # Spanish: "a la 1:30" but "a las 2:30", "a las 13:30"
        words["las"] = "la" if texts["time"].value.hour == 1 else "las"
    if "country" in texts:  # French: "en/de l'Allemagne", "en/de la France", "au/du Japon"
        masculine = texts["country"].value in _FR_MASCULINE
        words["au"] = "au" if masculine else "en"
        words["du"] = "du " if masculine else "de l'" if texts["country"].target[0] in "AEIOUÉ" else "de la "
    return words


def _phrase_slot(template: str, target_template: str, slots: dict[str, _Slot]) -> _Slot:
    names = re.findall(r"{(\w+)}", template)

    def render(i: int) -> _Text | None:
        texts = {}
        for name in names:
            i, j = divmod(i, slots[name].size)
            if (text := slots[name].render(j)) is None:
                return None
            texts[name] = text
        source = template.format(**{n: t.source for n, t in texts.items()})
        target = target_template.format(**{n: t.target for n, t in texts.items()}, **_grammar(texts))
        return _Text(source, target, None)

    return _Slot(math.prod(slots[n].size for n in names), render)


@lru_cache(maxsize=None)
def _kinds(src: Locale, tgt: Locale) -> tuple[_Kind, ...]:
    """(category, weight, slot) of every kind of pair. Phrases fill their slots from the very slots of
    the standalone categories, so a value is rendered the same inside and outside a phrase."""
    names = _names(src, tgt)
    all_dates = [_date_slot(k, src, tgt) for k in range(len(_DATE_FORMATS))]
    short_time = _slot(_TIME_FORMATS, 0, 1440, lambda i: dt.time(i // 60, i % 60), src, tgt)
    medium_time = _slot(_TIME_FORMATS, 1, 86400, _second, src, tgt)
    weekday_names = [_list_slot(names.get(("weekday", w), [])) for w in ("wide", "abbreviated", "short")]
    month_names = [_list_slot(names.get(("month", w), [])) for w in ("wide", "abbreviated")]
    month_years = _format_slots(_MONTH_YEAR_FORMATS, 2400, _month_start, src, tgt)
    integer = _slot(_NUMBER_FORMATS, 0, 7 * 10**7, lambda i: _amount(i, 7, 0), src, tgt)
    percent = _slot(_PERCENT_FORMATS, 0, 1001, lambda i: Decimal(i) / 1000, src, tgt)  # 0%, 0.1%..100%
    currency = _currency_slot(src, tgt)
    territories = names.get(("territory", None), [])
    languages = names.get(("language", None), [])
    kinds = [
        *(("date", 4, slot) for slot in all_dates),
        ("time", 4, short_time),
        ("time", 2, medium_time),
        ("weekday", 1, _concat(*weekday_names)),
        ("weekday", 3, _concat(*_format_slots(_WEEKDAY_DATE_FORMATS, *_days(*_CYCLE), src, tgt))),
        ("month", 1, _concat(*month_names)),
        ("month", 2, _concat(*month_years)),
        ("month", 1, _concat(*_format_slots(_MONTH_DAY_FORMATS, *_days(*_LEAP_YEAR), src, tgt))),
        ("number", 4, integer),
        ("number", 4, _slot(_NUMBER_FORMATS, 0, 5 * 10**7, lambda i: _amount(i, 5, 2), src, tgt)),
        ("percent", 4, percent),
        ("currency", 8, currency),
        ("unit", 8, _unit_slot(_UNITS, src, tgt)),
        ("territory", 4, _list_slot(territories)),
        ("language", 4, _list_slot(languages)),
    ]
    if src.language == "en" and tgt.language in _PHRASE_LANGUAGES:
        phrase_slots = {
            "date": _concat(*all_dates),
            "time": short_time,
            "weekday": weekday_names[0],
            "month": _concat(month_names[0], month_years[0]),
            "currency": currency,
            "percent": percent,
            "distance": _unit_slot(_DISTANCES, src, tgt),
            "country": _list_slot([t for t in territories if t.value in _COUNTRIES]),
            "integer": integer,
            "territory": _list_slot(territories),
            "language": _list_slot(languages),
        }
        lang = _PHRASE_LANGUAGES.index(tgt.language)
        kinds += [(c, w, _phrase_slot(en, targets[lang], phrase_slots)) for c, w, en, targets in _PHRASES]
    return tuple(kinds)


def _shuffled(n: int, rng: random.Random) -> Iterator[int]:
    """range(n) in random order, lazily (sparse Fisher-Yates): a huge range costs only what is drawn."""
    moved: dict[int, int] = {}
    for i in range(n):
        j = rng.randrange(i, n)
        there, here = moved.get(j, j), moved.pop(i, i)
        if j != i:
            moved[j] = here
        yield there


def _apportion(n: int, weights: list[int]) -> list[int]:
    """Split n in proportion to weights (largest remainder; ties go to the earlier kind)."""
    exact = [n * w / sum(weights) for w in weights]
    quotas = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: quotas[i] - exact[i])[: n - sum(quotas)]:
        quotas[i] += 1
    return quotas


@lru_cache(maxsize=None)
def _locale(tag: str) -> Locale:
    try:
        return Locale.parse(tag.replace("-", "_"))
    except (ValueError, UnknownLocaleError) as exc:
        raise ValueError(f"unknown locale {tag!r}") from exc


def target_languages(target_lang: str) -> list[str]:
    """The target locales a --target-lang value names: one, or several separated by commas (a multilingual model)."""
    return [tag.strip() for tag in target_lang.split(",")]


def generate_corpus(
    size: int, *, target_lang: str = "de", source_lang: str = "en", seed: int = 0
) -> list[Pair]:
    """Generate `size` distinct translation pairs from Babel's CLDR data, deterministically; for several target
    locales ("de,fr"), `size` pairs shared evenly among them, each tagged with its target's locale."""
    if size < 0:
        raise ValueError(f"size must be >= 0, got {size}")
    targets = target_languages(target_lang)
    if len(targets) > 1:
        pairs = [
            replace(pair, language=target)
            for target, share in zip(targets, _apportion(size, [1] * len(targets)))
            for pair in generate_corpus(share, target_lang=target, source_lang=source_lang, seed=seed)
        ]
        random.Random(seed).shuffle(pairs)
        return pairs
    return _draw(_kinds(_locale(source_lang), _locale(target_lang)), size, seed=seed, source_lang=source_lang, target_lang=target_lang)


def _draw(kinds: Sequence[_Kind], size: int, *, seed: int, source_lang: str, target_lang: str) -> list[Pair]:
    """`size` distinct pairs drawn from the kinds, deterministically for a seed, in random order: each kind's share in
    proportion to its weight, its renderings without replacement. Raises CorpusError where the kinds hold fewer
    distinct sources than `size`, or give one source two targets; the messages name the corpus by its languages."""
    rng = random.Random(seed)
    # Each kind draws its renderings without replacement; one that runs out (there are only so many
    # weekday names) leaves its share to the others, and the loop ends when all have run out.
    streams = {
        k: (text for text in map(slot.render, _shuffled(slot.size, rng)) if text is not None)
        for k, (_, _, slot) in enumerate(kinds)
    }
    targets: dict[str, str] = {}  # the safety net: the corpus must stay a function of the source
    pairs: list[Pair] = []
    while len(pairs) < size and streams:
        quotas = _apportion(size - len(pairs), [kinds[k][1] for k in streams])
        for k, quota in zip(list(streams), quotas):
            while quota > 0:
                if (text := next(streams[k], None)) is None:
                    del streams[k]
                    break
                # Sources are written as people type them, CLDR's no-break spaces ("5:27\u202fPM") as plain spaces; targets
                # keep CLDR's exact characters ("94\xa0%"), which is what a translation must produce.
                source = normalize_source(text.source)
                known = targets.get(source)
                if known is None:
                    targets[source] = text.target
                    pairs.append(Pair(source, text.target, kinds[k][0]))
                    quota -= 1
                elif known != text.target:
                    raise CorpusError(f"the built-in {source_lang}->{target_lang} corpus cannot be made: CLDR writes "
                                      f"{source!r} for two things, translated {known!r} and {text.target!r} (a flaw of "
                                      "the generator for these locales: choose others, or give a --corpus file)")
    if len(pairs) < size:
        raise CorpusError(f"only {len(pairs)} distinct {source_lang}->{target_lang} pairs exist, not {size}")
    rng.shuffle(pairs)
    return pairs


# The rules a corpus is read and split by, recorded as the "split" of the corpus metadata of each checkpoint trained since
# they came in: read_tsv strict, and split_corpus grouping sources as the model reads them. Evaluate, plot, bench and
# --resume rebuild a checkpoint's splits by the rules it was trained with, and one without the record is older: it was
# read leniently and split by sources as written, and only those rules give back the test set it held out.
NORMALIZED_SPLIT = "normalized"


def cldr_problem(corpus: dict) -> str | None:
    """Why a checkpoint's built-in corpus cannot be made again here: it was generated from the CLDR data of another Babel
    release (None where it can, or the checkpoint recorded none)."""
    made_with = corpus.get("babel")
    if corpus.get("kind") != "cldr" or made_with is None or made_with == babel.__version__:
        return None
    return (f"the built-in corpus was generated with Babel {made_with}, and this machine has Babel {babel.__version__}, "
            f"whose CLDR data can make other pairs and splits: install the same (pip install 'babel=={made_with}')")


def normalized_split(corpus: dict) -> bool:
    """Whether a checkpoint's corpus metadata says its corpus was read and split by the current rules (NORMALIZED_SPLIT);
    False for one trained before they were recorded."""
    split = corpus.get("split")
    if split not in (None, NORMALIZED_SPLIT):
        raise CorpusError(f"the checkpoint's corpus was split by rules {split!r}, which this nmtserve does not know: "
                          "evaluate or resume it with the nmtserve that trained it")
    return split == NORMALIZED_SPLIT


def source_groups(pairs: list[Pair], *, normalized: bool = True) -> dict[str, list[int]]:
    """The indices of the pairs by source sentence, as split_corpus keeps them together (normalized: see there)."""
    copies: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        source = unicodedata.normalize("NFC", normalize_source(pair.source)) if normalized else pair.source
        copies.setdefault(source, []).append(i)
    return copies


def split_corpus(pairs: list[Pair], *, valid_size: int, test_size: int, normalized: bool = True) -> Splits:
    """Split pairs into train/valid/test so that no source sentence is in two splits: sources that differ only in white
    space, which the model never sees (normalize_source), or in Unicode composition ("é" as one character or two) are
    one sentence; with normalized=False, only identical sources are (the rule of checkpoints from before
    NORMALIZED_SPLIT)."""
    if valid_size < 0 or test_size < 0 or valid_size + test_size >= len(pairs):
        raise ValueError(
            f"valid_size={valid_size} and test_size={test_size} must be >= 0 "
            f"and leave training pairs among {len(pairs)}"
        )
    copies = source_groups(pairs, normalized=normalized)  # all copies of a source go to the same split
    # Hash order is stable across runs and machines and independent of the corpus order.
    room = {"test": test_size, "valid": valid_size}
    split_of: dict[int, str] = {}
    for source in sorted(copies, key=lambda s: hashlib.sha1(s.encode("utf-8")).digest()):
        group = copies[source]
        # A group too big for the room left moves on to the next split, so sizes are exact unless
        # repeated sources make that impossible.
        split = next((s for s, left in room.items() if len(group) <= left), "train")
        if split in room:
            room[split] -= len(group)
        split_of.update(dict.fromkeys(group, split))
    by_split: dict[str, list[Pair]] = {"train": [], "valid": [], "test": []}
    for i, pair in enumerate(pairs):
        by_split[split_of[i]].append(pair)
    return Splits(**by_split)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, hex: what a checkpoint records of the TSV corpus it was trained on, and of its
    tokenizer."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _csv_quoted(text: str) -> bool:
    """Whether a field reads as a CSV writer quotes one: wrapped in double quotes, its own quotes doubled
    ('"He said ""hi""."')."""
    inner = text[1:-1]
    return len(text) >= 2 and text[0] == text[-1] == '"' and '""' in inner and '"' not in inner.replace('""', "")


def read_tsv(path: str | os.PathLike, *, strict: bool = True) -> list[Pair]:
    """Read a user corpus of `source<TAB>target` lines; strict=False keeps carriage returns that end no line and
    CSV-quoted fields as text, as checkpoints from before NORMALIZED_SPLIT were trained on them."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise CorpusError(f"{path}: cannot be read ({error.strerror or error})") from error
    data = data.removeprefix(codecs.BOM_UTF8)
    if strict and b"\n" not in data and b"\r" in data.removesuffix(b"\r"):  # else all of it would be one line
        raise CorpusError(f"{path}: its lines end with a carriage return alone (CR, as on classic Mac OS); a TSV corpus's "
                          "lines end with LF or CRLF: convert it (e.g. tr '\\r' '\\n')")
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the final newline ends the last line; it does not start an empty one
        lines.pop()
    pairs = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.removesuffix(b"\r").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        if strict and "\r" in line:
            raise CorpusError(f"{path}:{lineno}: a carriage return inside the line, which no field can hold (a line ends "
                              "with LF or CRLF; mixed line endings?): remove it")
        fields = line.split("\t")
        if not line:
            raise CorpusError(f"{path}:{lineno}: empty line")
        if len(fields) != 2:
            raise CorpusError(
                f"{path}:{lineno}: expected 'source<TAB>target', got {len(fields)} tab-separated field(s)"
            )
        for side, text in zip(("source", "target"), fields):
            # Nothing visible: blank as the server reads it, where a model would learn to make words up. Read leniently,
            # as for a run started before this rule, only white space is.
            if is_blank(text) if strict else not text.strip():
                raise CorpusError(f"{path}:{lineno}: empty {side}")
            if strict and _csv_quoted(text):
                raise CorpusError(f"{path}:{lineno}: the {side} looks CSV-quoted (wrapped in double quotes, its own "
                                  "doubled), which a TSV corpus takes literally: write the file with quoting off (Python's "
                                  "csv: quoting=csv.QUOTE_NONE, quotechar=None)")
        pairs.append(Pair(fields[0], fields[1], "tsv", line=lineno))
    return pairs


def write_tsv(pairs: Iterable[Pair], path: str | os.PathLike) -> None:
    """Write pairs as `source<TAB>target` lines."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for pair in pairs:
            for text in (pair.source, pair.target):
                if is_blank(text) or any(c in text for c in "\t\n\r"):
                    raise ValueError(f"cannot write {text!r} as a TSV field: empty, or has a tab or newline")
                if _csv_quoted(text):
                    raise ValueError(f"cannot write {text!r} as a TSV field: read_tsv would take it for CSV-quoted")
            f.write(f"{pair.source}\t{pair.target}\n")
