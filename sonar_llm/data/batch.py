"""`ConceptBatch`: the packed batch every model family's `loss` receives.

A batch holds several documents, each a sequence of sentences. Nothing is padded: sentence embeddings
are concatenated over documents (`doc_cu_seqlens` marks document boundaries in sentences) and the
target-mode token ids of all sentences are concatenated (`tok_cu_seqlens` marks sentence boundaries
in tokens). See docs/design.md.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ConceptBatch"]


@dataclass
class ConceptBatch:
    """A packed batch of documents.

    Attributes:
        embeddings: [S_total, E] sentence embeddings of all documents, concatenated.
        doc_cu_seqlens: int32 [num_docs + 1] document boundaries in sentences (starts at 0,
            ends at S_total, non-decreasing).
        tokens: int64 [T_total] target-mode token ids (`[3, lang, w1..wn, 3]` per sentence), concatenated.
        tok_cu_seqlens: int32 [S_total + 1] sentence boundaries in `tokens`.
        max_doc_len: the largest number of sentences in one document.
        max_sent_len: the largest number of tokens in one sentence.
    """

    embeddings: torch.Tensor
    doc_cu_seqlens: torch.Tensor
    tokens: torch.Tensor
    tok_cu_seqlens: torch.Tensor
    max_doc_len: int
    max_sent_len: int

    @property
    def num_sentences(self) -> int:
        """Total number of sentences (rows of `embeddings`)."""
        return int(self.embeddings.shape[0])

    @property
    def num_docs(self) -> int:
        """Number of documents in the batch."""
        return int(self.doc_cu_seqlens.numel()) - 1

    @property
    def num_target_tokens(self) -> int:
        """Total number of target-mode token ids (length of `tokens`)."""
        return int(self.tokens.numel())

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def to(self, device: torch.device | str, *, non_blocking: bool = False,
           dtype: torch.dtype | None = None) -> "ConceptBatch":
        """Return a copy on `device`; `dtype`, if given, applies to `embeddings` only."""
        emb = self.embeddings.to(device, non_blocking=non_blocking)
        if dtype is not None:
            emb = emb.to(dtype)
        return ConceptBatch(
            embeddings=emb,
            doc_cu_seqlens=self.doc_cu_seqlens.to(device, non_blocking=non_blocking),
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            tok_cu_seqlens=self.tok_cu_seqlens.to(device, non_blocking=non_blocking),
            max_doc_len=self.max_doc_len,
            max_sent_len=self.max_sent_len,
        )

    def pin_memory(self) -> "ConceptBatch":
        """Pin the host tensors (used by torch DataLoader when `pin_memory=True`)."""
        return ConceptBatch(self.embeddings.pin_memory(), self.doc_cu_seqlens.pin_memory(),
                            self.tokens.pin_memory(), self.tok_cu_seqlens.pin_memory(),
                            self.max_doc_len, self.max_sent_len)

    def validate(self) -> "ConceptBatch":
        """Check shapes, dtypes and offsets; raise ValueError/TypeError naming the bad field. Returns self."""
        for name in ("embeddings", "doc_cu_seqlens", "tokens", "tok_cu_seqlens"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"ConceptBatch.{name} must be a torch.Tensor, got {type(getattr(self, name)).__name__}")
        emb = self.embeddings
        if emb.dim() != 2:
            raise ValueError(f"ConceptBatch.embeddings must be 2-D [S, E], got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"ConceptBatch.embeddings must be floating point, got {emb.dtype}")
        if self.doc_cu_seqlens.dtype != torch.int32:
            raise TypeError(f"ConceptBatch.doc_cu_seqlens must be int32, got {self.doc_cu_seqlens.dtype}")
        if self.tok_cu_seqlens.dtype != torch.int32:
            raise TypeError(f"ConceptBatch.tok_cu_seqlens must be int32, got {self.tok_cu_seqlens.dtype}")
        if self.tokens.dtype != torch.int64:
            raise TypeError(f"ConceptBatch.tokens must be int64, got {self.tokens.dtype}")
        if self.tokens.dim() != 1:
            raise ValueError(f"ConceptBatch.tokens must be 1-D [T], got shape {tuple(self.tokens.shape)}")
        s_total = emb.shape[0]
        doc_cu = self.doc_cu_seqlens
        tok_cu = self.tok_cu_seqlens
        if doc_cu.dim() != 1 or doc_cu.numel() < 1:
            raise ValueError(f"ConceptBatch.doc_cu_seqlens must be 1-D with >= 1 entry, got shape {tuple(doc_cu.shape)}")
        if tok_cu.dim() != 1 or tok_cu.numel() != s_total + 1:
            raise ValueError(f"ConceptBatch.tok_cu_seqlens must have shape [S_total+1] = [{s_total + 1}], "
                             f"got {tuple(tok_cu.shape)}")
        doc_cu_c = doc_cu.detach().to("cpu", torch.int64)
        tok_cu_c = tok_cu.detach().to("cpu", torch.int64)
        if int(doc_cu_c[0]) != 0 or int(doc_cu_c[-1]) != s_total:
            raise ValueError(f"ConceptBatch.doc_cu_seqlens must start at 0 and end at S_total={s_total}, "
                             f"got {int(doc_cu_c[0])}..{int(doc_cu_c[-1])}")
        if int(tok_cu_c[0]) != 0 or int(tok_cu_c[-1]) != self.tokens.numel():
            raise ValueError(f"ConceptBatch.tok_cu_seqlens must start at 0 and end at T_total={self.tokens.numel()}, "
                             f"got {int(tok_cu_c[0])}..{int(tok_cu_c[-1])}")
        doc_lens = doc_cu_c.diff()
        sent_lens = tok_cu_c.diff()
        if doc_lens.numel() and int(doc_lens.min()) < 0:
            raise ValueError("ConceptBatch.doc_cu_seqlens must be non-decreasing")
        if sent_lens.numel() and int(sent_lens.min()) < 1:
            raise ValueError("ConceptBatch.tok_cu_seqlens must be strictly increasing (every sentence has >= 1 token)")
        want_doc = int(doc_lens.max()) if doc_lens.numel() else 0
        want_sent = int(sent_lens.max()) if sent_lens.numel() else 0
        if self.max_doc_len != want_doc:
            raise ValueError(f"ConceptBatch.max_doc_len={self.max_doc_len} but the longest document has {want_doc} sentences")
        if self.max_sent_len != want_sent:
            raise ValueError(f"ConceptBatch.max_sent_len={self.max_sent_len} but the longest sentence has {want_sent} tokens")
        devices = {t.device for t in (emb, doc_cu, self.tokens, tok_cu)}
        if len(devices) != 1:
            raise ValueError(f"ConceptBatch tensors are on different devices: {sorted(str(d) for d in devices)}")
        return self
