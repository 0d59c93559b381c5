"""The shared pre-norm Transformer decoder behind every concept model (and the token LLM).

Llama/LCM-style blocks: RMSNorm (fp32, weight only), grouped-query attention with rotary positions
(half-split or interleaved convention, optional llama3 frequency scaling), SwiGLU feed-forward.
Module and parameter names follow the Large Concept Model checkpoints, so an LCM state dict loads
strictly:

    layers.N.self_attn_layer_norm.weight
    layers.N.self_attn.{q_proj,k_proj,v_proj,output_proj}.weight[, .bias]
    layers.N.ffn_layer_norm.weight
    layers.N.ffn.{gate_proj,inner_proj,output_proj}.weight[, .bias]
    layer_norm.weight

Three ways to run the stack:
  * `Backbone.forward(x[T,d], cu_seqlens, max_seqlen)`: packed documents (no padding), causal inside
    each document, positions restart at 0 per document (training); attention is
    `sonar_kernels.functional.varlen_attention.varlen_causal_attention` (flash-attn / Flex / SDPA).
    A `TransformerLayer.forward` on packed rows traces without graph breaks (the attention is a
    sonar_kernels custom op): `sonar_llm.compile.compile_block` compiles it with fullgraph=True and dynamic
    shapes, one block at a time (torchtitan style); the trainer does that for every family when
    `train.compile` is set.
  * `Backbone.forward_padded(x[B,S,d])`: a padded batch, causal, positions 0..S-1.
  * `Backbone.step(x[B,n,d], cache)`: incremental decoding with a `KVCache` (generation).
`Attention.attend(q_in, kv_in, mask)` is the arbitrary-mask / cross-attention path (Two-Tower denoiser).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonar_kernels.functional.varlen_attention import varlen_causal_attention

__all__ = [
    "BackboneConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "KVCache",
    "Attention",
    "SwiGLU",
    "TransformerLayer",
    "Backbone",
    "positions_from_cu_seqlens",
]


@dataclass
class BackboneConfig:
    """Shape and numerics of a `Backbone`.

    `rope_interleaved=False` is the Llama / SONAR-LLM half-split convention (pairs (i, i+Dh/2));
    `True` is fairseq2 / LCM's adjacent-pair convention (pairs (2i, 2i+1)).
    `rope_scaling="llama3"` applies Llama-3's frequency scaling (low/high frequency factors 1 and 4,
    original context 8192) with `rope_scaling_factor` (8 as Llama-3.1; the public SONAR-LLM JSON
    configs use 32, as Llama-3.2).
    `head_dim` defaults to model_dim // num_heads; the public SONAR-LLM configs fix it at 64, so their
    attention width num_heads * head_dim can differ from model_dim (e.g. 900M: 32 x 64 = 2048 vs 1536).
    `attn_impl` picks the packed-attention backend of `sonar_kernels`' varlen_causal_attention
    ("auto": flash-attn on CUDA fp16/bf16 when installed, else FlexAttention on CUDA, else SDPA).
    """

    model_dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    num_kv_heads: int | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 5e5
    rope_interleaved: bool = False
    rope_scaling: str | None = None
    rope_scaling_factor: float = 8.0
    head_dim: int | None = None
    max_seq_len: int = 4096
    attn_bias: bool = False
    output_proj_bias: bool = False
    ffn_bias: bool = False
    dropout_p: float = 0.0
    init_std: float = 0.02
    attn_impl: str = "auto"  # packed attention backend: "auto" | "flash" | "flex" | "sdpa"

    def __post_init__(self) -> None:
        for name in ("model_dim", "num_layers", "num_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BackboneConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.model_dim % self.num_heads:
                raise ValueError(
                    f"BackboneConfig.model_dim={self.model_dim} is not divisible by num_heads={self.num_heads}"
                    " (or set head_dim)"
                )
            self.head_dim = self.model_dim // self.num_heads
        if not isinstance(self.head_dim, int) or self.head_dim <= 0:
            raise ValueError(f"BackboneConfig.head_dim must be a positive int, got {self.head_dim!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"BackboneConfig.num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.rope_scaling not in (None, "llama3"):
            raise ValueError(f"BackboneConfig.rope_scaling must be None or 'llama3', got {self.rope_scaling!r}")
        if self.attn_impl not in ("auto", "flash", "flex", "sdpa"):
            raise ValueError(
                f"BackboneConfig.attn_impl must be 'auto', 'flash', 'flex' or 'sdpa', got {self.attn_impl!r}"
            )
        if not 0.0 <= self.dropout_p < 1.0:
            raise ValueError(f"BackboneConfig.dropout_p must be in [0, 1), got {self.dropout_p}")


# ----------------------------------------------------------------------------------------------
# Normalisation and positions
# ----------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bfloat16/fp32 inputs, fp64 for fp64 inputs (float64 reference tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (fp64 for fp64 inputs); learned weight, no bias."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(_compute_dtype(x.dtype))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def llama3_scaled_inv_freq(
    inv_freq: Tensor,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_pos: int = 8192,
) -> Tensor:
    """Llama-3.1 RoPE frequency scaling: keep high frequencies, divide low ones by `factor`,
    interpolate smoothly between the two wavelength thresholds."""
    low_freq_wavelen = original_max_pos / low_freq_factor
    high_freq_wavelen = original_max_pos / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max_pos / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, interpolated)
    return torch.where(wavelen < high_freq_wavelen, inv_freq, out)


class RotaryEmbedding:
    """Rotary position embedding; `apply(x[..., T, H, Dh], positions)` rotates queries or keys.

    A plain object, not an nn.Module (it has no parameters, and its `apply` would shadow
    `nn.Module.apply`). The rotation is computed in fp32 (fp64 for fp64 inputs) from the positions
    on the fly (no table, no state-dict entry, unaffected by `model.to(dtype)`), so any position is
    valid; `max_seq_len` is only the configured context length.
    """

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int = 4096,
        theta: float = 5e5,
        interleaved: bool = False,
        scaling: str | None = None,
        scaling_factor: float = 8.0,
    ) -> None:
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding head_dim must be even, got {head_dim}")
        if scaling not in (None, "llama3"):
            raise ValueError(f"RotaryEmbedding scaling must be None or 'llama3', got {scaling!r}")
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        self.interleaved = interleaved
        self.scaling = scaling
        self.scaling_factor = scaling_factor
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        if scaling == "llama3":
            inv_freq = llama3_scaled_inv_freq(inv_freq, factor=scaling_factor)
        # Kept in fp64 on the host and cast per (device, dtype): unaffected by `model.to(dtype)`.
        self._inv_freq = inv_freq
        self._inv_freq_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # The last (positions, dtype) -> (cos, sin): a Backbone shares one RotaryEmbedding across its
        # layers and passes the same positions tensor to each, so cos/sin are computed once per forward.
        # Holding `positions` keeps its memory from being reused while cached (identity check below).
        self._last: tuple[Tensor, tuple[torch.dtype, bool], Tensor, Tensor] | None = None

    def inv_freq(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """The per-pair angular frequencies [Dh/2] on `device` in `dtype`."""
        if torch.compiler.is_compiling():  # a constant of the compiled graph; no Python-side cache
            return self._inv_freq.to(device=device, dtype=dtype)
        key = (torch.device(device), dtype)
        cached = self._inv_freq_cache.get(key)
        if cached is None:
            cached = self._inv_freq.to(device=device, dtype=dtype)
            self._inv_freq_cache[key] = cached
        return cached

    def cos_sin(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """cos and sin of position * frequency: shape positions.shape + [Dh/2], in `dtype`."""
        angles = positions.to(dtype).unsqueeze(-1) * self.inv_freq(positions.device, dtype)
        return angles.cos(), angles.sin()

    def apply(self, x: Tensor, positions: Tensor) -> Tensor:
        """Rotate `x[..., T, H, Dh]`; `positions` is [T] or [..., T] broadcastable to x.shape[:-2]."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding expects head_dim {self.head_dim}, got x.shape {tuple(x.shape)}")
        if positions.shape[-1] != x.shape[-3]:
            raise ValueError(
                f"positions.shape {tuple(positions.shape)} does not match the T axis of x.shape {tuple(x.shape)}"
            )
        compute = _compute_dtype(x.dtype)
        if torch.compiler.is_compiling():  # a compiled block computes (and fuses) cos/sin itself
            cos, sin = self.cos_sin(positions, compute)
        else:
            key = (compute, torch.is_inference_mode_enabled())
            last = self._last
            if last is not None and last[0] is positions and last[1] == key:
                cos, sin = last[2], last[3]
            else:
                cos, sin = self.cos_sin(positions, compute)
                self._last = (positions, key, cos, sin)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, Dh/2]
        xf = x.to(compute)
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        else:
            half = self.head_dim // 2
            x1, x2 = xf[..., :half], xf[..., half:]
            out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.to(x.dtype)

    __call__ = apply

    def __repr__(self) -> str:
        return (
            f"RotaryEmbedding(head_dim={self.head_dim}, theta={self.theta}, "
            f"interleaved={self.interleaved}, scaling={self.scaling}, factor={self.scaling_factor})"
        )


def positions_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Position of every packed row inside its own segment: [0..len_0-1, 0..len_1-1, ...] (int64)."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


# ----------------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Pre-allocated keys/values for incremental decoding, one [B, max_len, Hkv, Dh] pair per layer.

    `seq_lens[b]` (int64, on the cache device) is how many positions of row b are filled; rows may
    differ (ragged prompts). `upper` is a host-side upper bound of max(seq_lens) (no device sync).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"KVCache needs batch > 0 and max_len > 0, got batch={batch}, max_len={max_len}")
        shape = (batch, max_len, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.seq_lens = torch.zeros(batch, dtype=torch.int64, device=device)
        self.batch = batch
        self.max_len = max_len
        self.upper = 0

    def reserve(self, length: int) -> None:
        """Room for `length` positions per row: the capacity at least doubles when it grows, what is filled is
        kept. A loop that may stop long before its cap (a story, a token stream) starts small and grows as it
        runs, instead of holding memory for the whole cap from the start."""
        if length <= self.max_len:
            return
        extra = max(length, 2 * self.max_len) - self.max_len
        self.k = [F.pad(t, (0, 0, 0, 0, 0, extra)) for t in self.k]  # [B, L, H, D]: grow L
        self.v = [F.pad(t, (0, 0, 0, 0, 0, extra)) for t in self.v]
        self.max_len += extra

    def reorder(self, index: Tensor) -> None:
        """Keep/duplicate batch rows (beam search, dropping finished stories)."""
        self.k = [t.index_select(0, index) for t in self.k]
        self.v = [t.index_select(0, index) for t in self.v]
        self.seq_lens = self.seq_lens.index_select(0, index)
        self.batch = int(index.numel())
        self.upper = int(self.seq_lens.max()) if self.batch else 0

    def advance(self, lengths: Tensor | int) -> None:
        """Mark `lengths` more positions filled per row (after every layer has written them)."""
        if isinstance(lengths, int):
            self.seq_lens += lengths
            self.upper += lengths
        else:
            self.seq_lens += lengths.to(self.seq_lens)
            self.upper += int(lengths.max())


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head (grouped-query) attention with q_proj, k_proj, v_proj, output_proj.

    `use_rope=False` builds the position-free variant (the Two-Tower denoiser); `rope` shares an
    existing `RotaryEmbedding` (a Backbone gives all its layers one).
    """

    def __init__(self, cfg: BackboneConfig, use_rope: bool = True, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.attn_impl = cfg.attn_impl
        self.head_dim = cfg.head_dim
        d, hd = cfg.model_dim, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attn_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attn_bias)
        self.output_proj = nn.Linear(cfg.num_heads * hd, d, bias=cfg.output_proj_bias)
        if not use_rope:
            self.rope = None
        elif rope is not None:
            self.rope = rope
        else:
            self.rope = RotaryEmbedding(
                hd, cfg.max_seq_len, cfg.rope_theta, cfg.rope_interleaved, cfg.rope_scaling,
                cfg.rope_scaling_factor,
            )

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        lead = x.shape[:-1]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        return q, k, v

    def _rotate(self, t: Tensor, positions: Tensor | None) -> Tensor:
        if self.rope is None or positions is None:
            return t
        return self.rope.apply(t, positions)

    def forward(self, x: Tensor, positions: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Packed causal self-attention: x[T,d], positions[T], cu_seqlens int32[B+1] -> [T,d]."""
        q, k, v = self._qkv(x)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        out = varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, impl=self.attn_impl)
        return self.output_proj(out.reshape(x.shape[0], -1))

    def forward_padded(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Causal self-attention over a padded batch x[B,S,d] (positions default to 0..S-1)."""
        bsz, seq, _ = x.shape
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        q, k, v = self._qkv(x)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            is_causal=True, enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.output_proj(out.transpose(1, 2).reshape(bsz, seq, -1))

    def step(self, x: Tensor, positions: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        """Incremental self-attention: x[B,n,d] at positions[B,n] (row b continues at seq_lens[b]).

        Writes this step's keys/values into `cache` (layer `layer_idx`) and attends to every
        filled position <= the query's own position."""
        bsz, n, _ = x.shape
        q, k, v = self._qkv(x)
        q, k = self._rotate(q, positions), self._rotate(k, positions)
        rows = torch.arange(bsz, device=x.device)[:, None]
        kc, vc = cache.k[layer_idx], cache.v[layer_idx]
        kc[rows, positions] = k.to(kc.dtype)
        vc[rows, positions] = v.to(vc.dtype)
        length = cache.upper + n
        keys = kc[:, :length].to(q.dtype).transpose(1, 2)
        values = vc[:, :length].to(q.dtype).transpose(1, 2)
        mask = torch.arange(length, device=x.device)[None, None, :] <= positions[:, :, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, attn_mask=mask.unsqueeze(1),
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.output_proj(out.transpose(1, 2).reshape(bsz, n, -1))

    def attend(
        self,
        q_in: Tensor,
        kv_in: Tensor,
        mask: Tensor | None = None,
        q_positions: Tensor | None = None,
        k_positions: Tensor | None = None,
    ) -> Tensor:
        """Attention of q_in[B,Tq,d] over kv_in[B,Tk,d] with an arbitrary mask.

        `mask`: bool (True = may attend) or additive float, broadcastable to [B,Tq,Tk]; None = full.
        RoPE is applied only when positions are given (and this module has RoPE).
        Every query row needs at least one allowed key (else SDPA returns NaN)."""
        if q_in.dim() != 3 or kv_in.dim() != 3 or q_in.shape[0] != kv_in.shape[0]:
            raise ValueError(
                f"attend expects q_in[B,Tq,d] and kv_in[B,Tk,d], got {tuple(q_in.shape)} and {tuple(kv_in.shape)}"
            )
        bsz, tq, _ = q_in.shape
        q = self.q_proj(q_in).view(bsz, tq, self.num_heads, self.head_dim)
        k = self.k_proj(kv_in).view(bsz, kv_in.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(kv_in).view(bsz, kv_in.shape[1], self.num_kv_heads, self.head_dim)
        q, k = self._rotate(q, q_positions), self._rotate(k, k_positions)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.unsqueeze(0)
            if mask.dim() != 3:
                raise ValueError(f"attend mask must be [Tq,Tk] or [B,Tq,Tk], got shape {tuple(mask.shape)}")
            mask = mask.unsqueeze(1)
            if mask.is_floating_point():
                mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return self.output_proj(out.transpose(1, 2).reshape(bsz, tq, -1))


class SwiGLU(nn.Module):
    """Gated feed-forward: output_proj(silu(gate_proj(x)) * inner_proj(x))."""

    def __init__(self, dim: int, inner_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inner_dim, bias=bias)
        self.inner_proj = nn.Linear(dim, inner_dim, bias=bias)
        self.output_proj = nn.Linear(inner_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.output_proj(F.silu(self.gate_proj(x)) * self.inner_proj(x))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h)); dropout on both branches."""

    def __init__(self, cfg: BackboneConfig, rope: RotaryEmbedding | None = None) -> None:
        super().__init__()
        self.self_attn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, rope=rope)
        self.ffn_layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.model_dim, cfg.ffn_dim, cfg.ffn_bias)
        self.dropout = nn.Dropout(cfg.dropout_p) if cfg.dropout_p > 0 else nn.Identity()

    def _ffn_residual(self, h: Tensor) -> Tensor:
        return h + self.dropout(self.ffn(self.ffn_layer_norm(h)))

    def forward(self, x: Tensor, positions: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        h = x + self.dropout(self.self_attn(self.self_attn_layer_norm(x), positions, cu_seqlens, max_seqlen))
        return self._ffn_residual(h)

    def forward_padded(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        h = x + self.dropout(self.self_attn.forward_padded(self.self_attn_layer_norm(x), positions))
        return self._ffn_residual(h)

    def step(self, x: Tensor, positions: Tensor, cache: KVCache, layer_idx: int) -> Tensor:
        h = x + self.dropout(self.self_attn.step(self.self_attn_layer_norm(x), positions, cache, layer_idx))
        return self._ffn_residual(h)


class Backbone(nn.Module):
    """A stack of `TransformerLayer`s and a final RMSNorm (`layers`, `layer_norm`)."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        if not isinstance(cfg, BackboneConfig):
            raise TypeError(f"Backbone expects a BackboneConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_interleaved, cfg.rope_scaling,
            cfg.rope_scaling_factor,
        )
        self.layers = nn.ModuleList(TransformerLayer(cfg, self.rope) for _ in range(cfg.num_layers))
        self.layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """normal(0, init_std) weights, zero biases, unit norms; the attention and FFN output
        projections use init_std / sqrt(2 * num_layers) (GPT-2 residual scaling)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith("output_proj") else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()

    def forward(
        self, x: Tensor, cu_seqlens: Tensor, max_seqlen: int, positions: Tensor | None = None
    ) -> Tensor:
        """Packed documents x[T,d] with boundaries cu_seqlens int32[B+1] -> [T,d] (after the final norm)."""
        if x.dim() != 2 or x.shape[-1] != self.cfg.model_dim:
            raise ValueError(f"Backbone.forward expects x[T,{self.cfg.model_dim}], got {tuple(x.shape)}")
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(
                f"cu_seqlens must be a 1-D int32 tensor, got dtype {cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}"
            )
        if cu_seqlens.dtype != torch.int32:
            cu_seqlens = cu_seqlens.to(torch.int32)
        if positions is None:
            positions = positions_from_cu_seqlens(cu_seqlens, x.shape[0])
        for layer in self.layers:
            x = layer(x, positions, cu_seqlens, max_seqlen)
        return self.layer_norm(x)

    def forward_padded(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """Padded batch x[B,S,d] -> [B,S,d]; causal, so right-padding never affects real rows."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.model_dim:
            raise ValueError(f"Backbone.forward_padded expects x[B,S,{self.cfg.model_dim}], got {tuple(x.shape)}")
        for layer in self.layers:
            x = layer.forward_padded(x, positions)
        return self.layer_norm(x)

    def new_cache(
        self, batch: int, max_len: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """An empty `KVCache` for `batch` rows of up to `max_len` positions."""
        if dtype is None:
            dtype = self.layer_norm.weight.dtype
        return KVCache(
            self.cfg.num_layers, batch, max_len, self.cfg.num_kv_heads, self.cfg.head_dim, device, dtype
        )

    def step(self, x: Tensor, cache: KVCache, lengths: Tensor | None = None) -> Tensor:
        """Feed x[B,n,d] as the next n positions of each row of `cache`; returns [B,n,d].

        `lengths[b]` (default n) says how many of the n inputs of row b are real: rows of a ragged
        prefill are right-padded, and only the first lengths[b] advance the cache (outputs at the
        padded slots are meaningless)."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.model_dim:
            raise ValueError(f"Backbone.step expects x[B,n,{self.cfg.model_dim}], got {tuple(x.shape)}")
        bsz, n, _ = x.shape
        if bsz != cache.batch:
            raise ValueError(f"Backbone.step: x has batch {bsz} but the cache has {cache.batch} rows")
        if cache.upper + n > cache.max_len:
            raise ValueError(
                f"KV cache overflow: {cache.upper} filled + {n} new > max_len {cache.max_len}"
            )
        positions = cache.seq_lens[:, None] + torch.arange(n, device=x.device)
        for i, layer in enumerate(self.layers):
            x = layer.step(x, positions, cache, i)
        cache.advance(n if lengths is None else lengths)
        return self.layer_norm(x)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
