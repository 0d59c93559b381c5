"""The real model families and data loader through the training stack: tiny shards written with the data
package's DatasetWriter, a toy SONAR decoder checkpoint, and 2 steps + eval + checkpoint + resume for
sonar_llm, base_lcm and two_tower built from `[model]` (family, preset, overrides)."""
import json

import numpy as np
import pytest

from fixtures_sonar import toy_decoder
from sonar_llm.data.shards import DatasetWriter, ShardArrays
from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
from sonar_train.config import load_config
from sonar_train.loop import run_training

E, LANG = 32, 80  # the toy SONAR decoder's width and language-tag id


def write_shards(path, docs=12, seed=0):
    rng = np.random.default_rng(seed)
    w = DatasetWriter(path, embed_dim=E, dtype="fp16", end_of_doc_text="End of sequence.",
                      end_of_doc_tokens=[3, LANG, 5, 3], end_of_doc_embedding=rng.standard_normal(E))
    sent_lens = [int(rng.integers(2, 6)) for _ in range(docs)]
    doc_offsets = np.concatenate([[0], np.cumsum(sent_lens)]).astype(np.int64)
    s = int(doc_offsets[-1])
    tok_lens = rng.integers(2, 7, size=s)
    tokens = np.concatenate([[3, LANG, *rng.integers(4, LANG, size=n), 3] for n in tok_lens]).astype(np.int32)
    sent_offsets = np.concatenate([[0], np.cumsum(tok_lens + 3)]).astype(np.int64)
    emb = rng.standard_normal((s, E)).astype(np.float16)
    w.add_shard(0, ShardArrays(emb, tokens, sent_offsets, doc_offsets))
    w.finish(1)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    write_shards(root / "train", seed=0)
    write_shards(root / "val", docs=4, seed=1)
    save_fairseq2_checkpoint(toy_decoder(), root / "decoder.pt")
    return root


@pytest.mark.parametrize("family, extra", [
    ("sonar_llm", ["--model.overrides.decoder_impl=\"torch\""]),
    ("base_lcm", []),
    ("two_tower", []),
])
def test_family_trains_evaluates_and_resumes(assets, tmp_path, family, extra):
    args = [f"--model.family={family}", "--model.preset=tiny", f"--model.overrides.sonar_dim={E}",
            f"--data.path={assets / 'train'}", f"--data.val_path={assets / 'val'}", "--data.max_sentences=16",
            "--data.max_tokens=256", "--train.steps=2", "--train.precision=fp32", "--train.log_every=1",
            "--train.eval_every=2", "--train.eval_batches=2", "--train.peak_flops=1e9",
            f"--train.out_dir={tmp_path / 'run'}", f"--sonar.decoder={assets / 'decoder.pt'}", *extra]
    cfg = load_config(None, args)
    res = run_training(cfg)
    assert res["step"] == 2 and np.isfinite(res["loss"]) and np.isfinite(res["eval_loss"])
    # resume the finished run for one more step: starts from the step-2 checkpoint
    cfg.train.steps = 3
    res = run_training(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        steps = [r["step"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert steps == [1, 2, 3] and res["step"] == 3


def test_unknown_family_override_is_named(assets, tmp_path):
    cfg = load_config(None, ["--model.family=base_lcm", "--model.overrides.colour=1",
                             f"--data.path={assets / 'train'}", f"--train.out_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"model.overrides: unknown key\(s\) \['colour'\] for family 'base_lcm'"):
        run_training(cfg)
