"""Story generation for the evaluation protocol: text prompts in, text continuations out, per family.

`FamilySpec.story_generator(model, ctx: StoryContext) -> generate(prompts: list[list[str]]) ->
list[StoryContinuation]` (per prompt story: its new sentences, a `list[str]`, with `.stop_reason`, one of
`sonar_llm.models.generate.STOP_REASONS`):
  * `concept_stories(concepts)`: encode the prompt sentences, run the family's concept-level generation
    (`FamilySpec.generate`), decode per story, record (embedding, text) for the round trip (Base-LCM,
    Two-Tower LCM);
  * `sonar_llm_stories`: the same through `generate_sonar_llm`, recording every decoded prediction and
    its re-encoding (the end-of-document one included) as the paper's loop produces them;
  * `token_llm_stories`: greedy decoding of the prompt's token stream, split at the sentence EOS ids, cut
    at the end-of-document sentence (`STOP_END`) and the sentence limit (`STOP_SENTENCE_CAP`); a story that
    reaches neither within `max_new_tokens` is `STOP_TOKEN_CAP`, its unterminated last sentence kept.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .generate import (
    STOP_END,
    STOP_SENTENCE_CAP,
    STOP_TOKEN_CAP,
    GenerationSettings,
    generate_sonar_llm,
    generate_token_llm,
)

__all__ = ["StoryContext", "StoryFn", "StoryContinuation", "concept_stories", "sonar_llm_stories", "token_llm_stories",
           "whole_document_stories"]



class StoryContinuation(list):
    """A story's new sentences (a plain `list[str]` to every reader) and why its generation stopped."""

    def __init__(self, sentences=(), stop_reason: str = STOP_SENTENCE_CAP) -> None:
        super().__init__(sentences)
        self.stop_reason = stop_reason


StoryFn = Callable[[list[list[str]]], list[StoryContinuation]]
RecordFn = Callable[[Tensor, list[str], "Tensor | None"], None]


@dataclass
class StoryContext:
    """What the story generators read: the concept settings plus the token-level ones."""

    settings: GenerationSettings  # max_sentences = the story limit (prompt included); eos = end sentence
    end_of_doc_text: str = ""  # the end-of-document sentence (the token LLM stops at it)
    tokenizer: Any = None  # NllbTokenizer (token LLM: prompt ids and decoding)
    lang: str = "eng_Latn"
    max_new_tokens: int = 512  # token LLM cap per story
    record: RecordFn | None = None  # record(generated embeddings [m, E], their texts, re-encodings or None)
    story_draws: Callable[[int], list[torch.Generator]] | None = None  # SONAR-LLM, sampling: the decoder's
    # generators of the next n stories, one each (evaluate: `story_generator(seed, story number)`); None =
    # settings.decode_draws, else decode_fn's own generator


def _prompt_encoder(model: nn.Module, encode_fn) -> Callable[[list[list[str]]], list[Tensor]]:
    device = next(model.parameters()).device

    def encode_prompts(prompts: list[list[str]]) -> list[Tensor]:
        flat = [s for p in prompts for s in p]
        emb = encode_fn(flat).to(device)
        out, i = [], 0
        for p in prompts:
            out.append(emb[i:i + len(p)])
            i += len(p)
        return out

    return encode_prompts


def concept_stories(concepts: Callable[..., list]) -> Callable[[nn.Module, StoryContext], StoryFn]:
    """A story generator over the concept-level generation `concepts(model, prompts, settings)`."""

    def story_generator(model: nn.Module, ctx: StoryContext) -> StoryFn:
        encode_prompts = _prompt_encoder(model, ctx.settings.encode_fn)

        def generate(prompts: list[list[str]]) -> list[list[str]]:
            res = concepts(model, encode_prompts(prompts), ctx.settings)
            if ctx.record is not None:
                for r in res:
                    if r.embeddings.shape[0]:
                        ctx.record(r.embeddings, list(r.texts), None)
            return [StoryContinuation(r.texts, r.stop_reason) for r in res]

        return generate

    return story_generator


def sonar_llm_stories(model: nn.Module, ctx: StoryContext) -> StoryFn:
    """SONAR-LLM stories: every decoded prediction and its re-encoding is recorded."""
    s = ctx.settings
    encode_prompts = _prompt_encoder(model, s.encode_fn)

    def generate(prompts: list[list[str]]) -> list[list[str]]:
        pending: list[tuple[Tensor, list[str]]] = []

        def dec(e: Tensor, **kw) -> list[str]:
            texts = s.decode_fn(e, **kw)  # draws=, when the stories have their own generators
            pending.append((e, list(texts)))
            return texts

        def enc(texts: list[str]) -> Tensor:
            out = s.encode_fn(texts)
            if ctx.record is not None:
                e, decoded = pending.pop()
                ctx.record(e, decoded, out)
            return out

        res = generate_sonar_llm(model, encode_prompts(prompts), dec, enc, max_sentences=s.max_sentences,
                                 eos_embedding=s.eos_embedding, eos_threshold=s.eos_threshold, reencode=True,
                                 stop_on_repetition_cosine_threshold=s.stop_on_repetition_cosine_threshold,
                                 reads_as_end=s.reads_as_end,
                                 draws=ctx.story_draws(len(prompts)) if ctx.story_draws else s.decode_draws)
        return [StoryContinuation(r.texts, r.stop_reason) for r in res]

    return generate


def whole_document_stories(model: nn.Module, ctx: StoryContext) -> StoryFn:
    """Token LLM stories over whole-document streams (its own `text_tokenizer`): the prompt sentences joined
    by " " after the BOS, greedy (KV-cached) until the EOS or `ctx.max_new_tokens`, the new text split into
    sentences (`split_sentences`) and cut at the story limit."""
    from sonar_llm.data.segment import split_sentences

    tok = model.text_tokenizer()
    device = next(model.parameters()).device
    limit = ctx.settings.max_sentences

    def generate(prompts: list[list[str]]) -> list[list[str]]:
        ids = [torch.tensor([tok.bos_id, *tok.encode(" ".join(p))], dtype=torch.int64, device=device)
               for p in prompts]
        outs = generate_token_llm(model, ids, max_new_tokens=ctx.max_new_tokens, stop_ids=(tok.eos_id,))
        conts = []
        for p, o in zip(prompts, outs):
            sents, room = split_sentences(tok.decode(o)), max(0, limit - len(p))
            reason = (STOP_SENTENCE_CAP if len(sents) > room else STOP_END if len(o) < ctx.max_new_tokens
                      else STOP_TOKEN_CAP)  # the EOS (not returned) came before the cap, or the cap cut the text
            conts.append(StoryContinuation(sents[:room], reason))
        return conts

    return generate


def token_llm_stories(model: nn.Module, ctx: StoryContext) -> StoryFn:
    """Token LLM stories (greedy, KV-cached) in SONAR's tokenization (or, with a `text_tokenizer`, in its
    own: `whole_document_stories`)."""
    if model.cfg.whole_documents:
        return whole_document_stories(model, ctx)
    tokenizer = ctx.tokenizer
    if tokenizer is None:
        raise ValueError("token LLM story generation needs ctx.tokenizer")
    device = next(model.parameters()).device
    eos_id = tokenizer.eos_idx
    prefix = model.cfg.prefix_len
    bos = [model.cfg.bos_id] if model.cfg.prepend_bos else []
    limit = ctx.settings.max_sentences
    eod_text = ctx.end_of_doc_text.strip()

    def generate(prompts: list[list[str]]) -> list[list[str]]:
        ids = []
        for p in prompts:
            seq = list(bos)
            for t in tokenizer.encode_target(p, ctx.lang):
                seq.extend(int(x) for x in list(t)[prefix:])
            ids.append(torch.tensor(seq, dtype=torch.int64, device=device))
        outs = generate_token_llm(model, ids, max_new_tokens=ctx.max_new_tokens, stop_ids=())
        conts = []
        for p, toks in zip(prompts, outs):
            sents, cur = [], []
            for t in toks:
                if t == eos_id:
                    sents.append(cur)
                    cur = []
                else:
                    cur.append(t)
            if cur:  # the token cap cut the last sentence: it is returned, unterminated
                sents.append(cur)
            texts = [s.strip() for s in tokenizer.decode(sents)] if sents else []
            keep, reason = [], STOP_TOKEN_CAP
            for i, s in enumerate(texts):
                if s == eod_text and not (cur and i == len(texts) - 1):
                    reason = STOP_END
                    break
                if len(p) + len(keep) > limit:
                    reason = STOP_SENTENCE_CAP
                    break
                if s:
                    keep.append(s)
            conts.append(StoryContinuation(keep, reason))
        return conts

    return generate
