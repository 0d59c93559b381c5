"""Causal attention over packed variable-length segments: SDPA, FlexAttention and flash-attn backends.

All three take `q[T,H,Dh]`, `k[T,Hkv,Dh]`, `v[T,Hkv,Dh]` and `cu_seqlens` (int32 [B+1], segment
boundaries in T) and return `[T,H,Dh]`, with causal attention inside each segment and none across.
- `varlen_attention_sdpa`: `scaled_dot_product_attention` with a block-diagonal causal boolean mask,
  built per group of consecutive segments whose total length is at most `group_tokens`, so memory
  stays O(group_tokens^2) instead of O(T^2). Runs anywhere (the CPU path).
Masks are built once per `cu_seqlens` tensor and reused by the following calls (one per decoder layer).
- `varlen_attention_flex`: FlexAttention with a block mask from a document-id vector (compiled on CUDA).
- `varlen_attention_flash`: `flash_attn.flash_attn_varlen_func` (optional package; CUDA, fp16/bf16).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_GROUP_TOKENS = 256  # best of 64..2048 on the CPU for 10-40-token sentences


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


class _PlanCache:
    """Remembers the attention plans (masks) built for the last few `cu_seqlens` tensors.

    A model calls attention once per layer with the same `cu_seqlens` (the concept backbone with document
    boundaries, the SONAR decoder with sentence boundaries); a plan is keyed on that very tensor object
    (held here, so its storage cannot be reused) and its in-place version counter.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._entries: list[tuple[Tensor, tuple, object]] = []

    @staticmethod
    def _version(t: Tensor) -> int | None:
        try:
            return t._version
        except RuntimeError:  # inference-mode tensors have no version counter: do not cache
            return None

    def get(self, cu_seqlens: Tensor, extra: tuple):
        version = self._version(cu_seqlens)
        if version is None:
            return None
        for i, (ref, key, plan) in enumerate(self._entries):
            if ref is cu_seqlens and key == (version, extra):
                self._entries.append(self._entries.pop(i))  # most recently used last
                return plan
        return None

    def put(self, cu_seqlens: Tensor, extra: tuple, plan) -> None:
        version = self._version(cu_seqlens)
        if version is None:
            return
        self._entries = [e for e in self._entries if e[0] is not cu_seqlens]
        self._entries.append((cu_seqlens, (version, extra), plan))
        del self._entries[:-self.size]

    def clear(self) -> None:
        self._entries = []


_SDPA_PLANS = _PlanCache()
_FLEX_PLANS = _PlanCache()


def sdpa_plan(cu_seqlens: Tensor, device: torch.device, group_tokens: int) -> list[tuple[int, int, Tensor]]:
    """[(t0, t1, block-diagonal causal mask [t1-t0, t1-t0])] for each group of segments."""
    extra = (str(device), group_tokens)
    plan = _SDPA_PLANS.get(cu_seqlens, extra)
    if plan is not None:
        return plan
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
    plan = []
    for g0, g1 in _group_segments(lengths, group_tokens):
        t0, t1 = bounds[g0], bounds[g1]
        if t1 == t0:
            continue
        seg_len = torch.tensor(lengths[g0:g1], device=device)
        doc = torch.repeat_interleave(torch.arange(g1 - g0, device=device), seg_len)
        pos = torch.arange(t1 - t0, device=device)
        plan.append((t0, t1, (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])))
    _SDPA_PLANS.put(cu_seqlens, extra, plan)
    return plan


def varlen_attention_sdpa(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float,
    group_tokens: int = DEFAULT_GROUP_TOKENS,
) -> Tensor:
    """Block-diagonal causal SDPA, in groups of segments of at most `group_tokens` tokens."""
    rep = q.shape[1] // k.shape[1]
    outs = []
    for t0, t1, mask in sdpa_plan(cu_seqlens, q.device, group_tokens):
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

    # default dynamic-shape policy: the first new total length recompiles once with dynamic shapes
    return torch.compile(flex_attention)


def varlen_attention_flex(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, scale: float) -> Tensor:
    """FlexAttention with a block-diagonal causal block mask (compiled on CUDA, eager elsewhere)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise ValueError("impl='flex' on CPU supports only the forward pass (no grad); use impl='sdpa'")
    total = q.shape[0]
    extra = (str(q.device), total)
    block_mask = _FLEX_PLANS.get(cu_seqlens, extra)
    if block_mask is None:
        seg_len = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        doc = torch.repeat_interleave(torch.arange(seg_len.numel(), device=q.device), seg_len, output_size=total)

        def mask_mod(b, h, q_idx, kv_idx):
            return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

        block_mask = create_block_mask(mask_mod, None, None, total, total, device=q.device, _compile=q.is_cuda)
        _FLEX_PLANS.put(cu_seqlens, extra, block_mask)
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
