"""The LoRA paper's section 7 measurements against their definitions on constructed matrices, and
against a numpy float64 computation (1e-6)."""

import numpy as np
import pytest
import torch

from conftest import lora_model
from minilora.analysis import amplification, delta_weight, inspect, similarity_grid, spectrum, subspace_similarity

g = torch.Generator().manual_seed(0)


def test_a_rank_one_update_has_all_its_energy_in_one_direction_and_r_equal_ones_rank_r():
    delta = torch.randn(40, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 30, generator=g, dtype=torch.float64)
    s = spectrum(delta)
    assert s["top1"] == pytest.approx(1.0, abs=1e-12) and s["effective_rank"] == pytest.approx(1.0, abs=1e-9)
    q1 = torch.linalg.qr(torch.randn(40, 4, generator=g, dtype=torch.float64)).Q
    q2 = torch.linalg.qr(torch.randn(30, 4, generator=g, dtype=torch.float64)).Q
    equal = 3.0 * q1 @ q2.t()  # four equal singular values
    s = spectrum(equal)
    assert s["effective_rank"] == pytest.approx(4.0, abs=1e-9) and s["top2"] == pytest.approx(0.5, abs=1e-12)
    values = np.linalg.svd(equal.numpy(), compute_uv=False)  # numpy float64 as the oracle
    assert s["norm"] == pytest.approx(float(np.sqrt((values ** 2).sum())), abs=1e-6)


def test_subspace_similarity_is_one_with_itself_zero_with_an_orthogonal_one_and_its_expectation_at_random():
    a = torch.randn(8, 64, generator=g, dtype=torch.float64)
    assert all(subspace_similarity(a, a, i, i) == pytest.approx(1.0, abs=1e-12) for i in (1, 4, 8))
    q = torch.linalg.qr(torch.randn(64, 16, generator=g, dtype=torch.float64)).Q.t()
    assert subspace_similarity(q[:8], q[8:], 8, 8) == pytest.approx(0.0, abs=1e-12)
    # random i- and j-dimensional subspaces of R^k: E ||U1^T U2||^2 = i j / k, so E φ = max(i, j) / k
    trials = [subspace_similarity(torch.randn(2, 64, generator=g), torch.randn(6, 64, generator=g), 2, 6)
              for _ in range(400)]
    assert float(np.mean(trials)) == pytest.approx(6 / 64, rel=0.1)
    a1, a2 = torch.randn(4, 32, generator=g, dtype=torch.float64), torch.randn(6, 32, generator=g, dtype=torch.float64)
    u1, u2 = np.linalg.svd(a1.numpy())[2], np.linalg.svd(a2.numpy())[2]  # numpy: right-singular vectors
    grid = similarity_grid(a1, a2)
    assert len(grid) == 4 and len(grid[0]) == 6
    for i in range(1, 5):
        for j in range(1, 7):
            expected = np.linalg.norm(u1[:i] @ u2[:j].T) ** 2 / min(i, j)
            assert grid[i - 1][j - 1] == pytest.approx(expected, abs=1e-6)


def test_amplification_of_an_update_inside_ws_top_directions_is_one():
    w = torch.randn(48, 32, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    inside = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]  # W's own top-4 part
    a = amplification(w, inside, 4)
    assert a["amplification"] == pytest.approx(1.0, abs=1e-9)
    assert a["w_on_delta"] == pytest.approx(a["w_on_own_top"], abs=1e-9) == pytest.approx(float(s[:4].norm()), abs=1e-9)
    assert a["w_on_random"] < a["w_on_own_top"]
    small = 0.01 * torch.randn(48, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 32, generator=g, dtype=torch.float64)
    a = amplification(w, small, 4)
    un, _, vhn = np.linalg.svd(small.numpy())
    expected = np.linalg.norm(small.numpy()) / np.linalg.norm(un[:, :4].T @ w.numpy() @ vhn[:4].T)
    assert a["amplification"] == pytest.approx(expected, rel=1e-6)


def test_inspect_reads_every_lora_layer_of_a_model(saved_tiny):
    model = lora_model(saved_tiny, targets=["q_proj", "v_proj"], std=0.1)
    table = inspect(model, with_base=True)
    assert set(table) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    name = "model.layers.0.self_attn.q_proj"
    layer = model.get_submodule(name)
    merged = layer.merged_weight().double() - layer.weight.double()
    assert torch.allclose(delta_weight(layer), merged, atol=1e-6)
    assert table[name]["r"] == 4 and 0 < table[name]["top1"] <= table[name]["top2"] <= table[name]["top4"] <= 1 + 1e-12
    assert table[name]["amplification"] > 0


def test_minilora_inspect_prints_the_measurements_from_the_adapter_files(saved_tiny, tmp_path, capsys):
    """From the files alone (A, B and the scale of adapter_config.json), equal to the loaded model's ΔW;
    with --base the amplification; with --compare (itself) φ = 1 on the diagonal."""
    import re
    from conftest import write_recipe
    from minilora.analysis import adapter_factors
    from minilora.cli import main
    recipe, model_folder = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    from minilora.adapter import load_adapter
    from minilora.weights import load_model
    loaded = load_adapter(load_model(model_folder), adapter)
    for name, (a, b, scale) in adapter_factors(adapter).items():
        assert torch.allclose(scale * (b @ a), delta_weight(loaded.get_submodule(name)), atol=1e-12), name
    assert main(["inspect", str(adapter), "--base", str(model_folder), "--compare", str(adapter)]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("model.layers.") and not l.endswith(":")]
    assert len(rows) == 4 and all(len(r.split()) == 11 for r in rows)  # module, r, 5 of ΔW, 4 of W
    diagonal = re.findall(r"i=1 +(\d\.\d\d)", out)
    assert diagonal and all(v == "1.00" for v in diagonal)
