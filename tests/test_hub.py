"""Pushing to the Hub, against a small HTTP server on 127.0.0.1 that speaks the part of the Hub's API
huggingface-hub's client uses to create a repo and commit files (create, preupload, commit): exactly
the adapter's files arrive, byte for byte, with the model card; without a token or offline nothing is
sent and nothing local changes."""

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import write_recipe
from minilora.cli import main

TOKEN = "hf_minilora_test_token_0123456789"


class FakeHub(BaseHTTPRequestHandler):
    """Repos created, files committed (path -> bytes), and every request's path and Authorization."""
    repos: dict = {}
    requests: list = []
    cards: list = []  # the YAML metadata of each README.md the client had checked
    fail_commit = False

    def _reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while (size := int(self.rfile.readline().strip(), 16)):
                data += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
            return data
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        self.requests.append(("GET", self.path, self.headers.get("Authorization")))
        repo = self.path.split("?")[0].removeprefix("/api/models/")
        if self.path.startswith("/api/models/") and repo in self.repos:  # repo_info
            return self._reply({"id": repo, "private": self.repos[repo]["private"], "sha": "0" * 40, "siblings": []})
        self._reply({"error": "not here"}, 404)

    def do_POST(self):
        body = self._body()
        self.requests.append(("POST", self.path, self.headers.get("Authorization")))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            spec = json.loads(body)
            repo = f"{spec['organization']}/{spec['name']}"
            if repo in self.repos:
                return self._reply({"error": "You already created this model repo", "url": f"{base}/{repo}"}, 409)
            self.repos.setdefault(repo, {"private": spec.get("visibility") == "private" or spec.get("private"), "files": {}})
            return self._reply({"url": f"{base}/{repo}"})
        if self.path == "/api/validate-yaml":  # the client sends a README.md's metadata to be checked
            import yaml
            content = json.loads(body)["content"]
            meta = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else None
            if not isinstance(meta, dict):
                return self._reply({"errors": [{"message": "no YAML metadata"}]}, 400)
            FakeHub.cards.append(meta)
            return self._reply({"warnings": []})
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in self.path:
            if self.fail_commit:
                return self._reply({"error": "the server is down"}, 500)
            repo = self.path.split("/api/models/")[1].split("/commit/")[0]
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.repos[repo]["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._reply({"commitUrl": f"{base}/{repo}/commit/{'0' * 40}", "commitOid": "0" * 40})
        self._reply({"error": "unknown"}, 404)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.repos, FakeHub.requests, FakeHub.cards, FakeHub.fail_commit = {}, [], [], False
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))  # no login file
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield FakeHub
    server.shutdown()


def digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def trained(saved_tiny, tmp_path, capsys, **fields):
    recipe, _ = write_recipe(saved_tiny, tmp_path, **fields)
    assert main(["train", str(recipe)]) == 0
    capsys.readouterr()
    return tmp_path / "run" / "adapter"


def test_push_sends_exactly_the_adapter_and_a_card_made_from_its_run(saved_tiny, tmp_path, capsys, hub):
    adapter = trained(saved_tiny, tmp_path, capsys)
    (adapter / ".env").write_text(f"HF_TOKEN={TOKEN}\n")  # hidden files and links never leave the machine
    (adapter / ".git").mkdir()
    (adapter / ".git" / "config").write_text("[core]\n")
    (tmp_path / "secret").write_text(TOKEN)
    (adapter / "link").symlink_to(tmp_path / "secret")
    before = digest(tmp_path)
    assert main(["push", str(adapter), "someone/quotes-lora", "--private", "--message", "first"]) == 0
    out, err = capsys.readouterr()
    assert "pushed" in out and "someone/quotes-lora" in out
    repo = hub.repos["someone/quotes-lora"]
    assert repo["private"] is True
    local = {p.name: p.read_bytes() for p in adapter.iterdir() if not p.name.startswith(".") and not p.is_symlink()}
    assert set(repo["files"]) == set(local) | {"README.md", "loss.svg"}
    assert all(repo["files"][name] == data for name, data in local.items())  # byte for byte
    card = repo["files"]["README.md"].decode()
    assert hub.cards[-1]["library_name"] == "peft" and {"minilora", "lora"} <= set(hub.cards[-1]["tags"])
    assert "| r | `4` |" in card and "| lora_alpha | `8" in card and '"q_proj"' in card
    assert "## Evaluation" in card and "eval_loss" in card and "![training and evaluation loss](loss.svg)" in card
    assert "| lr | `0.01` |" in card and "| micro_batch_size | `2` |" in card  # the run's training settings
    assert repo["files"]["loss.svg"].startswith(b"<svg") and b"<polyline" in repo["files"]["loss.svg"]
    assert all(auth == f"Bearer {TOKEN}" for method, path, auth in hub.requests if method == "POST")
    assert TOKEN not in out + err and digest(tmp_path) == before  # nothing printed, nothing local changed
    assert not any(TOKEN.encode() in data for data in repo["files"].values())
    assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*")
                   if p.is_file() and p.name not in (".env", "secret", "link"))  # minilora wrote it nowhere


def test_a_recipe_pushes_after_training_and_refuses_before_it_without_a_token(saved_tiny, tmp_path, capsys, hub,
                                                                             monkeypatch):
    recipe, _ = write_recipe(saved_tiny, tmp_path, **{"progress = false\n": "progress = false\npush_to_hub = true\n"
                                                      "hub_model_id = \"someone/from-a-recipe\"\n"})
    monkeypatch.delenv("HF_TOKEN")
    assert main(["train", str(recipe)]) == 2
    assert "cannot push to the Hub: no token (set HF_TOKEN, or run `huggingface-cli login`)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not hub.requests  # refused before loading or training anything
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["train", str(recipe)]) == 0
    assert "pushed" in capsys.readouterr().out
    assert "adapter_model.safetensors" in hub.repos["someone/from-a-recipe"]["files"]


@pytest.mark.parametrize("case, message", [
    ("no token", r"cannot push to the Hub: no token"),
    ("offline", r"cannot push to the Hub: HF_HUB_OFFLINE is set"),
    ("bad id", r"hub repo id 'not a repo': expected 'user-or-org/name'"),
    ("server error", r"pushing .*adapter to someone/x failed: .*500"),
    ("public repo", r"someone/x exists and is public: a push with private=True does not make an existing repo private"),
    ("no server", r"pushing .*adapter to someone/x failed: ConnectError"),
])
def test_push_that_cannot_happen_fails_at_once_and_leaves_the_files(saved_tiny, tmp_path, capsys, hub, monkeypatch,
                                                                   case, message):
    import re
    adapter = trained(saved_tiny, tmp_path, capsys)
    before = digest(tmp_path)
    repo = "someone/x"
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
    elif case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    elif case == "bad id":
        repo = "not a repo"
    elif case == "public repo":
        hub.repos["someone/x"] = {"private": False, "files": {}}
    elif case == "no server":
        import huggingface_hub.constants as constants
        monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    else:
        hub.fail_commit = True
    (adapter / ".env").write_text(f"HF_TOKEN={TOKEN}\n")  # hidden files are never sent (checked below too)
    before = digest(tmp_path)
    assert main(["push", str(adapter), repo, *(["--private"] if case == "public repo" else [])]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert TOKEN not in err and digest(tmp_path) == before
    if case not in ("server error", "public repo"):
        assert not [r for r in hub.requests if r[0] == "POST"]  # nothing was sent
    if case == "public repo":
        assert hub.repos["someone/x"]["files"] == {} and not [r for r in hub.requests if "/commit/" in r[1]]


def test_pushing_a_run_folder_is_refused_naming_its_adapter_and_sends_nothing(saved_tiny, tmp_path, capsys, hub):
    """A run's folder holds checkpoints (optimizer, RNG, scheduler files): push, like load and inspect,
    names the adapter inside it rather than uploading the lot with a card that has no LoRA section."""
    adapter = trained(saved_tiny, tmp_path, capsys)  # save_every = 2: checkpoints beside the adapter
    run = adapter.parent
    before = digest(tmp_path)
    assert main(["push", str(run), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert f"{run}: a training run's folder, not an adapter: its adapter is {adapter}" in err
    assert "checkpoints: checkpoint-" in err
    assert not [r for r in hub.requests if r[0] == "POST"] and digest(tmp_path) == before
    assert main(["push", str(adapter), "someone/x"]) == 0  # the adapter it names pushes


def test_the_card_names_a_hub_base_model_and_stands_alone(tmp_path):
    """A base given as a Hub id becomes base_model (the Hub links the two); a folder alone (no run
    around it) still gets a card with the LoRA settings and no curve."""
    import yaml
    from minilora.ship.hub import model_card
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    card, curve = model_card(tmp_path, "me/x")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "peft"
    assert "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in meta["tags"] and "causal-lm" in meta["tags"]
    assert "| r | `8` |" in card and curve is None and "## Loss" not in card
