"""The package's structure as its own imports state it (imports inside functions counted too):
dependencies flow down the README's layout list, package by package, never back up, so there is no
cycle; each subpackage imports only what its docstring says it may; model files import nothing of
LoRA or quantization, LoRA and quantization nothing of model files, the training loop no file format
but its own checkpoints; only the command line touches signal handlers; and no function of the
package runs past ~80 lines."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minilora"
GROUND = ("minilora.errors", "minilora.hardware", "minilora.fields", "minilora.names", "minilora.kernels")


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
    """The README's layout list, top to bottom: "minilora/lora/" stands for the package, "minilora/cli.py"
    for the module."""
    section = ROOT.joinpath("README.md").read_text().split("## Layout", 1)[1].split("```", 2)[1]
    return [m.group(1).replace("/", ".").rstrip(".").removesuffix(".py")
            for m in re.finditer(r"^(minilora/\S+)", section, re.M)]


def place(module: str, position: dict[str, int]) -> int | None:
    """The position in the layout of a module or of the package it belongs to (minilora.lora.inject -> minilora.lora)."""
    while module and module not in position:
        module = module.rpartition(".")[0]
    return position.get(module)


def test_imports_flow_down_the_readme_layout():
    order = readme_layout()
    position = {m: i for i, m in enumerate(order)}
    modules = OURS - {"minilora", "minilora.__main__"}
    assert None not in {place(m, position) for m in modules}, \
        f"the README lists every module: {sorted(m for m in modules if place(m, position) is None)}"
    assert {place(m, position) for m in modules} == set(range(len(order))), "the README lists only what exists"
    for m in modules:
        for n in ours(m):
            if place(n, position) != place(m, position):
                assert place(n, position) > place(m, position), f"{m} imports {n}, listed above it in the README"


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


SUBPACKAGES = sorted(p.parent for p in PACKAGE.glob("*/__init__.py"))


@pytest.mark.parametrize("folder", SUBPACKAGES, ids=lambda p: p.name)
def test_each_subpackage_imports_only_what_its_docstring_allows(folder):
    """Each subpackage's __init__ docstring says what it is for and, on a "May import:" line, which
    packages it may import ("the ground floor": errors, hardware, fields, names, kernels)."""
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    assert "May import:" in doc, f"{folder}/__init__.py: no 'May import:' in its docstring"
    allowed_text = doc.split("May import:", 1)[1].split(".\n", 1)[0].split(". ", 1)[0]
    allowed = set(re.findall(r"minilora\.[a-z_.]*[a-z_]", allowed_text))
    if "ground floor" in allowed_text:
        allowed |= set(GROUND)
    package = module_of(folder / "__init__.py")
    for m in (m for m in OURS if m.startswith(package + ".") or m == package):
        outside = {n for n in ours(m) if not n.startswith(package + ".") and n != package}
        wrong = {n for n in outside if not any(n == a or n.startswith(a + ".") for a in allowed)}
        assert not wrong, f"{m} imports {sorted(wrong)}, which {package}'s docstring does not allow"


@pytest.mark.parametrize("module, forbidden", [
    ("minilora.models", ("minilora.lora", "minilora.quant", "minilora.loading", "minilora.training", "minilora.data")),
    ("minilora.lora", ("minilora.models", "minilora.loading", "minilora.training", "minilora.data", "minilora.ship")),
    ("minilora.quant", ("minilora.models", "minilora.loading", "minilora.lora", "minilora.training")),
    ("minilora.training", ("minilora.formats.gguf", "minilora.formats.ggml_blocks", "minilora.formats.safetensors",
                           "minilora.loading", "minilora.models", "minilora.ship")),
    ("minilora.formats", ("minilora.models", "minilora.lora", "minilora.quant", "minilora.training", "minilora.data")),
    ("minilora.data", ("minilora.models", "minilora.lora", "minilora.quant", "minilora.training", "minilora.loading")),
    ("minilora.kernels", ("minilora.models", "minilora.lora", "minilora.quant", "minilora.training")),
])
def test_dependencies_flow_one_way(module, forbidden):
    for m in (m for m in OURS if m == module or m.startswith(module + ".")):
        wrong = {n for n in ours(m) if n.startswith(forbidden)}
        assert not wrong, f"{m} imports {sorted(wrong)}"


def test_only_the_command_line_handles_signals():
    assert sorted(m for m in OURS if "signal" in GRAPH[m]) == ["minilora.cli"]


def test_no_function_of_the_package_is_longer_than_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long


def test_the_check_itself_sees_imports_inside_functions():
    """A guard for the guard: an import hidden in a function counts, relative levels resolve."""
    file = PACKAGE / "models" / "common.py"
    assert "minilora.kernels" in imports(file) and "minilora.errors" in imports(file)
    assert "minilora.training.distributed" in GRAPH["minilora.training.loop"]  # `from . import distributed`
    assert "huggingface_hub" in GRAPH["minilora.formats.paths"]                 # imported inside resolve()
