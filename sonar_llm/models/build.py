"""Build a model family from a model config, and rebuild a trained one from its weights.

`ModelConfig` is the library's view of a run's `[model]` table plus the two paths a build reads
(`[sonar].decoder`, `[data].path`); `ModelConfig.from_run_config(d)` takes them from a run's resolved
config dict (config.json / an export's model.json), `ModelConfig.from_sections(model, sonar, data)` from
the sections (dicts or dataclasses; the trainer passes its RunConfig's).

`build_model(cfg, **deps)` looks the family up in the registry (`sonar_llm.models.family.get_family`)
and calls its `build(cfg, **deps)`. `model.preset` names a backbone size (sonar_llm.models.presets);
`model.overrides` keys that are BackboneConfig fields change the backbone, the others go to the
family's own config dataclass (unknown keys are named in the error). What each family does with the
data path (embedding width, vocabulary size, normalizer fitting with `fit_normalizer_from_data` on
`normalizer_sample`, Meta's fitting sample) is in its module's `build_from_config`.

`build_trained(weights, decoder="")` rebuilds a trained family from `sonar_llm.checkpoints.TrainedWeights`:
the run config is replayed with the data path cleared (normalizers, width and vocabulary come from the
weights via the family's `trained_overrides`) and the state loaded; fp32, eval mode.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .family import get_family

__all__ = [
    "NORMALIZER_MAX_SAMPLES",
    "NORMALIZER_DOWN_SAMPLE",
    "NORMALIZER_BATCH_SENTENCES",
    "ModelConfig",
    "build_model",
    "build_trained",
    "split_overrides",
    "check_fields",
    "fit_normalizer_from_data",
    "normalizer_sample",
    "dataset_embed_dim",
    "dataset_vocab_size",
]

# Meta's normalizer fitting sample, scripts/fit_embedding_normalizer.py (large_concept_model):
# sample_sentences_from_mixed_sources(max_nb_samples=10**6, down_sample=5) over a loader built with
# DataLoadingConfig(max_tokens=10000, ...)
NORMALIZER_MAX_SAMPLES = 1_000_000
NORMALIZER_DOWN_SAMPLE = 5
NORMALIZER_BATCH_SENTENCES = 10_000


def _section(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"a config section must be a dict or a dataclass, got {type(value).__name__}")


@dataclass
class ModelConfig:
    """What a family is built from (a run's `[model]` table + the paths the build reads)."""

    family: str  # a registry name (sonar_llm.models.family.FAMILIES)
    preset: str = "tiny"  # a named backbone size in sonar_llm.models.presets
    overrides: dict[str, Any] = field(default_factory=dict)  # backbone or family-config fields to change
    sonar_decoder: str = ""  # [sonar].decoder: frozen SONAR decoder file ("" = registry / $SONAR_DECODER)
    data_path: str = ""  # [data].path: training shards (width, vocabulary, normalizer fit); "" = none

    @classmethod
    def from_sections(cls, model: Any, sonar: Any = None, data: Any = None) -> "ModelConfig":
        """From the `[model]`, `[sonar]` and `[data]` sections (dicts or dataclasses)."""
        m, s, d = _section(model), _section(sonar), _section(data)
        if not m.get("family"):
            raise ValueError("model.family: missing")
        return cls(family=str(m["family"]), preset=str(m.get("preset", "tiny")),
                   overrides=dict(m.get("overrides") or {}), sonar_decoder=str(s.get("decoder") or ""),
                   data_path=str(d.get("path") or ""))

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "ModelConfig":
        """From a run's resolved config dict (config.json, or model.json's "run_config")."""
        if not isinstance(run_config.get("model"), Mapping):
            raise ValueError("run config has no [model] table")
        return cls.from_sections(run_config["model"], run_config.get("sonar"), run_config.get("data"))


def build_model(cfg: ModelConfig, **deps: Any) -> nn.Module:
    """The family instance for `cfg` (fp32, on the current default device; the trainer moves and shards it).
    `deps` go to the family's builder (e.g. `decoder=` an already loaded SONAR decoder)."""
    try:
        spec = get_family(cfg.family)
    except ValueError as e:
        raise ValueError(f"model.family: {e}") from None
    return spec.build(cfg, **deps)


def split_overrides(overrides: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(BackboneConfig fields, the rest) of `model.overrides`."""
    from .backbone import BackboneConfig

    names = {f.name for f in dataclasses.fields(BackboneConfig)}
    return ({k: v for k, v in overrides.items() if k in names}, {k: v for k, v in overrides.items() if k not in names})


def check_fields(cls: type, values: Mapping[str, Any], family: str) -> None:
    """ValueError naming the keys of `values` that are not fields of the dataclass `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"model.overrides: unknown key(s) {unknown} for family {family!r} "
                         f"(backbone fields or {cls.__name__} fields: {sorted(names)})")


def preset_of(cfg: ModelConfig):
    """The `Preset` named by `cfg.preset` (ValueError prefixed with `model.preset`)."""
    from .presets import get_preset

    try:
        return get_preset(cfg.preset)
    except ValueError as e:
        raise ValueError(f"model.preset: {e}") from None


def normalizer_sample(data_path: str, max_samples: int = NORMALIZER_MAX_SAMPLES,
                      down_sample: int = NORMALIZER_DOWN_SAMPLE,
                      batch_sentences: int = NORMALIZER_BATCH_SENTENCES) -> torch.Tensor:
    """The embeddings Meta's `scripts/fit_embedding_normalizer.py` fits on, read from our shards [N, E] fp32.

    Its rule (`sample_sentences_from_mixed_sources`): walk the training batches; keep every
    `down_sample`-th sentence embedding of each batch's flattened sentences (`[::down_sample]`, so the
    stride restarts at each batch's first sentence); stop after the batch that brings the kept count
    *above* `max_samples` (that whole batch is kept, so N can exceed `max_samples` by one batch's share).
    A batch here is consecutive whole documents of the training shards, in order, up to `batch_sentences`
    sentences in all (a longer document is a batch of its own): Meta's loader batches with
    `max_tokens=10000`, but its parquet order and exact batch boundaries cannot be reproduced on our shards.
    """
    import numpy as np

    from sonar_llm.data.shards import ShardedDataset

    for name, value in (("max_samples", max_samples), ("down_sample", down_sample),
                        ("batch_sentences", batch_sentences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"normalizer_sample: {name} must be a positive int, got {value!r}")
    ds = ShardedDataset(data_path)
    kept: list[torch.Tensor] = []
    n_kept = 0
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush() -> None:
        nonlocal n_kept, pending, pending_len
        rows = torch.from_numpy(np.concatenate(pending)[::down_sample]).float()
        kept.append(rows)
        n_kept += rows.shape[0]
        pending, pending_len = [], 0

    for i in range(ds.num_docs):
        emb = ds.doc(i)[0]
        n = int(emb.shape[0])
        if pending and pending_len + n > batch_sentences:
            flush()
            if n_kept > max_samples:  # Meta: `if nb_sentences > max_nb_samples: break`
                break
        pending.append(emb.float().numpy())
        pending_len += n
    if pending and n_kept <= max_samples:
        flush()
    if n_kept < 2:
        raise ValueError(f"data.path: {data_path} gives {n_kept} sentence embeddings for the normalizer "
                         f"(every {down_sample}-th of each batch); it needs >= 2")
    return torch.cat(kept)


def fit_normalizer_from_data(norm: nn.Module, data_path: str, options: Any) -> None:
    """Fit `norm` (a SonarNormalizer) as Meta's fitting script does: on `normalizer_sample(data_path,
    options.normalizer_max_samples, options.normalizer_down_sample)` with Meta's percent reading of the
    quantile range (`options.normalizer_true_iqr`: the true interquartile range instead, an option that
    departs from Meta; see docs/lcm.md). `options` is the family's config (BaseLCMConfig, TwoTowerConfig)."""
    sample = normalizer_sample(data_path, options.normalizer_max_samples, options.normalizer_down_sample)
    norm.fit(sample, quantile_quirk=not options.normalizer_true_iqr)


def dataset_embed_dim(data_path: str) -> int:
    """Sentence-embedding width of the training data (1024 for the real SONAR encoder)."""
    from sonar_llm.data.shards import read_manifest

    return int(read_manifest(data_path)["embed_dim"])


def dataset_vocab_size(data_path: str) -> int:
    """Vocabulary size for a token model: the manifest's `vocab_size` if recorded, else max token id + 1."""
    from sonar_llm.data.shards import ShardedDataset, read_manifest

    manifest = read_manifest(data_path)
    for key in ("vocab_size", "tokenizer_vocab_size"):
        if isinstance(manifest.get(key), int):
            return int(manifest[key])
    ds = ShardedDataset(data_path)
    top = 0
    for i in range(ds.num_docs):
        top = max(top, int(torch.as_tensor(ds.doc(i)[1]).max()))
    return top + 1


def build_trained(weights, decoder: str = "", family: str = "", device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the family of `weights` (a `sonar_llm.checkpoints.TrainedWeights`) and load its state.

    `decoder`: the frozen SONAR decoder file for families that need one ("" = the run config's);
    `family`: if given, must match the trained family. Returns the model in fp32, eval mode, on `device`."""
    cfg = ModelConfig.from_run_config(weights.run_config)
    if family and family != cfg.family:
        raise ValueError(f"--family {family!r} does not match the trained family {cfg.family!r} ({weights.source})")
    try:
        spec = get_family(cfg.family)
    except ValueError:
        raise ValueError(f"unknown family {cfg.family!r} in the run config of {weights.source}") from None
    cfg.data_path = ""  # no normalizer fitting / vocabulary scan: the weights hold them
    try:
        implied = spec.trained_overrides(weights.state)
    except ValueError as e:
        raise ValueError(f"{weights.source}: {cfg.family} {e}") from None
    cfg.overrides = {**implied, **cfg.overrides}
    if decoder:
        cfg.sonar_decoder = str(decoder)
    net = spec.build(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in weights.state.items()}
    own = net.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the config builds {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:  # a config that does not describe these weights (another preset, an edited config)
        raise ValueError(f"{weights.source}: the run config does not describe these weights ({cfg.family}): "
                         f"{'; '.join(wrong[:3])}{f'; {len(wrong) - 3} more' if len(wrong) > 3 else ''}")
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("freqs") and "rope" not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{weights.source}: state does not match the {cfg.family} model: missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    net = net.float().to(device).eval()
    net.decoder_to(device, torch.float32)  # frozen modules kept outside the module tree (SONAR-LLM's decoder)
    return net
