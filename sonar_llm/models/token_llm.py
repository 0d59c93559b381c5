"""TokenLLM: the token-level baseline on the same Backbone, over SONAR tokenizer ids or a user's tokenizer.

Two data formats:
  * SONAR sentences (default, `text_tokenizer` ""): each document becomes one token stream: a BOS (id 2,
    `prepend_bos`), then every sentence's target-mode ids `[3, lang, w1..wn, 3]` with the `[3, lang]` prefix
    stripped, so sentences are separated by their EOS (3): `2 w.. 3 w.. 3 ...`.
  * the paper's token baseline (`text_tokenizer` = a tokenizer.json or SentencePiece model): each document
    is stored as one segment `[BOS] + ids(story) + [EOS]` by `sonar_llm.data.preprocess_tokens` (whole
    stories, no sentence splitting) and used as it is (`prefix_len` and `prepend_bos` do not apply). The
    build checks the tokenizer file against the data manifest (same sha256).
Streams are packed per document (no padding, causal inside each
document, positions restart). Every stream position but the last predicts the next id; the loss is the
mean cross-entropy over predicted tokens, computed with `sonar_kernels`' fused linear cross-entropy
(the [tokens, vocab] logits are never materialised). The output projection is tied to the input
embedding by default (`tie_embeddings`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .backbone import Backbone, BackboneConfig
from .family import ConceptFamily, causal_attention_flops

__all__ = ["TokenLLMConfig", "TokenLLM", "document_token_streams"]


@dataclass
class TokenLLMConfig:
    """Token LLM options: the backbone, embedding tying, the stream's special ids and prefix length."""

    backbone: BackboneConfig  # the shared Transformer trunk
    tie_embeddings: bool = True  # output projection = input embedding (the public LlamaConfig tie_word_embeddings)
    prepend_bos: bool = True  # SONAR format: a BOS before each document's stream
    bos_id: int = 2  # SONAR format: that BOS id
    prefix_len: int = 2  # SONAR format: target-mode prefix [3, lang] stripped from every sentence
    lce_impl: str = "auto"  # sonar_kernels linear_cross_entropy backend
    text_tokenizer: str = ""  # a tokenizer.json / SentencePiece model: whole-document streams ("" = SONAR format)

    @property
    def whole_documents(self) -> bool:
        """True for the paper's format (each stored segment is a whole [BOS] ... [EOS] document)."""
        return bool(self.text_tokenizer)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, BackboneConfig):
            raise TypeError(f"TokenLLMConfig.backbone must be a BackboneConfig, got {type(self.backbone).__name__}")
        if self.prefix_len < 0:
            raise ValueError(f"TokenLLMConfig.prefix_len must be >= 0, got {self.prefix_len}")


def document_token_streams(
    tokens: Tensor,
    tok_cu_seqlens: Tensor,
    doc_cu_seqlens: Tensor,
    *,
    prefix_len: int = 2,
    bos_id: int | None = 2,
) -> tuple[Tensor, Tensor, int]:
    """Per-document token streams from a `ConceptBatch`'s packed target-mode sentences.

    Drops the first `prefix_len` ids of every sentence, concatenates each document's sentences and
    prepends `bos_id` (None: no BOS). Returns (stream int64 [T'], stream_cu_seqlens int32 [D+1],
    longest stream)."""
    device = tokens.device
    tcu = tok_cu_seqlens.to(torch.int64)
    dcu = doc_cu_seqlens.to(torch.int64)
    sent_lens = tcu[1:] - tcu[:-1]
    if prefix_len and bool((sent_lens <= prefix_len).any()):
        raise ValueError(f"every sentence needs more than prefix_len={prefix_len} tokens to keep any word or EOS")
    sent_of_token = torch.repeat_interleave(torch.arange(sent_lens.numel(), device=device), sent_lens,
                                            output_size=tokens.numel())
    keep = (torch.arange(tokens.numel(), device=device) - tcu[:-1][sent_of_token]) >= prefix_len
    kept = tokens[keep]
    kept_per_sent = sent_lens - prefix_len
    kept_cum = torch.zeros(sent_lens.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(kept_per_sent, 0, out=kept_cum[1:])
    kept_per_doc = kept_cum[dcu[1:]] - kept_cum[dcu[:-1]]
    extra = 1 if bos_id is not None else 0
    doc_lens = kept_per_doc + extra
    cu = torch.zeros(doc_lens.numel() + 1, dtype=torch.int64, device=device)
    torch.cumsum(doc_lens, 0, out=cu[1:])
    total = int(cu[-1])
    if bos_id is None:
        stream = kept
    else:
        stream = torch.full((total,), bos_id, dtype=tokens.dtype, device=device)
        is_bos = torch.zeros(total, dtype=torch.bool, device=device)
        is_bos[cu[:-1][doc_lens > 0]] = True
        stream[~is_bos] = kept
    max_len = int(doc_lens.max()) if doc_lens.numel() else 0
    return stream, cu.to(torch.int32), max_len


class TokenLLM(ConceptFamily):
    """Embedding -> Backbone -> (tied) output projection over a `vocab_size` vocabulary.
    `cfg` is a `TokenLLMConfig` or a `BackboneConfig` (then the defaults)."""

    def __init__(self, cfg: TokenLLMConfig | BackboneConfig, vocab_size: int) -> None:
        super().__init__()
        if isinstance(cfg, BackboneConfig):
            cfg = TokenLLMConfig(backbone=cfg)
        if not isinstance(cfg, TokenLLMConfig):
            raise TypeError(f"TokenLLM expects a TokenLLMConfig or BackboneConfig, got {type(cfg).__name__}")
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.cfg = cfg
        self.vocab_size = vocab_size
        d = cfg.backbone.model_dim
        self.embed = nn.Embedding(vocab_size, d)
        self.backbone = Backbone(cfg.backbone)
        self.output_proj = None if cfg.tie_embeddings else nn.Linear(d, vocab_size, bias=False)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, 0.0, cfg.backbone.init_std)
            if self.output_proj is not None:
                nn.init.normal_(self.output_proj.weight, 0.0, cfg.backbone.init_std)

    @property
    def output_weight(self) -> Tensor:
        """[V, d] weight of the output projection (the embedding when tied)."""
        return self.embed.weight if self.output_proj is None else self.output_proj.weight

    def _check_ids(self, ids: Tensor) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be int64, got {ids.dtype}")

    def forward(self, stream: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
        """Packed token streams [T] -> final hidden states [T, d]."""
        self._check_ids(stream)
        return self.backbone(self.embed(stream), cu_seqlens, max_seqlen)

    def logits(self, hidden: Tensor) -> Tensor:
        """Hidden states [..., d] -> logits [..., V] (generation; training never builds them)."""
        return hidden @ self.output_weight.t()

    def streams(self, batch) -> tuple[Tensor, Tensor, int]:
        if self.cfg.whole_documents:  # stored as [BOS] ... [EOS]: used as they are
            return document_token_streams(batch.tokens, batch.tok_cu_seqlens, batch.doc_cu_seqlens,
                                          prefix_len=0, bos_id=None)
        return document_token_streams(batch.tokens, batch.tok_cu_seqlens, batch.doc_cu_seqlens,
                                      prefix_len=self.cfg.prefix_len,
                                      bos_id=self.cfg.bos_id if self.cfg.prepend_bos else None)

    def text_tokenizer(self):
        """The `TextTokenizer` of `cfg.text_tokenizer` (loaded once); ValueError in the SONAR format."""
        if not self.cfg.whole_documents:
            raise ValueError("this token LLM reads SONAR tokenizer ids (no text_tokenizer)")
        tok = getattr(self, "_text_tokenizer", None)
        if tok is None:
            from sonar_llm.data.text_tokenizer import load_text_tokenizer

            tok = load_text_tokenizer(self.cfg.text_tokenizer)
            if tok.vocab_size > self.vocab_size:
                raise ValueError(f"{self.cfg.text_tokenizer}: {tok.vocab_size} ids, more than the model's "
                                 f"{self.vocab_size}")
            self._text_tokenizer = tok
        return tok

    def loss(self, batch) -> tuple[Tensor, dict[str, Any]]:
        """Mean next-token cross-entropy over every stream position that has a successor."""
        from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy

        stream, cu, max_len = self.streams(batch)
        hidden = self(stream, cu, max_len)
        targets = torch.roll(stream, -1)
        is_last = torch.zeros(stream.numel(), dtype=torch.bool, device=stream.device)
        ends = cu[1:].to(torch.int64) - 1
        is_last[ends[ends >= cu[:-1].to(torch.int64)]] = True
        targets = targets.masked_fill(is_last, -100)
        loss = linear_cross_entropy(hidden, self.output_weight.to(hidden.dtype), targets, ignore_index=-100,
                                    reduction="mean", impl=self.cfg.lce_impl)
        num_targets = int(stream.numel() - int(is_last.sum()))
        return loss, {"ce": loss.detach(), "target_tokens": num_targets}

    def flops_per_batch(self, batch) -> float:
        """6 x (backbone params + V x d output projection) x tokens + 3 x causal attention FLOPs."""
        _, cu, _ = self.streams(batch)
        cfg = self.cfg.backbone
        num_tokens = float(cu[-1])
        params = sum(p.numel() for p in self.backbone.parameters()) + self.output_weight.numel()
        flops = 6.0 * params * num_tokens
        return flops + 3.0 * causal_attention_flops(cu, cfg.num_layers, cfg.num_heads, cfg.head_dim)


def vocab_size_from_state(state: dict[str, Tensor]) -> dict[str, Any]:
    """`vocab_size` of a trained token LLM: the rows of its embedding."""
    if "embed.weight" not in state:
        raise ValueError("state has no 'embed.weight'")
    return {"vocab_size": int(state["embed.weight"].shape[0])}


def build_from_config(cfg) -> TokenLLM:
    """Token LLM from a `ModelConfig`: preset backbone (+ overrides), TokenLLMConfig fields from the other
    overrides, `vocab_size` from the overrides or the data (manifest, else max token id + 1)."""
    from .build import check_fields, dataset_vocab_size, preset_of, split_overrides
    from .presets import backbone_config

    preset = preset_of(cfg)
    bb_over, fam_over = split_overrides(cfg.overrides)
    vocab_size = fam_over.pop("vocab_size", None)
    check_fields(TokenLLMConfig, fam_over, cfg.family)
    stream = _check_data_format(cfg.data_path, str(fam_over.get("text_tokenizer") or "")) if cfg.data_path else None
    if vocab_size is None:
        if not cfg.data_path:
            raise ValueError("model.overrides.vocab_size: needed when there is no data.path to read it from")
        vocab_size = int(stream["vocab_size"]) if stream else dataset_vocab_size(cfg.data_path)
    return TokenLLM(TokenLLMConfig(backbone=backbone_config(preset, **bb_over), **fam_over), vocab_size=vocab_size)


def _check_data_format(data_path: str, text_tokenizer: str) -> dict | None:
    """The data's `token_stream` record, checked against `model.overrides.text_tokenizer` (ValueError)."""
    from sonar_llm.data.preprocess_tokens import token_stream_info
    from sonar_llm.data.shards import read_manifest

    stream = token_stream_info(read_manifest(data_path))
    if stream is None:
        if text_tokenizer:
            raise ValueError(f"model.overrides.text_tokenizer: data.path {data_path} holds SONAR sentences, not "
                             f"whole-document streams (make them with python -m sonar_llm.data.preprocess_tokens)")
        return None
    if not text_tokenizer:
        raise ValueError(f"model.overrides.text_tokenizer: data.path {data_path} holds whole-document streams made "
                         f"with {stream.get('identity')}; set it to that tokenizer file")
    from sonar_llm.data.text_tokenizer import load_text_tokenizer

    tok = load_text_tokenizer(text_tokenizer)
    if tok.identity != stream.get("identity"):
        raise ValueError(f"model.overrides.text_tokenizer: {tok.identity} is not the tokenizer data.path "
                         f"{data_path} was made with ({stream.get('identity')})")
    if (tok.bos_id, tok.eos_id) != (stream.get("bos_id"), stream.get("eos_id")):
        raise ValueError(f"model.overrides.text_tokenizer: BOS/EOS ids {tok.bos_id}/{tok.eos_id} found by name differ "
                         f"from the data's {stream.get('bos_id')}/{stream.get('eos_id')}")
    return stream


def _spec():
    from .family import FamilySpec
    from .stories import token_llm_stories
    from .token_nll import token_llm_token_nll

    return FamilySpec(model_cls=TokenLLM, build=build_from_config, story_generator=token_llm_stories,
                      token_nll=token_llm_token_nll, trained_overrides=vocab_size_from_state,
                      title="token LLM", loss_name="token CE (nats)")


SPEC = _spec()
