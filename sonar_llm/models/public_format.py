"""The public SONAR-LLM checkpoint format (GitHub Pabiya/SONAR-LLM) and its mapping to `SonarLLM`.

The public training script (train_sonarllm_fast.py) saves `torch.save({...})` with
`model_state_dict` (the `SonarLossWrapper`), `optimizer_state_dict`, `scheduler_state_dict`, `epoch`,
`step_in_epoch`, `global_step` and the Python / NumPy / torch / CUDA RNG states. Its model keys
(layout "llama_model", read by generate.py):

    llama_model.model.embed_tokens.weight                      [128256, d]  unused by a concept model: dropped
    llama_model.model.layers.N.input_layernorm.weight          -> backbone.layers.N.self_attn_layer_norm.weight
    llama_model.model.layers.N.self_attn.{q,k,v}_proj.weight   -> backbone.layers.N.self_attn.{q,k,v}_proj.weight
    llama_model.model.layers.N.self_attn.o_proj.weight         -> backbone.layers.N.self_attn.output_proj.weight
    llama_model.model.layers.N.post_attention_layernorm.weight -> backbone.layers.N.ffn_layer_norm.weight
    llama_model.model.layers.N.mlp.gate_proj.weight            -> backbone.layers.N.ffn.gate_proj.weight
    llama_model.model.layers.N.mlp.up_proj.weight              -> backbone.layers.N.ffn.inner_proj.weight
    llama_model.model.layers.N.mlp.down_proj.weight            -> backbone.layers.N.ffn.output_proj.weight
    llama_model.model.layers.N.{self_attn.*,mlp.*}_proj.bias   -> the same names' .bias (attention_bias /
                                                                  mlp_bias = true; the released JSONs: false)
    llama_model.model.norm.weight                              -> backbone.layer_norm.weight
    llama_model.lm_head.weight                                 (tied to embed_tokens): dropped
    forward_proj.linear.{weight,bias}  [d, 1024]               -> input_proj.{weight,bias}
    reverse_proj.linear.{weight,bias}  [1024, d]               -> output_proj.{weight,bias}
    sonar_decoder.model.decoder.<fairseq2 SONAR decoder keys>  the frozen decoder: skipped, or split off

The architecture is the `llama_config` block of SonarLLM_{100M,300M,600M,900M}.json (a HF LlamaConfig:
hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, head_dim, num_key_value_heads,
attention_bias, mlp_bias, rms_norm_eps, rope_theta, rope_scaling) or, without it, inferred from the tensor
shapes (the head width is then the public configs' value: 32 at hidden 512, else 64). Attention width num_heads x head_dim may differ
from hidden_size (600M: 26 x 64 = 1664 vs 1280; 900M: 32 x 64 = 2048 vs 1536).

A second layout appears in the repository's later script gsm8k_zero_shot.py: `llama.*` keys and
projectors made of Linear + LayerNorm (`forward_proj.proj.*`, `forward_proj.ln.*`). `SonarLLM` has plain
Linear projections, so that layout is refused with an error naming it (`LAYOUT_LN_PROJECTORS`).

Reading is safe: the file is loaded with `torch.load(weights_only=True)` plus an allow-list of exactly
the NumPy globals of the pickled NumPy RNG state (`NUMPY_RNG_GLOBALS`); any other global is refused
before anything is unpickled, with an error that names it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .backbone import BackboneConfig

__all__ = [
    "LAYOUT_PUBLIC",
    "LAYOUT_LN_PROJECTORS",
    "NUMPY_RNG_GLOBALS",
    "PublicCheckpoint",
    "read_public_checkpoint",
    "detect_layout",
    "read_public_json",
    "backbone_from_llama_config",
    "llama_config_from_backbone",
    "infer_backbone_config",
    "public_to_ours",
    "ours_to_public",
    "split_sonar_decoder",
    "check_state_matches",
    "PUBLIC_NUMERICS",
]

LAYOUT_PUBLIC = "llama_model (train_sonarllm_fast.py / generate.py)"
LAYOUT_LN_PROJECTORS = "llama + LayerNorm projectors (gsm8k_zero_shot.py)"

# Globals a public checkpoint may reference besides torch's own: the pickled NumPy RNG state
# (np.random.get_state(): ('MT19937', uint32 ndarray[624], pos, has_gauss, cached_gaussian)).
# NumPy >= 2 writes numpy._core.*, NumPy 1.x numpy.core.*.
NUMPY_RNG_GLOBALS = (
    "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.UInt32DType",  # the key's dtype class (its state is restored by BUILD, not by GLOBAL)
)

_PUBLIC_PREFIX = "llama_model.model."
_LAYER_MAP = {  # public name inside layers.N -> ours
    "input_layernorm.weight": "self_attn_layer_norm.weight",
    "self_attn.q_proj.weight": "self_attn.q_proj.weight",
    "self_attn.k_proj.weight": "self_attn.k_proj.weight",
    "self_attn.v_proj.weight": "self_attn.v_proj.weight",
    "self_attn.o_proj.weight": "self_attn.output_proj.weight",
    "post_attention_layernorm.weight": "ffn_layer_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.inner_proj.weight",
    "mlp.down_proj.weight": "ffn.output_proj.weight",
    # biases: a llama_config with attention_bias (q/k/v/o) or mlp_bias (gate/up/down) = true
    "self_attn.q_proj.bias": "self_attn.q_proj.bias",
    "self_attn.k_proj.bias": "self_attn.k_proj.bias",
    "self_attn.v_proj.bias": "self_attn.v_proj.bias",
    "self_attn.o_proj.bias": "self_attn.output_proj.bias",
    "mlp.gate_proj.bias": "ffn.gate_proj.bias",
    "mlp.up_proj.bias": "ffn.inner_proj.bias",
    "mlp.down_proj.bias": "ffn.output_proj.bias",
}
_TOP_MAP = {
    "llama_model.model.norm.weight": "backbone.layer_norm.weight",
    "forward_proj.linear.weight": "input_proj.weight",
    "forward_proj.linear.bias": "input_proj.bias",
    "reverse_proj.linear.weight": "output_proj.weight",
    "reverse_proj.linear.bias": "output_proj.bias",
}
_DROPPED = {
    "llama_model.model.embed_tokens.weight": "the Llama token embedding (a concept model reads SONAR "
                                             "embeddings through forward_proj, never token ids)",
    "llama_model.lm_head.weight": "the Llama token head (tied to embed_tokens; a concept model predicts "
                                  "an embedding through reverse_proj)",
}
_LAYER_RE = re.compile(r"^llama_model\.model\.layers\.(\d+)\.(.+)$")
_OUR_LAYER_RE = re.compile(r"^backbone\.layers\.(\d+)\.(.+)$")
_DECODER_PREFIX = "sonar_decoder."
_DECODER_EMBED = "decoder_frontend.embed.weight"

# The llama3 RoPE scaling constants `Backbone` implements (only `factor` is configurable).
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# The numerics of every public JSON (used when shapes are inferred without one).
PUBLIC_NUMERICS = dict(norm_eps=1e-6, rope_theta=5e5, rope_interleaved=False, rope_scaling="llama3",
                       rope_scaling_factor=32.0, attn_bias=False, output_proj_bias=False, ffn_bias=False,
                       dropout_p=0.0)


# ----------------------------------------------------------------------------------------------------- reading
@dataclass
class PublicCheckpoint:
    """What a public checkpoint file holds, as read without executing pickled code.

    state: the model state dict (`model_state_dict`, or the file itself when it is a bare state dict);
    layout: LAYOUT_PUBLIC or LAYOUT_LN_PROJECTORS; step: `global_step` (None if absent);
    other_entries: the names of the other top-level entries (optimizer, scheduler, RNG states) - read, not used."""

    path: str
    state: dict[str, Tensor]
    layout: str
    step: int | None = None
    epoch: int | None = None
    other_entries: list[str] = field(default_factory=list)


def _safe_globals() -> list:
    """(object, "module.name") pairs for NUMPY_RNG_GLOBALS, as torch.serialization.safe_globals takes them."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core.multiarray import _reconstruct
    objs = {"numpy._core.multiarray._reconstruct": _reconstruct, "numpy.core.multiarray._reconstruct": _reconstruct,
            "numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
            "numpy.dtypes.UInt32DType": type(np.dtype(np.uint32))}
    return [(objs[name], name) for name in NUMPY_RNG_GLOBALS]


def _load_restricted(path: str) -> Any:
    """torch.load with weights_only=True + the NumPy RNG allow-list; anything else -> ValueError naming it."""
    is_zip = zipfile.is_zipfile(path)
    if is_zip:
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception as exc:  # noqa: BLE001 - a corrupt archive
            raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
        refused = sorted(set(found) - set(NUMPY_RNG_GLOBALS))
        if refused:
            raise ValueError(
                f"{path}: refusing to unpickle: the file references {', '.join(refused)}, which is neither a "
                f"tensor/container nor part of a NumPy RNG state (allowed globals: {', '.join(NUMPY_RNG_GLOBALS)}); "
                "nothing was executed")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        if not is_zip:
            raise ValueError(f"{path}: not a PyTorch checkpoint (not a zip archive, and not a legacy torch file "
                             "the safe loader reads); nothing was executed") from exc
        # torch's own text advises weights_only=False: keep only what was refused, never that advice
        what = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(exc))
        raise ValueError(f"{path}: refusing to unpickle ({what.group(0) if what else 'the safe loader refused it'}; "
                         "allowed: tensors, containers, the NumPy RNG state); nothing was executed") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{path}: corrupt or truncated torch checkpoint: {exc}") from exc


def detect_layout(state: dict[str, Tensor], path: str = "checkpoint") -> str:
    """LAYOUT_PUBLIC or LAYOUT_LN_PROJECTORS; ValueError naming the first keys when neither matches."""
    keys = list(state)
    if any(k.startswith("llama_model.") for k in keys):
        return LAYOUT_PUBLIC
    if any(k.startswith("llama.") for k in keys) or any(k.startswith(("forward_proj.ln.", "forward_proj.proj."))
                                                          for k in keys):
        return LAYOUT_LN_PROJECTORS
    raise ValueError(f"{path}: not a public SONAR-LLM state dict: no 'llama_model.*' or 'llama.*' keys "
                     f"(keys start with: {', '.join(sorted(keys)[:5])})")


def read_public_checkpoint(path: str | os.PathLike) -> PublicCheckpoint:
    """Read a public SONAR-LLM checkpoint file safely (see the module docstring)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint: file not found: {path}")
    obj = _load_restricted(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict (with 'model_state_dict'), got {type(obj).__name__}")
    step = epoch = None
    others: list[str] = []
    if isinstance(obj.get("model_state_dict"), dict):
        state = obj["model_state_dict"]
        step, epoch = obj.get("global_step"), obj.get("epoch")
        others = sorted(str(k) for k in obj if k != "model_state_dict")
    elif isinstance(obj.get("model"), dict):  # gsm8k_zero_shot.py also accepts {"model": sd}
        state = obj["model"]
        others = sorted(str(k) for k in obj if k != "model")
    else:
        state = obj
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path}: the model state holds non-tensor entries {bad[:5]}")
    for wrapper in ("module.", "_orig_mod."):  # saved from a DDP / torch.compile wrapper
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper):]: v for k, v in state.items()}
    layout = detect_layout(state, path)
    return PublicCheckpoint(path, dict(state), layout, int(step) if isinstance(step, int) else None,
                            int(epoch) if isinstance(epoch, int) else None, others)


# ----------------------------------------------------------------------------------------------------- configs
def read_public_json(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """(llama_config dict, embed_dim) of a public SonarLLM_*.json."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: file not found: {path}")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("llama_config"), dict):
        raise ValueError(f"{path}: no 'llama_config' block (a public SonarLLM_*.json has one)")
    return dict(cfg["llama_config"]), int(cfg.get("embed_dim", 1024))


def backbone_from_llama_config(llama: dict[str, Any], source: str = "llama_config") -> BackboneConfig:
    """`BackboneConfig` equal in numerics to a HF LlamaConfig dict; ValueError for what `Backbone` lacks."""
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(llama.get(key), int):
            raise ValueError(f"{source}: '{key}' missing or not an int")
    if llama.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {llama['hidden_act']!r} is not supported (SwiGLU uses silu)")
    scaling = llama.get("rope_scaling")
    rope_scaling, factor = None, 8.0
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported (only 'llama3')")
        for k, v in _LLAMA3_FIXED.items():
            if float(scaling.get(k, v)) != float(v):
                raise ValueError(f"{source}: rope_scaling.{k}={scaling[k]} is not supported (Backbone fixes {v})")
        rope_scaling, factor = "llama3", float(scaling["factor"])
    heads = int(llama["num_attention_heads"])
    head_dim = llama.get("head_dim") or llama["hidden_size"] // heads
    bias = bool(llama.get("attention_bias", False))
    return BackboneConfig(
        model_dim=int(llama["hidden_size"]), ffn_dim=int(llama["intermediate_size"]),
        num_layers=int(llama["num_hidden_layers"]), num_heads=heads, head_dim=int(head_dim),
        num_kv_heads=int(llama.get("num_key_value_heads") or heads),
        norm_eps=float(llama.get("rms_norm_eps", 1e-6)), rope_theta=float(llama.get("rope_theta", 1e4)),
        rope_interleaved=False, rope_scaling=rope_scaling, rope_scaling_factor=factor,
        attn_bias=bias, output_proj_bias=bias, ffn_bias=bool(llama.get("mlp_bias", False)), dropout_p=0.0,
    )


def llama_config_from_backbone(cfg: BackboneConfig) -> dict[str, Any]:
    """The `llama_config` block (HF LlamaConfig fields, as in the public JSONs) of a Llama-compatible backbone."""
    if cfg.rope_interleaved:
        raise ValueError("rope_interleaved=True (fairseq2/LCM pairs) has no HF Llama equivalent")
    if cfg.attn_bias != cfg.output_proj_bias:
        raise ValueError("HF Llama has one attention_bias for q/k/v/o; this backbone's attn_bias and "
                         "output_proj_bias differ")
    out: dict[str, Any] = {
        "hidden_size": cfg.model_dim, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02,
        "rms_norm_eps": cfg.norm_eps, "use_cache": True, "pretraining_tp": 1, "tie_word_embeddings": True,
        "rope_theta": cfg.rope_theta, "rope_scaling": None, "attention_bias": cfg.attn_bias,
        "attention_dropout": 0.0, "mlp_bias": cfg.ffn_bias,
    }
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {"factor": cfg.rope_scaling_factor, **_LLAMA3_FIXED, "rope_type": "llama3"}
    return out


def _num_layers(keys, pattern: re.Pattern) -> int:
    idx = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"layer indices are not contiguous: {sorted(idx)}")
    return len(idx)


def infer_backbone_config(state: dict[str, Tensor], head_dim: int | None = None) -> BackboneConfig:
    """Backbone shape from OUR state dict's tensors, with the public numerics. The head width cannot be
    read from shapes (only heads x head_dim can): `head_dim`, else the public configs' value (32 at
    hidden 512, else 64)."""
    try:
        d = int(state["backbone.layer_norm.weight"].shape[0])
        q = state["backbone.layers.0.self_attn.q_proj.weight"]
        k = state["backbone.layers.0.self_attn.k_proj.weight"]
        f = int(state["backbone.layers.0.ffn.gate_proj.weight"].shape[0])
    except KeyError as exc:
        raise ValueError(f"cannot infer the backbone shape: key {exc} missing") from None
    hd = head_dim or (32 if d == 512 else 64)
    if q.shape[0] % hd or k.shape[0] % hd:
        raise ValueError(f"attention widths q={q.shape[0]}, k={k.shape[0]} are not multiples of head_dim={hd}; "
                         "pass the public JSON (--config) or --head-dim")
    biases = {"attn_bias": "backbone.layers.0.self_attn.q_proj.bias" in state,
              "output_proj_bias": "backbone.layers.0.self_attn.output_proj.bias" in state,
              "ffn_bias": "backbone.layers.0.ffn.gate_proj.bias" in state}
    return BackboneConfig(model_dim=d, ffn_dim=f, num_layers=_num_layers(state, _OUR_LAYER_RE),
                          num_heads=int(q.shape[0]) // hd, num_kv_heads=int(k.shape[0]) // hd, head_dim=hd,
                          **{**PUBLIC_NUMERICS, **biases})


# ----------------------------------------------------------------------------------------------------- mapping
def split_sonar_decoder(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], list[str]]:
    """(state without `sonar_decoder.*`, the decoder's fairseq2-named state, sonar_decoder keys outside it).

    The wrapper held an EmbeddingToTextModelPipeline: its decoder keys are
    `sonar_decoder.model.decoder.<fairseq2 key>`; the prefix is found from `decoder_frontend.embed.weight`."""
    dec = {k: v for k, v in state.items() if k.startswith(_DECODER_PREFIX)}
    rest = {k: v for k, v in state.items() if not k.startswith(_DECODER_PREFIX)}
    if not dec:
        return rest, {}, []
    embeds = [k for k in dec if k.endswith(_DECODER_EMBED)]
    if len(embeds) != 1:
        raise ValueError(f"sonar_decoder.* keys hold {len(embeds)} '{_DECODER_EMBED}' entries (expected 1)")
    prefix = embeds[0][: -len(_DECODER_EMBED)]
    inside = {k[len(prefix):]: v for k, v in dec.items() if k.startswith(prefix)}
    outside = sorted(k for k in dec if not k.startswith(prefix))
    return rest, inside, outside


def public_to_ours(state: dict[str, Tensor], path: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """Map a public (LAYOUT_PUBLIC) model state without `sonar_decoder.*` to `SonarLLM` names.

    Returns (our state, notes on what was dropped). The tensors are the same objects (no copy)."""
    layout = detect_layout(state, path)
    if layout != LAYOUT_PUBLIC:
        raise ValueError(
            f"{path}: layout '{layout}' is not supported: its projectors are Linear + LayerNorm "
            "(forward_proj.proj/.ln, reverse_proj.proj/.ln) while SonarLLM's are plain Linear layers, so the "
            "model cannot be represented exactly; only the layout of train_sonarllm_fast.py / generate.py "
            "('llama_model.*', 'forward_proj.linear.*') is imported")
    ours: dict[str, Tensor] = {}
    notes: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key in _DROPPED:
            notes.append(f"dropped {key} {tuple(value.shape)}: {_DROPPED[key]}")
        elif key in _TOP_MAP:
            ours[_TOP_MAP[key]] = value
        elif (m := _LAYER_RE.match(key)) and m.group(2) in _LAYER_MAP:
            ours[f"backbone.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"] = value
        elif key.endswith("rotary_emb.inv_freq"):  # older transformers saved the RoPE table
            notes.append(f"dropped {key}: RoPE frequencies are recomputed from the config")
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: unexpected keys for the public SONAR-LLM layout (modules SonarLLM "
                         f"lacks): {', '.join(sorted(unknown)[:8])}")
    return ours, notes


def ours_to_public(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`SonarLLM` state dict -> the public wrapper's names (LAYOUT_PUBLIC), without the unused token
    embedding / head and without the frozen decoder: the public generate.py loads with strict=False."""
    inverse_top = {v: k for k, v in _TOP_MAP.items()}
    inverse_layer = {v: k for k, v in _LAYER_MAP.items()}
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in inverse_top:
            out[inverse_top[key]] = value
        elif (m := _OUR_LAYER_RE.match(key)) and m.group(2) in inverse_layer:
            out[f"{_PUBLIC_PREFIX}layers.{m.group(1)}.{inverse_layer[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys with no place in the public SONAR-LLM layout: {', '.join(sorted(unknown)[:8])} "
                         "(the public model has no extra modules)")
    return out


def check_state_matches(state: dict[str, Tensor], cfg: BackboneConfig, sonar_dim: int, source: str) -> None:
    """ValueError listing missing / unexpected / wrongly shaped keys of OUR state against `cfg`."""
    d, hd = cfg.model_dim, cfg.head_dim
    expected = {"input_proj.weight": (d, sonar_dim), "input_proj.bias": (d,), "output_proj.weight": (sonar_dim, d),
                "output_proj.bias": (sonar_dim,), "backbone.layer_norm.weight": (d,)}
    for i in range(cfg.num_layers):
        p = f"backbone.layers.{i}."
        expected.update({
            p + "self_attn_layer_norm.weight": (d,), p + "ffn_layer_norm.weight": (d,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * hd, d),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * hd, d),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * hd, d),
            p + "self_attn.output_proj.weight": (d, cfg.num_heads * hd),
            p + "ffn.gate_proj.weight": (cfg.ffn_dim, d), p + "ffn.inner_proj.weight": (cfg.ffn_dim, d),
            p + "ffn.output_proj.weight": (d, cfg.ffn_dim),
        })
        if cfg.attn_bias:
            expected.update({p + "self_attn.q_proj.bias": (cfg.num_heads * hd,),
                             p + "self_attn.k_proj.bias": (cfg.num_kv_heads * hd,),
                             p + "self_attn.v_proj.bias": (cfg.num_kv_heads * hd,)})
        if cfg.output_proj_bias:
            expected[p + "self_attn.output_proj.bias"] = (d,)
        if cfg.ffn_bias:
            expected.update({p + "ffn.gate_proj.bias": (cfg.ffn_dim,), p + "ffn.inner_proj.bias": (cfg.ffn_dim,),
                             p + "ffn.output_proj.bias": (d,)})
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    wrong = sorted(f"{k} {tuple(state[k].shape)} != {v}" for k, v in expected.items()
                   if k in state and tuple(state[k].shape) != v)
    if missing or extra or wrong:
        raise ValueError(f"{source}: the weights do not match the configuration "
                         f"(d={d}, layers={cfg.num_layers}, heads={cfg.num_heads}x{hd}, kv={cfg.num_kv_heads}, "
                         f"ffn={cfg.ffn_dim}): missing {missing[:4]}, unexpected {extra[:4]}, shapes {wrong[:4]}")

