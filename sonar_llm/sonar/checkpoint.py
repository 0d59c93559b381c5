"""Load and save SONAR text-model checkpoints (fairseq2 ``{"model": state_dict}`` pickles or safetensors).

Loading never needs twice the model's RAM: the file is memory-mapped (``torch.load(mmap=True,
weights_only=True)`` / safetensors), the model is built on the meta device, and the tensors are assigned
(``load_state_dict(strict=True, assign=True)``). ``final_proj.weight`` is re-tied to the decoder embedding
(and checked equal when the file stores it). Without a config, the architecture is read from the
``sonar_llm_config`` entry written by :func:`save_fairseq2_checkpoint`, or inferred from tensor shapes
(head dimension 64, as in SONAR).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import tempfile
import zipfile
from typing import Any

import torch
from torch import Tensor, nn

from sonar_llm.cli import shareable

from .config import SonarDecoderConfig, SonarEncoderConfig
from .decoder import SonarTextDecoder
from .encoder import SonarTextEncoder
from .layers import SinusoidalPositions

__all__ = [
    "load_state_dict_file",
    "load_sonar_encoder",
    "load_sonar_decoder",
    "save_fairseq2_checkpoint",
    "convert_to_safetensors",
    "convert_from_safetensors",
    "infer_config",
    "resolve_dtype",
    "DTYPES",
]

CONFIG_KEY = "sonar_llm_config"
_ENC_EMBED = "encoder_frontend.embed.weight"
_DEC_EMBED = "decoder_frontend.embed.weight"
# The one dtype table of the project: the names configs and command lines accept (train.precision,
# export --dtype, benchmarks); `resolve_dtype` also takes the long names and fp64.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPES = {
    **DTYPES, "fp64": torch.float64,
    "float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "float64": torch.float64,
}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None, a floating torch.dtype or a name like "bf16" -> torch.dtype (TypeError/ValueError otherwise)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, a name or None, got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    return dtype


def _file_kind(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head[:1] == b"\x80":
        return "torch_legacy"
    if len(head) >= 9:
        n = int.from_bytes(head[:8], "little")
        if 0 < n < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _read(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path is not a file: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint file is empty: {path}")
    kind = _file_kind(path)
    meta_cfg = None
    if kind == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path)
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"corrupt or truncated safetensors checkpoint {path}: {exc}") from exc
        if CONFIG_KEY in meta:
            meta_cfg = json.loads(meta[CONFIG_KEY])
    elif kind in ("torch_zip", "torch_legacy"):
        if kind == "torch_zip":
            try:
                with zipfile.ZipFile(path) as zf:
                    zf.infolist()
            except zipfile.BadZipFile as exc:
                raise ValueError(f"corrupt or truncated checkpoint {path}: {exc}") from exc
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=(kind == "torch_zip"))
        except pickle.UnpicklingError as exc:
            raise ValueError(
                f"checkpoint {path} holds objects other than tensors/containers (weights_only load refused): {exc}"
            ) from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise ValueError(f"corrupt or truncated checkpoint {path}: {exc}") from exc
    else:
        raise ValueError(f"{path} is not a torch checkpoint or safetensors file")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        if isinstance(obj.get(CONFIG_KEY), dict):
            meta_cfg = obj[CONFIG_KEY]
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{path} is not a state dict: non-tensor entries {bad[:5]}")
    return obj, meta_cfg


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state dict from a ``{"model": sd}`` or bare-sd torch file, or a safetensors file."""
    return _read(path)[0]


def _num_layers(sd: dict[str, Tensor], prefix: str) -> int:
    idx = set()
    for k in sd:
        if k.startswith(prefix):
            idx.add(int(k[len(prefix):].split(".", 1)[0]))
    if not idx:
        return 0
    return max(idx) + 1


def infer_config(sd: dict[str, Tensor], kind: str, meta: dict[str, Any] | None = None,
                 **overrides: Any) -> SonarEncoderConfig | SonarDecoderConfig:
    """Config of an ``encoder``/``decoder`` state dict (stored metadata first, else tensor shapes)."""
    cls = SonarEncoderConfig if kind == "encoder" else SonarDecoderConfig
    if meta is not None and meta.get("kind") == kind:
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in meta.items() if k in known}  # tolerate fields from other versions
        return cls(**{**fields, **overrides})
    embed = sd[_ENC_EMBED if kind == "encoder" else _DEC_EMBED]
    prefix = "encoder.layers." if kind == "encoder" else "decoder.layers."
    vocab, dim = embed.shape
    fields = dict(vocab_size=int(vocab), model_dim=int(dim), num_layers=_num_layers(sd, prefix))
    ffn_key = f"{prefix}0.ffn.inner_proj.weight"
    if ffn_key in sd:
        fields["ffn_dim"] = int(sd[ffn_key].shape[0])
    fields["num_heads"] = max(1, int(dim) // 64)
    if kind == "decoder":
        kv_key = f"{prefix}0.encoder_decoder_attn.k_proj.weight"
        if kv_key in sd:
            fields["encoder_dim"] = int(sd[kv_key].shape[1])
    fields.update(overrides)
    if fields["num_layers"] < 1:
        raise ValueError(f"no '{prefix}N.*' keys found: cannot infer the number of layers")
    return cls(**fields)


def _check_architecture(model: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(sd) if tuple(sd[k].shape) != expected[k]
    )
    if missing or unexpected or mismatched:
        def fmt(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {fmt(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {fmt(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {fmt(mismatched)}")
        raise ValueError(f"{what} does not match the model architecture; " + "; ".join(parts))


def _resolve_cfg(cfg_or_preset, cls):
    if cfg_or_preset is None or isinstance(cfg_or_preset, cls):
        return cfg_or_preset
    if isinstance(cfg_or_preset, str):
        return cls.from_preset(cfg_or_preset)
    raise TypeError(f"cfg_or_preset must be a {cls.__name__}, a preset name or None, "
                    f"got {type(cfg_or_preset).__name__}")


def _materialize(model: nn.Module, sd: dict[str, Tensor], dtype: torch.dtype | None, device) -> None:
    converted: dict[str, Tensor] = {}
    done: dict[int, Tensor] = {}  # convert a shared tensor (tied embedding) once
    for k, v in sd.items():
        if id(v) in done:
            converted[k] = done[id(v)]
            continue
        out = v
        if out.is_floating_point() and dtype is not None and out.dtype != dtype:
            out = out.to(dtype)
        if out.device != torch.device(device):
            out = out.to(device)
        done[id(v)] = converted[k] = out
    model.load_state_dict(converted, strict=True, assign=True)
    for m in model.modules():
        if isinstance(m, SinusoidalPositions):
            m.reset_buffers(torch.device(device))


def embed_key_of(kind: str) -> str:
    return _ENC_EMBED if kind == "encoder" else _DEC_EMBED


def _load(kind: str, path, cfg_or_preset, dtype, device):
    is_enc = kind == "encoder"
    cls = SonarEncoderConfig if is_enc else SonarDecoderConfig
    dtype = resolve_dtype(dtype)
    cfg = _resolve_cfg(cfg_or_preset, cls)
    sd, meta = _read(path)
    if isinstance(cfg_or_preset, str) and embed_key_of(kind) in sd:
        # a preset name fixes the architecture; the vocabulary size comes from the file
        cfg = cls.from_preset(cfg_or_preset, vocab_size=int(sd[embed_key_of(kind)].shape[0]))
    embed_key, other_key = (_ENC_EMBED, _DEC_EMBED) if is_enc else (_DEC_EMBED, _ENC_EMBED)
    if embed_key not in sd:
        hint = f" (it looks like {'a decoder' if is_enc else 'an encoder'} checkpoint)" if other_key in sd else ""
        sample = ", ".join(sorted(sd)[:5])
        raise ValueError(f"{os.fspath(path)} is not a SONAR text {kind} checkpoint: no '{embed_key}'{hint}; "
                         f"keys start with: {sample}")
    sd = dict(sd)
    if not is_enc:
        fp = sd.get("final_proj.weight")
        emb = sd[embed_key]
        if fp is not None and fp is not emb and not (
            fp.shape == emb.shape and (fp.data_ptr() == emb.data_ptr() or torch.equal(fp, emb))
        ):
            raise ValueError(f"{os.fspath(path)}: final_proj.weight differs from {embed_key}; "
                             "the SONAR decoder projection must be tied to the embedding")
        sd["final_proj.weight"] = emb
    if cfg is None:
        cfg = infer_config(sd, kind, meta)
    with torch.device("meta"):
        model = SonarTextEncoder(cfg) if is_enc else SonarTextDecoder(cfg)
    _check_architecture(model, sd, f"checkpoint {os.fspath(path)}")
    _materialize(model, sd, dtype, device)
    if not is_enc:
        model.tie_weights()
    return model.eval()


def load_sonar_encoder(path: str | os.PathLike, cfg_or_preset: SonarEncoderConfig | str | None = None,
                       dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
                       ) -> SonarTextEncoder:
    """Load a SONAR text encoder (eval mode). ``cfg_or_preset``: a config, a preset name (its vocabulary
    size is then read from the file) or None (stored config, else inferred). ``dtype`` None keeps the
    file's dtype."""
    return _load("encoder", path, cfg_or_preset, dtype, device)


def load_sonar_decoder(path: str | os.PathLike, cfg_or_preset: SonarDecoderConfig | str | None = None,
                       dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
                       ) -> SonarTextDecoder:
    """Load a SONAR text decoder (eval mode), with ``final_proj`` tied to the embedding."""
    return _load("decoder", path, cfg_or_preset, dtype, device)


def _model_meta(model: nn.Module) -> dict[str, Any] | None:
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, SonarEncoderConfig):
        return {"kind": "encoder", **cfg.to_dict()}
    if isinstance(cfg, SonarDecoderConfig):
        return {"kind": "decoder", **cfg.to_dict()}
    return None


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    os.close(fd)
    try:
        write(tmp)
        shareable(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_fairseq2_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``{"model": state_dict, "sonar_llm_config": {...}}`` with torch.save, atomically."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload: dict[str, Any] = {"model": sd}
    meta = _model_meta(model)
    if meta is not None:
        payload[CONFIG_KEY] = meta
    _atomic_write(os.fspath(path), lambda tmp: torch.save(payload, tmp))


def convert_to_safetensors(pt_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """fairseq2 .pt -> .safetensors (the tied ``final_proj.weight`` is stored once, as the embedding)."""
    from safetensors.torch import save_file

    sd, meta = _read(pt_path)
    sd = dict(sd)
    if _DEC_EMBED in sd and "final_proj.weight" in sd:
        fp, emb = sd["final_proj.weight"], sd[_DEC_EMBED]
        if fp.shape != emb.shape or not (fp.data_ptr() == emb.data_ptr() or torch.equal(fp, emb)):
            raise ValueError(f"{os.fspath(pt_path)}: final_proj.weight differs from {_DEC_EMBED}")
        del sd["final_proj.weight"]
    sd = {k: v.contiguous() for k, v in sd.items()}
    metadata = {"format": "pt"}
    if meta is not None:
        metadata[CONFIG_KEY] = json.dumps(meta)
    _atomic_write(os.fspath(out_path), lambda tmp: save_file(sd, tmp, metadata=metadata))


def convert_from_safetensors(st_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """.safetensors -> fairseq2 ``{"model": sd}`` .pt (``final_proj.weight`` restored as the tied embedding)."""
    sd, meta = _read(st_path)
    sd = dict(sd)
    if _DEC_EMBED in sd and "final_proj.weight" not in sd:
        sd["final_proj.weight"] = sd[_DEC_EMBED]
    payload: dict[str, Any] = {"model": sd}
    if meta is not None:
        payload[CONFIG_KEY] = meta
    _atomic_write(os.fspath(out_path), lambda tmp: torch.save(payload, tmp))
