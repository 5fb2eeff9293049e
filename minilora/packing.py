"""Packing: short examples laid end to end in rows of a fixed length, so that a batch holds (almost) no
padding and every matmul row is a real token.

A packed row keeps its examples apart. Its attention mask numbers them, 1, 1, 1, 2, 2, 3, ... (0 for
padding), and the models read that: a token attends only to earlier tokens of its own example, and
positions restart at each (models/common.py). The first token of each example is no target, as in an
example of its own, where token t predicts t + 1 and nothing predicts the first. So a packed batch has
the loss of the same examples unpacked, with the matmuls of far fewer padded rows.
"""

from __future__ import annotations

from .data import IGNORE, Example
from .errors import DataError


def pack(examples: list[Example], length: int) -> list[Example]:
    """The examples packed into rows of at most `length` tokens, first-fit decreasing (longest first,
    each into the first row with room), each row's examples in that order."""
    if any(isinstance(e.labels, int) for e in examples):
        raise DataError("packing is for language-model examples; a classifier's examples are one text each")
    if any(e.segments is not None for e in examples):
        raise DataError("these examples are packed already")
    too_long = next((len(e.input_ids) for e in examples if len(e.input_ids) > length), None)
    if too_long is not None:
        raise DataError(f"an example of {too_long} tokens does not fit a packed row of {length}")
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        i = next((i for i, r in enumerate(room) if r >= len(e.input_ids)), None)
        if i is None:
            rows.append([])
            room.append(length)
            i = len(rows) - 1
        rows[i].append(e)
        room[i] -= len(e.input_ids)
    packed = []
    for row in rows:
        ids, labels, segments = [], [], []
        for n, e in enumerate(row, start=1):
            ids += e.input_ids
            labels += [IGNORE] + list(e.labels[1:])  # the previous example's last token predicts nothing here
            segments += [n] * len(e.input_ids)
        packed.append(Example(ids, labels, segments))
    return packed
