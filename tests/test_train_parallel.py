"""Single-process parts of train/sonar_train/parallel.py: frozen-module detection, activation checkpointing (same
gradients, fewer saved activations), device choice and the no-process-group path."""
import pytest
import torch

from _train_fakes import FakeFamily, FakeLoader
from sonar_train.config import RunConfig
from sonar_train.parallel import (DistInfo, apply_activation_checkpointing, frozen_modules, init_distributed, parallelize,
                            pick_device)


def grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss, _ = model.loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_gradients(mode):
    torch.manual_seed(0)
    ref = FakeFamily(n_blocks=3).double()
    ac = FakeFamily(n_blocks=3).double()
    ac.load_state_dict(ref.state_dict())
    apply_activation_checkpointing(ac.transformer_blocks(), mode)
    b = FakeLoader(0, "train", 0, 1).batch(0)
    b = type(b)(b.embeddings.double(), b.tokens)
    l0, g0 = grads(ref, b)
    l1, g1 = grads(ac, b)
    assert torch.equal(l0, l1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-12, atol=1e-14)
    wrapped = [blk.__dict__.get("forward") is not None for blk in ac.transformer_blocks()]
    assert wrapped == ([True, False, True] if mode == "selective" else [True, True, True])
    # fewer tensors saved for backward with checkpointing
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ref.loss(b)[0]
    n_ref, saved = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ac.loss(b)[0]
    assert sum(saved) < n_ref


def test_bad_checkpointing_mode():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        apply_activation_checkpointing([torch.nn.Linear(2, 2)], "most")


def test_frozen_modules_found():
    m = FakeFamily()
    assert frozen_modules(m) == [m.decoder]


def test_single_process_without_process_group(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cfg = RunConfig()
    cfg.train.device = "cpu"
    info = init_distributed(cfg)
    assert (info.rank, info.world_size, info.initialized, info.device.type) == (0, 1, False, "cpu")
    cfg.train.precision = "bf16"
    model = parallelize(FakeFamily(), cfg, info)  # no FSDP without a process group; frozen part cast
    assert not hasattr(model, "set_requires_gradient_sync")
    assert model.decoder.layers[0].weight.dtype == torch.bfloat16 and model.inp.weight.dtype == torch.float32
    assert pick_device("cpu", 0) == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device: 'cuda' requested"):
            pick_device("cuda", 0)
    with pytest.raises(TypeError, match="no transformer_blocks"):
        parallelize(torch.nn.Linear(2, 2), cfg, DistInfo())
