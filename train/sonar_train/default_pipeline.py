"""The embedded default: `python train/main.py` with no arguments, offline, on a clean clone.

1. writes the project's own story corpus (sonar_llm.sonar.story_corpus) as train/valid JSONL: the tiny SONAR's
   3,800 training stories plus 8,000 more for SONAR-LLM, and the 200 stories neither model trains on;
2. trains the tiny SONAR autoencoder on it, unless a cached copy exists ($SONAR_LLM_CACHE/tiny_sonar);
3. encodes every sentence with that SONAR into memory-mapped shards (resumable);
4. trains a small SONAR-LLM with the standard loop (configs/default.toml; FSDP2 under torchrun);
5. evaluates it: validation loss, token NLL, and the paper's generation protocol on held-out stories;
6. prints a generated continuation of a held-out story;
then draws the training (`<run>/training.png`, sonar_train.plot; when matplotlib is installed) and closes with
a short summary: what was trained, the evaluation headline and three commands to try next with this run
(generate, evaluate, export), printed ready to paste (tests/test_default_pipeline.py runs them as printed).

Under torchrun, rank 0 prepares steps 1-3 while the other ranks wait for its "ready" marker; every rank
trains; rank 0 evaluates. Re-running resumes: cached assets and complete shards are reused, and training
continues from the latest checkpoint in runs/default (delete that folder to start over); a run folder that
cannot be resumed with this config (another model shape, data or SONAR) is refused before step 1.
Environment: SONAR_LLM_DEFAULT_DIR (default "runs/default"), SONAR_LLM_CACHE (tiny SONAR cache),
SONAR_LLM_END_CHECK ("error", the default: stop when the end sentence does not round-trip through the tiny SONAR;
"warn": go on, for smoke tests whose tiny SONAR trains too few steps to learn it),
SONAR_LLM_DEFAULT_STEPS (training steps), SONAR_LLM_DEFAULT_STORIES (keep only that many training stories; the
held-out split is unchanged), SONAR_LLM_TINY_STEPS (tiny SONAR training steps; default
TinySonarConfig.train_steps: a fixed count, so two runs give the same tiny SONAR however busy the machine is).
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]  # the checkout

from sonar_llm.sonar.round_trip import END_OF_DOC_TEXT, RoundTripError  # noqa: E402
from sonar_train.config import load_config  # noqa: E402

N_STORIES = 4000  # the tiny SONAR's corpus (TinySonarConfig.n_stories): split into training and held-out stories
HELD_OUT_FRACTION = 0.05  # the tiny SONAR's split: its held-out stories are never seen by any model
# SONAR-LLM also trains on this many more stories of the same generator (the ones it writes after the first
# N_STORIES), which the tiny SONAR never saw either: on the 3,800 alone the 4.26M-parameter model overfits
# within the step budget (docs/evaluation.md, issue 26). The generator is free; encoding them costs seconds.
EXTRA_TRAIN_STORIES = 8000
EVAL_STORIES = 64  # of the 200 held-out stories (docs/evaluation.md gives the default's figures on all 200)
# How the SONAR decoder turns the model's predictions into sentences in step 5, the continuation of step 6 and the
# generate and evaluate commands printed at the end: token sampling at temperature 0.8 and top-p 0.9 (the values of
# docs/generation.md's example; the k-th story draws from its own generator, seeded from (0, k)), not greedy
# decoding. Where the next sentence is
# uncertain, this deterministic model predicts a blend of the possible sentences; greedy decoding turns it into the
# same generic sentence again and again (6.7-10.3% of the sentences repeat over three seeds), sampling into one
# reading (0.7-1.1%). Sampling picks the words, not the end: a prediction whose greedy reading is the end sentence
# ends the story whatever the draw (docs/generation.md). Step 5 also reports the greedy figures (docs/evaluation.md,
# issue 26, fifth to seventh rounds).
DECODING = {"temperature": 0.8, "top_p": 0.9}  # sentence length: the tiny SONAR's length guard (33 tokens)
# Stories of at most 32 sentences, cut at 32: the public code's protocol and the evaluate command's default (the
# corpus's stories have 5-20 sentences; 92-98% of the stories end over three seeds, seventh round).
EVAL_SETTINGS = {"num_stories": EVAL_STORIES, "max_story_sentences": 32, **DECODING}
END_OF_DOC = END_OF_DOC_TEXT  # "End of sequence.": the tiny SONAR learns it (TinySonarConfig.end_sentence)
NEXT_PROMPT = "Tom had a red ball. He liked to play with it."  # the generate command's prompt


def _say(msg: str) -> None:
    print(f"[default] {msg}", flush=True)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wait_for(marker: Path, timeout_s: float = 3600.0) -> None:
    """Non-zero ranks wait for rank 0's preparation (or its failure marker)."""
    failed = marker.with_suffix(".failed")
    t0 = time.monotonic()
    while not marker.exists():
        if failed.exists():
            raise RuntimeError(f"rank 0 failed to prepare the default run: {failed.read_text()}")
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"waited {timeout_s:.0f}s for rank 0 to write {marker}")
        time.sleep(1.0)


def default_corpus(n_stories: int = N_STORIES, extra_stories: int = EXTRA_TRAIN_STORIES) -> tuple[list[str], list[str]]:
    """(SONAR-LLM's training stories, the held-out stories): the generator's first `n_stories` split as the tiny
    SONAR splits them (so the held-out stories are unseen by both models), then `extra_stories` more for training."""
    from sonar_llm.sonar.story_corpus import generate_stories, split_stories

    stories = generate_stories(n_stories + extra_stories, seed=0)  # its first n_stories are generate_stories(n_stories)
    train, valid = split_stories(stories[:n_stories], HELD_OUT_FRACTION, seed=0)
    return train + stories[n_stories:], valid


def prepare(run_dir: Path, tiny_steps: int | None = None, *, n_stories: int = N_STORIES, train_stories: int = 0,
            extra_stories: int = EXTRA_TRAIN_STORIES, tiny_config=None, tiny_cache_dir: Path | None = None,
            say=print) -> dict:
    """Steps 1-3: corpus, tiny SONAR, shards (run by one process). Returns the paths the training config
    needs and the tiny SONAR's info. The training stories are the tiny SONAR's (the first `n_stories`, split)
    followed by `extra_stories` more; `train_stories` > 0 keeps only that many of them (the split,
    and so the held-out stories, stay those of the full corpus); `tiny_config` / `tiny_cache_dir` select
    another tiny SONAR than the default's (see sonar_llm.sonar.train_tiny); `tiny_steps` overrides its
    `train_steps`."""
    import dataclasses

    from sonar_llm.data.preprocess import load_sonar_codec, preprocess
    from sonar_llm.data.shards import DatasetSettingsMismatch
    from sonar_llm.sonar.story_corpus import write_corpus
    from sonar_llm.sonar.train_tiny import TinySonarConfig, ensure_tiny_sonar

    data = run_dir / "data"
    t0 = time.perf_counter()
    train_st, valid_st = default_corpus(n_stories, extra_stories)
    if train_stories:
        train_st = train_st[:train_stories]
    write_corpus(data / "corpus" / "train.jsonl", train_st)
    write_corpus(data / "corpus" / "valid.jsonl", valid_st)
    say(f"corpus: {len(train_st)} training and {len(valid_st)} held-out stories ({time.perf_counter() - t0:.1f}s)")

    t0 = time.perf_counter()
    tiny_config = tiny_config or TinySonarConfig()
    if tiny_steps:
        tiny_config = dataclasses.replace(tiny_config, train_steps=int(tiny_steps))
    tiny = ensure_tiny_sonar(tiny_cache_dir, config=tiny_config)
    tiny_info = tiny.load_info()
    metrics = tiny_info.get("metrics", {})
    say(f"tiny SONAR ready at {tiny.root} ({time.perf_counter() - t0:.0f}s; held-out round trip: exact match "
        f"{metrics.get('exact_match', float('nan')):.1%}, BLEU {metrics.get('bleu', float('nan')):.1f})")

    t0 = time.perf_counter()
    codec = load_sonar_codec(tiny.encoder, tiny.tokenizer, batch_size=256, decoder_path=tiny.decoder)
    check_end_sentence(codec)
    for split in ("train", "valid"):
        kw = dict(shard_size_docs=1000, dtype="fp16", end_of_doc_text=END_OF_DOC, log=None, rank=0, world_size=1)
        try:  # resumes (or reuses) shards written with this very encoder and tokenizer
            preprocess(data / "corpus" / f"{split}.jsonl", data / split, codec, **kw)
        except DatasetSettingsMismatch as e:  # made by another tiny SONAR (or settings): derived data, rebuild
            _say(f"{split} shards were made with other settings, rebuilding them ({e})")  # not a step of `say`
            preprocess(data / "corpus" / f"{split}.jsonl", data / split, codec, overwrite=True, **kw)
    say(f"sentences encoded into shards under {data} ({time.perf_counter() - t0:.0f}s)")
    return {"train": str(data / "train"), "valid": str(data / "valid"), "decoder": str(tiny.decoder),
            "encoder": str(tiny.encoder), "tokenizer": str(tiny.tokenizer),
            "corpus_valid": str(data / "corpus" / "valid.jsonl"), "tiny_info": tiny_info}


def check_end_sentence(codec) -> None:
    """The end sentence must come back exactly through the SONAR the run uses (else SONAR-LLM could never learn to
    stop): raises `RoundTripError` naming it and what it decoded to. SONAR_LLM_END_CHECK=warn only warns (smoke
    tests whose tiny SONAR trains a few steps, too few to learn anything)."""
    from sonar_llm.sonar.round_trip import round_trip

    mode = os.environ.get("SONAR_LLM_END_CHECK", "error")
    if mode not in ("error", "warn"):
        raise ValueError(f"SONAR_LLM_END_CHECK must be 'error' or 'warn', got {mode!r}")
    result = round_trip(END_OF_DOC, codec.decode, encode=codec.encode)
    if result.exact:
        _say(f"the end sentence {END_OF_DOC!r} round-trips exactly through this SONAR")
    elif mode == "warn":
        _say(f"warning: {result.message()} (SONAR_LLM_END_CHECK=warn: going on)")
    else:
        raise RoundTripError(result)


def training_config(run_dir: Path, assets: dict, steps: int | None, extra: list[str] = (), check_paths: bool = True):
    """configs/default.toml with the prepared paths, the step budget and then `extra` (--section.key=value)."""
    overrides = [f"--data.path={assets['train']}", f"--data.val_path={assets['valid']}",
                 f"--sonar.decoder={assets['decoder']}", f"--sonar.encoder={assets['encoder']}",
                 f"--sonar.tokenizer={assets['tokenizer']}", f"--train.out_dir={run_dir}"]
    if not torch.cuda.is_available():
        overrides.append("--train.precision=fp32")  # CPU bf16 autocast is slower than fp32 without AMX
    if steps is not None:
        overrides.append(f"--train.steps={steps}")
    return load_config(str(_ROOT / "configs" / "default.toml"), overrides + list(extra), check_paths=check_paths)


def planned_config(extra: list[str] = ()):
    """The training config `python train/main.py` would run, without preparing anything (what
    `python train/main.py --dry-run` prints): the paths it will prepare (SONAR_LLM_DEFAULT_DIR, the tiny SONAR
    cache) and SONAR_LLM_DEFAULT_STEPS filled in, then `extra`; nothing on disk is read or checked."""
    from sonar_llm.sonar.train_tiny import TinySonarPaths, default_cache_dir

    run_dir = Path(os.environ.get("SONAR_LLM_DEFAULT_DIR", "runs/default"))
    tiny = TinySonarPaths.in_dir(default_cache_dir())
    assets = {"train": str(run_dir / "data" / "train"), "valid": str(run_dir / "data" / "valid"),
              "decoder": str(tiny.decoder), "encoder": str(tiny.encoder), "tokenizer": str(tiny.tokenizer)}
    steps = os.environ.get("SONAR_LLM_DEFAULT_STEPS")
    return training_config(run_dir, assets, int(steps) if steps else None, extra, check_paths=False)


def evaluate_and_show(cfg, assets: dict, final: dict) -> dict:
    """Steps 5-6: the generation protocol (with round trip and token NLL) and one continuation in full; the same
    stories decoded greedily beside it (eval/protocol_start_greedy.json)."""
    import dataclasses

    from sonar_llm.eval.evaluate import EvalConfig, evaluate, result_table

    t0 = time.perf_counter()
    ecfg = EvalConfig(run=str(cfg.train.out_dir), stories=assets["corpus_valid"], encoder=assets["encoder"],
                      decoder=assets["decoder"], tokenizer=assets["tokenizer"], nll_data=assets["valid"],
                      nll_docs=64, out=str(Path(cfg.train.out_dir) / "eval" / "protocol_start.json"),
                      **EVAL_SETTINGS)
    res = evaluate(ecfg, log=None)  # its table is printed under step 5's header below, its summary line is ours
    m = res["metrics"]
    greedy_cfg = dataclasses.replace(ecfg, temperature=None, top_p=None, beam_size=1, nll_data="", end_recall_docs=0,
                                     round_trip=False, out=str(Path(ecfg.out).with_name("protocol_start_greedy.json")))
    greedy = evaluate(greedy_cfg, log=None)["metrics"]

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    _say(f"[5/6] evaluated on {len(res['items'])} held-out stories ({time.perf_counter() - t0:.0f}s): "
         f"validation loss {fmt(final.get('eval_loss'))}, token NLL {fmt(m.get('token_nll'))}, "
         f"round-trip cosine {fmt(m.get('round_trip_cos'))} (low by design for SONAR-LLM: docs/evaluation.md, "
         "Metrics)")
    print(result_table(res), flush=True)
    _say(end_figures(m))
    _say(f"the same stories decoded greedily instead: {greedy['stop_end']:.0%} end, "
         f"{greedy['mean_generated_sentences']:.1f} sentences on average, duplicate sentences "
         f"{greedy['duplicate_sentence_rate']:.1%} (near-duplicates {greedy['near_duplicate_sentence_rate']:.1%}); "
         f"{_path(greedy_cfg.out)}; why sampling (far fewer repeats, more endings on 200 stories): "
         "docs/evaluation.md, \"How the embedded default's stories end\"")
    item = res["items"][0]
    print("\n[default] [6/6] the first held-out story, continued by the model (sampled, as in step 5)", flush=True)
    print("  prompt:    " + " ".join(item["prompt"]), flush=True)
    print("  generated: " + " ".join(item["generation"]) + f"  [stopped: {item.get('stop_reason')}]", flush=True)
    print("  original:  " + " ".join(item["reference"]), flush=True)
    if item.get("stop_reason") != "end":
        print(f"  (this one did not end: {1 - (m.get('stop_end') or 0):.0%} of the {len(res['items'])} stories of step 5 "
              "did not; docs/evaluation.md)", flush=True)
    return res


def last_eval_loss(run_dir: Path, step: int | None) -> float | None:
    """The validation loss of the run's last evaluation at or before `step` (its metrics.jsonl, read by
    sonar_train.plot.read_history; None when there is none, or the file is missing or unreadable: the summary then
    says n/a)."""
    from sonar_train.plot import MetricsError, read_history

    try:
        h = read_history(run_dir)
    except MetricsError:
        return None
    losses = [v for s, v in zip(h.eval_steps, h.eval_loss) if step is None or s <= step]
    return losses[-1] if losses else None


def end_figures(m: dict) -> str:
    """How the held-out stories ended (issue 26's figures; docs/evaluation.md records the default run's)."""
    def pct(k: str, digits: int = 0) -> str:
        return "n/a" if m.get(k) is None else f"{m[k]:.{digits}%}"

    recall = (f"teacher-forced end recall {pct('end_recall')}, false ends {pct('false_end_rate')}; "
              if "end_recall" in m else "")
    return (f"how stories end (sampled at temperature {DECODING['temperature']}, top-p {DECODING['top_p']}): "
            f"{recall}{pct('stop_end')} of the generations end on {END_OF_DOC!r} (repetition "
            f"{pct('stop_repetition')}, sentence cap {pct('stop_sentence_cap')}); {m['mean_generated_sentences']:.1f} "
            f"sentences generated on average (references {m['mean_reference_sentences']:.1f}); duplicate sentences "
            f"{pct('duplicate_sentence_rate', 1)} (near-duplicates {pct('near_duplicate_sentence_rate', 1)})")


def _path(p: str | Path) -> str:
    """`p` as a shell word, relative to the working directory when it lies below it (as the user typed it)."""
    p = Path(p)
    if p.is_absolute():
        try:
            p = p.relative_to(Path.cwd())
        except ValueError:
            pass
    return shlex.quote(str(p))


def _flags(settings: dict) -> list[str]:
    """`{"top_p": 0.9}` -> `["--top-p 0.9"]`."""
    return [f"--{k.replace('_', '-')} {v}" for k, v in settings.items()]


def next_commands(run_dir: Path, assets: dict) -> list[str]:
    """Three commands to try with this run, ready to paste in the directory the run was started from:
    generate from it, evaluate it with the paper's other prompt mode (the same budget as step 5), export it."""
    run = _path(run_dir)
    evaluate = ["python -m sonar_llm.eval.evaluate --run", run, "--stories", _path(assets["corpus_valid"]),
                "--prompt-mode half"]
    evaluate += _flags(EVAL_SETTINGS) + ["--out", _path(run_dir / "eval" / "protocol_half.json")]
    generate = ["python -m sonar_llm.generate --run", run, "--prompt", shlex.quote(NEXT_PROMPT), *_flags(DECODING)]
    return [" ".join(generate),
            " ".join(evaluate),
            f"python {_path(_ROOT / 'train' / 'export.py')} --run {run} --out {_path(run_dir / 'model.safetensors')}"]


def draw(run_dir: Path) -> str:
    """The training plot (sonar_train.plot); returns what to say about it."""
    from sonar_train.plot import MatplotlibMissing, MetricsError, plot_run

    try:
        return f"plot of the training (loss and tokens/s): {_path(plot_run(run_dir))}"
    except (MatplotlibMissing, MetricsError) as e:
        return f"no plot: {e}"


def training_plan(cfg) -> str:
    """What step 4 is about to do: train from scratch, resume, or (a finished run) train nothing. Read from the
    run's complete checkpoints; the loop decides (a checkpoint that fails verification is passed over)."""
    from sonar_llm.checkpoints import complete_steps

    steps = cfg.train.steps
    done = max(complete_steps(Path(cfg.train.out_dir) / "checkpoints"), default=0) if cfg.train.resume else 0
    what = f"SONAR-LLM ({cfg.model.preset} preset"
    if done >= steps:
        return f"{what}) already trained to step {done} of {steps}: resuming it, nothing to train"
    if done:
        return f"training {what}, steps {done}->{steps}, resuming its checkpoint)"
    return f"training {what}, {steps} steps)"


def summary(cfg, run_dir: Path, assets: dict, final: dict, res: dict, train_s: float, total_s: float) -> str:
    """The closing lines: what was trained, the evaluation headline, the plot and the next commands."""
    from sonar_llm.models.family import get_family

    m = res["metrics"]

    def fmt(k: str, v, spec: str = ".3f") -> str:
        return f"{k} {'n/a' if v is None else format(v, spec)}"

    headline = ", ".join([fmt("validation loss", final.get("eval_loss")), fmt("token NLL", m.get("token_nll")),
                          fmt("BLEU", m.get("bleu"), ".2f"), fmt("round-trip cosine", m.get("round_trip_cos"))])
    changed = "".join(f", {k}={v}" for k, v in sorted(cfg.model.overrides.items()))
    trained_here = ("already trained: resumed, no step to train in this run" if final.get("start_step") ==
                    final.get("step") else f"{train_s:.0f}s of training in this run")
    lines = [f"done in {total_s:.0f}s.",
             f"  trained:   {get_family(cfg.model.family).title}, {cfg.model.preset} preset{changed} "
             f"({res['num_parameters'] / 1e6:.2f}M parameters), step {final.get('step')} of {cfg.train.steps} "
             f"({trained_here}), in {_path(run_dir)}",
             f"  evaluated: {len(res['items'])} held-out stories: {headline} (generations in "
             f"{_path(run_dir / 'eval' / 'protocol_start.json')})",
             f"  {draw(run_dir)}",
             "next, try (ready to paste):"]
    return "\n".join([f"[default] {lines[0]}", *lines[1:], *(f"  {c}" for c in next_commands(run_dir, assets))])


def main(extra: list[str] = ()) -> int:
    """The whole default run; `extra` (--section.key=value) goes on top of the training config."""
    run_dir = Path(os.environ.get("SONAR_LLM_DEFAULT_DIR", "runs/default"))
    steps = os.environ.get("SONAR_LLM_DEFAULT_STEPS")
    if "SONAR_LLM_TINY_BUDGET" in os.environ:
        raise ValueError("SONAR_LLM_TINY_BUDGET (seconds) was replaced by SONAR_LLM_TINY_STEPS: the tiny SONAR "
                         "trains a fixed number of steps")
    tiny_steps = int(os.environ["SONAR_LLM_TINY_STEPS"]) if os.environ.get("SONAR_LLM_TINY_STEPS") else None
    from sonar_train.config import resume_changes

    # a run that cannot be resumed is refused before minutes of preparation (the default's folder is not
    # train.out_dir, which it refuses, but SONAR_LLM_DEFAULT_DIR)
    resume_changes(planned_config(extra), elsewhere="set SONAR_LLM_DEFAULT_DIR to another folder")
    marker = run_dir / ".prepared.json"
    t_start = time.perf_counter()
    if _rank() == 0:
        marker.unlink(missing_ok=True)
        marker.with_suffix(".failed").unlink(missing_ok=True)
        try:
            steps_done = iter(range(1, 4))
            stories = int(os.environ["SONAR_LLM_DEFAULT_STORIES"]) if os.environ.get("SONAR_LLM_DEFAULT_STORIES") else 0
            assets = prepare(run_dir, tiny_steps, train_stories=stories,
                             say=lambda msg: _say(f"[{next(steps_done)}/6] {msg}"))
        except BaseException as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}")
            if isinstance(e, RoundTripError):  # one line, no traceback: the SONAR is unfit for this run
                print(f"[default] error: {e}", file=sys.stderr, flush=True)
                return 1
            raise
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(assets))
        os.replace(tmp, marker)
    else:
        _wait_for(marker)
        assets = json.loads(marker.read_text())

    cfg = training_config(run_dir, assets, int(steps) if steps else None, extra)
    _say(f"[4/6] {training_plan(cfg)} in {run_dir}")
    from sonar_train.loop import run_training

    t_train = time.perf_counter()
    final = run_training(cfg)
    train_s = time.perf_counter() - t_train
    if _rank() != 0:
        return 0
    if final.get("eval_loss") is None:  # a re-run of a finished run trains no step: its last evaluation stands
        final["eval_loss"] = last_eval_loss(Path(cfg.train.out_dir), final.get("step"))
    res = evaluate_and_show(cfg, assets, final)
    print("", flush=True)
    print(summary(cfg, run_dir, assets, final, res, train_s, time.perf_counter() - t_start), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
