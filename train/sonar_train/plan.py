"""Plan a run before renting GPUs: memory per rank, FLOPs and time per step, computed by the real code.

    python -m sonar_train.plan --config configs/sonar_llm_600m.toml --nproc 8 --gpu h100-80gb [--mfu 0.4]
                         [--json out.json] [--section.key=value ...]

What it does (train/sonar_train/plan_trace.py holds the machinery):
1. Data: the config's `data.path` shards if they exist, else planning shards written to a temporary
   directory in the real shard format from a built-in TinyStories-like length histogram (ASSUMED, stated
   below; TinyStories cannot be downloaded here). The real loader (sonar_llm.data.loader) packs one
   micro-batch of the config's size (`data.max_sentences`, `data.max_tokens`) from them; the model's
   build reads the same shards (embedding width, vocabulary, normalizer fit) as a training run would.
2. Trace: the real model, the frozen SONAR decoder at its real shapes (the `basic` preset: 24 layers,
   d=1024, vocabulary 256,206) and the loss are built inside `PlanFakeMode` (fake float tensors, real
   integer ones); `train.parallel.parallelize` shards it with FSDP2 on torch's fake process group as
   rank 0 of `--nproc`; `train.optim.build_optimizer` builds AdamW; then one real training step runs:
   autocast forward (`model.loss`), backward, gradient clipping, optimizer step.
   Memory: torch.distributed._tools' FSDPMemTracker (MemTracker for one process) records every tensor
   storage the step creates, by category, and the peak. FLOPs: FlopCounterMode, split into the concept
   model (ops inside its modules), the vocabulary projection (matmuls with the [V, D] matrix) and the rest
   (frozen decoder, loss). Attention is modelled as flash-attn's varlen kernel (what a GPU run with
   flash-attn executes; `--attention traced` traces the CPU path instead).
3. Kernel temporaries: every `linear_cross_entropy` call of the step is recorded and replayed alone
   under MemTracker at the same shapes: its peak minus its inputs and outputs is the kernels' scratch.
4. Largest batch: the step is traced again at half the sentence budget; peak memory is linear in the
   batch (a + c * sentences) and the budget where it reaches `--headroom` x the GPU's memory is solved for.
5. Time: FLOPs per rank per step / (GPU peak x `--mfu`); the GPU table below cites each peak.
6. The public code's path (family configs with a `path` field, i.e. SONAR-LLM): `path="reference"`
   (padded full-logit decoder, full cross-attention) on micro-batches of 1 document, 64 accumulation
   steps; FLOPs of one traced micro-batch x 64 (each of several documents traced, the mean used).
7. Closed form: each path's traced count is set against the family's closed form (`flops_per_batch`,
   model FLOPs of the path it runs) after taking out the forward ops that activation checkpointing runs
   again in the backward pass (counted apart, phase "recompute"); they agree to well under 1% (tested in
   tests/test_plan.py). For the public path the report also gives the same batch's closed form through
   our fast path: the rest is the public computation's own cost, every sentence padded to the
   document's longest and the cross-attention query and output projections run at every position
   (the fast path folds a one-key cross-attention into one vector per sentence).

Nothing here is measured on a GPU: all figures are computed from the code (shapes, dtypes, op counts).
The figures differ from a GPU run where the code picks a CPU-only path: the CPU linear cross-entropy
upcasts a half weight to fp32 (a [V, D] fp32 copy, shown under the kernel temporaries) and the CPU
optimizer is the single-tensor AdamW (the fused CUDA one allocates no per-parameter temporaries).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from sonar_train.config import RunConfig, load_config  # noqa: E402

GiB = 2.0 ** 30


# ------------------------------------------------------------------------------------------ GPU table
@dataclass(frozen=True)
class GPU:
    name: str
    memory_bytes: float  # HBM capacity
    bf16_dense_flops: float  # peak dense bf16/fp16 tensor-core FLOP/s (no sparsity)
    source: str


GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 SXM5 80GB", 80e9, 989e12,
                     "NVIDIA H100 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity "
                     "(989 dense), 80 GB HBM3 (SXM)"),
    "h200": GPU("NVIDIA H200 SXM 141GB", 141e9, 989e12,
                "NVIDIA H200 Tensor Core GPU datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity "
                "(989 dense), 141 GB HBM3e"),
    "a100-80gb": GPU("NVIDIA A100 SXM4 80GB", 80e9, 312e12,
                     "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), "
                     "80 GB HBM2e"),
    "a100-40gb": GPU("NVIDIA A100 SXM4 40GB", 40e9, 312e12,
                     "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS, 40 GB HBM2"),
}

PUBLIC_DOCS_PER_MICRO_BATCH = 1  # Pabiya/SONAR-LLM train_sonarllm_fast.py: batch of 1 document per GPU ...
PUBLIC_ACCUMULATION = 64  # ... and 64 accumulation steps (8 GPUs x 64 = 512 documents per step)
PUBLIC_TRACED_DOCS = 2  # documents traced one by one for the public path's mean FLOPs per micro-batch


# --------------------------------------------------------------------------------- length histogram
# ASSUMED TinyStories-like lengths (not measured: the corpus cannot be downloaded on this machine).
# Sentences per story before the appended end-of-document sentence, and SONAR target-mode tokens per
# sentence ([eos, lang, w1..wn, eos], so 3 special tokens + the sentencepiece pieces). Pass a config whose
# data.path holds real shards to plan on the real distribution instead.
SENTENCES_PER_DOC = {4: 0.04, 6: 0.10, 8: 0.16, 10: 0.18, 12: 0.16, 14: 0.12, 16: 0.09, 20: 0.08, 26: 0.04,
                     31: 0.03}
TOKENS_PER_SENTENCE = {6: 0.05, 9: 0.14, 12: 0.21, 15: 0.20, 18: 0.15, 22: 0.12, 28: 0.08, 36: 0.04, 50: 0.01}
END_SENTENCE_TOKENS = 7  # "End of sequence." in target mode (assumed)
SONAR_VOCAB = 256_206
SONAR_DIM = 1024


def _local(t):
    """The local shard of a DTensor, else `t`."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def _draw(rng: np.random.Generator, table: dict[int, float], n: int) -> np.ndarray:
    values = np.array(list(table), dtype=np.int64)
    p = np.array(list(table.values()), dtype=np.float64)
    return rng.choice(values, size=n, p=p / p.sum())


def histogram_means() -> tuple[float, float]:
    """(mean sentences per document including the end sentence, mean tokens per sentence) of the histogram."""
    s = sum(k * p for k, p in SENTENCES_PER_DOC.items()) / sum(SENTENCES_PER_DOC.values())
    t = sum(k * p for k, p in TOKENS_PER_SENTENCE.items()) / sum(TOKENS_PER_SENTENCE.values())
    return s + 1, t


def write_planning_shards(out_dir: Path, num_sentences: int, seed: int = 0, embed_dim: int = SONAR_DIM,
                          vocab_size: int = SONAR_VOCAB) -> Path:
    """Documents drawn from the histogram, at least `num_sentences` sentences, written as real shards
    (random fp16 embeddings; token ids in [4, vocab) with the largest id present, so that a build reading
    the vocabulary size from the data gets `vocab_size`)."""
    from sonar_llm.data.shards import DatasetWriter, ShardArrays

    rng = np.random.default_rng(seed)
    doc_lens: list[int] = []
    while sum(doc_lens) < num_sentences:
        doc_lens.extend(int(n) + 1 for n in _draw(rng, SENTENCES_PER_DOC, 64))
    s = sum(doc_lens)
    tok_lens = _draw(rng, TOKENS_PER_SENTENCE, s)
    ends = np.cumsum(doc_lens) - 1
    tok_lens[ends] = END_SENTENCE_TOKENS
    lang = vocab_size - 205 + 47  # an eng_Latn-like language tag in the SONAR id layout
    pieces = []
    for n in tok_lens:
        pieces.append([3, min(lang, vocab_size - 1), *rng.integers(4, vocab_size, size=int(n) - 3), 3])
    pieces[0][2] = vocab_size - 1
    tokens = np.concatenate(pieces).astype(np.int32)
    sent_offsets = np.concatenate([[0], np.cumsum(tok_lens)]).astype(np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int64)
    emb = (rng.standard_normal((s, embed_dim)) * 0.01).astype(np.float16)
    writer = DatasetWriter(out_dir, embed_dim=embed_dim, dtype="fp16", end_of_doc_text="End of sequence.",
                           end_of_doc_tokens=pieces[int(ends[0])], end_of_doc_embedding=emb[int(ends[0])],
                           config={"planner": "train/sonar_train/plan.py built-in TinyStories-like histogram (assumed)"})
    writer.add_shard(0, ShardArrays(emb, tokens, sent_offsets, doc_offsets))
    writer.finish(1)
    return out_dir


def sonar_preset_for(data_path: str) -> str:
    """The SONAR shapes that match the data's embedding width: `basic` (the real SONAR, 1024-d) unless the
    shards hold embeddings of a smaller preset (e.g. the embedded default's tiny SONAR, 128-d)."""
    from sonar_llm.data.shards import read_manifest
    from sonar_llm.sonar.config import PRESET_NAMES, decoder_preset

    width = int(read_manifest(data_path)["embed_dim"])
    for name in ("basic", *PRESET_NAMES):
        if decoder_preset(name).encoder_dim == width:
            return name
    raise ValueError(f"data.path: {data_path} holds {width}-d embeddings; no SONAR preset has that width "
                     f"(known: {', '.join(PRESET_NAMES)})")


def one_batch(data_path: str, max_sentences: int, max_tokens: int, seed: int = 0, max_docs: int = 0):
    """The first micro-batch the real loader packs from `data_path` under these budgets."""
    from sonar_llm.data.loader import ConceptLoader
    from sonar_llm.data.shards import ShardedDataset

    loader = ConceptLoader(ShardedDataset(data_path), max_sentences=max_sentences, max_tokens=max_tokens,
                           max_docs=max_docs, seed=seed, shuffle=True, loop=True)
    return next(iter(loader))


def document_batches(data_path: str, count: int, max_tokens: int, seed: int = 0) -> list:
    """`count` single-document micro-batches (the public code's batch of 1 document)."""
    from sonar_llm.data.loader import ConceptLoader
    from sonar_llm.data.shards import ShardedDataset

    ds = ShardedDataset(data_path)
    longest = int(ds.doc_lengths()[0].max())
    loader = ConceptLoader(ds, max_sentences=longest, max_tokens=max_tokens, seed=seed, shuffle=True, loop=True)
    out = []
    for b in loader:
        if b.num_docs == 1:
            out.append(b)
        if len(out) == count:
            return out
    return out


# ------------------------------------------------------------------------------------------ the build
def build_traced_model(cfg: RunConfig, decoder_preset_name: str = "basic") -> tuple[nn.Module, Any]:
    """The family's model exactly as a run builds it, with a SONAR decoder at the real (`basic`) shapes when
    the family's spec says it takes one. Call inside PlanFakeMode: no weights exist."""
    from sonar_llm.models.build import ModelConfig, build_model
    from sonar_llm.models.family import get_family
    from sonar_llm.sonar.config import decoder_preset
    from sonar_llm.sonar.decoder import SonarTextDecoder

    spec = get_family(cfg.model.family)
    deps = {}
    if spec.needs_decoder:
        deps["decoder"] = SonarTextDecoder(decoder_preset(decoder_preset_name))
    mcfg = ModelConfig.from_sections(cfg.model, cfg.sonar, cfg.data)
    return build_model(mcfg, **deps), spec


def _external_modules(model: nn.Module) -> list[nn.Module]:
    """Modules the model holds outside its module tree (e.g. a frozen decoder kept out of FSDP)."""
    return [v for k, v in vars(model).items() if isinstance(v, nn.Module) and k not in ("_modules",)]


def _vocab_shapes(modules: list[nn.Module]) -> list[tuple[int, int]]:
    return [tuple(m.weight.shape) for root in modules for m in root.modules()
            if isinstance(m, nn.Embedding)]


def _lce_recorder(records: list):
    """Context manager: record the shapes of every linear_cross_entropy call (for the isolated replay)."""
    import sys as _sys

    from sonar_kernels.functional import linear_cross_entropy as lce_mod

    original = lce_mod.linear_cross_entropy

    def recorded(hidden, weight, target, *args, **kwargs):
        records.append(dict(n=hidden.shape[0], d=hidden.shape[1], v=weight.shape[0], dtype=hidden.dtype,
                            weight_dtype=weight.dtype, hidden_grad=hidden.requires_grad,
                            weight_grad=weight.requires_grad, kwargs={k: v for k, v in kwargs.items()
                                                                      if k in ("reduction", "impl", "ignore_index")}))
        return original(hidden, weight, target, *args, **kwargs)

    @contextlib.contextmanager
    def ctx():
        patched = [m for m in list(_sys.modules.values()) if getattr(m, "linear_cross_entropy", None) is original]
        for m in patched:
            m.linear_cross_entropy = recorded
        try:
            yield
        finally:
            for m in patched:
                m.linear_cross_entropy = original

    return ctx()


def kernel_temporaries(record: dict) -> dict[str, Any]:
    """Replay one linear_cross_entropy call alone (fake tensors, MemTracker): scratch bytes = peak during
    forward + backward minus its inputs and outputs; also the largest scratch tensors by shape."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy
    from sonar_kernels.ops.inline import inline_ops
    from sonar_train.plan_trace import PlanFakeMode

    allocs: list[tuple[int, tuple, str]] = []

    class _Log(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1_000_000 \
                        and not t._is_view():
                    allocs.append((t.untyped_storage().nbytes(), tuple(t.shape), str(t.dtype).replace("torch.", "")))
            return out

    with PlanFakeMode():
        hidden = torch.empty(record["n"], record["d"], dtype=record["dtype"]).requires_grad_(record["hidden_grad"])
        weight = torch.empty(record["v"], record["d"], dtype=record["weight_dtype"]).requires_grad_(
            record["weight_grad"])
        target = torch.randint(0, record["v"], (record["n"],))
        inputs = hidden.untyped_storage().nbytes() + weight.untyped_storage().nbytes()
        mt = MemTracker()
        mt.track_external(hidden, weight, target)
        with mt, _Log(), inline_ops():  # inline_ops: the trackers see the kernels' own tensors
            loss = linear_cross_entropy(hidden, weight, target, **record["kwargs"])
            if loss.dim():
                loss = loss.sum()
            if loss.requires_grad:
                loss.backward()
        peak = max(s["Total"] for s in mt.get_tracker_snapshot("peak").values())
        grads = sum(t.grad.untyped_storage().nbytes() for t in (hidden, weight) if t.grad is not None)
    biggest = sorted(set(allocs), reverse=True)[:4]
    return {"calls_shape": f"N={record['n']} D={record['d']} V={record['v']} {str(record['dtype'])[6:]}",
            "scratch_bytes": int(peak - inputs - target.untyped_storage().nbytes() - grads),
            "largest": [{"shape": list(s), "dtype": dt, "bytes": b} for b, s, dt in biggest]}


# ------------------------------------------------------------------------------------------ the trace
def trace_step(cfg: RunConfig, nproc: int, batch, *, attention: str = "flash", micro_batches: int = 1,
               overrides: dict | None = None, count_flops: bool = True, replay_kernels: bool = True,
               decoder_preset: str = "basic") -> dict[str, Any]:
    """One training step of `cfg` on `batch` (real ConceptBatch) as rank 0 of `nproc` FSDP2 ranks, on fake
    tensors. Returns memory (bytes per rank), FLOPs (per micro-batch and per step; zeros unless
    `count_flops`) and shapes; `replay_kernels` adds the linear cross-entropy scratch (kernel_temporaries)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    from sonar_kernels.ops.inline import inline_ops
    from sonar_train.optim import build_optimizer
    from sonar_train.parallel import DTYPES, DistInfo, parallelize, uses_fsdp
    from sonar_train.plan_trace import (PlanFakeMode, PlanFlopCounter, fake_process_group, flash_attention_model,
                                  plain_mem_tracker, storage_bytes)

    cfg = copy.deepcopy(cfg)
    cfg.train.device = "cpu"
    # the eager step is traced: compiled regions would need their own fake tracing, and train.compile changes
    # no parameter, gradient or optimizer byte (activation savings of fused kernels are not modelled)
    cfg.train.compile = False
    for k, v in (overrides or {}).items():
        cfg.model.overrides[k] = v
    dtype = DTYPES[cfg.train.precision]
    records: list[dict] = []
    attn_ctx = flash_attention_model() if attention == "flash" else contextlib.nullcontext()
    with fake_process_group(nproc), attn_ctx, PlanFakeMode():
        torch.manual_seed(cfg.train.seed)
        model, spec = build_traced_model(cfg, decoder_preset)
        info = DistInfo(rank=0, world_size=nproc, local_rank=0, device=torch.device("cpu"))
        fsdp = uses_fsdp(cfg)
        model = parallelize(model, cfg, info)
        optimizer = build_optimizer(model, cfg.optim, info.device)
        external = _external_modules(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen_inside = [p for p in model.parameters() if not p.requires_grad]
        frozen_tensors = [t for m in external for t in (*m.parameters(), *m.buffers())] + frozen_inside
        if fsdp:
            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs((batch.embeddings,))
        else:
            tracker = plain_mem_tracker()
            tracker.track_external(model, optimizer, batch.embeddings)
        for t in frozen_tensors:  # FSDPMemTracker.track_external is a no-op: register them as buffers
            tracker._update_and_maybe_create_winfos(t, tracker._ref_class.BUFFER)
        prefix = type(model).__name__
        counter = PlanFlopCounter(_vocab_shapes([model, *external]), prefix)
        counter.mod_tracker._get_mod_name(model)  # names the model's submodules "<Class>.<attr>..."
        autocast = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        grads_bytes = 0
        counting = counter if count_flops else contextlib.nullcontext()
        # inline_ops (innermost): the sonar_kernels custom ops run their own code, so the memory tracker and the
        # FLOP counter see the kernels' scratch tensors and products
        with tracker, counting, _lce_recorder(records), inline_ops():
            for micro in range(micro_batches):
                if fsdp:
                    model.set_requires_gradient_sync(micro == micro_batches - 1)
                with autocast:
                    loss, metrics = spec.loss(model, batch)
                if fsdp and model not in tracker.memory_tracking:
                    # model.loss is an FSDP-registered forward method; FSDPMemTracker registers a module when it
                    # is called, so a loss that never calls the root module leaves it unknown to the backward
                    from torch.distributed._tools.fsdp2_mem_tracker import _FSDPModMemStats

                    tracker.memory_tracking[model] = _FSDPModMemStats(tracker._mod_tracker._get_mod_name(model))
                (loss / micro_batches).backward()
            # the local gradient shards' own bytes: after the reduce-scatter they can be views of one
            # group-wide buffer, whose whole storage each would otherwise be charged with
            grads_bytes = sum(g.numel() * g.element_size() for g in (_local(p.grad) for p in trainable)
                              if g is not None)
            torch.nn.utils.clip_grad_norm_([p for p in trainable if p.grad is not None], cfg.optim.grad_clip or 1.0)
            fwd_bwd = tracker.get_tracker_snapshot("peak")  # the peak of forward + backward, before the update
            fwd_bwd_peak = int(max(v["Total"] for v in fwd_bwd.values()))
            optimizer.step()
            opt_bytes = storage_bytes(t for st in optimizer.state.values() for t in st.values()
                                      if isinstance(t, torch.Tensor))
            optimizer.zero_grad(set_to_none=True)
        snap = tracker.get_tracker_snapshot("peak")
        peak_dev = max(snap, key=lambda d: snap[d]["Total"])
        peak = {getattr(k, "value", k): int(v) for k, v in snap[peak_dev].items()}
        hand_flops = float(spec.flops(model, batch))
        # a path other than ours (the public reference path): the same batch through our fast path, for the report
        path = getattr(getattr(model, "cfg", None), "path", "fast")
        fast_flops = float(model.flops_per_batch(batch, path="fast")) if path != "fast" else hand_flops
        result = {
            "family": cfg.model.family, "preset": cfg.model.preset, "nproc": nproc, "fsdp": fsdp,
            "precision": cfg.train.precision, "attention": attention, "micro_batches": micro_batches,
            "documents": int(batch.num_docs), "sentences": int(batch.num_sentences),
            # tokens the loss predicts (the loss's own count where it reports one, else all target-mode tokens)
            "target_tokens": int(metrics.get("target_tokens", batch.num_target_tokens)),
            "tokens": int(batch.tokens.numel()),
            "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "memory": {
                "parameters": storage_bytes(trainable),
                "gradients": grads_bytes,
                "optimizer_state": opt_bytes,
                "frozen": storage_bytes(frozen_tensors),
                "peak_total": peak["Total"],
                "peak_forward_backward": fwd_bwd_peak,
                "peak_breakdown": {k: v for k, v in peak.items() if k != "Total" and v},
            },
            "flops": {
                "per_micro_batch": float(counter.get_total_flops()),
                "concept_model": float(counter.buckets["model"]),
                "decoder_and_loss": float(counter.buckets["outside"]),
                "vocab_projection": float(counter.buckets["vocab"]),
                "family_formula": hand_flops,
                "family_formula_fast_path": fast_flops,
                # the traced count by phase: recompute = forward ops run again in the backward pass by activation
                # checkpointing, which the closed form (model FLOPs) leaves out
                "forward": float(counter.phases["forward"]),
                "backward": float(counter.phases["backward"]),
                "recompute": float(counter.phases["recompute"]),
            },
        }
    result["kernel_temporaries"] = [kernel_temporaries(r) for r in records[:1]] if replay_kernels else []
    result["flops"]["per_step"] = result["flops"]["per_micro_batch"] * micro_batches
    return result


# ------------------------------------------------------------------------------------------ the plan
def _fit_max_sentences(p1: dict, p2: dict, capacity: float) -> tuple[float, float, float]:
    """(a, c, max sentences) of peak = a + c * sentences through two traced steps. The fit is on the peak of
    forward + backward (the part that grows with the batch); the optimizer step's peak does not depend on the
    batch, so the answer is 0 when that alone exceeds `capacity`."""
    s1, s2 = p1["sentences"], p2["sentences"]
    m1, m2 = p1["memory"]["peak_forward_backward"], p2["memory"]["peak_forward_backward"]
    c = (m1 - m2) / (s1 - s2) if s1 != s2 else float("nan")
    a = m1 - c * s1
    smax = (capacity - a) / c if c > 0 else float("inf")
    if p1["memory"]["peak_total"] > m1 and p1["memory"]["peak_total"] > capacity:
        smax = 0.0  # the optimizer step's own peak does not fit
    return a, c, smax


def plan(cfg: RunConfig, nproc: int, gpu: GPU, *, mfu: float = 0.4, headroom: float = 0.9,
         attention: str = "flash", public: bool = True, fit: bool = True, work_dir: str | None = None
         ) -> dict[str, Any]:
    """The full report for one config (see the module docstring)."""
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        data_path = cfg.data.path if cfg.data.path and Path(cfg.data.path).exists() else ""
        source = f"shards at {data_path}" if data_path else "built-in TinyStories-like histogram (assumed)"
        if not data_path:
            tmp = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            data_path = str(write_planning_shards(tmp / "plan_shards", 3 * cfg.data.max_sentences + 256))
        cfg = copy.deepcopy(cfg)
        cfg.data.path = data_path
        sonar = sonar_preset_for(data_path)
        batch = one_batch(data_path, cfg.data.max_sentences, cfg.data.max_tokens, cfg.data.seed, cfg.data.max_docs)
        fast = trace_step(cfg, nproc, batch, attention=attention, decoder_preset=sonar)
        fast["micro_batches"] = cfg.train.grad_accum
        fast["flops"]["per_step"] = fast["flops"]["per_micro_batch"] * cfg.train.grad_accum
        capacity = headroom * gpu.memory_bytes
        report: dict[str, Any] = {"config": cfg.model.family + "/" + cfg.model.preset, "gpu": gpu.__dict__,
                                  "nproc": nproc, "mfu": mfu, "headroom": headroom, "data": source,
                                  "sonar_shapes": sonar,
                                  "fast": fast}
        if fit:
            half = one_batch(data_path, max(2, cfg.data.max_sentences // 2), max(64, cfg.data.max_tokens // 2),
                             cfg.data.seed, max(1, cfg.data.max_docs // 2) if cfg.data.max_docs else 0)
            p2 = trace_step(cfg, nproc, half, attention=attention, count_flops=False, replay_kernels=False,
                            decoder_preset=sonar)
            a, c, smax = _fit_max_sentences(fast, p2, capacity)
            fast["fit"] = {"fixed_bytes": a, "bytes_per_sentence": c, "max_sentences_per_rank": smax,
                           "half_batch_sentences": p2["sentences"],
                           "half_batch_peak_forward_backward": p2["memory"]["peak_forward_backward"]}
        _timing(fast, cfg, nproc, gpu, mfu)
        if public:
            docs = document_batches(data_path, PUBLIC_TRACED_DOCS, 1 << 20, cfg.data.seed)
            try:
                runs = [trace_step(cfg, nproc, b, attention=attention, micro_batches=1, replay_kernels=False,
                                   overrides={"path": "reference"}, decoder_preset=sonar) for b in docs]
            except ValueError as e:  # the family has no public reference path
                report["public"] = {"skipped": str(e).splitlines()[0]}
            else:
                pub = max(runs, key=lambda r: r["memory"]["peak_total"])
                pub = copy.deepcopy(pub)
                n = len(runs)
                for key in ("per_micro_batch", "concept_model", "decoder_and_loss", "vocab_projection",
                            "family_formula", "family_formula_fast_path", "forward", "backward", "recompute"):
                    pub["flops"][key] = sum(r["flops"][key] for r in runs) / n
                for key in ("sentences", "target_tokens", "tokens"):
                    pub[key] = sum(r[key] for r in runs) / n
                pub["documents"] = PUBLIC_DOCS_PER_MICRO_BATCH
                pub["micro_batches"] = PUBLIC_ACCUMULATION
                pub["flops"]["per_step"] = pub["flops"]["per_micro_batch"] * PUBLIC_ACCUMULATION
                pub["traced_documents"] = n
                _timing(pub, cfg, nproc, gpu, mfu, sentences_per_step=pub["sentences"] * PUBLIC_ACCUMULATION)
                report["public"] = pub
                report["ratios"] = {
                    "flops_per_target_token_public_over_fast":
                        (pub["flops"]["per_micro_batch"] / pub["target_tokens"])
                        / (fast["flops"]["per_micro_batch"] / fast["target_tokens"]),
                    "peak_memory_per_rank_public_over_fast":
                        pub["memory"]["peak_total"] / fast["memory"]["peak_total"],
                }
    report["seconds"] = time.perf_counter() - t0
    return report


def _timing(r: dict, cfg: RunConfig, nproc: int, gpu: GPU, mfu: float, sentences_per_step: float | None = None):
    step_s = r["flops"]["per_step"] / (gpu.bf16_dense_flops * mfu)
    sentences = sentences_per_step if sentences_per_step is not None else r["sentences"] * cfg.train.grad_accum
    r["time"] = {"step_seconds": step_s, "sentences_per_second": nproc * sentences / step_s,
                 "target_tokens_per_second": nproc * r["target_tokens"] * (sentences / max(r["sentences"], 1))
                 / step_s, "flops_per_target_token": r["flops"]["per_micro_batch"] / max(r["target_tokens"], 1)}
    if cfg.train.steps:
        r["time"]["run_hours"] = step_s * cfg.train.steps / 3600


# ------------------------------------------------------------------------------------------ output
def _gib(x: float) -> str:
    return f"{x / GiB:8.2f} GiB"


def _tf(x: float) -> str:
    return f"{x / 1e12:10.2f} TFLOP"


def _tf_short(x: float) -> str:
    return f"{x / 1e12:.2f} TFLOP"


def _closed_form_lines(f: dict) -> list[str]:
    """The traced count set against the family's closed form, with what separates them."""
    if "recompute" not in f:  # planned before the count was split by phase
        return [f"    family's closed form per micro-batch: {_tf_short(f['family_formula'])}"]
    model = f["per_micro_batch"] - f["recompute"]
    diff = model / f["family_formula"] - 1 if f["family_formula"] else float("nan")
    lines = [f"    by phase: forward {_tf_short(f['forward'])} + backward {_tf_short(f['backward'])} + activation-checkpointing "
             f"recompute {_tf_short(f['recompute'])}",
             f"    family's closed form per micro-batch {_tf_short(f['family_formula'])} (model FLOPs: no recompute); "
             f"traced minus recompute differs by {diff:+.2%}"]
    extra = f["family_formula"] - f.get("family_formula_fast_path", f["family_formula"])
    if extra:
        lines.append(f"    of the closed form, {_tf_short(f['family_formula_fast_path'])} is the same batch through our "
                     f"fast path (packed tokens, folded cross-attention) and {_tf_short(extra)} what this path adds: every "
                     "sentence padded to the longest, cross-attention projections at every position")
    return lines


def format_report(rep: dict) -> str:
    gpu = rep["gpu"]
    lines = [f"plan for {rep['config']} on {rep['nproc']} x {gpu['name']} (computed from the code on fake "
             f"tensors; not measured on a GPU)",
             f"data: {rep['data']}; MFU assumed {rep['mfu']:.0%}; GPU peak {gpu['bf16_dense_flops'] / 1e12:.0f} "
             f"TFLOP/s bf16 dense ({gpu['source']})"]
    for key, title in (("fast", "our path"), ("public", "public code's path")):
        r = rep.get(key)
        if r is None:
            continue
        if "skipped" in r:
            lines.append(f"\n[{title}] skipped: {r['skipped']}")
            continue
        m, f = r["memory"], r["flops"]
        lines += [f"\n[{title}] micro-batch per rank: {r['documents']} documents, {r['sentences']:.0f} sentences, "
                  f"{r['target_tokens']:.0f} target tokens; {r['micro_batches']} micro-batch(es) per step; "
                  f"{'FSDP2' if r['fsdp'] else 'one process'}, {r['precision']}, attention={r['attention']}",
                  "  memory per rank (FSDPMemTracker/MemTracker on the traced step):",
                  f"    parameters (trainable, this rank's shard) {_gib(m['parameters'])}",
                  f"    gradients                                 {_gib(m['gradients'])}",
                  f"    optimizer state                           {_gib(m['optimizer_state'])}",
                  f"    frozen (decoder weights + folded buffers) {_gib(m['frozen'])}"]
        for kt in r.get("kernel_temporaries", []):
            big = ", ".join(f"{x['shape']} {x['dtype']}" for x in kt["largest"][:3])
            lines.append(f"    kernel temporaries (LCE {kt['calls_shape']}) {_gib(kt['scratch_bytes'])}  "
                         f"largest: {big}")
        lines.append(f"    peak total                                {_gib(m['peak_total'])}")
        lines.append("    at the peak, by tracker category: " + ", ".join(
            f"{k} {v / GiB:.2f}" for k, v in m["peak_breakdown"].items()) + " (GiB)")
        hand = 16.0 * r["trainable_parameters"] / max(r["nproc"], 1)
        lines.append(f"    cross-check (hand): 16 B/param fp32 master+grad+Adam / nproc = {_gib(hand)}")
        lines += ["  FLOPs (FlopCounterMode):",
                  f"    per micro-batch {_tf(f['per_micro_batch'])}  = concept model {_tf(f['concept_model'])}"
                  f" + decoder/loss {_tf(f['decoder_and_loss'])} + vocabulary projection {_tf(f['vocab_projection'])}",
                  f"    per step        {_tf(f['per_step'])}"]
        lines += _closed_form_lines(f)
        t = r["time"]
        lines.append(f"  time at {rep['mfu']:.0%} MFU: {t['step_seconds'] * 1e3:.2f} ms/step, {t['sentences_per_second']:,.0f} "
                     f"sentences/s over {rep['nproc']} GPU(s), {t['flops_per_target_token'] / 1e9:.2f} GFLOP per "
                     f"target token" + (f", {t['run_hours']:.1f} h for the configured steps" if "run_hours" in t
                                        else ""))
        if "fit" in r:
            fit = r["fit"]
            cap = rep["headroom"] * gpu["memory_bytes"]
            lines.append(f"  largest batch: forward+backward peak = {fit['fixed_bytes'] / GiB:.2f} GiB + "
                         f"{fit['bytes_per_sentence'] / 2**20:.2f}"
                         f" MiB x sentences (traced at {r['sentences']} and {fit['half_batch_sentences']}); "
                         f"{rep['headroom']:.0%} of {gpu['memory_bytes'] / 1e9:.0f} GB = {cap / GiB:.1f} GiB fits "
                         f"{fit['max_sentences_per_rank']:,.0f} sentences per rank per micro-batch")
    if "ratios" in rep:
        q = rep["ratios"]
        lines.append(f"\npublic / ours: FLOPs per target token x{q['flops_per_target_token_public_over_fast']:.2f}, "
                     f"peak memory per rank x{q['peak_memory_per_rank_public_over_fast']:.2f}")
    lines.append(f"(planned in {rep['seconds']:.1f} s)")
    return "\n".join(lines)


RESULT_PRESETS = ("39M", "100M", "300M", "600M", "900M", "1.3B")


def write_results(out_dir: str, gpu_name: str = "h100-80gb", mfu: float = 0.4, configs_dir: str = "configs",
                  family: str = "sonar_llm", presets: tuple[str, ...] = RESULT_PRESETS, plans: bool = True,
                  inference: bool = True) -> None:
    """bench/results/plan/: plan_<preset>.json (the plan of `configs/<family>_<preset>.toml` at {1, 8} GPUs,
    fast and public path) for each of `presets` when `plans`; inference.json + inference_cost.png when
    `inference`; README.md rendered from every plan_*.json and inference.json present."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu = GPUS[gpu_name]
    for preset in presets if plans else ():
        cfg = load_config(Path(configs_dir) / f"{family}_{preset.lower()}.toml", [], check_paths=False)
        reports = []
        for nproc in (1, 8):
            t0 = time.process_time()
            rep = plan(cfg, nproc, gpu, mfu=mfu)
            rep["cpu_seconds"] = time.process_time() - t0
            reports.append(rep)
            print(f"{preset} x {nproc}: {rep['seconds']:.0f} s wall, {rep['cpu_seconds']:.0f} s CPU", flush=True)
        (out / f"plan_{preset}.json").write_text(json.dumps(reports, indent=1, default=str))
    if inference:
        from sonar_llm.models.family import FAMILIES
        from sonar_train import plan_inference as pi

        curves = pi.inference_curves(list(FAMILIES), list(RESULT_PRESETS), INFERENCE_CONTEXTS)
        (out / "inference.json").write_text(json.dumps(curves, indent=1, default=str))
        pi.plot(curves, ["100M", "900M"], str(out / "inference_cost.png"))
    (out / "README.md").write_text(render_results(out, gpu, mfu))


INFERENCE_CONTEXTS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


def _max_batch_cell(r: dict) -> str:
    if "fit" not in r:
        return "-"
    if "peak_forward_backward" not in r["memory"]:  # planned before the fit used the forward+backward peak
        return "n/a (old fit)"
    return f"{r['fit']['max_sentences_per_rank']:,.0f}"


def _closed_form_cell(f: dict) -> str:
    if "recompute" not in f:  # planned before the count was split by phase
        return "n/a"
    return (f"{(f['per_micro_batch'] - f['recompute']) / f['family_formula'] - 1:+.2%} "
            f"({f['recompute'] / f['per_micro_batch']:.0%})")


def render_results(out: Path, gpu: GPU, mfu: float) -> str:
    """README.md of bench/results/plan/ from its JSON files."""
    rows, reports = [], []
    for preset in RESULT_PRESETS:
        path = out / f"plan_{preset}.json"
        if path.exists():
            reports += json.loads(path.read_text())
    for rep in reports:
        preset = rep["config"].split("/")[1]
        for key in ("fast", "public"):
            r = rep.get(key)
            if not r or "skipped" in r:
                continue
            m, f, t = r["memory"], r["flops"], r["time"]
            kt = sum(k["scratch_bytes"] for k in r.get("kernel_temporaries", []))
            ratio = ""
            if key == "public" and "ratios" in rep:
                q = rep["ratios"]
                ratio = (f"{q['flops_per_target_token_public_over_fast']:.2f} / "
                         f"{q['peak_memory_per_rank_public_over_fast']:.2f}")
            rows.append([preset, str(rep["nproc"]), "ours" if key == "fast" else "public",
                         f"{r['documents']} x {r['micro_batches']}", f"{r['sentences']:.0f}",
                         f"{m['peak_total'] / GiB:.2f}",
                         f"{(m['parameters'] + m['gradients'] + m['optimizer_state']) / GiB:.2f}",
                         f"{m['frozen'] / GiB:.2f}", f"{kt / GiB:.2f}" if kt else "-",
                         f"{f['per_step'] / 1e12:.1f}", _closed_form_cell(f), f"{t['flops_per_target_token'] / 1e9:.2f}",
                         f"{t['step_seconds'] * 1e3:.1f}", f"{t['sentences_per_second']:,.0f}",
                         _max_batch_cell(r), ratio])
    head = ["preset", "GPUs", "path", "docs x micro-batches per rank", "sentences per micro-batch", "peak GiB/rank",
            "params+grads+Adam GiB/rank", "frozen decoder GiB", "LCE scratch GiB", "TFLOP/step/rank",
            "traced - recompute vs closed form (recompute share)",
            "GFLOP/target token", f"ms/step @{mfu:.0%} MFU", "sentences/s (all GPUs)", "max sentences/rank",
            "public/ours: FLOPs per token / peak memory"]
    lines = [f"# Run plans: SONAR-LLM {', '.join(RESULT_PRESETS)} on {gpu.name} (computed, not measured)", "",
             "Computed from the code by `python -m sonar_train.plan --results bench/results/plan` (train/sonar_train/plan.py) on "
             "fake tensors on a CPU: the real model, frozen SONAR decoder (basic shapes) and loss, one real "
             "training step (forward, backward, clipping, AdamW step) under FSDP2 on torch's fake process group "
             "(rank 0 of 8; 1 GPU = no FSDP, as the trainer runs one process), memory by torch's FSDPMemTracker / "
             "MemTracker, FLOPs by FlopCounterMode. NOT measured on a GPU. Batch: each config's micro-batch "
             "(data.max_sentences / data.max_tokens per rank, train.grad_accum micro-batches) packed by the real "
             "loader from the built-in TinyStories-like length histogram (assumed, see train/sonar_train/plan.py). Public "
             "path: padded full-logit decoder with real cross-attention, 1 document per micro-batch x "
             f"{PUBLIC_ACCUMULATION} accumulation steps (memory: the larger of {PUBLIC_TRACED_DOCS} traced "
             "documents; FLOPs: their mean). Attention modelled as flash-attn varlen. Time = FLOPs per rank / "
             f"({gpu.bf16_dense_flops / 1e12:.0f} TFLOP/s x {mfu:.0%} MFU); peak: {gpu.source}. Closed form: the "
             "family's model FLOPs of the path it runs (SonarLLM.flops_per_batch; the public path's padding to the "
             "longest sentence and per-position cross-attention included); the traced count less the forward ops "
             "that activation checkpointing recomputes in the backward pass is set against it. Largest batch: "
             "linear fit of the peak through two traced batch sizes, up to 90% of the GPU's memory. How to read "
             "it: docs/benchmarks.md, section 'Run planner'.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if any("fit" in r.get("fast", {}) and "peak_forward_backward" not in r["fast"]["memory"] for r in reports):
        lines += ["", "n/a (old fit): these rows were planned before the largest-batch fit used the forward+backward "
                      "peak; their fit went through the whole-step peak, which at 1 GPU sits in the optimizer step and "
                      "does not grow with the batch, so it is left out. Rerun `python -m sonar_train.plan --results "
                      "bench/results/plan --presets <preset> --no-inference` to fill it in; the other columns come "
                      "from the same code."]
    if reports:
        lines += ["", "Planner time per run on this shared 2-core CPU (loaded by other jobs; CPU seconds of the "
                      "process): " + ", ".join(f"{r['config'].split('/')[1]} x{r['nproc']}: {r['cpu_seconds']:.0f} s"
                                               for r in reports)]
    inf_path = out / "inference.json"
    if inf_path.exists():
        curves = json.loads(inf_path.read_text())
        fams = list(curves["families"].values())
        lines += ["", "## Inference: GFLOP per generated sentence vs context length (computed, not measured)", "",
                  "Counted with FlopCounterMode's formulas on the families' real generation paths at small sizes "
                  "(tiny presets, tiny SONAR), extrapolated with the closed form of train/sonar_train/plan_inference.py (checked "
                  f"in tests/test_plan.py). Every sentence {curves['tokens_per_sentence']} tokens; SONAR decoding, "
                  f"beam {curves['beam']}, for every concept model (SONAR-LLM also re-encodes each sentence with the "
                  "SONAR encoder, as its public loop does); Two-Tower: 40 requested DDIM steps (50 run) with "
                  "classifier-free guidance 3 (the LCM README recipe; guidance doubles the denoiser batch); token "
                  "LLM: the preset's trunk with a 128,256-token vocabulary (the paper's Llama-3 tokenizer), "
                  f"{curves['tokens_per_sentence']} tokens per sentence, KV cache. Context = sentences before the "
                  "generated one (the token LLM's context is those sentences' tokens).", "",
                  "![inference cost](inference_cost.png)", ""]
        first = curves["families"][next(iter(curves["families"]))]["presets"]["900M"]["flops"][0]
        lines += [f"Per sentence the SONAR decoding alone costs {first.get('decoder', 0) / 1e9:.0f} GFLOP (beam "
                  f"{curves['beam']}; a greedy decoder costs about 1/{curves['beam']} of it) and the re-encoding "
                  f"{first.get('encoder', 0) / 1e9:.0f} GFLOP where a family re-encodes, against the models' own "
                  "part at 900M and context 1: " + ", ".join(
                      f"{e['title']} {e['presets']['900M']['flops'][0]['model'] / 1e9:.1f}" for e in fams)
                  + " GFLOP. The concept models' cost barely grows with the context (one cached key per sentence); "
                  "the token LLM's grows with the context's tokens. Per-group values (model / decoder / encoder) "
                  "are in inference.json.", ""]
        for preset in ("100M", "900M"):
            lines += [f"### {preset}", "", "| context (sentences) | " + " | ".join(e["title"] for e in fams) + " |",
                      "|---|" + "---|" * len(fams)]
            for i, n in enumerate(curves["contexts"]):
                lines.append(f"| {n} | " + " | ".join(
                    f"{sum(e['presets'][preset]['flops'][i].values()) / 1e9:.1f}" for e in fams) + " |")
            lines.append("")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    from sonar_llm.cli import parser

    p = parser("python -m sonar_train.plan",
               description="Memory, FLOPs and time per step of a run, computed by the real code on fake tensors (no "
                           "GPU needed). Extra --section.key=value override the config like train/main.py.")
    p.add_argument("--config", help="TOML run config (configs/*.toml)")
    p.add_argument("--results", help="write the committed result set (SONAR-LLM presets x {1, 8} GPUs, "
                                     "inference curves) to this directory instead")
    p.add_argument("--presets", default=",".join(RESULT_PRESETS), help="--results: presets to plan ('' = none)")
    p.add_argument("--no-inference", action="store_true", help="--results: skip the inference curves")
    p.add_argument("--nproc", type=int, default=8, help="FSDP2 ranks (GPUs); 1 = one process, no sharding")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation for the time estimate")
    p.add_argument("--headroom", type=float, default=0.9, help="share of GPU memory the batch may fill")
    p.add_argument("--attention", choices=("flash", "traced"), default="flash",
                   help="flash: model flash-attn's varlen kernel (GPU); traced: the CPU code path")
    p.add_argument("--no-public", action="store_true", help="skip the public code's path")
    p.add_argument("--no-fit", action="store_true", help="skip the largest-batch fit (one trace fewer)")
    p.add_argument("--json", help="also write the report as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command; exit 0, 2 on bad input (one line on stderr), 1 when the work fails (sonar_llm.cli)."""
    from sonar_llm.cli import run

    return run("plan", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import UsageError, atomic_output

    args, overrides = _parser().parse_known_args(argv)
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu must be in (0, 1], got {args.mfu}")
    if not 0 < args.headroom <= 1:
        raise UsageError(f"--headroom must be in (0, 1], got {args.headroom}")
    from sonar_train.config import ConfigError

    if args.results:
        presets = tuple(p for p in args.presets.split(",") if p)
        write_results(args.results, args.gpu, args.mfu, presets=presets, plans=bool(presets),
                      inference=not args.no_inference)
        return 0
    if not args.config:
        raise UsageError("--config is required (or --results DIR)")
    try:
        cfg = load_config(args.config, overrides, check_paths=False)
    except (FileNotFoundError, TypeError) as e:  # ConfigError goes up: "config error: ..." (sonar_llm.cli)
        raise ConfigError(str(e)) from None
    rep = plan(cfg, args.nproc, GPUS[args.gpu], mfu=args.mfu, headroom=args.headroom, attention=args.attention,
               public=not args.no_public, fit=not args.no_fit)
    print(format_report(rep))
    if args.json:
        with atomic_output(args.json) as tmp:
            tmp.write_text(json.dumps(rep, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
