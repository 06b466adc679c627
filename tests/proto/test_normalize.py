"""How sources are read before tokenizing, and which texts show nothing to translate."""

from __future__ import annotations

import pytest

from nmtserve.normalize import is_blank, normalize_source


def test_every_run_of_white_space_is_one_space():
    assert normalize_source(" 5:27\u202fPM,\u00a0\tFriday\r\n") == "5:27 PM, Friday"


@pytest.mark.parametrize("text", [
    "", " \t\r\n", "\u200b\ufeff\x00", "\u2060\u00ad",  # white space, zero-width and control, format characters
    "\u3164", "\u115f\u1160", "\uffa0", "\u2800",  # fillers and the blank braille pattern: by category, visible
    "\u0301\u0308",  # combining marks with nothing to combine with
])
def test_texts_that_show_nothing_are_blank(text):
    assert is_blank(text)


@pytest.mark.parametrize("text", [
    "Friday", " x ", "e\u0301", "\u2764", "\U0001f600", "\u4e00", "\u0661",  # letters, symbols, digits
    "\ue000",  # private use: a font's own glyph
    "\U0001fae9",  # unassigned in Python 3.11's tables: a newer character, as a client may send
])
def test_texts_with_a_visible_character_are_not_blank(text):
    assert not is_blank(text)
