"""The package's structure as its own imports state it (imports inside functions counted too):
dependencies flow down the README's layout list, never back up, so there is no cycle; model files
import nothing of LoRA or quantization, LoRA and quantization nothing of model files, the training loop
no file-format module; and only the command line touches signal handlers."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"


def module_of(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module this file imports, at any depth of the code; `from . import x` counts as minilora.x."""
    here = module_of(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            for alias in node.names:  # `from . import distributed` imports a module, not a name
                if (PACKAGE.parent / base.replace(".", "/") / f"{alias.name}.py").is_file():
                    found.add(f"{base}.{alias.name}")
    return found


GRAPH = {module_of(p): imports(p) for p in PACKAGE.rglob("*.py")}
OURS = set(GRAPH)


def ours(module: str) -> set[str]:
    return {m for m in GRAPH[module] if m in OURS and m != "minilora"}


def readme_layout() -> list[str]:
    """The modules of the README's layout list, top to bottom ("models/" stands for the whole folder)."""
    section = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```", 2)[1]
    return [m.group(1).replace("/", ".").rstrip(".").removesuffix(".py")
            for m in re.finditer(r"^(minilora/\S+)", section, re.M)]


def test_imports_flow_down_the_readme_layout():
    order = readme_layout()
    position = {m: i for i, m in enumerate(order)}
    place = lambda m: position.get(m, position.get(m.rpartition(".")[0]))  # minilora.models.x -> minilora.models
    assert {place(m) for m in OURS if m != "minilora"} >= set(range(len(order))) and None not in \
        {place(m) for m in OURS if m not in ("minilora", "minilora.__main__")}, "the README lists every module"
    for m in OURS - {"minilora", "minilora.__main__"}:
        for n in ours(m):
            if place(n) != place(m):
                assert place(n) > place(m), f"{m} imports {n}, listed above it in the README"


def test_no_import_cycles():
    state: dict[str, str] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(ours(m)):
            if n.startswith(m + "."):
                continue  # a package importing its own modules
            assert state.get(n) != "open", "import cycle: " + " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"
    for m in sorted(OURS):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module, forbidden", [
    ("minilora.models", ("minilora.lora", "minilora.quant", "minilora.adapter", "minilora.weights", "minilora.train")),
    ("minilora.lora", ("minilora.models", "minilora.weights", "minilora.quant", "minilora.adapter", "minilora.train")),
    ("minilora.quant", ("minilora.models", "minilora.weights", "minilora.lora", "minilora.adapter", "minilora.train")),
    ("minilora.ggml", ("minilora.models", "minilora.weights", "minilora.lora", "minilora.adapter", "minilora.train")),
    ("minilora.nf4", ("minilora.models", "minilora.weights", "minilora.lora", "minilora.adapter", "minilora.train")),
    ("minilora.train", ("minilora.files", "minilora.gguf", "minilora.weights", "minilora.tokenizer", "minilora.models")),
    ("minilora.evaluate", ("minilora.files", "minilora.gguf", "minilora.weights", "minilora.tokenizer", "minilora.models",
                           "minilora.train")),
    ("minilora.kernels", ("minilora.models", "minilora.lora", "minilora.train")),
])
def test_dependencies_flow_one_way(module, forbidden):
    for m in (m for m in OURS if m == module or m.startswith(module + ".")):
        wrong = {n for n in ours(m) if n.startswith(forbidden)}
        assert not wrong, f"{m} imports {sorted(wrong)}"


def test_only_the_command_line_handles_signals():
    assert sorted(m for m in OURS if "signal" in GRAPH[m]) == ["minilora.cli"]


def test_the_check_itself_sees_imports_inside_functions(tmp_path):
    """A guard for the guard: an import hidden in a function counts, relative levels resolve."""
    file = PACKAGE / "models" / "common.py"
    assert "minilora.kernels" in imports(file) and "minilora.errors" in imports(file)
    assert "minilora.distributed" in GRAPH["minilora.train"]  # `from . import distributed, hardware`
    assert "huggingface_hub" in GRAPH["minilora.files"]       # imported inside resolve()
