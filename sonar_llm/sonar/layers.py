"""Building blocks of the SONAR text models, named as in fairseq2 so that state-dict keys match.

- ``SinusoidalPositions``: fixed sinusoid table, layout ``[sin(half) | cos(half)]``, frequencies
  ``exp(-i * ln(1e4) / (half - 1))`` and steps starting at ``start_step`` (2 for SONAR, the fairseq legacy
  offset), added in fp32 as fairseq2 does.
- ``LayerKVCache``: preallocated key/value cache of one self-attention layer for incremental decoding
  (supports beam reordering; not the concept backbone's ``sonar_llm.models.backbone.KVCache``).
- ``MultiheadAttention``: ``q_proj``, ``k_proj``, ``v_proj``, ``output_proj`` (all biased), through
  ``F.scaled_dot_product_attention``.
- ``FeedForward``: ``inner_proj`` -> ReLU -> dropout -> ``output_proj``.
- ``TransformerFrontend``: ``embed`` (scaled by sqrt(d)) + positions + dropout.
- ``EncoderLayer`` / ``DecoderLayer``: pre-LayerNorm transformer layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "sinusoid_table",
    "SinusoidalPositions",
    "LayerKVCache",
    "MultiheadAttention",
    "FeedForward",
    "TransformerFrontend",
    "EncoderLayer",
    "DecoderLayer",
]


def sinusoid_table(num_rows: int, dim: int, start_step: int = 2, *, device=None,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """The fairseq2 sinusoid table: row r encodes step ``start_step + r``; columns ``[sin | cos]``."""
    if dim % 2 != 0:
        raise ValueError(f"sinusoid dim must be even, got {dim}")
    half = dim // 2
    if half < 2:
        raise ValueError(f"sinusoid dim must be >= 4, got {dim}")
    # Computed in fp32 like fairseq2 (so the released checkpoints see the same table).
    steps = torch.arange(start_step, start_step + num_rows, device=device, dtype=torch.float32)
    idx = torch.arange(half, device=device, dtype=torch.float32)
    freqs = torch.exp(idx * (-math.log(10000.0) / (half - 1)))
    angles = torch.outer(steps, freqs)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


class SinusoidalPositions(nn.Module):
    """Adds fixed sinusoidal positions. The table is a non-persistent buffer (not in checkpoints)."""

    freqs: Tensor

    def __init__(self, dim: int, max_seq_len: int, start_step: int = 2, device=None) -> None:
        super().__init__()
        self.dim = dim
        self.max_seq_len = max_seq_len
        self.start_step = start_step
        self.register_buffer("freqs", torch.empty(max_seq_len, dim, device=device), persistent=False)
        self.reset_buffers(self.freqs.device)

    def reset_buffers(self, device=None) -> None:
        """(Re)compute the fp32 table, e.g. after building on the meta device or a dtype cast."""
        device = torch.device(device) if device is not None else self.freqs.device
        if device.type == "meta":  # (arange on meta pulls in torch._dynamo: just allocate)
            self.freqs = torch.empty(self.max_seq_len, self.dim, device=device)
            return
        self.freqs = sinusoid_table(self.max_seq_len, self.dim, self.start_step, device=device)

    def table(self, start_step: int, length: int) -> Tensor:
        if self.freqs.dtype != torch.float32:  # a module-wide .to(dtype) cast it: rebuild in fp32
            self.reset_buffers()
        if start_step < 0 or start_step + length > self.max_seq_len:
            raise ValueError(
                f"positions [{start_step}, {start_step + length}) exceed the maximum sequence length "
                f"{self.max_seq_len}"
            )
        return self.freqs[start_step:start_step + length]

    def forward(self, x: Tensor, start_step: int = 0, positions: Tensor | None = None) -> Tensor:
        """x [..., S, D] -> x + table (in fp32, cast back). ``positions`` (int64, shape x.shape[:-1])
        gives explicit 0-based positions instead of ``start_step + arange(S)``."""
        if x.size(-1) != self.dim:
            raise ValueError(f"expected last dim {self.dim}, got shape {tuple(x.shape)}")
        if positions is not None:
            if positions.shape != x.shape[:-1]:
                raise ValueError(
                    f"positions shape {tuple(positions.shape)} must equal x.shape[:-1] {tuple(x.shape[:-1])}"
                )
            if positions.numel() and (int(positions.max()) >= self.max_seq_len or int(positions.min()) < 0):
                raise ValueError(f"positions must lie in [0, {self.max_seq_len})")
            if self.freqs.dtype != torch.float32:
                self.reset_buffers()
            pos = self.freqs[positions]
        else:
            pos = self.table(start_step, x.size(-2))
        return (x.float() + pos).type_as(x)


class LayerKVCache:
    """Keys and values of one SONAR self-attention layer: [B, H, capacity, Dh], filled up to ``length``."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, capacity: int, *,
                 dtype: torch.dtype, device) -> None:
        self.k = torch.empty(batch_size, num_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.size(2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, T, Dh]; return all keys and values so far."""
        t = k.size(2)
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache overflow: {self.length} + {t} > capacity {self.capacity}")
        self.k[:, :, self.length:self.length + t] = k
        self.v[:, :, self.length:self.length + t] = v
        self.length += t
        return self.k[:, :, :self.length], self.v[:, :, :self.length]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search): row b becomes old row index[b]."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)


class MultiheadAttention(nn.Module):
    """Standard multi-head attention with biased projections (fairseq2 names)."""

    def __init__(self, model_dim: int, num_heads: int, kv_dim: int | None = None, dropout_p: float = 0.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if model_dim % num_heads != 0:
            raise ValueError(f"model_dim {model_dim} not divisible by num_heads {num_heads}")
        kv_dim = model_dim if kv_dim is None else kv_dim
        self.model_dim, self.num_heads, self.kv_dim = model_dim, num_heads, kv_dim
        self.head_dim = model_dim // num_heads
        self.dropout_p = dropout_p
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(model_dim, model_dim, bias=True, **kw)
        self.k_proj = nn.Linear(kv_dim, model_dim, bias=True, **kw)
        self.v_proj = nn.Linear(kv_dim, model_dim, bias=True, **kw)
        self.output_proj = nn.Linear(model_dim, model_dim, bias=True, **kw)

    def _split(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, H, T, Dh]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor | None = None, *, key_padding_mask: Tensor | None = None,
                causal: bool = False, cache: LayerKVCache | None = None) -> Tensor:
        """x [B, S, D]; kv [B, T, kv_dim] (None = self-attention); key_padding_mask [B, T] bool, True =
        real key; ``causal`` masks future keys (positions counted after the cached ones); ``cache`` holds
        earlier keys/values (self-attention only)."""
        if x.dim() != 3 or x.size(-1) != self.model_dim:
            raise ValueError(f"attention input must be [B, S, {self.model_dim}], got {tuple(x.shape)}")
        src = x if kv is None else kv
        q = self._split(self.q_proj(x))
        k = self._split(self.k_proj(src))
        v = self._split(self.v_proj(src))
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)
        s, t = q.size(2), k.size(2)
        mask = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (x.size(0), t):
                raise ValueError(
                    f"key_padding_mask must be [B, T] = {(x.size(0), t)}, got {tuple(key_padding_mask.shape)}"
                )
            mask = key_padding_mask[:, None, None, :].to(torch.bool)
        use_is_causal = False
        if causal and s > 1:
            if mask is None and past == 0 and s == t:
                use_is_causal = True
            else:
                qi = torch.arange(s, device=x.device)[:, None] + past
                kj = torch.arange(t, device=x.device)[None, :]
                causal_mask = (kj <= qi)[None, None]
                mask = causal_mask if mask is None else (mask & causal_mask)
        drop = self.dropout_p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=use_is_causal)
        return self.output_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """inner_proj -> ReLU -> dropout -> output_proj."""

    def __init__(self, model_dim: int, ffn_dim: int, dropout_p: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        self.inner_proj = nn.Linear(model_dim, ffn_dim, bias=True, device=device, dtype=dtype)
        self.output_proj = nn.Linear(ffn_dim, model_dim, bias=True, device=device, dtype=dtype)
        self.dropout_p = dropout_p

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.inner_proj(x))
        h = F.dropout(h, self.dropout_p, self.training)
        return self.output_proj(h)


class TransformerFrontend(nn.Module):
    """Token embedding scaled by sqrt(model_dim), plus sinusoid positions, plus dropout."""

    def __init__(self, vocab_size: int, model_dim: int, max_seq_len: int, start_step: int = 2,
                 dropout_p: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, model_dim, device=device, dtype=dtype)
        if weight.device.type != "meta":  # (normal_ on meta pulls in torch._dynamo: skip it there)
            nn.init.normal_(weight, std=model_dim ** -0.5)  # fairseq2's scaled-embedding init
        self.embed = nn.Embedding(vocab_size, model_dim, _weight=weight)
        self.scale = math.sqrt(model_dim)
        self.pos_encoder = SinusoidalPositions(model_dim, max_seq_len, start_step, device=device)
        self.dropout_p = dropout_p

    def forward(self, tokens: Tensor, start_step: int = 0, positions: Tensor | None = None) -> Tensor:
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be int64 (or int32), got {tokens.dtype}")
        x = self.embed(tokens) * self.scale
        x = self.pos_encoder(x, start_step, positions)
        return F.dropout(x, self.dropout_p, self.training)


class EncoderLayer(nn.Module):
    """Pre-LN: x += drop(SelfAttn(LN(x))); x += drop(FFN(LN(x)))."""

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, dropout_p: float = 0.0,
                 eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.self_attn_layer_norm = nn.LayerNorm(model_dim, eps=eps, **kw)
        self.self_attn = MultiheadAttention(model_dim, num_heads, dropout_p=dropout_p, **kw)
        self.ffn_layer_norm = nn.LayerNorm(model_dim, eps=eps, **kw)
        self.ffn = FeedForward(model_dim, ffn_dim, dropout_p, **kw)
        self.dropout_p = dropout_p

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        h = self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=padding_mask)
        x = x + F.dropout(h, self.dropout_p, self.training)
        h = self.ffn(self.ffn_layer_norm(x))
        return x + F.dropout(h, self.dropout_p, self.training)


class DecoderLayer(nn.Module):
    """Pre-LN: causal self-attention, cross-attention to the encoder output, FFN."""

    def __init__(self, model_dim: int, num_heads: int, ffn_dim: int, encoder_dim: int | None = None,
                 dropout_p: float = 0.0, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.self_attn_layer_norm = nn.LayerNorm(model_dim, eps=eps, **kw)
        self.self_attn = MultiheadAttention(model_dim, num_heads, dropout_p=dropout_p, **kw)
        self.encoder_decoder_attn_layer_norm = nn.LayerNorm(model_dim, eps=eps, **kw)
        self.encoder_decoder_attn = MultiheadAttention(model_dim, num_heads, kv_dim=encoder_dim,
                                                       dropout_p=dropout_p, **kw)
        self.ffn_layer_norm = nn.LayerNorm(model_dim, eps=eps, **kw)
        self.ffn = FeedForward(model_dim, ffn_dim, dropout_p, **kw)
        self.dropout_p = dropout_p

    def cross_attention_constant(self, encoder_output: Tensor) -> Tensor:
        """Cross-attention output when there is exactly one key: W_o (W_v e + b_v) + b_o. e [B, E] -> [B, D]."""
        attn = self.encoder_decoder_attn
        return attn.output_proj(attn.v_proj(encoder_output))

    def forward(self, x: Tensor, encoder_output: Tensor | None = None, *, padding_mask: Tensor | None = None,
                encoder_padding_mask: Tensor | None = None, cache: LayerKVCache | None = None,
                cross_constant: Tensor | None = None) -> Tensor:
        """x [B, S, D]. Either ``encoder_output`` [B, T, E] (real cross-attention) or ``cross_constant``
        [B, D] (the exact one-key shortcut, used for generation) must be given."""
        h = self.self_attn(self.self_attn_layer_norm(x), key_padding_mask=padding_mask, causal=True, cache=cache)
        x = x + F.dropout(h, self.dropout_p, self.training)
        if cross_constant is not None:
            h = cross_constant[:, None, :].to(x.dtype).expand_as(x)
        elif encoder_output is not None:
            h = self.encoder_decoder_attn(self.encoder_decoder_attn_layer_norm(x), encoder_output,
                                          key_padding_mask=encoder_padding_mask)
        else:
            raise ValueError("DecoderLayer needs encoder_output or cross_constant")
        x = x + F.dropout(h, self.dropout_p, self.training)
        h = self.ffn(self.ffn_layer_norm(x))
        return x + F.dropout(h, self.dropout_p, self.training)
