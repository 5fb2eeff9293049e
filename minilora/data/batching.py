"""Batches: examples padded into micro-batches (collate, batches), or packed first into full rows;
preference pairs as one batch of their chosen rows, then their rejected rows (collate_pairs).

Packing lays short examples end to end in rows of a fixed length, so that a batch holds (almost) no
padding and every matmul row is a real token. A packed row keeps its examples apart: its attention
mask numbers them, 1, 1, 1, 2, 2, 3, ... (0 for padding), and the models read that: a token attends
only to earlier tokens of its own example, and positions restart at each (models/common.py). The first
token of each example is no target, as in an example of its own, where token t predicts t + 1 and
nothing predicts the first. So a packed batch has the loss of the same examples unpacked, with the
matmuls of far fewer padded rows.
"""

from __future__ import annotations

import torch

from ..errors import DataError
from .preferences import PreferencePair
from .records import IGNORE, Example


def batches(data: list[Example] | list[PreferencePair], indices: list[int], size: int, pad_id: int, device: torch.device,
            pad_to: int | None = None, shard: tuple[int, int] = (0, 1)) -> list[dict[str, torch.Tensor]]:
    """Micro-batches of `size` examples in the order of `indices`; with shard=(rank, world), only
    micro-batches rank, rank + world, ... (this rank's share of a step)."""
    starts = range(0, len(indices), size)[shard[0]::shard[1]]
    return [{k: v.to(device) for k, v in collate([data[j] for j in indices[i:i + size]], pad_id, pad_to).items()}
            for i in starts]


def collate_pairs(pairs: list[PreferencePair], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, the B chosen rows first, then the B rejected rows (so that both go through
    the model in one forward pass), padded as collate pads: input_ids, attention_mask, labels (-100 on
    prompt and padding); and `reference_logps` (2B,) where every pair holds precomputed ones."""
    rows = [p.rows() for p in pairs]
    batch = collate([c for c, _ in rows] + [r for _, r in rows], pad_id, pad_to)
    if all(p.reference_logps is not None for p in pairs):
        batch["reference_logps"] = torch.tensor([p.reference_logps[0] for p in pairs] +
                                                [p.reference_logps[1] for p in pairs], dtype=torch.float64)
    return batch


def collate(examples: list[Example] | list[PreferencePair], pad_id: int, pad_to: int | None = None,
            side: str = "right") -> dict[str, torch.Tensor]:
    """Pad to the longest example (or to pad_to): input_ids, attention_mask (1 = real token; a packed
    row's example numbers), labels (-100 on padding; or one class id per example). Padding is recognised
    by the mask, so pad_id may equal the EOS id. Preference pairs are collated by collate_pairs."""
    if not examples:
        raise DataError("no examples to collate")
    if isinstance(examples[0], PreferencePair):
        if side != "right" or not all(isinstance(e, PreferencePair) for e in examples):
            raise DataError("preference pairs are collated alone, padded on the right")
        return collate_pairs(examples, pad_id, pad_to)
    if isinstance(pad_id, bool) or not isinstance(pad_id, int):
        raise DataError(f"the pad token id is {pad_id!r}: the tokenizer has neither a pad nor an end-of-sequence token")
    for i, e in enumerate(examples):
        if not isinstance(e.labels, int) and len(e.labels) != len(e.input_ids):
            raise DataError(f"example {i} has {len(e.input_ids)} input ids but {len(e.labels)} labels")
    length = max(len(e.input_ids) for e in examples) if pad_to is None else pad_to
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    classes = isinstance(examples[0].labels, int)
    labels = torch.tensor([e.labels for e in examples]) if classes else \
        torch.full((len(examples), length), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        if n > length:
            raise DataError(f"example {i} has {n} tokens, more than pad_to={length}")
        cols = slice(0, n) if side == "right" else slice(length - n, length)
        ids[i, cols] = torch.tensor(e.input_ids)
        if not classes:
            labels[i, cols] = torch.tensor(e.labels)
        mask[i, cols] = 1 if e.segments is None else torch.tensor(e.segments)  # 0 stays padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pack(examples: list[Example], length: int) -> list[Example]:
    """The examples packed into rows of at most `length` tokens, first-fit decreasing (longest first,
    each into the first row with room), each row's examples in that order."""
    if any(isinstance(e, PreferencePair) for e in examples):
        raise DataError("packing is for language-model examples; preference pairs are batched as they are")
    if any(isinstance(e.labels, int) for e in examples):
        raise DataError("packing is for language-model examples; a classifier's examples are one text each")
    if any(e.segments is not None for e in examples):
        raise DataError("these examples are packed already")
    too_long = next((len(e.input_ids) for e in examples if len(e.input_ids) > length), None)
    if too_long is not None:
        raise DataError(f"an example of {too_long} tokens does not fit a packed row of {length}")
    rows: list[list[Example]] = []
    room: list[int] = []
    for e in sorted((e for e in examples if e.input_ids), key=lambda e: -len(e.input_ids)):  # empty: nothing to pack
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
