"""Causal attention over packed variable-length segments: SDPA, FlexAttention and flash-attn backends.

All three take `q[T,H,Dh]`, `k[T,Hkv,Dh]`, `v[T,Hkv,Dh]` and `cu_seqlens` (int32 [B+1], segment
boundaries in T) and return `[T,H,Dh]`, with causal attention inside each segment and none across.
- `varlen_attention_sdpa`: `scaled_dot_product_attention` with a block-diagonal causal boolean mask,
  built per group of consecutive segments whose total length is at most `group_tokens`, so memory
  stays O(group_tokens^2) instead of O(T^2). Runs anywhere (the CPU path).
- `varlen_attention_flex`: FlexAttention with a block mask from a document-id vector (compiled on CUDA).
- `varlen_attention_flash`: `flash_attn.flash_attn_varlen_func` (optional package; CUDA, fp16/bf16).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_GROUP_TOKENS = 2048


@functools.lru_cache(maxsize=None)
def flash_attn_varlen_available() -> bool:
    """True when `flash_attn.flash_attn_varlen_func` imports."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception:
        return False
    return True


def _group_segments(lengths: list[int], group_tokens: int) -> list[tuple[int, int]]:
    """Split consecutive segments into groups `[first_seg, end_seg)` of total length <= group_tokens
    (a single longer segment forms its own group)."""
    groups: list[tuple[int, int]] = []
    start, total = 0, 0
    for i, n in enumerate(lengths):
        if total > 0 and total + n > group_tokens:
            groups.append((start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        groups.append((start, len(lengths)))
    return groups


def _expand_kv(t: Tensor, groups: int) -> Tensor:
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)


def varlen_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
    group_tokens: int = DEFAULT_GROUP_TOKENS,
) -> Tensor:
    """Block-diagonal causal SDPA, in groups of segments of at most `group_tokens` tokens."""
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    rep = q.shape[1] // k.shape[1]
    outs = []
    for g0, g1 in _group_segments(lengths, group_tokens):
        t0, t1 = bounds[g0], bounds[g1]
        if t1 == t0:
            continue
        seg_len = torch.tensor(lengths[g0:g1], device=q.device)
        doc = torch.repeat_interleave(torch.arange(g1 - g0, device=q.device), seg_len)
        pos = torch.arange(t1 - t0, device=q.device)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        qg = q[t0:t1].transpose(0, 1).unsqueeze(0)
        kg = _expand_kv(k[t0:t1], rep).transpose(0, 1).unsqueeze(0)
        vg = _expand_kv(v[t0:t1], rep).transpose(0, 1).unsqueeze(0)
        o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)
        outs.append(o.squeeze(0).transpose(0, 1))
    if not outs:
        return q.new_zeros(q.shape)
    return torch.cat(outs, dim=0) if len(outs) > 1 else outs[0].contiguous()


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def varlen_attention_flex(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """FlexAttention with a block-diagonal causal block mask (compiled on CUDA, eager elsewhere)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("impl='flex' on CPU supports only the forward pass (no grad); use impl='sdpa'")
    total = q.shape[0]
    seg_len = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    doc = torch.repeat_interleave(torch.arange(seg_len.numel(), device=q.device), seg_len, output_size=total)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    qh = q.transpose(0, 1).unsqueeze(0)
    kh = k.transpose(0, 1).unsqueeze(0)
    vh = v.transpose(0, 1).unsqueeze(0)
    o = fn(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o.squeeze(0).transpose(0, 1)


def varlen_attention_flash(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, scale: float
) -> Tensor:
    """flash-attn's varlen kernel (GQA handled natively)."""
    from flash_attn import flash_attn_varlen_func

    cu = cu_seqlens.to(torch.int32)
    return flash_attn_varlen_func(
        q, k, v, cu, cu, int(max_seqlen), int(max_seqlen), dropout_p=0.0, softmax_scale=scale, causal=True
    )
