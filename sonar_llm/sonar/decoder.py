"""SONAR text decoder in plain PyTorch (the reference path) plus its incremental-decoding API.

``forward`` runs the full model on padded batches with real cross-attention (q/k/v, softmax over the single
key), exactly as fairseq2's ``ConditionalTransformerDecoderModel``. ``init_state``/``step`` decode
incrementally with a KV cache and the exact one-key shortcut: every layer's cross-attention output is the
per-sentence constant ``W_o (W_v e + b_v) + b_o``. ``final_proj.weight`` is the same Parameter as
``decoder_frontend.embed.weight`` (tied, no bias); the state dict holds both keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .config import SonarDecoderConfig
from .encoder import check_tokens
from .layers import DecoderLayer, LayerKVCache, TransformerFrontend

__all__ = ["SonarTextDecoder", "DecoderState"]


@dataclass
class DecoderState:
    """Incremental decoding state: per-layer self-attention caches, cross-attention constants
    [B, L, D], and the number of positions consumed so far (``step_nr``)."""

    caches: list[LayerKVCache]
    cross_constants: Tensor
    step_nr: int = 0
    capacity: int = field(default=0)

    @property
    def batch_size(self) -> int:
        return self.cross_constants.size(0)

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search bookkeeping); the batch size may change."""
        for c in self.caches:
            c.reorder(index)
        self.cross_constants = self.cross_constants.index_select(0, index)


class SonarTextDecoder(nn.Module):
    """The SONAR text decoder (``decoder_frontend``, ``decoder.layers``, ``decoder.layer_norm``,
    tied ``final_proj``)."""

    def __init__(self, cfg: SonarDecoderConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(cfg, SonarDecoderConfig):
            raise TypeError(f"cfg must be a SonarDecoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.decoder_frontend = TransformerFrontend(cfg.vocab_size, cfg.model_dim, cfg.max_seq_len,
                                                    cfg.pos_start_step, cfg.dropout_p, **kw)
        self.decoder = nn.Module()
        self.decoder.layers = nn.ModuleList(
            DecoderLayer(cfg.model_dim, cfg.num_heads, cfg.ffn_dim, cfg.encoder_dim, cfg.dropout_p,
                         cfg.layer_norm_eps, **kw)
            for _ in range(cfg.num_layers)
        )
        self.decoder.layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps, **kw)
        self.final_proj = nn.Linear(cfg.model_dim, cfg.vocab_size, bias=False, device="meta")
        self.tie_weights()

    # ------------------------------------------------------------------ helpers
    def tie_weights(self) -> None:
        """Make ``final_proj.weight`` the very Parameter ``decoder_frontend.embed.weight``."""
        self.final_proj.weight = self.decoder_frontend.embed.weight

    def _normalize_encoder_output(self, encoder_output: Tensor, batch_size: int | None) -> Tensor:
        if not isinstance(encoder_output, Tensor):
            raise TypeError(f"encoder_output must be a Tensor, got {type(encoder_output).__name__}")
        if not encoder_output.is_floating_point():
            raise TypeError(f"encoder_output must be floating point, got {encoder_output.dtype}")
        if encoder_output.dim() == 2:
            encoder_output = encoder_output[:, None, :]
        if encoder_output.dim() != 3 or encoder_output.size(-1) != self.cfg.encoder_dim:
            raise ValueError(
                f"encoder_output must be [B, {self.cfg.encoder_dim}] or [B, T, {self.cfg.encoder_dim}], "
                f"got {tuple(encoder_output.shape)}"
            )
        if batch_size is not None and encoder_output.size(0) != batch_size:
            raise ValueError(
                f"encoder_output batch {encoder_output.size(0)} != tokens batch {batch_size}"
            )
        return encoder_output

    # ------------------------------------------------------------------ reference path
    def embed_tokens(self, tokens: Tensor, start_step: int = 0, positions: Tensor | None = None) -> Tensor:
        """Scaled embedding + sinusoid positions (+ dropout in training): [..., S] -> [..., S, D].
        ``positions`` (same shape as tokens, 0-based) overrides ``start_step + arange(S)``, e.g. for packed
        sequences."""
        return self.decoder_frontend(tokens, start_step, positions)

    def hidden_states(self, tokens: Tensor, encoder_output: Tensor, padding_mask: Tensor | None = None,
                      encoder_padding_mask: Tensor | None = None) -> Tensor:
        """tokens [B, S], encoder_output [B, E] or [B, T, E] -> [B, S, D] after the final LayerNorm."""
        check_tokens(tokens, padding_mask, self.cfg.vocab_size, self.cfg.max_seq_len)
        enc = self._normalize_encoder_output(encoder_output, tokens.size(0))
        x = self.embed_tokens(tokens)
        enc = enc.to(x.dtype)
        for layer in self.decoder.layers:
            x = layer(x, enc, padding_mask=padding_mask, encoder_padding_mask=encoder_padding_mask)
        return self.decoder.layer_norm(x)

    def project(self, hidden: Tensor) -> Tensor:
        """Logits = hidden @ E^T (tied, no bias)."""
        return self.final_proj(hidden)

    def forward(self, tokens: Tensor, encoder_output: Tensor, padding_mask: Tensor | None = None,
                encoder_padding_mask: Tensor | None = None) -> Tensor:
        """tokens [B, S] int64, encoder_output [B, 1, E] or [B, E] -> logits [B, S, V]."""
        return self.project(self.hidden_states(tokens, encoder_output, padding_mask, encoder_padding_mask))

    # ------------------------------------------------------------------ incremental path
    def cross_attention_constants(self, embeddings: Tensor) -> Tensor:
        """embeddings [B, E] (or [B, 1, E]) -> [B, L, D]: each layer's exact one-key cross-attention output."""
        enc = self._normalize_encoder_output(embeddings, None)
        if enc.size(1) != 1:
            raise ValueError(f"the one-key shortcut needs one encoder position, got {enc.size(1)}")
        e = enc[:, 0].to(self.decoder_frontend.embed.weight.dtype)
        return torch.stack([layer.cross_attention_constant(e) for layer in self.decoder.layers], dim=1)

    def folded_cross_attention(self) -> tuple[Tensor, Tensor]:
        """All layers' one-key cross-attention as one affine map of the embedding:
        W [L*D, E] = stack(W_o W_v), b [L*D] = stack(W_o b_v + b_o) (float64 math, cast back), so that
        ``(e @ W.T + b).view(B, L, D)`` equals :meth:`cross_attention_constants`."""
        ws, bs = [], []
        for layer in self.decoder.layers:
            attn = layer.encoder_decoder_attn
            wo = attn.output_proj.weight.detach().double()
            ws.append(wo @ attn.v_proj.weight.detach().double())
            bs.append(wo @ attn.v_proj.bias.detach().double() + attn.output_proj.bias.detach().double())
        dtype = self.decoder_frontend.embed.weight.dtype
        return torch.cat(ws, 0).to(dtype), torch.cat(bs, 0).to(dtype)

    def init_state(self, embeddings: Tensor, capacity: int | None = None) -> DecoderState:
        """Start incremental decoding for sentence embeddings [B, E]; ``capacity`` = most positions."""
        capacity = self.cfg.max_seq_len if capacity is None else capacity
        if not 0 < capacity <= self.cfg.max_seq_len:
            raise ValueError(f"capacity must be in [1, {self.cfg.max_seq_len}], got {capacity}")
        consts = self.cross_attention_constants(embeddings)
        w = self.decoder_frontend.embed.weight
        caches = [
            LayerKVCache(consts.size(0), self.cfg.num_heads, self.cfg.head_dim, capacity,
                         dtype=w.dtype, device=w.device)
            for _ in range(self.cfg.num_layers)
        ]
        return DecoderState(caches, consts, 0, capacity)

    def step_hidden(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Feed tokens [B, T] (continuing at ``state.step_nr``) -> hidden [B, T, D]; updates ``state``."""
        if tokens.dim() != 2 or tokens.size(0) != state.batch_size:
            raise ValueError(f"tokens must be [{state.batch_size}, T], got {tuple(tokens.shape)}")
        x = self.embed_tokens(tokens, state.step_nr)
        for i, layer in enumerate(self.decoder.layers):
            x = layer(x, cache=state.caches[i], cross_constant=state.cross_constants[:, i])
        state.step_nr += tokens.size(1)
        return self.decoder.layer_norm(x)

    def step(self, tokens: Tensor, state: DecoderState) -> Tensor:
        """Like ``step_hidden`` but returns logits [B, T, V]."""
        return self.project(self.step_hidden(tokens, state))
