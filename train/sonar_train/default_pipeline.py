"""The embedded default: `python train/main.py` with no arguments, offline, on a clean clone.

1. writes the project's own story corpus (sonar_llm.sonar.story_corpus) as train/valid JSONL;
2. trains the tiny SONAR autoencoder on it, unless a cached copy exists ($SONAR_LLM_CACHE/tiny_sonar);
3. encodes every sentence with that SONAR into memory-mapped shards (resumable);
4. trains a small SONAR-LLM with the standard loop (configs/default.toml; FSDP2 under torchrun);
5. evaluates it: validation loss, token NLL, and the paper's generation protocol on held-out stories;
6. prints a generated continuation of a held-out story.

Under torchrun, rank 0 prepares steps 1-3 while the other ranks wait for its "ready" marker; every rank
trains; rank 0 evaluates. Re-running resumes: cached assets and complete shards are reused, and training
continues from the latest checkpoint in runs/default (delete that folder to start over).
Environment: SONAR_LLM_DEFAULT_DIR (default "runs/default"), SONAR_LLM_CACHE (tiny SONAR cache),
SONAR_LLM_DEFAULT_STEPS (training steps), SONAR_LLM_TINY_STEPS (tiny SONAR training steps; default
TinySonarConfig.train_steps: a fixed count, so two runs give the same tiny SONAR however busy the machine is).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

_ROOT = Path(__file__).resolve().parents[2]  # the checkout

from sonar_train.config import load_config  # noqa: E402

N_STORIES = 4000
HELD_OUT_FRACTION = 0.05  # the tiny SONAR's split: its held-out stories are never seen by any model
EVAL_STORIES = 24
END_OF_DOC = "End of sequence."


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


def prepare(run_dir: Path, tiny_steps: int | None = None, *, n_stories: int = N_STORIES, train_stories: int = 0,
            tiny_config=None, tiny_cache_dir: Path | None = None, say=print) -> dict:
    """Steps 1-3: corpus, tiny SONAR, shards (run by one process). Returns the paths the training config
    needs and the tiny SONAR's info. `train_stories` > 0 keeps only that many training stories (the split,
    and so the held-out stories, stay those of the full corpus); `tiny_config` / `tiny_cache_dir` select
    another tiny SONAR than the default's (see sonar_llm.sonar.train_tiny); `tiny_steps` overrides its
    `train_steps`."""
    import dataclasses

    from sonar_llm.data.preprocess import load_sonar_codec, preprocess
    from sonar_llm.data.shards import DatasetSettingsMismatch
    from sonar_llm.sonar.story_corpus import generate_stories, split_stories, write_corpus
    from sonar_llm.sonar.train_tiny import TinySonarConfig, ensure_tiny_sonar

    data = run_dir / "data"
    t0 = time.perf_counter()
    stories = generate_stories(n_stories, seed=0)
    train_st, valid_st = split_stories(stories, HELD_OUT_FRACTION, seed=0)
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
    codec = load_sonar_codec(tiny.encoder, tiny.tokenizer, batch_size=256)
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


def training_config(run_dir: Path, assets: dict, steps: int | None):
    overrides = [f"--data.path={assets['train']}", f"--data.val_path={assets['valid']}",
                 f"--sonar.decoder={assets['decoder']}", f"--sonar.encoder={assets['encoder']}",
                 f"--sonar.tokenizer={assets['tokenizer']}", f"--train.out_dir={run_dir}"]
    if not torch.cuda.is_available():
        overrides.append("--train.precision=fp32")  # CPU bf16 autocast is slower than fp32 without AMX
    if steps is not None:
        overrides.append(f"--train.steps={steps}")
    return load_config(str(_ROOT / "configs" / "default.toml"), overrides)


def evaluate_and_show(cfg, assets: dict, final: dict) -> dict:
    """Steps 5-6: the generation protocol (with round trip and token NLL) and one continuation in full."""
    from sonar_llm.eval.evaluate import EvalConfig, evaluate

    t0 = time.perf_counter()
    ecfg = EvalConfig(run=str(cfg.train.out_dir), stories=assets["corpus_valid"], num_stories=EVAL_STORIES,
                      max_story_sentences=20, beam_size=1, max_gen_len=64, encoder=assets["encoder"],
                      decoder=assets["decoder"], tokenizer=assets["tokenizer"], nll_data=assets["valid"],
                      nll_docs=64, out=str(Path(cfg.train.out_dir) / "eval" / "protocol_start.json"))
    res = evaluate(ecfg, log=lambda table: print(table, flush=True))
    m = res["metrics"]

    def fmt(v) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    _say(f"[5/6] evaluated on {len(res['items'])} held-out stories ({time.perf_counter() - t0:.0f}s): "
         f"validation loss {fmt(final.get('eval_loss'))}, token NLL {fmt(m.get('token_nll'))}, "
         f"round-trip cosine {fmt(m.get('round_trip_cos'))}")
    item = res["items"][0]
    print("\n[6/6] a held-out story, continued by the model", flush=True)
    print("  prompt:    " + " ".join(item["prompt"]), flush=True)
    print("  generated: " + " ".join(item["generation"]), flush=True)
    print("  original:  " + " ".join(item["reference"]), flush=True)
    return res


def main() -> int:
    run_dir = Path(os.environ.get("SONAR_LLM_DEFAULT_DIR", "runs/default"))
    steps = os.environ.get("SONAR_LLM_DEFAULT_STEPS")
    if "SONAR_LLM_TINY_BUDGET" in os.environ:
        raise ValueError("SONAR_LLM_TINY_BUDGET (seconds) was replaced by SONAR_LLM_TINY_STEPS: the tiny SONAR "
                         "trains a fixed number of steps")
    tiny_steps = int(os.environ["SONAR_LLM_TINY_STEPS"]) if os.environ.get("SONAR_LLM_TINY_STEPS") else None
    marker = run_dir / ".prepared.json"
    t_start = time.perf_counter()
    if _rank() == 0:
        marker.unlink(missing_ok=True)
        marker.with_suffix(".failed").unlink(missing_ok=True)
        try:
            steps_done = iter(range(1, 4))
            assets = prepare(run_dir, tiny_steps, say=lambda msg: _say(f"[{next(steps_done)}/6] {msg}"))
        except BaseException as e:
            run_dir.mkdir(parents=True, exist_ok=True)
            marker.with_suffix(".failed").write_text(f"{type(e).__name__}: {e}")
            raise
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(assets))
        os.replace(tmp, marker)
    else:
        _wait_for(marker)
        assets = json.loads(marker.read_text())

    cfg = training_config(run_dir, assets, int(steps) if steps else None)
    _say(f"[4/6] training SONAR-LLM ({cfg.model.preset} preset, {cfg.train.steps} steps) in {run_dir}")
    from sonar_train.loop import run_training

    final = run_training(cfg)
    if _rank() != 0:
        return 0
    evaluate_and_show(cfg, assets, final)
    _say(f"done in {time.perf_counter() - t_start:.0f}s; metrics in {run_dir}/metrics.jsonl, "
         f"generations in {run_dir}/eval/protocol_start.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
