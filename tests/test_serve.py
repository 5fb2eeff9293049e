"""`minilora serve` (serve.py) against the official `openai` client on 127.0.0.1: every endpoint, streaming,
32 concurrent clients for different adapters each getting exactly the greedy text that generate() gives
for its adapter alone (in batches that mixed adapters), adapters loaded and unloaded while serving,
OpenAI-style errors with their statuses, a client that disconnects mid-stream, and 500 requests with
nothing lost. The model is the tiny random Llama with a word-level tokenizer and a small chat template."""

import http.client
import json
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_model_with_tokenizer
from minilora.generate import generate
from minilora.loading.tokenizer import load_tokenizer
from minilora.loading.weights import load_model
from minilora.lora.adapters import set_adapter
from minilora.lora.inject import adapter_disabled, apply_lora
from minilora.lora.peft_files import load_adapter, save_adapter
from minilora.serve_http import make_server

openai = pytest.importorskip("openai")
TEMPLATE = "{% for m in messages %}{{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}w2 {% endif %}"
PROMPTS = ["w5 w9 w13", "w3 w8 w21 w60", "w7 w4", "w12 w44 w2 w8 w30", "w50", "w61 w62 w63"]


@pytest.fixture(scope="module")
def served(saved_tiny, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    folder = tiny_model_with_tokenizer(saved_tiny, tmp)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    adapters = {}
    for seed, name in enumerate(["a", "b", "c"]):
        torch.manual_seed(seed)
        model = apply_lora(load_model(folder), ["q_proj", "v_proj", "down_proj"], r=4, alpha=16, init_lora_weights=False)
        adapters[name] = save_adapter(model, tmp / name)
    model = load_model(folder)
    for name in ("a", "b"):
        load_adapter(model, adapters[name], adapter_name=name)
    server = make_server(model, load_tokenizer(folder), "tiny", port=0, api_key="secret", batch_wait=0.02)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    reference = load_model(folder)  # the same adapters on a model of its own, for generate() alone
    for name, path in adapters.items():
        load_adapter(reference, path, adapter_name=name)
    yield dict(port=server.server_port, folder=folder, adapters=adapters, reference=reference.eval(),
               tokenizer=load_tokenizer(folder), engine=server.RequestHandlerClass.service.engine)
    server.shutdown()
    server.server_close()


def client(served, key="secret"):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{served['port']}/v1", api_key=key, max_retries=0, timeout=60)


def alone(served, model, prompt, max_tokens, chat=False):
    """What generate() gives for this adapter ("tiny": the base) alone, greedy."""
    ref, tok = served["reference"], served["tokenizer"]
    with torch.no_grad():
        if model == "tiny":
            with adapter_disabled(ref):
                return generate(ref, tok, prompt, max_tokens, chat=chat)
        set_adapter(ref, model)
        return generate(ref, tok, prompt, max_tokens, chat=chat)


def test_models_completions_chat_and_streams(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b"]
    for model in ("a", "b", "tiny"):
        out = c.completions.create(model=model, prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert out.choices[0].text == alone(served, model, PROMPTS[0], 6) and out.model == model
        assert out.usage.prompt_tokens == 3 and out.usage.completion_tokens == 6 and out.choices[0].finish_reason == "length"
    texts = {alone(served, m, PROMPTS[1], 6) for m in ("a", "b", "tiny")}
    assert len(texts) == 3  # the adapters answer differently, so a mix-up would show
    chat = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "w5 w9"}], max_tokens=5,
                                     temperature=0)
    assert chat.choices[0].message.content == alone(served, "b", "w5 w9", 5, chat=True)
    assert chat.choices[0].message.role == "assistant"
    stream = c.completions.create(model="a", prompt=PROMPTS[2], max_tokens=7, temperature=0, stream=True)
    parts = list(stream)
    assert "".join(p.choices[0].text for p in parts) == alone(served, "a", PROMPTS[2], 7)
    assert parts[-1].choices[0].finish_reason == "length" and len(parts) > 2
    stream = c.chat.completions.create(model="b", messages=[{"role": "user", "content": "w5 w9"}], max_tokens=5,
                                       temperature=0, stream=True)
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == alone(served, "b", "w5 w9", 5, chat=True)
    # a stop string ends the text before it, streamed or not
    full = alone(served, "a", PROMPTS[0], 8)
    stop = full.split()[2]
    cut = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop], stream=True)
    assert "".join(p.choices[0].text for p in streamed) == full[:full.index(stop)]
    # sampling with a seed reproduces
    one, two = (c.completions.create(model="a", prompt=PROMPTS[3], max_tokens=6, temperature=1.0, seed=7).choices[0].text
                for _ in range(2))
    assert one == two


def test_32_concurrent_clients_get_their_own_adapter_s_text_in_mixed_batches(served):
    c = client(served)
    engine = served["engine"]
    engine.batch_log = []
    asks = [(["a", "b", "tiny"][i % 3], PROMPTS[i % len(PROMPTS)], 4 + i % 5) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda q: c.completions.create(model=q[0], prompt=q[1], max_tokens=q[2],
                                                           temperature=0).choices[0].text, asks))
    for (model, prompt, n), text in zip(asks, got):
        assert text == alone(served, model, prompt, n), (model, prompt)
    mixed = [b for b in engine.batch_log if len(set(b)) > 1]
    assert mixed and max(len(b) for b in engine.batch_log) >= 4  # rows of different adapters shared batches


def _long_prompt(served, n):
    """A prompt whose greedy completion under adapter a runs all n tokens (no EOS before)."""
    tok = served["tokenizer"]
    for prompt in PROMPTS:
        if len(tok.encode(alone(served, "a", prompt, n))) >= n - 2:
            return prompt
    pytest.skip("no prompt runs long enough on this tiny model")


def _stream_in_background(served, prompt, n):
    """A streaming greedy request for adapter a in a thread: (thread, its text so far as a list of deltas)."""
    deltas: list[str] = []

    def run():
        for part in client(served).completions.create(model="a", prompt=prompt, max_tokens=n, temperature=0,
                                                      stream=True):
            deltas.append(part.choices[0].text)
    thread = threading.Thread(target=run)
    thread.start()
    while not deltas and thread.is_alive():
        time.sleep(0.005)
    return thread, deltas


def test_a_request_joins_a_running_batch_at_the_next_step(served):
    """Continuous batching: a short request that arrives while a long one generates joins its batch (its prompt
    prefilled alone, its cache laid beside the other's, left-padded) and returns before the long one ends;
    both texts equal generate() alone."""
    engine, n = served["engine"], 60
    prompt = _long_prompt(served, n)
    engine.batch_log = []
    thread, deltas = _stream_in_background(served, prompt, n)
    short = client(served).completions.create(model="b", prompt=PROMPTS[3], max_tokens=3, temperature=0).choices[0].text
    assert thread.is_alive(), "the short request waited for the long one to end"
    thread.join()
    assert short == alone(served, "b", PROMPTS[3], 3)
    assert "".join(deltas) == alone(served, "a", prompt, n)
    steps = engine.batch_log
    first_b = next(i for i, s in enumerate(steps) if "b" in s)
    assert first_b > 0 and steps[first_b] == ["b"] and steps[first_b + 1] == ["a", "b"], steps[:first_b + 2]
    assert steps[-1] == ["a"]  # b left when it ended; a ran on alone


def test_a_waiting_request_of_another_sampling_is_not_overtaken(served):
    """First come, first served across batch keys: a sampled request waits for the running greedy batch to
    drain, and a greedy one that came after it does not join that batch meanwhile."""
    engine, n = served["engine"], 40
    prompt = _long_prompt(served, n)
    engine.batch_log = []
    thread, _ = _stream_in_background(served, prompt, n)
    c = client(served)
    with ThreadPoolExecutor(2) as pool:
        sampled = pool.submit(c.completions.create, model="b", prompt=PROMPTS[0], max_tokens=3, temperature=1.0)
        time.sleep(0.3)
        greedy = pool.submit(c.completions.create, model="tiny", prompt=PROMPTS[1], max_tokens=3, temperature=0)
        sampled.result(), greedy.result()
    thread.join()
    steps = engine.batch_log
    with_b = [i for i, s in enumerate(steps) if "b" in s]
    with_base = [i for i, s in enumerate(steps) if "__base__" in s]
    assert with_b and with_base and max(with_b) < min(with_base), steps
    assert all(s == ["a"] for s in steps[:min(with_b)]) and all(s == ["b"] for s in steps if "b" in s)


def test_adapters_load_and_unload_while_serving(served):
    c = client(served)
    post = lambda path, body: c.post(path, body=body, cast_to=str)  # noqa: E731
    assert post("/load_lora_adapter", {"lora_name": "c", "lora_path": str(served["adapters"]["c"])}).startswith("Success")
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b", "c"]
    assert c.completions.create(model="c", prompt=PROMPTS[1], max_tokens=5, temperature=0).choices[0].text == \
        alone(served, "c", PROMPTS[1], 5)
    with pytest.raises(openai.BadRequestError, match="already been loaded"):
        post("/load_lora_adapter", {"lora_name": "c", "lora_path": str(served["adapters"]["c"])})
    with pytest.raises(openai.BadRequestError, match=r"could not load the adapter from /nowhere"):
        post("/load_lora_adapter", {"lora_name": "d", "lora_path": "/nowhere"})
    assert post("/unload_lora_adapter", {"lora_name": "c"}).startswith("Success")
    with pytest.raises(openai.NotFoundError, match="The model `c` does not exist"):
        c.completions.create(model="c", prompt=PROMPTS[1], max_tokens=5)
    with pytest.raises(openai.NotFoundError, match="cannot be found"):
        post("/unload_lora_adapter", {"lora_name": "c"})
    assert [m.id for m in c.models.list().data] == ["tiny", "a", "b"]


def raw(served, method, path, body=None, key="secret"):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    conn.request(method, path, body=body if isinstance(body, (str, bytes)) or body is None else json.dumps(body),
                 headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read() or b"null")


@pytest.mark.parametrize("body, status, message", [
    ({"model": "zzz", "prompt": "w5"}, 404, r"The model `zzz` does not exist"),
    ({"prompt": "w5"}, 400, r"you must provide a model parameter"),
    ({"model": "a"}, 400, r"prompt must be a non-empty string"),
    ({"model": "a", "prompt": "w5", "max_tokens": 0}, 400, r"max_tokens must be a positive integer, got 0"),
    ({"model": "a", "prompt": "w5", "temperature": 5}, 400, r"temperature must be a number in \[0, 2\], got 5"),
    ({"model": "a", "prompt": "w5", "top_p": 0}, 400, r"top_p must be greater than 0"),
    ({"model": "a", "prompt": "w5", "stop": [""]}, 400, r"stop must be a string or up to 4 non-empty strings"),
    ({"model": "a", "prompt": "w5", "n": 2}, 400, r"n must be 1 here"),
    ({"model": "a", "prompt": "w5 w6", "max_tokens": 10 ** 6}, 400,
     r"This model's maximum context length is \d+ tokens\. However, you requested 1000002 tokens \(2 in the prompt"),
    ("{not json", 400, r"the body is not JSON"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served, body, status, message):
    got, answer = raw(served, "POST", "/v1/completions", body)
    assert got == status and re.search(message, answer["error"]["message"]), answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert client(served).completions.create(model="a", prompt="w5", max_tokens=2, temperature=0).choices[0].text


def test_the_api_key_is_checked_on_every_request(served):
    with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
        client(served, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(served, key="wrong").completions.create(model="a", prompt="w5", max_tokens=2)
    assert raw(served, "GET", "/v1/models", key="")[0] == 401


def test_a_client_that_disconnects_mid_stream_leaves_the_server_serving(served, capsys):
    conn = http.client.HTTPConnection("127.0.0.1", served["port"], timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({"model": "a", "prompt": "w5 w9", "max_tokens": 200,
                                                        "temperature": 0, "stream": True}),
                 {"Authorization": "Bearer secret", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    response.close()  # gone mid-stream
    conn.close()
    seen = ""
    for _ in range(100):  # the server notices at its next write and ends the row
        seen += capsys.readouterr().err
        if "client disconnected" in seen:
            break
        time.sleep(0.1)
    assert re.search(r"POST /v1/completions 499 .* model=a client disconnected", seen), seen
    c = client(served)
    for model in ("b", "tiny"):
        assert c.completions.create(model=model, prompt=PROMPTS[4], max_tokens=5, temperature=0).choices[0].text == \
            alone(served, model, PROMPTS[4], 5)


def test_500_requests_lose_nothing(served):
    c = client(served)
    expected = {(m, p): alone(served, m, p, 3) for m in ("a", "b", "tiny") for p in PROMPTS}
    asks = [(["a", "b", "tiny"][i % 3], PROMPTS[(i // 3) % len(PROMPTS)]) for i in range(500)]
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda q: c.completions.create(model=q[0], prompt=q[1], max_tokens=3,
                                                           temperature=0).choices[0].text, asks))
    assert len(got) == 500 and all(text == expected[q] for q, text in zip(asks, got))


def test_the_command_line_serves_and_logs_one_line_per_request(served):
    folder, adapters = served["folder"], served["adapters"]
    proc = subprocess.Popen([sys.executable, "-m", "minilora", "serve", str(folder), "--adapter", f"a={adapters['a']}",
                             "--port", "0", "--api-key", "k"], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        match = re.search(r"minilora serve: .*tiny, a on http://127\.0\.0\.1:(\d+)/v1 \(API key required\)", line)
        assert match, line
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{match[1]}/v1", api_key="k", max_retries=0, timeout=60)
        text = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=4, temperature=0).choices[0].text
        assert text == alone(served, "a", PROMPTS[0], 4)
        log = proc.stderr.readline()
        assert re.match(r"127\.0\.0\.1 POST /v1/completions 200 \d+\.\d+s model=a tokens=3\+4", log), log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_an_engine_without_its_own_thread_runs_where_it_is_told_and_stops(served):
    """make_server(engine_thread=False), as the command line does it: nothing generates until engine.run() is
    called on a thread of the caller's choosing; stop() ends run() and frees that thread."""
    reference, tokenizer = served["reference"], served["tokenizer"]
    server = make_server(reference, tokenizer, "tiny", port=0, engine_thread=False)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert server.engine.thread is None
        runner = threading.Thread(target=server.engine.run)
        runner.start()
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key="x", max_retries=0, timeout=60)
        text = c.completions.create(model="a", prompt=PROMPTS[2], max_tokens=4, temperature=0).choices[0].text
        assert text == alone(served, "a", PROMPTS[2], 4)
        server.engine.stop()
        runner.join(timeout=30)
        assert not runner.is_alive()
    finally:
        server.shutdown()
        server.server_close()
