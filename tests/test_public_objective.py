"""The public SONAR-LLM objective (`extra_eos_target`): decoder input = the whole target-mode sentence
[</s>, lang, w1..wn, </s>], labels [lang, w1..wn, </s>, </s>], padded and ignored with pad id 0, cut to 256.

References: a hand-written transcription of the public SonarLossWrapper.forward on padded batches (plain
Python loops over the sentences, as the public code does) checks `reference_loss`; `reference_loss` checks
the fast path (values and gradients, float64, tolerance 1e-10); a structural identity ties the two objectives
(causal decoding: the extra objective's per-token losses are the default's plus one `</s> -> </s>` term per
sentence). Ends with short CPU training runs of both options through the real trainer.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures_sonar import toy_decoder
from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.backbone import BackboneConfig
from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig
from sonar_llm.sonar.packed_decoder import PackedSonarDecoder, pack_targets

LANG, E = 80, 32  # the toy decoder's language-tag id and embedding width
TOL = 1e-10


def sentences(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[3, LANG] + torch.randint(4, LANG, (n,), generator=g).tolist() + [3] for n in lengths]


def packed(sents):
    tokens = torch.tensor([t for s in sents for t in s], dtype=torch.int64)
    cu = torch.tensor(np.cumsum([0] + [len(s) for s in sents]), dtype=torch.int32)
    return tokens, cu


def public_loss_by_hand(decoder, pred_emb, sents):
    """SonarLossWrapper.forward's loss part, transcribed: pad id 0, max_len = min(longest, 256), labels
    = et[1:] + [3], decoder without padding mask, mean CE ignoring the pad id."""
    pad_idx = 0
    encoded = [torch.tensor(s) for s in sents]
    max_len = min(max(len(et) for et in encoded), 256)
    dec_ids = torch.full((len(encoded), max_len), pad_idx, dtype=torch.long)
    labels = torch.full((len(encoded), max_len), pad_idx, dtype=torch.long)
    for i, et in enumerate(encoded):
        dec_ids[i, : min(len(et), max_len)] = et[:max_len]
        et = torch.cat([et[1:], torch.tensor([3])])
        labels[i, : min(len(et), max_len)] = et[:max_len]
    logits = decoder(dec_ids, pred_emb.unsqueeze(1))
    logp = torch.log_softmax(logits.double(), dim=-1)
    total, count = 0.0, 0
    for i in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if int(labels[i, j]) != pad_idx:
                total = total - logp[i, j, labels[i, j]]
                count += 1
    return total / count


def test_pack_targets_whole_sentences():
    sents = sentences([2, 0, 5])
    tokens, cu = packed(sents)
    inputs, labels, positions, sid, new_cu, max_len = pack_targets(tokens, cu, extra_eos_id=3)
    assert inputs.tolist() == [t for s in sents for t in s]
    assert labels.tolist() == [t for s in sents for t in s[1:] + [3]]
    assert positions.tolist() == [p for s in sents for p in range(len(s))]
    assert sid.tolist() == [i for i, s in enumerate(sents) for _ in s]
    assert new_cu.tolist() == cu.tolist() and max_len == max(len(s) for s in sents)


def test_reference_loss_is_the_public_loss():
    """Including one sentence longer than 256 tokens (the public code cuts inputs and labels at 256)."""
    dec = toy_decoder(seed=1, dtype=torch.float64, max_seq_len=300)
    packed_dec = PackedSonarDecoder(dec, impl="torch")
    sents = sentences([3, 9, 1, 259, 17], seed=2)
    tokens, cu = packed(sents)
    pred = torch.randn(len(sents), E, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref = public_loss_by_hand(dec, pred, sents)
    got = packed_dec.reference_loss(pred, tokens, cu, extra_eos_target=True)
    assert abs(got.item() - ref.item()) <= TOL
    default = packed_dec.reference_loss(pred, tokens, cu)
    assert abs(default.item() - ref.item()) > 1e-3  # the two objectives really differ


def test_fast_path_matches_reference_values_and_gradients():
    dec = toy_decoder(seed=4, dtype=torch.float64)
    packed_dec = PackedSonarDecoder(dec, impl="torch")
    sents = sentences([1, 6, 12, 3, 30, 2], seed=5)
    tokens, cu = packed(sents)
    base = torch.randn(len(sents), E, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p1, p2 = base.clone().requires_grad_(), base.clone().requires_grad_()
    fast = packed_dec.loss(p1, packed_dec.prepare(tokens, cu, extra_eos_target=True))
    ref = packed_dec.reference_loss(p2, tokens, cu, extra_eos_target=True)
    fast.backward()
    ref.backward()
    assert abs(fast.item() - ref.item()) <= TOL
    assert (p1.grad - p2.grad).abs().max().item() <= TOL
    assert p1.grad.abs().max().item() > 1e-6


def test_extra_objective_adds_one_eos_term_per_sentence():
    """Causal decoding: the extra objective's per-token losses at every position but each sentence's last
    equal the default objective's; the last is -log p(</s> | whole sentence)."""
    dec = toy_decoder(seed=7, dtype=torch.float64)
    packed_dec = PackedSonarDecoder(dec, impl="torch")
    sents = sentences([4, 1, 8], seed=8)
    tokens, cu = packed(sents)
    pred = torch.randn(len(sents), E, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    extra = packed_dec.loss(pred, packed_dec.prepare(tokens, cu, extra_eos_target=True), reduction="none")
    default = packed_dec.loss(pred, packed_dec.prepare(tokens, cu), reduction="none")
    assert extra.numel() == tokens.numel() and default.numel() == tokens.numel() - len(sents)
    last = set((cu[1:] - 1).tolist())
    keep = torch.tensor([i not in last for i in range(tokens.numel())])
    assert (extra[keep] - default).abs().max().item() <= TOL
    for i, s in enumerate(sents):  # the extra term, from the plain decoder
        logits = dec(torch.tensor([s]), pred[i : i + 1, None])
        expected = -torch.log_softmax(logits[0, -1], -1)[3]
        assert abs(extra[int(cu[i + 1]) - 1].item() - expected.item()) <= TOL


def _batch(doc_lens, seed=10):
    g = torch.Generator().manual_seed(seed)
    sents = sentences([int(torch.randint(1, 7, (1,), generator=g)) for _ in range(sum(doc_lens))], seed)
    tokens, cu = packed(sents)
    doc_cu = torch.tensor(np.cumsum([0] + list(doc_lens)), dtype=torch.int32)
    return ConceptBatch(embeddings=torch.randn(len(sents), E, generator=g, dtype=torch.float64),
                        doc_cu_seqlens=doc_cu, tokens=tokens, tok_cu_seqlens=cu, max_doc_len=max(doc_lens),
                        max_sent_len=max(len(s) for s in sents)).validate()


@pytest.mark.parametrize("extra", [False, True])
def test_sonar_llm_fast_equals_reference_path(extra):
    batch = _batch([3, 5, 1, 4])
    losses = {}
    for path in ("fast", "reference"):
        torch.manual_seed(0)
        cfg = SonarLLMConfig(BackboneConfig(model_dim=32, num_layers=2, num_heads=4, ffn_dim=48), sonar_dim=E,
                             path=path, decoder_impl="torch", extra_eos_target=extra)
        model = SonarLLM(cfg, toy_decoder(seed=11, dtype=torch.float64)).double()
        loss, metrics = model.loss(batch)
        losses[path] = loss.item()
        n_targets = sum(batch.doc_cu_seqlens.diff().tolist()) - 4  # every sentence but each document's first
        tgt_tokens = sum(int(batch.tok_cu_seqlens[i + 1] - batch.tok_cu_seqlens[i])
                         for a, b in zip(batch.doc_cu_seqlens[:-1].tolist(), batch.doc_cu_seqlens[1:].tolist())
                         for i in range(a + 1, b))
        assert metrics["target_sentences"] == n_targets
        assert metrics["target_tokens"] == tgt_tokens - (0 if extra else n_targets)
    assert abs(losses["fast"] - losses["reference"]) <= TOL


def test_config_field_is_checked():
    with pytest.raises(TypeError, match="extra_eos_target"):
        SonarLLMConfig(BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=48), extra_eos_target="yes")


# ----------------------------------------------------------------------------- short CPU runs of both options
from test_train_families import assets  # noqa: E402,F401  (the trainer tests' tiny shards + toy decoder)


@pytest.mark.parametrize("extra", ["false", "true"])
def test_short_cpu_training_run(assets, tmp_path, extra):
    """A few optimizer steps of each objective option through train/sonar_train/loop.py (tiny preset, toy decoder), with
    the public optimizer knobs (decay on every parameter, cosine to 0); the loss is finite and drops."""
    from sonar_train.config import load_config
    from sonar_train.loop import run_training

    args = ["--model.family=sonar_llm", "--model.preset=tiny", f"--model.overrides.sonar_dim={E}",
            "--model.overrides.decoder_impl=\"torch\"", f"--model.overrides.extra_eos_target={extra}",
            f"--data.path={assets / 'train'}", f"--data.val_path={assets / 'val'}", "--data.max_sentences=64",
            "--data.max_tokens=1024", "--train.steps=6", "--train.precision=fp32", "--train.log_every=1",
            "--train.eval_every=6", "--train.eval_batches=1", "--train.peak_flops=1e9", "--optim.lr=3e-3",
            "--optim.warmup_steps=1", "--optim.min_lr_ratio=0.0", "--optim.decay_all_params=true",
            "--optim.weight_decay=0.01", f"--train.out_dir={tmp_path / 'run'}", f"--sonar.decoder={assets / 'decoder.pt'}"]
    res = run_training(load_config(None, args))
    assert res["step"] == 6 and np.isfinite(res["loss"]) and np.isfinite(res["eval_loss"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["overrides"]["extra_eos_target"] is (extra == "true")
    # the trained run, exported by train/export.py, goes to the public format and back bit for bit
    from safetensors.torch import load_file

    from sonar_llm import convert
    from sonar_train.export import export

    ours = export(tmp_path / "run", tmp_path / "model.safetensors")
    pt, js = convert.export_public(ours, tmp_path / "public" / "checkpoint.pt")
    back = convert.import_public(pt, tmp_path / "back" / "model.safetensors", js)
    a, b = load_file(str(ours)), load_file(str(back.out))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
