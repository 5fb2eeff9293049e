"""No run is lost, nothing is silently wrong: a run owns its output folder (a lock for its life, no
fresh run over another run's files), resume refuses a changed run, values and data that would train
to a wrong result are refused up front, and bad input gets the project's own error naming the culprit."""

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import Tok, examples, lora_model, write_recipe

from minilora.cli import main
from minilora.errors import CheckpointError
from minilora.formats.atomic import write_atomically
from minilora.training.checkpoint import checkpoint_folders, own_output_dir
from minilora.training.loop import TrainConfig, train


def digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".")}


def quick(out, **kw):
    return TrainConfig(**{**dict(output_dir=str(out), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2,
                                 save_every=2, progress=False), **kw})


# ---------------------------------------------------------------------------------------------
# 1. A run owns its output folder

def test_a_fresh_run_refuses_a_folder_holding_another_run_and_keeps_it_byte_identical(saved_tiny, tmp_path):
    first = train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    before = digests(tmp_path)
    assert "adapter/adapter_model.safetensors" in before and "checkpoint-4/optimizer.pt" in before
    with pytest.raises(CheckpointError, match=r"holds another run \(checkpoint-2, checkpoint-4, adapter\), which a "
                                              r"fresh run would overwrite\. Resume it .*latest.* or delete it and start "
                                              r"afresh \(overwrite_output_dir = true"):
        train(lora_model(saved_tiny), Tok, examples(8, seed=3), None, quick(tmp_path))
    assert digests(tmp_path) == before  # not a byte of the first run changed
    # resuming it is allowed (it is the same run); overwriting is allowed when asked for
    resumed = train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, resume_from_checkpoint="latest"))
    assert resumed.adapter_dir == first.adapter_dir
    again = train(lora_model(saved_tiny), Tok, examples(8, seed=3), None, quick(tmp_path, overwrite_output_dir=True,
                                                                                   save_every=3))
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-3"]  # the old ones are gone
    assert digests(tmp_path)["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not again.stopped_early


HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from minilora.training.checkpoint import own_output_dir
    with own_output_dir(Path(sys.argv[1]), resuming=False, overwrite=False):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_concurrent_run_fails_at_once_naming_the_process(saved_tiny, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=rf"run: another run is training into this folder \(process "
                                                  rf"{holder.pid}\); wait for it to end, or choose another output_dir"):
            train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "run"))
        assert time.monotonic() - start < 5  # at once, not after loading or training
    finally:
        holder.kill()
        holder.wait()
    # the lock dies with its process (even a SIGKILL): the folder is free again
    assert not train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "run")).stopped_early


def test_the_same_process_cannot_hold_a_folder_twice(tmp_path):
    with own_output_dir(tmp_path, resuming=False, overwrite=False):
        with pytest.raises(CheckpointError, match=rf"process {os.getpid()}"):
            with own_output_dir(tmp_path, resuming=False, overwrite=False):
                pass
    with own_output_dir(tmp_path, resuming=False, overwrite=False):  # released on exit
        pass


def test_stale_file_clean_up_never_touches_a_live_process_temporaries(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        (tmp_path / f".adapter.tmp-{live.pid}").mkdir()      # another process writing this very folder now
        (tmp_path / f".adapter.tmp-{dead.pid}").mkdir()      # what a killed writer left
        write_atomically(tmp_path / "adapter", lambda d: (d / "a.txt").write_text("x"))
        assert (tmp_path / f".adapter.tmp-{live.pid}").is_dir()
        assert not (tmp_path / f".adapter.tmp-{dead.pid}").exists()
        assert (tmp_path / "adapter" / "a.txt").read_text() == "x"
    finally:
        live.kill()
        live.wait()


def test_a_partial_last_metrics_line_never_breaks_a_resume(saved_tiny, tmp_path):
    import shutil
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    shutil.rmtree(tmp_path / "adapter")
    shutil.rmtree(tmp_path / "checkpoint-4")  # as if killed during step 5 ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "epoch": 2.5, "lo')  # ... in the middle of writing its line
    resumed = train(lora_model(saved_tiny), Tok, examples(8), None,
                    quick(tmp_path, resume_from_checkpoint=str(tmp_path / "checkpoint-2")))
    assert not resumed.stopped_early
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_the_command_line_refuses_a_second_fresh_run_and_overwrites_when_asked(saved_tiny, tmp_path, capsys):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    assert main(["train", str(recipe)]) == 0
    before = digests(tmp_path / "run")
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "holds another run (checkpoint-2, checkpoint-4, adapter)" in err and "--train.overwrite_output_dir true" in err
    assert digests(tmp_path / "run") == before
    assert main(["train", str(recipe), "--train.overwrite_output_dir", "true", "--lora.r", "2"]) == 0
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["r"] == 2


# ---------------------------------------------------------------------------------------------
# 2. Resume and load_adapter refuse whatever would alter the run

@pytest.mark.parametrize("change, named", [
    (dict(lora=dict(alpha=16)), "lora.alpha: checkpoint 8 vs now 16"),
    (dict(lora=dict(r=2)), "lora.r: checkpoint 4 vs now 2"),
    (dict(lora=dict(dropout=0.2)), "lora.dropout: checkpoint 0.0 vs now 0.2"),
    (dict(lora=dict(use_rslora=True)), "lora.use_rslora: checkpoint False vs now True"),
    (dict(lora=dict(targets=["q_proj"])), r"lora.targets: checkpoint 'all-linear' vs now \['q_proj'\]"),
    (dict(data_seed=7), r"data: checkpoint '[0-9a-f]{16}' vs now '[0-9a-f]{16}'\) \(the training examples or their order"),
    (dict(config=dict(weight_decay=0.1)), "weight_decay: checkpoint 0.0 vs now 0.1"),
    (dict(config=dict(adam_betas=(0.8, 0.99))), r"adam_betas: checkpoint \[0.9, 0.999\] vs now \[0.8, 0.99\]"),
    (dict(config=dict(max_grad_norm=0.5)), "max_grad_norm: checkpoint 1.0 vs now 0.5"),
    (dict(config=dict(lr_schedule="cosine")), "lr_schedule: checkpoint 'linear' vs now 'cosine'"),
    (dict(config=dict(max_steps=6)), "total_steps: checkpoint 4 vs now 6"),
    (dict(config=dict(seed=1)), "seed: checkpoint 42 vs now 1"),
])
def test_resume_refuses_every_change_that_alters_the_run(saved_tiny, tmp_path, change, named):
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    model = load_model(saved_tiny["llama-gqa"][1])
    apply_lora(model, **{"targets": "all-linear", "r": 4, "alpha": 8, **change.get("lora", {})})
    data = examples(8, seed=change.get("data_seed", 0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=r"checkpoint-4: cannot resume, the run's settings changed \(.*" + named):
        train(model, Tok, data, None, quick(tmp_path, resume_from_checkpoint="latest", **change.get("config", {})))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # nothing was loaded


def test_load_adapter_never_mixes_scalings(saved_tiny, tmp_path):
    """Same shapes, other alpha: loading it onto LoRA layers of alpha 8 would scale its B·A wrongly."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import load_adapter, save_adapter
    folder = saved_tiny["llama-gqa"][1]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=4, alpha=32), tmp_path / "a")
    model = apply_lora(load_model(folder), ["q_proj"], r=4, alpha=8)
    with pytest.raises(CheckpointError, match=r"a: the adapter's LoRA settings for \S+ \(r=4, alpha=32, .*\) differ from those "
                                              r"of the LoRA layer already there \(r=4, alpha=8"):
        load_adapter(model, tmp_path / "a")
    loaded = load_adapter(load_model(folder), tmp_path / "a")  # onto the base model: its own settings
    assert {m.scaling for m in loaded.modules() if hasattr(m, "scaling")} == {32 / 4}


# ---------------------------------------------------------------------------------------------
# 7. No input can hang the program

def test_a_regex_in_an_adapter_file_is_never_run(saved_tiny, tmp_path):
    """PEFT writes target_modules as a regex when given one; a crafted one backtracks for ages on module
    names. The adapter's tensor keys name every adapted module: LoRA goes exactly there, the regex unrun."""
    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import save_adapter
    folder = saved_tiny["llama-gqa"][1]
    save_adapter(apply_lora(load_model(folder), ["q_proj"], r=2), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    config["target_modules"] = "(.*)*Z"  # exponential backtracking on a 30-character module name
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    code = textwrap.dedent(f"""
        from minilora.lora.peft_files import load_adapter
        from minilora.lora.inject import lora_modules
        from minilora.loading.weights import load_model
        model = load_adapter(load_model({str(folder)!r}), {str(tmp_path / "a")!r})
        print(sorted(n for n, _ in lora_modules(model)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str([f"model.layers.{i}.self_attn.q_proj" for i in range(2)])


# ---------------------------------------------------------------------------------------------
# 3. Values that would train to a wrong result are refused up front

@pytest.mark.parametrize("bad, message", [
    (dict(max_grad_norm=0.0), "max_grad_norm must be a positive finite number, got 0.0"),
    (dict(max_grad_norm=-1.0), "max_grad_norm must be a positive finite number, got -1.0"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm must be a positive finite number, got nan"),
    (dict(max_grad_norm=float("inf")), "max_grad_norm must be a positive finite number, got inf"),
    (dict(lr=float("inf")), "lr must be a positive finite number, got inf"),
    (dict(lr=float("nan")), "lr must be a positive finite number, got nan"),
    (dict(adam_betas=(1.0, 0.999)), r"adam_betas must be two numbers in \[0, 1\), got \[1.0, 0.999\]"),
    (dict(adam_betas=(0.9, -0.1)), r"adam_betas must be two numbers in \[0, 1\)"),
    (dict(adam_betas=(0.9,)), r"adam_betas must be two numbers in \[0, 1\), got \[0.9\]"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0, got inf"),
    (dict(warmup_steps=2.5), "warmup_steps must be an integer, got 2.5"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(overwrite_output_dir="false"), "overwrite_output_dir must be true or false, got 'false'"),
    (dict(eval_each_epoch="no"), "eval_each_epoch must be true or false, got 'no'"),
    (dict(resume_from_checkpoint=True), "resume_from_checkpoint must be a string or null, got True"),
    (dict(output_dir=None), "output_dir must be set"),
    (dict(output_dir=""), "output_dir and resume_from_checkpoint must not be empty"),
])
def test_train_config_values_that_train_wrongly_are_refused(bad, message):
    from minilora.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)


def test_warmup_longer_than_the_run_is_a_warning(saved_tiny, tmp_path):
    with pytest.warns(UserWarning, match=r"warmup_steps=100 is not shorter than the run \(4 steps\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path, warmup_steps=100))


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.5), r"temperature must be a finite number >= 0 \(0 = greedy\), got -0.5"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(temperature=1.0, top_k=0), "top_k must be a positive integer, got 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be a non-negative integer, got -1"),
    (dict(prompts=[]), "no prompts to complete"),
    (dict(prompts=[[5, 6], []]), r"prompt 1 is empty \(no tokens\)"),
    (dict(prompts=[[5, 120]]), "token id 120 is outside the model's 97 embeddings: the tokenizer does not belong"),
])
def test_generation_settings_and_prompts_are_checked(saved_tiny, kwargs, message):
    from minilora.errors import ConfigError
    from minilora.generate import generate_ids
    from minilora.loading.weights import load_model
    model = load_model(saved_tiny["llama-gqa"][1])
    prompts = kwargs.pop("prompts", [[5, 6, 7]])
    with pytest.raises(ConfigError, match=message):
        generate_ids(model, prompts, [1], 0, **kwargs)


def test_a_dataset_with_no_token_to_learn_is_an_error_naming_the_cutoff_and_the_field(saved_tiny, tmp_path):
    from conftest import tiny_model_with_tokenizer

    from minilora.data.records import Example, build_examples
    from minilora.errors import DataError
    from minilora.loading.tokenizer import load_tokenizer
    tok = load_tokenizer(tiny_model_with_tokenizer(saved_tiny, tmp_path))
    rows = [{"author": "w5 w6 w7 w8 w9 w10", "quote": "w11 w12"}, {"author": "w2 w3 w4 w5 w6 w7 w8", "quote": "w9"}]
    template = {"prompt": "{author} says", "response": " {quote}"}
    with pytest.raises(DataError, match=r"quotes: no example has a token to learn after truncation to cutoff=5 tokens "
                                        r"and masking of the prompt \(train_on_prompt = false\): the response \(quote\) "
                                        r"was cut off in every record"):
        build_examples(rows, tok, template, cutoff=5, train_on_prompt=False, source="quotes")
    some = build_examples(rows, tok, template, cutoff=8, train_on_prompt=False)
    assert some.without_targets == 1 and len(some) == 2  # the second keeps its response; the first does not
    with pytest.raises(DataError, match="train_data has no token to learn: every label is -100"):
        train(lora_model(saved_tiny), Tok, [Example([5, 6, 7], [5, -100, -100])], None, quick(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---------------------------------------------------------------------------------------------
# 4. Data errors name the line of the file

def test_data_errors_name_the_line_whatever_the_split_did(tmp_path):
    from minilora.data.records import build_examples, read_records, split
    from minilora.errors import DataError
    lines = [json.dumps({"author": f"a{i}", "quote": f"q{i}"}) for i in range(20)]
    lines[12] = json.dumps({"author": "a12"})  # line 13 of the file lacks its quote
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    train_rows, val_rows = split(read_records(tmp_path / "q.jsonl"), 0.25, seed=1)
    bad = train_rows if any("quote" not in r for r in train_rows) else val_rows

    class Words:
        eos_token_id = 1
        def encode(self, text, add_special_tokens=True):
            return [2] * len(text.split())
    with pytest.raises(DataError, match=r"q\.jsonl, line 13: missing field 'quote' \(the record has: author\)"):
        build_examples(bad, Words(), "quotes")


def test_jsonl_lines_end_at_newline_only_and_csv_keeps_multi_line_fields(tmp_path):
    from minilora.data.records import read_records
    from minilora.errors import DataError
    (tmp_path / "a.jsonl").write_text('{"text": "one\u2028two"}\n{"text": "three"}\n', encoding="utf-8")
    assert [r["text"] for r in read_records(tmp_path / "a.jsonl")] == ["one\u2028two", "three"]
    (tmp_path / "a.csv").write_text('text,label\n"a review\nover two lines",1\nshort,0\n"broken,1\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.csv, line 5: not valid CSV \(unexpected end of data\)"):
        read_records(tmp_path / "a.csv")  # an unclosed quote would otherwise swallow every later row
    (tmp_path / "c.csv").write_text("text,label\nshort,0\nextra,1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c\.csv, line 3: the record's fields do not match the header's 2 columns"):
        read_records(tmp_path / "c.csv")
    (tmp_path / "b.csv").write_text('text,label\n"a review\nover two lines",1\nshort,0\n', encoding="utf-8")
    rows = read_records(tmp_path / "b.csv")
    assert [dict(r) for r in rows] == [{"text": "a review\nover two lines", "label": "1"}, {"text": "short", "label": "0"}]
    assert [r.where.rsplit(", ", 1)[1] for r in rows] == ["line 2", "line 4"]


# ---------------------------------------------------------------------------------------------
# 5. No raw traceback for bad input: files, metadata, checkpoints, recipes, API arguments

def test_weights_that_are_not_float_or_not_finite_are_refused_by_name(saved_tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from minilora.loading.weights import load_model
    from minilora.lora.inject import apply_lora
    from minilora.lora.peft_files import load_adapter, save_adapter
    folder = tmp_path / "m"
    shutil.copytree(saved_tiny["llama-gqa"][1], folder)
    state = load_file(str(folder / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"].long()
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"m: tensor model\.norm\.weight is torch\.int64, where a "
                                              r"floating-point weight belongs"):
        load_model(folder)
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"), dtype=torch.float32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight holds NaN or infinite values"):
        load_model(folder)
    save_adapter(apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2), tmp_path / "a")
    tensors = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(tmp_path / "a" / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"adapter_model\.safetensors: tensor {re.escape(key)} holds NaN or infinite"):
        load_adapter(load_model(saved_tiny["llama-gqa"][1]), tmp_path / "a")


@pytest.mark.parametrize("header, message", [
    (b"[1, 2, 3]", r"the header is a JSON list, not an object"),
    (b'{"w": {"dtype": "F32", "shape": [2]}}', r"tensor w: expected dtype, shape \(non-negative integers\) and data_offsets"),
    (b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', r"tensor w: expected dtype, shape"),
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', r"tensor w: expected dtype, shape"),
    (b'{"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}', r"tensor w has dtype Q9, which is not supported"),
])
def test_crafted_safetensors_headers_are_named_errors(tmp_path, header, message):
    from minilora.formats.safetensors import safetensors_tensors
    file = tmp_path / "x.safetensors"
    file.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=message):
        list(safetensors_tensors(file))


def gguf_bytes(kvs: list[bytes], n_tensors: int = 0) -> bytes:
    """A GGUF v3 header by hand: magic, version, tensor count, key/value count, then the key/values."""
    import struct
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, kind: int, payload: bytes) -> bytes:
    import struct
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload


@pytest.mark.parametrize("kvs, message", [
    ([kv("general.alignment", 4, (0).to_bytes(4, "little"))], r"general\.alignment is 0, expected a positive integer"),
    ([kv("big", 9, (4).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little"))],
     r"GGUF header is truncated or corrupt at byte \d+ \(an array of 1099511627776 elements"),
    ([kv("deep", 9, b"".join((9).to_bytes(4, "little") + (1).to_bytes(8, "little") for _ in range(6))
         + (4).to_bytes(4, "little") + (0).to_bytes(8, "little"))], r"nests arrays deeper than 4"),
    ([kv("name", 8, (1 << 50).to_bytes(8, "little"))], r"truncated or corrupt at byte \d+ \(a string of"),
])
def test_crafted_gguf_metadata_is_a_named_error(tmp_path, kvs, message):
    from minilora.formats.gguf import read_gguf
    (tmp_path / "x.gguf").write_bytes(gguf_bytes(kvs))
    with pytest.raises(CheckpointError, match=message):
        read_gguf(tmp_path / "x.gguf")


def test_gguf_with_zero_heads_or_no_merges_is_a_named_error(tmp_path):
    import struct

    from minilora.errors import ConfigError
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.loading.weights import load_config
    u32 = lambda v: struct.pack("<I", v)
    text = lambda s: struct.pack("<Q", len(s)) + s.encode()
    header = [kv("general.architecture", 8, text("llama")), kv("llama.attention.head_count", 4, u32(0)),
              kv("llama.embedding_length", 4, u32(64)), kv("tokenizer.ggml.model", 8, text("gpt2")),
              kv("tokenizer.ggml.tokens", 9, u32(8) + struct.pack("<Q", 2) + text("a") + text("b"))]
    (tmp_path / "x.gguf").write_bytes(gguf_bytes(header))
    with pytest.raises(ConfigError, match=r"x\.gguf: GGUF metadata llama\.attention\.head_count is 0, expected a positive int"):
        load_config(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match=r"x\.gguf: GGUF metadata has no tokenizer\.ggml\.merges list of strings"):
        load_tokenizer(tmp_path / "x.gguf")


@pytest.mark.parametrize("damage, message", [
    ("optimizer", r"optimizer\.pt: not a readable checkpoint file, truncated or corrupt"),
    ("step", r"trainer_state\.json: expected a non-negative integer \"step\" and a \"run\" object"),
    ("best", r"trainer_state\.json: best_metric is 'low', expected a finite number or null"),
    ("nan", r"trainer_state\.json: best_metric is nan, expected a finite number or null"),
    ("bool", r"trainer_state\.json: expected a non-negative integer \"step\""),
    ("far", r"trainer_state\.json: step 999 is beyond the run's 4 steps"),
    ("moments", r"optimizer\.pt: exp_avg of parameter 0 has shape \(3,\)"),
    ("schedule", r"scheduler\.pt: the schedule is at step 'x', the checkpoint at 4"),
    ("rng", r"rng\.pt: not the random-number state of this run's rank 0"),
    ("missing", r"checkpoint-4: incomplete checkpoint, scheduler\.pt is missing"),
])
def test_damaged_training_checkpoints_are_named_errors(saved_tiny, tmp_path, damage, message):
    train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
    ckpt = tmp_path / "checkpoint-4"
    if damage == "optimizer":
        data = (ckpt / "optimizer.pt").read_bytes()
        (ckpt / "optimizer.pt").write_bytes(data[:len(data) // 2])
    elif damage in ("step", "best", "nan", "bool", "far"):
        state = json.loads((ckpt / "trainer_state.json").read_text())
        state.update({"step": {"step": "4", "bool": True, "far": 999}[damage]} if damage in ("step", "bool", "far")
                     else {"best_metric": "low" if damage == "best" else float("nan")})
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
    elif damage == "moments":
        state = torch.load(ckpt / "optimizer.pt", weights_only=True)
        state["state"][0]["exp_avg"] = torch.zeros(3)
        torch.save(state, ckpt / "optimizer.pt")
    elif damage == "schedule":
        state = torch.load(ckpt / "scheduler.pt", weights_only=True)
        state["last_epoch"] = "x"
        torch.save(state, ckpt / "scheduler.pt")
    elif damage == "rng":
        torch.save({"cpu": torch.zeros(10, dtype=torch.uint8)}, ckpt / "rng.pt")
    else:
        (ckpt / "scheduler.pt").unlink()
    model = lora_model(saved_tiny)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(CheckpointError, match=message):
        train(model, Tok, examples(8), None, quick(tmp_path, resume_from_checkpoint="latest"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # refused before loading anything


@pytest.mark.parametrize("change, message", [
    (('template = { prompt = "{author} says"', 'template = { prompt = "{author says"'),
     r"\[data\]: template: template prompt '\{author says': expected '\}' before end of string"),
    (('template = { prompt = "{author} says"', 'template = { prompt = "{0} says"'),
     r"\[data\]: template: template prompt '\{0\} says': \{0\} is not a field name"),
    (('[lora]\n', '[lora]\ntargets = "q_proj["\n'), r"\[lora\]: LoRA target regex 'q_proj\[' is not a valid regular expression"),
    (('[model]\n', '[model]\ndevice = "gpu"\n'), r"\[model\]: device: 'gpu' is not a device torch knows"),
    (('[model]\n', '[model]\ndtype = "float64x"\n'), r"\[model\]: dtype: unknown dtype 'float64x'"),
    (('[generate]\n', '[generate]\ntemperature = -1.0\n'), r"\[generate\]: temperature must be a finite number >= 0"),
    (('cutoff = 16', 'cutoff = 0'), r"\[data\]: cutoff: expected a positive number, got 0"),
])
def test_bad_recipe_values_are_named_before_anything_loads(saved_tiny, tmp_path, capsys, change, message):
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    text = recipe.read_text()
    if change[0].startswith("[lora]"):
        text = text.replace('targets = ["q_proj", "v_proj"]\n', "")
    assert change[0] in text, change
    recipe.write_text(text.replace(change[0], change[1], 1))
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()


def test_a_device_this_machine_lacks_and_odd_dtypes_are_named(saved_tiny):
    from minilora.errors import ConfigError
    from minilora.loading.weights import load_model
    folder = saved_tiny["llama-gqa"][1]
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"device: 'cuda', but this machine has 0 CUDA device\(s\)"):
            load_model(folder, device="cuda")
    with pytest.raises(ConfigError, match=r"dtype: unknown dtype 'half-ish'; use one of float32, fp32"):
        load_model(folder, dtype="half-ish")
    with pytest.raises(ConfigError, match=r"dtype: unknown dtype torch\.int8"):
        load_model(folder, dtype=torch.int8)
    assert load_model(folder, dtype="bf16").lm_head.weight.dtype == torch.bfloat16  # names are welcome


# ---------------------------------------------------------------------------------------------
# 6. A full disk or a folder that cannot be written: the path, and nothing saved is lost

def test_an_output_folder_that_cannot_be_created_is_named(saved_tiny, tmp_path):
    from minilora.lora.peft_files import save_adapter
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"file/run: cannot create this folder \(Not a directory\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path / "file" / "run"))
    with pytest.raises(CheckpointError, match=r"file: cannot create this folder"):
        save_adapter(lora_model(saved_tiny), tmp_path / "file" / "adapter")


def test_a_full_disk_while_logging_metrics_names_the_file(saved_tiny, tmp_path, monkeypatch):
    import builtins
    real_open = builtins.open

    def full(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)
    monkeypatch.setattr(builtins, "open", full)
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: No space left on device while writing the metrics log"):
        train(lora_model(saved_tiny), Tok, examples(8), None, quick(tmp_path))
