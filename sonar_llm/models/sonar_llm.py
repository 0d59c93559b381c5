"""SONAR-LLM: a decoder-only Transformer over SONAR sentence embeddings, trained with token
cross-entropy through the frozen SONAR decoder.

    e_0..e_{n-1} --input_proj (E->d)--> Backbone --output_proj (d->E)--> ê_1..ê_n-1
Inside each document the hidden state of sentence k-1 predicts sentence k's embedding (k >= 1). Each
prediction ê_k is the single cross-attention key of the frozen SONAR decoder, teacher-forced on sentence
k's target-mode tokens; the loss is the mean cross-entropy over all target tokens of the batch (the
public SONAR-LLM objective). `path="fast"` uses `PackedSonarDecoder.loss` (packed sentences, folded
cross-attention, fused linear cross-entropy); `path="reference"` the public code's padded full-logit
computation. An optional `mse_weight` adds weight * mean squared error between ê_k and e_k (ablation).
`extra_eos_target=True` trains the public code's exact objective: the decoder reads the whole target
sentence and gets one more `</s> -> </s>` target per sentence (sonar_llm/sonar/packed_decoder.py).

The frozen decoder is NOT a registered submodule: it is absent from `parameters()` and `state_dict()`
(checkpoints and optimizers hold only the concept model) and `model.to()` does not move it; `loss`
moves it to the batch's device when needed, `decoder_to(...)` moves/casts it explicitly. Its weights
never get gradients; gradients reach the concept model through the decoder's inputs only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbone import Backbone, BackboneConfig
from .family import ConceptFamily, causal_attention_flops, next_sentence_pairs, select_segments

__all__ = ["SonarLLMConfig", "SonarLLM", "sonar_decoder_flops", "sonar_decoder_padded_flops"]

PATHS = ("fast", "reference")


@dataclass
class SonarLLMConfig:
    """SONAR-LLM options: the backbone, the SONAR embedding width, the loss path and the MSE ablation."""

    backbone: BackboneConfig
    sonar_dim: int = 1024
    path: str = "fast"
    mse_weight: float = 0.0
    decoder_impl: str = "auto"  # PackedSonarDecoder kernel backends ("auto" | "triton" | "torch")
    decoder_attn_impl: str = "auto"  # PackedSonarDecoder varlen attention ("auto" | "flash" | "flex" | "sdpa")
    decoder_fuse_qkv: bool = True  # PackedSonarDecoder: one [3D, D] QKV GEMM per layer (a copy of those weights)
    # The public objective: decoder input = the whole target sentence [</s>, lang, w.., </s>], labels
    # [lang, w.., </s>, </s>] (one extra </s> -> </s> target per sentence). False: input without the last
    # token, labels without the first (no extra target). Set from a run config: [model.overrides].
    extra_eos_target: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, BackboneConfig):
            raise TypeError(f"SonarLLMConfig.backbone must be a BackboneConfig, got {type(self.backbone).__name__}")
        if self.path not in PATHS:
            raise ValueError(f"SonarLLMConfig.path must be one of {PATHS}, got {self.path!r}")
        if self.sonar_dim <= 0:
            raise ValueError(f"SonarLLMConfig.sonar_dim must be positive, got {self.sonar_dim}")
        if self.mse_weight < 0:
            raise ValueError(f"SonarLLMConfig.mse_weight must be >= 0, got {self.mse_weight}")
        if not isinstance(self.extra_eos_target, bool):
            raise TypeError(f"SonarLLMConfig.extra_eos_target must be a bool, got {self.extra_eos_target!r}")


def sonar_decoder_flops(decoder_cfg, num_tokens: int, num_sentences: int, sum_sq_half: float) -> float:
    """Forward FLOPs of the frozen SONAR decoder teacher-forced on `num_tokens` input tokens of
    `num_sentences` sentences: per token 2 x (self-attention 4D^2 + FFN 2DF per layer + the D x V
    output projection), per sentence the folded cross-attention constants (2 x L x D x E), plus causal
    attention scores over the sentences (`sum_sq_half` = sum of L(L+1)/2)."""
    d, f, L, V = decoder_cfg.model_dim, decoder_cfg.ffn_dim, decoder_cfg.num_layers, decoder_cfg.vocab_size
    e = getattr(decoder_cfg, "encoder_dim", None) or d
    per_token = 2.0 * (L * (4 * d * d + 2 * d * f) + d * V)
    per_sentence = 2.0 * L * d * e
    attn = 4.0 * L * d * sum_sq_half
    return per_token * num_tokens + per_sentence * num_sentences + attn


def sonar_decoder_padded_flops(decoder_cfg, num_sentences: int, width: int) -> float:
    """Forward + backward FLOPs of the frozen SONAR decoder as `path="reference"` runs it
    (`PackedSonarDecoder.reference_loss`, the public code's computation): `num_sentences` rows padded to
    `width` positions, real cross-attention to the one predicted embedding (q and output projections at
    every position, k and v once per sentence), logits at every position. Counted as
    torch.utils.flop_counter counts the ops: 2 per multiply-add of every matmul; attention over the whole
    [width, width] (self) and [width, 1] (cross) square, masks saving nothing, its backward 2.5 x its
    forward (the scores are recomputed). The weights are frozen, so the backward computes input gradients
    only (one matmul per projection), and none for what depends on the token embeddings alone: layer 0's
    self-attention and its cross-attention query projection."""
    d, f, L, V = decoder_cfg.model_dim, decoder_cfg.ffn_dim, decoder_cfg.num_layers, decoder_cfg.vocab_size
    e = getattr(decoder_cfg, "encoder_dim", None) or d
    n = float(num_sentences) * width  # padded positions
    self_proj, cross_qo, cross_kv, ffn = 8.0 * n * d * d, 4.0 * n * d * d, 4.0 * num_sentences * e * d, 4.0 * n * d * f
    self_attn, cross_attn = 4.0 * n * width * d, 4.0 * n * d
    vocab = 2.0 * n * d * V
    forward = L * (self_proj + self_attn + cross_qo + cross_kv + cross_attn + ffn) + vocab
    layer_bwd = self_proj + 2.5 * self_attn + cross_qo + cross_kv + 2.5 * cross_attn + ffn
    layer0_bwd = cross_qo / 2 + cross_kv + 2.5 * cross_attn + ffn  # no self-attention, no query projection
    backward = (L - 1) * layer_bwd + layer0_bwd + vocab
    return forward + backward


class SonarLLM(ConceptFamily):
    """input_proj Linear(E->d, bias) -> Backbone -> output_proj Linear(d->E, bias); loss through the
    frozen SONAR decoder (see the module docstring). `cfg` is a `SonarLLMConfig` or a `BackboneConfig`
    (then defaults for the rest; the SONAR width is taken from the decoder)."""

    def __init__(self, cfg: SonarLLMConfig | BackboneConfig, decoder: nn.Module | None = None) -> None:
        super().__init__()
        if isinstance(cfg, BackboneConfig):
            sonar_dim = decoder.cfg.encoder_dim if decoder is not None else 1024
            cfg = SonarLLMConfig(backbone=cfg, sonar_dim=sonar_dim)
        if not isinstance(cfg, SonarLLMConfig):
            raise TypeError(f"SonarLLM expects a SonarLLMConfig or BackboneConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d = cfg.backbone.model_dim
        self.input_proj = nn.Linear(cfg.sonar_dim, d, bias=True)
        self.backbone = Backbone(cfg.backbone)
        self.output_proj = nn.Linear(d, cfg.sonar_dim, bias=True)
        object.__setattr__(self, "_packed", None)
        self._decoder_checkpointing = "none"
        if decoder is not None:
            self.set_decoder(decoder)

    # ------------------------------------------------------------------ the frozen decoder
    def set_decoder(self, decoder: nn.Module) -> None:
        """Attach a frozen SONAR decoder (a `SonarTextDecoder` or an existing `PackedSonarDecoder`)."""
        from sonar_llm.sonar.packed_decoder import PackedSonarDecoder

        packed = decoder if isinstance(decoder, PackedSonarDecoder) else PackedSonarDecoder(
            decoder, impl=self.cfg.decoder_impl, attn_impl=self.cfg.decoder_attn_impl,
            fuse_qkv=self.cfg.decoder_fuse_qkv, activation_checkpointing=self._decoder_checkpointing,
        )
        enc_dim = packed.decoder.cfg.encoder_dim
        if enc_dim != self.cfg.sonar_dim:
            raise ValueError(
                f"decoder reads {enc_dim}-d embeddings but SonarLLMConfig.sonar_dim is {self.cfg.sonar_dim}"
            )
        packed.decoder.requires_grad_(False)
        object.__setattr__(self, "_packed", packed)  # not a submodule: no parameters / state_dict

    def apply_activation_checkpointing(self, mode: str) -> None:
        """The one knob for the backbone's blocks and the frozen decoder's layers (they hold most of the
        activations: ~14 [tokens, D] tensors per decoder layer)."""
        super().apply_activation_checkpointing(mode)
        self._decoder_checkpointing = mode
        if self._packed is not None:
            self._packed.activation_checkpointing = mode

    @property
    def packed_decoder(self):
        if self._packed is None:
            raise ValueError("SonarLLM has no SONAR decoder: pass one to the constructor or call set_decoder()")
        return self._packed

    @property
    def sonar_decoder(self) -> nn.Module:
        """The frozen `SonarTextDecoder`."""
        return self.packed_decoder.decoder

    def decoder_to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        """Move/cast the frozen decoder (it is not moved by `model.to`)."""
        packed = self.packed_decoder
        packed.to(device=device, dtype=dtype)
        packed.refresh()  # rebuild the folded / fused buffers from the (cast) weights

    # ------------------------------------------------------------------ forward pieces
    def embed_inputs(self, embeddings: Tensor) -> Tensor:
        """SONAR embeddings [..., E] -> backbone inputs [..., d]."""
        return self.input_proj(embeddings.to(self.input_proj.weight.dtype))

    def predict_embedding(self, hidden: Tensor) -> Tensor:
        """Backbone outputs [..., d] -> predicted next SONAR embeddings [..., E]."""
        return self.output_proj(hidden)

    def forward(self, embeddings: Tensor, doc_cu_seqlens: Tensor, max_doc_len: int) -> Tensor:
        """Packed documents embeddings[S,E] -> predicted next embeddings [S,E] (row k predicts k+1)."""
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.cfg.sonar_dim:
            raise ValueError(
                f"SonarLLM expects embeddings[S, {self.cfg.sonar_dim}], got {tuple(embeddings.shape)}"
            )
        hidden = self.backbone(self.embed_inputs(embeddings), doc_cu_seqlens, max_doc_len)
        return self.predict_embedding(hidden)

    # ------------------------------------------------------------------ family interface
    def loss(self, batch) -> tuple[Tensor, dict[str, Any]]:
        """Mean token cross-entropy of every sentence k >= 1 of every document, decoded by the frozen
        decoder from the prediction of sentence k-1 (+ mse_weight * MSE)."""
        packed = self.packed_decoder
        embeddings = batch.embeddings
        if packed.cross_weight.device != embeddings.device:
            self.decoder_to(embeddings.device)
        pred_rows, tgt_rows = next_sentence_pairs(batch.doc_cu_seqlens, embeddings.shape[0])
        hidden = self.backbone(self.embed_inputs(embeddings), batch.doc_cu_seqlens, batch.max_doc_len)
        pred = self.predict_embedding(hidden.index_select(0, pred_rows))
        if pred_rows.numel() == 0:
            zero = pred.sum() * 0.0
            return zero, {"ce": 0.0, "target_sentences": 0, "target_tokens": 0}
        tokens, tok_cu = select_segments(batch.tokens, batch.tok_cu_seqlens, tgt_rows)
        pred_dec = pred.to(packed.dtype)
        extra = self.cfg.extra_eos_target
        if self.cfg.path == "fast":
            prepared = packed.prepare(tokens, tok_cu, extra_eos_target=extra)
            ce = packed.loss(pred_dec, prepared, reduction="mean")
        else:
            ce = packed.reference_loss(pred_dec, tokens, tok_cu, reduction="mean", extra_eos_target=extra)
        num_target_tokens = int(tokens.numel()) - (0 if extra else int(tgt_rows.numel()))
        metrics: dict[str, Any] = {
            "ce": ce.detach(),
            "target_sentences": int(tgt_rows.numel()),
            "target_tokens": num_target_tokens,
        }
        loss = ce
        if self.cfg.mse_weight > 0:
            target = embeddings.index_select(0, tgt_rows).to(pred.dtype)
            mse = F.mse_loss(pred, target)
            loss = loss + self.cfg.mse_weight * mse.to(loss.dtype)
            metrics["mse"] = mse.detach()
        return loss, metrics

    def flops_per_batch(self, batch, path: str | None = None) -> float:
        """Training FLOPs of one step (model FLOPs: activation-checkpointing recomputation is not counted):
        concept model 6 x params x sentences + 3 x attention; frozen decoder forward + input-gradient
        backward (no weight gradients). The decoder is counted as `path` (default: the configured one)
        executes it: "fast" packed target tokens with folded cross-attention (`sonar_decoder_flops` forward,
        then the backward the code runs, see below), "reference" every sentence padded to the longest
        (`sonar_decoder_padded_flops`: the padding is counted, as a GPU executes it)."""
        path = path or self.cfg.path
        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        cfg = self.cfg.backbone
        num_sent = int(batch.embeddings.shape[0])
        backbone_params = sum(p.numel() for p in self.backbone.parameters())
        proj_params = self.input_proj.weight.numel() + self.output_proj.weight.numel()
        flops = 6.0 * (backbone_params + proj_params) * num_sent
        flops += 3.0 * causal_attention_flops(batch.doc_cu_seqlens, cfg.num_layers, cfg.num_heads, cfg.head_dim)
        if self._packed is None:
            return flops
        _, tgt_rows = next_sentence_pairs(batch.doc_cu_seqlens, num_sent)
        sent_lens = (batch.tok_cu_seqlens[1:] - batch.tok_cu_seqlens[:-1]).to(torch.float64)
        lengths = sent_lens.index_select(0, tgt_rows.to(sent_lens.device))  # decoder inputs per target
        if not self.cfg.extra_eos_target:
            lengths = lengths - 1
        if path == "reference":
            if lengths.numel() == 0:
                return flops
            width = int(lengths.max())
            if self.cfg.extra_eos_target:  # the public loss cuts every row at PUBLIC_MAX_TOKENS
                from sonar_llm.sonar.packed_decoder import PUBLIC_MAX_TOKENS

                width = min(width, PUBLIC_MAX_TOKENS)
            return flops + sonar_decoder_padded_flops(self.sonar_decoder.cfg, int(lengths.numel()), width)
        num_tokens = float(lengths.sum())
        sum_sq_half = float((lengths * (lengths + 1) / 2).sum())
        dec = self.sonar_decoder.cfg
        forward = sonar_decoder_flops(dec, num_tokens, int(tgt_rows.numel()), sum_sq_half)
        # backward: input gradients, one matmul per projection (= the forward's), causal attention 2 x its
        # forward (as the concept model's 3 x above), nothing for layer 0's self-attention (its input, the
        # token embeddings, needs no gradient)
        attention = 4.0 * dec.num_layers * dec.model_dim * sum_sq_half
        layer0_self = 8.0 * dec.model_dim ** 2 * num_tokens + 2.0 * attention / dec.num_layers
        return flops + 2.0 * forward + attention - layer0_self


def build_from_config(cfg, decoder: nn.Module | None = None) -> SonarLLM:
    """SONAR-LLM from a `ModelConfig`: the preset's backbone (+ overrides), SonarLLMConfig fields from the
    other overrides, and the frozen SONAR decoder (`decoder`, else `cfg.sonar_decoder`, else the registry /
    $SONAR_DECODER); `sonar_dim` defaults to the decoder's embedding width (1024 for the real SONAR)."""
    from .build import check_fields, preset_of, split_overrides
    from .presets import backbone_config

    preset = preset_of(cfg)
    bb_over, fam_over = split_overrides(cfg.overrides)
    check_fields(SonarLLMConfig, fam_over, cfg.family)
    if decoder is None:
        from sonar_llm.sonar.checkpoint import load_sonar_decoder
        from sonar_llm.sonar.registry import resolve_asset

        decoder = load_sonar_decoder(resolve_asset("decoder", cfg.sonar_decoder or None), dtype=torch.float32)
    fam_over.setdefault("sonar_dim", decoder.cfg.encoder_dim)
    return SonarLLM(SonarLLMConfig(backbone=backbone_config(preset, **bb_over), **fam_over), decoder=decoder)


def _spec():
    from .family import FamilySpec
    from .generate import sonar_llm_concepts
    from .stories import sonar_llm_stories
    from .token_nll import sonar_llm_token_nll

    return FamilySpec(model_cls=SonarLLM, build=build_from_config, generate=sonar_llm_concepts,
                      story_generator=sonar_llm_stories, eos_threshold=0.98, token_nll=sonar_llm_token_nll,
                      needs_decoder=True, title="SONAR-LLM",
                      loss_name="token CE through the frozen decoder (nats)")


SPEC = _spec()
