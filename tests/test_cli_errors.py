"""The error contract of every command (sonar_llm/cli.py, issue 27) as ONE table: commands x bad-input classes.

Each cell runs the command in-process (`main(argv)`, stderr captured by capsys) with one bad input and asserts:
  * the exit code: 2 for bad input, 1 for a failure during work (the judge's unreachable endpoint);
  * exactly one line on stderr, and it names the culprit (the flag, the file or the config key); where the bad
    content sits inside a big input that the command streams (tinystories reading its story files), the
    progress lines it printed before (`tinystories: ...`) are allowed and the error is still one line, the last;
  * no traceback;
  * no output written: the cell's output path (a fresh path under the test folder) does not exist afterwards.
A cell that makes no sense for a command is in the table as `NA(reason)`; `test_table_is_complete` checks that
every (command, class) pair is either a case or a stated N/A, and that the table covers >= 10 commands with
>= 8 classes each (cases or N/As) and >= 8 live classes overall.

Inputs are tiny files made once per module: an export written by `sonar_llm.checkpoints.write_exported` (with
its sha256) and damaged copies of it, a DCP run checkpoint written by the trainer's `save_checkpoint` (a 4x3
Linear) and damaged copies, TOML configs, JSON / JSONL / text files, a public-format .pt. Every error is
raised before a model or SONAR is loaded, so the whole table runs in seconds.
"""
from __future__ import annotations

import json
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("missing_file", "truncated_file", "flipped_bytes", "wrong_type", "out_of_range", "empty_input",
           "non_utf8", "no_device", "unreachable_endpoint")
NO_GPU = "cuda:99"  # a device no machine of this project has (also on a GPU machine)


@dataclass
class Case:
    """One bad input: argv(env, out) for the command, the text its one stderr line must contain."""

    argv: Callable[["Env", Path], list[str]]
    culprit: Callable[["Env", Path], str]
    code: int = 2
    setup: Callable[["Env", pytest.MonkeyPatch], None] | None = None
    progress: str = ""  # a command streaming a big input may print progress lines "<progress>..." before the error


@dataclass
class NA:
    """A cell that makes no sense for the command, with the reason."""

    reason: str


@dataclass
class Env:
    root: Path
    p: dict[str, Path] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Path:
        try:
            return self.__dict__["p"][name]
        except KeyError:
            raise AttributeError(name) from None


def _flip(data: bytes, at: int, n: int = 16) -> bytes:
    b = bytearray(data)
    for i in range(at, min(at + n, len(b))):
        b[i] ^= 0xFF
    return bytes(b)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return port


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> Env:
    from sonar_llm.checkpoints import write_exported
    from sonar_train.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("cli_errors")
    e = Env(root)
    p = e.p
    bad = b"Once upon a time \xff\xfe there was a fox.\n"

    # exports: a SONAR-LLM one (any state: every error below comes before the model is built), a base_lcm one
    state = {"input_proj.weight": torch.arange(32, dtype=torch.float32).reshape(4, 8)}
    for name, family in (("export", "sonar_llm"), ("lcm_export", "base_lcm")):
        p[name] = write_exported(state, root / name / "model.safetensors",
                                 {"run_config": {"model": {"family": family, "preset": "tiny"}}, "step": 1})
    raw = p["export"].read_bytes()
    for name, data in (("trunc_export", raw[: len(raw) // 2]), ("flip_export", _flip(raw, len(raw) - 40))):
        d = root / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(data)
        shutil.copy(p["export"].with_suffix(".json"), d / "model.json")
        p[name] = d / "model.safetensors"
    for name, data in (("empty_json_export", b""), ("bad_json_export", b'{"run_config": "\xff"}')):
        d = root / name
        d.mkdir()
        shutil.copy(p["export"], d / "model.safetensors")
        (d / "model.json").write_bytes(data)
        p[name] = d / "model.safetensors"
    for asset in ("enc.pt", "dec.pt", "spm.model"):  # exist only: the errors come before they are read
        (root / asset).write_bytes(b"x")

    # a run directory with one DCP checkpoint, and damaged copies
    lin = torch.nn.Linear(4, 3)
    run = root / "run"
    assert save_checkpoint(run / "checkpoints", 1, lin, torch.optim.AdamW(lin.parameters()), {}, {})
    (run / "config.json").write_text(json.dumps({"model": {"family": "sonar_llm", "preset": "tiny"}}))
    p["run"] = run
    for name in ("trunc_run", "flip_run", "utf8_run"):
        shutil.copytree(run, root / name)
        p[name] = root / name
    shard = next((p["trunc_run"] / "checkpoints").rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    shard = next((p["flip_run"] / "checkpoints").rglob("*.distcp"))
    shard.write_bytes(_flip(shard.read_bytes(), shard.stat().st_size // 2))
    (p["utf8_run"] / "config.json").write_bytes(b'{"model": {"family": "\xff"}}')
    (root / "empty_run").mkdir()
    p["empty_run"] = root / "empty_run"

    # run configs (train/main.py, plan)
    toml = (ROOT / "configs" / "sonar_llm_39m.toml").read_bytes()
    files = {
        "toml": toml,
        "trunc_toml": toml[: toml.index(b'family = "sonar') + 12],
        "flip_toml": toml[: toml.index(b"family") + 1] + bytes([toml[toml.index(b"family") + 1] ^ 0x02])
        + toml[toml.index(b"family") + 2:],  # family -> fcmily: a plausible bit flip that stays UTF-8
        "empty_toml": b"",
        "utf8_toml": b'[model]\nfamily = "\xff"\n',
    }
    for name, data in files.items():
        p[name] = root / f"{name}.toml"
        p[name].write_bytes(data)
    (root / "shards").mkdir()
    p["shards"] = root / "shards"

    # text inputs
    recs = json.dumps([{"prefix": "A dog ran.", "full_text": "A dog ran. It was fast."}]).encode()
    texts = {
        "prompts_empty.jsonl": b"\n\n", "prompts_utf8.jsonl": b'{"prompt": "Tom ran."}\n' + bad,
        "stories.jsonl": b'{"text": "Tom had a ball. He liked it. It was red."}\n', "stories_empty.jsonl": b"",
        "stories_utf8.txt": bad,
        "judge.json": recs, "judge_trunc.json": recs[: len(recs) // 2], "judge_flip.json": _flip(recs, 1, 1),
        "judge_empty.json": b"[]", "judge_utf8.json": recs[:-2] + b'\xff"}]',
        "corpus_empty.txt": b"", "corpus_utf8.txt": bad, "corpus_trunc.parquet": b"PAR1\x15\x04",
        "ts_train.txt": b"Tom had a ball.<|endoftext|>Mia ran.<|endoftext|>", "ts_valid.txt": b"A cat sat.<|endoftext|>A dog ran.<|endoftext|>",
        "ts_empty.txt": b"", "ts_utf8.txt": bad,
        "ts_trunc.json": b'[{"story": "Tom had a ball."}, {"sto', "ts_flip.json": b'[{"story": "Tom"}\xdd',
        "public.json": b'{"llama_config": {"hidden_size": 64}}', "public_utf8.json": b'{"llama_config": "\xff"}',
        "report.json": b'{"benchmarks": []}', "report_trunc.json": b'{"benchmarks": [{"group": "a", "na',
        "report_flip.json": _flip(b'{"benchmarks": []}', 0, 1), "report_type.json": b"[1, 2]",
        "report_empty.json": b"", "report_utf8.json": b'{"benchmarks": "\xff"}',
    }
    for name, data in texts.items():
        p[name.replace(".", "_")] = root / name
        (root / name).write_bytes(data)

    # a public-format checkpoint (model_state_dict only) and damaged copies
    pub = root / "public.pt"
    torch.save({"model_state_dict": {"forward_proj.linear.weight": torch.zeros(8, 1024)}, "global_step": 3}, pub)
    data = pub.read_bytes()
    p["public_pt"] = pub
    p["public_trunc_pt"] = root / "public_trunc.pt"
    p["public_trunc_pt"].write_bytes(data[: len(data) // 2])
    p["public_flip_pt"] = root / "public_flip.pt"  # the pickle itself (no checksum guards the tensor data)
    p["public_flip_pt"].write_bytes(_flip(data, data.index(b"\x80\x02") + 2))
    p["public_empty_pt"] = root / "public_empty.pt"
    p["public_empty_pt"].write_bytes(b"")
    p["port"] = Path(str(_closed_port()))
    return e


# ------------------------------------------------------------------------------------------ the commands
def _train(argv):
    from sonar_train.main import main

    return main(argv)


def _export(argv):
    from sonar_train.export import main

    return main(argv)


def _convert(argv):
    from sonar_llm.convert import main

    return main(argv)


def _generate(argv):
    from sonar_llm.generate import main

    return main(argv)


def _evaluate(argv):
    from sonar_llm.eval.evaluate import main

    return main(argv)


def _judge(argv):
    from sonar_llm.eval.judge import main

    return main(argv)


def _preprocess(argv):
    from sonar_llm.data.preprocess import main

    return main(argv)


def _tinystories(argv):
    from sonar_llm.data.tinystories import main

    return main(argv)


def _plan(argv):
    from sonar_train.plan import main

    return main(argv)


def _bench(name):
    def call(argv):
        import importlib

        sys.path.insert(0, str(ROOT / "bench"))  # as `python bench/NAME.py` runs it (bench/ imports its siblings)
        try:
            return importlib.import_module(name).main(argv)
        finally:
            sys.path.remove(str(ROOT / "bench"))

    return call


def _fake_codec():
    """--codec-factory for preprocess / tinystories (never reached: the errors come first)."""
    raise AssertionError("the codec must not be built for a bad input")


def _no_hub(env, mp):
    import datasets

    def refuse(*a, **k):
        raise ConnectionError("https://huggingface.co unreachable (connection refused)")

    mp.setattr(datasets, "load_dataset", refuse)


def train_argv(cfg_key, *extra):
    return lambda e, o: ["--config", str(e.p[cfg_key]), f"--data.path={e.shards}", f"--data.val_path={e.shards}",
                         f"--sonar.decoder={e.root / 'dec.pt'}", f"--train.out_dir={o}", *extra]


def gen_argv(*extra, model="export"):
    return lambda e, o: ["--model", str(e.p[model]), "--out", str(o / "g.jsonl"), "--encoder", str(e.root / "enc.pt"),
                         "--decoder", str(e.root / "dec.pt"), "--tokenizer", str(e.root / "spm.model"),
                         *[x(e) if callable(x) else x for x in extra]]


def eval_argv(*extra, model="export", stories="stories_jsonl"):
    return lambda e, o: ["--model", str(e.p[model]), "--stories", str(e.p[stories]), "--out", str(o / "r.json"),
                         "--encoder", str(e.root / "enc.pt"), "--decoder", str(e.root / "dec.pt"),
                         "--tokenizer", str(e.root / "spm.model"), *extra]


def judge_argv(src="judge_json", *extra):
    return lambda e, o: [str(e.p[src]), "--url", "http://127.0.0.1:9/v1", "--out", str(o / "j.json"), *extra]


def pre_argv(src, *extra):
    return lambda e, o: ["--input", str(e.p[src]), "--output", str(o), "--device", "cpu",
                         "--codec-factory", "test_cli_errors:_codec", *extra]


def ts_argv(train="ts_train_txt", valid="ts_valid_txt", *extra):
    return lambda e, o: ["--out", str(o), "--train", str(e.p[train]), "--validation", str(e.p[valid]),
                         "--validation-holdout", "1", "--device", "cpu", "--codec-factory",
                         "test_cli_errors:_fake_codec", *extra]


def _ts_reading(train):
    """tinystories with a working codec: the error is in the story files, found while reading them."""
    return lambda e, o: ["--out", str(o), "--train", str(e.p[train]), "--validation", str(e.ts_valid_txt),
                         "--validation-holdout", "1", "--device", "cpu", "--codec-factory", "test_cli_errors:_codec"]


class _Codec:
    encoder_id = tokenizer_id = "test"

    def encode(self, sentences):
        return torch.zeros(len(sentences), 4)

    def target_tokens(self, sentences):
        return [[3, 4, 3] for _ in sentences]


def _codec():
    return _Codec()


def plan_argv(cfg_key, *extra):
    return lambda e, o: ["--config", str(e.p[cfg_key]), "--nproc", "1", "--json", str(o / "plan.json"), *extra]


TS = "tinystories: "
P = lambda key: (lambda e, o: str(e.p[key]))  # noqa: E731  the culprit is that file
T = lambda text: (lambda e, o: text)  # noqa: E731  the culprit is that flag / key
NOT_USED = "the command has no {} (nothing it reads could be one)"

TABLE: dict[str, tuple[Callable, dict[str, Case | NA]]] = {
    "train": (_train, {
        "missing_file": Case(lambda e, o: ["--config", str(e.root / "no_such.toml"), f"--train.out_dir={o}"],
                             T("no_such.toml")),
        "truncated_file": Case(train_argv("trunc_toml"), P("trunc_toml")),
        "flipped_bytes": Case(train_argv("flip_toml"), T("model.fcmily")),
        "wrong_type": Case(train_argv("toml", "--train.steps=many"), T("train.steps")),
        "out_of_range": Case(train_argv("toml", "--train.steps=0"), T("train.steps")),
        "empty_input": Case(train_argv("empty_toml"), P("empty_toml")),
        "non_utf8": Case(train_argv("utf8_toml"), P("utf8_toml")),
        "no_device": Case(train_argv("toml", "--train.device=cuda"), T("train.device")),
        "unreachable_endpoint": NA("a single-process run contacts nothing (torchrun's rendezvous is torchrun's)"),
    }),
    "export": (_export, {
        "missing_file": Case(lambda e, o: ["--run", str(e.root / "no_run"), "--out", str(o / "m.safetensors")],
                             T("no_run")),
        "truncated_file": Case(lambda e, o: ["--run", str(e.trunc_run), "--out", str(o / "m.safetensors")],
                               T("truncated")),
        "flipped_bytes": Case(lambda e, o: ["--run", str(e.flip_run), "--out", str(o / "m.safetensors")],
                              T("does not match checksums.json")),
        "wrong_type": Case(lambda e, o: ["--run", str(e.run), "--step", "last", "--out", str(o / "m.safetensors")],
                           T("--step")),
        "out_of_range": Case(lambda e, o: ["--run", str(e.run), "--step", "-1", "--out", str(o / "m.safetensors")],
                             T("--step")),
        "empty_input": Case(lambda e, o: ["--run", str(e.empty_run), "--out", str(o / "m.safetensors")],
                            T("no complete checkpoint")),
        "non_utf8": Case(lambda e, o: ["--run", str(e.utf8_run), "--out", str(o / "m.safetensors")],
                         T("config.json")),
        "no_device": NA("export runs on the CPU by design (no --device)"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "convert --from public": (_convert, {
        "missing_file": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.root / "no.pt"), "--out",
                                           str(o / "m.safetensors")], T("no.pt")),
        "truncated_file": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_trunc_pt), "--out",
                                             str(o / "m.safetensors")], P("public_trunc_pt")),
        "flipped_bytes": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_flip_pt), "--out",
                                            str(o / "m.safetensors")], P("public_flip_pt")),
        "wrong_type": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_pt), "--head-dim", "wide",
                                         "--out", str(o / "m.safetensors")], T("--head-dim")),
        "out_of_range": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_pt), "--head-dim", "0",
                                           "--out", str(o / "m.safetensors")], T("--head-dim")),
        "empty_input": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_empty_pt), "--out",
                                          str(o / "m.safetensors")], P("public_empty_pt")),
        "non_utf8": Case(lambda e, o: ["--from", "public", "--checkpoint", str(e.public_pt), "--config",
                                       str(e.public_utf8_json), "--out", str(o / "m.safetensors")],
                         P("public_utf8_json")),
        "no_device": NA("convert runs on the CPU by design (no --device)"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "convert --to public": (_convert, {
        "missing_file": Case(lambda e, o: ["--to", "public", "--model", str(e.root / "no.safetensors"), "--out",
                                           str(o / "c.pt")], T("no.safetensors")),
        "truncated_file": Case(lambda e, o: ["--to", "public", "--model", str(e.trunc_export), "--out",
                                             str(o / "c.pt")], P("trunc_export")),
        "flipped_bytes": Case(lambda e, o: ["--to", "public", "--model", str(e.flip_export), "--out",
                                            str(o / "c.pt")], P("flip_export")),
        "wrong_type": Case(lambda e, o: ["--to", "public", "--model", str(e.lcm_export), "--out", str(o / "c.pt")],
                           T("base_lcm")),  # a model of a family the public format cannot hold
        "out_of_range": NA("--to public has no numeric flag"),
        "empty_input": Case(lambda e, o: ["--to", "public", "--model", str(e.empty_json_export), "--out",
                                          str(o / "c.pt")], T("model.json")),
        "non_utf8": Case(lambda e, o: ["--to", "public", "--model", str(e.bad_json_export), "--out",
                                       str(o / "c.pt")], T("model.json")),
        "no_device": NA("convert runs on the CPU by design (no --device)"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "generate": (_generate, {
        "missing_file": Case(lambda e, o: ["--model", str(e.root / "no.safetensors"), "--prompt", "Tom ran."],
                             T("no.safetensors")),
        "truncated_file": Case(gen_argv("--prompt", "Tom ran.", model="trunc_export"), P("trunc_export")),
        "flipped_bytes": Case(gen_argv("--prompt", "Tom ran.", model="flip_export"), P("flip_export")),
        "wrong_type": Case(gen_argv("--prompt", "Tom ran.", "--max-sentences", "few"), T("--max-sentences")),
        "out_of_range": Case(gen_argv("--prompt", "Tom ran.", "--eos-threshold", "2"), T("--eos-threshold")),
        "empty_input": Case(gen_argv("--prompts", lambda e: str(e.prompts_empty_jsonl)), P("prompts_empty_jsonl")),
        "non_utf8": Case(gen_argv("--prompts", lambda e: str(e.prompts_utf8_jsonl)),
                         lambda e, o: f"{e.prompts_utf8_jsonl}:2"),
        "no_device": Case(gen_argv("--prompt", "Tom ran.", "--device", NO_GPU), T("--device")),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "evaluate": (_evaluate, {
        "missing_file": Case(lambda e, o: ["--model", str(e.root / "no.safetensors"), "--stories",
                                           str(e.stories_jsonl), "--out", str(o / "r.json")], T("no.safetensors")),
        "truncated_file": Case(eval_argv(model="trunc_export"), P("trunc_export")),
        "flipped_bytes": Case(eval_argv(model="flip_export"), P("flip_export")),
        "wrong_type": Case(eval_argv("--num-stories", "all"), T("--num-stories")),
        "out_of_range": Case(eval_argv("--eos-threshold", "-0.5"), T("--eos-threshold")),
        "empty_input": Case(eval_argv(stories="stories_empty_jsonl"), P("stories_empty_jsonl")),
        "non_utf8": Case(eval_argv(stories="stories_utf8_txt"), P("stories_utf8_txt")),  # bad records are skipped
        "no_device": Case(eval_argv("--device", NO_GPU), T("--device")),
        "unreachable_endpoint": NA("its judge (--judge-url) runs after generation, which needs a real model: "
                                   "the judge's own row covers the endpoint, tests/test_eval_judge.py the wiring"),
    }),
    "judge": (_judge, {
        "missing_file": Case(lambda e, o: [str(e.root / "no.json"), "--url", "http://x/v1", "--out", str(o / "j")],
                             T("no.json")),
        "truncated_file": Case(judge_argv("judge_trunc_json"), lambda e, o: f"{e.judge_trunc_json}:1"),
        "flipped_bytes": Case(judge_argv("judge_flip_json"), P("judge_flip_json")),
        "wrong_type": Case(judge_argv("judge_json", "--concurrency", "many"), T("--concurrency")),
        "out_of_range": Case(judge_argv("judge_json", "--max-failed-share", "3"), T("max-failed-share")),
        "empty_input": Case(judge_argv("judge_empty_json"), P("judge_empty_json")),
        "non_utf8": Case(judge_argv("judge_utf8_json"), lambda e, o: f"{e.judge_utf8_json}:1"),
        "no_device": NA("the judge runs no model"),
        "unreachable_endpoint": Case(lambda e, o: [str(e.judge_json), "--url", f"http://127.0.0.1:{e.port}/v1",
                                                   "--retries", "0", "--out", str(o / "j.json")],
                                     lambda e, o: f"127.0.0.1:{e.port}", code=1),
    }),
    "preprocess": (_preprocess, {
        "missing_file": Case(lambda e, o: ["--input", str(e.root / "no_corpus"), "--output", str(o)],
                             T("no_corpus")),
        "truncated_file": Case(pre_argv("corpus_trunc_parquet"), P("corpus_trunc_parquet")),
        "flipped_bytes": NA("a text corpus has no checksum: flipped bytes are text (invalid UTF-8 is the "
                            "non_utf8 cell); the shards it writes are checksummed (data.verify)"),
        "wrong_type": Case(pre_argv("corpus_utf8_txt", "--shard-size-docs", "many"), T("--shard-size-docs")),
        "out_of_range": Case(pre_argv("corpus_utf8_txt", "--shard-size-docs", "0"), T("--shard-size-docs")),
        "empty_input": Case(pre_argv("corpus_empty_txt"), P("corpus_empty_txt")),
        "non_utf8": Case(pre_argv("corpus_utf8_txt"), P("corpus_utf8_txt")),  # bad records skipped, counted
        "no_device": Case(lambda e, o: ["--input", str(e.corpus_utf8_txt), "--output", str(o), "--device", NO_GPU],
                          T("--device")),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "tinystories": (_tinystories, {
        "missing_file": Case(lambda e, o: ["--out", str(o), "--train", str(e.root / "no_train.txt"), "--validation",
                                           str(e.ts_valid_txt), "--device", "cpu"], T("no_train.txt")),
        "truncated_file": Case(_ts_reading("ts_trunc_json"), P("ts_trunc_json"), progress=TS),
        "flipped_bytes": Case(_ts_reading("ts_flip_json"), P("ts_flip_json"), progress=TS),
        "wrong_type": Case(ts_argv("ts_train_txt", "ts_valid_txt", "--max-sentences", "all"), T("--max-sentences")),
        "out_of_range": Case(ts_argv("ts_train_txt", "ts_valid_txt", "--max-sentences", "0"), T("--max-sentences")),
        "empty_input": Case(_ts_reading("ts_empty_txt"), P("ts_empty_txt"), progress=TS),
        "non_utf8": Case(_ts_reading("ts_utf8_txt"), lambda e, o: f"{e.ts_utf8_txt}:1", progress=TS),
        "no_device": Case(lambda e, o: ["--out", str(o), "--train", str(e.ts_train_txt), "--validation",
                                        str(e.ts_valid_txt), "--device", NO_GPU], T("--device")),
        "unreachable_endpoint": Case(lambda e, o: ["--out", str(o), "--device", "cpu", "--codec-factory",
                                                   "test_cli_errors:_codec"], T("roneneldan/TinyStories"), code=1,
                                     setup=_no_hub, progress=TS),
    }),
    "plan": (_plan, {
        "missing_file": Case(lambda e, o: ["--config", str(e.root / "no_plan.toml"), "--json", str(o / "p.json")],
                             T("no_plan.toml")),
        "truncated_file": Case(plan_argv("trunc_toml"), P("trunc_toml")),
        "flipped_bytes": Case(plan_argv("flip_toml"), T("model.fcmily")),
        "wrong_type": Case(plan_argv("toml", "--mfu", "high"), T("--mfu")),
        "out_of_range": Case(plan_argv("toml", "--mfu", "2"), T("--mfu")),
        "empty_input": Case(plan_argv("empty_toml"), P("empty_toml")),
        "non_utf8": Case(plan_argv("utf8_toml"), P("utf8_toml")),
        "no_device": NA("plans on fake tensors (no device); --gpu names a table entry (a choices error)"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "bench/report.py": (_bench("report"), {
        "missing_file": Case(lambda e, o: ["show", str(e.root / "no_result.json")], T("no_result.json")),
        "truncated_file": Case(lambda e, o: ["show", str(e.report_trunc_json)], P("report_trunc_json")),
        "flipped_bytes": Case(lambda e, o: ["show", str(e.report_flip_json)], P("report_flip_json")),
        "wrong_type": Case(lambda e, o: ["show", str(e.report_type_json)], P("report_type_json")),
        "out_of_range": NA("report has no numeric flag"),
        "empty_input": Case(lambda e, o: ["show", str(e.report_empty_json)], P("report_empty_json")),
        "non_utf8": Case(lambda e, o: ["show", str(e.report_utf8_json)], P("report_utf8_json")),
        "no_device": NA("report reads JSON only"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "bench/common.py targets": (_bench("common"), {
        "missing_file": Case(lambda e, o: ["targets", str(e.root / "no_result.json")], T("no_result.json")),
        "truncated_file": Case(lambda e, o: ["targets", str(e.report_trunc_json)], P("report_trunc_json")),
        "flipped_bytes": Case(lambda e, o: ["targets", str(e.report_flip_json)], P("report_flip_json")),
        "wrong_type": Case(lambda e, o: ["targets", str(e.report_type_json)], P("report_type_json")),
        "out_of_range": NA("targets has no numeric flag"),
        "empty_input": Case(lambda e, o: ["targets", str(e.report_empty_json)], P("report_empty_json")),
        "non_utf8": Case(lambda e, o: ["targets", str(e.report_utf8_json)], P("report_utf8_json")),
        "no_device": NA("reads JSON only"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "bench/measure_lce_cpu.py": (_bench("measure_lce_cpu"), {
        "missing_file": NA("reads no file"), "truncated_file": NA("reads no file"), "flipped_bytes": NA("reads no file"),
        "wrong_type": Case(lambda e, o: ["--n", "lots", "--out", str(o / "r.json")], T("--n")),
        "out_of_range": Case(lambda e, o: ["--repeats", "0", "--out", str(o / "r.json")], T("--repeats")),
        "empty_input": Case(lambda e, o: ["--paths", "", "--out", str(o / "r.json")], T("--paths")),
        "non_utf8": NA("reads no file"),
        "no_device": NA("a CPU benchmark"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "bench/measure_load_rss.py": (_bench("measure_load_rss"), {
        "missing_file": Case(lambda e, o: ["--dir", str(e.root / "no_dir")], T("no_dir")),
        "truncated_file": NA("writes and reads its own checkpoint"), "flipped_bytes": NA("reads no user file"),
        "wrong_type": Case(lambda e, o: ["--layers", "two"], T("--layers")),
        "out_of_range": Case(lambda e, o: ["--layers", "0"], T("--layers")),
        "empty_input": Case(lambda e, o: ["--dtype", ""], T("--dtype")),
        "non_utf8": NA("reads no user file"),
        "no_device": NA("a CPU memory measurement"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
    "bench/measure_encoder_throughput.py": (_bench("measure_encoder_throughput"), {
        "missing_file": NA("reads no file"), "truncated_file": NA("reads no file"), "flipped_bytes": NA("reads no file"),
        "wrong_type": Case(lambda e, o: ["--batch", "big"], T("--batch")),
        "out_of_range": Case(lambda e, o: ["--seconds", "0"], T("--seconds")),
        "empty_input": Case(lambda e, o: ["--tokens", "0"], T("--tokens")),
        "non_utf8": NA("reads no file"),
        "no_device": NA("uses the GPU when there is one, else the CPU (no --device)"),
        "unreachable_endpoint": NA(NOT_USED.format("endpoint")),
    }),
}

CELLS = [(cmd, cls) for cmd, (_, row) in TABLE.items() for cls in CLASSES if isinstance(row.get(cls), Case)]


def test_table_is_complete():
    for cmd, (_, row) in TABLE.items():
        assert set(row) == set(CLASSES), f"{cmd}: every class is a case or a stated N/A ({set(CLASSES) ^ set(row)})"
        assert all(isinstance(c, (Case, NA)) and (not isinstance(c, NA) or c.reason) for c in row.values())
    live = {cmd for cmd, (_, row) in TABLE.items() if sum(isinstance(c, Case) for c in row.values()) >= 6}
    assert len(TABLE) >= 10 and len(live) >= 10, live
    assert {cls for _, cls in CELLS} == set(CLASSES)  # every class has a live case somewhere


@pytest.mark.parametrize("cmd,cls", CELLS, ids=[f"{c}-{k}" for c, k in CELLS])
def test_bad_input(env, cmd, cls, capsys, monkeypatch, request):
    if cmd == "train" and cls == "no_device" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: train.device = cuda is valid here")
    main, row = TABLE[cmd]
    case = row[cls]
    out = env.root / "out" / request.node.callspec.id.replace("/", "_").replace(" ", "_")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.delenv("SONAR_DECODER", raising=False)
    monkeypatch.setenv("SONAR_LLM_REGISTRY", str(env.root / "no_registry.toml"))
    if case.setup is not None:
        case.setup(env, monkeypatch)
    capsys.readouterr()
    rc = main(case.argv(env, out))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    if case.progress:
        lines = [line for line in lines if not line.startswith(case.progress)] + lines[-1:]
        lines = lines[-1:] if len(lines) == 2 and lines[0] == lines[1] else lines
    assert rc == case.code, f"exit {rc}, expected {case.code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert case.culprit(env, out) in lines[0], f"{case.culprit(env, out)!r} not named in: {lines[0]}"
    assert not out.exists(), f"a failed command wrote {sorted(str(p) for p in out.rglob('*'))}"


# ------------------------------------------------------------------------------------------ one test per fixed item
def _one_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_train_missing_gpu_in_the_process_group_setup_is_one_line(tmp_path, capsys):
    """init_distributed ran outside the logged block: train.device=cuda on a machine without CUDA exited 1 with
    NOTHING on stderr. With custom factories (no path checks) the device is met there: exit 2, one line."""
    from _train_fakes import fake_data_factory, fake_model_factory
    from sonar_train.main import main

    rc = main(["--train.device=cuda", "--train.steps=1", f"--train.out_dir={tmp_path / 'run'}"],
              model_factory=fake_model_factory, data_factory=fake_data_factory)
    assert rc == 2 and _one_line(capsys).startswith("config error: train.device")
    assert not (tmp_path / "run").exists()


def test_train_error_before_the_logged_block_is_never_silent(tmp_path, capsys, monkeypatch):
    """Any exception raised before run_training's logged block reaches stderr (it used to be swallowed: exit 1,
    no output); an unexpected one is a bug, so it comes with its traceback."""
    from _train_fakes import fake_data_factory, fake_model_factory
    from sonar_train import loop
    from sonar_train.main import main

    def broken(cfg):
        raise RuntimeError("resume check broke")

    monkeypatch.setattr(loop, "resume_changes", broken)
    rc = main(["--train.steps=1", "--train.device=cpu", f"--train.out_dir={tmp_path / 'run'}"],
              model_factory=fake_model_factory, data_factory=fake_data_factory)
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and err.strip().splitlines()[-1].endswith("resume check broke")


def test_dry_run_refuses_what_the_real_run_refuses(tmp_path, capsys, monkeypatch):
    """A SONAR-LLM config whose sonar.decoder is empty (and no registry / $SONAR_DECODER) passed --dry-run and
    then failed the real run with a traceback (exit 1). Both now exit 2 with the same line, writing nothing."""
    from sonar_train.main import main

    monkeypatch.delenv("SONAR_DECODER", raising=False)
    monkeypatch.setenv("SONAR_LLM_REGISTRY", str(tmp_path / "no_registry.toml"))
    (tmp_path / "shards").mkdir()
    argv = ["--config", str(ROOT / "configs" / "sonar_llm_39m.toml"), f"--data.path={tmp_path / 'shards'}",
            f"--data.val_path={tmp_path / 'shards'}", f"--train.out_dir={tmp_path / 'run'}"]
    assert main([*argv, "--dry-run"]) == 2
    dry = _one_line(capsys)
    assert main(argv) == 2
    assert _one_line(capsys) == dry and dry.startswith("config error: sonar.decoder: empty")
    assert not (tmp_path / "run").exists()


def _gen(env, *argv):
    from sonar_llm.generate import main

    return main(["--model", str(env.export), *argv])


def test_generate_empty_prompt_and_flag_named_errors(env, capsys):
    """--prompt "" said "one of the arguments --prompt --prompts is required"; sampling errors named
    GenerationConfig.top_p / .temperature instead of the flags."""
    assert _gen(env, "--prompt", "") == 2
    assert _one_line(capsys) == "generate error: --prompt: the prompt is empty (give the text to continue)"
    for flag, value in (("--top-p", "1.5"), ("--top-p", "0"), ("--temperature", "0"), ("--top-k", "-1")):
        assert _gen(env, "--prompt", "Tom ran.", flag, value) == 2
        line = _one_line(capsys)
        assert line.startswith(f"generate error: {flag} must be") and "GenerationConfig" not in line, line


def test_generate_top_k_zero_means_no_filter_not_sampling():
    """--top-k 0 switched sampling on; 0 now means "no top-k filter" (Hugging Face's meaning), so the decoding
    stays SONAR's beam search; any k >= 1 still implies sampling."""
    from sonar_llm.generate import GenerateConfig, decoding_config

    plain = decoding_config(GenerateConfig(prompt="x", model="m"))
    zero = decoding_config(GenerateConfig(prompt="x", model="m", top_k=0))
    assert not GenerateConfig(top_k=0).sampling and zero == plain and (zero.do_sample, zero.beam_size) == (False, 5)
    three = decoding_config(GenerateConfig(prompt="x", model="m", top_k=3))
    assert GenerateConfig(top_k=3).sampling and (three.do_sample, three.top_k, three.beam_size) == (True, 3, 1)


def test_a_failed_generate_leaves_an_existing_out_file_as_it_was(env, capsys, tmp_path):
    out = tmp_path / "old.jsonl"
    out.write_text('{"kept": true}\n')
    assert _gen(env, "--prompt", "Tom ran.", "--out", str(out), "--device", NO_GPU) == 2
    assert "--device" in _one_line(capsys)
    from sonar_llm.generate import main

    assert main(["--model", str(env.trunc_export), "--prompt", "Tom ran.", "--out", str(out), "--encoder",
                 str(env.root / "enc.pt"), "--decoder", str(env.root / "dec.pt"), "--tokenizer",
                 str(env.root / "spm.model")]) == 2
    assert "truncated" in _one_line(capsys)
    assert out.read_text() == '{"kept": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["old.jsonl"]


def test_cli_contract_helpers(tmp_path, capsys):
    """sonar_llm.cli itself: a bug shows its traceback (exit 1), --debug shows it for a user error too, a work
    failure is one line (exit 1), a multi-line message is folded to one line, atomic_output leaves no file on
    error and replaces the target only on success."""
    from sonar_llm import cli

    def bug(argv):
        raise KeyError("x")

    assert cli.run("demo", bug, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("demo failed (a bug")

    def user(argv):
        raise ValueError("--x: bad\n  value")

    assert cli.run("demo", user, []) == 2 and _one_line(capsys) == "demo error: --x: bad value"
    assert cli.run("demo", user, ["--debug"]) == 2 and "Traceback" in capsys.readouterr().err

    def work(argv):
        raise cli.CommandFailed("the endpoint said no")

    assert cli.run("demo", work, []) == 1 and _one_line(capsys) == "demo failed: the endpoint said no"
    target = tmp_path / "t.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.atomic_output(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stop")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
    with cli.atomic_output(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


@pytest.mark.parametrize("cmd", ["generate", "evaluate", "export", "convert --to public", "judge"])
def test_an_out_path_below_a_file_is_refused_before_any_work(env, cmd, capsys, tmp_path):
    """`--out a_file/x`: exit 2, one line naming --out, before the command reads its model (the other inputs here
    would fail later with another message: generate's and evaluate's SONAR files are junk), nothing written."""
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep")
    out = str(blocker / "result.json")
    argv = {"generate": gen_argv("--prompt", "Tom ran."), "evaluate": eval_argv(),
            "export": lambda e, o: ["--run", str(e.run), "--out", str(o / "m.safetensors")],
            "convert --to public": lambda e, o: ["--to", "public", "--model", str(e.p["export"]), "--out",
                                                 str(o / "c.pt")],
            "judge": judge_argv()}[cmd](env, tmp_path / "unused")
    argv[argv.index("--out") + 1] = out
    main = TABLE[cmd][0]
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_line(capsys)
    assert "--out" in line and str(blocker) in line and "is a file" in line, line
    assert blocker.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("cmd", ["generate", "evaluate"])
def test_a_damaged_run_config_is_named(env, cmd, capsys, tmp_path, monkeypatch):
    """Named before SONAR is resolved (evaluate without SONAR flags would otherwise train a tiny SONAR)."""
    from sonar_llm.eval import evaluate

    def too_early(*a, **k):
        raise AssertionError("SONAR resolved before the run config was read")

    monkeypatch.setattr(evaluate, "resolve_sonar_assets", too_early)
    run = tmp_path / "run"
    shutil.copytree(env.run, run)
    (run / "config.json").write_text('{"model": {"family": "sonar_llm", ')  # cut off
    argv = {"generate": gen_argv("--prompt", "Tom ran."), "evaluate": eval_argv()}[cmd](env, tmp_path / "o")
    i = argv.index("--model")
    argv[i:i + 2] = ["--run", str(run)]
    capsys.readouterr()
    assert TABLE[cmd][0](argv) == 2
    line = _one_line(capsys)
    assert f"{run / 'config.json'}: not a readable run config" in line, line
    assert not (tmp_path / "o").exists()


def test_train_resuming_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    """A run whose only checkpoint was cut short: the rerun names the shard (exit 2, no traceback) and leaves
    the checkpoint as it was (not deleted, not overwritten)."""
    from _train_fakes import fake_data_factory, fake_model_factory
    from sonar_train.main import main

    argv = ["--train.steps=2", "--train.checkpoint_every=2", "--train.device=cpu", f"--train.out_dir={tmp_path}"]
    assert main(argv, model_factory=fake_model_factory, data_factory=fake_data_factory) == 0
    shard = next((tmp_path / "checkpoints").rglob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    capsys.readouterr()
    assert main(argv + ["--train.steps=3"], model_factory=fake_model_factory, data_factory=fake_data_factory) == 2
    line = _one_line(capsys)
    assert line.startswith("train error:") and shard.name in line and "100 bytes" in line, line
    assert shard.stat().st_size == 100


@pytest.mark.parametrize("flag", ["--num-stories", "--batch-size", "--max-new-tokens"])
def test_evaluate_names_the_one_flag_out_of_range_and_its_value(env, flag, capsys, tmp_path):
    """`--num-stories -5` said "--num-stories, --batch-size and --max-new-tokens must be >= 1": three flags, no value."""
    assert _evaluate(eval_argv(flag, "-5")(env, tmp_path)) == 2
    assert _one_line(capsys) == f"evaluate error: {flag} must be >= 1, got -5"
    assert not (tmp_path / "r.json").exists()


def test_new_user_findings_name_the_flag_and_say_it_early(env, capsys, tmp_path):
    """A new user's trial (2026-12-07): `--seed -1` named GenerationConfig.seed; `--max-story-sentences 2` said
    "no story has between 3 and max_story_sentences sentences"; `--family banana` said the run "holds a
    'sonar_llm' model"; a folder given to --prompts or --model was "file not found"; a wrong `--nll-data` was
    found only after the whole evaluation had run. Each is now one line naming the flag, before any model loads
    (the cells give no SONAR asset that could load)."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("not shards")
    (tmp_path / "short.jsonl").write_text('{"text": "Tom ran. He fell."}\n')
    cases = [
        (lambda: _gen(env, "--prompt", "Tom ran.", "--seed", "-1", "--temperature", "0.8"),
         "generate error: --seed must be in [0, 2^64 - 1], got -1"),
        (lambda: _gen(env, "--prompt", "Tom ran.", "--family", "banana"),
         "generate error: --family must be 'auto' or one of"),
        (lambda: _gen(env, "--prompts", str(tmp_path / "folder")), "generate error: --prompts: "),
        (lambda: _generate(["--model", str(tmp_path / "folder"), "--prompt", "Tom ran."]), "generate error: --model: "),
        (lambda: _evaluate(eval_argv("--seed", "-3")(env, tmp_path)),
         "evaluate error: --seed must be in [0, 2^64 - 1], got -3"),
        (lambda: _evaluate(eval_argv("--max-story-sentences", "2")(env, tmp_path)),
         "evaluate error: --max-story-sentences must be >= 3"),
        (lambda: _evaluate(eval_argv("--nll-data", str(tmp_path / "folder"))(env, tmp_path)),
         f"evaluate error: --nll-data {tmp_path / 'folder'}: no manifest.json"),
        (lambda: _evaluate(eval_argv("--nll-data", str(tmp_path / "notes.txt"))(env, tmp_path)),
         f"evaluate error: --nll-data {tmp_path / 'notes.txt'}: not a folder"),
        # the seventh round's trial: a seed past 2^64 was said after the load (and only when sampling), these named
        # internal fields or came after the generation, and an empty --out was "a folder"
        (lambda: _gen(env, "--prompt", "Tom ran.", "--seed", str(2**64)), "generate error: --seed must be in"),
        (lambda: _evaluate(eval_argv("--seed", str(2**64))(env, tmp_path)), "evaluate error: --seed must be in"),
        (lambda: _evaluate(eval_argv("--max-seq-len", "1")(env, tmp_path)), "evaluate error: --max-seq-len must be"),
        (lambda: _evaluate(eval_argv("--max-gen-len", "0")(env, tmp_path)), "evaluate error: --max-gen-len must be"),
        (lambda: _evaluate(eval_argv("--nll-docs", "0")(env, tmp_path)), "evaluate error: --nll-docs must be >= 1"),
        (lambda: _evaluate(eval_argv()(env, tmp_path)[:2] + ["--stories", str(tmp_path / "short.jsonl")]
                           + eval_argv()(env, tmp_path)[4:]),
         f"evaluate error: --stories {tmp_path / 'short.jsonl'}: no story has between 3 and 32 sentences "
         "(--max-story-sentences 32)"),
        (lambda: _evaluate(eval_argv()(env, tmp_path)[:-6] + ["--out", ""] + eval_argv()(env, tmp_path)[-6:]),
         "evaluate error: --out: the path is empty"),
        # the judge's settings were checked after the whole generation, in one line naming no flag
        (lambda: _evaluate(eval_argv("--judge-url", "http://127.0.0.1:9/v1", "--judge-api-key-env",
                                     "SONAR_LLM_TEST_UNSET_KEY")(env, tmp_path)),
         "evaluate error: --judge-api-key-env SONAR_LLM_TEST_UNSET_KEY: the judge's API key variable is not set"),
        (lambda: _evaluate(eval_argv("--judge-url", "http://127.0.0.1:9/v1", "--judge-backoff", "nan")(env, tmp_path)),
         "evaluate error: --judge-backoff must be a finite number >= 0, got nan"),
        (lambda: _evaluate(eval_argv("--judge-url", "http://127.0.0.1:9/v1", "--judge-concurrency", "0")(env, tmp_path)),
         "evaluate error: --judge-concurrency must be >= 1, got 0"),
    ]
    lines = []
    for command, said in cases:
        rc = command()
        line = _one_line(capsys)
        lines.append(line)
        assert rc == 2 and line.startswith(said), (said, line)
    assert "is a folder" in lines[2] and "is a folder" in lines[3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "notes.txt", "short.jsonl"]  # nothing written


def test_each_command_takes_the_others_beam_flag():
    """`generate --beam` vs `evaluate --beam-size` (a user trial): each command takes the other's name too."""
    from sonar_llm.eval.evaluate import _parser as eval_parser
    from sonar_llm.generate import _parser as gen_parser

    gen = ["--model", "m.safetensors", "--prompt", "x"]
    ev = ["--model", "m.safetensors", "--stories", "s.jsonl", "--out", "r.json"]
    for flag in ("--beam", "--beam-size"):
        assert gen_parser().parse_args([*gen, flag, "3"]).beam == 3
        assert eval_parser().parse_args([*ev, flag, "4"]).beam_size == 4


def test_export_needs_the_run_config(env, capsys, tmp_path):
    """A user trial: a run without config.json (or with `{}`) was exported with exit 0, into a model.json that every
    loader then refused. Now export refuses it, naming the file, and writes nothing."""
    import shutil

    for name, config in (("no_config", None), ("empty_config", "{}")):
        run = tmp_path / name
        shutil.copytree(env.p["run"], run)
        if config is None:
            (run / "config.json").unlink()
        else:
            (run / "config.json").write_text(config)
        out = tmp_path / f"{name}.safetensors"
        assert _export(["--run", str(run), "--out", str(out)]) == 2
        line = _one_line(capsys)
        assert str(run / "config.json") in line, line
        assert not out.exists() and not out.with_suffix(".json").exists()
