"""Tests of the CLDR corpus generator, the splits and the TSV reader and writer."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter

import pytest
from babel import dates
from hypothesis import given, settings
from hypothesis import strategies as st

from nmtserve.normalize import normalize_source
from nmtserve_export import corpus
from nmtserve_export.corpus import (
    CATEGORIES,
    CorpusError,
    Pair,
    generate_corpus,
    read_tsv,
    split_corpus,
    write_tsv,
)


@pytest.fixture(scope="module")
def de_200k() -> list[Pair]:
    return generate_corpus(200_000)


@pytest.fixture(scope="module")
def de_by_source(de_200k) -> dict[str, Pair]:
    return {p.source: p for p in de_200k}


@pytest.fixture(scope="module")
def de_20k() -> list[Pair]:
    return generate_corpus(20_000, seed=1)


@pytest.fixture(scope="module", params=["fr", "es"])
def fr_es_30k(request) -> tuple[str, list[Pair]]:
    return request.param, generate_corpus(30_000, target_lang=request.param)


def assert_function(*corpora: list[Pair]) -> None:
    """Every source has one target over all the corpora together."""
    targets: dict[str, set[str]] = {}
    for pairs in corpora:
        for p in pairs:
            targets.setdefault(p.source, set()).add(p.target)
    conflicts = {s: t for s, t in targets.items() if len(t) > 1}
    assert not conflicts, list(conflicts.items())[:5]


def test_deterministic_per_seed():
    assert generate_corpus(3000, seed=7) == generate_corpus(3000, seed=7)
    assert generate_corpus(3000, seed=7) != generate_corpus(3000, seed=8)
    assert generate_corpus(3000, seed=7, target_lang="fr") == generate_corpus(3000, seed=7, target_lang="fr")


def test_size_and_unique_sources(de_200k):
    assert len(de_200k) == 200_000
    assert len({p.source for p in de_200k}) == len(de_200k)
    assert all(p.source and p.target and p.category in CATEGORIES for p in de_200k)


def test_one_target_per_source_across_corpora(de_200k, de_20k):
    # Different seeds sample different renderings of the same text (a medium and a long date, a
    # wide and an abbreviated name): the target must not depend on which one came first.
    assert_function(de_200k, de_20k)


def test_one_target_per_source_fr_es(fr_es_30k):
    lang, pairs = fr_es_30k
    assert len({p.source for p in pairs}) == len(pairs)
    assert_function(pairs, generate_corpus(5_000, target_lang=lang, seed=1))
    assert {p.category for p in pairs} == set(CATEGORIES)


def test_other_locales_get_the_cldr_categories_only():
    pairs = generate_corpus(5000, target_lang="ja")
    assert {p.category for p in pairs} == {c for c in CATEGORIES if not c.startswith("phrase-")}
    assert generate_corpus(2000, source_lang="fr", target_lang="de")


def test_every_category_in_a_held_out_thousand(de_20k):
    splits = split_corpus(de_20k, valid_size=1000, test_size=1000)
    counts = Counter(p.category for p in splits.test)
    assert set(counts) == set(CATEGORIES), counts


def test_may_medium_and_long_dates_share_one_target(de_200k):
    # English medium and long dates coincide for May ("May 16, 2003"); German differs, and the
    # long form wins.
    en, de = corpus._locale("en"), corpus._locale("de")
    may = dt.date(2003, 5, 16)
    medium, long = (corpus._render(may, corpus._DATE_FORMATS, k, en, de) for k in (2, 1))
    assert medium.source == long.source == "May 16, 2003"
    assert medium.target == long.target == "16. Mai 2003"
    checked = 0
    for p in de_200k:
        if m := re.fullmatch(r"(?:on )?May (\d+), (\d{4})", p.source):
            day = dt.date(int(m[2]), 5, int(m[1]))
            assert p.target.removeprefix("am ") == dates.format_date(day, "long", locale="de"), p
            checked += 1
    assert checked > 100


def slot_texts(pairs: list[Pair], category: str, source_re: str, target_re: str) -> list[tuple[str, str]]:
    """(source, target) of the slot that the phrases of `category` matching both patterns contain."""
    found = []
    for p in pairs:
        if p.category == category and (s := re.fullmatch(source_re, p.source)):
            t = re.fullmatch(target_re, p.target)
            assert t, p
            found.append((s[1], t[1]))
    return found


@pytest.mark.parametrize(
    ("phrase", "source_re", "target_re", "standalone"),
    [
        ("phrase-percent", "(.+) of the votes", "(.+) der Stimmen", {"percent"}),
        ("phrase-percent", "Prices rose by (.+)\\.", "Die Preise stiegen um (.+)\\.", {"percent"}),
        ("phrase-time", "the meeting starts at (.+)", "das Treffen beginnt um (.+)", {"time"}),
        ("phrase-weekday", "every (\\w+) at .+", "jeden (\\w+) um .+", {"weekday"}),
        ("phrase-weekday", "every \\w+ at (.+)", "jeden \\w+ um (.+)", {"time"}),
        ("phrase-date", "on (.+)", "am (.+)", {"date"}),
        ("phrase-month", "The shop opens in (.+)\\.", "Der Laden öffnet im (.+)\\.", {"month"}),
        ("phrase-unit", "(.+) to \\D+", "(.+) bis nach \\D+", {"unit"}),
        ("phrase-unit", "\\S+ \\S+ to (.+)", "\\S+ \\S+ bis nach (.+)", {"territory"}),
    ],
)
def test_phrase_slots_render_like_standalone_values(
    de_200k, de_by_source, phrase, source_re, target_re, standalone
):
    # A value inside a phrase must be translated exactly as the same value on its own: a phrase
    # with its own number pattern ("48,5%" instead of "48,5 %") fails here.
    slots = slot_texts(de_200k, phrase, source_re, target_re)
    shared = [(s, t) for s, t in slots if s in de_by_source and de_by_source[s].category in standalone]
    assert len(shared) >= 20, (len(slots), len(shared))
    assert [(s, de_by_source[s].target) for s, _ in shared] == shared


def test_german_spot_checks(de_by_source):
    for source, target in [
        ("Friday", "Freitag"),
        ("May", "Mai"),
        ("Fri", "Fr"),  # CLDR: stand-alone "Fr", in a date "Fr."
        ("Germany", "Deutschland"),
        ("French", "Französisch"),
        ("48%", "48\xa0%"),
        ("48.5%", "48,5\xa0%"),
        ("12:30 PM", "12:30"),  # sources as typed: a plain space where CLDR has U+202F
    ]:
        assert de_by_source[source].target == target
    assert not any(c in source for source in de_by_source for c in "\u00a0\u202f")
    assert "Nauru" not in de_by_source  # a country and a language in English: two German targets
    dollars = 0
    for source, pair in de_by_source.items():
        if m := re.fullmatch(r"(It costs )?\$([\d,]+\.\d\d)(\.?)", source):
            german = m[2].replace(",", "_").replace(".", ",").replace("_", ".") + "\xa0$"
            assert pair.target == (f"Es kostet {german}." if m[1] else german)
            dollars += 1
    assert dollars > 100


def test_german_phrases(de_20k):
    pairs = {p.source: p.target for p in de_20k if p.category.startswith("phrase-")}
    assert any(re.fullmatch(r"\S+ \S+ bis nach \w+", t) for t in pairs.values())
    for source, target in pairs.items():
        if m := re.fullmatch(r"on (\w+), (\w+) (\d+), (\d{4})", source):
            assert re.fullmatch(rf"am \w+, {m[3]}\. \w+ {m[4]}", target)


def test_spanish_and_french_grammar(fr_es_30k):
    lang, pairs = fr_es_30k
    if lang == "es":  # "a la 1:30" but "a las 13:30"
        trains = [p for p in pairs if p.source.startswith("The train leaves at ")]
        at_one = [p for p in trains if re.search(r" 1:\d\d AM", p.source)]
        assert all(p.target.startswith("El tren sale a la 1:") for p in at_one) and at_one
        assert all(p.target.startswith("El tren sale a las ") for p in trains if p not in at_one)
    else:  # "du Japon", "de l'Allemagne", "de la France"
        forms = {p.target.split(" est de ")[0] for p in pairs if p.source.startswith("The population of ")}
        expected = {"La population du Japon", "La population de l'Allemagne", "La population de la France"}
        assert expected <= forms


def test_size_beyond_what_can_be_made():
    few = corpus._Slot(3, [corpus._Text(f"s{i}", f"t{i}", i) for i in range(3)].__getitem__)
    kinds = (("number", 1, few), ("date", 1, few))  # two kinds rendering the same three sources
    languages = dict(source_lang="en", target_lang="de")
    pairs = corpus._draw(kinds, 3, seed=0, **languages)
    assert sorted((p.source, p.target) for p in pairs) == [("s0", "t0"), ("s1", "t1"), ("s2", "t2")]
    with pytest.raises(CorpusError, match="^only 3 distinct en->de pairs exist, not 4$"):
        corpus._draw(kinds, 4, seed=0, **languages)


def test_conflicting_targets_are_caught():
    clash = corpus._Slot(2, [corpus._Text("May", "Mai", 0), corpus._Text("May", "Mai.", 1)].__getitem__)
    with pytest.raises(CorpusError, match=r"the built-in en->de corpus cannot be made: CLDR writes 'May' for two things, "
                                          r"translated 'Mai\.' and 'Mai' \(.*choose others, or give a --corpus file\)"):
        corpus._draw((("month", 1, clash),), 2, seed=0, source_lang="en", target_lang="de")


@pytest.mark.parametrize("source_lang", ["fr", "fr_CH"])
def test_renderings_are_told_apart_as_written(source_lang):
    """French long units write "440 ans", short ones "440\xa0ans": the same source once written with a plain space, which
    took "440 years" from one and "440 yrs" from the other, and the default French corpus failed to generate."""
    src, en = corpus._locale(source_lang), corpus._locale("en")
    targets: dict[str, set[str]] = {}
    for unit in ("duration-year", "duration-hour", "length-kilometer"):
        slot = corpus._unit_slot((unit,), src, en)
        for text in filter(None, map(slot.render, range(slot.size))):
            targets.setdefault(normalize_source(text.source), set()).add(text.target)
    assert targets["440 ans"] == {"440 years"}
    assert [(source, sorted(t)) for source, t in targets.items() if len(t) > 1] == []


def test_bad_arguments():
    with pytest.raises(ValueError):
        generate_corpus(-1)
    with pytest.raises(ValueError, match="unknown locale"):
        generate_corpus(10, target_lang="xx-nope")


def test_split_sizes_disjoint_and_order_kept():
    pairs = generate_corpus(5000)
    splits = split_corpus(pairs, valid_size=300, test_size=200)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (4500, 300, 200)
    parts = [{p.source for p in split} for split in (splits.train, splits.valid, splits.test)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    for split, sources in zip((splits.train, splits.valid, splits.test), parts):
        assert split == [p for p in pairs if p.source in sources]
    # The split depends on the sources, not on the order of the corpus.
    shuffled = split_corpus(pairs[::-1], valid_size=300, test_size=200)
    assert {p.source for p in shuffled.test} == parts[2]


def test_split_rejects_sizes_that_leave_no_training_data():
    pairs = generate_corpus(10)
    with pytest.raises(ValueError):
        split_corpus(pairs, valid_size=5, test_size=5)
    with pytest.raises(ValueError):
        split_corpus(pairs, valid_size=-1, test_size=2)


@given(st.lists(st.sampled_from("abcdefghij"), min_size=3, max_size=40), st.data())
@settings(deadline=None)  # a stall of a busy machine is no failure
def test_split_keeps_repeated_sources_together(sources, data):
    pairs = [Pair(s, f"t{i}", "tsv") for i, s in enumerate(sources)]
    test_size = data.draw(st.integers(0, len(pairs) - 1))
    valid_size = data.draw(st.integers(0, len(pairs) - 1 - test_size))
    splits = split_corpus(pairs, valid_size=valid_size, test_size=test_size)
    assert len(splits.test) <= test_size and len(splits.valid) <= valid_size
    assert sorted(splits.train + splits.valid + splits.test, key=pairs.index) == pairs
    owners = Counter(s for split in splits.__dict__.values() for s in {p.source for p in split})
    assert set(owners.values()) == {1}


def test_split_keeps_sources_that_differ_in_white_space_or_composition_together():
    """"X" and "X " were two sources to the split, one to the model: a sentence learnt in training was tested on."""
    spellings = ("Café {i}", "Café {i} ", "Café\xa0 {i}\n", "Cafe\u0301 {i}")
    pairs = [Pair(spelling.format(i=i), f"t{i}", "tsv") for i in range(30) for spelling in spellings]
    splits = split_corpus(pairs, valid_size=24, test_size=24)
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (72, 24, 24)
    for split in (splits.train, splits.valid, splits.test):
        assert set(Counter(p.target for p in split).values()) == {len(spellings)}  # all four spellings of a sentence


def test_tsv_round_trip(tmp_path):
    quotes = [Pair('"Hello"', "„Hallo“", "tsv"), Pair('He said "hi".', '"Er sagte ""hi""', "tsv"), Pair('"""', '""', "tsv")]
    pairs = generate_corpus(500) + [Pair("  inner  spaces ", "ü\u202fß\xa0", "tsv")] + quotes
    path = tmp_path / "corpus.tsv"
    write_tsv(pairs, path)
    assert read_tsv(path) == [Pair(p.source, p.target, "tsv") for p in pairs]


def test_tsv_line_endings(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_bytes(b"\xef\xbb\xbfa\tb\r\nc\td")  # BOM, CRLF, no final newline
    assert read_tsv(path) == [Pair("a", "b", "tsv"), Pair("c", "d", "tsv")]
    path.write_bytes(b"")
    assert read_tsv(path) == []


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a\tb\nonly one field\n", r":2: expected 'source<TAB>target', got 1 "),
        (b"a\tb\nc\td\te\n", r":2: expected 'source<TAB>target', got 3 "),
        (b"a\tb\n\tc\n", r":2: empty source"),
        (b"a\tb\nc\t\n", r":2: empty target"),
        (b"a\tb\nc\t  \n", r":2: empty target"),
        ("a\tb\n\u200b\u3164\tc\n".encode(), r":2: empty source"),  # nothing visible: blank, as the server reads it
        (b"a\tb\n\nc\td\n", r":2: empty line"),
        (b"a\tb\nc\td\n\xffe\tf\n", r":3: not valid UTF-8"),
        # A bare CR was kept in the field, which write_tsv refuses and no line ending explains.
        (b"a\tb\r\nc\rd\te\r\n", r":2: a carriage return inside the line, which no field can hold"),
        (b"a\tb\nc\td\r\r\n", r":2: a carriage return inside the line"),
        # CR-only line endings read as one line of many fields.
        (b"a\tb\rc\td\r", r": its lines end with a carriage return alone \(CR, as on classic Mac OS\)"),
        # CSV quoting was taken for the text.
        (b'a\tb\n"He said ""hi""."\tEr sagte \xe2\x80\x9ehi\xe2\x80\x9c.\n', r":2: the source looks CSV-quoted .* quoting off"),
        (b'a\tb\nHe said "hi".\t"Er sagte ""hi""."\n', r":2: the target looks CSV-quoted"),
    ],
)
def test_tsv_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=re.escape(str(path)) + message):
        read_tsv(path)


def test_write_tsv_refuses_what_cannot_be_read_back(tmp_path):
    for pair in Pair("a\tb", "c", "tsv"), Pair("a", "b\nc", "tsv"), Pair("a", "", "tsv"), Pair('"a ""b"""', "c", "tsv"):
        with pytest.raises(ValueError):
            write_tsv([pair], tmp_path / "x.tsv")
