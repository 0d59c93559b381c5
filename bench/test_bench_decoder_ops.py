"""Benchmark: the SONAR-LLM decoder loss, packed fast path vs the public code's padded reference.

One pytest-benchmark group, forward + backward to the predicted embeddings (decoder frozen), per batch:
  packed     PackedSonarDecoder.prepare + loss (packed varlen attention, folded cross-attention constants,
             fused add+LayerNorm, fused linear cross-entropy; impl="auto")
  reference  PackedSonarDecoder.reference_loss (pad to the longest sentence, full decoder with real
             cross-attention, full [S, T, V] logits in fp32, F.cross_entropy ignoring pad)
Shapes: on the CPU (or in quick mode) a small decoder (d=256, 2 layers, 4 heads, FFN 1024, V=4096, 64
sentences; quick mode shrinks further), on CUDA the released SONAR decoder shape (d=1024, 24 layers,
16 heads, FFN 8192, V=256,206, bf16) with 256 sentences. Sentence lengths are drawn from 10-40 tokens.
`SONAR_BENCH_DEC_SHAPE=S,D,L,V` overrides. Peak CUDA memory of one step goes into extra_info.
A second group times the fused add + LayerNorm against eager add then LayerNorm.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from common import shape_from_env
from sonar_llm.sonar.config import decoder_preset
from sonar_llm.sonar.decoder import SonarTextDecoder
from sonar_llm.sonar.packed_decoder import PackedSonarDecoder

GROUP = "sonar decoder loss fwd+bwd"
CPU_SHAPE = (64, 256, 2, 4096)  # sentences, model_dim, layers, vocab
QUICK_SHAPE = (8, 64, 2, 512)
CUDA_SHAPE = (256, 1024, 24, 256206)


def _shape(quick: bool, device: torch.device) -> tuple[int, int, int, int]:
    env = shape_from_env("SONAR_BENCH_DEC_SHAPE", "S,D,L,V")
    if env:
        return env
    if quick:
        return QUICK_SHAPE
    return CUDA_SHAPE if device.type == "cuda" else CPU_SHAPE


def _build(shape, device, dtype):
    num_sent, d, n_layers, v = shape
    heads = max(1, d // 64)
    ffn = 4 * d if d < 1024 else 8192
    cfg = decoder_preset("basic", model_dim=d, num_layers=n_layers, num_heads=heads, ffn_dim=ffn,
                         vocab_size=v, lang_offset=max(4, v - 205), dropout_p=0.0)
    torch.manual_seed(0)
    dec = SonarTextDecoder(cfg, device=device, dtype=dtype)
    with torch.no_grad():
        for name, p in dec.named_parameters():
            if "layer_norm" not in name:
                p.normal_(0.0, 0.02)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(10, 41, (num_sent,), generator=g)
    tokens = torch.randint(4, min(v, cfg.lang_offset), (int(lengths.sum()),), generator=g)
    cu = torch.zeros(num_sent + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    tokens[cu[:-1].long()] = 3
    tokens[cu[1:].long() - 1] = 3
    emb = torch.randn(num_sent, cfg.encoder_dim, generator=g).to(device=device, dtype=torch.float32)
    return dec, tokens.to(device), cu.to(device), emb.requires_grad_()


@pytest.mark.benchmark(group=GROUP)
@pytest.mark.parametrize("role", ["packed", "reference"])
def test_bench_decoder_loss(benchmark, bench_quick, bench_device, role):
    device = bench_device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = _shape(bench_quick, device)
    dec, tokens, cu, emb = _build(shape, device, dtype)
    packed = PackedSonarDecoder(dec)

    def step():
        emb.grad = None
        if role == "packed":
            loss = packed.loss(emb, packed.prepare(tokens, cu))
        else:
            loss = packed.reference_loss(emb, tokens, cu)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    loss = step()  # warm-up (compilation) and a sanity check
    assert torch.isfinite(loss).item() and emb.grad is not None
    assert all(p.grad is None for p in dec.parameters())
    peak = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = torch.cuda.max_memory_allocated() - base
    num_sent, d, n_layers, v = shape
    benchmark.extra_info.update({
        "role": role, "S": num_sent, "D": d, "L": n_layers, "V": v, "target_tokens": int(cu[-1]) - num_sent,
        "dtype": str(dtype).replace("torch.", ""), "peak_mem_bytes": peak,
    })
    benchmark(step)


ALN_GROUP = "add_layer_norm fwd+bwd"


@pytest.mark.benchmark(group=ALN_GROUP)
@pytest.mark.parametrize("role", ["triton", "torch", "eager"])
def test_bench_add_layer_norm(benchmark, bench_quick, bench_device, role):
    """Fused residual add + LayerNorm, upstream grads on both outputs: ours (Triton / PyTorch path) vs
    eager `x + r` then `F.layer_norm`. Rows x D = 16384 x 1024 bf16 on CUDA, 2048 x 256 fp32 on the CPU."""
    from sonar_kernels.functional.add_layer_norm import add_layer_norm

    device = bench_device
    if role == "triton" and device.type != "cuda":
        pytest.skip("the Triton path is timed on CUDA only (the CPU interpreter is not a speed reference)")
    rows, dim = (16384, 1024) if (device.type == "cuda" and not bench_quick) else (2048, 256)
    if bench_quick:
        rows, dim = 64, 64
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    r = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = torch.ones(dim, device=device, dtype=dtype)
    b = torch.zeros(dim, device=device, dtype=dtype)
    gy = torch.randn(rows, dim, generator=g).to(device=device, dtype=dtype)

    def fwd():
        if role == "eager":
            s = x + r
            return F.layer_norm(s, (dim,), w, b, 1e-5), s
        return add_layer_norm(x, r, w, b, 1e-5, impl=role)

    def step():
        x.grad = r.grad = None
        y, s = fwd()
        torch.autograd.backward([y, s], [gy, gy])
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    assert x.grad is not None and r.grad is not None
    benchmark.extra_info.update({"role": role, "rows": rows, "D": dim, "dtype": str(dtype).replace("torch.", "")})
    benchmark(step)
