"""Consolidate a DCP training checkpoint into one safetensors file (+ a JSON config) for generation/eval.

    python train/export.py --run RUN_DIR [--step N] --out model.safetensors [--dtype fp32|bf16|fp16]

Only the model's trainable state is in a checkpoint (the frozen SONAR decoder is loaded from its own file
at generation time). Works without the model code and without a process group: tensor shapes and dtypes
come from the checkpoint's metadata. Writes `model.safetensors` and `model.json` = {"run_config": the run's
resolved config, "step": N, "family", "preset", "dtype", "files": {"weights": {"name", "sha256", "size"}}}:
every loader (sonar_llm.checkpoints.read_exported) checks the file against that record before using it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sonar_llm.checkpoints import (check_run, checkpoint_step, load_dcp_model_state, read_run_config,
                                   write_exported)
from sonar_llm.sonar.checkpoint import DTYPES as _DTYPES

load_model_state = load_dcp_model_state  # the model state of a DCP checkpoint directory (kept name)


def export(run_dir: str | os.PathLike, out: str | os.PathLike, step: int | None = None,
           dtype: str | None = None) -> Path:
    """Write `out` (safetensors) and `out` with suffix .json (with the sha256 and size of `out`); returns the
    safetensors path."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"--dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
    path, cfg_file = check_run(run_dir, step)  # the weights are useless without the config that builds them
    run_cfg = read_run_config(cfg_file)
    state = load_model_state(path)
    if dtype is not None:
        state = {k: v.to(_DTYPES[dtype]) if v.is_floating_point() else v for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    model_cfg = run_cfg["model"]
    step_n = checkpoint_step(path)
    info = {"run_config": run_cfg, "step": step_n, "family": model_cfg.get("family"),
            "preset": model_cfg.get("preset"), "dtype": dtype or "as trained", "checkpoint": str(path)}
    return write_exported(state, out, info, metadata={"family": str(info["family"]),
                                                      "preset": str(info["preset"]), "step": str(step_n)})


def main(argv: list[str] | None = None) -> int:
    """The command; exit 0, 2 on bad input (one line on stderr), 1 when the work fails (sonar_llm.cli)."""
    from sonar_llm.cli import run

    return run("export", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import check_output_path, int_at_least, parser

    p = parser("train/export.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="run directory (train.out_dir)")
    p.add_argument("--step", type=int_at_least(0), default=None, help="checkpoint step (default: the latest complete one)")
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="cast floating tensors")
    args = p.parse_args(argv)
    check_output_path(args.out)
    out = export(args.run, args.out, args.step, args.dtype)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
