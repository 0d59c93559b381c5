"""Turn `[model]` (+ `[sonar]`, `[data]`) of a run config into a model-family instance.

`model.preset` names a backbone size in sonar_llm.models.presets; `model.overrides` keys that are
BackboneConfig fields change the backbone, the others go to the family's own config dataclass
(e.g. `mse_weight` for SonarLLMConfig, `cfg_dropout_prob` for TwoTowerConfig). Per family:
  sonar_llm  SonarLLMConfig(backbone, ...) + the frozen SONAR decoder (sonar.decoder, or the registry /
             $SONAR_DECODER), attached outside the module tree: FSDP never sees it (always replicated)
  base_lcm   BaseLCMConfig(backbone, ...); normalizer fitted on training embeddings
  two_tower  TwoTowerConfig from the preset's width; its layers split 5:13 (the LCM's ratio) into
             contextualizer:denoiser unless context_layers / denoiser_layers are overridden; normalizer fitted
  token_llm  build_family("token_llm", backbone, vocab_size=...) (vocab_size from overrides or the dataset)
Normalizers are fitted on up to `NORMALIZER_SENTENCES` embeddings of the first training documents; a resumed
run then overwrites them with the checkpoint's buffers.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from train.config import RunConfig

NORMALIZER_SENTENCES = 100_000
TWO_TOWER_CONTEXT_SHARE = 5 / 18  # LCM two-tower 1.6B/7B: 5 contextualizer + 13 denoiser layers


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from sonar_llm.models.backbone import BackboneConfig

    names = {f.name for f in dataclasses.fields(BackboneConfig)}
    return ({k: v for k, v in overrides.items() if k in names}, {k: v for k, v in overrides.items() if k not in names})


def _check_fields(cls, values: dict[str, Any], family: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"model.overrides: unknown key(s) {unknown} for family {family!r} "
                         f"(backbone fields or {cls.__name__} fields: {sorted(names)})")


def fit_normalizer_from_data(model: nn.Module, data_path: str, max_sentences: int = NORMALIZER_SENTENCES) -> bool:
    """Fit `model.normalizer` (or `model.sonar_normalizer`) on the first training embeddings; False if the
    model has none."""
    norm = getattr(model, "normalizer", None) or getattr(model, "sonar_normalizer", None)
    if norm is None or not callable(getattr(norm, "fit", None)):
        return False
    from sonar_llm.data.shards import ShardedDataset

    ds = ShardedDataset(data_path)
    chunks, total = [], 0
    for i in range(ds.num_docs):
        emb = ds.doc(i)[0]
        emb = torch.as_tensor(emb).float()
        chunks.append(emb)
        total += emb.shape[0]
        if total >= max_sentences:
            break
    if total < 2:
        raise ValueError(f"data.path: {data_path} holds {total} sentence embeddings; the normalizer needs >= 2")
    norm.fit(torch.cat(chunks)[:max_sentences])
    return True


def build_model(cfg: RunConfig) -> nn.Module:
    """The family instance for `cfg` (fp32, on the CPU; the trainer moves and shards it)."""
    from sonar_llm.models import family as fam
    from sonar_llm.models.presets import backbone_config, get_preset

    name = cfg.model.family
    if name not in fam.FAMILIES:
        raise ValueError(f"model.family: unknown family {name!r} (known: {', '.join(fam.FAMILIES)})")
    try:
        preset = get_preset(cfg.model.preset)
    except ValueError as e:
        raise ValueError(f"model.preset: {e}") from None
    bb_over, fam_over = _split_overrides(dict(cfg.model.overrides))
    cls = fam.family_class(name)
    if name == "sonar_llm":
        from sonar_llm.models.sonar_llm import SonarLLMConfig
        from sonar_llm.sonar.checkpoint import load_sonar_decoder
        from sonar_llm.sonar.registry import resolve_asset

        _check_fields(SonarLLMConfig, fam_over, name)
        decoder = load_sonar_decoder(resolve_asset("decoder", cfg.sonar.decoder or None), dtype=torch.float32)
        fam_over.setdefault("sonar_dim", decoder.cfg.encoder_dim)  # 1024 for the real SONAR
        mcfg = SonarLLMConfig(backbone=backbone_config(preset, **bb_over), **fam_over)
        return cls(mcfg, decoder=decoder)
    if name in ("base_lcm", "two_tower") and cfg.data.path and "sonar_dim" not in fam_over:
        fam_over["sonar_dim"] = _dataset_embed_dim(cfg)
    if name == "base_lcm":
        from sonar_llm.models.base_lcm import BaseLCMConfig

        _check_fields(BaseLCMConfig, fam_over, name)
        model = cls(BaseLCMConfig(backbone=backbone_config(preset, **bb_over), **fam_over))
    elif name == "two_tower":
        from sonar_llm.models.two_tower import TwoTowerConfig

        over = {**bb_over, **fam_over}
        _check_fields(TwoTowerConfig, over, name)
        context = max(1, round(preset.num_layers * TWO_TOWER_CONTEXT_SHARE))
        base = dict(model_dim=preset.model_dim, num_heads=preset.num_heads, ffn_dim=preset.ffn_dim,
                    num_kv_heads=preset.num_kv_heads, context_layers=context,
                    denoiser_layers=max(1, preset.num_layers - context))
        model = cls(TwoTowerConfig(**{**base, **over}))
    else:  # token_llm and any family taking a BackboneConfig plus keyword dependencies
        deps = dict(fam_over)
        if name == "token_llm" and "vocab_size" not in deps:
            deps["vocab_size"] = _dataset_vocab_size(cfg)
        return fam.build_family(name, backbone_config(preset, **bb_over), **deps)
    if cfg.data.path:
        fit_normalizer_from_data(model, cfg.data.path)
    return model


def _dataset_embed_dim(cfg: RunConfig) -> int:
    """Sentence-embedding width of the training data (1024 for the real SONAR encoder)."""
    from sonar_llm.data.shards import read_manifest

    return int(read_manifest(cfg.data.path)["embed_dim"])


def _dataset_vocab_size(cfg: RunConfig) -> int:
    """Vocabulary size for the token LLM: the manifest's `vocab_size` if recorded, else max token id + 1."""
    from sonar_llm.data.shards import ShardedDataset, read_manifest

    manifest = read_manifest(cfg.data.path)
    for key in ("vocab_size", "tokenizer_vocab_size"):
        if isinstance(manifest.get(key), int):
            return int(manifest[key])
    ds = ShardedDataset(cfg.data.path)
    top = 0
    for i in range(ds.num_docs):
        top = max(top, int(torch.as_tensor(ds.doc(i)[1]).max()))
    return top + 1
