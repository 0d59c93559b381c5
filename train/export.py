"""`python train/export.py`: a training checkpoint to safetensors + JSON (code in train/sonar_train/export.py).

Runs without installing for the same reason as train/main.py (this file's folder is the source root).
"""
import sys

from sonar_train.export import main

if __name__ == "__main__":
    sys.exit(main())
