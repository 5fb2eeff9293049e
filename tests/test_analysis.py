"""The LoRA paper's section 7 measurements against their definitions on constructed matrices, and
against a numpy float64 computation (1e-6)."""

import numpy as np
import pytest
import torch
from conftest import lora_model
from minilora.lora.analysis import (
    amplification,
    delta_weight,
    inspect,
    similarity_grid,
    spectrum,
    subspace_similarity,
)

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
    from minilora.cli import main
    from minilora.lora.analysis import adapter_factors
    recipe, model_folder = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    adapter = tmp_path / "run" / "adapter"
    capsys.readouterr()
    from minilora.loading.weights import load_model
    from minilora.lora.peft_files import load_adapter
    loaded = load_adapter(load_model(model_folder), adapter)
    for name, (a, b, scale) in adapter_factors(adapter).items():
        assert torch.allclose(scale * (b @ a), delta_weight(loaded.get_submodule(name)), atol=1e-12), name
    assert main(["inspect", str(adapter), "--base", str(model_folder), "--compare", str(adapter)]) == 0
    out = capsys.readouterr().out
    rows = [l for l in out.splitlines() if l.startswith("model.layers.") and not l.endswith(":")]
    assert len(rows) == 4 and all(len(r.split()) == 11 for r in rows)  # module, r, 5 of ΔW, 4 of W
    diagonal = re.findall(r"i=1 +(\d\.\d\d)", out)
    assert diagonal and all(v == "1.00" for v in diagonal)


def test_a_peft_adapter_is_measured_as_peft_computes_its_update_and_embeddings_are_left_out(saved_tiny, tmp_path):
    """PEFT's own files (rsLoRA, a rank pattern, LoRA on the embedding): ΔW equal to peft's
    get_delta_weight per module, the scale read from adapter_config.json; the embedding named as skipped."""
    import copy

    from minilora.lora.analysis import adapter_factors, inspect_adapter
    from peft import LoraConfig, get_peft_model
    hf, _ = saved_tiny["llama-gqa"]
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, rank_pattern={"v_proj": 2},
        target_modules=["q_proj", "v_proj", "embed_tokens"]))
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n or "lora_embedding_B" in n:
                p.normal_(0, 0.1)
    peft_model.save_pretrained(tmp_path / "peft")
    factors = adapter_factors(tmp_path / "peft")
    assert set(factors) == {f"model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")}
    for name, (a, b, scale) in factors.items():
        expected = peft_model.base_model.model.get_submodule(name).get_delta_weight("default").double()
        assert torch.allclose(scale * (b @ a), expected, atol=1e-7), name
    result = inspect_adapter(tmp_path / "peft")
    assert result["skipped"] == ["model.embed_tokens"]
    assert result["modules"]["model.layers.0.self_attn.v_proj"]["r"] == 2
    assert result["singular_values"]["model.layers.0.self_attn.v_proj"] == pytest.approx(
        torch.linalg.svdvals(factors["model.layers.0.self_attn.v_proj"][2] * (
            factors["model.layers.0.self_attn.v_proj"][1] @ factors["model.layers.0.self_attn.v_proj"][0]))[:2].tolist(),
        abs=1e-12)


@pytest.mark.parametrize("how", ["load_in_4bit", "load_in_8bit", "keep_quantized"])
def test_a_quantized_base_is_dequantized_for_the_projection(saved_tiny, tmp_path, how):
    """On an NF4, int8 or GGUF-blocks base the projection uses W as the quantized layer computes with it
    (its dequantize()), and equals amplification() over that matrix in float64."""
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import save_adapter
    if how == "keep_quantized":
        from minilora.formats import ggml_blocks as ggml
        from test_ggml import write_kquant_gguf
        source = write_kquant_gguf(tmp_path / "q.gguf", [ggml.Q4_K])
    else:
        source = saved_tiny["llama-gqa"][1]
    trained = apply_lora(load_model(source, **{how: True}), ["q_proj", "down_proj"], r=4, alpha=8)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_adapter(trained, tmp_path / "a")
    base = load_model(source, **{how: True})
    result = inspect_adapter(tmp_path / "a", base)
    in_model = inspect(trained, with_base=True)
    for name, row in result["modules"].items():
        quantized = base.get_submodule(name)
        assert hasattr(quantized, "dequantize"), name  # the base really is quantized here
        w = quantized.dequantize().double().numpy()
        delta = delta_weight(trained.get_submodule(name)).numpy()
        u, _, vh = np.linalg.svd(delta)  # numpy float64 over the dequantized W as the oracle
        on_delta = np.linalg.norm(u[:, :4].T @ w @ vh[:4].T)
        expected = {"w_on_delta": on_delta, "w_on_own_top": np.linalg.norm(np.linalg.svd(w, compute_uv=False)[:4]),
                    "amplification": np.linalg.norm(delta) / on_delta, "w_norm": np.linalg.norm(w)}
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6), (name, key)
            assert in_model[name][key] == pytest.approx(value, rel=1e-6), (name, key)


def test_inspect_names_what_does_not_fit(saved_tiny, tmp_path):
    from minilora.errors import ConfigError
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.peft_files import save_adapter
    llama, gpt2 = load_model(saved_tiny["llama-gqa"][1]), load_model(saved_tiny["gpt2"][1])
    save_adapter(lora_model(saved_tiny, targets=["q_proj"]), tmp_path / "llama")
    save_adapter(lora_model(saved_tiny, "gpt2", targets=["c_attn"]), tmp_path / "gpt2")
    from minilora.errors import CheckpointError
    with pytest.raises(CheckpointError, match=r"llama: adapter was trained on another base model \(model_type: "
                       r"adapter 'llama' vs model 'gpt2'"):
        inspect_adapter(tmp_path / "llama", gpt2)  # as load_adapter refuses it
    (tmp_path / "llama" / "minilora.json").unlink()  # as from PEFT: no record of the base, the modules still tell
    with pytest.raises(ConfigError, match=r"llama: module model\.layers\.0\.self_attn\.q_proj of the adapter is not in the base model"):
        inspect_adapter(tmp_path / "llama", gpt2)
    with pytest.raises(ConfigError, match=r"no module in common with .*llama"):
        inspect_adapter(tmp_path / "llama", compare=tmp_path / "gpt2")
    small = load_model(saved_tiny["llama-gqa"][1])
    small.model.layers[0].self_attn.q_proj = torch.nn.Linear(7, 5, bias=False)
    with pytest.raises(ConfigError, match=r"q_proj is \d+ x \d+ in the adapter .* but \(5, 7\) in the base model"):
        inspect_adapter(tmp_path / "llama", small)
    from minilora.lora.inject import apply_lora
    heads_only = apply_lora(llama, ["q_proj"], r=4, alpha=8, modules_to_save=["lm_head"])
    save_adapter(heads_only, tmp_path / "heads")
    from safetensors.torch import load_file, save_file
    file = tmp_path / "heads" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(file).items() if "lora_" not in k}, file)  # a head, no A/B pair
    with pytest.raises(ConfigError, match=r"heads: no LoRA A/B pairs to inspect"):
        inspect_adapter(tmp_path / "heads")


def test_minilora_inspect_plot_writes_the_figures_and_every_number(saved_tiny, tmp_path, capsys, monkeypatch):
    """--plot DIR: two PNGs (singular values; the φ heatmaps with --compare) and inspect.json, whose numbers
    are inspect_adapter()'s; without matplotlib a named error says which extra to install."""
    import json
    import sys

    from minilora.cli import main
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.peft_files import save_adapter
    save_adapter(lora_model(saved_tiny, targets=["q_proj", "v_proj"], r=4), tmp_path / "r4")
    save_adapter(lora_model(saved_tiny, targets=["q_proj", "v_proj"], r=8, std=0.2), tmp_path / "r8")
    base = saved_tiny["llama-gqa"][1]
    assert main(["inspect", str(tmp_path / "r4"), "--base", str(base), "--compare", str(tmp_path / "r8"),
                 "--plot", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "mean of 2 self_attn.q_proj" in out and "mean of 2 self_attn.v_proj" in out
    for png in ("singular_values.png", "similarity.png"):
        data = (tmp_path / "plots" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
    saved = json.loads((tmp_path / "plots" / "inspect.json").read_text())
    from minilora.loading.weights import load_model
    expected = inspect_adapter(tmp_path / "r4", load_model(base), tmp_path / "r8")
    assert saved["modules"].keys() == expected["modules"].keys()
    for name, row in expected["modules"].items():
        assert saved["modules"][name] == pytest.approx(row, rel=1e-12)
        assert len(saved["similarity"][name]) == 4 and len(saved["similarity"][name][0]) == 8
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["inspect", str(tmp_path / "r4"), "--plot", str(tmp_path / "again")]) == 2
    assert "plots are drawn with matplotlib, which is not installed here: pip install 'minilora[plot]'" in capsys.readouterr().err


def test_real_smollm2_kept_in_its_blocks_gives_the_float_models_projection(smollm2_path, tmp_path):
    """The real Q4_1 GGUF: inspect_adapter over the base kept in its blocks (W dequantized layer by
    layer) equals it over the model loaded in fp32, and W's norms are the real checkpoint's."""
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import save_adapter
    dense = load_model(smollm2_path)
    torch.manual_seed(0)
    apply_lora(dense, r"model\.layers\.(0|15|29)\.self_attn\.(q_proj|v_proj)", r=8, alpha=16)
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    save_adapter(dense, tmp_path / "a")
    kept = load_model(smollm2_path, keep_quantized=True)
    got, expected = inspect_adapter(tmp_path / "a", kept), inspect(dense, with_base=True)
    assert len(got["modules"]) == 6
    for name, row in expected.items():
        assert got["modules"][name] == pytest.approx(row, rel=1e-9), name
        w = dense.get_submodule(name).weight.double()
        assert row["w_norm"] == pytest.approx(float(w.norm()), rel=1e-9) and row["w_norm"] > 10
        s = np.linalg.svd(w.numpy(), compute_uv=False)
        assert row["w_on_own_top"] == pytest.approx(float(np.sqrt((s[:8] ** 2).sum())), rel=1e-6)


def test_gpt2_layer_types_stay_apart_and_a_transformers_base_is_read_in_its_own_layout(saved_tiny, tmp_path, capsys):
    """attn.c_proj and mlp.c_proj are two layer types (one pattern each), and transformers' GPT-2 (Conv1D,
    W stored as (in, out)) as the base gives the numbers of minilora's own model of it."""
    from minilora.cli import main
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter, module_kind
    from minilora.lora.peft_files import save_adapter
    hf, folder = saved_tiny["gpt2"]
    save_adapter(lora_model(saved_tiny, "gpt2", targets=["c_attn", "c_proj"]), tmp_path / "a")
    ours, theirs = inspect_adapter(tmp_path / "a", load_model(folder)), inspect_adapter(tmp_path / "a", hf)
    kinds = {module_kind(n)[0] for n in ours["modules"]}
    assert kinds == {"transformer.h.*.attn.c_attn", "transformer.h.*.attn.c_proj", "transformer.h.*.mlp.c_proj"}
    for name, row in ours["modules"].items():
        assert theirs["modules"][name] == pytest.approx(row, rel=1e-9), name
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "mean of 2 attn.c_proj" in out and "mean of 2 mlp.c_proj" in out


def test_a_broken_adapter_is_named_not_measured(saved_tiny, tmp_path, capsys):
    """A missing lora_B, a rank other than adapter_config.json's (it sets the scale), NaN, a --plot
    folder that is a file: named errors, never a traceback or silently wrong figures."""
    import json
    import shutil

    from minilora.cli import main
    from minilora.errors import CheckpointError
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.peft_files import save_adapter
    from safetensors.torch import load_file, save_file
    save_adapter(lora_model(saved_tiny, targets=["q_proj"]), tmp_path / "good")
    key = "base_model.model.model.layers.0.self_attn.q_proj"

    def broken(name, change=None, config=None):
        shutil.copytree(tmp_path / "good", tmp_path / name)
        file = tmp_path / name / "adapter_model.safetensors"
        tensors = load_file(file)
        if change:
            change(tensors)
            save_file(tensors, file)
        if config:
            cfg = json.loads((tmp_path / name / "adapter_config.json").read_text())
            (tmp_path / name / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
        return tmp_path / name
    cases = {
        broken("no_b", lambda t: t.pop(f"{key}.lora_B.weight")): r"q_proj: lora_A without its lora_B",
        broken("rank", config={"r": 16}): r"q_proj: lora_A \(4, \d+\) and lora_B \(\d+, 4\), expected .* r = 16",
        broken("nan", lambda t: t[f"{key}.lora_B.weight"].view(-1)[0].fill_(float("nan"))):
            r"nan: tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight holds NaN or infinite values",
    }
    for folder, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            inspect_adapter(folder)
        assert main(["inspect", str(folder)]) == 2 and folder.name in capsys.readouterr().err
    (tmp_path / "file.png").write_text("x")
    assert main(["inspect", str(tmp_path / "good"), "--plot", str(tmp_path / "file.png")]) == 2
    assert "file.png: a file, not a folder for the plots" in capsys.readouterr().err


def test_an_untrained_adapter_has_no_subspace_and_dora_is_named(saved_tiny, tmp_path, capsys):
    """B = 0 (as apply_lora starts): ‖ΔW‖ = 0, no projection, amplification n/a; a DoRA adapter is
    measured on s·B·A and says so."""
    from minilora.cli import main
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import save_adapter
    folder = saved_tiny["llama-gqa"][1]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8), tmp_path / "zero")
    result = inspect_adapter(tmp_path / "zero", load_model(folder))
    row = result["modules"]["model.layers.0.self_attn.q_proj"]
    assert row["norm"] == 0 and row["w_on_delta"] is None and row["amplification"] is None and row["w_norm"] > 0
    assert main(["inspect", str(tmp_path / "zero"), "--base", str(folder)]) == 0
    assert "n/a" in capsys.readouterr().out
    save_adapter(lora_model(saved_tiny, targets=["q_proj"], use_dora=True), tmp_path / "dora")
    assert inspect_adapter(tmp_path / "dora")["use_dora"] is True
    assert main(["inspect", str(tmp_path / "dora")]) == 0
    assert "a DoRA adapter: the figures are of its low-rank part s·B·A" in capsys.readouterr().out


def test_inspect_makes_the_checks_load_adapter_makes(saved_tiny, tmp_path):
    """A Qwen2 adapter measured against a same-shaped Llama base, and int32 LoRA factors: inspect refuses
    both with load_adapter's own messages (it used to measure them)."""
    from minilora.errors import CheckpointError
    from minilora.loading.weights import load_model
    from minilora.lora.analysis import inspect_adapter
    from minilora.lora.peft_files import load_adapter, save_adapter
    from safetensors.torch import load_file, save_file
    save_adapter(lora_model(saved_tiny, "qwen2", targets=["q_proj"]), tmp_path / "qwen")
    llama = load_model(saved_tiny["llama-gqa"][1])
    for read in (lambda: load_adapter(llama, tmp_path / "qwen"), lambda: inspect_adapter(tmp_path / "qwen", llama)):
        with pytest.raises(CheckpointError, match=r"qwen: adapter was trained on another base model \(model_type: "
                           r"adapter 'qwen2' vs model 'llama'"):
            read()
    save_adapter(lora_model(saved_tiny, targets=["q_proj"]), tmp_path / "ints")
    file = tmp_path / "ints" / "adapter_model.safetensors"
    save_file({k: (v * 100).to(torch.int32) for k, v in load_file(file).items()}, file)
    for read in (lambda: load_adapter(load_model(saved_tiny["llama-gqa"][1]), tmp_path / "ints"),
                 lambda: inspect_adapter(tmp_path / "ints"), lambda: inspect_adapter(tmp_path / "ints", llama)):
        with pytest.raises(CheckpointError, match=r"ints.*: tensor base_model\.model\.model\.layers\.0\.self_attn\."
                           r"q_proj\.lora_A\.weight is torch\.int32, where a floating-point weight belongs"):
            read()
