"""Package-level contracts: the kernel library stands alone, every module says what it is for."""
import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sonar_kernels_imports_nothing_from_sonar_llm():
    code = (
        "import sys, sonar_kernels\n"
        "bad = sorted(m for m in sys.modules if m == 'sonar_llm' or m.startswith('sonar_llm.'))\n"
        "assert not bad, bad\n"
        "print(sonar_kernels.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent == ROOT / "kernels" / "sonar_kernels"


def test_no_kernel_source_mentions_sonar_llm_imports():
    for path in (ROOT / "kernels").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sonar_llm":
                raise AssertionError(f"{path} imports {node.module}")
            if isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] != "sonar_llm", f"{path} imports {alias.name}"


def test_every_module_has_a_docstring():
    missing = []
    for folder in ("kernels", "sonar_llm", "train", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "__init__.py" and not path.read_text().strip():
                continue
            if ast.get_docstring(ast.parse(path.read_text())) is None:
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, f"modules without a docstring: {missing}"


# ------------------------------------------------------------------------------------------ layering
# The layers of docs/design.md ("Layers"), bottom to top; an import may only point down (or sideways where
# drawn). Each rule: (modules it applies to, module prefixes they must not import).
APPLICATION = ("sonar_train", "bench", "scripts")
# utilities at the bottom, beside sonar_kernels: they import no layer of sonar_llm (only each other)
LEAVES = ("sonar_llm.activation_checkpointing", "sonar_llm.checkpoints", "sonar_llm.cli", "sonar_llm.dcp_safe",
          "sonar_llm.optim")
LAYERS = ("sonar_llm.sonar", "sonar_llm.data", "sonar_llm.models", "sonar_llm.eval")
LAYER_RULES = [
    ("sonar_kernels", ("sonar_llm",) + APPLICATION),
    (LEAVES, LAYERS + APPLICATION),
    ("sonar_llm.sonar", ("sonar_llm.data", "sonar_llm.models", "sonar_llm.eval") + APPLICATION),
    ("sonar_llm.data", ("sonar_llm.models", "sonar_llm.eval") + APPLICATION),
    ("sonar_llm.models", ("sonar_llm.eval",) + APPLICATION),
    ("sonar_llm", APPLICATION),
]


def _module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "train"):
        parts = parts[1:]  # source roots: kernels/sonar_kernels, train/sonar_train (setup.py package_dir)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `tree`, relative ones resolved against `module`."""
    found = []
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            if node.module is None or node.level:  # `from . import x`: x may be a module
                found.extend((node.lineno, f"{target}.{a.name}") for a in node.names)
    return found


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that change sys.path (sys.path.insert/append/extend/..., assignments) or call site.addsitedir."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                and node.value.id == "sys":
            lines.append(node.lineno)  # any use of sys.path at all is suspicious in the library
        if isinstance(node, ast.Attribute) and node.attr == "addsitedir":
            lines.append(node.lineno)
    return lines


def _in(name: str, prefixes) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layering_violations(root: Path) -> list[str]:
    """Every import under `root`/sonar_llm and `root`/kernels that points the wrong way, and every sys.path
    edit there."""
    bad = []
    for folder in ("sonar_llm", "kernels"):
        for path in sorted((root / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            module = _module_name(path, root)
            where = path.relative_to(root)
            for line in _sys_path_edits(tree):
                bad.append(f"{where}:{line} edits sys.path")
            for line, target in _imports(tree, module, path.name == "__init__.py"):
                for applies, forbidden in LAYER_RULES:
                    if _in(module, applies) and _in(target, forbidden):
                        bad.append(f"{where}:{line} ({module}) imports {target}")
                        break
    return bad


def test_imports_point_down_and_the_library_never_edits_sys_path():
    bad = layering_violations(ROOT)
    assert not bad, "wrong-way imports / sys.path edits:\n" + "\n".join(bad)


def test_the_layering_check_catches_wrong_way_imports(tmp_path):
    """The checker itself: one wrong-way import per arrow of the diagram, and a sys.path edit, are found."""
    cases = {
        "kernels/sonar_kernels/functional/bad.py": "import sonar_llm.sonar\n",
        "kernels/sonar_kernels/nn/bad2.py": "from sonar_train import loop\n",
        "sonar_llm/sonar/bad.py": "from ..data.shards import ShardedDataset\n",
        "sonar_llm/sonar/bad2.py": "from sonar_llm.models import build\n",
        "sonar_llm/sonar/bad3.py": "def f():\n    from sonar_llm.eval import evaluate\n",
        "sonar_llm/data/bad.py": "from sonar_llm.models.family import FAMILIES\n",
        "sonar_llm/models/bad.py": "from ..eval import nll\n",
        "sonar_llm/models/bad2.py": "import bench.common\n",
        "sonar_llm/eval/bad.py": "import sonar_train.config\n",
        "sonar_llm/eval/bad2.py": "from scripts import reproduce_small\n",
        "sonar_llm/optim.py": "from sonar_llm.sonar import checkpoint\n",
        "sonar_llm/dcp_safe.py": "from .models.build import build_model\n",
        "sonar_llm/checkpoints.py": "import sys\nsys.path.insert(0, '..')\n",
    }
    for rel, text in cases.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in ("kernels", "kernels/sonar_kernels/functional", "kernels/sonar_kernels/nn", "sonar_llm", "sonar_llm/sonar", "sonar_llm/data",
                "sonar_llm/models", "sonar_llm/eval"):
        (tmp_path / pkg / "__init__.py").touch()
    (tmp_path / "sonar_llm/models/fine.py").write_text("from ..sonar import checkpoint\nfrom sonar_llm.data import shards\n")
    (tmp_path / "sonar_llm/eval/fine.py").write_text("from sonar_llm.models import family\nfrom . import metrics\n")
    bad = layering_violations(tmp_path)
    flagged = {line.split(":")[0] for line in bad}
    assert flagged == {str(Path(rel)) for rel in cases}, bad
    assert any("edits sys.path" in line for line in bad)


def _family_name_uses(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """Comparisons with a family name (`x == "two_tower"`, `x in ("sonar_llm", ...)`) and dicts keyed by one."""

    def constants(node):
        if isinstance(node, ast.Constant) and node.value in names:
            yield node.value
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            for elt in node.elts:
                yield from constants(elt)

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found.extend((node.lineno, name) for name in constants(operand))
        elif isinstance(node, ast.Dict):
            for key in node.keys:
                if key is not None:
                    found.extend((node.lineno, name) for name in constants(key))
    return found


def test_only_the_registry_compares_a_family_name():
    """No module of the library, the trainer, the benchmarks or the scripts branches on a family name or
    keys a table by one (they look the family's spec up in sonar_llm.models.family): the registry is the
    one place."""
    from sonar_llm.models.family import FAMILIES

    allowed = {ROOT / "sonar_llm" / "models" / "family.py"}  # the registry
    bad = []
    for folder in ("sonar_llm", "kernels", "train", "bench", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path not in allowed:
                bad.extend(f"{path.relative_to(ROOT)}:{line} {name!r}"
                           for line, name in _family_name_uses(ast.parse(path.read_text()), set(FAMILIES)))
    assert not bad, "family names compared outside the registry:\n" + "\n".join(bad)


def test_the_family_name_check_catches_a_comparison():
    names = {"two_tower", "token_llm"}
    src = ("if family == 'two_tower':\n    pass\n"
           "ok = name in ('token_llm', 'x')\n"
           "T = {'two_tower': 0.9}\n"
           "fine = get_family(name).eos_threshold\n")
    assert sorted(_family_name_uses(ast.parse(src), names)) == [(1, "two_tower"), (3, "token_llm"), (4, "two_tower")]


# ------------------------------------------------------------------------------------ no shadowing
# kernels/ and train/ are source roots (setup.py package_dir): neither holds an __init__.py, so from the
# repository root they are at most namespace portions, which Python's import system ranks below any regular
# package of the same name wherever it lies on sys.path. `kernels` is a PyPI distribution (transformers >= 5
# imports it); `train` could be one. Where no distribution of that name is installed, `import kernels` from the
# root gives an empty namespace package over the folder: no file of the checkout runs and there is nothing to
# shadow; the tests below check both cases (the installed one in this process, an uninstalled one under -S).
SOURCE_ROOT_FOLDERS = ("kernels", "train")


def _in_repo(path) -> bool:
    try:
        Path(path).resolve().relative_to(ROOT)
        return True
    except ValueError:
        return False


@pytest.mark.parametrize("name", SOURCE_ROOT_FOLDERS)
def test_source_root_folders_never_shadow_an_installed_package(name):
    """Inside the test process (pytest puts the repository root on sys.path): `kernels` / `train` resolve to an
    installed package, or to nothing; the checkout folder only where no distribution provides the name, and then
    as a namespace portion (no file to run)."""
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py makes the folder a package that shadows"
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    places = [spec.origin] if spec.origin else []
    places += list(spec.submodule_search_locations or [])
    if not any(_in_repo(p) for p in places):
        return
    providers = importlib.metadata.packages_distributions().get(name, [])
    assert not providers, f"`{name}` resolves to the checkout ({places}) although {providers} provide(s) it"
    assert spec.origin is None and spec.submodule_search_locations is not None, \
        f"`{name}` resolves to a module of the checkout, not a namespace portion: {spec}"


def test_import_kernels_from_the_repository_root_is_not_the_project_folder():
    """`python -c "import kernels"` run from the repository root (its first sys.path entry is the root)."""
    code = ("import importlib.metadata, kernels; print(getattr(kernels, '__file__', None)); "
            "print(bool(importlib.metadata.packages_distributions().get('kernels')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:  # no distribution and no folder to fall back on: nothing imported at all
        assert "No module named 'kernels'" in out.stderr, out.stderr
        return
    file, installed = out.stdout.split()
    if installed == "True":
        assert file != "None" and not _in_repo(file), f"import kernels gave {file}"
    else:
        assert file == "None", f"import kernels ran {file}"


def test_a_regular_package_always_wins_over_a_checkout_folder(tmp_path):
    """For every top-level folder of the checkout that Python could import as a namespace portion from the
    repository root (kernels/, train/, bench/, tests/, ...), a regular package of the same name placed AFTER
    the root on sys.path (as site-packages is) is the one imported; and with no such package (-S: no
    site-packages), importing the name runs no file of the checkout."""
    names = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()
                   and not p.name.startswith(".") and not (p / "__init__.py").exists())
    assert set(SOURCE_ROOT_FOLDERS) <= set(names)
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("PLANTED = True\n")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    m = importlib.import_module(name)\n"
            "    print(name, getattr(m, 'PLANTED', False), getattr(m, '__file__', None))\n")
    planted = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert planted.returncode == 0, planted.stderr
    for line in planted.stdout.splitlines():
        name, won, _ = line.split(" ", 2)
        assert won == "True", f"the checkout's {name}/ shadowed an installed package: {line}"
    bare = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert bare.returncode == 0, bare.stderr
    for line in bare.stdout.splitlines():
        assert line.endswith(" False None"), f"importing a checkout folder ran a file: {line}"


def test_no_importable_top_level_name_of_the_checkout_is_an_installed_distribution():
    """A top-level package (folder with __init__.py) or module (*.py) of the checkout is importable from the
    repository root ahead of site-packages: none may carry a name an installed distribution provides (the
    project's own sonar_llm aside)."""
    provided = importlib.metadata.packages_distributions()
    clashes = []
    for path in sorted(ROOT.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        importable = (path.is_dir() and (path / "__init__.py").exists()) or (path.is_file() and path.suffix == ".py")
        if importable and name in provided and set(provided[name]) != {"sonar-llm"}:
            clashes.append(f"{path.name} (provided by {provided[name]})")
    assert not clashes, f"checkout names that shadow installed distributions: {clashes}"


# ------------------------------------------------------------------------------ no importorskip of our own
def _project_module_names() -> set[str]:
    """Top-level names of the project's own code: the three packages and the bench/, tests/, scripts/ modules."""
    names = {"sonar_llm", "sonar_kernels", "sonar_train", "bench", "tests", "scripts"}
    for folder in ("bench", "tests", "scripts"):
        names |= {p.stem for p in (ROOT / folder).glob("*.py")}
    return names


def importorskip_of_project_modules(paths, project: set[str]) -> list[str]:
    """`pytest.importorskip("<project module>")` calls in `paths`: a broken import of our own code would skip."""
    bad = []
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "importorskip" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
                    and node.args[0].value.split(".")[0] in project:
                bad.append(f"{path}:{node.lineno} importorskip({node.args[0].value!r})")
    return bad


def test_no_importorskip_on_the_projects_own_modules(tmp_path):
    paths = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    bad = importorskip_of_project_modules(paths, _project_module_names())
    assert not bad, "a broken import of the project would turn into a skip:\n" + "\n".join(bad)
    planted = tmp_path / "test_planted.py"
    planted.write_text("import pytest\nplan = pytest.importorskip('sonar_train.plan')\n"
                       "tf = pytest.importorskip('transformers')\n")
    assert importorskip_of_project_modules([planted], _project_module_names()) == \
        [f"{planted}:2 importorskip('sonar_train.plan')"]


# ---------------------------------------------------------------------------------- no import circles
PROJECT_SOURCE_ROOTS = {"sonar_llm": ROOT, "sonar_kernels": ROOT / "kernels", "sonar_train": ROOT / "train"}


def import_graph(source_roots: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports, every import counted: module level, inside functions, under
    `if TYPE_CHECKING`. `import a.b` / `from a import b` point at the module a.b where it exists (not at the
    package a around it), `from a import name` at a."""
    files = {}
    for package, base in source_roots.items():
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts and ".".join(parts) not in files:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for module, path in files.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - (node.level - 1)] + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in files else resolve(base))
        graph[module] = {t for t in targets if t and t != module}
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted: every circle lies in one."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(circles)


def test_no_import_circles_among_project_modules():
    circles = import_circles(import_graph(PROJECT_SOURCE_ROOTS))
    assert not circles, "import circles (make each arrow point one way):\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_a_planted_circle(tmp_path):
    """A circle through a function-local import, one through a TYPE_CHECKING import, a `from . import x` circle,
    and a one-way chain (not a circle) beside them."""
    files = {
        "pkg/__init__.py": "from .a import f\n",
        "pkg/a.py": "def f():\n    from pkg.b import g\n    return g\n",
        "pkg/b.py": "from . import a\ng = 1\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import D\n",
        "pkg/d.py": "import pkg.c\nclass D: ...\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/e.py": "from ..a import f\nfrom .. import c\n",
        "pkg/sub/x.py": "from pkg.sub import e\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph({"pkg": tmp_path})
    assert graph["pkg.sub.e"] == {"pkg.a", "pkg.c"} and graph["pkg.sub.x"] == {"pkg.sub.e"}
    assert import_circles(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.d"]]
