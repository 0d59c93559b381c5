"""Two-Tower diffusion LCM: a causal contextualizer plus an AdaLN denoiser over SONAR embeddings.

Re-implementation of the Large Concept Model's ``two_tower_diffusion_lcm`` (facts in
``sonar_and_lcm.md`` C1, C3, C5, C7), with the LCM's state-dict names so its checkpoints (e.g. the
public Two-Tower 1.6B layout) load strictly:

* ``sonar_normalizer.{center,scale}``; ``encoder_frontend.pre_linear`` (Linear E -> d);
* ``context_encoder``: a causal :class:`~sonar_llm.models.backbone.Backbone` (RMSNorm, SwiGLU, biases,
  interleaved RoPE theta 1e4) over the *clean* normalised sequence;
* ``denoiser``: DiT timestep embedding (``embed_time.fc1/fc2``), ``initial_proj.fc`` (E -> d), layers of
  three AdaLN-modulated sub-blocks ``x = x + gate * Block(RMSNorm(x) * (1 + scale) + shift)``
  (diagonal-only self-attention, cross-attention to ``[0-vector ; context]``, SwiGLU), a final RMSNorm
  and ``final_proj.fc`` (d -> E). The model predicts x0.

Training (``loss``): x0 = normalise(embeddings); t ~ U{0..T-1} per position; x_t = add_noise(x0);
query i of a document cross-attends to key 0 (the zero vector) and context positions < i
(ShiftedCausal); classifier-free-guidance dropout makes rows see only the zero vector; loss = squared
error to x0 summed over the embedding dimensions, summed over positions. Defaults reproduce Meta's runs
(docs/lcm.md has the table):
* CFG rows (``cfg_dropout_rows="batch"``): drawn once per padded batch as Meta's
  ``lcm/nn/denoisers/attention_masks.py`` ``_get_shifted_causal_mask`` does: floor((L-1) * p) rows
  ``1 + randperm(L-1)[:n]`` of the padded length L = the longest document, the same rows for every
  document (rows past a document's end fall on padding). ``"document"`` (an option, as the paper
  describes it): floor((L_d-1) * p) rows per document of length L_d.
* validation (``cfg_dropout_in_eval=True``): the dropout also applies in eval mode, since Meta's
  ``ShiftedCausalAttentionMaskFactory`` ignores its ``training`` flag and its trainer's ``_validate`` calls
  the same criterion; ``False`` (an option) drops no row outside training.
* reduction (``loss_reduction="sum"``): Meta's ``recipes/train/{pretrain,finetune}/two_tower.yaml``
  (``criterion.reduction: sum``); the count of positions is reported as ``metrics["loss_sum_targets"]`` and
  the trainer divides the step's gradient by the count over all micro-batches and ranks, as Meta's
  ``lcm/train/trainer.py`` ``normalize_gradients`` does. ``"mean"`` (an option): mean per micro-batch.

Supervised fine-tuning (Meta's instruction-tuning layout, ``forward_sft``): the contextualizer reads each
document's ``source ++ target``, the denoiser denoises the target concepts only, and target query i of
document b sees the zero vector and context rows ``< S_b + i`` (the whole source and the earlier targets:
``sft_shifted_causal_mask``, Meta's ``ShiftedCausalAttentionMask`` with ``source_lengths``); CFG rows are drawn
per document (``sft_cfg_dropout_rows``).

Exact shortcuts (same maths, less work):
* the diagonal-only self-attention is ``output_proj(v_proj(x))`` (softmax over one key is 1; q_proj and
  k_proj exist for checkpoint compatibility and get no gradient, as in the LCM where it is exactly 0);
* a row that may only see the zero vector gets ``output_proj(v_proj(0))`` from its cross-attention;
* in training the timestep embedding and the AdaLN modulations are computed once per distinct timestep
  (a T-row table) and gathered per position when there are more positions than timesteps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonar_llm.models.backbone import Attention, Backbone, BackboneConfig, RMSNorm, SwiGLU
from sonar_llm.models.diffusion import DDIMScheduler
from sonar_llm.models.family import ConceptFamily
from sonar_llm.models.generate_two_tower import generate_two_tower, two_tower_concepts
from sonar_llm.models.normalizer import SonarNormalizer

__all__ = [
    "TwoTowerConfig",
    "TWO_TOWER_PRESETS",
    "two_tower_1_6B",
    "two_tower_780M",
    "two_tower_7B",
    "two_tower_tiny",
    "TimestepEmbedding",
    "AdaLNModulator",
    "DenoiserLayer",
    "Denoiser",
    "TwoTowerLCM",
    "DocLayout",
    "shifted_causal_mask",
    "cfg_dropout_rows",
    "sft_shifted_causal_mask",
    "sft_cfg_dropout_rows",
    "timestep_sinusoid",
    "load_lcm_state_dict",
]


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass
class TwoTowerConfig:
    """Shape, diffusion and training settings of a :class:`TwoTowerLCM` (defaults: the LCM 1.6B)."""

    model_dim: int = 2048
    num_heads: int = 16
    num_kv_heads: int | None = None
    ffn_dim: int = 5632  # SwiGLU inner size (round_up(int(8d/3), 256) in the LCM)
    context_layers: int = 5
    denoiser_layers: int = 13
    sonar_dim: int = 1024
    timestep_freq_dim: int = 256  # sinusoid size fed to embed_time.fc1
    timestep_max_period: float = 10000.0
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_theta: float = 1e4
    dropout_p: float = 0.1  # residual-branch dropout of the contextualizer
    denoiser_dropout_p: float = 0.1  # dropout on each denoiser sub-block output
    cfg_dropout_prob: float = 0.15  # classifier-free-guidance dropout (recipes: cf_guidance_probability 0.15)
    cfg_dropout_rows: str = "batch"  # "batch": Meta's rows, once per padded batch; "document": per document
    cfg_dropout_in_eval: bool = True  # Meta's mask factory ignores `training`: validation drops rows too
    num_train_steps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    rescale_betas_zero_snr: bool = True
    init_std: float = 0.02
    loss_reduction: str = "sum"  # over positions: "sum" (Meta's recipes, reduction: sum) | "mean"
    normalizer_true_iqr: bool = False  # False: Meta's percent reading of quantile_range=(0.25, 0.75); True: the IQR
    normalizer_max_samples: int = 1_000_000  # Meta's scripts/fit_embedding_normalizer.py max_nb_samples
    normalizer_down_sample: int = 5  # ... and its down_sample (every 5th embedding of each batch)

    def __post_init__(self) -> None:
        for name in ("model_dim", "num_heads", "ffn_dim", "context_layers", "denoiser_layers", "sonar_dim",
                     "timestep_freq_dim", "max_seq_len", "num_train_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TwoTowerConfig.{name} must be a positive int, got {value!r}")
        if self.model_dim % self.num_heads:
            raise ValueError(
                f"TwoTowerConfig.model_dim={self.model_dim} is not divisible by num_heads={self.num_heads}"
            )
        if not 0.0 <= self.cfg_dropout_prob < 1.0:
            raise ValueError(f"TwoTowerConfig.cfg_dropout_prob must be in [0, 1), got {self.cfg_dropout_prob}")
        for name in ("dropout_p", "denoiser_dropout_p"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TwoTowerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"TwoTowerConfig.loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")
        if self.cfg_dropout_rows not in ("batch", "document"):
            raise ValueError(f"TwoTowerConfig.cfg_dropout_rows must be 'batch' or 'document', got {self.cfg_dropout_rows!r}")
        for name in ("normalizer_max_samples", "normalizer_down_sample"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TwoTowerConfig.{name} must be a positive int, got {getattr(self, name)!r}")

    def backbone_config(self, num_layers: int | None = None, dropout_p: float | None = None) -> BackboneConfig:
        """The LCM block settings: biases everywhere, interleaved RoPE (theta 1e4), RMSNorm eps 1e-5."""
        return BackboneConfig(
            model_dim=self.model_dim,
            num_layers=self.context_layers if num_layers is None else num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            ffn_dim=self.ffn_dim,
            norm_eps=self.norm_eps,
            rope_theta=self.rope_theta,
            rope_interleaved=True,
            max_seq_len=self.max_seq_len,
            attn_bias=True,
            output_proj_bias=True,
            ffn_bias=True,
            dropout_p=self.dropout_p if dropout_p is None else dropout_p,
            init_std=self.init_std,
        )


def two_tower_1_6B(**overrides: Any) -> TwoTowerConfig:
    """LCM ``two_tower_diffusion_lcm_1_6B``: d=2048, 16 heads, 5 + 13 layers, SwiGLU 5632 (1,645,538,304 params)."""
    return replace(TwoTowerConfig(), **overrides)


def two_tower_780M(**overrides: Any) -> TwoTowerConfig:
    """LCM ``two_tower_diffusion_lcm_780M``: as 1.6B with 3 + 7 layers."""
    return replace(TwoTowerConfig(context_layers=3, denoiser_layers=7), **overrides)


def two_tower_7B(**overrides: Any) -> TwoTowerConfig:
    """LCM ``two_tower_diffusion_lcm_7B``: d=4096, 32 heads, 5 + 14 layers, SwiGLU 11008."""
    return replace(
        TwoTowerConfig(model_dim=4096, num_heads=32, ffn_dim=11008, context_layers=5, denoiser_layers=14),
        **overrides,
    )


def two_tower_tiny(**overrides: Any) -> TwoTowerConfig:
    """A test-sized model with the same key set as the real ones (d=32, 2 + 2 layers, E=16)."""
    return replace(
        TwoTowerConfig(model_dim=32, num_heads=4, ffn_dim=64, context_layers=2, denoiser_layers=2, sonar_dim=16,
                       timestep_freq_dim=16, max_seq_len=256, dropout_p=0.0, denoiser_dropout_p=0.0),
        **overrides,
    )


TWO_TOWER_PRESETS = {
    "two_tower_1_6B": two_tower_1_6B,
    "two_tower_780M": two_tower_780M,
    "two_tower_7B": two_tower_7B,
    "two_tower_tiny": two_tower_tiny,
}


# ----------------------------------------------------------------------------------------------
# Small building blocks
# ----------------------------------------------------------------------------------------------


def timestep_sinusoid(t: Tensor, dim: int, max_period: float = 10000.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """DiT sinusoid ``[cos(t * f_k) | sin(t * f_k)]``, ``f_k = max_period^(-k / (dim // 2))``: [..., dim]
    computed in ``dtype`` (fp32 as in the LCM; fp64 for float64 reference runs)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = t.to(dtype).unsqueeze(-1) * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


class TimestepEmbedding(nn.Module):
    """DiT timestep encoder: sinusoid(t) [freq_dim] -> fc1 -> SiLU -> fc2 -> [dim]."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.max_period = max_period
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for fc in (self.fc1, self.fc2):
            nn.init.normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, t: Tensor) -> Tensor:
        wdt = self.fc1.weight.dtype
        compute = torch.float64 if wdt == torch.float64 else torch.float32
        emb = timestep_sinusoid(t, self.freq_dim, self.max_period, compute).to(wdt)
        return self.fc2(F.silu(self.fc1(emb)))


class AdaLNModulator(nn.Module):
    """SiLU -> Linear(d, 9d), zero-initialised: (shift, scale, gate) for each of the 3 sub-blocks."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, 9 * dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, emb: Tensor) -> Tensor:
        return self.fc(F.silu(emb))


class _Projection(nn.Module):
    """A Linear under the attribute ``fc`` (the LCM's ``Projection`` layout)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x)


class _EncoderFrontend(nn.Module):
    """The contextualizer's input: ``pre_linear`` (E -> d); no positions (RoPE is in attention)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pre_linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.pre_linear(x)


# ----------------------------------------------------------------------------------------------
# Masks and CFG dropout on packed documents
# ----------------------------------------------------------------------------------------------


class DocLayout:
    """Index maps between packed rows [S] and a padded [D, L] view of the documents of a batch.

    ``doc_id[S]``, ``pos[S]`` (position in its document), ``lengths[D]``; ``pad_src[D, L]`` indexes
    ``cat(x, extra_row)`` (value S = padding), ``flat[S] = doc_id * L + pos`` for unpadding.
    """

    def __init__(self, cu_seqlens: Tensor, total: int, max_len: int) -> None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"doc_cu_seqlens must be 1-D with >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
        device = cu_seqlens.device
        cu = cu_seqlens.to(torch.int64)
        self.num_docs = cu.numel() - 1
        self.total = total
        self.max_len = max_len
        self.lengths = cu[1:] - cu[:-1]
        if cu.device.type == "cpu" and self.num_docs:  # cheap checks where they cost no device sync
            if int(cu[0]) != 0 or int(cu[-1]) != total or bool((self.lengths < 0).any()):
                raise ValueError(
                    f"doc_cu_seqlens must rise from 0 to the number of concepts {total}, got {cu.tolist()}"
                )
            if int(self.lengths.max()) > max_len:
                raise ValueError(
                    f"max_doc_len={max_len} is smaller than the longest document ({int(self.lengths.max())})"
                )
        self.doc_id = torch.repeat_interleave(
            torch.arange(self.num_docs, device=device), self.lengths, output_size=total
        )
        self.pos = torch.arange(total, device=device) - cu[:-1][self.doc_id]
        self.flat = self.doc_id * max_len + self.pos
        pad_src = torch.full((self.num_docs * max_len,), total, dtype=torch.int64, device=device)
        pad_src[self.flat] = torch.arange(total, device=device)
        self.pad_src = pad_src.view(self.num_docs, max_len)
        self.cu = cu

    def pad(self, x: Tensor, fill: Tensor | None = None) -> Tensor:
        """x[S, ...] -> [D, L, ...]; padding rows are ``fill`` (a [1, ...] row) or zeros."""
        extra = torch.zeros_like(x[:1]) if fill is None else fill.to(x.dtype).expand_as(x[:1])
        return torch.cat([x, extra])[self.pad_src]

    def unpad(self, y: Tensor) -> Tensor:
        """y[D, L, ...] -> [S, ...]."""
        return y.reshape(self.num_docs * self.max_len, *y.shape[2:])[self.flat]


def cfg_dropout_rows(layout: DocLayout, prob: float, generator: torch.Generator | None = None,
                     per: str = "document") -> Tensor:
    """bool[S]: the rows whose cross-attention sees only the zero vector, never a document's row 0.

    ``per="document"``: floor((L_d - 1) * prob) distinct random rows of each document (length L_d).
    ``per="batch"`` (Meta's ``_get_shifted_causal_mask``): n = floor((L - 1) * prob) positions
    ``1 + randperm(L - 1)[:n]`` of the padded length L = ``layout.max_len``, drawn once (one ``randperm``
    from ``generator``) and applied to every document (positions past a document's end drop nothing)."""
    if per not in ("batch", "document"):
        raise ValueError(f"cfg_dropout_rows: per must be 'batch' or 'document', got {per!r}")
    if prob <= 0.0:
        return torch.zeros(layout.total, dtype=torch.bool, device=layout.pos.device)
    device = layout.pos.device
    if per == "batch":
        L = layout.max_len
        positions = torch.zeros(L, dtype=torch.bool, device=device)
        n = math.floor((L - 1) * prob)
        if n > 0:
            positions[1 + torch.randperm(L - 1, generator=generator, device=device)[:n]] = True
        return positions[layout.pos]
    n_drop = torch.floor((layout.lengths - 1).to(torch.float64) * prob).to(torch.int64).clamp_min(0)
    r = torch.rand(layout.total, generator=generator, device=device, dtype=torch.float64)
    r = torch.where(layout.pos == 0, torch.full_like(r, 2.0), r)  # row 0 sorts last: never dropped
    order = torch.argsort(layout.doc_id.to(torch.float64) * 4.0 + r)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(layout.total, device=device) - layout.cu[:-1][layout.doc_id[order]]
    return rank < n_drop[layout.doc_id]


def shifted_causal_mask(layout: DocLayout, dropped: Tensor | None = None) -> Tensor:
    """bool[D, L, L+1] over keys ``[0-vector ; context_0 .. context_{L-1}]``: query i sees key 0 and
    context positions < i (keys 1..i); a ``dropped`` row (bool[S]) sees key 0 only."""
    L = layout.max_len
    device = layout.pos.device
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L + 1, device=device)[None, :]
    mask = (j <= i).unsqueeze(0).expand(layout.num_docs, L, L + 1)
    if dropped is not None:
        drop_pad = torch.zeros(layout.num_docs * L, dtype=torch.bool, device=device)
        drop_pad[layout.flat] = dropped
        mask = mask & ~(drop_pad.view(layout.num_docs, L, 1) & (j >= 1))
    return mask


def sft_shifted_causal_mask(source_lengths: Tensor, target_lengths: Tensor, dropped: Tensor | None = None,
                            max_target_len: int | None = None, max_context_len: int | None = None) -> Tensor:
    """The LCM's supervised fine-tuning (instruction-tuning) cross-attention mask: bool[D, T, 1 + K].

    Layout (Meta's ``two_tower_diffusion_next_sent_finetuning`` criterion, ``get_embeddings_sequence`` and
    ``ShiftedCausalAttentionMask`` with ``source_lengths``): the contextualizer reads ``source_b ++ target_b``
    (K = the longest S_b + T_b); the denoiser's queries are the T_b target concepts only (T = the longest);
    the keys are ``[0-vector ; context_0 .. context_{K-1}]``. Query i of document b sees keys
    ``j <= S_b + i`` (Meta's ``tril(diagonal=S_b)``): the zero vector, the whole source and the target
    concepts before i; keys past the document (padding) are masked for every query, as fairseq2's key padding
    mask does. ``dropped`` (bool[D, T]): rows that see only the zero vector (classifier-free guidance)."""
    src = source_lengths.to(torch.int64).reshape(-1)
    tgt = target_lengths.to(torch.int64).reshape(-1)
    if src.shape != tgt.shape or bool((src < 0).any()) or bool((tgt < 1).any()):
        raise ValueError(f"source_lengths (>= 0) and target_lengths (>= 1) must be [D] each, got "
                         f"{src.tolist()} and {tgt.tolist()}")
    T = int(tgt.max()) if max_target_len is None else max_target_len
    K = int((src + tgt).max()) if max_context_len is None else max_context_len
    i = torch.arange(T, device=src.device)[None, :, None]
    j = torch.arange(K + 1, device=src.device)[None, None, :]
    mask = (j <= src[:, None, None] + i) & (j <= (src + tgt)[:, None, None])
    if dropped is not None:
        if dropped.shape != (src.numel(), T):
            raise ValueError(f"dropped must be bool[{src.numel()}, {T}], got {tuple(dropped.shape)}")
        mask = mask & ~(dropped[:, :, None] & (j >= 1))
    return mask


def sft_cfg_dropout_rows(num_docs: int, max_target_len: int, prob: float,
                         generator: torch.Generator | None = None, device=None) -> Tensor:
    """bool[D, T]: the SFT rows that see only the zero vector. Meta draws them per document when source
    lengths are given (``ShiftedCausalAttentionMask`` builds one ``_get_shifted_causal_mask`` per document):
    floor((T - 1) * prob) rows ``1 + randperm(T - 1)[:n]`` of the padded target length T, row 0 never."""
    out = torch.zeros(num_docs, max_target_len, dtype=torch.bool, device=device)
    n = math.floor((max_target_len - 1) * prob)
    if n > 0:
        for d in range(num_docs):
            out[d, 1 + torch.randperm(max_target_len - 1, generator=generator, device=device)[:n]] = True
    return out


# ----------------------------------------------------------------------------------------------
# Cross-attention plans (training: packed documents; inference: cached keys/values)
# ----------------------------------------------------------------------------------------------


class _PackedCross:
    """Training cross-attention: packed queries [S, d] over per-document ``[0 ; context]`` keys. The queries
    follow ``layout`` (pretraining: one query per context row) or ``query_layout`` (SFT: the target rows)."""

    def __init__(self, context: Tensor, layout: DocLayout, mask: Tensor, query_layout: DocLayout | None = None) -> None:
        # [S + 1, d]: the contextualizer outputs, then the zero vector (row S)
        self.context = torch.cat([context, context.new_zeros(1, context.shape[-1])])
        self.layout = layout
        self.qlay = layout if query_layout is None else query_layout
        self.mask = mask.unsqueeze(1)  # [D, 1, Lq, L+1]
        # [D, L+1] rows of self.context: key 0 -> zero vector, key 1+j -> context j (padding -> zero row)
        self.key_src = torch.cat(
            [torch.full((layout.num_docs, 1), layout.total, dtype=torch.int64, device=context.device),
             layout.pad_src], dim=1,
        )

    def __call__(self, attn: Attention, h: Tensor, layer_idx: int) -> Tensor:
        lay, qlay = self.layout, self.qlay
        H, Hkv, Dh = attn.num_heads, attn.num_kv_heads, attn.head_dim
        q = qlay.pad(attn.q_proj(h)).view(qlay.num_docs, qlay.max_len, H, Dh)
        k = attn.k_proj(self.context)[self.key_src].view(lay.num_docs, lay.max_len + 1, Hkv, Dh)
        v = attn.v_proj(self.context)[self.key_src].view(lay.num_docs, lay.max_len + 1, Hkv, Dh)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=self.mask, enable_gqa=H != Hkv
        )
        out = qlay.unpad(out.transpose(1, 2).reshape(qlay.num_docs, qlay.max_len, H * Dh))
        return attn.output_proj(out)


# ----------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------


class DenoiserLayer(nn.Module):
    """AdaLN-modulated block: diagonal self-attention, cross-attention to the context, SwiGLU."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        bcfg = cfg.backbone_config(num_layers=cfg.denoiser_layers, dropout_p=cfg.denoiser_dropout_p)
        d = cfg.model_dim
        self.self_attn_layer_norm = RMSNorm(d, cfg.norm_eps)
        self.self_attn = Attention(bcfg, use_rope=False)
        self.cross_attention_layer_norm = RMSNorm(d, cfg.norm_eps)
        self.cross_attention = Attention(bcfg, use_rope=False)
        self.ffn_layer_norm = RMSNorm(d, cfg.norm_eps)
        self.ffn = SwiGLU(d, cfg.ffn_dim, bias=True)
        self.modulator = AdaLNModulator(d)
        self.dropout = nn.Dropout(cfg.denoiser_dropout_p) if cfg.denoiser_dropout_p > 0 else nn.Identity()

    def diagonal_self_attention(self, h: Tensor) -> Tensor:
        """Self-attention where each position sees only itself: output_proj(v_proj(h))."""
        attn = self.self_attn
        v = attn.v_proj(h)
        if attn.num_kv_heads != attn.num_heads:
            v = v.view(*h.shape[:-1], attn.num_kv_heads, attn.head_dim)
            v = v.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=-2).flatten(-2)
        return attn.output_proj(v)

    def forward(self, x: Tensor, time_emb: Tensor, time_index: Tensor | None, cross, layer_idx: int) -> Tensor:
        """x[N, d]; ``time_emb`` [M, d] timestep embeddings, gathered per row by ``time_index`` [N] (or
        broadcast when M == 1 / used as is when M == N); ``cross(attn, h, layer_idx)`` -> [N, d].

        The modulation is computed here, inside the layer's forward, so FSDP2 unshards the modulator with
        the rest of the block."""
        modulation = self.modulator(time_emb)
        if time_index is not None:
            modulation = modulation[time_index]
        m_sa, m_ca, m_ff = modulation.chunk(3, dim=-1)
        shift, scale, gate = m_sa.chunk(3, dim=-1)
        h = self.self_attn_layer_norm(x) * (1 + scale) + shift
        x = x + gate * self.dropout(self.diagonal_self_attention(h))
        shift, scale, gate = m_ca.chunk(3, dim=-1)
        h = self.cross_attention_layer_norm(x) * (1 + scale) + shift
        x = x + gate * self.dropout(cross(self.cross_attention, h, layer_idx))
        shift, scale, gate = m_ff.chunk(3, dim=-1)
        h = self.ffn_layer_norm(x) * (1 + scale) + shift
        return x + gate * self.dropout(self.ffn(h))


class Denoiser(nn.Module):
    """``embed_time``, ``initial_proj``, ``layers``, ``layer_norm``, ``final_proj``: x_t [N, E] -> x0 [N, E]."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.model_dim = cfg.model_dim
        self.num_train_steps = cfg.num_train_steps
        self.embed_time = TimestepEmbedding(cfg.model_dim, cfg.timestep_freq_dim, cfg.timestep_max_period)
        self.initial_proj = _Projection(cfg.sonar_dim, cfg.model_dim)
        self.layers = nn.ModuleList(DenoiserLayer(cfg) for _ in range(cfg.denoiser_layers))
        self.layer_norm = RMSNorm(cfg.model_dim, cfg.norm_eps)
        self.final_proj = _Projection(cfg.model_dim, cfg.sonar_dim)

    def _time(self, timesteps: Tensor | int, rows: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """(embedding [M, d], gather index [rows] or None): a T-row table when rows > T."""
        if not isinstance(timesteps, Tensor):
            timesteps = torch.tensor(int(timesteps), device=device)
        if timesteps.is_floating_point():
            raise TypeError(f"timesteps must be integers, got dtype {timesteps.dtype}")
        if timesteps.dim() == 0:
            return self.embed_time(timesteps.reshape(1).to(device)), None
        if timesteps.shape != (rows,):
            raise ValueError(f"timesteps must be a scalar or shape [{rows}], got {tuple(timesteps.shape)}")
        if rows > self.num_train_steps:
            table = self.embed_time(torch.arange(self.num_train_steps, device=device))
            return table, timesteps.to(device=device, dtype=torch.int64)
        return self.embed_time(timesteps.to(device)), None

    def forward(self, x_t: Tensor, timesteps: Tensor | int, cross) -> Tensor:
        """Predict x0 for rows x_t[N, E] at integer ``timesteps`` (scalar or [N]) given a cross plan."""
        h = self.initial_proj(x_t)
        emb, index = self._time(timesteps, x_t.shape[0], x_t.device)
        for i, layer in enumerate(self.layers):
            h = layer(h, emb, index, cross, i)
        return self.final_proj(self.layer_norm(h))


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class TwoTowerLCM(ConceptFamily):
    """The Two-Tower diffusion LCM; implements the model-family interface (loss, flops, blocks)."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        if not isinstance(cfg, TwoTowerConfig):
            raise TypeError(f"TwoTowerLCM expects a TwoTowerConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.sonar_normalizer = SonarNormalizer(cfg.sonar_dim)
        self.encoder_frontend = _EncoderFrontend(cfg.sonar_dim, cfg.model_dim)
        self.context_encoder = Backbone(cfg.backbone_config())
        self.denoiser = Denoiser(cfg)
        self.noise_scheduler = DDIMScheduler(
            num_train_steps=cfg.num_train_steps,
            beta_schedule=cfg.beta_schedule,
            rescale_betas_zero_snr=cfg.rescale_betas_zero_snr,
        )
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Contextualizer: Backbone's init; frontend: PyTorch Linear default (kaiming-uniform);
        denoiser: normal(0, init_std) weights (output projections scaled by 1/sqrt(2 * layers)), zero
        biases, DiT timestep init, zero AdaLN modulators."""
        self.encoder_frontend.pre_linear.reset_parameters()
        self.context_encoder.reset_parameters()
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.denoiser_layers)
        for name, module in self.denoiser.named_modules():
            if isinstance(module, nn.Linear) and ".modulator" not in name and "embed_time" not in name:
                nn.init.normal_(module.weight, 0.0, out_std if name.endswith("output_proj") else std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
        self.denoiser.embed_time.reset_parameters()
        for layer in self.denoiser.layers:
            layer.modulator.reset_parameters()

    # ------------------------------------------------------------------ family interface
    def transformer_blocks(self) -> list[nn.Module]:
        """The contextualizer's and the denoiser's layers (what FSDP2 shards one by one)."""
        return list(self.context_encoder.layers) + list(self.denoiser.layers)

    def encode_context(self, x0: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Normalised packed concepts x0[S, E] -> contextualizer outputs [S, d]."""
        return self.context_encoder(self.encoder_frontend(x0), cu_seqlens, max_seqlen)

    def forward(
        self,
        x0: Tensor,
        x_t: Tensor,
        timesteps: Tensor,
        doc_cu_seqlens: Tensor,
        max_doc_len: int,
        cfg_dropped: Tensor | None = None,
    ) -> Tensor:
        """Training forward on packed documents: x0 [S, E] (clean, normalised) conditions the denoiser
        of x_t [S, E] at ``timesteps`` [S]; returns the x0 predictions [S, E]."""
        S = x0.shape[0]
        if x0.dim() != 2 or x0.shape[-1] != self.cfg.sonar_dim or x_t.shape != x0.shape:
            raise ValueError(
                f"x0 and x_t must both be [S, {self.cfg.sonar_dim}], got {tuple(x0.shape)} and {tuple(x_t.shape)}"
            )
        context = self.encode_context(x0, doc_cu_seqlens, max_doc_len)
        layout = DocLayout(doc_cu_seqlens, S, max_doc_len)
        plan = _PackedCross(context, layout, shifted_causal_mask(layout, cfg_dropped))
        return self.denoiser(x_t, timesteps, plan)

    def forward_sft(
        self,
        x0: Tensor,
        context_cu_seqlens: Tensor,
        source_lengths: Tensor,
        x_t: Tensor,
        timesteps: Tensor,
        cfg_dropped: Tensor | None = None,
    ) -> Tensor:
        """Supervised fine-tuning forward (the LCM's instruction-tuning layout, see
        :func:`sft_shifted_causal_mask`): x0 [N, E] holds each document's clean, normalised ``source ++ target``
        packed (``context_cu_seqlens`` [D+1]), ``source_lengths`` [D] how many of them are source; x_t [M, E]
        the noisy target concepts only, packed in document order (M = sum of target lengths), at ``timesteps``
        [M]; ``cfg_dropped`` bool[D, T] (T = the longest target). Returns the x0 predictions of the targets [M, E]."""
        cu = context_cu_seqlens.to(torch.int64)
        src = source_lengths.to(device=cu.device, dtype=torch.int64)
        tgt = cu[1:] - cu[:-1] - src
        if x0.dim() != 2 or x_t.dim() != 2 or bool((tgt < 1).any()) or x_t.shape[0] != int(tgt.sum()):
            raise ValueError(f"forward_sft: every document needs >= 1 target concept and x_t one row per target "
                             f"(context lengths {(cu[1:] - cu[:-1]).tolist()}, source lengths {src.tolist()}, "
                             f"x_t rows {x_t.shape[0]})")
        max_ctx = int((cu[1:] - cu[:-1]).max())
        tgt_cu = torch.zeros_like(cu)
        torch.cumsum(tgt, 0, out=tgt_cu[1:])
        context = self.encode_context(x0, cu.to(torch.int32), max_ctx)
        ctx_layout = DocLayout(cu, x0.shape[0], max_ctx)
        tgt_layout = DocLayout(tgt_cu, x_t.shape[0], int(tgt.max()))
        mask = sft_shifted_causal_mask(src, tgt, cfg_dropped, max_context_len=max_ctx)
        return self.denoiser(x_t, timesteps, _PackedCross(context, ctx_layout, mask, query_layout=tgt_layout))

    def loss(self, batch, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Diffusion loss on a ConceptBatch: squared error to x0 summed over the embedding dimensions,
        summed over positions (``cfg.loss_reduction="sum"``, Meta's recipes) or averaged (``"mean"``).
        CFG rows are dropped in training and, with ``cfg.cfg_dropout_in_eval`` (Meta's validation), in eval
        mode. Random draws (timesteps, noise, then CFG rows) use ``generator`` or the global RNG."""
        emb = batch.embeddings
        if emb.dim() != 2 or emb.shape[-1] != self.cfg.sonar_dim:
            raise ValueError(f"batch.embeddings must be [S, {self.cfg.sonar_dim}], got {tuple(emb.shape)}")
        S = emb.shape[0]
        if S == 0:
            raise ValueError("batch.embeddings is empty: the batch has no concepts")
        dtype = self.encoder_frontend.pre_linear.weight.dtype
        x0 = self.sonar_normalizer.normalize(emb.float())
        t = torch.randint(0, self.cfg.num_train_steps, (S,), generator=generator, device=emb.device)
        noise = torch.randn(x0.shape, generator=generator, device=emb.device, dtype=x0.dtype)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        layout_dropped = None
        if (self.training or self.cfg.cfg_dropout_in_eval) and self.cfg.cfg_dropout_prob > 0:
            layout = DocLayout(batch.doc_cu_seqlens, S, batch.max_doc_len)
            layout_dropped = cfg_dropout_rows(layout, self.cfg.cfg_dropout_prob, generator, self.cfg.cfg_dropout_rows)
        pred = self(x0.to(dtype), x_t.to(dtype), t, batch.doc_cu_seqlens, batch.max_doc_len, layout_dropped)
        per_pos = (pred.float() - x0).pow(2).sum(-1)
        loss = per_pos.sum() if self.cfg.loss_reduction == "sum" else per_pos.mean()
        metrics: dict[str, Any] = {
            "mse": per_pos.mean().detach(),
            "num_concepts": S,
        }
        if self.cfg.loss_reduction == "sum":  # the trainer normalises the step's gradient by the count
            metrics["loss_sum_targets"] = S
        if layout_dropped is not None:
            metrics["cfg_dropped"] = layout_dropped.sum()  # a tensor: no host sync
        return loss, metrics

    def flops_per_batch(self, batch) -> float:
        """Forward + backward (3x forward) FLOPs of ``loss`` on this batch, counting matmuls as executed
        (diagonal self-attention as v/o projections only; timestep table when S > T)."""
        cfg = self.cfg
        d, E, f = cfg.model_dim, cfg.sonar_dim, cfg.ffn_dim
        hd = d // cfg.num_heads
        hkv = (cfg.num_kv_heads or cfg.num_heads) * hd
        S = int(batch.embeddings.shape[0])
        lengths = (batch.doc_cu_seqlens[1:] - batch.doc_cu_seqlens[:-1]).to(torch.float64)
        causal_pairs = float((lengths * (lengths + 1) / 2).sum())  # sum over queries of visible keys
        attn_proj = 2 * d * d + 2 * d * hkv  # q, o + k, v weights
        ffn = 3 * d * f
        fwd = 2.0 * S * E * d  # pre_linear
        fwd += cfg.context_layers * (2.0 * S * (attn_proj + ffn) + 4.0 * d * causal_pairs)
        rows_t = min(S, cfg.num_train_steps)
        fwd += 2.0 * rows_t * (cfg.timestep_freq_dim * d + d * d)  # embed_time
        per_layer = 2.0 * rows_t * d * 9 * d  # modulator
        per_layer += 2.0 * S * (hkv * d + d * d)  # diagonal self-attention: v_proj, output_proj
        per_layer += 2.0 * S * (2 * d * d + 2 * d * hkv)  # cross: q, o on queries; k, v on the context
        per_layer += 4.0 * d * causal_pairs  # cross scores + weighted sum (keys 0..i per query i)
        per_layer += 2.0 * S * ffn
        fwd += cfg.denoiser_layers * per_layer
        fwd += 2.0 * S * E * d * 2  # initial_proj, final_proj
        return 3.0 * fwd

    # ------------------------------------------------------------------ generation
    def generate(self, prompt_embeddings: Tensor, max_sentences: int, *args: Any, **kwargs: Any):
        """The LCM's two-tower generator: see :func:`sonar_llm.models.generate_two_tower.generate_two_tower`
        (same arguments after the model)."""
        return generate_two_tower(self, prompt_embeddings, max_sentences, *args, **kwargs)


def load_lcm_state_dict(model: TwoTowerLCM, state: dict[str, Tensor] | dict[str, Any], strict: bool = True):
    """Load an LCM checkpoint state dict (optionally wrapped as ``{"model": ...}``) into ``model``;
    with ``strict`` raise ValueError naming missing and unexpected keys."""
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    own = set(model.state_dict().keys())
    given = set(state.keys())
    if strict and own != given:
        missing, unexpected = sorted(own - given), sorted(given - own)
        raise ValueError(
            f"LCM state dict does not match TwoTowerLCM: missing {missing[:10]}{'...' if len(missing) > 10 else ''}"
            f", unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    return model.load_state_dict(state, strict=strict)


TWO_TOWER_CONTEXT_SHARE = 5 / 18  # LCM two-tower 1.6B/7B: 5 contextualizer + 13 denoiser layers


def build_from_config(cfg) -> TwoTowerLCM:
    """Two-Tower LCM from a `ModelConfig`: the preset's width, head width and FFN; its layers (the preset's, or a
    `num_layers` override) split 5:13 (the LCM's ratio) into contextualizer:denoiser unless
    `context_layers` / `denoiser_layers` are overridden;
    any TwoTowerConfig field can be overridden. With a data path, `sonar_dim` from the data (unless
    overridden) and the normalizer fitted."""
    from .build import check_fields, dataset_embed_dim, fit_normalizer_from_data, preset_of
    from .presets import backbone_config

    preset = preset_of(cfg)
    over = dict(cfg.overrides)
    total = int(over.pop("num_layers", preset.num_layers))  # the backbone size's layer count, split 5:13
    if cfg.data_path and "sonar_dim" not in over:
        over["sonar_dim"] = dataset_embed_dim(cfg.data_path)
    check_fields(TwoTowerConfig, over, cfg.family)
    context = max(1, round(total * TWO_TOWER_CONTEXT_SHARE))
    head_dim = backbone_config(preset).head_dim  # the preset's head width (600M: 64, though 26 x 64 != 1280)
    heads = preset.model_dim // head_dim if preset.model_dim % head_dim == 0 else preset.num_heads
    base = dict(model_dim=preset.model_dim, num_heads=heads, ffn_dim=preset.ffn_dim,
                num_kv_heads=preset.num_kv_heads, context_layers=context, denoiser_layers=max(1, total - context))
    model = TwoTowerLCM(TwoTowerConfig(**{**base, **over}))
    if cfg.data_path:
        fit_normalizer_from_data(model.sonar_normalizer, cfg.data_path, model.cfg)
    return model


def _spec():
    from .family import FamilySpec
    from .normalizer import sonar_dim_from_state
    from .stories import concept_stories

    return FamilySpec(model_cls=TwoTowerLCM, build=build_from_config, generate=two_tower_concepts,
                      story_generator=concept_stories(two_tower_concepts), eos_threshold=0.9,
                      trained_overrides=sonar_dim_from_state, title="Two-Tower LCM",
                      loss_name="diffusion MSE (normalised space)")


SPEC = _spec()
