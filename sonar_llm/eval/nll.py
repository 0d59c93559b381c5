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

from sonar_llm.models.family import FAMILIES, get_family
from sonar_llm.models.token_nll import scored_sentence_mask, sonar_llm_token_nll, token_llm_token_nll

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


def dataset_token_nll(model: nn.Module, family: str, data: Any | Sequence[Any], cfg: NLLConfig | None = None,
                      device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean token NLL / perplexity of `family` (a registry name whose spec has a `token_nll`) over a
    held-out `ShardedDataset` (or a path to one, or a list of ConceptBatches)."""
    cfg = cfg or NLLConfig()
    fn = get_family(family).token_nll
    if fn is None:
        scorable = sorted(name for name in FAMILIES if get_family(name).token_nll is not None)
        raise ValueError(f"token NLL is defined for {scorable}, not for family {family!r}")
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        from pathlib import Path

        from sonar_llm.data.shards import ShardedDataset

        if not Path(data).exists():
            raise FileNotFoundError(f"held-out shard directory not found: {data}")
        data = ShardedDataset(data)
    batches = data if isinstance(data, (list, tuple)) else batches_from_dataset(data, cfg, device=device)
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
