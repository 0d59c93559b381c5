"""Package-level contracts: the kernel library stands alone, every module says what it is for."""
import ast
import subprocess
import sys
from pathlib import Path

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
LEAVES = ("sonar_llm.activation_checkpointing", "sonar_llm.checkpoints", "sonar_llm.dcp_safe", "sonar_llm.optim")
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
