"""Benchmark: one training step (forward + backward + AdamW step) of every model family on one batch.

Group "training-sonar-llm", same batch, same weights:
  ours       SonarLLM(path="fast"): PackedSonarDecoder (packed sentences, folded cross-attention, fused
             add+LayerNorm, fused linear cross-entropy)
  reference  SonarLLM(path="reference"): the public code's way, every sentence padded to the longest,
             the full decoder with real cross-attention, full [sentences, tokens, V] fp32 logits
Group "training-families", same batch, backbones of the same preset:
  ours (SONAR-LLM fast path), base_lcm, two_tower (context + denoiser layers = the preset's layers, split
  as the LCM's 5:13), token_llm (over the SONAR vocabulary, fused linear cross-entropy). No "reference"
  row: compare the sentences_per_s column.
Shapes (bench/common.py): GPU = the SONAR decoder shape (d=1024, 24 layers, V=256,206, bf16 weights) with
the 600M backbone preset (fp32 master weights, bf16 autocast, as train/sonar_train/loop.py), 16 documents x 32
sentences; CPU = d=256, 2 layers, V=8192 with the "small" backbone, 4 x 8 sentences, fp32; quick mode the
smallest. extra_info: sentences/s, target tokens/s, peak memory, FLOPs per step (`flops_per_batch`,
frozen decoder included), MFU against the dense bf16 peak of the GPU (989 TFLOP/s on H100/H200).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from common import (
    PeakMemory,
    tensor_bytes,
    bench_scale,
    cached,
    compute_dtype,
    peak_flops,
    random_sonar_decoder,
    record_throughput,
    sync,
    synthetic_concept_batch,
)
from sonar_llm.models.build import ModelConfig, build_model
from sonar_llm.models.family import get_family

SONAR_GROUP = "training-sonar-llm"
FAMILY_GROUP = "training-families"


def build_family(name: str, scale, device: torch.device, decoder=None, **overrides) -> torch.nn.Module:
    """Family `name` at the scale's backbone preset, built by the registry (as the trainer builds it: the
    Two-Tower LCM splits the preset's layers 5:13), fp32 parameters on `device`. Sentence-embedding models
    read the scale's SONAR width, token models its vocabulary; `overrides` are further `[model.overrides]`;
    `decoder` is the frozen SONAR decoder of the families that take one."""
    spec = get_family(name)
    shape = {"sonar_dim": scale.sonar.model_dim} if spec.concept_level else {"vocab_size": scale.sonar.vocab_size}
    cfg = ModelConfig(family=name, preset=scale.backbone, overrides={**shape, **overrides})
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: the paper-scale models take seconds on a CPU
        return build_model(cfg, **({"decoder": decoder} if spec.needs_decoder else {})).train()


def _decoder(scale, device):
    dtype = compute_dtype(device)
    return cached(("decoder", scale.name, str(device), dtype),
                  lambda: random_sonar_decoder(scale.sonar, device=device, dtype=dtype))


def run_training_benchmark(benchmark, scale, device, family: str, role: str, **overrides) -> None:
    batch = synthetic_concept_batch(scale.sonar, scale.train_docs, scale.train_sents_per_doc, scale.words,
                                    seed=0, device=device)
    spec = get_family(family)
    frozen = _decoder(scale, device) if spec.needs_decoder else None
    model = build_family(family, scale, device, decoder=frozen, **overrides)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    holder: dict = {}

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, metrics = spec.loss(model, batch)
        loss.backward()
        opt.step()
        sync(device)
        holder["loss"], holder["metrics"] = loss, metrics

    step()  # warm-up: allocator, Triton compilation/autotuning, optimizer state
    loss = holder["loss"]
    assert torch.isfinite(loss).item(), f"{family} {overrides}: non-finite loss {loss}"
    assert any(p.grad is not None for p in params), f"{family}: no parameter received a gradient"
    with PeakMemory(device) as mem:
        step()
    flops = spec.flops(model, batch)
    metrics = holder["metrics"]
    target_tokens = metrics.get("target_tokens")
    benchmark.extra_info.update({
        "role": role, "family": family, "path": overrides.get("path"),
        "scale": scale.name, "backbone": scale.backbone,
        "trainable_params": sum(p.numel() for p in params),
        "sonar_shape": f"d={scale.sonar.model_dim} L={scale.sonar.num_layers} V={scale.sonar.vocab_size}",
        "dtype": "bf16 autocast, fp32 master" if device.type == "cuda" else "fp32",
        **mem.info(tensor_bytes(model, opt, frozen)),
    })
    benchmark.pedantic(step, rounds=scale.train_rounds, warmup_rounds=0, iterations=1)
    record_throughput(benchmark, flops=flops, peak=peak_flops(device), sentences=batch.num_sentences,
                      target_tokens=int(target_tokens) if target_tokens is not None else None)


@pytest.mark.benchmark(group=SONAR_GROUP)
@pytest.mark.parametrize("role,path", [("ours", "fast"), ("reference", "reference")])
def test_bench_train_sonar_llm(benchmark, bench_quick, bench_device, role, path):
    scale = bench_scale(bench_quick, bench_device)
    run_training_benchmark(benchmark, scale, bench_device, "sonar_llm", role, path=path)


@pytest.mark.benchmark(group=FAMILY_GROUP)
@pytest.mark.parametrize("family,role", [("sonar_llm", "ours"), ("base_lcm", "base_lcm"),
                                         ("two_tower", "two_tower"), ("token_llm", "token_llm")])
def test_bench_train_family(benchmark, bench_quick, bench_device, family, role):
    scale = bench_scale(bench_quick, bench_device)
    run_training_benchmark(benchmark, scale, bench_device, family, role)
