"""SONAR text encoder in plain PyTorch: tokens -> one sentence embedding per sequence.

Data flow (as fairseq2/SONAR): embed * sqrt(d) + sinusoid (steps from 2), dropout, pre-LN encoder layers,
final ``layer_norm``, then masked mean pooling ``sum(real positions) * 1 / (length + 1e-7)``.
State-dict keys match the released ``sonar_text_encoder.pt``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import SonarEncoderConfig
from .layers import EncoderLayer, TransformerFrontend

__all__ = ["SonarTextEncoder", "check_tokens"]


def check_tokens(tokens: Tensor, padding_mask: Tensor | None, vocab_size: int, max_seq_len: int,
                 name: str = "tokens") -> None:
    """Validate a [B, S] token batch and its optional [B, S] bool padding mask (True = real token)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64, got {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must be [B, S], got shape {tuple(tokens.shape)}")
    if tokens.size(1) > max_seq_len:
        raise ValueError(f"{name} length {tokens.size(1)} exceeds max_seq_len {max_seq_len}")
    if padding_mask is not None:
        if padding_mask.dtype != torch.bool:
            raise TypeError(f"padding_mask must be bool (True = real token), got {padding_mask.dtype}")
        if padding_mask.shape != tokens.shape:
            raise ValueError(
                f"padding_mask shape {tuple(padding_mask.shape)} must equal {name} shape {tuple(tokens.shape)}"
            )
    if tokens.numel() and tokens.device.type != "meta":
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} ids must lie in [0, {vocab_size}), got range [{lo}, {hi}]")


class SonarTextEncoder(nn.Module):
    """The SONAR text encoder (``encoder_frontend``, ``encoder.layers``, ``layer_norm``)."""

    def __init__(self, cfg: SonarEncoderConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(cfg, SonarEncoderConfig):
            raise TypeError(f"cfg must be a SonarEncoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        kw = dict(device=device, dtype=dtype)
        self.encoder_frontend = TransformerFrontend(cfg.vocab_size, cfg.model_dim, cfg.max_seq_len,
                                                    cfg.pos_start_step, cfg.dropout_p, **kw)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            EncoderLayer(cfg.model_dim, cfg.num_heads, cfg.ffn_dim, cfg.dropout_p, cfg.layer_norm_eps, **kw)
            for _ in range(cfg.num_layers)
        )
        self.layer_norm = nn.LayerNorm(cfg.model_dim, eps=cfg.layer_norm_eps, **kw)

    def encode_sequence(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Per-token outputs after the final LayerNorm: [B, S, D]."""
        check_tokens(tokens, padding_mask, self.cfg.vocab_size, self.cfg.max_seq_len)
        x = self.encoder_frontend(tokens)
        for layer in self.encoder.layers:
            x = layer(x, padding_mask)
        return self.layer_norm(x)

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """tokens [B, S] int64, padding_mask [B, S] bool (True = real) or None -> embeddings [B, D]."""
        h = self.encode_sequence(tokens, padding_mask)
        if padding_mask is None:
            return h.sum(dim=1) * (1.0 / (h.size(1) + 1e-7))
        m = padding_mask.to(h.dtype)
        summed = (h * m[..., None]).sum(dim=1)
        lengths = m.sum(dim=1)
        return summed * (1.0 / (lengths + 1e-7))[:, None]
