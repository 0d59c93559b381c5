"""The documentation is executed: every fenced shell command of README.md and docs/*.md runs here, on the CPU,
at a tiny budget.

- Blocks. Every code block is fenced and names its language (an indented block or a fence without a
  language fails: diagrams and file maps are ```text); ```bash / ```sh / ```shell / ```console blocks are commands. A block is one flow: its commands run
  in order (`\\` continuations joined, `$ ` prompts of console blocks dropped, `a && b` as two commands), with
  bash, in a fresh workspace folder under pytest's tmp_path, never in the checkout (the workspace links the
  checkout's train/, configs/, scripts/, bench/, docs/ and constraints.txt, read-only in use). Every command
  must exit 0. A command already run by an earlier block (the same text) is not run twice.
- Placeholders. The files the docs name (`corpus.jsonl`, `sonar_text_encoder.pt`, `model.safetensors`,
  `runs/x`, ...) are PLACEHOLDERS: small real-format files built once per session (a toy SONAR reading and
  writing 1024-d embeddings as the released one does, story JSONL, shards, a tiny trained run and its export, a
  public-format checkpoint of the public SONAR-LLM code, TinyStories files). A block's workspace holds every
  placeholder its text names, except those it writes before reading (`--out X`, `--output X`). SONAR_ENCODER /
  SONAR_DECODER / SONAR_TOKENIZER point at the toy SONAR (the README's way of naming the models), HOME is a
  folder of the workspace (so `~/...` and the registry file are the test's), CUDA is hidden.
- Budget. `python train/main.py` (the embedded default) runs with DEFAULT_BUDGET (its documented variables:
  SONAR_LLM_TINY_STEPS, SONAR_LLM_DEFAULT_STEPS, SONAR_LLM_DEFAULT_STORIES small, SONAR_LLM_END_CHECK=warn); every training command with a --config gets TRAIN_BUDGET appended (the
  last value of a key wins), the run planner PLAN_BUDGET; torchrun runs one process.
- What is not run is listed, with the reason, in NOT_RUN below: the one place. A listed command that is no
  longer in the docs fails too, and so does a documented command that neither runs nor is listed.
A self-test plants a broken command in a temporary doc and checks that it fails.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------------------
# The one table of documented commands that are NOT run here (exact command text, comments dropped) -> why.
NOT_RUN = {
    'pip install -e ".[dev]" -c constraints.txt':
        "installs the project; this test runs inside that install, and .ci/run runs exactly this line "
        "(checked by test_install_and_test_commands_are_the_ci_ones)",
    'pip install -e ".[dev]"':
        "installs the project (as above, without the pins)",
    "python -m pytest -q --benchmark-disable":
        "the test suite this test is part of; .ci/run runs exactly this line (checked below)",
    "scripts/build_native.sh":
        "compiles the C++ library (minutes on 2 cores); .ci/run runs it wherever cmake and a compiler exist",
    "pytest bench/test_bench_native.py":
        "a timing benchmark (pytest-benchmark repeats it); CI runs the same file once with --benchmark-disable",
    "SONAR_BENCH_NATIVE_SHAPE=512,65536,1024 pytest bench/test_bench_native.py":
        "a timing benchmark at a 256 MiB vocabulary weight; the shape variable is tested in tests/test_bench_common.py",
    "python -m sonar_llm.data.tinystories --out data/tinystories":
        "downloads TinyStories from the Hugging Face hub (no network here); the offline layouts run below",
    "python -m sonar_train.plan --results bench/results/plan":
        "rewrites the committed result set in bench/results/plan (every preset at 1 and 8 GPUs, minutes); "
        "tests/test_plan.py checks the planner, the line above runs one plan",
    "python scripts/mutation_check.py -j 2":
        "runs the test suite once per mutation (about 600 s); not part of CI by design (docs/design.md)",
    "python scripts/mutation_check.py --only 'lce-*'":
        "runs the linear cross-entropy tests once per matching mutation (minutes); --list above runs",
    "torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29500 --rdzv-id=run42 "
    "train/main.py --config configs/two_tower_1.3b.toml":
        "a 4-node rendezvous: waits for three other hosts; the single-node torchrun lines run",
}
# Documented commands that run only where the native library is built (they report its absence, exit 1).
NEEDS_NATIVE = {"python -m sonar_kernels.native status"}

# Training commands with a --config (not --dry-run) get this appended: a tiny model and two steps on the CPU.
TRAIN_BUDGET = ["--model.preset=tiny", "--train.steps=2", "--train.precision=fp32", "--data.max_sentences=64",
                "--data.max_tokens=2048", "--data.workers=0", "--train.eval_every=2", "--train.eval_batches=1",
                "--train.checkpoint_every=2", "--train.log_every=1", "--train.peak_flops=1e9"]
# The run planner with a --config gets this appended: the tiny preset, without the public-code path and the
# largest-batch fit (the 600M plan of the docs traces for minutes on 2 cores; tests/test_plan.py checks the planner).
PLAN_BUDGET = ["--model.preset=tiny", "--no-public", "--no-fit"]
# The embedded default (`python train/main.py`): its documented budget variables, set small.
# (a 2-step tiny SONAR cannot decode the end sentence: the pipeline's check warns instead of stopping)
DEFAULT_BUDGET = {"SONAR_LLM_TINY_STEPS": "2", "SONAR_LLM_DEFAULT_STEPS": "2", "SONAR_LLM_DEFAULT_STORIES": "48",
                  "SONAR_LLM_END_CHECK": "warn"}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
LINKED = ("train", "configs", "scripts", "bench", "docs", "constraints.txt")
COMMAND_TIMEOUT_S = 600
SONAR_DIM = 1024  # the released SONAR's embedding size, which a public SONAR-LLM checkpoint reads


def doc_paths() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


# ------------------------------------------------------------------------------------------------- parsing
@dataclass
class Block:
    doc: Path
    line: int
    lang: str
    text: str

    @property
    def where(self) -> str:
        try:
            return f"{self.doc.relative_to(ROOT)}:{self.line}"
        except ValueError:
            return f"{self.doc.name}:{self.line}"


FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$")


def fenced_blocks(path: Path) -> list[Block]:
    """Every fenced block of a markdown file, with its info string's first word (or "")."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), (m.group("info").strip().split() or [""])[0], i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and not lines[i].strip().strip(fence[0])):
            body.append(lines[i])
            i += 1
        blocks.append(Block(path, start + 1, lang.lower(), "\n".join(body)))
        i += 1
    return blocks


LIST_ITEM = re.compile(r"^\s*([-*+]|\d+[.)])\s")


def indented_code_blocks(path: Path) -> list[int]:
    """Lines that open an indented (4-space) code block: after a blank line, outside fences, not continuing a
    list item or another indented line. Commands there would escape this test, so the docs fence them."""
    found, lines, fenced = [], path.read_text(encoding="utf-8").splitlines(), False
    for i, line in enumerate(lines):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced or not line.startswith("    ") or not line.strip() or i == 0 or lines[i - 1].strip():
            continue
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j < 0 or not (LIST_ITEM.match(lines[j]) or lines[j].startswith("  ")):
            found.append(i + 1)
    return found


def _strip_comment(line: str) -> str:
    """`line` without a trailing shell comment (a `#` outside quotes that starts a word)."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
            elif ch == "\\" and quote == '"':
                continue
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1].isspace()):
            return line[:k].rstrip()
    return line.rstrip()


def _split_and(command: str) -> list[str]:
    """`a && b` -> [a, b] (outside quotes)."""
    parts, quote, start = [], None, 0
    for k, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif command.startswith("&&", k):
            parts.append(command[start:k].strip())
            start = k + 2
    parts.append(command[start:].strip())
    return [p for p in parts if p]


def commands(block: Block) -> list[str]:
    """The block's commands: continuations joined, comments and console prompts dropped, `&&` split."""
    out, pending = [], ""
    for raw in block.text.splitlines():
        line = raw.rstrip()
        if block.lang == "console" and not pending:
            if not line.lstrip().startswith("$ "):
                continue  # output lines of a console transcript
            line = line.lstrip()[2:]
        if pending:
            line = pending + " " + line.strip()
            pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        line = _strip_comment(line).strip()
        if line:
            out.extend(" ".join(part.split()) if '"' not in part and "'" not in part else part
                       for part in _split_and(line))
    if pending:
        out.append(_strip_comment(pending).strip())
    return out


def shell_blocks(paths) -> list[Block]:
    return [b for p in paths for b in fenced_blocks(p) if b.lang in SHELL_LANGS]


# ------------------------------------------------------------------------------------------- placeholders
def _tiny_run(assets: Path, name: str, family: str = "sonar_llm", extra: tuple[str, ...] = ()) -> Path:
    """A SONAR-LLM trained two steps on the placeholder shards (the trainer's own loop), exported."""
    from sonar_train.config import load_config
    from sonar_train.export import export
    from sonar_train.loop import run_training

    run_dir = assets / "runs" / name
    cfg = load_config(str(ROOT / "configs" / "default.toml"), [
        f"--model.family={family}", f"--data.path={assets / 'data' / 'train'}",
        f"--data.val_path={assets / 'data' / 'valid'}", *TRAIN_BUDGET, f"--train.out_dir={run_dir}",
        f"--sonar.decoder={assets / 'sonar_text_decoder.pt'}", f"--sonar.encoder={assets / 'sonar_text_encoder.pt'}",
        f"--sonar.tokenizer={assets / 'sentencepiece.source.256000.model'}", *extra])
    run_training(cfg)
    export(run_dir, run_dir / "model.safetensors")
    return run_dir


def build_placeholders(assets: Path) -> dict[str, Path]:
    """Every placeholder file the docs name, built into `assets`: name in the docs -> path."""
    from fixtures_sonar import make_spm_model, toy_decoder, toy_encoder

    from sonar_llm.data.preprocess import load_sonar_codec, preprocess
    from sonar_llm.sonar import NllbTokenizer
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
    from sonar_llm.sonar.story_corpus import generate_stories, write_corpus

    assets.mkdir(parents=True, exist_ok=True)
    spm = assets / "sentencepiece.source.256000.model"
    shutil.copy(make_spm_model(assets / "spm", vocab_size=200), spm)
    tok = NllbTokenizer(spm)  # every NLLB language, as the commands load it
    kw = dict(vocab_size=tok.vocab_size, lang_offset=tok.lang_offset)
    save_fairseq2_checkpoint(toy_encoder(seed=1, model_dim=SONAR_DIM, **kw), assets / "sonar_text_encoder.pt")
    save_fairseq2_checkpoint(toy_decoder(seed=2, std=0.5, encoder_dim=SONAR_DIM, **kw),
                             assets / "sonar_text_decoder.pt")
    stories = generate_stories(40, seed=0)
    write_corpus(assets / "corpus.jsonl", stories[:32])
    write_corpus(assets / "heldout.jsonl", stories[32:35])
    (assets / "prompts.jsonl").write_text("".join(json.dumps({"prompt": s}) + "\n" for s in (
        "Tom had a red ball. He liked to play with it.", "The sun was warm.")))
    codec = load_sonar_codec(assets / "sonar_text_encoder.pt", spm)
    for split, source in (("train", "corpus.jsonl"), ("valid", "heldout.jsonl")):
        preprocess(assets / source, assets / "data" / split, codec, shard_size_docs=100, log=None, rank=0,
                   world_size=1)
    (assets / "data" / "tinystories").mkdir()
    for split in ("train", "valid"):  # the configs' data paths
        shutil.copytree(assets / "data" / split, assets / "data" / "tinystories" / split)
    run = _tiny_run(assets, "x")
    shutil.copytree(run, assets / "runs" / "default")
    shutil.copy(run / "model.safetensors", assets / "model.safetensors")
    shutil.copy(run / "model.json", assets / "model.json")
    # a checkpoint of the public SONAR-LLM code (train_sonarllm_fast.py) and its SonarLLM_*.json
    from test_public_checkpoint import make_wrapper, save_public

    wrapper, cfg = make_wrapper("gqa")
    save_public(wrapper, assets / "checkpoint.pt")
    (assets / "SonarLLM_600M.json").write_text(json.dumps(cfg))
    # TinyStories in its TXT layout (stories separated by <|endoftext|>), also as a downloaded folder
    for split, part in (("train", stories[:24]), ("valid", stories[24:])):
        (assets / f"TinyStoriesV2-GPT4-{split}.txt").write_text("\n<|endoftext|>\n".join(part) + "\n")
    (assets / "home" / "TinyStories").mkdir(parents=True)
    for split in ("train", "valid"):
        shutil.copy(assets / f"TinyStoriesV2-GPT4-{split}.txt", assets / "home" / "TinyStories")
    # a Hugging Face tokenizer.json (the tokenizers library, a test-only reference) for the token LLM
    from test_token_llm_text_tokenizer import _train_bpe

    _train_bpe(stories, assets / "tokenizer.json", vocab=300)
    # runs of four sizes (1-4 layers) for the scaling fit, and evaluate results of four sizes (evaluate's JSON
    # fields that the fit reads; bits per byte on an exact power law 0.8 + 40 N^-0.5)
    for k in range(1, 5):
        _tiny_run(assets, f"s{k}", extra=(f"--model.overrides.num_layers={k}",))
        n = 10_000 * 4 ** k
        (assets / f"e{k}.json").write_text(json.dumps({
            "family": "token_llm", "non_embedding_parameters": n,
            "nll": {"bits_per_byte": 0.8 + 40.0 * n ** -0.5, "token_nll": 2.0}}))
    names = ["sentencepiece.source.256000.model", "sonar_text_encoder.pt", "sonar_text_decoder.pt", "corpus.jsonl",
             "heldout.jsonl", "prompts.jsonl", "data/train", "data/valid", "data/tinystories", "runs/x",
             "runs/default", "model.safetensors", "checkpoint.pt", "SonarLLM_600M.json",
             "TinyStoriesV2-GPT4-train.txt", "TinyStoriesV2-GPT4-valid.txt", "tokenizer.json",
             *(f"runs/s{k}" for k in range(1, 5)), *(f"e{k}.json" for k in range(1, 5))]
    found = {name: assets / name for name in names}
    found["~/TinyStories"] = assets / "home" / "TinyStories"
    return found


def _named(text: str, name: str) -> bool:
    return bool(re.search(rf"(^|[\s=\"']){re.escape(name)}(/|\s|$|[\"'])", text, re.M))


def _wanted(block: Block, name: str) -> bool:
    """The block reads placeholder `name`: the first of its commands that names it does not write it (`--out X`,
    `--output X`); the configs' data paths (data/tinystories) are read by every command with a --config."""
    for command in commands(block):
        if _named(command, name) or (name == "data/tinystories" and "--config configs/" in command):
            return not re.search(rf"--(out|output)[ =]{re.escape(name)}(\s|$)", command)
    return False


def lay_workspace(block: Block, placeholders: dict[str, Path], where: Path) -> Path:
    """A fresh folder with the checkout's linked folders and the placeholders the block reads."""
    where.mkdir(parents=True)
    (where / "home").mkdir()
    for name in LINKED:
        (where / name).symlink_to(ROOT / name)
    for name, src in placeholders.items():
        if not _wanted(block, name):
            continue
        dst = where / ("home" + name[1:] if name.startswith("~") else name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            shutil.copy(src, dst)
            if src.suffix == ".safetensors" and src.with_suffix(".json").is_file():
                shutil.copy(src.with_suffix(".json"), dst.with_suffix(".json"))
    return where


# -------------------------------------------------------------------------------------------------- running
def adjust(command: str) -> str:
    """The command as run here: one torchrun process, the training budget for commands with a --config."""
    command = re.sub(r"--nproc_per_node[ =]\d+", "--nproc_per_node=1", command)
    if re.search(r"\btrain/main\.py\b", command) and "--config" in command and "--dry-run" not in command:
        command += " " + " ".join(TRAIN_BUDGET)
    if re.search(r"-m sonar_train\.plan\b", command) and "--config" in command:
        command += " " + " ".join(PLAN_BUDGET)
    return command


def environment(workspace: Path, placeholders: dict[str, Path], cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SONAR_LLM_REGISTRY", "PYTEST_CURRENT_TEST")}
    env.update(DEFAULT_BUDGET)
    env.update({
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        "HOME": str(workspace / "home"), "SONAR_LLM_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "",
        "SONAR_ENCODER": str(placeholders["sonar_text_encoder.pt"]),
        "SONAR_DECODER": str(placeholders["sonar_text_decoder.pt"]),
        "SONAR_TOKENIZER": str(placeholders["sentencepiece.source.256000.model"]),
        "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
    })
    return env


def run_block(block: Block, placeholders: dict[str, Path], where: Path, cache: Path, done: dict[str, str],
              native_built: bool) -> list[str]:
    """Run the block's commands; returns the failures (one line each, with the tail of the output)."""
    failures = []
    workspace = lay_workspace(block, placeholders, where)
    env = environment(workspace, placeholders, cache)
    for command in commands(block):
        if command in NOT_RUN:
            continue
        if command in NEEDS_NATIVE and not native_built:
            continue
        if command in done:
            continue  # ran at `done[command]`
        try:
            res = subprocess.run(["bash", "-o", "pipefail", "-c", adjust(command)], cwd=workspace, env=env,
                                 capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S,
                                 stdin=subprocess.DEVNULL)
            code, output = res.returncode, (res.stdout + res.stderr)
        except subprocess.TimeoutExpired as e:
            code, output = f"timeout {COMMAND_TIMEOUT_S}s", str(e.stdout or "") + str(e.stderr or "")
        done[command] = block.where
        if code != 0:
            failures.append(f"{block.where}: `{command}` exited {code}:\n{output[-2500:]}")
            break  # the rest of the flow depends on it
    return failures


# ---------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    return build_placeholders(tmp_path_factory.mktemp("docs_assets"))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """What the blocks share: the tiny SONAR cache of the embedded default, the commands already run."""
    from sonar_kernels import native

    return {"cache": tmp_path_factory.mktemp("docs_cache"), "done": {}, "native": native.native_available(),
            "root": tmp_path_factory.mktemp("docs_runs")}


def test_every_code_block_is_fenced_and_names_its_language():
    untagged = [b.where for p in doc_paths() for b in fenced_blocks(p) if not b.lang]
    assert not untagged, ("fenced blocks without a language (```bash for commands, ```text for the rest), so "
                          f"no command hides from this test: {untagged}")
    indented = [f"{p.relative_to(ROOT)}:{line}" for p in doc_paths() for line in indented_code_blocks(p)]
    assert not indented, f"indented code blocks (fence them: ```bash for commands, ```text for the rest): {indented}"


def test_not_run_table_lists_only_documented_commands():
    documented = {c for b in shell_blocks(doc_paths()) for c in commands(b)}
    stale = sorted(set(NOT_RUN) - documented) + sorted(NEEDS_NATIVE - documented)
    assert not stale, f"listed as not run, but no longer in the docs: {stale}"


def test_install_and_test_commands_are_the_ci_ones():
    """The README's install and test lines are what .ci/run runs (so listing them as not run here loses nothing)."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = {c for b in shell_blocks([ROOT / "README.md"]) for c in commands(b)}
    assert 'pip install -e ".[dev]" -c constraints.txt' in readme
    assert 'pip install -q -e ".[dev]" -c constraints.txt' in ci
    assert "python -m pytest -q --benchmark-disable" in readme
    assert "python3 -m pytest -q --benchmark-disable" in ci


BLOCKS = shell_blocks(doc_paths())


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_documented_commands_run(block, placeholders, session):
    where = session["root"] / re.sub(r"\W+", "_", block.where)
    failures = run_block(block, placeholders, where, session["cache"], session["done"], session["native"])
    assert not failures, "\n\n".join(failures)


def test_a_broken_documented_command_fails(tmp_path, placeholders):
    """A doc with a working command that reads a placeholder, a broken command and an untagged block: the
    broken command is reported with its output, the working one is not, the untagged block is found."""
    doc = tmp_path / "planted.md"
    doc.write_text("# planted\n\n```bash\npython -m sonar_llm.generate --model model.safetensors --prompt \"Hi.\" "
                   "--max-gen-len 4 --beam 1\n```\n\n```bash\npython -m sonar_llm.generate --no-such-flag  # broken\n"
                   "```\n\n```\npython -c 'hidden'\n```\n\n```console\n$ echo a \\\n  b && echo c\na b\nc\n```\n"
                   "\nText.\n\n    python -c 'indented'\n\n- a list item\n\n    its continuation\n")
    blocks = shell_blocks([doc])
    assert [commands(b) for b in blocks] == [
        ['python -m sonar_llm.generate --model model.safetensors --prompt "Hi." --max-gen-len 4 --beam 1'],
        ["python -m sonar_llm.generate --no-such-flag"], ["echo a b", "echo c"]]
    assert [b.line for b in fenced_blocks(doc) if not b.lang] == [11]
    assert indented_code_blocks(doc) == [24]
    done = {}
    assert run_block(blocks[0], placeholders, tmp_path / "good", tmp_path / "cache", done, False) == []
    bad = run_block(blocks[1], placeholders, tmp_path / "bad", tmp_path / "cache", done, False)
    assert len(bad) == 1 and "--no-such-flag" in bad[0] and "exited 2" in bad[0], bad
