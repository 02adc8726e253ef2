"""The floor plan holds in the code: each layer imports only the layers below it (docs/architecture.md),
and no two modules import each other, directly or around a circle — counting the imports inside
functions too, which Python would only resolve at run time."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each installed package's files live (setup.py's package_dir)
PACKAGES = {"mixedae_fast": "mixedae_fast", "mixedae_fast.kernels": "kernels",
            "mixedae_fast.pipelines": "pipelines", "mixedae_fast.benchmarks": "benchmarks"}
# from the bottom up; a module may import its own layer and the ones below
LAYERS = [
    ("base", ("mixedae_fast.__init__", "mixedae_fast.choices", "mixedae_fast.fsutil", "mixedae_fast.errors",
              "mixedae_fast._compat", "mixedae_fast.provenance", "mixedae_fast.config", "mixedae_fast.config_docs",
              "mixedae_fast.tolerances", "mixedae_fast.measured")),
    ("kernels", ("mixedae_fast.kernels",)),
    ("pipelines", ("mixedae_fast.pipelines",)),
    ("model", ("mixedae_fast.model",)),
    ("train", ("mixedae_fast.train",)),
    ("downstream", ("mixedae_fast.downstream",)),
    ("workflows", ("mixedae_fast.pretrain", "mixedae_fast.study_eval", "mixedae_fast.study", "mixedae_fast.cli",
                   "mixedae_fast.benchmarks")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, folder in PACKAGES.items():
        for f in sorted((ROOT / folder).rglob("*.py")):
            rel = f.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if pkg == "mixedae_fast" and parts and parts[0] in ("kernels", "pipelines", "benchmarks"):
                continue
            out[".".join([pkg, *parts])] = f
    return out


def _layer(module: str) -> int:
    module = "mixedae_fast.__init__" if module == "mixedae_fast" else module  # the root package: a version
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ours that ``module`` imports anywhere in its file."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _graph():
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_each_layer_imports_only_the_layers_below():
    wrong = [f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
             for m, deps in _graph().items() for d in sorted(deps) if _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_check_sees_the_packages_and_a_planted_violation(tmp_path):
    """The walk finds every layer's modules, and an import from below of a layer above is reported."""
    mods = _modules()
    for _, prefixes in LAYERS:
        assert any(m == p or m.startswith(p + ".") for m in mods for p in prefixes if p != "mixedae_fast.__init__")
    planted = tmp_path / "x.py"
    planted.write_text("def f():\n    from mixedae_fast.downstream import export\n")
    deps = _imports("mixedae_fast.model.x", planted, set(mods))
    assert "mixedae_fast.downstream.export" in deps
    assert _layer("mixedae_fast.downstream.export") > _layer("mixedae_fast.model.x")


def test_no_test_module_imports_another():
    """Shared scaffolding lives in conftest.py (fixtures) and tolerances.py, never in a test module that
    another imports (which runs the imported module's tests' module-level code twice and ties them)."""
    tests = {f.stem for f in (ROOT / "tests").glob("test_*.py")}
    wrong = []
    for f in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{f.name} imports {n}" for n in names if n.split(".")[0] in tests]
    assert not wrong, wrong


def test_the_command_line_is_a_face():
    """cli.py parses, calls one function of a layer below and prints: it writes no file, starts no process and
    reads no ``sys.argv`` of its own (argparse reads the words main() was given)."""
    tree = ast.parse((ROOT / "mixedae_fast" / "cli.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"subprocess", "shutil", "json", "tempfile"}, imported
    attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attributes & {"argv", "write_text", "write_bytes", "mkdir", "chmod", "unlink", "rename", "touch",
                             "rmtree", "Popen"}, attributes
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"open", "atomic_write", "atomic_write_json"}, called
