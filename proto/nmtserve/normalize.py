"""How a source text is read before it is tokenized, the same in training, evaluation and the server; and which texts
show nothing to translate.

A model only knows the sources it was trained on. People type plain spaces where CLDR writes no-break ones
("5:27\u202fPM"), and a line read from a file or a terminal may keep its newline, so the training corpus and every
text given to a model are read the same way: each run of white space as one plain space, none at either end.
Targets are never normalized: their no-break spaces are what a translation must produce.
"""

from __future__ import annotations

import unicodedata


def normalize_source(text: str) -> str:
    """The text with every run of Unicode white space (str.split's) made one space, and none at either end."""
    return " ".join(text.split())


# Letters and symbols by category that show nothing: the Hangul fillers and the blank braille pattern.
INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def is_blank(text: str) -> bool:
    """Whether a text shows nothing to translate: no character but white space, control, format (a zero-width space, a
    byte-order mark) and combining characters, and those that draw nothing; a model would make words up for it."""
    return not any(_visible(c) for c in text)


def _visible(character: str) -> bool:
    category = unicodedata.category(character)
    # Private-use and unassigned code points count as visible: a font's own glyphs, or characters newer than Python's
    # Unicode tables (this year's emoji), which a client may well send.
    return (category[0] not in "ZCM" or category in ("Co", "Cn")) and character not in INVISIBLE
