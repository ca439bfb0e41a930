"""The import structure: no module cycle, no arrow up the layers, no reaching into privates.

Every module under ``pipeline/``, ``stages/``, ``synth/`` and ``manifests/`` (as
``speechmill.<package>...``), ``testkit/`` and ``benchmarks/`` is read with :mod:`ast` (never
imported). Every ``import``/``from ... import`` counts, at module level, inside functions and
under ``if TYPE_CHECKING:`` alike, and so does ``importlib.import_module("literal")``.
``from x import y`` is an import of module ``x.y`` when that module exists, else of ``x``.
Benchmark scripts import their siblings by bare name (``import common``), so a bare name that
is a file beside the script resolves to it.

The rules checked:

1. no cycle: no strongly connected component of more than one module;
2. layers ``pipeline < stages < synth < manifests < testkit, benchmarks < tests``: a module
   imports only from its own layer or lower ones;
3. ``benchmarks/`` and ``testkit/`` never import ``tests``;
4. no module imports a ``_private`` name (dunders aside) from another ``speechmill`` module.

:func:`check` runs all four on any tree, so :func:`test_checker_finds_planted_faults` proves
on a small synthetic tree that each rule fires.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# layer of each module prefix: a module may import from its own layer or lower ones
LAYERS: dict[str, int] = {
    "speechmill.pipeline": 0,
    "speechmill.stages": 1,
    "speechmill.synth": 2,
    "speechmill.manifests": 3,
    "testkit": 4,
    "benchmarks": 4,
    "tests": 5,
}
# (folder under the root, dotted prefix of its modules)
SOURCES: tuple[tuple[str, str], ...] = (
    ("pipeline", "speechmill.pipeline"),
    ("stages", "speechmill.stages"),
    ("synth", "speechmill.synth"),
    ("manifests", "speechmill.manifests"),
    ("testkit", "testkit"),
    ("benchmarks", "benchmarks"),
)
NO_TESTS_IMPORT = ("testkit", "benchmarks")


@dataclass(frozen=True)
class Import:
    """One imported module (and, for ``from m import n``, the name ``n`` when not a module)."""

    importer: str
    path: Path
    line: int
    target: str
    name: str | None = None

    def where(self, root: Path) -> str:
        try:
            rel = self.path.relative_to(root)
        except ValueError:
            rel = self.path
        return f"{self.importer} ({rel}:{self.line})"


def find_modules(root: Path, sources: Iterable[tuple[str, str]]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``), for every ``.py`` under sources."""
    found: dict[str, tuple[Path, bool]] = {}
    for folder, prefix in sources:
        base = root / folder
        # files before packages, so a package ``x/`` wins over a stray ``x.py`` as in Python
        for path in sorted(base.rglob("*.py"), key=lambda p: (p.name == "__init__.py", p)):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = (path, is_pkg)
    return found


def _resolve_relative(importer: str, is_pkg: bool, level: int, module: str | None) -> str:
    package = importer.split(".") if is_pkg else importer.split(".")[:-1]
    base = package[: len(package) - (level - 1)] if level > 1 else package
    return ".".join([*base, module] if module else base)


def _script_sibling(importer: str, name: str, modules: dict[str, tuple[Path, bool]]) -> str:
    """``import common`` in ``benchmarks/x.py`` means ``benchmarks/common.py`` when it exists."""
    path, _ = modules[importer]
    if "." not in importer or (path.parent / "__init__.py").exists():
        return name
    folder = importer.rsplit(".", 1)[0]
    return f"{folder}.{name}" if f"{folder}.{name.split('.')[0]}" in modules else name


def imports_of(module: str, modules: dict[str, tuple[Path, bool]]) -> Iterator[Import]:
    """Every import in ``module``'s source, wherever it stands in the file."""
    path, is_pkg = modules[module]
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, _script_sibling(module, alias.name, modules))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _resolve_relative(module, is_pkg, node.level, node.module)
            else:
                base = _script_sibling(module, node.module or "", modules)
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                if sub in modules:
                    yield Import(module, path, node.lineno, sub)
                else:
                    yield Import(module, path, node.lineno, base, alias.name)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "importlib" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield Import(module, path, node.lineno, node.args[0].value)


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    for prefix, layer in layers.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    comps.append(sorted(comp))
    return comps


def check(root: Path, sources: Iterable[tuple[str, str]] = SOURCES,
          layers: dict[str, int] = LAYERS,
          no_tests_import: tuple[str, ...] = NO_TESTS_IMPORT) -> dict[str, list[str]]:
    """Findings per rule (``cycles``, ``upward``, ``tests``, ``private``), each a message."""
    modules = find_modules(root, sources)
    found = sorted((imp for mod in modules for imp in imports_of(mod, modules)),
                   key=lambda imp: (imp.importer, imp.line, imp.target))
    out: dict[str, list[str]] = {"cycles": [], "upward": [], "tests": [], "private": []}

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in found:
        if imp.target in modules and imp.target != imp.importer:
            graph[imp.importer].add(imp.target)
    for comp in strongly_connected(graph):
        if len(comp) > 1:
            members = set(comp)
            edges = dict.fromkeys(f"    {imp.where(root)} imports {imp.target}" for imp in found
                                  if imp.importer in members and imp.target in members
                                  and imp.target != imp.importer)
            out["cycles"].append(f"cycle between {', '.join(comp)}:\n" + "\n".join(edges))

    for imp in found:
        src, dst = layer_of(imp.importer, layers), layer_of(imp.target, layers)
        if imp.importer.split(".")[0] in no_tests_import and (
                imp.target == "tests" or imp.target.startswith("tests.")):
            out["tests"].append(f"{imp.where(root)} imports {imp.target}")
        elif src is not None and dst is not None and dst > src:
            out["upward"].append(f"{imp.where(root)} imports {imp.target} from a higher layer")
        if (imp.name and imp.name.startswith("_")
                and not (imp.name.startswith("__") and imp.name.endswith("__"))
                and imp.target.startswith("speechmill.") and imp.target != imp.importer):
            out["private"].append(f"{imp.where(root)} imports private {imp.name} "
                                  f"from {imp.target}")
    # ``from m import a, b`` is one import per name: one message per line is enough
    return {rule: list(dict.fromkeys(messages)) for rule, messages in out.items()}


def _report(findings: dict[str, list[str]]) -> str:
    titles = {"cycles": "module cycles", "upward": "imports up the layers "
              "(pipeline < stages < synth < manifests < testkit, benchmarks < tests)",
              "tests": "testkit/benchmarks importing tests",
              "private": "_private names imported from another speechmill module"}
    return "\n\n".join(f"{titles[k]} ({len(v)}):\n" + "\n".join(v)
                       for k, v in findings.items() if v)


def test_imports_follow_the_layers() -> None:
    """The project's own modules: no cycle, no arrow up, no tests import, no private name."""
    findings = check(ROOT)
    assert sum(findings.values(), []) == [], _report(findings)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_planted_faults(tmp_path: Path) -> None:
    """A synthetic tree with one fault of each kind: the checker reports each, with its line."""
    _write(tmp_path, "pipeline/__init__.py", "")
    _write(tmp_path, "pipeline/a.py", "from speechmill.pipeline import b\n")
    _write(tmp_path, "pipeline/b.py",
           "def f():\n    from . import c\n    from .c import _hidden\n")
    _write(tmp_path, "pipeline/c.py",
           "import speechmill.pipeline.a\n\n\n"
           "def g():\n    from ..stages.s import thing\n")
    _write(tmp_path, "pipeline/ok.py",
           "import importlib\n\nfrom speechmill.pipeline.a import __doc__\n\n\n"
           "def k():\n    return importlib.import_module('speechmill.stages.s')\n")
    _write(tmp_path, "stages/__init__.py", "")
    _write(tmp_path, "stages/s.py", "thing = 1\n_secret = 2\n")
    _write(tmp_path, "stages/t.py", "from speechmill.pipeline import ok\n")
    _write(tmp_path, "testkit/__init__.py", "")
    _write(tmp_path, "testkit/f.py",
           "def h():\n    from tests.x import y\n    from speechmill.stages.s import _secret\n")
    _write(tmp_path, "benchmarks/run.py", "import common\nimport numpy\n")
    _write(tmp_path, "benchmarks/common.py", "import run\n")

    sources = (("pipeline", "speechmill.pipeline"), ("stages", "speechmill.stages"),
               ("testkit", "testkit"), ("benchmarks", "benchmarks"))
    findings = check(tmp_path, sources)

    assert len(findings["cycles"]) == 2, _report(findings)
    bench_cycle, pipe_cycle = sorted(findings["cycles"])
    assert "speechmill.pipeline.a, speechmill.pipeline.b, speechmill.pipeline.c:" in pipe_cycle
    assert "speechmill.pipeline.b (pipeline/b.py:2) imports speechmill.pipeline.c" in pipe_cycle
    assert "cycle between benchmarks.common, benchmarks.run:" in bench_cycle
    assert findings["upward"] == [
        "speechmill.pipeline.c (pipeline/c.py:5) imports speechmill.stages.s from a higher layer",
        "speechmill.pipeline.ok (pipeline/ok.py:7) imports speechmill.stages.s from a higher layer",
    ]
    assert findings["tests"] == ["testkit.f (testkit/f.py:2) imports tests.x"]
    assert findings["private"] == [
        "speechmill.pipeline.b (pipeline/b.py:3) imports private _hidden "
        "from speechmill.pipeline.c",
        "testkit.f (testkit/f.py:3) imports private _secret from speechmill.stages.s",
    ]
