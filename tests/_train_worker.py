"""torchrun entry for the training-stack tests: train/main.py with the fake family and loader."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _train_fakes import fake_data_factory, fake_model_factory  # noqa: E402
from sonar_train.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], model_factory=fake_model_factory, data_factory=fake_data_factory))
