"""Benchmark: SONAR text encoder throughput (sentences/s) on TinyStories-length sentences.

Sentences are synthetic source-mode id sequences `[lang, w1..wn, 3]` with 8-20 words (10-22 tokens,
TinyStories' typical range), in random length order, encoded in batches of a fixed number of sentences.
Group "sonar-encoder":
  ours       sorted by length first, so each batch is padded only to its own longest sentence (what
             sonar_llm.sonar.pipeline.TextToEmbedding and the preprocess command do)
  reference  the same batches in input order (each padded to its longest), as a plain loop over the data
On CUDA: the released encoder's shape (d=1024, 24 layers, V=256,206) with random weights in bf16, 8192
sentences in batches of 512; on the CPU: d=256, 2 layers, fp32, 512 sentences in batches of 64.
extra_info: sentences/s, real tokens/s, padding fraction, FLOPs of the real tokens and (CUDA) MFU.
The issue's target is >= 10,000 sentences/s on one H200.
"""
from __future__ import annotations

import pytest
import torch

from common import (
    bench_scale,
    cached,
    compute_dtype,
    pad_batch,
    peak_flops,
    random_sonar_encoder,
    record_throughput,
    sonar_encoder_flops,
    sync,
    synthetic_source_sentences,
)

GROUP = "sonar-encoder"
WORDS = (8, 20)


def make_batches(seqs: list[list[int]], batch_size: int, sort_by_length: bool) -> list[list[int]]:
    """Index lists of the batches: consecutive `batch_size` sentences, after sorting by length if asked."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if sort_by_length else list(range(len(seqs)))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("role", ["ours", "reference"])
def test_bench_sonar_encoder(benchmark, bench_quick, bench_device, role):
    scale = bench_scale(bench_quick, bench_device)
    device = bench_device
    dtype = compute_dtype(device)
    enc = cached(("encoder", scale.name, str(device), dtype),
                 lambda: random_sonar_encoder(scale.sonar, device=device, dtype=dtype))
    seqs = synthetic_source_sentences(scale.sonar, scale.encode_sentences, WORDS, seed=3)
    batches = make_batches(seqs, scale.encode_batch, sort_by_length=role == "ours")
    # tokenisation / padding happens on the host in both methods, outside the timed region
    prepared = [pad_batch([seqs[i] for i in idx], device) for idx in batches]
    out = torch.empty(len(seqs), scale.sonar.model_dim, device=device, dtype=torch.float32)
    index = [torch.tensor(idx, device=device) for idx in batches]

    @torch.inference_mode()
    def run():
        for (tokens, mask), idx in zip(prepared, index):
            out[idx] = enc(tokens, mask).float()
        sync(device)
        return out

    with torch.inference_mode():
        enc(*prepared[0])  # warm-up
    lengths = [len(s) for s in seqs]
    padded = [int(t.shape[1]) for t, _ in prepared for _ in range(t.shape[0])]
    real_tokens, padded_tokens = sum(lengths), sum(padded)
    benchmark.extra_info.update({
        "role": role, "scale": scale.name, "batch_size": scale.encode_batch, "dtype": str(dtype).replace("torch.", ""),
        "sonar_shape": f"d={scale.sonar.model_dim} L={scale.sonar.num_layers} V={scale.sonar.vocab_size}",
        "sorted_by_length": role == "ours", "padding_fraction": 1.0 - real_tokens / padded_tokens,
    })
    benchmark.pedantic(run, rounds=scale.encode_rounds, warmup_rounds=0, iterations=1)
    assert torch.isfinite(out).all().item()
    record_throughput(benchmark, flops=sonar_encoder_flops(enc.cfg, lengths), peak=peak_flops(device),
                      sentences=len(seqs), tokens=real_tokens)
