"""The SONAR decoder fast path for SONAR-LLM training: packed sentences, folded cross-attention, fused LCE.

`PackedSonarDecoder(decoder)` wraps a frozen `SonarTextDecoder` and computes the token cross-entropy of
teacher-forcing every target sentence on its predicted embedding, without padding:
- sentences are packed into one token stream (`cu_seqlens`), self-attention is varlen causal attention;
- the decoder cross-attends to ONE key (the embedding), so each layer's cross-attention output is the
  per-sentence constant `(W_o W_v) e + (W_o b_v + b_o)`: all layers come from one GEMM on the embeddings
  and are broadcast to each sentence's tokens (the cross-attention LayerNorm and q/k projections drop out);
- residual adds are fused with the following LayerNorm (`add_layer_norm`);
- the 256k-way output projection and the cross-entropy are fused (`linear_cross_entropy`), so the
  [tokens, vocab] logits are never materialised;
- everything before layer 0's cross-attention (embeddings, layer 0 self-attention block) does not depend
  on the embedding and is computed once per batch in `prepare`, under no_grad;
- `compile_layers()` compiles the per-layer unit with fullgraph=True and dynamic shapes (every kernel is a
  sonar_kernels custom op, so nothing breaks the graph); the trainer calls it when `train.compile` is set.
Dropout is never applied (the frozen decoder is used in eval mode). `reference_loss` is the padded,
full-logits computation of the public SONAR-LLM code, kept as the correctness and speed baseline.

Two objectives (`extra_eos_target`, an argument of `prepare` / `reference_loss` / `pack_targets`). A target
sentence is its target-mode tokens `[</s>, lang, w1..wn, </s>]` (T_s tokens):
- False (default): decoder input = all but the last token `[</s>, lang, w1..wn]`, labels = all but the
  first `[lang, w1..wn, </s>]`: T_s - 1 targets per sentence.
- True (the public code's exact objective): decoder input = the whole sentence `[</s>, lang, w1..wn, </s>]`,
  labels = it shifted left with one more `</s>` appended `[lang, w1..wn, </s>, </s>]`: T_s targets, the
  extra one teaches `</s> -> </s>`. `reference_loss` then reproduces the public computation exactly: pad
  with the pad id (0), cut to 256 tokens, cross-entropy ignoring the pad id.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonar_kernels.functional.add_layer_norm import add_layer_norm
from sonar_kernels.functional.cross_attention_constants import (
    cross_attention_constants,
    fold_cross_attention,
    stack_folded,
)
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy
from sonar_kernels.functional.varlen_attention import varlen_causal_attention
from sonar_llm.activation_checkpointing import check_mode, checkpointed_call
from sonar_llm.compile import compile_fullgraph

from .decoder import SonarTextDecoder

__all__ = ["PackedSonarDecoder", "PreparedTargets", "pack_targets", "gather_sentences", "PUBLIC_MAX_TOKENS"]

PUBLIC_MAX_TOKENS = 256  # the public code cuts every padded decoder input / label row to 256 tokens


@dataclass
class PreparedTargets:
    """One batch of target sentences, packed, with everything that does not depend on the embeddings.

    N = number of decoder input tokens = T_total - S (T_total with `extra_eos_target`).
    """

    inputs: Tensor  # [N] int64: each sentence's tokens minus the last
    labels: Tensor  # [N] int64: each sentence's tokens minus the first
    positions: Tensor  # [N] int64: 0-based position inside the sentence
    sentence_ids: Tensor  # [N] int64: index of the sentence each token belongs to
    cu_seqlens: Tensor  # int32 [S+1]: sentence boundaries in the packed inputs
    max_seqlen: int  # longest decoder input
    embeddings: Tensor  # [N, D]: scaled token embeddings + sinusoid positions (decoder dtype)
    first_block: Tensor  # [N, D]: embeddings + layer-0 self-attention block output

    @property
    def num_sentences(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.inputs.numel()


def pack_targets(tokens: Tensor, tok_cu_seqlens: Tensor, extra_eos_id: int | None = None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Split target-mode sentences into packed decoder inputs and labels.

    tokens [T_total] int64, tok_cu_seqlens int32 [S+1] (every sentence at least 2 tokens) ->
    (inputs [N], labels [N], positions [N], sentence_ids [N], cu_seqlens int32 [S+1], max_seqlen).
    `extra_eos_id` (the public objective, see the module docstring): inputs = every token (N = T_total),
    labels = the next token, `extra_eos_id` after each sentence's last.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor [T_total], got {getattr(tokens, 'shape', type(tokens))}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64, got {tokens.dtype}")
    if not isinstance(tok_cu_seqlens, Tensor) or tok_cu_seqlens.dim() != 1 or tok_cu_seqlens.numel() < 2:
        raise ValueError(
            f"tok_cu_seqlens must be 1-D [S+1] with S >= 1, got {getattr(tok_cu_seqlens, 'shape', None)}"
        )
    if tok_cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tok_cu_seqlens must be int32, got {tok_cu_seqlens.dtype}")
    if tok_cu_seqlens.device != tokens.device:
        raise ValueError(f"tok_cu_seqlens is on {tok_cu_seqlens.device} but tokens on {tokens.device}")
    cu = tok_cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    first, last, min_len = int(cu[0]), int(cu[-1]), int(lengths.min())
    if first != 0 or last != tokens.numel():
        raise ValueError(
            f"tok_cu_seqlens must start at 0 and end at len(tokens)={tokens.numel()}, got {first}..{last}"
        )
    if min_len < 2:
        bad = int(torch.nonzero(lengths < 2)[0, 0])
        raise ValueError(
            f"every sentence needs at least 2 tokens (input + label); sentence {bad} has {int(lengths[bad])}"
        )
    num_sent = lengths.numel()
    if extra_eos_id is not None:
        return _pack_whole_sentences(tokens, cu, lengths, int(extra_eos_id))
    in_lengths = lengths - 1
    in_cu = cu - torch.arange(num_sent + 1, device=cu.device)
    keep_in = torch.ones(tokens.numel(), dtype=torch.bool, device=tokens.device)
    keep_in[cu[1:] - 1] = False
    keep_lab = torch.ones_like(keep_in)
    keep_lab[cu[:-1]] = False
    n = int(in_cu[-1])
    sentence_ids = torch.repeat_interleave(torch.arange(num_sent, device=cu.device), in_lengths, output_size=n)
    positions = torch.arange(n, device=cu.device) - in_cu[:-1][sentence_ids]
    return (
        tokens[keep_in].long(),
        tokens[keep_lab].long(),
        positions,
        sentence_ids,
        in_cu.to(torch.int32),
        int(in_lengths.max()),
    )


def _pack_whole_sentences(tokens: Tensor, cu: Tensor, lengths: Tensor, eos_id: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """pack_targets with the extra </s> target: inputs = tokens, labels = tokens[t+1] inside a sentence and
    `eos_id` at each sentence's last token."""
    n = tokens.numel()
    labels = torch.empty(n, dtype=torch.long, device=tokens.device)
    labels[:-1] = tokens[1:]
    labels[cu[1:] - 1] = eos_id
    sentence_ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=n)
    positions = torch.arange(n, device=cu.device) - cu[:-1][sentence_ids]
    return tokens.long(), labels, positions, sentence_ids, cu.to(torch.int32), int(lengths.max())


def gather_sentences(tokens: Tensor, tok_cu_seqlens: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Select sentences `index` (int64 [K], any order, repeats allowed) from packed tokens.

    tokens [T_total], tok_cu_seqlens [S+1] -> (tokens [T_sel], cu_seqlens int32 [K+1]), e.g. the target
    sentences (all but each document's first) of a `ConceptBatch`. Vectorised, no host sync.
    """
    if index.dim() != 1 or index.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"index must be a 1-D int64 tensor, got shape {tuple(index.shape)} dtype {index.dtype}")
    if tok_cu_seqlens.dim() != 1 or tok_cu_seqlens.numel() < 1:
        raise ValueError(f"tok_cu_seqlens must be 1-D [S+1], got shape {tuple(tok_cu_seqlens.shape)}")
    cu = tok_cu_seqlens.long()
    index = index.long()
    starts = cu[:-1].index_select(0, index)
    lengths = cu[1:].index_select(0, index) - starts
    new_cu = torch.zeros(index.numel() + 1, dtype=torch.long, device=cu.device)
    new_cu[1:] = lengths.cumsum(0)
    which = torch.repeat_interleave(torch.arange(index.numel(), device=cu.device), lengths)
    offsets = torch.arange(which.numel(), device=cu.device) - new_cu[:-1].index_select(0, which)
    src = starts.index_select(0, which) + offsets
    return tokens.index_select(0, src), new_cu.to(torch.int32)


class PackedSonarDecoder(nn.Module):
    """Packed, fused teacher-forced loss through a frozen `SonarTextDecoder` (see the module docstring).

    Holds no trainable parameters: the decoder's weights are frozen (requires_grad False) and the decoder is
    kept in eval mode; the folded cross-attention weights (and fused QKV weights) are non-persistent buffers
    computed at construction. Call `refresh()` after changing the decoder's weights (e.g. loading a
    checkpoint into it). `impl` selects add_layer_norm / linear_cross_entropy backends ("auto" | "triton" |
    "torch"); `attn_impl` the varlen attention backend ("auto" | "flash" | "flex" | "sdpa"). `fuse_qkv` keeps
    one concatenated [3D, D] QKV weight per layer (one GEMM instead of three; costs a copy of those weights).
    `activation_checkpointing` ("none" | "selective" | "full", sonar_llm.activation_checkpointing) recomputes
    the chosen layers in the backward instead of storing their activations (about one [N, D] tensor per layer
    kept instead of ~14 [N, D]-equivalents with FFN 8x); SONAR-LLM sets it from the run's one knob.
    """

    cross_weight: Tensor
    cross_bias: Tensor

    def __init__(self, decoder: SonarTextDecoder, impl: str = "auto", *, attn_impl: str = "auto",
                 fuse_qkv: bool = True, activation_checkpointing: str = "none") -> None:
        super().__init__()
        if not isinstance(decoder, SonarTextDecoder):
            raise TypeError(f"decoder must be a SonarTextDecoder, got {type(decoder).__name__}")
        if impl not in ("auto", "triton", "torch"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
        if attn_impl not in ("auto", "flash", "flex", "sdpa"):
            raise ValueError(f"attn_impl must be 'auto', 'flash', 'flex' or 'sdpa', got {attn_impl!r}")
        self.decoder = decoder
        self.impl = impl
        self.attn_impl = attn_impl
        self.fuse_qkv = fuse_qkv
        self.activation_checkpointing = check_mode(activation_checkpointing)
        self._layer_fn, self._last_fn, self._compiled = self._layer_step, self._last_step, False
        cfg = decoder.cfg
        self.num_layers, self.model_dim, self.num_heads = cfg.num_layers, cfg.model_dim, cfg.num_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        self.register_buffer("cross_weight", torch.empty(0), persistent=False)
        self.register_buffer("cross_bias", torch.empty(0), persistent=False)
        for i in range(cfg.num_layers if fuse_qkv else 0):
            self.register_buffer(f"qkv_weight_{i}", torch.empty(0), persistent=False)
            self.register_buffer(f"qkv_bias_{i}", torch.empty(0), persistent=False)
        self.refresh()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def refresh(self) -> None:
        """Freeze the decoder, put it in eval mode and (re)build the folded / fused weight buffers."""
        self.decoder.requires_grad_(False)
        self.decoder.eval()
        layers = self.decoder.decoder.layers
        folded = []
        for layer in layers:
            att = layer.encoder_decoder_attn
            folded.append(fold_cross_attention(att.v_proj.weight, att.v_proj.bias,
                                               att.output_proj.weight, att.output_proj.bias))
        self.cross_weight, self.cross_bias = stack_folded(folded)
        for i, layer in enumerate(layers if self.fuse_qkv else []):
            att = layer.self_attn
            setattr(self, f"qkv_weight_{i}",
                    torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight], dim=0).detach().clone())
            setattr(self, f"qkv_bias_{i}",
                    torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias], dim=0).detach().clone())

    def train(self, mode: bool = True) -> "PackedSonarDecoder":
        """Sets this module's flag only: the frozen decoder always stays in eval mode (no dropout)."""
        self.training = mode
        self.decoder.eval()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.decoder_frontend.embed.weight.dtype

    # ------------------------------------------------------------------ building blocks
    def _ln_params(self, ln: nn.LayerNorm) -> tuple[Tensor, Tensor, float]:
        return ln.weight, ln.bias, ln.eps

    def _self_attention(self, i: int, normed: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        att = self.decoder.decoder.layers[i].self_attn
        n = normed.shape[0]
        if self.fuse_qkv:
            qkv = F.linear(normed, getattr(self, f"qkv_weight_{i}"), getattr(self, f"qkv_bias_{i}"))
            q, k, v = qkv.view(n, 3, self.num_heads, self.head_dim).unbind(1)
        else:
            q = F.linear(normed, att.q_proj.weight, att.q_proj.bias).view(n, self.num_heads, self.head_dim)
            k = F.linear(normed, att.k_proj.weight, att.k_proj.bias).view(n, self.num_heads, self.head_dim)
            v = F.linear(normed, att.v_proj.weight, att.v_proj.bias).view(n, self.num_heads, self.head_dim)
        o = varlen_causal_attention(q, k, v, cu_seqlens, max_seqlen, impl=self.attn_impl)
        return F.linear(o.reshape(n, self.model_dim), att.output_proj.weight, att.output_proj.bias)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def prepare(self, tokens: Tensor, tok_cu_seqlens: Tensor, extra_eos_target: bool = False) -> PreparedTargets:
        """Pack a batch's target sentences and run everything that does not depend on the embeddings.

        tokens [T_total] int64 (target mode `[3, lang, w1..wn, 3]` per sentence), tok_cu_seqlens int32 [S+1];
        `extra_eos_target`: the public objective (module docstring).
        """
        cfg = self.decoder.cfg
        inputs, labels, positions, sentence_ids, cu, max_seqlen = pack_targets(
            tokens, tok_cu_seqlens, cfg.eos_idx if extra_eos_target else None)
        if max_seqlen > cfg.max_seq_len:
            raise ValueError(f"longest decoder input {max_seqlen} exceeds max_seq_len {cfg.max_seq_len}")
        if int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {cfg.vocab_size}), got range [{int(tokens.min())}, {int(tokens.max())}]"
            )
        x0 = self.decoder.embed_tokens(inputs, positions=positions).to(self.dtype)
        layer0 = self.decoder.decoder.layers[0]
        w, b, eps = self._ln_params(layer0.self_attn_layer_norm)
        normed, _ = add_layer_norm(x0, None, w, b, eps, impl=self.impl)
        x1 = x0 + self._self_attention(0, normed, cu, max_seqlen).to(x0.dtype)
        return PreparedTargets(inputs, labels, positions, sentence_ids, cu, max_seqlen, x0, x1)

    def hidden_states(self, pred_emb: Tensor, prepared: PreparedTargets) -> Tensor:
        """Final-LayerNorm hidden states [N, D] of the packed decoder inputs; differentiable w.r.t. pred_emb."""
        if not isinstance(prepared, PreparedTargets):
            raise TypeError(f"prepared must be a PreparedTargets (from prepare()), got {type(prepared).__name__}")
        if pred_emb.dim() != 2 or pred_emb.shape != (prepared.num_sentences, self.decoder.cfg.encoder_dim):
            raise ValueError(
                f"pred_emb must be [S, E] = [{prepared.num_sentences}, {self.decoder.cfg.encoder_dim}], "
                f"got {tuple(pred_emb.shape)}"
            )
        if not pred_emb.is_floating_point():
            raise TypeError(f"pred_emb must be floating point, got {pred_emb.dtype}")
        dtype = prepared.first_block.dtype
        consts = cross_attention_constants(pred_emb, self.cross_weight, self.cross_bias, self.num_layers)
        consts = consts.to(dtype)  # [S, L, D]
        sid = prepared.sentence_ids
        # Layer 0: the self-attention block output is cached; its cross constant is the first branch.
        resid = prepared.first_block
        branch = consts[:, 0].index_select(0, sid)
        for i in range(self.num_layers):
            const_next = consts[:, i + 1] if i + 1 < self.num_layers else None
            out = checkpointed_call(self.activation_checkpointing, i, self._unit, i, branch, resid, const_next,
                                    prepared)
            if const_next is None:
                return out
            branch, resid = out
        raise AssertionError("unreachable: the decoder has at least one layer")

    def _unit(self, i: int, branch: Tensor, resid: Tensor, const_next: Tensor | None, prepared: PreparedTargets):
        """Layer i's FFN block (its input = resid + branch, branch = cross constant [+ self-attention]),
        then layer i+1's self-attention block plus its cross constant -> (branch, resid); after the last
        layer the final LayerNorm -> hidden. The work is `_layer_step` / `_last_step` on explicit weights,
        so one compiled graph serves every layer (`compile_layers`)."""
        layers = self.decoder.decoder.layers
        ffn = self._ffn_weights(i)
        if const_next is None:
            final = self._ln_params(self.decoder.decoder.layer_norm)
            return self._last_fn(branch, resid, *ffn, *final)
        att = layers[i + 1].self_attn
        if self.fuse_qkv:
            qkv_w, qkv_b = getattr(self, f"qkv_weight_{i + 1}"), getattr(self, f"qkv_bias_{i + 1}")
        else:  # one [3D, D] product either way (built per call without fuse_qkv)
            qkv_w = torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight])
            qkv_b = torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
        nxt = self._ln_params(layers[i + 1].self_attn_layer_norm)
        return self._layer_fn(branch, resid, const_next, prepared, *ffn, *nxt, qkv_w, qkv_b,
                              att.output_proj.weight, att.output_proj.bias)

    def _ffn_weights(self, i: int) -> tuple:
        layer = self.decoder.decoder.layers[i]
        ffn = layer.ffn
        return (*self._ln_params(layer.ffn_layer_norm), ffn.inner_proj.weight, ffn.inner_proj.bias,
                ffn.output_proj.weight, ffn.output_proj.bias)

    def _ffn_block(self, branch, resid, ln_w, ln_b, ln_eps, in_w, in_b, out_w, out_b):
        normed, resid = add_layer_norm(branch, resid, ln_w, ln_b, ln_eps, impl=self.impl)
        ffn_out = F.linear(F.relu(F.linear(normed, in_w, in_b)), out_w, out_b).to(resid.dtype)
        return ffn_out, resid

    def _layer_step(self, branch, resid, const_next, prepared, ln_w, ln_b, ln_eps, in_w, in_b, out_w, out_b,
                    sa_w, sa_b, sa_eps, qkv_w, qkv_b, o_w, o_b):
        """FFN block of one layer + self-attention block of the next (see `_unit`)."""
        ffn_out, resid = self._ffn_block(branch, resid, ln_w, ln_b, ln_eps, in_w, in_b, out_w, out_b)
        normed, resid = add_layer_norm(ffn_out, resid, sa_w, sa_b, sa_eps, impl=self.impl)
        n = normed.shape[0]
        q, k, v = F.linear(normed, qkv_w, qkv_b).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        o = varlen_causal_attention(q, k, v, prepared.cu_seqlens, prepared.max_seqlen, impl=self.attn_impl)
        attn = F.linear(o.reshape(n, self.model_dim), o_w, o_b).to(resid.dtype)
        return attn + const_next.index_select(0, prepared.sentence_ids), resid

    def _last_step(self, branch, resid, ln_w, ln_b, ln_eps, in_w, in_b, out_w, out_b, fin_w, fin_b, fin_eps):
        """FFN block of the last layer and the final LayerNorm -> hidden [N, D]."""
        ffn_out, resid = self._ffn_block(branch, resid, ln_w, ln_b, ln_eps, in_w, in_b, out_w, out_b)
        hidden, _ = add_layer_norm(ffn_out, resid, fin_w, fin_b, fin_eps, impl=self.impl)
        return hidden

    def compile_layers(self, backend: str | None = None) -> None:
        """Compile the per-layer work (`sonar_llm.compile.compile_fullgraph`: fullgraph, dynamic shapes; `backend`
        default inductor): one graph for the layer unit (shared by all layers: the weights are arguments), one for the last layer + final norm;
        packed lengths are dynamic, so varying batches do not recompile. Idempotent."""
        if self._compiled:
            return
        self._layer_fn = compile_fullgraph(self._layer_step, backend)
        self._last_fn = compile_fullgraph(self._last_step, backend)
        self._compiled = True

    def loss(self, pred_emb: Tensor, prepared: PreparedTargets, reduction: str = "mean",
             return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Token cross-entropy of every target token given its sentence's predicted embedding.

        pred_emb [S, E]; reduction "mean" (over all target tokens) | "sum" | "none" ([N]); with
        `return_lse` also the per-token log-sum-exp [N] (fp32). Differentiable w.r.t. pred_emb only.
        """
        hidden = self.hidden_states(pred_emb, prepared)
        weight = self.decoder.decoder_frontend.embed.weight
        return linear_cross_entropy(hidden, weight, prepared.labels, reduction=reduction,
                                    return_lse=return_lse, impl=self.impl)

    def reference_loss(self, pred_emb: Tensor, tokens: Tensor, tok_cu_seqlens: Tensor,
                       reduction: str = "mean", extra_eos_target: bool = False) -> Tensor:
        """The public SONAR-LLM computation: pad every sentence to the longest, run the full decoder
        (real cross-attention), full logits, cross-entropy ignoring padding. The baseline for `loss`.
        With `extra_eos_target` exactly the public loss (module docstring): pad id 0 for inputs and labels,
        both cut to `PUBLIC_MAX_TOKENS`, no decoder padding mask (causal), cross-entropy ignoring the pad id."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if extra_eos_target:
            return self._public_loss(pred_emb, tokens, tok_cu_seqlens, reduction)
        inputs, labels, _, sentence_ids, cu, max_seqlen = pack_targets(tokens, tok_cu_seqlens)
        num_sent = cu.numel() - 1
        if pred_emb.dim() != 2 or pred_emb.shape[0] != num_sent:
            raise ValueError(f"pred_emb must be [S={num_sent}, E], got {tuple(pred_emb.shape)}")
        positions = torch.arange(inputs.numel(), device=inputs.device) - cu.long()[:-1][sentence_ids]
        pad_in = inputs.new_full((num_sent, max_seqlen), self.decoder.cfg.pad_idx)
        pad_lab = labels.new_full((num_sent, max_seqlen), -100)
        mask = torch.zeros((num_sent, max_seqlen), dtype=torch.bool, device=inputs.device)
        pad_in[sentence_ids, positions] = inputs
        pad_lab[sentence_ids, positions] = labels
        mask[sentence_ids, positions] = True
        logits = self.decoder(pad_in, pred_emb[:, None, :], padding_mask=mask)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits.flatten(0, 1), pad_lab.flatten(), ignore_index=-100,
                               reduction=reduction)

    def _public_loss(self, pred_emb: Tensor, tokens: Tensor, tok_cu_seqlens: Tensor, reduction: str) -> Tensor:
        cfg = self.decoder.cfg
        inputs, labels, positions, sentence_ids, cu, max_seqlen = pack_targets(tokens, tok_cu_seqlens, cfg.eos_idx)
        num_sent = cu.numel() - 1
        if pred_emb.dim() != 2 or pred_emb.shape[0] != num_sent:
            raise ValueError(f"pred_emb must be [S={num_sent}, E], got {tuple(pred_emb.shape)}")
        width = min(max_seqlen, PUBLIC_MAX_TOKENS)
        keep = positions < width
        pad_in = inputs.new_full((num_sent, width), cfg.pad_idx)
        pad_lab = labels.new_full((num_sent, width), cfg.pad_idx)
        pad_in[sentence_ids[keep], positions[keep]] = inputs[keep]
        pad_lab[sentence_ids[keep], positions[keep]] = labels[keep]
        logits = self.decoder(pad_in, pred_emb[:, None, :])
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return F.cross_entropy(logits.flatten(0, 1), pad_lab.flatten(), ignore_index=cfg.pad_idx,
                               reduction=reduction)
