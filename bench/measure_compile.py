"""Issue 28's measurement: the training step and the decoder loss compiled per layer (`train.compile`) vs eager.

    python bench/measure_compile.py                 # CPU, the issue's shapes, 100 varying batches
    python bench/measure_compile.py --quick         # tiny shapes, 5 batches: a smoke run (seconds)
    python bench/measure_compile.py --rows decoder-ab --steps 0 --rounds 5   # the ReLU-mask A/B below

Two rows, each eager and compiled side by side in one process on the same weights and batches:
  train-step    SONAR-LLM at the `small` backbone preset with a full-width SONAR decoder (d 1024, 2 layers,
                vocab 256,206): forward + backward + AdamW of one packed batch (4 documents x 6 sentences);
  decoder-loss  PackedSonarDecoder.loss at the released decoder's shape (24 layers x d 1024, vocab 256,206,
                FFN 8192) on 8 sentences: forward + backward to the predicted embeddings.
Optional row (`--rows decoder-ab`): the decoder loss at a reduced released shape (d 1024, 4 layers, FFN 8192,
vocab 256,206, 8 sentences) three ways interleaved in one process: eager, torch's stock inductor
(`compile_fx`, which saves ReLU's backward mask as a bool tensor) and the project's `inductor_backend`
(sonar_llm/compile.py, which saves ReLU's output as eager does): the A/B of issue 28's CPU slowdown.
Per row: the first call of each path (the compiled one includes compilation: `compile_s` is its excess over
a warm compiled call), the median warm step of each over `--rounds` interleaved rounds, their ratio
compiled / eager (< 1: compiled is faster), then the compiled path over `--steps` batches of varying packed
lengths: recompiles (dynamo cache entries beyond the first of each compiled code object) and graph breaks
(torch._dynamo.utils.counters["graph_break"]). Prints a table and writes
bench/results/compile_<device>_<UTC time>.json with the machine's load average (on a shared machine the
absolute times move with the load; the interleaved ratio much less).
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SonarShape, random_sonar_decoder, sync, synthetic_concept_batch  # noqa: E402
from sonar_llm.models.build import ModelConfig, build_model  # noqa: E402
from sonar_llm.sonar.packed_decoder import PackedSonarDecoder  # noqa: E402
from sonar_train.parallel import compile_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_DECODER = SonarShape(1024, 2, 16, 8192, 256_206)  # full-width SONAR decoder, 2 layers
RELEASED_DECODER = SonarShape(1024, 24, 16, 8192, 256_206)  # the released SONAR decoder's shape
QUICK_DECODER = SonarShape(64, 2, 4, 128, 512)
AB_DECODER = SonarShape(1024, 4, 16, 8192, 256_206)  # the released width, 4 layers (decoder-ab)


def _median_pair(eager_fn, compiled_fn, rounds: int) -> tuple[float, float]:
    """Median seconds of each over `rounds` interleaved calls."""
    te, tc = [], []
    for _ in range(rounds):
        for fn, out in ((eager_fn, te), (compiled_fn, tc)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(te), statistics.median(tc)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _recompiles(codes) -> tuple[int, dict[str, int]]:
    entries = {c.co_qualname: len(_debug_get_cache_entry_list(c)) for c in codes}
    return sum(max(0, n - 1) for n in entries.values()), entries


def _compiled_codes(model) -> set:
    codes = {type(b).forward.__code__ for b in model.transformer_blocks()}
    if getattr(model, "_packed", None) is not None:
        codes |= {PackedSonarDecoder._layer_step.__code__, PackedSonarDecoder._last_step.__code__}
    return codes


def _row(name: str, first_e: float, first_c: float, warm_e: float, warm_c: float, recompiles: int,
         entries: dict, breaks: int, steps: int, **extra) -> dict:
    return {"row": name, "eager_first_s": first_e, "compiled_first_s": first_c,
            "compile_s": max(0.0, first_c - warm_c), "eager_step_s": warm_e, "compiled_step_s": warm_c,
            "compiled_over_eager": warm_c / warm_e, "varying_steps": steps, "recompiles": recompiles,
            "cache_entries": entries, "graph_breaks": breaks, **extra}


def measure_train_step(device, quick: bool, rounds: int, steps: int) -> dict:
    shape = QUICK_DECODER if quick else TRAIN_DECODER
    decoder = random_sonar_decoder(shape, device=device)
    cfg = ModelConfig(family="sonar_llm", preset="tiny" if quick else "small",
                      overrides={"sonar_dim": shape.model_dim})
    torch.manual_seed(0)
    with torch.device(device):
        eager = build_model(cfg, decoder=decoder).train()
    eager.decoder_to(device)
    compiled = copy.deepcopy(eager)
    compiled.set_decoder(copy.deepcopy(eager.packed_decoder))
    compile_model(compiled, list(compiled.transformer_blocks()))
    opts = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for m in (eager, compiled)}
    docs, sents = (2, 3) if quick else (4, 6)
    fixed = synthetic_concept_batch(shape, docs, sents, (8, 20), seed=0, device=device)

    def step(model, batch):
        loss, _ = model.loss(batch)
        loss.backward()
        opts[model].step()
        opts[model].zero_grad(set_to_none=True)
        sync(device)

    counters.clear()
    first_e = _timed(lambda: step(eager, fixed))
    first_c = _timed(lambda: step(compiled, fixed))
    warm_e, warm_c = _median_pair(lambda: step(eager, fixed), lambda: step(compiled, fixed), rounds)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):  # varying packed lengths: documents, sentences per document, words per sentence
        d = int(torch.randint(1, docs + 1, (1,), generator=g))
        s = int(torch.randint(2, sents + 1, (1,), generator=g))
        step(compiled, synthetic_concept_batch(shape, d, s, (3, 20), seed=100 + i, device=device))
    recompiles, entries = _recompiles(_compiled_codes(compiled))
    return _row("train-step", first_e, first_c, warm_e, warm_c, recompiles, entries,
                sum(counters["graph_break"].values()), steps, backbone=cfg.preset,
                decoder=f"d={shape.model_dim} L={shape.num_layers} V={shape.vocab_size}",
                batch=f"{docs} docs x {sents} sentences")


def measure_decoder_loss(device, quick: bool, rounds: int, steps: int) -> dict:
    shape = QUICK_DECODER if quick else RELEASED_DECODER
    decoder = random_sonar_decoder(shape, device=device)
    eager = PackedSonarDecoder(decoder)
    compiled = PackedSonarDecoder(decoder)
    compiled.compile_layers()
    sentences = 8

    def inputs(num, seed):
        batch = synthetic_concept_batch(shape, 1, num, (8, 20), seed=seed, device=device)
        return eager.prepare(batch.tokens, batch.tok_cu_seqlens), batch.embeddings.clone().requires_grad_()

    fixed = inputs(sentences, 0)

    def step(packed, prepared, emb):
        packed.loss(emb, prepared).backward()
        sync(device)

    counters.clear()
    first_e = _timed(lambda: step(eager, *fixed))
    first_c = _timed(lambda: step(compiled, *fixed))
    warm_e, warm_c = _median_pair(lambda: step(eager, *fixed), lambda: step(compiled, *fixed), rounds)
    g = torch.Generator().manual_seed(2)
    for i in range(steps):
        step(compiled, *inputs(int(torch.randint(2, sentences + 1, (1,), generator=g)), 100 + i))
    codes = {PackedSonarDecoder._layer_step.__code__, PackedSonarDecoder._last_step.__code__}
    recompiles, entries = _recompiles(codes)
    return _row("decoder-loss", first_e, first_c, warm_e, warm_c, recompiles, entries,
                sum(counters["graph_break"].values()), steps,
                decoder=f"d={shape.model_dim} L={shape.num_layers} V={shape.vocab_size}",
                batch=f"{sentences} sentences")


def measure_decoder_ab(device, quick: bool, rounds: int, steps: int) -> dict:
    from torch._inductor.compile_fx import compile_fx

    shape = QUICK_DECODER if quick else AB_DECODER
    decoder = random_sonar_decoder(shape, device=device)
    eager, stock, project = PackedSonarDecoder(decoder), PackedSonarDecoder(decoder), PackedSonarDecoder(decoder)
    stock.compile_layers(backend=compile_fx)  # torch's inductor as the "inductor" string gives it
    project.compile_layers()  # sonar_llm.compile.inductor_backend
    batch = synthetic_concept_batch(shape, 1, 8, (8, 20), seed=0, device=device)
    prepared, emb = eager.prepare(batch.tokens, batch.tok_cu_seqlens), batch.embeddings

    def step(packed):
        packed.loss(emb.clone().requires_grad_(), prepared).backward()
        sync(device)

    first = {name: _timed(lambda m=m: step(m)) for name, m in (("eager", eager), ("stock", stock),
                                                                ("project", project))}
    times = {"eager": [], "stock": [], "project": []}
    for _ in range(rounds):
        for name, m in (("eager", eager), ("stock", stock), ("project", project)):
            times[name].append(_timed(lambda m=m: step(m)))
    med = {k: statistics.median(v) for k, v in times.items()}
    row = _row("decoder-ab", first["eager"], first["project"], med["eager"], med["project"], 0, {}, 0, 0,
               decoder=f"d={shape.model_dim} L={shape.num_layers} V={shape.vocab_size}", batch="8 sentences",
               stock_inductor_step_s=med["stock"], stock_over_eager=med["stock"] / med["eager"],
               rounds_s=times)
    return row


def _print(rows: list[dict]) -> None:
    print(f"{'row':<13} {'compile s':>9} {'eager s/step':>12} {'compiled s/step':>15} {'compiled/eager':>14} "
          f"{'recompiles':>10} {'graph breaks':>12}")
    for r in rows:
        print(f"{r['row']:<13} {r['compile_s']:>9.1f} {r['eager_step_s']:>12.3f} {r['compiled_step_s']:>15.3f} "
              f"{r['compiled_over_eager']:>14.3f} {r['recompiles']:>7} / {r['varying_steps']:<3} "
              f"{r['graph_breaks']:>9}")
        if "stock_over_eager" in r:
            print(f"{'':<13} torch's stock inductor: {r['stock_inductor_step_s']:.3f} s/step, "
                  f"{r['stock_over_eager']:.3f} x eager")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python bench/measure_compile.py", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes and 5 varying steps (a smoke run)")
    p.add_argument("--steps", type=int, default=None, help="varying batches for the recompile count (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved warm rounds per path (default 3)")
    p.add_argument("--rows", default="train-step,decoder-loss",
                   help="comma-separated rows to measure: train-step, decoder-loss, decoder-ab")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/compile_...)")
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else (5 if args.quick else 100)
    rows_wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    measures = {"train-step": measure_train_step, "decoder-loss": measure_decoder_loss,
                "decoder-ab": measure_decoder_ab}
    bad = [r for r in rows_wanted if r not in measures]
    if bad or not rows_wanted:
        print(f"--rows: expected train-step, decoder-loss and/or decoder-ab, got {args.rows!r}", file=sys.stderr)
        return 2
    if steps < 0 or args.rounds < 1:
        print("--steps must be >= 0 and --rounds >= 1", file=sys.stderr)
        return 2
    if args.device not in ("cpu", "cuda") or (args.device == "cuda" and not torch.cuda.is_available()):
        print(f"--device: {args.device!r} is not available here (cpu or cuda)", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    load_before = os.getloadavg()
    rows = []
    for name in rows_wanted:
        torch._dynamo.reset()  # each row compiles (and counts its cache entries) from scratch
        rows.append(measures[name](device, args.quick, args.rounds, steps))
        _print(rows[-1:])
    print()
    _print(rows)
    result = {
        "when_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "quick": args.quick, "rows": rows,
    }
    print(f"load average (1, 5, 15 min): before {load_before}, after {result['loadavg_after']}")
    out = args.out or RESULTS / f"compile_{device.type}_{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}.json"
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
