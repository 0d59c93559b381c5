"""`python train/main.py` / `torchrun train/main.py`: the trainer's command (code in train/sonar_train/main.py).

train/ is a source root: the training package is `sonar_train` (installed by `pip install -e .`), so no folder
of this checkout is importable as `train`, a name a PyPI distribution also uses. Running this file puts
train/ on sys.path (Python does that for a script's folder), so it also works without installing.
"""
import sys

if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    # The embedded default runs on CPU cores that other jobs often share; before torch loads OpenMP.
    from sonar_llm.cli import wait_passively

    wait_passively()

from sonar_train.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
