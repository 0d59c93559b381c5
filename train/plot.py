"""`python train/plot.py --run RUN_DIR`: a picture of a training run (code in train/sonar_train/plot.py).

Runs without installing for the same reason as train/main.py (this file's folder is the source root).
"""
import sys

from sonar_train.plot import main

if __name__ == "__main__":
    sys.exit(main())
