"""Base-LCM: next-sentence regression in normalised SONAR space (the LCM's "MSE" baseline).

    e --SonarNormalizer--> (e - center)/scale --frontend.pre_linear (E->d)--> lcm (Backbone)
      --postnet.fc (d->E)--> prediction of the next normalised embedding
Module names follow the LCM checkpoints: `frontend.pre_linear`, `frontend.sonar_normalizer.{center,scale}`,
`lcm.layers.N.*`, `lcm.layer_norm.weight`, `postnet.fc`.

Loss (`next_sentence_mse`): inside each document, the output at position k-1 predicts the normalised
embedding k (k >= 1; position 0 is never a target); per target the squared error is summed over the E
dimensions. `reduction="sum"` (default, Meta's `recipes/train/pretrain/mse.yaml` and `finetune/mse.yaml`:
`criterion.reduction: sum`) sums over targets and reports the count as `metrics["loss_sum_targets"]`;
the trainer then divides the step's gradient by the number of targets of all its micro-batches and ranks,
as Meta's `lcm/train/trainer.py` `normalize_gradients` does, so the update is that of the per-target mean
over the whole step (the lr keeps its meaning). `reduction="mean"` (an option) averages over the targets of
each micro-batch. `compute_rmse` is off, as in the recipes.

The normalizer is fitted as Meta's script does (`sonar_llm.models.build.fit_normalizer_from_data`);
`normalizer_true_iqr`, `normalizer_max_samples`, `normalizer_down_sample` change that (docs/lcm.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import Backbone, BackboneConfig
from .family import ConceptFamily, causal_attention_flops, next_sentence_pairs
from .normalizer import SonarNormalizer

__all__ = ["BaseLCMConfig", "BaseLCM"]

REDUCTIONS = ("mean", "sum")


@dataclass
class BaseLCMConfig:
    """Base-LCM options: the backbone, the SONAR width, the loss reduction over targets and how the
    normalizer is fitted on the training data (defaults: Meta's runs; see docs/lcm.md)."""

    backbone: BackboneConfig
    sonar_dim: int = 1024
    reduction: str = "sum"  # Meta's recipes (pretrain/mse.yaml: criterion.reduction: sum); "mean": per micro-batch
    normalizer_true_iqr: bool = False  # False: Meta's percent reading of quantile_range=(0.25, 0.75); True: the IQR
    normalizer_max_samples: int = 1_000_000  # Meta's scripts/fit_embedding_normalizer.py max_nb_samples
    normalizer_down_sample: int = 5  # ... and its down_sample (every 5th embedding of each batch)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, BackboneConfig):
            raise TypeError(f"BaseLCMConfig.backbone must be a BackboneConfig, got {type(self.backbone).__name__}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"BaseLCMConfig.reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.sonar_dim <= 0:
            raise ValueError(f"BaseLCMConfig.sonar_dim must be positive, got {self.sonar_dim}")
        for name in ("normalizer_max_samples", "normalizer_down_sample"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"BaseLCMConfig.{name} must be a positive int, got {getattr(self, name)!r}")


class BaseLCM(ConceptFamily):
    """PreNet (normalizer + pre_linear), Backbone `lcm`, PostNet `fc`. `cfg` is a `BaseLCMConfig`
    or a `BackboneConfig` (then the BaseLCMConfig defaults: sonar_dim=1024, reduction="sum")."""

    def __init__(self, cfg: BaseLCMConfig | BackboneConfig) -> None:
        super().__init__()
        if isinstance(cfg, BackboneConfig):
            cfg = BaseLCMConfig(backbone=cfg)
        if not isinstance(cfg, BaseLCMConfig):
            raise TypeError(f"BaseLCM expects a BaseLCMConfig or BackboneConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        d, e = cfg.backbone.model_dim, cfg.sonar_dim
        self.frontend = nn.Module()
        self.frontend.pre_linear = nn.Linear(e, d, bias=True)
        self.frontend.sonar_normalizer = SonarNormalizer(e)
        self.lcm = Backbone(cfg.backbone)
        self.postnet = nn.Module()
        self.postnet.fc = nn.Linear(d, e, bias=True)

    @property
    def backbone(self) -> Backbone:  # the family interface's name for the Transformer stack
        return self.lcm

    @property
    def normalizer(self) -> SonarNormalizer:
        return self.frontend.sonar_normalizer

    # ------------------------------------------------------------------ forward pieces
    def embed_inputs(self, embeddings: Tensor) -> Tensor:
        """Raw SONAR embeddings [..., E] -> backbone inputs [..., d] (normalise, then pre_linear)."""
        w = self.frontend.pre_linear.weight
        return self.frontend.pre_linear(self.normalizer.normalize(embeddings).to(w.dtype))

    def predict_normalized(self, hidden: Tensor) -> Tensor:
        """Backbone outputs [..., d] -> predicted next embedding in normalised space [..., E]."""
        return self.postnet.fc(hidden)

    def predict_embedding(self, hidden: Tensor) -> Tensor:
        """Backbone outputs [..., d] -> predicted next raw SONAR embedding (denormalised)."""
        return self.normalizer.denormalize(self.predict_normalized(hidden))

    def forward(self, embeddings: Tensor, doc_cu_seqlens: Tensor, max_doc_len: int) -> Tensor:
        """Packed raw embeddings [S,E] -> normalised predictions [S,E] (row k predicts row k+1)."""
        if embeddings.dim() != 2 or embeddings.shape[-1] != self.cfg.sonar_dim:
            raise ValueError(f"BaseLCM expects embeddings[S, {self.cfg.sonar_dim}], got {tuple(embeddings.shape)}")
        hidden = self.lcm(self.embed_inputs(embeddings), doc_cu_seqlens, max_doc_len)
        return self.predict_normalized(hidden)

    # ------------------------------------------------------------------ family interface
    def loss(self, batch) -> tuple[Tensor, dict[str, Any]]:
        """Summed-over-dimensions squared error in normalised space, reduced over targets."""
        embeddings = batch.embeddings
        pred_rows, tgt_rows = next_sentence_pairs(batch.doc_cu_seqlens, embeddings.shape[0])
        hidden = self.lcm(self.embed_inputs(embeddings), batch.doc_cu_seqlens, batch.max_doc_len)
        pred = self.predict_normalized(hidden.index_select(0, pred_rows))
        target = self.normalizer.normalize(embeddings.index_select(0, tgt_rows)).to(pred.dtype)
        acc = torch.float64 if pred.dtype == torch.float64 else torch.float32  # fp32 for half types
        per_target = (pred.to(acc) - target.to(acc)).pow(2).sum(-1)
        total = per_target.sum()
        n = int(tgt_rows.numel())
        loss = total / max(n, 1) if self.cfg.reduction == "mean" else total
        metrics = {
            "mse_per_target": (total / max(n, 1)).detach(),
            "target_sentences": n,
        }
        if self.cfg.reduction == "sum":  # the trainer normalises the step's gradient by the targets' count
            metrics["loss_sum_targets"] = n
        return loss, metrics

    def flops_per_batch(self, batch) -> float:
        """6 x params x sentences + 3 x causal attention FLOPs."""
        cfg = self.cfg.backbone
        params = sum(p.numel() for p in self.parameters())
        flops = 6.0 * params * int(batch.embeddings.shape[0])
        return flops + 3.0 * causal_attention_flops(batch.doc_cu_seqlens, cfg.num_layers, cfg.num_heads, cfg.head_dim)


def build_from_config(cfg) -> BaseLCM:
    """Base-LCM from a `ModelConfig`: preset backbone (+ overrides), BaseLCMConfig fields from the other
    overrides; with a data path, `sonar_dim` from the data (unless overridden) and the normalizer fitted."""
    from .build import check_fields, dataset_embed_dim, fit_normalizer_from_data, preset_of, split_overrides
    from .presets import backbone_config

    preset = preset_of(cfg)
    bb_over, fam_over = split_overrides(cfg.overrides)
    if cfg.data_path and "sonar_dim" not in fam_over:
        fam_over["sonar_dim"] = dataset_embed_dim(cfg.data_path)
    check_fields(BaseLCMConfig, fam_over, cfg.family)
    model = BaseLCM(BaseLCMConfig(backbone=backbone_config(preset, **bb_over), **fam_over))
    if cfg.data_path:
        fit_normalizer_from_data(model.normalizer, cfg.data_path, model.cfg)
    return model


def _spec():
    from .family import FamilySpec
    from .generate import base_lcm_concepts
    from .normalizer import sonar_dim_from_state
    from .stories import concept_stories

    return FamilySpec(model_cls=BaseLCM, build=build_from_config, generate=base_lcm_concepts,
                      story_generator=concept_stories(base_lcm_concepts), eos_threshold=0.9,
                      trained_overrides=sonar_dim_from_state, title="Base-LCM", loss_name="MSE (normalised space)")


SPEC = _spec()
