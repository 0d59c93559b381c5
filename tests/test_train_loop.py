"""Training loop on the fake family: the first step against an independent float64 computation, gradient
accumulation, non-finite-step skipping and abort, evaluation, samples and the metrics file."""
import json
import math

import pytest
import torch

from _train_fakes import FakeLoader, fake_data_factory, fake_model_factory
from sonar_train.config import RunConfig
from sonar_train.export import load_model_state
from sonar_train.loop import TrainingAborted, run_training
from sonar_train.optim import lr_factor


def fake_cfg(tmp_path, **train):
    cfg = RunConfig()
    cfg.model.family = "fake"
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.weight_decay = 1e-2, 2, 0.0
    cfg.train.precision, cfg.train.log_every, cfg.train.out_dir = "fp32", 1, str(tmp_path / "run")
    cfg.train.peak_flops = 1e9  # no CPU measurement in tests
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def run(cfg, **kw):
    return run_training(cfg, model_factory=fake_model_factory, data_factory=fake_data_factory, **kw)


def read_metrics(cfg, kind="train"):
    lines = (cfg.train.out_dir + "/metrics.jsonl")
    with open(lines) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def test_first_step_matches_float64_reference(tmp_path):
    """Loss of step 1 and the weights after it, against an independent float64 loop (grad_accum=2)."""
    cfg = fake_cfg(tmp_path, steps=1, grad_accum=2)
    cfg.optim.grad_clip = 0.5
    torch.manual_seed(cfg.train.seed)
    ref = fake_model_factory(cfg).double()
    run(cfg)
    loader = FakeLoader(cfg.data.seed, "train", 0, 1)
    batches = [loader.batch(0), loader.batch(1)]
    losses = []
    for b in batches:
        b = type(b)(b.embeddings.double(), b.tokens)
        loss, _ = ref.loss(b)
        (loss / 2).backward()
        losses.append(loss.item())
    rec = read_metrics(cfg)[0]
    assert rec["step"] == 1 and abs(rec["loss"] - sum(losses) / 2) < 1e-5
    params = [p for p in ref.parameters() if p.requires_grad]
    norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
    assert abs(rec["grad_norm"] - norm.item()) < 1e-5
    assert abs(rec["lr"] - 1e-2 * lr_factor(0, 2, 1, cfg.optim.min_lr_ratio)) < 1e-12
    assert norm.item() > 0.5  # clipping is active, so the test covers it
    # weights after step 1: AdamW's first step is lr * gc / (|gc| + eps), gc = clipped gradient (wd = 0)
    lr0 = 1e-2 * lr_factor(0, 2, 1, cfg.optim.min_lr_ratio)
    coef = min(1.0, 0.5 / (norm.item() + 1e-6))
    trained = load_model_state(tmp_path / "run" / "checkpoints" / "step_000001")
    for name, p in ref.named_parameters():
        if p.requires_grad:
            gc = p.grad * coef
            expected = p.detach() - lr0 * gc / (gc.abs() + cfg.optim.eps)
            torch.testing.assert_close(trained[name].double(), expected, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert name not in trained  # frozen weights stay out of checkpoints


def test_nan_steps_are_skipped_then_abort(tmp_path, monkeypatch):
    cfg = fake_cfg(tmp_path, steps=8, max_bad_steps=3, checkpoint_every=2)
    cfg.model.overrides = {"nan_calls": [2]}
    res = run(cfg)
    recs = read_metrics(cfg)
    assert res["skipped_steps"] == 1 and recs[2]["loss"] is None and recs[2]["skipped_steps"] == 1
    assert all(r["loss"] is not None and math.isfinite(r["loss"]) for i, r in enumerate(recs) if i != 2)

    cfg2 = fake_cfg(tmp_path / "b", steps=10, max_bad_steps=3, checkpoint_every=2)
    monkeypatch.setenv("FAKE_FAULTS", json.dumps({"nan_calls": [5, 6, 7, 8]}))
    with pytest.raises(TrainingAborted, match=r"3 non-finite steps in a row \(train.max_bad_steps=3\) at step 8; "
                                              r"last good checkpoint: .*step_000006"):
        run(cfg2)
    # the last good checkpoint is intact and resumable: training continues from step 6 without faults
    monkeypatch.delenv("FAKE_FAULTS")
    res = run(cfg2)
    assert res["step"] == 10 and res["skipped_steps"] == 1  # step 6 was skipped before its checkpoint
    assert [r["step"] for r in read_metrics(cfg2)][-4:] == [7, 8, 9, 10]


def test_eval_and_samples(tmp_path):
    cfg = fake_cfg(tmp_path, steps=4, eval_every=2, eval_batches=3, sample_every=4)
    calls = []

    def sample_fn(model, step):
        calls.append((step, model.training))
        return {"text": f"sample at {step}"}

    res = run(cfg, sample_fn=sample_fn)
    evals = read_metrics(cfg, "eval")
    assert [e["step"] for e in evals] == [2, 4]
    assert res["eval_loss"] == evals[-1]["eval_loss"] and evals[0]["eval_loss"] != evals[1]["eval_loss"]
    assert calls == [(4, False)]
    samples = (tmp_path / "run" / "samples.jsonl").read_text().splitlines()
    assert json.loads(samples[0]) == {"step": 4, "text": "sample at 4"}


def test_eval_at_the_last_step_of_a_run_shorter_than_the_period(tmp_path):
    """A run of 3 steps with eval_every=5 still ends with a validation loss (a newcomer's short run used to report
    "validation loss n/a"); with eval_every=0 there is none."""
    res = run(fake_cfg(tmp_path / "a", steps=3, eval_every=5, eval_batches=2))
    evals = read_metrics(fake_cfg(tmp_path / "a", steps=3), "eval")
    assert [e["step"] for e in evals] == [3] and res["eval_loss"] == evals[0]["eval_loss"]
    res = run(fake_cfg(tmp_path / "b", steps=3, eval_every=0))
    assert read_metrics(fake_cfg(tmp_path / "b", steps=3), "eval") == [] and res.get("eval_loss") is None


def test_eval_loss_is_mean_over_validation_batches(tmp_path):
    """With lr so small the weights barely move, the eval loss equals a direct float64 mean over the batches."""
    cfg = fake_cfg(tmp_path, steps=1, eval_every=1, eval_batches=2)
    cfg.optim.lr = 1e-30
    torch.manual_seed(cfg.train.seed)
    ref = fake_model_factory(cfg).double().eval()
    res = run(cfg)
    loader = FakeLoader(cfg.data.seed, "val", 0, 1)
    expected = sum(ref.loss(type(b)(b.embeddings.double(), b.tokens))[0].item()
                   for b in (loader.batch(0), loader.batch(1))) / 2
    assert abs(res["eval_loss"] - expected) < 1e-5


def test_bad_model_is_rejected(tmp_path):
    cfg = fake_cfg(tmp_path, steps=1)
    with pytest.raises(TypeError, match="lacks the loss"):
        run_training(cfg, model_factory=lambda c: torch.nn.Linear(2, 2), data_factory=fake_data_factory)
