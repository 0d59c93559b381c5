"""Convenience wrappers: texts -> SONAR embeddings, and embeddings -> texts.

``TextToEmbedding`` sorts by token length, batches (by count, and optionally by a padded-token budget
``max_tokens``), truncates to the encoder's 514 positions with a
warning (the EOS is lost, as in SONAR), and returns embeddings in input order. ``EmbeddingToText`` decodes
through the decoder's KV cache with SONAR's own defaults (beam 5, its length rule and banned ids; see
``sonar_llm.sonar.generation``), or with any ``GenerationConfig`` (greedy, other caps, sampling);
``EmbeddingToText.reads_as`` tells which embeddings decode greedily to a given text, without decoding them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .decoder import SonarTextDecoder
from .encoder import SonarTextEncoder
from .generation import Draws, GenerationConfig, _per_row, generate, greedy_reads, make_generator
from .tokenizer import NllbTokenizer

__all__ = ["TextToEmbedding", "EmbeddingToText"]


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")


class TextToEmbedding:
    """Encode sentences with a SONAR text encoder."""

    def __init__(self, encoder: SonarTextEncoder, tokenizer: NllbTokenizer, batch_size: int = 64,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 max_tokens: int | None = None) -> None:
        _check_batch_size(batch_size)
        if max_tokens is not None and max_tokens < encoder.cfg.max_seq_len:
            raise ValueError(f"max_tokens must be >= the encoder max_seq_len {encoder.cfg.max_seq_len}, "
                             f"got {max_tokens}")
        self.max_tokens = max_tokens
        if tokenizer.vocab_size > encoder.cfg.vocab_size:
            raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > encoder vocab {encoder.cfg.vocab_size}")
        self.encoder = encoder.eval()
        if device is not None or dtype is not None:
            self.encoder.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.encoder.encoder_frontend.embed.weight.device

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], lang: str | None = None) -> Tensor:
        """texts -> [N, D] fp32 embeddings in input order."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        seqs = self.tokenizer.encode_source(texts, lang, max_len=self.encoder.cfg.max_seq_len)
        out = torch.empty(len(seqs), self.encoder.cfg.model_dim, dtype=torch.float32)
        for idx in self._batches([len(s) for s in seqs]):
            tokens, mask = self.tokenizer.pad_batch([seqs[i] for i in idx], device=self.device)
            out[torch.tensor(idx)] = self.encoder(tokens, mask).float().cpu()
        return out

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices sorted by length, cut into batches of at most ``batch_size`` sentences and (when set)
        ``max_tokens`` padded tokens."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        cur: list[int] = []
        for i in order:
            full = len(cur) == self.batch_size
            if self.max_tokens is not None and cur:
                full = full or (len(cur) + 1) * lengths[i] > self.max_tokens
            if full:
                batches.append(cur)
                cur = []
            cur.append(i)
        if cur:
            batches.append(cur)
        return batches


class EmbeddingToText:
    """Decode SONAR embeddings to text with beam search (``beam_size=1`` is greedy) or sampling."""

    def __init__(self, decoder: SonarTextDecoder, tokenizer: NllbTokenizer, batch_size: int = 32,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        _check_batch_size(batch_size)
        if tokenizer.vocab_size > decoder.cfg.vocab_size:
            raise ValueError(f"tokenizer vocab {tokenizer.vocab_size} > decoder vocab {decoder.cfg.vocab_size}")
        self.decoder = decoder.eval()
        if device is not None or dtype is not None:
            self.decoder.to(device=device, dtype=dtype)
        self.tokenizer = tokenizer
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return self.decoder.decoder_frontend.embed.weight.device

    @torch.inference_mode()
    def decode_ids(self, embeddings: Tensor, lang: str | None = None, beam_size: int = 5,
                   max_gen_len: int | tuple[float, float] | None = None, *, cfg: GenerationConfig | None = None,
                   generator: Draws = None) -> list[list[int]]:
        """[N, E] -> token ids (final EOS removed): the best hypothesis per embedding, or with
        ``cfg.do_sample`` ``cfg.num_samples`` samples per embedding, embedding-major (N * num_samples lists).
        ``cfg`` overrides ``beam_size``/``max_gen_len``; the defaults are SONAR's pipeline (see
        ``sonar_llm.sonar.generation``). Sampling draws from ``generator``, else one seeded from ``cfg.seed``
        for the whole call (so results depend on ``batch_size``); given N generators, one per embedding
        (``story_generator``), each embedding's draws come from its own and do not depend on the batch."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a [N, E] tensor")
        if cfg is None:
            cfg = GenerationConfig(beam_size=beam_size, **({} if max_gen_len is None else {"max_gen_len": max_gen_len}))
        if cfg.do_sample and generator is None:
            generator = make_generator(cfg, self.device)
        own = _per_row(generator, embeddings.size(0))  # one generator per embedding, split with the batches
        lang_id = self.tokenizer.lang_id(lang)
        out: list[list[int]] = []
        for start in range(0, embeddings.size(0), self.batch_size):
            stop = start + self.batch_size
            out += generate(self.decoder, embeddings[start:stop], lang_id, cfg=cfg,
                            generator=generator if own is None else own[start:stop])
        return out

    def decode(self, embeddings: Tensor, lang: str | None = None, beam_size: int = 5,
               max_gen_len: int | tuple[float, float] | None = None, *, cfg: GenerationConfig | None = None,
               generator: Draws = None) -> list[str]:
        """[N, E] -> texts in language ``lang`` (N, or N * num_samples when sampling; see ``decode_ids``)."""
        return self.tokenizer.decode(self.decode_ids(embeddings, lang, beam_size, max_gen_len, cfg=cfg,
                                                     generator=generator))

    @torch.inference_mode()
    def reads_as(self, embeddings: Tensor, text: str, lang: str | None = None, *,
                 cfg: GenerationConfig | None = None) -> Tensor:
        """Bool [N]: whether greedy decoding of each embedding (under ``cfg``'s length rules and bans) gives
        ``text`` as the tokenizer writes it, by one short teacher-forced pass per batch instead of a decode
        (``sonar_llm.sonar.generation.greedy_reads``). A reading spelled with other tokens does not count."""
        if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
            raise ValueError("embeddings must be a [N, E] tensor")
        target = self.tokenizer.tokenize(text)[0]
        lang_id = self.tokenizer.lang_id(lang)
        out = [greedy_reads(self.decoder, embeddings[start:start + self.batch_size], lang_id, target, cfg)
               for start in range(0, embeddings.size(0), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=self.device)
