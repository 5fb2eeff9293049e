"""A catalogue of bad inputs, each expected to end in the project's own error naming the culprit (never
a raw traceback, a silently wrong result, a hang, or lost work). Many came from an adversarial probe
of the package; each case names what it feeds in and the words the error must contain."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import Tok, examples, lora_model, tiny_model_with_tokenizer

from minilora.errors import CheckpointError, ConfigError, DataError, MiniLoraError
from minilora.loading.weights import load_model
from minilora.lora.inject import apply_lora


def copy_model(saved_tiny, tmp_path, kind="llama-gqa", **config_changes):
    folder = tmp_path / kind
    shutil.copytree(saved_tiny[kind][1], folder)
    if config_changes:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **config_changes}))
    return folder


# ---------------------------------------------------------------------------------------------
# Finished work is never lost

def test_merge_and_save_never_replace_a_folder_holding_other_work(saved_tiny, tmp_path, capsys):
    from minilora.cli import main
    from minilora.lora.peft_files import save_adapter
    model_dir = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (model_dir / "notes.txt").write_text("mine")
    save_adapter(apply_lora(load_model(model_dir), ["q_proj"], r=2), tmp_path / "adapter")
    before = sorted(p.name for p in model_dir.iterdir())
    for out in (tmp_path / "adapter", model_dir):  # merging into the adapter, or into the base model's folder
        assert main(["merge", str(model_dir), str(tmp_path / "adapter"), str(out)]) == 2
        assert "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == before
    with pytest.raises(CheckpointError, match=r"tiny holds other files \(config\.json, .*notes\.txt.*saving an adapter"):
        save_adapter(apply_lora(load_model(model_dir), ["q_proj"], r=2), model_dir)
    assert (model_dir / "notes.txt").read_text() == "mine" and (model_dir / "model.safetensors").exists()
    assert main(["merge", str(model_dir), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    assert main(["merge", str(model_dir), str(tmp_path / "adapter"), str(tmp_path / "merged"), "--overwrite"]) == 0


def test_resuming_another_runs_checkpoint_never_writes_over_a_finished_run(saved_tiny, tmp_path):
    from minilora.training.loop import TrainConfig, train
    cfg = dict(max_steps=4, micro_batch_size=2, batch_size=4, save_every=2, progress=False)
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path / "a"), **cfg))
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(output_dir=str(tmp_path / "b"), **cfg))
    kept = (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"b holds another run \(checkpoint-2, checkpoint-4, adapter\)"):
        train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(
            output_dir=str(tmp_path / "b"), resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"), **cfg))
    assert (tmp_path / "b" / "adapter" / "adapter_model.safetensors").read_bytes() == kept


# ---------------------------------------------------------------------------------------------
# No hang: a regex that backtracks exponentially is refused before it runs

def test_a_catastrophic_target_regex_is_refused_at_once(saved_tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"LoRA target regex '\(\.\*\.\*\)\*x' repeats a repetition"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), "(.*.*)*x")
    proc = subprocess.run([sys.executable, "-m", "minilora", "params", str(saved_tiny["llama-gqa"][1]), "--targets",
                           "(a+)+b"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "repeats a repetition" in proc.stderr
    assert apply_lora(load_model(saved_tiny["llama-gqa"][1]), r".*\.(q|v)_proj")  # a flat regex is fine


# ---------------------------------------------------------------------------------------------
# config.json: every value of the type and range its field needs

@pytest.mark.parametrize("kind, change, message", [
    ("llama-tied", dict(tie_word_embeddings="no"), r"tie_word_embeddings must be true or false, got 'no'"),
    ("mistral-window", dict(sliding_window=0), r"sliding_window must be a positive integer, got 0"),
    ("llama-gqa", dict(rms_norm_eps=-1.0), r"rms_norm_eps must be a positive finite number, got -1.0"),
    ("llama-gqa", dict(head_dim=-8), r"head_dim must be a positive integer, got -8"),
    ("llama-gqa", dict(rope_theta="big"), r"rope_theta must be a number or null, got 'big'"),
    ("llama-gqa", dict(max_position_embeddings=-1), r"max_position_embeddings must be a positive integer"),
    ("llama-gqa", dict(hidden_act=["silu"]), r"hidden_act must be a string, got \['silu'\]"),
    ("llama-gqa", dict(model_type=["llama"]), r"model_type \['llama'\] is not supported"),
    ("llama-gqa", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"rope_scaling 'llama3' needs low_freq_factor, high_freq_factor, original_max_position_embeddings"),
    ("llama-gqa", dict(rope_scaling={"rope_type": "yarn"}), r"rope scaling type 'yarn' is not supported"),
    ("gpt2", dict(layer_norm_epsilon=None), r"layer_norm_epsilon must be set"),
    ("gpt2", dict(resid_pdrop=1.5), r"resid_pdrop must be a probability in \[0, 1\], got 1.5"),
    ("distilbert", dict(id2label=["neg", "pos"]), r"id2label must be a table or null"),
    ("bert", dict(num_labels=0), r"num_labels must be a positive integer, got 0"),
    ("bert", dict(id2label={"a": "x"}), r"id2label must map the class ids 0, 1, \.\.\. to names"),
])
def test_config_values_of_the_wrong_type_or_range_are_named(saved_tiny, tmp_path, kind, change, message):
    folder = copy_model(saved_tiny, tmp_path, kind, **change)
    with pytest.raises(ConfigError, match=rf"config\.json: {message}" if "model_type" not in message else message):
        load_model(folder)


# ---------------------------------------------------------------------------------------------
# Checkpoint and adapter files

@pytest.mark.parametrize("damage, message", [
    ("shape", r"not a readable safetensors file, truncated or corrupt \(tensor w runs past the end"),
    ("weight_map", r"expected a weight_map object of tensor name -> shard file name"),
    ("mixed", None),
])
def test_odd_checkpoint_files(saved_tiny, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file
    folder = copy_model(saved_tiny, tmp_path)
    if damage == "shape":
        header = json.dumps({"w": {"dtype": "F32", "shape": [2 ** 32, 2 ** 32], "data_offsets": [0, 8]}}).encode()
        (folder / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    elif damage == "weight_map":
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": 5}}))
    else:  # one float64 tensor among float32 ones: with dtype=None every tensor takes the first one's dtype
        state = load_file(str(folder / "model.safetensors"))
        state["model.norm.weight"] = state["model.norm.weight"].double()
        save_file(state, str(folder / "model.safetensors"))
        model = load_model(folder, dtype=None)
        assert len({p.dtype for p in model.parameters()}) == 1
        assert model(torch.tensor([[1, 2, 3]])).isfinite().all()
        return
    with pytest.raises(CheckpointError, match=message):
        load_model(folder)


@pytest.mark.parametrize("damage, message", [
    ("rslora", r"use_rslora must be true or false, got 'false'"),
    ("norm", r"keys that match no module: base_model\.model\.model\.norm\.weight"),
    ("meta_base", r"minilora\.json: base_model is 'llama', expected an object of config values"),
    ("meta_labels", r"minilora\.json: id2label is \['a', 'b'\], expected an object of class id -> name"),
    ("bin_list", r"adapter_model\.bin: expected a dict of named tensors, found list"),
    ("modules_to_save", r"modules_to_save must be a list of module names, got 'lm_head'"),
])
def test_odd_adapter_folders(saved_tiny, tmp_path, damage, message):
    from safetensors.torch import load_file, save_file

    from minilora.lora.peft_files import load_adapter, save_adapter
    folder = saved_tiny["llama-gqa"][1]
    adapter = save_adapter(apply_lora(load_model(folder), ["q_proj"], r=2), tmp_path / "a")
    config = json.loads((adapter / "adapter_config.json").read_text())
    if damage in ("rslora", "modules_to_save"):
        config.update({"use_rslora": "false"} if damage == "rslora" else {"modules_to_save": "lm_head"})
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    elif damage == "norm":  # a tensor for a module that neither has LoRA nor is in modules_to_save
        tensors = load_file(str(adapter / "adapter_model.safetensors"))
        tensors["base_model.model.model.norm.weight"] = torch.zeros(32)
        save_file(tensors, str(adapter / "adapter_model.safetensors"))
    elif damage.startswith("meta"):
        meta = json.loads((adapter / "minilora.json").read_text())
        meta.update({"base_model": "llama"} if damage == "meta_base" else {"id2label": ["a", "b"]})
        (adapter / "minilora.json").write_text(json.dumps(meta))
    else:
        (adapter / "adapter_model.safetensors").unlink()
        torch.save([torch.zeros(2)], adapter / "adapter_model.bin")
    model = load_model(folder)
    before = model.model.norm.weight.detach().clone()
    with pytest.raises(CheckpointError, match=message):
        load_adapter(model, adapter)
    assert torch.equal(model.model.norm.weight, before)


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b""), r"x\.gguf: not a GGUF file \(too short\)"),
    (lambda p: p.mkdir(), r"x\.gguf: not a GGUF file \(a folder\)"),
])
def test_empty_or_folder_gguf(tmp_path, make, message):
    from minilora.formats.gguf import read_gguf
    make(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match=message):
        read_gguf(tmp_path / "x.gguf")


# ---------------------------------------------------------------------------------------------
# Data

def test_data_inputs_that_used_to_crash_or_mislead(saved_tiny, tmp_path):
    from minilora.data.batching import collate
    from minilora.data.records import (
        build_classification_examples,
        get_template,
        label_ids,
        read_records,
        split,
    )
    from minilora.loading.tokenizer import load_tokenizer
    rows = [{"text": "w5", "label": "--1"}, {"text": "w6", "label": "1"}]
    assert label_ids(rows) == {"--1": 0, "1": 1}  # not numbers: sorted as text, no int() crash
    with pytest.raises(DataError, match=r"val_size must be a fraction in \[0, 1\) or a count >= 0, got -3"):
        split(rows, -3)
    for template, words in ((dict(prompt="{author:d}", response=" {quote}"), "Unknown format code 'd'"),
                            (dict(prompt="{author!z}", response=" {quote}"), "Unknown conversion specifier z"),
                            (dict(prompt="{a}", response="{b}", extra="{c}"), "unknown: extra")):
        with pytest.raises(DataError, match=re.escape(words)):
            get_template(template)
    (tmp_path / "d.csv").write_text("text,text\nw5,w6\n")
    with pytest.raises(DataError, match=r"d\.csv, line 1: column 'text' appears twice in the header"):
        read_records(tmp_path / "d.csv")
    (tmp_path / "o.json").write_text('{\n  "text": "w5"\n}\n')
    with pytest.raises(DataError, match=r"o\.json: one JSON object; expected a list of records"):
        read_records(tmp_path / "o.json")
    with pytest.raises(DataError, match="no examples to collate"):
        collate([], 0)
    from minilora.data.records import Example
    with pytest.raises(DataError, match="example 0 has 3 input ids but 2 labels"):
        collate([Example([1, 2, 3], [1, 2])], 0)
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    (folder / "tokenizer_config.json").write_text("{}")  # no eos token named anywhere
    (folder / "config.json").write_text(json.dumps({k: v for k, v in json.loads((folder / "config.json").read_text()).items()
                                                    if k not in ("eos_token_id", "bos_token_id")}))
    tok = load_tokenizer(folder)
    if tok.eos_token_id is None:
        from minilora.data.records import build_examples
        with pytest.raises(DataError, match="the tokenizer has no end-of-sequence token"):
            build_examples([{"text": "w5 w6"}], tok, "text", cutoff=8)
    with pytest.raises(DataError, match=r"label 'x' is not one of 0, 1"):
        build_classification_examples([{"text": "w5", "label": "x"}], tok, {"0": 0, "1": 1})


def test_training_with_token_ids_beyond_the_embeddings_is_named(saved_tiny, tmp_path):
    from minilora.data.records import Example
    from minilora.training.loop import TrainConfig, train
    with pytest.raises(DataError, match=r"example 0 holds token id 500, beyond the model's 97 embeddings"):
        train(lora_model(saved_tiny), Tok, [Example([5, 500, 7], [5, 500, 7])], None,
              TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False))
    with pytest.raises(ConfigError, match=r"pad_to=2 is shorter than example 0 \(3 tokens\)"):
        train(lora_model(saved_tiny), Tok, [Example([5, 6, 7], [5, 6, 7])], None,
              TrainConfig(output_dir=str(tmp_path), max_steps=1, pad_to=2, progress=False))
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*32\), got 4611686018427387904"):
        TrainConfig(seed=2 ** 62)


# ---------------------------------------------------------------------------------------------
# The Python API and the command line

def test_api_arguments_that_used_to_crash_or_mislead(saved_tiny, tmp_path):
    from minilora.generate import classify, generate, generate_ids
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    from minilora.loading.tokenizer import load_tokenizer
    model, tok = load_model(folder), load_tokenizer(folder)
    assert generate(model, tok, "w5 w6", max_new_tokens=3, stop="w") == ""  # a string is one stop string
    with pytest.raises(ConfigError, match=r"stop strings must be non-empty text, got \[''\]"):
        generate(model, tok, "w5", stop=[""])
    with pytest.raises(ConfigError, match="prompts must be a string or a list of strings, got None"):
        generate(model, tok, None)
    out = generate(model, tok, "w5 w6", max_new_tokens=4, temperature=1e-300, seed=0)  # as greedy, no NaN
    assert out == generate(model, tok, "w5 w6", max_new_tokens=4)
    with pytest.raises(ConfigError, match=r"a prompt of 3 tokens and max_new_tokens=2048 run past the model's context"):
        generate_ids(model, [[5, 6, 7]], [1], 0, max_new_tokens=2048)
    with pytest.raises(ConfigError, match="the model already carries LoRA layers"):
        apply_lora(apply_lora(model, "all-linear", r=2), "all-linear", r=2)
    classifier = load_model(saved_tiny["bert"][1])
    with pytest.raises(ConfigError, match="texts must be a non-empty list of strings"):
        classify(classifier, tok, [])
    with pytest.raises(ConfigError, match="max_length must be a positive number of tokens, got 0"):
        classify(classifier, tok, ["w5"], max_length=0)


@pytest.mark.parametrize("argv, message", [
    (["generate", "{model}", "--prompt", "w5", "--stop", ""], "stop strings must be non-empty text"),
    (["classify", "{bert}", "w5 w6", "--max-length", "-5"], "max_length must be a positive number of tokens, got -5"),
    (["generate", "{model}", "--prompt", "w5", "--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["params", "{model}", "--targets", "q_proj["], "is not a valid regular expression"),
])
def test_command_line_bad_arguments_are_one_line(saved_tiny, tmp_path, argv, message):
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    bert = copy_model(saved_tiny, tmp_path, "bert")
    shutil.copy(folder / "tokenizer.json", bert / "tokenizer.json")
    argv = [a.format(model=folder, bert=bert) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "minilora", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"minilora {argv[0]}: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_error_here_is_a_minilora_error():
    """The catalogue above catches specific types; all of them derive from one base, so a script can
    catch MiniLoraError alone and the command line prints each as one line."""
    assert all(issubclass(e, MiniLoraError) for e in (CheckpointError, ConfigError, DataError))


# ---------------------------------------------------------------------------------------------
# A second round of the probe

def test_training_mistakes_refused_before_any_step(saved_tiny, tmp_path):
    from minilora.data.records import Example
    from minilora.lora.inject import merge_lora
    from minilora.training.loop import TrainConfig, train
    cfg = lambda **kw: TrainConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=2, progress=False), **kw})
    with pytest.raises(ConfigError, match=r"best_metric 'eval_bleu' is not among the metrics evaluation gives: "
                                          r"eval_loss, eval_perplexity"):
        train(lora_model(saved_tiny), Tok, examples(8), examples(2), cfg(best_metric="eval_bleu"))
    with pytest.raises(ConfigError, match=r"best_metric='eval_loss' needs evaluation data"):
        train(lora_model(saved_tiny), Tok, examples(8), None, cfg(best_metric="eval_loss", load_best_at_end=True))
    merged = lora_model(saved_tiny)
    merge_lora(merged)
    with pytest.raises(ConfigError, match=r"LoRA layers are merged into the base weights: unmerge_lora\(model\) first"):
        train(merged, Tok, examples(8), None, cfg())
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not a checkpoint folder"):
        train(lora_model(saved_tiny), Tok, examples(8), None, cfg(resume_from_checkpoint=str(tmp_path / "trainer_state.json")))
    classifier = apply_lora(load_model(saved_tiny["distilbert"][1]), ["q_lin"], r=2, modules_to_save=["classifier"])
    with pytest.raises(DataError, match=r"example 0 has class 7, but the model has 2 classes \(0 to 1\)"):
        train(classifier, Tok, [Example([5, 6], 7)], None, cfg())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage, message", [
    ("lr", r"optimizer\.pt: not this run's optimizer settings \(initial lr 100\.0, the run 0\.01\)"),
    ("step", r"optimizer\.pt: parameter 0 has taken 1000 steps, the checkpoint 4"),
    ("base_lrs", r"scheduler\.pt: base learning rates \[5\.0, 5\.0\], the run's lr is 0\.01"),
])
def test_a_checkpoint_whose_optimizer_was_tampered_with_is_refused(saved_tiny, tmp_path, damage, message):
    from minilora.training.loop import TrainConfig, train
    cfg = dict(output_dir=str(tmp_path), max_steps=4, micro_batch_size=2, batch_size=4, lr=1e-2, save_every=4,
               progress=False)
    train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg))
    ckpt = tmp_path / "checkpoint-4"
    name = "scheduler.pt" if damage == "base_lrs" else "optimizer.pt"
    state = torch.load(ckpt / name, weights_only=True)
    if damage == "lr":
        for group in state["param_groups"]:
            group["lr"] = group["initial_lr"] = 100.0
    elif damage == "step":
        state["state"][0]["step"] = torch.tensor(1000.0)
    else:
        state["base_lrs"] = [5.0, 5.0]
    torch.save(state, ckpt / name)
    with pytest.raises(CheckpointError, match=message):
        train(lora_model(saved_tiny), Tok, examples(8), None, TrainConfig(**cfg, resume_from_checkpoint="latest"))


def test_crafted_files_that_used_to_load_silently(saved_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from minilora.formats.gguf import read_gguf
    from minilora.formats.safetensors import safetensors_tensors
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "x.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(CheckpointError, match=r"tensors a and b share bytes"):
        list(safetensors_tensors(tmp_path / "x.safetensors"))
    folder = copy_model(saved_tiny, tmp_path)
    save_file(load_file(str(folder / "model.safetensors")), str(tmp_path / "elsewhere.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"shard 'elsewhere\.safetensors' lies outside the checkpoint's folder"):
        load_model(folder)
    import struct
    tensor = lambda name: struct.pack("<Q", len(name)) + name.encode() + struct.pack("<IQIQ", 1, 32, 0, 0)
    (tmp_path / "t.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2, 0) + tensor("token_embd.weight") * 2)
    with pytest.raises(CheckpointError, match=r"tensor 'token_embd\.weight' appears twice"):
        read_gguf(tmp_path / "t.gguf")


def test_api_mistakes_of_the_second_round(saved_tiny, tmp_path):
    from minilora.generate import classify, generate
    from minilora.loading.tokenizer import load_tokenizer
    from minilora.lora.inject import merge_lora, remove_lora
    folder = tiny_model_with_tokenizer(saved_tiny, tmp_path)
    model, tok = load_model(folder), load_tokenizer(folder)
    with pytest.raises(ConfigError, match=r"LoRA alpha must be a positive finite number, got alpha=inf"):
        apply_lora(model, ["q_proj"], alpha=float("inf"))
    with pytest.raises(ConfigError, match=r"LoRA target regex 'q_proj' matches no linear module \(a regex must match "
                                          r"the whole name, as '\.\*q_proj'"):
        apply_lora(model, "q_proj")
    base = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    apply_lora(model, ["q_proj"], r=2)
    torch.nn.init.normal_(model.model.layers[0].self_attn.q_proj.lora_B.weight)
    merge_lora(model)
    remove_lora(model, merge=False)  # the base layer as it was, although the adapter had been merged
    assert torch.allclose(model.model.layers[0].self_attn.q_proj.weight, base, atol=1e-6)
    with pytest.raises(ConfigError, match=r"stop strings must be non-empty text, got 5"):
        generate(model, tok, "w5", 3, stop=5)
    with pytest.raises(ConfigError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        generate(model, tok, "w5", 3, temperature=1.0, seed=2 ** 70)
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM is not a classifier"):
        classify(model, tok, ["w5"])
    classifier = load_model(saved_tiny["bert"][1])
    with pytest.raises(ConfigError, match=r"BertForSequenceClassification does not generate text"):
        generate(classifier, tok, "w5")
    assert len(classify(classifier, tok, "w5 w6")) == 1  # one text, not one per character
    with pytest.raises(ConfigError, match=r"text 0 \(''\) gives no tokens to classify"):
        classify(classifier, tok, [""])
    with pytest.raises(ConfigError, match=r"truncation must be 'right' or 'left', got 'middle'"):
        classify(classifier, tok, ["w5"], truncation="middle")
    with pytest.raises(ConfigError, match=r"num_labels=3 agree with it"):
        load_model(saved_tiny["bert"][1], num_labels=3, id2label={0: "a", 1: "b"})
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(CheckpointError, match=r"eos_token '<nope>' is not a token of this tokenizer's vocabulary"):
        load_tokenizer(folder)


def test_data_and_recipe_mistakes_of_the_second_round(saved_tiny, tmp_path, capsys):
    from conftest import write_recipe

    from minilora.cli import main
    from minilora.data.records import build_examples, label_ids, read_records
    with pytest.raises(DataError, match=r"labels \['pos', 'neg', 'pos'\] name a class twice"):
        label_ids([], labels=["pos", "neg", "pos"])
    with pytest.raises(DataError, match=r"cutoff must be a positive number of tokens, got 1\.5"):
        build_examples([{"text": "a"}], Tok, "text", cutoff=1.5)
    (tmp_path / "UP.JSONL").write_text('{"text": "w5"}\n')
    assert [dict(r) for r in read_records(tmp_path / "UP.JSONL")] == [{"text": "w5"}]
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    cases = [(recipe.read_text().replace('train = "', 'train = "" #'), r"\[data\]: train: empty"),
             (recipe.read_text().replace("max_new_tokens = 4", "max_new_tokens = 100000"),
              r"\[generate\]\.max_new_tokens: 100000 tokens after a prompt of \d+ run past the model's context of 2048")]
    for text, message in cases:
        recipe.write_text(text)
        assert main(["train", str(recipe)]) == 2
        assert re.search(message, capsys.readouterr().err)
        assert not (tmp_path / "run").exists()
    recipe.write_bytes("[model]\nname = \"caf\xe9\"\n".encode("latin-1"))
    assert main(["train", str(recipe)]) == 2
    assert "not valid TOML in UTF-8" in capsys.readouterr().err
    assert main(["train", str(tmp_path)]) == 2
    assert "a folder, not a recipe file" in capsys.readouterr().err


def test_a_classifier_whose_fresh_head_would_stay_untrained_is_refused(saved_tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from minilora.cli import main
    folder = copy_model(saved_tiny, tmp_path, "distilbert")
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if "classifier" not in k}
    save_file(state, str(folder / "model.safetensors"))  # a bare encoder: the head starts fresh
    shutil.copy(tiny_model_with_tokenizer(saved_tiny, tmp_path) / "tokenizer.json", folder / "tokenizer.json")
    rows = [{"text": f"w{5 + i % 7} w{9 + i % 5}", "label": str(i % 2)} for i in range(16)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.toml").write_text(f'[model]\nname = "{folder}"\n[lora]\ntargets = ["q_lin"]\n[data]\n'
                                     f'train = "{tmp_path / "d.jsonl"}"\ntask = "classification"\ncutoff = 8\n'
                                     f'[train]\noutput_dir = "{tmp_path / "run"}"\nmax_steps = 1\nprogress = false\n')
    assert main(["train", str(tmp_path / "r.toml")]) == 2
    err = capsys.readouterr().err
    assert "[lora].modules_to_save: the classification head starts untrained" in err and "pre_classifier, classifier" in err


# ---------------------------------------------------------------------------------------------
# A third round

def test_third_round_models_and_adapters(saved_tiny, tmp_path, capsys):
    from minilora.cli import main
    from minilora.lora.inject import merge_lora
    from minilora.lora.peft_files import save_adapter
    gpt2 = apply_lora(load_model(saved_tiny["gpt2"][1]), ["lm_head"], r=2)  # GPT-2's head is the token embedding
    with pytest.raises(ConfigError, match=r"a LoRA layer's weight is tied \(transformer\.wte, lm_head\): merging it"):
        merge_lora(gpt2)
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'q_proj': .*q_proj is adapted by LoRA or quantized"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2, modules_to_save=["q_proj"])
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'o_proj': .*o_proj is adapted by LoRA or quantized"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1], load_in_8bit=True), ["q_proj"], r=2, modules_to_save=["o_proj"])
    with pytest.raises(ConfigError, match=r"q_proj: LoRA rank r=1000000000000 is above min\(d, k\) = 32 of this layer"):
        apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=10 ** 12)
    model = apply_lora(load_model(saved_tiny["llama-gqa"][1]), ["q_proj"], r=2)
    with pytest.raises(ConfigError, match=r"extra: 'base_model' is minilora\.json's own key"):
        save_adapter(model, tmp_path / "a", extra={"base_model": "mine"})
    with pytest.raises(ConfigError, match=r"extra: not JSON data"):
        save_adapter(model, tmp_path / "a", extra={"when": object()})
    # a merged classifier keeps the adapter's label names
    bert = copy_model(saved_tiny, tmp_path, "bert")
    shutil.copy(tiny_model_with_tokenizer(saved_tiny, tmp_path) / "tokenizer.json", bert / "tokenizer.json")
    classifier = apply_lora(load_model(bert, id2label={0: "spam", 1: "ham", 2: "eggs"}), ["query"], r=2,
                            modules_to_save=["classifier"])
    save_adapter(classifier, tmp_path / "cls")
    assert main(["merge", str(bert), str(tmp_path / "cls"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["id2label"] == {"0": "spam", "1": "ham", "2": "eggs"}


def test_third_round_training_and_data(saved_tiny, tmp_path, capsys):
    from minilora.data.records import Example, read_records
    from minilora.training.loop import TrainConfig, train
    cfg = lambda **kw: TrainConfig(**{**dict(output_dir=str(tmp_path / "run"), max_steps=2, progress=False), **kw})
    with pytest.raises(DataError, match=r"the examples mix class ids \(classification\) and token labels"):
        train(lora_model(saved_tiny), Tok, [*examples(4), Example([5, 6], 0)], None, cfg())
    with pytest.raises(DataError, match=r"eval_data has no token to evaluate"):
        train(lora_model(saved_tiny), Tok, examples(4), [Example([5, 6, 7], [5, -100, -100])], cfg())
    fresh = copy_model(saved_tiny, tmp_path, "distilbert")
    from safetensors.torch import load_file, save_file
    save_file({k: v for k, v in load_file(str(fresh / "model.safetensors")).items() if "classifier" not in k},
              str(fresh / "model.safetensors"))
    head_untrained = apply_lora(load_model(fresh), ["q_lin"], r=2)
    with pytest.raises(ConfigError, match=r"the classification head starts untrained \(pre_classifier\.weight"):
        train(head_untrained, Tok, [Example([5, 6], 1), Example([7, 8], 0)], None, cfg())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text('{"text": "w5"}\n')
    (tmp_path / "data" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "data" / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text('{"text": "old"}\n')
    assert [dict(r) for r in read_records(tmp_path / "data")] == [{"text": "w5"}]
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: a \.txt file; datasets are read from \.json, \.jsonl, \.csv"):
        read_records(tmp_path / "notes.txt")
    # a fresh run keeps a log it finds beside nothing saved: moved aside, not overwritten
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"mine": true}\n')
    train(lora_model(saved_tiny), Tok, examples(8), None, cfg())
    kept = [p for p in (tmp_path / "run").iterdir() if p.name.startswith("metrics.jsonl.")]
    assert len(kept) == 1 and kept[0].read_text() == '{"mine": true}\n'
    with pytest.raises(CheckpointError, match=r"metrics\.jsonl: a file; give the checkpoint's folder"):
        train(lora_model(saved_tiny), Tok, examples(8), None, cfg(
            output_dir=str(tmp_path / "other"), resume_from_checkpoint=str(tmp_path / "run" / "metrics.jsonl")))


def test_third_round_command_line(saved_tiny, tmp_path):
    import os

    from conftest import write_recipe
    recipe, _ = write_recipe(saved_tiny, tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, "-m", "minilora", "train", str(recipe)], capture_output=True, text=True,
                          env={**env, "WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 2 and "WORLD_SIZE=2 but the process group cannot form" in proc.stderr
    recipe.write_text(recipe.read_text().replace("cutoff = 16", 'cutoff = 16\ntruncation = "middle"'))
    proc = subprocess.run([sys.executable, "-m", "minilora", "train", str(recipe)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "truncation: expected right, left or none, got 'middle'" in proc.stderr
