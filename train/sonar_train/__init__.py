"""Training stack scripts (run as `python train/main.py` / `torchrun train/main.py`)."""
