"""Convert SONAR-LLM checkpoints between the public code's format and this project's export format.

    python -m sonar_llm.convert --from public --checkpoint checkpoint_step_16480.pt \\
        [--config SonarLLM_600M.json] --out model.safetensors [--sonar-decoder-out sonar_decoder.pt]
    python -m sonar_llm.convert --to public --model model.safetensors --out checkpoint.pt [--config-out cfg.json]

`--from public` reads a checkpoint of Pabiya/SONAR-LLM's train_sonarllm_fast.py safely (no pickled code
runs; see `sonar_llm.models.public_format`), maps its keys to `SonarLLM`, drops the unused Llama token
embedding and head (and says so), skips the frozen `sonar_decoder.*` (about 3 GB) unless
`--sonar-decoder-out` asks to write it as a fairseq2-layout SONAR decoder checkpoint, and writes what
train/export.py writes: `model.safetensors` and `model.json` = {"run_config": {"model": {"family",
"preset", "overrides"}}, "step", "family", "preset", "dtype", "checkpoint", "files", ...}: the overrides
name every backbone field (the preset is a label), "files" the sha256 and size of each file written (the
weights, and the decoder of `--sonar-decoder-out`), checked by every loader. The architecture comes
from `--config` (a public SonarLLM_*.json) or is inferred from the tensor shapes (`--head-dim` when the
head width is not the public 64 / 32-at-hidden-512). The result is read like any export:
`sonar_llm.checkpoints.read_exported` + `sonar_llm.models.build.build_trained` (what
`python -m sonar_llm.eval.evaluate --model model.safetensors ...` and generation use).

`--to public` turns such an export (ours, or one from train/export.py) into a public-format file:
{"model_state_dict", "global_step", "epoch", "step_in_epoch"} plus the public JSON config (`--config-out`,
default: the output path with suffix .json), which the public generate.py reads (`--config`,
`--checkpoint`; it loads with strict=False, so the absent token embedding / head / decoder stay as it
builds them; the public script's own resume, `load_full_checkpoint`, loads strictly with optimizer state
and cannot read it). Both directions keep every tensor bit-exact.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sonar_llm.checkpoints import TrainedWeights
from sonar_llm.models import public_format as pf
from sonar_llm.models.backbone import BackboneConfig

__all__ = [
    "ImportReport",
    "import_public",
    "export_public",
    "write_model_file",
    "read_model_file",
    "run_config_for",
    "main",
]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


# ------------------------------------------------------------------------------------- our export format
def run_config_for(cfg: BackboneConfig, sonar_dim: int = 1024) -> dict[str, Any]:
    """A run config ({"model": {"family": "sonar_llm", "preset", "overrides"}}) that rebuilds exactly `cfg`.

    The overrides hold EVERY backbone field, so the rebuild never depends on a preset's defaults (a preset
    leaves head_dim and num_kv_heads to be derived from model_dim and num_heads; a shape described as
    "nearest preset + the fields that differ" loses a head_dim that equals the preset's derived one but
    not the new model_dim's). The preset is only a label: the one whose backbone differs in the fewest
    fields."""
    from sonar_llm.models.presets import PRESETS, backbone_config

    mine = dataclasses.asdict(cfg)

    def distance(name: str) -> int:
        base = dataclasses.asdict(backbone_config(name))
        return sum(base[k] != v for k, v in mine.items())

    preset = min(PRESETS, key=distance)
    overrides: dict[str, Any] = dict(mine)
    if sonar_dim != 1024:
        overrides["sonar_dim"] = sonar_dim
    rebuilt = backbone_config(preset, **mine)
    if rebuilt != cfg:  # pragma: no cover - every field is explicit, so only a BackboneConfig bug lands here
        raise AssertionError(f"run config does not rebuild the backbone: {rebuilt} != {cfg}")
    return {"model": {"family": "sonar_llm", "preset": preset, "overrides": overrides}}


def write_model_file(state: dict[str, Tensor], cfg: BackboneConfig, out: str | os.PathLike,
                     info: dict[str, Any], sonar_dim: int = 1024,
                     other_files: dict[str, str | os.PathLike] | None = None) -> Path:
    """`out` (safetensors) + `out`.json in train/export.py's format, with the sha256 and size of `out` and of
    `other_files` ({role: path}, already written); returns the safetensors path."""
    from sonar_llm.checkpoints import write_exported

    pf.check_state_matches(state, cfg, sonar_dim, str(out))
    run_cfg = run_config_for(cfg, sonar_dim)
    model = run_cfg["model"]
    full = {"run_config": run_cfg, "step": info.get("step"), "family": "sonar_llm", "preset": model["preset"],
            "dtype": info.get("dtype", "as trained"), **{k: v for k, v in info.items() if k not in ("step", "dtype")}}
    meta = {"family": "sonar_llm", "preset": str(model["preset"]), "step": str(full["step"])}
    return write_exported(state, out, full, metadata=meta, other_files=other_files)


def read_model_file(path: str | os.PathLike, verify: bool = True,
                    ) -> tuple[dict[str, Tensor], BackboneConfig, int, TrainedWeights]:
    """(state, backbone config, sonar_dim, the export as `sonar_llm.checkpoints.read_exported` reads it) of a
    SONAR-LLM export (ours or train/export.py's): the backbone is the run config's preset + backbone overrides.
    `verify`: check the file's sha256 against model.json first (see `read_exported`)."""
    from sonar_llm.checkpoints import read_exported
    from sonar_llm.models.build import ModelConfig, preset_of, split_overrides
    from sonar_llm.models.presets import backbone_config

    weights = read_exported(path, verify=verify)
    cfg = ModelConfig.from_run_config(weights.run_config)
    from sonar_llm.models.family import get_family
    from sonar_llm.models.sonar_llm import SonarLLM

    if not issubclass(get_family(cfg.family).model_cls, SonarLLM):
        raise ValueError(f"{path}: family {cfg.family!r} has no public format (only SONAR-LLM's exists)")
    backbone_overrides, _ = split_overrides(cfg.overrides)
    try:
        backbone = backbone_config(preset_of(cfg), **backbone_overrides)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: cannot rebuild the backbone from its run config: {exc}") from exc
    if "input_proj.weight" not in weights.state:
        raise ValueError(f"{path}: no 'input_proj.weight': not a SONAR-LLM state dict")
    sonar_dim = int(weights.state["input_proj.weight"].shape[1])
    return weights.state, backbone, sonar_dim, weights


# ------------------------------------------------------------------------------------- the two directions
@dataclass
class ImportReport:
    """What `import_public` did."""

    out: Path
    layout: str
    backbone: BackboneConfig
    config_source: str
    step: int | None
    notes: list[str] = field(default_factory=list)
    sonar_decoder_out: Path | None = None


def _write_sonar_decoder(dec_state: dict[str, Tensor], out: Path) -> None:
    """The wrapped SONAR decoder as a fairseq2-layout checkpoint {"model": sd} (validated first)."""
    from sonar_llm.sonar.checkpoint import infer_config

    infer_config(dec_state, "decoder")  # raises if the keys are not a SONAR decoder's
    payload = {"model": {k: v.contiguous() for k, v in dec_state.items()}}
    _atomic(out, lambda tmp: torch.save(payload, tmp))


def import_public(checkpoint: str | os.PathLike, out: str | os.PathLike, config: str | os.PathLike | None = None,
                  head_dim: int | None = None, sonar_decoder_out: str | os.PathLike | None = None,
                  dtype: str | None = None) -> ImportReport:
    """Public checkpoint -> `out` (.safetensors) + `out`.json (see the module docstring)."""
    ck = pf.read_public_checkpoint(checkpoint)
    state, dec_state, dec_outside = pf.split_sonar_decoder(ck.state)
    ours, notes = pf.public_to_ours(state, ck.path)
    sonar_dim = int(ours["input_proj.weight"].shape[1]) if "input_proj.weight" in ours else 1024
    if config is not None:
        llama, embed_dim = pf.read_public_json(config)
        cfg = pf.backbone_from_llama_config(llama, str(config))
        if embed_dim != sonar_dim:
            raise ValueError(f"{config}: embed_dim {embed_dim} but forward_proj reads {sonar_dim}-d embeddings")
        source = str(config)
    else:
        cfg = pf.infer_backbone_config(ours, head_dim)
        source = (f"inferred from tensor shapes (head_dim {cfg.head_dim}; numerics of the public JSONs: RMSNorm eps "
                  f"1e-6, RoPE theta 5e5, llama3 scaling factor 32)")
    if dtype is not None:
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        ours = {k: v.to(_DTYPES[dtype]) for k, v in ours.items()}
    dec_path = None
    if dec_state:
        if sonar_decoder_out is not None:
            dec_path = Path(sonar_decoder_out)
            _write_sonar_decoder(dec_state, dec_path)
            notes.append(f"wrote the frozen SONAR decoder ({len(dec_state)} tensors) to {dec_path}")
        else:
            notes.append(f"skipped the frozen SONAR decoder ({len(dec_state)} sonar_decoder.* tensors; "
                         "--sonar-decoder-out writes it)")
        if dec_outside:
            notes.append(f"ignored sonar_decoder.* keys outside the decoder: {dec_outside[:4]}")
    elif sonar_decoder_out is not None:
        raise ValueError(f"{ck.path}: --sonar-decoder-out given but the checkpoint holds no sonar_decoder.* keys")
    if ck.other_entries:
        notes.append(f"not imported (training state): {', '.join(ck.other_entries)}")
    info = {"step": ck.step, "dtype": dtype or "as stored", "checkpoint": ck.path,
            "source": f"public SONAR-LLM checkpoint, layout {ck.layout}", "config_source": source, "notes": notes}
    path = write_model_file(ours, cfg, out, info, sonar_dim,
                            other_files={"sonar_decoder": dec_path} if dec_path is not None else None)
    return ImportReport(path, ck.layout, cfg, source, ck.step, notes, dec_path)


def export_public(model: str | os.PathLike, out: str | os.PathLike, config_out: str | os.PathLike | None = None,
                  verify: bool = True) -> tuple[Path, Path]:
    """Export (`model` .safetensors + .json) -> public-format `out` + its public JSON config. `verify`: check
    `model` against the sha256 in its model.json before reading it."""
    state, cfg, sonar_dim, weights = read_model_file(model, verify=verify)
    pf.check_state_matches(state, cfg, sonar_dim, str(model))
    public = pf.ours_to_public(state)
    llama = pf.llama_config_from_backbone(cfg)
    step = weights.step
    payload = {"model_state_dict": public, "global_step": int(step) if isinstance(step, int) else 0,
               "epoch": 0, "step_in_epoch": 0}
    out = Path(out)
    cfg_path = Path(config_out) if config_out else out.with_suffix(".json")
    if cfg_path.resolve() == Path(model).with_suffix(".json").resolve():
        raise ValueError(f"--config-out {cfg_path} would overwrite the input's model.json")
    _atomic(out, lambda tmp: torch.save(payload, tmp))
    public_json = {"pretrained_model_name_or_path": "meta-llama/Llama-3.2-1B", "llama_config": llama,
                   "embed_dim": sonar_dim}
    cfg_path.write_text(json.dumps(public_json, indent=4))
    return out, cfg_path


# ------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """The command; exit 0, 2 on bad input (one line on stderr), 1 when the work fails (sonar_llm.cli)."""
    from sonar_llm.cli import run

    return run("convert", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import check_output_path, int_at_least, parser

    p = parser("python -m sonar_llm.convert", description=__doc__.split("\n\n")[0])
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="src", choices=["public"], help="import a public checkpoint")
    way.add_argument("--to", dest="dst", choices=["public"], help="export to the public format")
    p.add_argument("--checkpoint", help="--from public: the public .pt file")
    p.add_argument("--config", help="--from public: the public SonarLLM_*.json (optional: shapes are inferred)")
    p.add_argument("--head-dim", type=int_at_least(1), default=None,
                   help="--from public without --config: the head width")
    p.add_argument("--sonar-decoder-out", help="--from public: also write the frozen SONAR decoder here (fairseq2 layout)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="--from public: cast the weights")
    p.add_argument("--model", help="--to public: an exported .safetensors (with its .json)")
    p.add_argument("--config-out", help="--to public: where to write the public JSON (default: OUT with .json)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="--to public: skip the sha256 check of --model against its model.json")
    p.add_argument("--out", required=True, help="output file")
    args = p.parse_args(argv)
    for flag, value in (("--out", args.out), ("--sonar-decoder-out", args.sonar_decoder_out),
                        ("--config-out", args.config_out)):
        if value:
            check_output_path(value, flag)
    if args.src == "public":
        if not args.checkpoint:
            p.error("--from public needs --checkpoint")
        if args.config:  # a bad --config is said before the checkpoint (gigabytes) is read
            pf.backbone_from_llama_config(pf.read_public_json(args.config)[0], args.config)
        rep = import_public(args.checkpoint, args.out, args.config, args.head_dim, args.sonar_decoder_out,
                            args.dtype)
        b = rep.backbone
        print(f"imported {args.checkpoint} (layout {rep.layout}, step {rep.step})")
        print(f"  backbone: d={b.model_dim} ffn={b.ffn_dim} layers={b.num_layers} heads={b.num_heads}x{b.head_dim} "
              f"kv={b.num_kv_heads} ({rep.config_source})")
        for note in rep.notes:
            print(f"  {note}")
        print(f"wrote {rep.out} and {rep.out.with_suffix('.json')}")
    else:
        if not args.model:
            p.error("--to public needs --model")
        out, cfg_path = export_public(args.model, args.out, args.config_out, verify=args.verify)
        print(f"wrote {out} (public SONAR-LLM format) and {cfg_path} (its config, for generate.py --config)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
