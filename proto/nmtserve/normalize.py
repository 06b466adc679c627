"""How a source text is read before it is tokenized: the same in training, evaluation and the server.

A model only knows the sources it was trained on. People type plain spaces where CLDR writes no-break ones
("5:27\u202fPM"), and a line read from a file or a terminal may keep its newline, so the training corpus and every
text given to a model are read the same way: each run of white space as one plain space, none at either end.
Targets are never normalized: their no-break spaces are what a translation must produce.
"""

from __future__ import annotations


def normalize_source(text: str) -> str:
    """The text with every run of Unicode white space (str.split's) made one space, and none at either end."""
    return " ".join(text.split())
