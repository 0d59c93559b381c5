"""Command-line entry point of the training stack.

    python train/main.py                                   # the offline embedded default (train/sonar_train/default_pipeline.py)
    python train/main.py --config configs/x.toml [--section.key=value ...]
    torchrun --nproc_per_node=8 train/main.py --config configs/x.toml [--section.key=value ...]
    python train/main.py --config configs/x.toml --dry-run # validate and print the resolved config
    python train/main.py --dry-run                         # print the embedded default's config (nothing prepared)

Exit codes: 0 done, 1 error during training, 2 bad configuration (one line on stderr, nothing written; also a
resume whose model/data keys differ from the run's, a train.device this machine lacks, a family's SONAR decoder
that cannot be found; --dry-run checks the same), 3 aborted (e.g. too many non-finite steps), 4 trained to
the end but the last checkpoint could not be saved as a good one (the message names the newest good one).
Errors follow `sonar_llm.cli` (`--debug` shows tracebacks).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from sonar_train.config import ConfigError, check_environment, load_config, to_toml  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    from sonar_llm.cli import parser

    p = parser(
        "train/main.py",
        description="Train a SONAR-LLM / LCM family. Any config value can be overridden with --section.key=value "
                    "(e.g. --optim.lr=3e-4 --train.steps=1000). Without --config and --data.path, runs the embedded "
                    "default (any overrides on top of it); with --data.path but no --config, the overrides are the "
                    "whole config.")
    p.add_argument("--config", help="TOML config file (sections: model, data, optim, train, parallel, sonar)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the resolved config and exit")
    return p


def main(argv: list[str] | None = None, **factories) -> int:
    """Run the command; returns the process exit code. `factories` (model_factory, data_factory,
    sample_fn) are passed to run_training (tests and custom scripts plug in their own families)."""
    from sonar_llm.cli import run
    from sonar_train.checkpoint import CheckpointError

    # a damaged checkpoint to resume from is bad input (the message names the file): one line, exit 2
    return run("train", lambda args: _main(args, factories), argv, usage_errors=(CheckpointError,))


def _main(argv: list[str], factories: dict) -> int:
    if not argv:
        try:
            from sonar_train import default_pipeline
        except ModuleNotFoundError as e:
            if e.name != "sonar_train.default_pipeline":
                raise
            _parser().print_help(sys.stderr)
            return 2
        return int(default_pipeline.main() or 0)
    args, overrides = _parser().parse_known_args(argv)
    brings_data = any(o.split("=")[0] == "--data.path" for o in overrides)
    if not args.config and not factories and not brings_data:  # the embedded default, overrides on top of it
        from sonar_train import default_pipeline

        if any(o.split("=")[0] == "--train.out_dir" for o in overrides):
            raise ConfigError("--train.out_dir: the embedded default keeps its data, run and next commands in "
                              "one folder: set SONAR_LLM_DEFAULT_DIR (default runs/default) instead")
        cfg = default_pipeline.planned_config(overrides)  # a bad override fails here, before any preparation
        check_environment(cfg, check_model=False)
        if args.dry_run:
            print(to_toml(cfg))
            return 0
        return int(default_pipeline.main(overrides) or 0)
    try:
        cfg = load_config(args.config, overrides, check_paths="data_factory" not in factories,
                          check_model="model_factory" not in factories)
    except (FileNotFoundError, TypeError) as e:  # ConfigError goes up: "config error: ..." (sonar_llm.cli)
        raise ConfigError(str(e)) from None
    if args.dry_run:
        print(to_toml(cfg))
        return 0
    from sonar_train.loop import CheckpointNotSaved, TrainingAborted, run_training

    try:
        result = run_training(cfg, **factories)
    except TrainingAborted:
        return 3
    except CheckpointNotSaved:  # already reported by run_training
        return 4
    except ConfigError:
        raise  # one line, exit 2 (sonar_llm.cli)
    except Exception as e:
        if getattr(e, "reported", False):  # logged with its traceback by run_training
            return 1
        raise  # raised before the logged block: sonar_llm.cli says it (never a silent exit)
    import os

    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({"final": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
