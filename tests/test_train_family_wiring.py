"""What the trainer must do with each family, checked on the run's outputs (not only that it runs):

- the LCM normalizers of a trained run hold the statistics of the *training* embeddings as Meta's fitting
  rule defines them (every 5th sentence embedding of each batch of whole documents; one batch here), computed
  independently with scikit-learn's RobustScaler on the arrays this test wrote (not on the library's sample);
- a run stopped after 2 steps and resumed for 1 more logs exactly the losses of an uninterrupted 3-step run,
  for every family in the registry (data order, RNG draws, optimizer state and schedule all restored).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import preprocessing as sklearn_preprocessing

from fixtures_sonar import toy_decoder
from sonar_llm.checkpoints import read_run
from sonar_llm.data.shards import DatasetWriter, ShardArrays
from sonar_llm.models.family import FAMILIES
from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
from sonar_train.config import load_config
from sonar_train.loop import run_training

E, LANG = 32, 80  # the toy SONAR decoder's width and language-tag id


def _write(path, docs, seed, scale=1.0):
    """Shards of `docs` documents; returns the sentence embeddings as stored (fp16)."""
    rng = np.random.default_rng(seed)
    w = DatasetWriter(path, embed_dim=E, dtype="fp16", end_of_doc_text="End of sequence.",
                      end_of_doc_tokens=[3, LANG, 5, 3], end_of_doc_embedding=rng.standard_normal(E))
    sent_lens = rng.integers(2, 6, size=docs)
    doc_offsets = np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int64)
    s = int(doc_offsets[-1])
    tok_lens = rng.integers(2, 7, size=s)
    tokens = np.concatenate([[3, LANG, *rng.integers(4, LANG, size=n), 3] for n in tok_lens]).astype(np.int32)
    sent_offsets = np.concatenate([[0], np.cumsum(tok_lens + 3)]).astype(np.int64)
    # skewed, per-dimension shifted values: center and scale differ clearly from 0 / 1 and between dimensions
    emb = ((rng.standard_normal((s, E)) ** 3) * scale + np.linspace(-2, 2, E)).astype(np.float16)
    w.add_shard(0, ShardArrays(emb, tokens, sent_offsets, doc_offsets))
    w.finish(1)
    return emb


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("wiring")
    train_emb = _write(root / "train", docs=14, seed=0)
    _write(root / "val", docs=4, seed=1, scale=5.0)  # different statistics: fitting on it would show
    save_fairseq2_checkpoint(toy_decoder(), root / "decoder.pt")
    return root, train_emb


def _args(root, family, out, steps):
    extra = ["--model.overrides.decoder_impl=\"torch\""] if family == "sonar_llm" else []
    if family != "token_llm":
        extra.append(f"--model.overrides.sonar_dim={E}")
    return [f"--model.family={family}", "--model.preset=tiny", f"--data.path={root / 'train'}",
            f"--data.val_path={root / 'val'}", "--data.max_sentences=16", "--data.max_tokens=256",
            f"--train.steps={steps}", "--train.precision=fp32", "--train.log_every=1", "--train.eval_every=100",
            "--train.peak_flops=1e9", f"--train.out_dir={out}", f"--sonar.decoder={root / 'decoder.pt'}", *extra]


def _train_losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        recs = [r for r in map(json.loads, f) if r["kind"] == "train" and not r.get("stale")]
    return {r["step"]: r["loss"] for r in recs}


@pytest.mark.parametrize("family, prefix", [("base_lcm", "frontend.sonar_normalizer."),
                                            ("two_tower", "sonar_normalizer.")])
def test_trained_lcm_normalizer_holds_the_training_embeddings_statistics(assets, tmp_path, family, prefix):
    root, train_emb = assets
    run_training(load_config(None, _args(root, family, tmp_path / "run", steps=1)))
    state = read_run(tmp_path / "run").state
    # Meta's scripts/fit_embedding_normalizer.py on one batch (14 documents << 10,000 sentences): every 5th
    # embedding; lcm/models/sonar_normalizer/builder.py: RobustScaler(unit_variance=True,
    # quantile_range=(0.25, 0.75)) (Meta passes percents as fractions: the default, docs/lcm.md)
    sample = train_emb.astype(np.float32)[::5]
    ref = sklearn_preprocessing.RobustScaler(unit_variance=True, quantile_range=(0.25, 0.75)).fit(sample)
    center, scale = state[prefix + "center"].double().numpy(), state[prefix + "scale"].double().numpy()
    # fp32 buffers of fp32 statistics: 1e-6 relative
    np.testing.assert_allclose(center, ref.center_, rtol=1e-6, atol=1e-6, err_msg=f"{family} center")
    np.testing.assert_allclose(scale, ref.scale_, rtol=1e-5, atol=1e-6, err_msg=f"{family} scale")
    assert np.ptp(ref.center_) > 1.0  # the reference itself is far from an unfitted (0, 1) normalizer


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_resumed_losses_equal_an_uninterrupted_run(assets, tmp_path, family):
    root, _ = assets
    straight = tmp_path / "straight"
    run_training(load_config(None, _args(root, family, straight, steps=3)))
    stopped = tmp_path / "stopped"
    run_training(load_config(None, _args(root, family, stopped, steps=2)))
    res = run_training(load_config(None, _args(root, family, stopped, steps=3)))  # resumes from step 2
    assert res["step"] == 3
    with open(stopped / "metrics.jsonl") as f:  # the second call resumed: it ran step 3 only, nothing redone
        assert [r["step"] for r in map(json.loads, f) if r["kind"] == "train"] == [1, 2, 3]
    want, got = _train_losses(straight), _train_losses(stopped)
    assert sorted(want) == sorted(got) == [1, 2, 3], (want, got)
    # the same float32 computations in the same order: equal to float32 rounding of the logged values
    for step in (1, 2, 3):
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-7), (family, step, got, want)
    assert len({want[1], want[2], want[3]}) == 3  # the losses move: the comparison says something


def test_evaluation_does_not_change_training(assets, tmp_path):
    """Two-Tower's loss draws diffusion noise, in evaluation too: training losses are the same with an evaluation
    after every step as with none (the loop restores the random state after evaluating)."""
    root, _ = assets
    runs = {}
    for every in (1, 0):
        out = tmp_path / f"eval_every_{every}"
        run_training(load_config(None, [*_args(root, "two_tower", out, steps=3), f"--train.eval_every={every}"]))
        runs[every] = _train_losses(out)
        with open(out / "metrics.jsonl") as f:
            assert sum(r["kind"] == "eval" for r in map(json.loads, f)) == (3 if every else 0)
    assert sorted(runs[1]) == [1, 2, 3] and runs[1] == runs[0]
