"""Perplexity-style numbers the SONAR-LLM and the token LLM can share: token NLL of true next sentences.

Both models score the SAME tokens of the SAME held-out sentences with the SAME SONAR tokenizer:

* every document's first `context_sentences` (2) sentences are context only and are not scored;
* every later sentence k (the end-of-document sentence included) is scored on its words and closing
  EOS, i.e. the target-mode ids `[3, lang, w1..wn, 3]` minus the leading `[3, lang]`: n + 1 tokens.

SONAR-LLM (`sonar_llm_token_nll`): the model reads the TRUE embeddings of sentences 0..k-1 (teacher
forcing at the concept level), predicts e^_k, and the frozen SONAR decoder, teacher-forced on sentence
k's tokens with e^_k as its only cross-attention key, gives per-token cross-entropies (the fused
kernel's `reduction="none"` losses of `PackedSonarDecoder.loss`). The decoder's first label, the
language tag predicted from EOS, is forced by the protocol and is not scored.

Token LLM (`token_llm_token_nll`): the document's token stream `2 w.. 3 w.. 3 ...` (as in training)
is run once; the cross-entropy of every token of sentences k >= context_sentences is summed.

What is comparable: the scored token set, the tokenizer and the sentences are identical, so the two
mean NLLs (nats per token) and perplexities are over the same events. What is not: the conditioning.
The token LLM sees the exact previous tokens; the SONAR-LLM sees the previous sentences only through
their SONAR embeddings (lossy) and sees the current sentence's earlier tokens only inside the frozen
decoder. The SONAR-LLM number is therefore an upper bound of what its concept-level prediction
"knows"; it is not a likelihood of its free-running generation (which decodes with beam search).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .metrics import token_nll_summary

__all__ = [
    "NLLConfig",
    "scored_sentence_mask",
    "sonar_llm_token_nll",
    "token_llm_token_nll",
    "batches_from_dataset",
    "dataset_token_nll",
]


@dataclass
class NLLConfig:
    """Which documents and sentences are scored, and how they are batched."""

    context_sentences: int = 2  # leading sentences of each document used as context only
    max_docs: int = 256  # documents of the held-out set to score (the first ones, in order)
    docs_per_batch: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.context_sentences, int) or self.context_sentences < 1:
            raise ValueError(f"NLLConfig.context_sentences must be an int >= 1, got {self.context_sentences!r}")
        for name in ("max_docs", "docs_per_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"NLLConfig.{name} must be a positive int, got {v!r}")


def scored_sentence_mask(doc_cu_seqlens: Tensor, num_sentences: int, context_sentences: int) -> Tensor:
    """bool [S]: True for sentences at position >= context_sentences inside their document."""
    if context_sentences < 1:
        raise ValueError(f"context_sentences must be >= 1, got {context_sentences}")
    cu = doc_cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    doc_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths,
                                      output_size=num_sentences)
    position = torch.arange(num_sentences, device=cu.device) - cu[:-1][doc_of]
    return position >= context_sentences


def _check_batch(batch: Any) -> None:
    for name in ("embeddings", "doc_cu_seqlens", "tokens", "tok_cu_seqlens"):
        if not isinstance(getattr(batch, name, None), Tensor):
            raise TypeError(f"batch.{name} must be a tensor (a ConceptBatch is expected)")
    if int(batch.tok_cu_seqlens.numel()) != int(batch.embeddings.shape[0]) + 1:
        raise ValueError(f"batch.tok_cu_seqlens has {batch.tok_cu_seqlens.numel()} entries for "
                         f"{batch.embeddings.shape[0]} sentences (expected S + 1)")


@torch.no_grad()
def sonar_llm_token_nll(model: nn.Module, batch: Any, context_sentences: int = 2) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of a SONAR-LLM on a `ConceptBatch` (see the module
    docstring: sentences k >= context_sentences, words + EOS, true previous embeddings)."""
    from sonar_llm.models.family import next_sentence_pairs, select_segments

    _check_batch(batch)
    packed = model.packed_decoder
    emb = batch.embeddings
    if packed.cross_weight.device != emb.device:
        model.decoder_to(emb.device)
    was_training = model.training
    model.eval()
    try:
        pred_rows, tgt_rows = next_sentence_pairs(batch.doc_cu_seqlens, emb.shape[0])
        scored = scored_sentence_mask(batch.doc_cu_seqlens, emb.shape[0], context_sentences)
        keep = scored.index_select(0, tgt_rows)
        pred_rows, tgt_rows = pred_rows[keep], tgt_rows[keep]
        if tgt_rows.numel() == 0:
            return 0.0, 0
        hidden = model.backbone(model.embed_inputs(emb), batch.doc_cu_seqlens, batch.max_doc_len)
        pred = model.predict_embedding(hidden.index_select(0, pred_rows))
        tokens, tok_cu = select_segments(batch.tokens, batch.tok_cu_seqlens, tgt_rows)
        prepared = packed.prepare(tokens, tok_cu)
        losses = packed.loss(pred.to(packed.dtype), prepared, reduction="none")
        mask = prepared.positions >= 1  # label 0 is the language tag, forced by the protocol
        return float(losses[mask].double().sum()), int(mask.sum())
    finally:
        model.train(was_training)


@torch.no_grad()
def token_llm_token_nll(model: nn.Module, batch: Any, context_sentences: int = 2) -> tuple[float, int]:
    """(summed NLL in nats, number of scored tokens) of a token LLM on a `ConceptBatch`: one forward of
    each document's training stream; tokens of sentences k >= context_sentences are scored."""
    from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy

    _check_batch(batch)
    cfg = model.cfg
    was_training = model.training
    model.eval()
    try:
        stream, cu, max_len = model.streams(batch)
        num_sent = int(batch.embeddings.shape[0])
        tcu = batch.tok_cu_seqlens.to(torch.int64)
        sent_lens = tcu[1:] - tcu[:-1]
        kept = sent_lens - cfg.prefix_len  # stream tokens per sentence
        scored = scored_sentence_mask(batch.doc_cu_seqlens, num_sent, context_sentences)
        # sentence id of every stream position (-1 for the BOS), in stream order
        dcu = batch.doc_cu_seqlens.to(torch.int64)
        sent_ids = []
        bos = cfg.prepend_bos
        for d in range(dcu.numel() - 1):
            rows = torch.arange(int(dcu[d]), int(dcu[d + 1]))
            ids = torch.repeat_interleave(rows, kept[rows])
            if bos:
                ids = torch.cat([ids.new_full((1,), -1), ids])
            sent_ids.append(ids)
        sent_of_pos = torch.cat(sent_ids).to(stream.device)
        if sent_of_pos.numel() != stream.numel():
            raise ValueError(f"token stream has {stream.numel()} positions but the sentences account for "
                             f"{sent_of_pos.numel()}")
        hidden = model(stream, cu, max_len)
        # position p predicts token p+1 of the same document
        targets = torch.full_like(stream, -100)
        starts = cu[:-1].to(torch.int64)
        is_start = torch.zeros(stream.numel() + 1, dtype=torch.bool, device=stream.device)
        is_start[starts] = True
        nxt = torch.arange(1, stream.numel() + 1, device=stream.device)
        valid = ~is_start[nxt]  # the next position is in the same document
        valid[-1] = False
        nxt_c = nxt.clamp(max=stream.numel() - 1)
        target_sent = sent_of_pos[nxt_c]
        valid &= target_sent >= 0
        valid &= scored.to(stream.device)[target_sent.clamp(min=0)]
        targets[valid] = stream[nxt_c][valid]
        losses = linear_cross_entropy(hidden, model.output_weight.to(hidden.dtype), targets, ignore_index=-100,
                                      reduction="none", impl=cfg.lce_impl)
        return float(losses[valid].double().sum()), int(valid.sum())
    finally:
        model.train(was_training)


def batches_from_dataset(dataset: Any, cfg: NLLConfig, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Iterable[Any]:
    """ConceptBatches of the first `cfg.max_docs` documents of a `ShardedDataset`, `docs_per_batch` each."""
    from sonar_llm.data.batch import ConceptBatch

    n = min(int(dataset.num_docs), cfg.max_docs)
    if n == 0:
        raise ValueError("the held-out dataset has no documents")
    for start in range(0, n, cfg.docs_per_batch):
        embs, toks, sent_lens, doc_lens = [], [], [], []
        for i in range(start, min(n, start + cfg.docs_per_batch)):
            emb, tokens, offs = dataset.doc(i)
            embs.append(torch.as_tensor(emb).to(torch.float32))
            toks.append(np.asarray(tokens, dtype=np.int64))
            sent_lens.append(np.diff(np.asarray(offs, dtype=np.int64)))
            doc_lens.append(int(emb.shape[0]))
        lens = np.concatenate(sent_lens)
        yield ConceptBatch(
            embeddings=torch.cat(embs).to(device=device, dtype=dtype),
            doc_cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(doc_lens)]).astype(np.int32)).to(device),
            tokens=torch.from_numpy(np.concatenate(toks)).to(device),
            tok_cu_seqlens=torch.from_numpy(np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)).to(device),
            max_doc_len=max(doc_lens), max_sent_len=int(lens.max()),
        )


NLL_FUNCTIONS = {"sonar_llm": sonar_llm_token_nll, "token_llm": token_llm_token_nll}


def dataset_token_nll(model: nn.Module, family: str, data: Any | Sequence[Any], cfg: NLLConfig | None = None,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean token NLL / perplexity of `family` ("sonar_llm" or "token_llm") over a held-out
    `ShardedDataset` (or a path to one, or a list of ConceptBatches)."""
    cfg = cfg or NLLConfig()
    if family not in NLL_FUNCTIONS:
        raise ValueError(f"token NLL is defined for {sorted(NLL_FUNCTIONS)}, not for family {family!r}")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from pathlib import Path

        from sonar_llm.data.shards import ShardedDataset

        if not Path(data).exists():
            raise FileNotFoundError(f"held-out shard directory not found: {data}")
        data = ShardedDataset(data)
    batches = data if isinstance(data, (list, tuple)) else batches_from_dataset(data, cfg, device=device)
    fn = NLL_FUNCTIONS[family]
    total, count = 0.0, 0
    for batch in batches:
        s, n = fn(model, batch, cfg.context_sentences)
        total += s
        count += n
    if count == 0:
        raise ValueError(f"no token was scored: every document has <= context_sentences="
                         f"{cfg.context_sentences} sentences")
    out = token_nll_summary(total, count)
    out["context_sentences"] = cfg.context_sentences
    return out
