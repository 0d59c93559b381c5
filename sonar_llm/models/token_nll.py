"""Per-batch token NLL of the families with a token distribution (`FamilySpec.token_nll`).

`sonar_llm_token_nll` and `token_llm_token_nll` score the SAME tokens of the SAME sentences; what they
score and what is comparable is described in `sonar_llm.eval.nll`, which sums them over a held-out set.
Each returns (summed NLL in nats, number of scored tokens) of one `ConceptBatch`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .family import next_sentence_pairs, select_segments

__all__ = ["scored_sentence_mask", "sonar_llm_token_nll", "token_llm_token_nll", "continuation_streams",
           "whole_document_token_nll"]


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
    if cfg.whole_documents:
        raise ValueError("a token LLM over whole-document streams (text_tokenizer) has no sentences in its "
                         "batches; score it from text with whole_document_token_nll")
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


def continuation_streams(tokenizer: Any, stories: list[list[str]], context_sentences: int
                         ) -> list[tuple[list[int], int, int]]:
    """Per story (sentences): (ids, first scored position, continuation bytes) for a whole-document token LLM.

    ids = [BOS] + encode(context) + encode(continuation) + [EOS], context = " ".join(first
    `context_sentences` sentences), continuation = " " + " ".join(the rest) ("" when there is no rest); the
    scored targets are the continuation's ids and the EOS, i.e. positions >= 1 + len(encode(context));
    continuation bytes = its UTF-8 length (the same text `sonar_llm.eval.nll` counts for SONAR sentences)."""
    out = []
    for sents in stories:
        ctx = " ".join(sents[:context_sentences])
        cont = (" " + " ".join(sents[context_sentences:])) if len(sents) > context_sentences else ""
        ctx_ids = tokenizer.encode(ctx)
        cont_ids = tokenizer.encode(cont) if cont else []
        out.append(([tokenizer.bos_id, *ctx_ids, *cont_ids, tokenizer.eos_id], 1 + len(ctx_ids),
                    len(cont.encode("utf-8"))))
    return out


@torch.no_grad()
def whole_document_token_nll(model: nn.Module, stories: list[list[str]], context_sentences: int = 2,
                             device: torch.device | str = "cpu") -> tuple[float, int, int]:
    """(summed NLL in nats, scored tokens, continuation bytes) of a whole-document token LLM on `stories`
    (lists of sentences): each story is run once as `continuation_streams` builds it, conditioned on its
    BOS and its first `context_sentences` sentences; its continuation tokens and EOS are scored."""
    from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy

    tok = model.text_tokenizer()
    items = continuation_streams(tok, stories, context_sentences)
    if not items:
        return 0.0, 0, 0
    was_training = model.training
    model.eval()
    try:
        stream = torch.tensor([t for ids, _, _ in items for t in ids], dtype=torch.int64, device=device)
        lens = torch.tensor([len(ids) for ids, _, _ in items], dtype=torch.int64)
        cu = torch.zeros(len(items) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu[1:])
        targets = torch.full((stream.numel(),), -100, dtype=torch.int64)
        for (ids, first, _), start in zip(items, cu[:-1].tolist()):
            for pos in range(first, len(ids)):  # position pos-1 predicts id pos
                targets[start + pos - 1] = ids[pos]
        targets = targets.to(device)
        hidden = model(stream, cu.to(torch.int32).to(device), int(lens.max()))
        losses = linear_cross_entropy(hidden, model.output_weight.to(hidden.dtype), targets, ignore_index=-100,
                                      reduction="none", impl=model.cfg.lce_impl)
        valid = targets != -100
        return float(losses[valid].double().sum()), int(valid.sum()), sum(b for _, _, b in items)
    finally:
        model.train(was_training)
