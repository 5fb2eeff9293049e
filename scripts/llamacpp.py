"""llama.cpp's side of the opt-in tests (`make test-llamacpp`), run with the Python of a venv that has
llama-cpp-python (it compiles llama.cpp from source; not a minilora dependency):

    python scripts/llamacpp.py quantize SRC.gguf DST.gguf Q4_K_M [--pure]    # llama.cpp's own quantizer
    python scripts/llamacpp.py logits MODEL.gguf 1,9690,314 OUT.npy [--lora ADAPTER.gguf]
    python scripts/llamacpp.py generate MODEL.gguf "Quote by Mae West:" 60 [--lora ADAPTER.gguf]
    python scripts/llamacpp.py greedy MODEL.gguf 2,818,5279 16 [--lora ADAPTER.gguf]   # ids in, ids out

`logits` writes llama.cpp's next-token logits at every position, (len(ids), vocab) float32.
"""

from __future__ import annotations

import argparse

import llama_cpp
import numpy as np


def quantize(src: str, dst: str, kind: str, pure: bool) -> None:
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}", None) or getattr(llama_cpp, f"LLAMA_FTYPE_ALL_{kind}", None)
    if ftype is None:
        raise SystemExit(f"llama.cpp has no file type {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.pure, params.nthread = ftype, True, pure, 2
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {kind}")


def logits(model: str, ids: list[int], out: str, lora: str | None) -> None:
    kwargs = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(model_path=model, logits_all=True, n_ctx=max(64, len(ids)), verbose=False, **kwargs)
    llm.eval(ids)
    np.save(out, np.asarray(llm.scores[:len(ids)], dtype=np.float32))


def generate(model: str, prompt: str, max_tokens: int, lora: str | None) -> None:
    """Greedy completion, printed as JSON: the text and why it stopped ("stop" at EOS, "length")."""
    import json
    kwargs = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(model_path=model, n_ctx=256, verbose=False, **kwargs)
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    print(json.dumps({"text": out["choices"][0]["text"], "finish_reason": out["choices"][0]["finish_reason"]}))


def greedy(model: str, ids: list[int], max_tokens: int, lora: str | None) -> None:
    """Greedy continuation of token ids (llama.cpp's own sampler at top-k 1), printed as JSON ids, up to
    and without the end-of-generation token: what minilora's generate_ids returns for the same ids."""
    import json
    kwargs = {"lora_path": lora} if lora else {}
    llm = llama_cpp.Llama(model_path=model, n_ctx=max(256, len(ids) + max_tokens), verbose=False, **kwargs)
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        if llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llm.model), token) or len(out) == max_tokens:
            break
        out.append(int(token))
    print(json.dumps(out))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("kind")
    q.add_argument("--pure", action="store_true", help="every tensor in `kind`, without llama.cpp's mixing rules")
    g = sub.add_parser("logits")
    g.add_argument("model")
    g.add_argument("ids")
    g.add_argument("out")
    g.add_argument("--lora")
    c = sub.add_parser("generate")
    c.add_argument("model")
    c.add_argument("prompt")
    c.add_argument("max_tokens", type=int)
    c.add_argument("--lora")
    r = sub.add_parser("greedy")
    r.add_argument("model")
    r.add_argument("ids")
    r.add_argument("max_tokens", type=int)
    r.add_argument("--lora")
    a = p.parse_args()
    if a.command == "quantize":
        quantize(a.src, a.dst, a.kind, a.pure)
    elif a.command == "generate":
        generate(a.model, a.prompt, a.max_tokens, a.lora)
    elif a.command == "greedy":
        greedy(a.model, [int(x) for x in a.ids.split(",")], a.max_tokens, a.lora)
    else:
        logits(a.model, [int(x) for x in a.ids.split(",")], a.out, a.lora)
