"""Tokenizers from real files, and the Hub code path through huggingface-hub's own cache (offline)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from minilora.loading.tokenizer import load_tokenizer


def test_gpt2_vocab_and_merges(gpt2_tokenizer_path):
    tok = load_tokenizer(gpt2_tokenizer_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.vocab_size == 50257
    assert tok.eos_token_id == 50256 and tok.pad_token_id == 50256  # no pad token: pad with eos
    text = 'Quote by Oscar Wilde: "I can resist everything except temptation."<|endoftext|>'
    ids = tok.encode(text)
    assert ids[-1] == 50256
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_json_with_padding_switched_off(minilm_path):
    """all-MiniLM-L6-v2's tokenizer.json pads and truncates to 128; ours must do neither."""
    tok = load_tokenizer(minilm_path)
    ids = tok.encode("A man is eating food.")
    assert ids[0] == tok.token_to_id("[CLS]") and ids[-1] == tok.token_to_id("[SEP]") and len(ids) == 8
    assert len(tok.encode("word " * 300)) == 302
    assert tok.pad_token_id == tok.token_to_id("[PAD]") == 0


def test_tokenizer_files_missing(tmp_path):
    from minilora.errors import CheckpointError
    with pytest.raises(CheckpointError, match="no tokenizer.json, and no vocab.json"):
        load_tokenizer(tmp_path)


def fake_hub_cache(cache, repo_id, folder, revision="main"):
    """Lay out a model folder the way huggingface-hub caches a download."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / revision).write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_hub_repo_id_from_the_cache_in_offline_mode(saved_tiny, tmp_path):
    hf, folder = saved_tiny["llama-gqa"]
    fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-llama", folder)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent("""
        import torch
        from minilora.loading.weights import load_model
        m = load_model("tiny-org/tiny-llama")
        print(m(torch.tensor([[1, 2, 3]]))[0, -1, :4].tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor([[1, 2, 3]])).logits[0, -1, :4]
    assert torch.allclose(torch.tensor(json.loads(out)), expected, atol=1e-5)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmHWM from /proc")
def test_peak_memory_while_loading_is_about_one_model(tmp_path):
    """A 520 MB fp32 checkpoint: streaming into a meta-built model peaks near one copy, not two."""
    from safetensors.torch import save_file
    cfg = dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
               num_hidden_layers=5, num_attention_heads=16)
    with torch.device("meta"):
        from minilora.models import build_model
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    save_file({k: torch.randn(s) * 0.02 for k, s in shapes.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    size = (tmp_path / "model.safetensors").stat().st_size
    # VmHWM, the peak resident size of this process image: ru_maxrss would carry over the parent's
    # peak across fork+exec.
    code = textwrap.dedent(f"""
        import torch, minilora.loading.weights as w
        def hwm(): return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
        base = hwm()
        m = w.load_model({str(tmp_path)!r})
        sum(float(p.sum()) for p in m.parameters())  # touch every page (safetensors may map the file lazily)
        print(base, hwm())
    """)
    base, peak = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                         check=True).stdout.split())
    assert peak - base < 1.35 * size, (peak - base) / size
    print(f"peak over baseline: {(peak - base) / size:.2f} x the checkpoint")


def test_hub_dataset_id_from_the_cache_in_offline_mode(tmp_path):
    """A dataset repo id goes through huggingface-hub too (here its cache, offline)."""
    src = tmp_path / "src"
    (src / "data").mkdir(parents=True)
    (src / "data" / "quotes.jsonl").write_text('{"quote": "q1", "author": "a1"}\n{"quote": "q2", "author": "a2"}\n')
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "datasets--someone--quotes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    code = "from minilora.data import read_records; print(read_records('someone/quotes'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[{'quote': 'q1', 'author': 'a1'}, {'quote': 'q2', 'author': 'a2'}]"
