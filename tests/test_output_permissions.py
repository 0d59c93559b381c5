"""Every file the project writes through a private temporary (mkstemp, safetensors >= 0.8: both 0600) ends with
the permissions a plain `open(path, "w")` gives: 0666 minus the umask. An export or a run that only its writer
can read cannot be shared. Reference: a file written with plain open() under the same umask."""
import os
import stat

import pytest
import torch

from sonar_llm.checkpoints import write_exported
from sonar_llm.cli import atomic_output
from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
from sonar_llm.sonar.story_corpus import write_corpus


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _plain(tmp_path, umask) -> int:
    ref = tmp_path / "plain.txt"
    with open(ref, "w") as f:
        f.write("x")
    assert _mode(ref) == 0o666 & ~umask
    return _mode(ref)


def test_outputs_get_the_umask_permissions(tmp_path, umask):
    want = _plain(tmp_path, umask)
    with atomic_output(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    out = write_exported({"w": torch.zeros(2, 2)}, tmp_path / "model.safetensors", {"family": "x"})
    save_fairseq2_checkpoint(torch.nn.Linear(2, 2), tmp_path / "sonar.pt")
    corpus = write_corpus(tmp_path / "corpus.jsonl", ["A story."])
    for p in (tmp_path / "out.json", out, out.with_suffix(".json"), tmp_path / "sonar.pt", corpus):
        assert _mode(p) == want, (p.name, oct(_mode(p)), oct(want))


def test_training_checkpoint_files_get_the_umask_permissions(tmp_path, umask):
    from sonar_train.checkpoint import save_checkpoint

    want = _plain(tmp_path, umask)
    lin = torch.nn.Linear(4, 3)
    assert save_checkpoint(tmp_path / "checkpoints", 1, lin, torch.optim.AdamW(lin.parameters()), {}, {})
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(want) for p in files}
