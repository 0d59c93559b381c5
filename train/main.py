"""`python train/main.py` / `torchrun train/main.py`: the trainer's command (code in train/sonar_train/main.py).

train/ is a source root: the training package is `sonar_train` (installed by `pip install -e .`), so no folder
of this checkout is importable as `train`, a name a PyPI distribution also uses. Running this file puts
train/ on sys.path (Python does that for a script's folder), so it also works without installing.
"""
import os
import sys

if not any(a == "--config" or a.startswith("--config=") for a in sys.argv[1:]):
    # The embedded default runs on CPU cores that other jobs often share: OpenMP threads that spin while they
    # wait made its tiny-SONAR steps 10x slower at load 10 on the 2-core machine (docs/training.md, "Time of
    # the default run"). Must be set before torch loads OpenMP; a value the user set wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from sonar_train.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
