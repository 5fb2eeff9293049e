"""Packing: examples laid end to end in one row keep their own attention and positions, so the packed
batch's loss and gradients equal the unpacked ones' (the oracle: the same examples, one per row)."""

import pytest
import torch
from conftest import examples, grads, lora_model
from minilora.data.batching import collate, pack
from minilora.data.records import IGNORE, Example
from minilora.errors import DataError
from minilora.models.common import attention_mask, position_ids
from minilora.training.objectives.causal_lm import causal_lm_loss


def test_packed_rows_hold_every_example_once_first_fit_decreasing():
    data = examples(n=30, seed=3)
    rows = pack(data, 20)
    assert all(len(r.input_ids) <= 20 for r in rows)
    assert sorted(map(len, (r.input_ids for r in rows))) != sorted(len(e.input_ids) for e in data)
    pieces = []
    for r in rows:
        n = max(r.segments)
        assert sorted(set(r.segments)) == list(range(1, n + 1))
        for s in range(1, n + 1):
            at = [i for i, x in enumerate(r.segments) if x == s]
            assert at == list(range(at[0], at[-1] + 1))  # contiguous
            assert r.labels[at[0]] == IGNORE  # an example's first token is no target
            pieces.append((tuple(r.input_ids[at[0]:at[-1] + 1]), tuple(r.labels[at[0] + 1:at[-1] + 1])))
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels[1:])) for e in data)
    assert len(rows) <= -(-sum(len(e.input_ids) for e in data) // 20) + 1  # nearly full rows
    batch = collate(rows, pad_id=0)
    assert torch.equal(batch["attention_mask"][0, :len(rows[0].segments)], torch.tensor(rows[0].segments))


def test_positions_restart_and_attention_stays_inside_each_example():
    mask = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert position_ids(mask, 8, 0, "cpu").tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]
    allowed = attention_mask(mask, 8, 0, "cpu")[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[5].tolist() == [False] * 5 + [True, False, False]
    assert attention_mask(torch.ones(1, 8, dtype=torch.long), 8, 0, "cpu") is None  # unpacked: SDPA's causal path


@pytest.mark.parametrize("kind", ["llama-gqa", "gpt2", "gptj", "qwen2", "mistral-window"])
def test_packed_loss_and_gradients_equal_unpacked(saved_tiny, kind):
    data = examples(n=12, seed=1)
    sums = []
    for batch in (collate(data, pad_id=0), collate(pack(data, 32), pad_id=0)):
        model = lora_model(saved_tiny, kind)
        loss, count = causal_lm_loss(model, batch)
        loss.backward()
        sums.append((loss.item(), count, grads(model)))
    (a, n_a, g_a), (b, n_b, g_b) = sums
    assert n_a == n_b and abs(a - b) <= 1e-5 * abs(a)
    assert g_a.keys() == g_b.keys() and all(torch.allclose(g_a[k], g_b[k], rtol=1e-4, atol=1e-6) for k in g_a)
    padding = lambda batch: int((batch["attention_mask"] == 0).sum())
    assert padding(collate(pack(data, 32), 0)) < padding(collate(data, 0))


def test_packing_refuses_what_it_cannot_pack():
    with pytest.raises(DataError, match="an example of 14 tokens does not fit a packed row of 10"):
        pack([Example(list(range(14)), list(range(14)))], 10)
    with pytest.raises(DataError, match="packing is for language-model examples"):
        pack([Example([1, 2], 0)], 10)
    with pytest.raises(DataError, match="packed already"):
        pack(pack([Example([1, 2], [1, 2])], 10), 10)
    (row,) = pack([Example([], []), Example([5, 6], [5, 6]), Example([], [])], 10)  # an empty example packs as nothing
    assert (row.input_ids, row.labels, row.segments) == ([5, 6], [IGNORE, 6], [1, 1])
    assert pack([], 10) == []
