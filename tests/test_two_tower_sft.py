"""The Two-Tower LCM's supervised fine-tuning layout (Meta's instruction tuning): source-shifted cross-attention.

Meta (large_concept_model: lcm/datasets/batch.py `get_embeddings_sequence`, lcm/train/two_tower_diffusion_lcm/
criterion.py `DiffusionNextSentFinetuningCriterion`, lcm/nn/denoisers/attention_masks.py
`ShiftedCausalAttentionMask`): the contextualizer reads source ++ target, the denoiser denoises the target only,
and target query i of document b cross-attends to keys j <= S_b + i of [0-vector ; context] (`tril(diagonal=S_b)`),
with the key padding mask; CFG rows (1 + randperm(T - 1)[:n], drawn per document) see only the zero vector.

Checked: the mask of a small batch against the one written out by hand, and against Meta's construction (a
ones matrix `tril_(diagonal=S_b)` per document, then the key padding); the forward against the pretraining
forward, which computes the same rows (a denoiser row depends only on its own input and its visible context,
and target row i of an SFT document sees what row S_b + i of the same document sees in pretraining) in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

from sonar_llm.models.two_tower import (TwoTowerLCM, sft_cfg_dropout_rows, sft_shifted_causal_mask, shifted_causal_mask,
                                        two_tower_tiny, DocLayout)

SRC, TGT = [2, 0, 1], [2, 3, 1]


def test_sft_mask_of_a_small_batch_by_hand():
    mask = sft_shifted_causal_mask(torch.tensor(SRC), torch.tensor(TGT))
    # keys: 0 = zero vector, 1 + c = context row c (source then target); K = max(S + T) = 4 -> 5 keys; T = 3 rows
    want = torch.tensor([
        # doc 0: source 2, target 2 (context rows 0-1 source, 2-3 target; no padding key)
        [[1, 1, 1, 0, 0],   # target 0 sees the zero vector and the source
         [1, 1, 1, 1, 0],   # target 1 also sees target 0
         [1, 1, 1, 1, 1]],  # padding row: every real key (never scored)
        # doc 1: no source, target 3 (the pretraining shifted-causal mask; key 4 is padding)
        [[1, 0, 0, 0, 0],
         [1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0]],
        # doc 2: source 1, target 1 (keys 3, 4 are padding)
        [[1, 1, 0, 0, 0],
         [1, 1, 1, 0, 0],
         [1, 1, 1, 0, 0]],
    ], dtype=torch.bool)
    assert torch.equal(mask, want)
    dropped = torch.tensor([[False, True, False], [False, False, True], [False, False, False]])
    want_d = want.clone()
    want_d[0, 1] = torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)
    want_d[1, 2] = torch.tensor([1, 0, 0, 0, 0], dtype=torch.bool)
    assert torch.equal(sft_shifted_causal_mask(torch.tensor(SRC), torch.tensor(TGT), dropped), want_d)


def test_sft_mask_is_metas_tril_with_key_padding():
    """Meta: torch.ones(seq_len, key_len).tril_(diagonal=src_len) per document (key_len = 1 + padded context),
    combined with the key padding mask of [0 ; context]."""
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, 5, (6,), generator=g)
    tgt = torch.randint(1, 6, (6,), generator=g)
    T, K = int(tgt.max()), int((src + tgt).max())
    mask = sft_shifted_causal_mask(src, tgt)
    for b in range(6):
        meta = torch.ones(T, K + 1).tril_(diagonal=int(src[b])).bool()
        key_pad = torch.arange(K + 1) < 1 + int(src[b] + tgt[b])
        assert torch.equal(mask[b], meta & key_pad[None, :])


def test_sft_cfg_rows_are_drawn_per_document():
    g = torch.Generator().manual_seed(3)
    rows = sft_cfg_dropout_rows(5, 9, 0.3, g)
    n = math.floor(8 * 0.3)
    assert rows.shape == (5, 9) and not rows[:, 0].any() and rows.sum(1).tolist() == [n] * 5
    assert len({tuple(r.tolist()) for r in rows}) > 1  # one randperm per document, as Meta's per-source-length masks
    assert torch.equal(rows, sft_cfg_dropout_rows(5, 9, 0.3, torch.Generator().manual_seed(3)))
    assert not sft_cfg_dropout_rows(2, 1, 0.9).any()  # a one-concept target drops nothing


@pytest.mark.parametrize("with_drop", [False, True])
def test_sft_forward_equals_the_pretraining_rows_it_shares_context_with(with_drop):
    torch.manual_seed(0)
    model = TwoTowerLCM(two_tower_tiny()).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.05)
    src, tgt = torch.tensor(SRC), torch.tensor(TGT)
    lens = src + tgt
    cu = torch.zeros(4, dtype=torch.int64)
    cu[1:] = torch.cumsum(lens, 0)
    N = int(cu[-1])
    x0 = torch.randn(N, 16, generator=g, dtype=torch.float64)
    x_t_all = torch.randn(N, 16, generator=g, dtype=torch.float64)
    t_all = torch.randint(0, 100, (N,), generator=g)
    target_rows = torch.cat([torch.arange(int(cu[b] + src[b]), int(cu[b + 1])) for b in range(3)])
    dropped = None
    dropped_packed = None
    if with_drop:
        dropped = torch.zeros(3, int(tgt.max()), dtype=torch.bool)
        dropped[0, 1] = dropped[1, 2] = True
        dropped_packed = torch.zeros(N, dtype=torch.bool)
        dropped_packed[int(cu[0] + src[0]) + 1] = True
        dropped_packed[int(cu[1] + src[1]) + 2] = True
    with torch.no_grad():
        sft = model.forward_sft(x0, cu.to(torch.int32), src, x_t_all[target_rows], t_all[target_rows], dropped)
        full = model(x0, x_t_all, t_all, cu.to(torch.int32), int(lens.max()), dropped_packed)
    assert sft.shape == (int(tgt.sum()), 16)
    torch.testing.assert_close(sft, full[target_rows], rtol=0, atol=1e-12)
    # and the mask it used is the pretraining mask's target rows, shifted
    layout = DocLayout(cu, N, int(lens.max()))
    pre = shifted_causal_mask(layout, dropped_packed)
    sft_mask = sft_shifted_causal_mask(src, tgt, dropped)
    for b in range(3):
        for i in range(int(tgt[b])):
            assert torch.equal(sft_mask[b, i], pre[b, int(src[b]) + i])


def test_sft_forward_names_bad_lengths():
    model = TwoTowerLCM(two_tower_tiny()).eval()
    with pytest.raises(ValueError, match="every document needs >= 1 target concept"):
        model.forward_sft(torch.zeros(3, 16), torch.tensor([0, 3], dtype=torch.int32), torch.tensor([3]),
                          torch.zeros(0, 16), torch.zeros(0, dtype=torch.int64))
