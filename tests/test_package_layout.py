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
    assert Path(out.stdout.strip()).parent.name == "kernels"


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
