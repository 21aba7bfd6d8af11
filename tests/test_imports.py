"""The import graph (issue 12): no circle, lower layers never import higher ones, one module family touches diffusers."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "t2iadapter"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: Path, *, top_level: bool) -> set[str]:
    """t2iadapter modules `path` imports: at module level only, or anywhere (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and top_level:
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES)
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_circle():
    """Module-level imports form no cycle (a package's own parents are already importing, so they are not edges)."""
    graph = {}
    for name, path in MODULES.items():
        edges = set()
        for target in imports(path, top_level=True):
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
                mod = ".".join(parts[:i])
                if mod in MODULES and not name.startswith(mod + ".") and mod != name:
                    edges.add(mod)
        graph[name] = edges
    state: dict[str, int] = {}

    def dfs(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                dfs(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node, [node])


# layer → the t2iadapter layers it must never import (anywhere, lazily included)
FORBIDDEN = {
    "t2iadapter.errors": ["t2iadapter."],
    "t2iadapter.devices": ["t2iadapter.extractors", "t2iadapter.models", "t2iadapter.formats", "t2iadapter.bases",
                           "t2iadapter.unet_hook", "t2iadapter.generation", "t2iadapter.train", "t2iadapter.server",
                           "t2iadapter.commands", "t2iadapter.demo", "t2iadapter.cli", "t2iadapter.pipeline"],
    "t2iadapter.extractors": ["t2iadapter.models", "t2iadapter.formats", "t2iadapter.generation", "t2iadapter.train",
                              "t2iadapter.server", "t2iadapter.commands", "t2iadapter.demo", "t2iadapter.cli"],
    "t2iadapter.models": ["t2iadapter.formats", "t2iadapter.bases", "t2iadapter.unet_hook", "t2iadapter.generation",
                          "t2iadapter.train", "t2iadapter.server", "t2iadapter.commands", "t2iadapter.demo",
                          "t2iadapter.cli", "t2iadapter.pipeline"],
    "t2iadapter.formats": ["t2iadapter.generation", "t2iadapter.train", "t2iadapter.server", "t2iadapter.commands",
                           "t2iadapter.cli", "t2iadapter.pipeline"],
    "t2iadapter.unet_hook": ["t2iadapter.generation", "t2iadapter.train", "t2iadapter.server", "t2iadapter.commands",
                             "t2iadapter.cli", "t2iadapter.pipeline", "t2iadapter.formats"],
    "t2iadapter.generation": ["t2iadapter.train", "t2iadapter.server", "t2iadapter.commands", "t2iadapter.cli",
                              "t2iadapter.demo", "t2iadapter.pipeline"],
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_never_import_higher_ones(layer):
    for name, path in MODULES.items():
        if name == layer or name.startswith(layer + "."):
            bad = [m for m in imports(path, top_level=False) for f in FORBIDDEN[layer]
                   if m.startswith(f) and not m.startswith(layer)]
            assert not bad, f"{name} imports {bad}"


DIFFUSERS_INTERNALS = ("down_intrablock_additional_residuals", "attention_processor", "set_attn_processor",
                       "fuse_qkv_projections", "down_blocks", "downsamplers", "encoder_hidden_states", "latent_dist",
                       "down_block_additional_residuals", "mid_block_additional_residual")
ALLOWED = ("t2iadapter.unet_hook", "t2iadapter.generation")


def test_only_the_hook_and_the_generation_wing_touch_diffusers_internals():
    for name, path in MODULES.items():
        if name.startswith(ALLOWED):
            continue
        code = ast.unparse(ast.parse(path.read_text()))  # code only: docstrings and comments may name them
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                node.value.value = ""
        code = ast.unparse(tree)
        assert not [s for s in DIFFUSERS_INTERNALS if s in code], f"{name} touches diffusers internals"


def test_request_imports_no_torch_and_key_modules_import_alone():
    code = ("import sys; import t2iadapter.generation.request as r; assert 'torch' not in sys.modules, 'torch'; "
            "import t2iadapter.models, t2iadapter.formats, t2iadapter.generation.pipeline, t2iadapter.train.loop")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": str(SRC)})
    assert out.returncode == 0, out.stderr[-2000:]
