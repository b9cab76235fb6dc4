"""The house rules, checked on the source: the flow goes one way and no module imports itself in a circle.

kernels -> models -> cache -> engine -> weights -> api -> distributed / bench -> serve / tui -> cli. A module may
import its own wing and any lower layer, never a higher one nor a peer wing on its own layer; imports inside
functions count too (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 450

LAYERS = {
    "qwen_mlx.errors": 0, "qwen_mlx.files": 0, "qwen_mlx.quant_formats": 0,
    "qwen_mlx.kernels": 1,
    "qwen_mlx.models": 2,
    "qwen_mlx.cache": 3,
    "qwen_mlx.engine": 4,
    "qwen_mlx.weights": 5,
    "qwen_mlx.api": 6, "qwen_mlx": 6.5,  # the package's __init__ re-exports the public API
    "qwen_mlx.distributed": 7, "qwen_mlx.bench": 7,
    "qwen_mlx.serve": 8, "tui": 8,  # the faces
    "qwen_mlx.commands": 8.5,  # each subcommand's body, run by the CLI
    "qwen_mlx.cli": 9,  # the entry point that starts every face
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    files = [*(ROOT / "qwen_mlx").rglob("*.py"), *(ROOT / "tui").rglob("*.py")]
    return {module_name(p): p for p in files}


def wing(module: str) -> str:
    """The longest LAYERS key that is the module or a package above it."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in LAYERS:
            return ".".join(parts[:n])
    raise AssertionError(f"{module} belongs to no layer: add its wing to LAYERS in {__file__}")


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules that `module` imports (resolved to the longest known module name)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            parts = name.split(".")
            for n in range(len(parts), 0, -1):
                candidate = ".".join(parts[:n])
                if candidate in known and candidate != module:
                    found.add(candidate)
                    break
    return found


def graph() -> dict[str, set[str]]:
    mods = sources()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_no_module_imports_a_higher_layer_or_a_peer_wing():
    bad = []
    for module, deps in graph().items():
        mine = wing(module)
        for dep in deps:
            theirs = wing(dep)
            if theirs == mine:
                continue
            if LAYERS[theirs] >= LAYERS[mine]:
                bad.append(f"{module} ({mine}, layer {LAYERS[mine]}) imports {dep} ({theirs}, layer {LAYERS[theirs]})")
    assert not bad, "\n".join(sorted(bad))


def test_no_import_circle():
    g = graph()
    # Tarjan's strongly connected components: any component of two or more modules is a circle.
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_checker_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a fake tree with a circle and a kernel importing the API trips both."""
    pkg = tmp_path / "qwen_mlx"
    (pkg / "kernels").mkdir(parents=True)
    (tmp_path / "tui").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "api.py").write_text("from qwen_mlx.kernels import ops\n")
    (pkg / "kernels" / "__init__.py").write_text("")
    (pkg / "kernels" / "ops.py").write_text("def f():\n    from qwen_mlx import api\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        for check in (test_no_module_imports_a_higher_layer_or_a_peer_wing, test_no_import_circle):
            try:
                check()
            except AssertionError as e:
                assert "qwen_mlx.kernels.ops" in str(e)
            else:
                raise AssertionError(f"{check.__name__} passed on a tree with a circle")
    finally:
        ROOT = saved


def test_no_module_is_longer_than_max_lines():
    lengths = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in (ROOT / "qwen_mlx").rglob("*.py")}
    long = {str(path): n for path, n in lengths.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_at_least_five_wings():
    wings = {p.parent.name for p in (ROOT / "qwen_mlx").glob("*/__init__.py")}
    assert len(wings) >= 5, wings
