"""Named model sizes (the paper's 39M ... 1.3B, the LCM's 1.6B, tiny CPU sizes) and parameter counting.

Shapes for "100M", "300M", "600M" and "900M" are the public SONAR-LLM JSON configs
(Pabiya/SONAR-LLM, SonarLLM_{100M,300M,600M,900M}.json): hidden / ffn / layers / heads / head_dim =
512/2048/8/16/32, 1024/4096/10/16/64, 1280/5120/16/26/64, 1536/6144/17/32/64. The head width is fixed
(64, or 32 at 100M), so the attention width num_heads*head_dim may differ from hidden (600M: 1664,
900M: 2048). The training script's built-in default (1024/4096/10/16), which some notes call "600M",
is the 300M JSON's shape. "39M" and "1.3B" have no public config; they are Llama-style shapes chosen
so that the public naming convention gives those numbers: 256/1024/6/4 (head 64) and
2048/8192/16/32 (head 64, the Llama-3.2-1B trunk without GQA).

The public names count a full LlamaForCausalLM: a tied 128,256-token embedding that a concept model
never uses plus the trunk, and not the two SONAR projections. So the names overstate the concept
model: `count_parameters(name, with_io=False)` is the trunk alone, `with_io=True` adds the
Linear(1024->d) and Linear(d->1024) projections (what SONAR-LLM really trains), and
`public_name_count(name)` reproduces the naming convention.

`python -m sonar_llm.models.presets` prints every preset's counts.
"""
from __future__ import annotations

import argparse
import functools
from dataclasses import asdict, dataclass, replace

import torch

from .backbone import Backbone, BackboneConfig

__all__ = [
    "Preset",
    "PRESETS",
    "LLAMA_NUMERICS",
    "LCM_NUMERICS",
    "SONAR_DIM",
    "PUBLIC_TOKEN_VOCAB",
    "get_preset",
    "backbone_config",
    "count_parameters",
    "count_parameters_closed_form",
    "public_name_count",
    "main",
]

SONAR_DIM = 1024
PUBLIC_TOKEN_VOCAB = 128_256  # the Llama-3 tokenizer vocabulary of the public code's unused embedding

# Numerics of the public SONAR-LLM backbone (HF LlamaConfig in the JSONs).
LLAMA_NUMERICS = dict(
    norm_eps=1e-6,
    rope_theta=5e5,
    rope_interleaved=False,
    rope_scaling="llama3",
    rope_scaling_factor=32.0,
    attn_bias=False,
    output_proj_bias=False,
    ffn_bias=False,
    dropout_p=0.0,
)
# Numerics of the LCM (fairseq2) backbone: biases everywhere, interleaved RoPE at theta 1e4, dropout 0.1.
LCM_NUMERICS = dict(
    norm_eps=1e-5,
    rope_theta=1e4,
    rope_interleaved=True,
    rope_scaling=None,
    attn_bias=True,
    output_proj_bias=True,
    ffn_bias=True,
    dropout_p=0.1,
)
NUMERICS = {"llama": LLAMA_NUMERICS, "lcm": LCM_NUMERICS}


@dataclass(frozen=True)
class Preset:
    """Backbone shape of a named size and where the shape comes from."""

    name: str
    model_dim: int
    ffn_dim: int
    num_layers: int
    num_heads: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    numerics: str = "llama"
    source: str = "chosen"


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 64, 128, 2, 4, source="CPU tests"),
        Preset("small", 256, 1024, 4, 4, source="CPU experiments"),
        Preset("39M", 256, 1024, 6, 4, head_dim=64, source="chosen (Llama-style; no public config)"),
        Preset("100M", 512, 2048, 8, 16, head_dim=32, source="Pabiya/SONAR-LLM SonarLLM_100M.json"),
        Preset("300M", 1024, 4096, 10, 16, head_dim=64, source="Pabiya/SONAR-LLM SonarLLM_300M.json"),
        Preset("600M", 1280, 5120, 16, 26, head_dim=64, source="Pabiya/SONAR-LLM SonarLLM_600M.json"),
        Preset("900M", 1536, 6144, 17, 32, head_dim=64, source="Pabiya/SONAR-LLM SonarLLM_900M.json"),
        Preset("1.3B", 2048, 8192, 16, 32, head_dim=64, source="chosen (Llama-3.2-1B trunk, no GQA)"),
        Preset("lcm_1.6B", 2048, 5632, 32, 16, numerics="lcm", source="LCM base_lcm_1_6B"),
    )
}


def get_preset(name: str | Preset) -> Preset:
    """The preset called `name` (a `Preset` passes through)."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def backbone_config(preset: str | Preset, numerics: str | None = None, **overrides) -> BackboneConfig:
    """`BackboneConfig` for a preset: its shape, the numerics set ("llama" = public SONAR-LLM,
    "lcm" = fairseq2 LCM; default: the preset's own), then any field overrides."""
    p = get_preset(preset)
    numerics = numerics or p.numerics
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be one of {sorted(NUMERICS)}, got {numerics!r}")
    fields = dict(
        model_dim=p.model_dim,
        ffn_dim=p.ffn_dim,
        num_layers=p.num_layers,
        num_heads=p.num_heads,
        head_dim=p.head_dim,
        num_kv_heads=p.num_kv_heads,
    )
    fields.update(NUMERICS[numerics])
    fields.update(overrides)
    return BackboneConfig(**fields)


def count_parameters_closed_form(cfg: BackboneConfig, with_io: bool = True, io_dim: int = SONAR_DIM) -> int:
    """Parameter count from the shapes alone (the formula `count_parameters` is checked against)."""
    d, f = cfg.model_dim, cfg.ffn_dim
    q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    attn = d * (q_width + 2 * kv_width) + q_width * d
    attn += (q_width + 2 * kv_width) * cfg.attn_bias + d * cfg.output_proj_bias
    ffn = 3 * d * f + (2 * f + d) * cfg.ffn_bias
    total = cfg.num_layers * (2 * d + attn + ffn) + d
    if with_io:
        total += (io_dim * d + d) + (d * io_dim + io_dim)
    return total


def _meta_backbone_count(cfg: BackboneConfig) -> int:
    return _meta_count_cached(tuple(sorted(asdict(cfg).items())))


@functools.lru_cache(maxsize=64)
def _meta_count_cached(fields: tuple) -> int:
    # The first meta-device construction in a process is slow (torch imports its reference ops).
    with torch.device("meta"):
        model = Backbone(BackboneConfig(**dict(fields)))
    return sum(p.numel() for p in model.parameters())


def count_parameters(
    preset: str | Preset | BackboneConfig, with_io: bool = True, io_dim: int = SONAR_DIM, **overrides
) -> int:
    """Real parameter count of a concept model of this size: the backbone built on the meta device
    (no memory), plus Linear(io_dim->d) and Linear(d->io_dim) with biases when `with_io`."""
    cfg = preset if isinstance(preset, BackboneConfig) else backbone_config(preset, **overrides)
    total = _meta_backbone_count(replace(cfg, dropout_p=0.0))
    if with_io:
        total += (io_dim * cfg.model_dim + cfg.model_dim) + (cfg.model_dim * io_dim + io_dim)
    return total


def public_name_count(preset: str | Preset, vocab: int = PUBLIC_TOKEN_VOCAB) -> int:
    """What the public code's size names count: a tied vocab x d token embedding + the trunk
    (no SONAR projections)."""
    cfg = backbone_config(preset)
    return vocab * cfg.model_dim + count_parameters(cfg, with_io=False)


def _fmt(n: int) -> str:
    return f"{n / 1e6:10.2f}M"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--io-dim", type=int, default=SONAR_DIM, help="SONAR embedding width")
    args = parser.parse_args(argv)
    header = f"{'preset':>9} {'shape d/ffn/L/H/hd':>22} {'trunk':>11} {'trunk+io':>11} {'public name':>11}  source"
    print(header)
    print("-" * len(header))
    for name, p in PRESETS.items():
        cfg = backbone_config(p)
        shape = f"{cfg.model_dim}/{cfg.ffn_dim}/{cfg.num_layers}/{cfg.num_heads}/{cfg.head_dim}"
        print(
            f"{name:>9} {shape:>22} {_fmt(count_parameters(cfg, False, args.io_dim))} "
            f"{_fmt(count_parameters(cfg, True, args.io_dim))} {_fmt(public_name_count(p))}  {p.source}"
        )
    print(
        "trunk = backbone only; trunk+io = with the SONAR Linear(1024->d)/Linear(d->1024) projections "
        "(the trained SONAR-LLM);\npublic name = trunk + an unused tied 128,256-token embedding, the "
        "convention behind the public size names."
    )


if __name__ == "__main__":
    main()
