"""Teacher-forced end recall: does a concept model predict the end of a document where it ends, and only there?

Every held-out document is given as in training: its sentences' SONAR embeddings followed by the end-of-document
sentence's. The model reads the true prefix at every position (teacher forcing, one causal pass per batch of
documents) and predicts the next embedding; every prediction is decoded with the evaluation's SONAR decoding.

- ``end_recall``: the share of documents whose prediction after their last real sentence (the true end) decodes
  to the end sentence exactly;
- ``false_end_rate``: the share of the other predictions (a real sentence follows) that decode to it.

A model that cannot say "the end" where a document ends never stops by itself; one that says it elsewhere stops
early. This needs a model that predicts the next SONAR embedding from its backbone's hidden state
(``embed_inputs`` / ``backbone.forward_padded`` / ``predict_embedding``: SONAR-LLM).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["supports_end_recall", "teacher_forced_end_recall"]


def supports_end_recall(model: nn.Module) -> bool:
    """Whether ``model`` predicts the next SONAR embedding directly (what the measurement needs)."""
    return all(callable(getattr(model, n, None)) for n in ("embed_inputs", "predict_embedding")) and callable(
        getattr(getattr(model, "backbone", None), "forward_padded", None))


@torch.no_grad()
def teacher_forced_end_recall(model: nn.Module, docs: Sequence[Tensor], end_embedding: Tensor, end_text: str,
                              decode_fn: Callable[[Tensor], list[str]], *, batch_size: int = 16,
                              max_examples: int = 5) -> dict:
    """``docs``: the documents' sentence embeddings ([n_i, E], the end sentence not included); returns
    ``end_recall``, ``false_end_rate``, the counts behind them and up to ``max_examples`` missed ends (what the
    prediction at the true end decoded to)."""
    if not supports_end_recall(model):
        raise ValueError(f"{type(model).__name__} does not predict SONAR embeddings (no predict_embedding)")
    docs = [d for d in docs if d.shape[0] > 0]
    if not docs:
        raise ValueError("teacher_forced_end_recall: no document with a sentence")
    p = next(model.parameters())
    end = end_embedding.reshape(1, -1).to(device=p.device, dtype=p.dtype)
    was_training = model.training
    model.eval()
    preds: list[Tensor] = []  # per document: [n_i, E], row n_i - 1 predicts the end sentence
    try:
        for start in range(0, len(docs), batch_size):
            chunk = [d.to(device=p.device, dtype=p.dtype) for d in docs[start:start + batch_size]]
            longest = max(d.shape[0] for d in chunk)
            x = end.new_zeros(len(chunk), longest, end.shape[1])  # right-padded: causal, pads never seen
            for i, d in enumerate(chunk):
                x[i, :d.shape[0]] = d
            hidden = model.backbone.forward_padded(model.embed_inputs(x))
            pred = model.predict_embedding(hidden).float()
            preds += [pred[i, :d.shape[0]] for i, d in enumerate(chunk)]
    finally:
        model.train(was_training)
    texts = decode_fn(torch.cat(preds))
    want = end_text.strip()
    hits_end, false_ends, others, misses, i = 0, 0, 0, [], 0
    for d in docs:
        n = d.shape[0]
        said = [t.strip() == want for t in texts[i:i + n]]
        false_ends += sum(said[:-1])
        others += n - 1
        if said[-1]:
            hits_end += 1
        elif len(misses) < max_examples:
            misses.append(texts[i + n - 1])
        i += n
    return {"end_recall": hits_end / len(docs), "false_end_rate": false_ends / others if others else 0.0,
            "documents": len(docs), "other_positions": others, "false_ends": false_ends,
            "missed_end_examples": misses}
