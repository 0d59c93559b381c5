"""Consolidate a DCP training checkpoint into one safetensors file (+ a JSON config) for generation/eval.

    python train/export.py --run RUN_DIR [--step N] --out model.safetensors [--dtype fp32|bf16|fp16]

Only the model's trainable state is in a checkpoint (the frozen SONAR decoder is loaded from its own file
at generation time). Works without the model code and without a process group: tensor shapes and dtypes
come from the checkpoint's metadata. Writes `model.safetensors` and `model.json` = {"run_config": the run's
resolved config, "step": N, "family", "preset", "dtype"}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.metadata import TensorStorageMetadata  # noqa: E402

from train import checkpoint as ckpt  # noqa: E402

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def find_checkpoint(run_dir: str | os.PathLike, step: int | None = None) -> Path:
    root = Path(run_dir) / "checkpoints"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"--run: run directory not found: {run_dir}")
    if step is None:
        found = ckpt.latest_checkpoint(root)
        if found is None:
            raise FileNotFoundError(f"--run: no complete checkpoint under {root}")
        return found
    path = root / ckpt.step_dir_name(step)
    if not (path / "COMPLETE").is_file():
        raise FileNotFoundError(f"--step: no complete checkpoint for step {step} at {path} "
                                f"(available: {ckpt.complete_steps(root)})")
    return path


def load_model_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a DCP checkpoint directory, on the CPU."""
    reader = dcp.FileSystemReader(str(path))
    meta = reader.read_metadata()
    state = {key: torch.empty(md.size, dtype=md.properties.dtype)
             for key, md in meta.state_dict_metadata.items()
             if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{path}: checkpoint holds no model tensors")
    with ckpt._quiet_single_process():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {key[len("model."):]: t for key, t in state.items()}


def export(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
           dtype: str | None = None) -> Path:
    """Write `out` (safetensors) and `out` with suffix .json; returns the safetensors path."""
    from safetensors.torch import save_file

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    path = find_checkpoint(run_dir, step)
    state = load_model_state(path)
    if dtype is not None:
        state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    cfg_file = Path(run_dir) / "config.json"
    run_cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    model_cfg = run_cfg.get("model", {})
    step_n = int((path / "COMPLETE").read_text().split()[0])
    info = {"run_config": run_cfg, "step": step_n, "family": model_cfg.get("family"),
            "preset": model_cfg.get("preset"), "dtype": dtype or "as trained", "checkpoint": str(path)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata={"family": str(info["family"]), "preset": str(info["preset"]),
                                         "step": str(step_n)})
    os.replace(tmp, out)
    out.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="train/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (train.out_dir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast floating tensors")
    args = p.parse_args(argv)
    try:
        out = export(args.run, args.out, args.step, args.dtype)
    except (FileNotFoundError, ValueError) as e:
        print(f"export error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
