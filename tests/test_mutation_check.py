"""scripts/mutation_check.py judged on a tiny fake project: only a failing test is a catch.

Each scenario plants a known kind of breakage through the script's API (main(argv, mutations, project)) in a
throw-away git repository with one package and one test file, and checks the verdict the script reads from
pytest's JUnit XML: a failing assertion is CAUGHT; a syntax error in a test file, an import error, a fixture
error, no collected test, a timeout are UNRELIABLE and fail the run; a red or incomplete baseline stops the run
before anything is planted.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("mutation_check_under_test", ROOT / "scripts" / "mutation_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module
    spec.loader.exec_module(mod)
    return mod


mc = _load_script()

PKG = '''\
def add(a, b):
    return a + b


def unused(x):
    return x * 2  # nothing tests this
'''

TESTS = '''\
import pytest

from fakepkg import add


@pytest.fixture
def three():
    return add(1, 2)


def test_add():
    assert add(2, 3) == 5


def test_add_fixture(three):
    assert three == 3
'''


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "fake"
    (root / "fakepkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "fakepkg" / "__init__.py").write_text(PKG)
    (root / "tests" / "test_fake.py").write_text(TESTS)
    _git(root, "init", "-q")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "fake")
    project = mc.Project(root=root, source_roots=(".",), packages=("fakepkg",),
                         canaries=(("fakepkg/__init__.py", "tests/test_fake.py"),), results_dir="results",
                         preload=())
    return root, project


def M(name, file, old, new, tests=("tests/test_fake.py",)):
    return mc.Mutation(name, file, old, new, "test of the script", tuple(tests))


CAUGHT = M("caught", "fakepkg/__init__.py", "return a + b", "return a - b", ("tests/test_fake.py::test_add",))


@pytest.mark.parametrize("runner", [[], ["--no-fork-server"]])
def test_a_failing_assertion_is_caught_and_the_full_run_is_recorded(fake, capsys, runner):
    root, project = fake
    assert mc.main(runner, mutations=[CAUGHT], project=project) == 0
    out = capsys.readouterr().out
    assert "CAUGHT" in out
    (record,) = (root / "results").glob("*.json")
    doc = json.loads(record.read_text())
    assert doc["commit"] == _git(root, "rev-parse", "HEAD").strip()
    assert doc["counts"] == {"CAUGHT": 1, "SURVIVED": 0, "STALE": 0, "UNRELIABLE": 0}
    assert doc["runner"] == ("subprocess" if runner else "fork server")
    (r,) = doc["results"]
    assert r["name"] == "caught" and r["status"] == "CAUGHT" and r["seconds"] > 0
    assert r["caught_by"] == ["tests/test_fake.py::test_add"]
    assert (root / "results" / (record.stem + ".md")).is_file()


def test_only_a_failing_test_counts_and_anything_else_fails_the_run(fake, capsys):
    root, project = fake
    muts = [
        CAUGHT,
        M("survivor", "fakepkg/__init__.py", "return x * 2", "return x * 3"),
        M("stale", "fakepkg/__init__.py", "text that is not there", "x"),
        M("syntax-error-in-test-file", "tests/test_fake.py", "def test_add():", "def test_add(:"),
        M("import-error", "fakepkg/__init__.py", "def add(a, b):", "raise ImportError('x')\ndef add(a, b):"),
        M("fixture-error-only", "tests/test_fake.py", "    return add(1, 2)", "    raise RuntimeError('fixture')",
          ("tests/test_fake.py::test_add_fixture",)),
        mc.Mutation("no-test-collected", "tests/test_fake.py", "def test_", "def check_", "x", ("tests/test_fake.py",),
                    count=2),  # pytest exit code 5
    ]
    assert mc.main(["-j", "2", "--no-record"], mutations=muts, project=project) == 1
    out = capsys.readouterr().out
    status = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in mc.STATUSES and parts[1] in {m.name for m in muts}:
            status[parts[1]] = parts[0]
    assert status == {"caught": "CAUGHT", "survivor": "SURVIVED", "stale": "STALE",
                      "syntax-error-in-test-file": "UNRELIABLE", "import-error": "UNRELIABLE",
                      "fixture-error-only": "UNRELIABLE", "no-test-collected": "UNRELIABLE"}, out
    assert not (root / "results").exists()  # --no-record


@pytest.mark.parametrize("tests, edit", [
    (("tests/test_fake.py::test_missing",), None),  # a named id that does not exist (pytest rc 4)
    (("tests/test_fake.py::test_add",), ("return a + b", "return a * b")),  # red baseline
    (("tests/test_broken.py",), "import not_a_module_xyz\n\n\ndef test_x():\n    pass\n"),  # import error
])
def test_a_red_or_incomplete_baseline_stops_before_planting(fake, capsys, tests, edit):
    root, project = fake
    if isinstance(edit, tuple):
        target = root / "fakepkg" / "__init__.py"
        target.write_text(target.read_text().replace(*edit))
    elif edit:  # a new (untracked) test file that cannot be imported
        (root / tests[0]).write_text(edit)
    m = M("would-be-caught", "fakepkg/__init__.py", "return x * 2", "return x * 3", tests)
    assert mc.main(["--no-record"], mutations=[m], project=project) == 1
    out = capsys.readouterr().out
    assert "BASELINE FAILED" in out
    assert "would-be-caught (" not in out  # nothing was planted


SLEEPER = '''\
import os
import subprocess
import sys
import time


def test_sleeps():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    with open("grandchild.pid", "w") as f:
        f.write(str(child.pid))
    time.sleep(120)
'''


@pytest.mark.parametrize("fork_server", [True, False])
def test_a_timeout_is_unreliable_and_ends_everything_the_run_started(fake, fork_server):
    root, project = fake
    (root / "tests" / "test_sleep.py").write_text(SLEEPER)
    if fork_server:
        mc._SERVERS = mc.ForkServers(1, ())
    try:
        run = mc.run_pytest(project, root, ["tests/test_sleep.py"], timeout=4)
    finally:
        if mc._SERVERS is not None:
            mc._SERVERS.close()
            mc._SERVERS = None
    assert run.timed_out and mc.verdict(["tests/test_sleep.py"], run)[0] == "UNRELIABLE"
    pid = int((root / "grandchild.pid").read_text())
    for _ in range(100):  # killed with its process group; gone once its parent (init) reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the test's subprocess {pid} outlived the timeout")


def test_verdict_exit_codes_and_junit_content():
    tests = ("tests/test_x.py::test_a",)
    fail = [mc.Case("tests/test_x.py::test_a", "failed", 0.1)]
    assert mc.verdict(tests, mc.Run(1, fail, "", 1.0))[0] == "CAUGHT"
    for rc in (2, 3, 4, 5, -9, 139):
        assert mc.verdict(tests, mc.Run(rc, fail, "", 1.0))[0] == "UNRELIABLE"
    assert mc.verdict(tests, mc.Run(1, fail, "", 1.0, timed_out=True))[0] == "UNRELIABLE"
    assert mc.verdict(tests, mc.Run(1, None, "", 1.0))[0] == "UNRELIABLE"
    assert mc.verdict(tests, mc.Run(1, [mc.Case(tests[0], "error", 0.1)], "", 1.0))[0] == "UNRELIABLE"
    assert mc.verdict(tests, mc.Run(0, [mc.Case(tests[0] + "[p1]", "passed", 0.1)], "", 1.0))[0] == "SURVIVED"
    assert mc.verdict(tests, mc.Run(0, [mc.Case("tests/test_x.py::test_b", "passed", 0.1)], "", 1.0))[0] == "UNRELIABLE"
    assert mc.verdict(tests, mc.Run(0, [mc.Case(tests[0], "skipped", 0.1)], "", 1.0))[0] == "UNRELIABLE"
    assert not mc.matches("tests/test_x.py::test_a", "tests/test_x.py::test_ab")


def test_changed_selects_mutations_by_planted_file_or_test_file(fake):
    root, _ = fake
    base = _git(root, "rev-parse", "HEAD").strip()
    a = M("in-pkg", "fakepkg/__init__.py", "a", "b", ("tests/test_other.py",))
    b = M("by-test", "other/mod.py", "a", "b", ("tests/test_fake.py::test_add",))
    assert mc.select_changed([a, b], mc.changed_files(root, base)) == []
    (root / "fakepkg" / "__init__.py").write_text(PKG + "\n")
    assert mc.select_changed([a, b], mc.changed_files(root, base)) == [a]
    (root / "tests" / "test_fake.py").write_text(TESTS + "\n")
    assert mc.select_changed([a, b], mc.changed_files(root, base)) == [a, b]
    with pytest.raises(ValueError):
        mc.changed_files(root, "no-such-revision")


def test_the_real_mutation_list_is_well_formed():
    names = [m.name for m in mc.MUTATIONS]
    assert len(names) == len(set(names)) and len(names) >= 80
    for m in mc.MUTATIONS:
        assert (ROOT / m.file).is_file(), m.name
        assert m.old != m.new and m.tests and m.breaks, m.name
        for t in m.tests:
            assert (ROOT / t.split("::")[0]).exists(), (m.name, t)
