"""Generation loops for the model families, batched over stories with the backbone's KV cache.

Concept models (SONAR-LLM, Base-LCM) generate one sentence embedding per step:
  * `generate_sonar_llm`: predict the next embedding, decode it to text with the SONAR decoder
    (`decode_fn`, greedy or beam), re-encode the text with the SONAR encoder (`encode_fn`, as the paper
    does; `reencode=False` keeps the predicted vector) and append it; stop a story when the appended
    vector has cosine >= `eos_threshold` (0.98) with the end-of-document embedding (the end sentence is
    not kept), or by the sentence limit. When `decode_fn` samples, sampling picks the words but not whether
    the document ends: `reads_as_end` (`end_reader`) stops a story where the prediction's greedy reading is
    the end sentence, whatever the draw made of it (a draw such as "Tara End of sequence." would otherwise be
    kept as a sentence and the story run on past its end).
  * `generate_sonar_llm_reference`: the public code's loop, one story at a time, re-running the
    backbone over all embeddings at every step (no KV cache). Same outputs; the speed baseline.
  * `generate_base_lcm`: the LCM's loop: the prediction itself (denormalised) is appended; cosine stop
    against the end embedding (the LCM uses 0.9 with "End of text."; pass the corpus's end sentence),
    never on the first generated concept (`min_sentences=LCM_MIN_SENTENCES`, Meta's `LCMGenerator`
    min_gen_len rule); deterministic unless `sample_latent_variable` (the LCM's N(0, temperature^2) noise
    in normalised space, which its code enables by default).
Sentence limit (the public SONAR-LLM rule): a new sentence is generated while the story (prompt
included) has at most `max_sentences` sentences, so a story can end with max_sentences + 1.
Repetition stop (Meta's `LCMGeneratorOptions.stop_on_repetition_cosine_threshold`, default None = off, as
Meta's): a story also stops when its new concept has cosine >= the threshold with the concept before it (the
prompt's last one for the first new concept), under the same minimum-length rule as the end stop
(`stop_reasons`, shared with the Two-Tower generator). The stopping concept, end or repetition, is not kept.
Every continuation says why it stopped (`ConceptGeneration.stop_reason`): `STOP_END` (the end-of-document
sentence), `STOP_REPETITION`, `STOP_SENTENCE_CAP`; the token LLM's stories add `STOP_TOKEN_CAP`.

`generate_token_llm`: greedy decoding of the token LLM with the KV cache (`use_cache=False`: full
recomputation, the reference).

`decode_fn(embeddings[B,E]) -> list[str]` and `encode_fn(list[str]) -> Tensor[B,E]` are plain
callables; `sonar_text_functions(text_to_embedding, embedding_to_text, ...)` builds them from the
pipeline wrappers in `sonar_llm.sonar.pipeline`.

The family spec's common interface (`FamilySpec.generate`): `fn(model, prompts: list[Tensor[n_i, E]],
settings: GenerationSettings) -> list[ConceptGeneration]`, where `embeddings` holds the new concepts
(the end-of-document one excluded) and `texts` their decoding when `settings.decode_fn` is given:
`sonar_llm_concepts`, `base_lcm_concepts` here, `two_tower_concepts` in `generate_two_tower`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "STOP_END",
    "STOP_REPETITION",
    "STOP_SENTENCE_CAP",
    "STOP_TOKEN_CAP",
    "STOP_REASONS",
    "stop_reasons",
    "ConceptGeneration",
    "GenerationSettings",
    "sonar_llm_concepts",
    "base_lcm_concepts",
    "generate_sonar_llm",
    "generate_sonar_llm_reference",
    "generate_base_lcm",
    "generate_token_llm",
    "sonar_text_functions",
    "end_reader",
    "LCM_MIN_SENTENCES",
]

# Meta's stop rule for both LCM generators (lcm/inference/lcm/generator.py and
# lcm/inference/two_tower_diffusion_lcm/generator.py, `finalize_step`): the EOS/repetition stop needs
# `step_nr - prompt_len >= min_gen_len`, i.e. min_gen_len concepts generated *before* the stopping one,
# with LCMGeneratorOptions.min_seq_len = 1 (used when min_gen_len is not given): no stop before the second
# generated concept. `min_sentences` counts the stopping concept too: Meta's min_gen_len = m is
# min_sentences = m + 1; 1 (an option, not Meta's) lets the first concept stop.
LCM_MIN_SENTENCES = 2

# why a continuation stopped
STOP_END = "end"  # the end-of-document sentence (cosine stop)
STOP_REPETITION = "repetition"  # cosine with the previous concept >= stop_on_repetition_cosine_threshold
STOP_SENTENCE_CAP = "sentence_cap"  # the sentence limit
STOP_TOKEN_CAP = "token_cap"  # the token LLM ran out of tokens (its last sentence may be unterminated)
STOP_REASONS = (STOP_END, STOP_REPETITION, STOP_SENTENCE_CAP, STOP_TOKEN_CAP)

DecodeFn = Callable[[Tensor], list[str]]
CACHE_STRETCH = 64  # positions a generation loop's KV cache holds beyond its prompts at first (`KVCache.reserve`)
EncodeFn = Callable[[list[str]], Tensor]
# predictions [B, E] -> bool [B]: those whose greedy reading is the end sentence (`end_reader`)
EndFn = Callable[[Tensor], Tensor]
# called after every generation step with the concepts just added to stories (end-of-document ones excluded):
# (indices of their prompts, the concepts [k, E], their decoded texts when the loop decodes them, else None)
StepFn = Callable[[list[int], Tensor, "list[str] | None"], None]


@dataclass
class ConceptGeneration:
    """One story's continuation: the appended embeddings [m, E], their texts (SONAR-LLM; empty for
    Base-LCM) and why it stopped (one of `STOP_END`, `STOP_REPETITION`, `STOP_SENTENCE_CAP`)."""

    embeddings: Tensor
    texts: list[str] = field(default_factory=list)
    stop_reason: str = STOP_SENTENCE_CAP

    @property
    def stopped_by_eos(self) -> bool:
        """The end-of-document rule stopped it."""
        return self.stop_reason == STOP_END


@dataclass
class GenerationSettings:
    """What a family's concept-level generation reads (each family ignores the fields it does not use)."""

    eos_embedding: Tensor  # [E] end-of-document embedding (cosine stop)
    max_sentences: int = 32  # a story (prompt included) grows while it has <= max_sentences sentences
    eos_threshold: float = 0.9  # cosine stop threshold (the family spec's `eos_threshold` is the default)
    decode_fn: DecodeFn | None = None  # embeddings -> texts; None: `texts` stay empty (not for SONAR-LLM)
    encode_fn: EncodeFn | None = None  # texts -> embeddings (SONAR-LLM re-encodes every decoded sentence)
    num_inference_steps: int = 40  # diffusion: requested DDIM steps per concept
    guidance_scale: float = 3.0  # diffusion: classifier-free guidance
    guidance_rescale: float = 0.7  # diffusion: guidance rescale
    initial_noise_scale: float = 0.6  # diffusion: std of the initial latent
    generator: torch.Generator | Sequence[torch.Generator] | None = None  # diffusion noise: one, or one per prompt
    decode_draws: Sequence[torch.Generator] | None = None  # SONAR-LLM, sampling: one generator per prompt for
    # the decoder's draws (`story_generator`), so a story's words do not depend on the batch; None = decode_fn's own
    stop_on_repetition_cosine_threshold: float | None = None  # Meta's option (None = off): stop when a new
    # concept has cosine >= this with the previous one (`stop_reasons`)
    reads_as_end: EndFn | None = None  # SONAR-LLM: predictions whose greedy reading is the end sentence stop
    # the story whatever decode_fn made of them (`end_reader`: set when decode_fn samples); None = decode_fn alone
    on_step: StepFn | None = None  # on_step(prompt indices, new concepts [k, E], their texts or None) per step


@contextlib.contextmanager
def _inference(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_prompts(prompts: Sequence[Tensor], dim: int) -> None:
    if not prompts:
        raise ValueError("prompt_embeddings is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[0] == 0 or p.shape[1] != dim:
            shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
            raise ValueError(f"prompt_embeddings[{i}] must be a non-empty [n, {dim}] tensor, got {shape}")


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


def stop_reasons(concepts: Tensor, previous: Tensor, *, eos_embedding: Tensor | None, eos_threshold: float | None,
                 repetition_threshold: float | None, ended: Tensor | None = None) -> list[str | None]:
    """The stop rules of Meta's LCM generators (`finalize_step`) for one step of new concepts [A, E]:
    `STOP_END` when cos(concept, eos_embedding) >= eos_threshold (or `ended[a]`, the caller's own end test,
    bool [A]), else `STOP_REPETITION` when
    cos(concept, previous[a]) >= repetition_threshold (`previous`: [A, E], the concept before each new one), else
    None (go on). A None threshold (or end embedding) disables its rule. The caller applies the minimum length.
    Cosines in fp32, as Meta's (torch's cosine_similarity)."""
    x = concepts.float()
    end = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if eos_embedding is not None and eos_threshold is not None:
        end = F.cosine_similarity(x, eos_embedding.float().reshape(1, -1).to(x.device), dim=-1) >= eos_threshold
    if ended is not None:
        end = end | ended.to(device=x.device, dtype=torch.bool)
    rep = torch.zeros_like(end)
    if repetition_threshold is not None:
        rep = F.cosine_similarity(x, previous.float().to(x.device), dim=-1) >= repetition_threshold
    return [STOP_END if e else STOP_REPETITION if r else None for e, r in zip(end.tolist(), rep.tolist())]


def _concept_loop(
    model: nn.Module,
    prompts: Sequence[Tensor],
    next_fn: Callable[[Tensor, list[int]], tuple[list[str] | None, Tensor, Tensor | None]],
    *,
    max_sentences: int,
    eos_embedding: Tensor,
    eos_threshold: float,
    min_sentences: int = 1,
    repetition_threshold: float | None = None,
    on_step: StepFn | None = None,
) -> list[ConceptGeneration]:
    """KV-cached loop shared by the concept models: ragged prefill of every prompt (right-padded, per-row
    lengths), then one step per new sentence for the stories still running (finished ones are dropped from
    the cache); a story's sentences do not depend on the other prompts of the batch. The end embedding (and
    the repetition rule, `repetition_threshold`) stops a story only from its `min_sentences`-th new sentence
    on (the stopping one counted; see `stop_reasons`). `next_fn(last hidden [A, D], prompt indices of those A
    rows)` gives the step's texts (or None), its concepts [A, E] and which of them end by the caller's own test
    (bool [A], or None).
    `on_step` sees every step's new sentences (streaming)."""
    dim = eos_embedding.numel()
    _check_prompts(prompts, dim)
    if max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1, got {max_sentences}")
    device, dtype = _model_device_dtype(model)
    batch = len(prompts)
    lengths = [int(p.shape[0]) for p in prompts]
    texts: list[list[str]] = [[] for _ in range(batch)]
    appended: list[list[Tensor]] = [[] for _ in range(batch)]
    reasons = [STOP_SENTENCE_CAP] * batch
    active = [b for b in range(batch) if lengths[b] <= max_sentences]
    if active:
        n_max = max(lengths[b] for b in active)
        padded = torch.zeros(len(active), n_max, dim, device=device, dtype=dtype)
        for j, b in enumerate(active):
            padded[j, : lengths[b]] = prompts[b].to(device=device, dtype=dtype)
        # room for the prompts and a first stretch; it grows as the stories run (a cap of a million sentences
        # must not take the memory of a million before the first one)
        cache = model.backbone.new_cache(len(active), min(max(n_max, max_sentences + 1) + 1, n_max + CACHE_STRETCH),
                                         device, dtype)
        lens = torch.tensor([lengths[b] for b in active], device=device)
        hidden = model.backbone.step(model.embed_inputs(padded), cache, lengths=lens)
        last = hidden[torch.arange(len(active), device=device), lens - 1]
        totals = {b: lengths[b] for b in active}
        previous = torch.stack([prompts[b][-1] for b in active]).to(device)  # the concept before the next one
    while active:
        step_texts, nxt, ended = next_fn(last, active)
        why = stop_reasons(nxt, previous, eos_embedding=eos_embedding, eos_threshold=eos_threshold,
                           repetition_threshold=repetition_threshold, ended=ended)
        keep, added = [], []
        for j, b in enumerate(active):
            if why[j] is not None and len(appended[b]) + 1 >= min_sentences:
                reasons[b] = why[j]
                continue
            added.append(j)
            appended[b].append(nxt[j].detach().to("cpu", torch.float32))
            if step_texts is not None:
                texts[b].append(step_texts[j])
            totals[b] += 1
            if totals[b] <= max_sentences:
                keep.append(j)
        if on_step is not None and added:
            on_step([active[j] for j in added], torch.stack([appended[active[j]][-1] for j in added]),
                    None if step_texts is None else [step_texts[j] for j in added])
        if not keep:
            break
        index = torch.tensor(keep, device=device)
        cache.reorder(index)
        active = [active[j] for j in keep]
        nxt = nxt.index_select(0, index).to(device=device, dtype=dtype)
        previous = nxt
        cache.reserve(cache.upper + 1)
        last = model.backbone.step(model.embed_inputs(nxt)[:, None], cache)[:, 0]
    out = []
    for b in range(batch):
        emb = torch.stack(appended[b]) if appended[b] else torch.zeros(0, dim)
        out.append(ConceptGeneration(emb, texts[b], reasons[b]))
    return out


def _sonar_llm_next_fn(model, decode_fn: DecodeFn, encode_fn: EncodeFn, reencode: bool,
                       reads_as_end: EndFn | None, draws: Sequence[torch.Generator] | None):
    def next_fn(last_hidden: Tensor, rows: list[int]) -> tuple[list[str], Tensor, Tensor | None]:
        pred = model.predict_embedding(last_hidden)
        step_texts = list(decode_fn(pred) if draws is None else decode_fn(pred, draws=[draws[b] for b in rows]))
        if len(step_texts) != pred.shape[0]:
            raise ValueError(f"decode_fn returned {len(step_texts)} texts for {pred.shape[0]} embeddings")
        ended = None if reads_as_end is None else reads_as_end(pred)
        if ended is not None and (not isinstance(ended, Tensor) or tuple(ended.shape) != (pred.shape[0],)):
            raise ValueError(f"reads_as_end must return a bool [{pred.shape[0]}] tensor, got "
                             f"{tuple(ended.shape) if isinstance(ended, Tensor) else type(ended).__name__}")
        if not reencode:
            return step_texts, pred, ended
        enc = encode_fn(step_texts)
        if not isinstance(enc, Tensor) or enc.shape != pred.shape:
            raise ValueError(
                f"encode_fn must return a [{pred.shape[0]}, {pred.shape[1]}] tensor, got "
                f"{tuple(enc.shape) if isinstance(enc, Tensor) else type(enc).__name__}"
            )
        return step_texts, enc.to(pred.device), ended

    return next_fn


def generate_sonar_llm(
    model: nn.Module,
    prompt_embeddings: Sequence[Tensor],
    decode_fn: DecodeFn,
    encode_fn: EncodeFn | None,
    *,
    max_sentences: int = 32,
    eos_embedding: Tensor,
    eos_threshold: float = 0.98,
    reencode: bool = True,
    stop_on_repetition_cosine_threshold: float | None = None,
    on_step: StepFn | None = None,
    reads_as_end: EndFn | None = None,
    draws: Sequence[torch.Generator] | None = None,
) -> list[ConceptGeneration]:
    """Continue every story (prompt_embeddings[i]: [n_i, E]) with SONAR-LLM, batched (prompts of any
    lengths), KV-cached; `on_step` sees each step's new sentences. The repetition rule compares the appended
    (re-encoded) vectors; None = off. `reads_as_end(predictions [A, E]) -> bool [A]` (`end_reader`) also ends
    the stories where it is True, whatever `decode_fn` made of their prediction. `draws`: one generator per
    prompt, handed to `decode_fn(predictions, draws=[the running stories' generators])` (`sonar_text_functions`
    takes it), so that a sampled story does not depend on the others."""
    if reencode and encode_fn is None:
        raise ValueError("reencode=True needs an encode_fn")
    if draws is not None and len(draws) != len(prompt_embeddings):
        raise ValueError(f"draws: one generator per prompt ({len(prompt_embeddings)}), got {len(draws)}")
    with _inference(model):
        return _concept_loop(model, prompt_embeddings,
                             _sonar_llm_next_fn(model, decode_fn, encode_fn, reencode, reads_as_end, draws),
                             max_sentences=max_sentences, eos_embedding=eos_embedding,
                             eos_threshold=eos_threshold, repetition_threshold=stop_on_repetition_cosine_threshold,
                             on_step=on_step)


def generate_sonar_llm_reference(
    model: nn.Module,
    prompt_embeddings: Sequence[Tensor],
    decode_fn: DecodeFn,
    encode_fn: EncodeFn | None,
    *,
    max_sentences: int = 32,
    eos_embedding: Tensor,
    eos_threshold: float = 0.98,
    reencode: bool = True,
) -> list[ConceptGeneration]:
    """The public code's loop: one story at a time; every step runs the backbone over all embeddings
    so far (no cache), decodes the last prediction, re-encodes it and appends it.

    It is the reference the cached loop is tested against, so it shares none of that loop's helpers
    (prompt checks, next-step function, cosine): each step is written out here, the cosine in float64."""
    if reencode and encode_fn is None:
        raise ValueError("reencode=True needs an encode_fn")
    eos = eos_embedding.detach().reshape(-1).to("cpu", torch.float64)
    dim = eos.numel()
    if len(prompt_embeddings) == 0:
        raise ValueError("prompt_embeddings is empty")
    for i, p in enumerate(prompt_embeddings):
        if not (isinstance(p, Tensor) and p.dim() == 2 and p.shape[0] > 0 and p.shape[1] == dim):
            raise ValueError(f"prompt_embeddings[{i}] must be a non-empty [n, {dim}] tensor, got "
                             f"{tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__}")
    weight = next(model.parameters())
    out = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for prompt in prompt_embeddings:
                embs = prompt.to(device=weight.device, dtype=weight.dtype)
                result = ConceptGeneration(torch.zeros(0, dim))
                appended = []
                while embs.shape[0] <= max_sentences:
                    hidden = model.backbone.forward_padded(model.embed_inputs(embs)[None])[0, -1:]
                    pred = model.predict_embedding(hidden)  # [1, E]
                    text = list(decode_fn(pred))
                    if len(text) != 1:
                        raise ValueError(f"decode_fn returned {len(text)} texts for 1 embedding")
                    nxt = encode_fn(text).to(pred.device) if reencode else pred
                    v = nxt[0].detach().to("cpu", torch.float64)
                    cosine = float(v @ eos) / max(float(v.norm()) * float(eos.norm()), 1e-8)
                    if cosine >= eos_threshold:
                        result.stop_reason = STOP_END
                        break
                    result.texts.append(text[0])
                    appended.append(nxt[0].to("cpu", torch.float32))
                    embs = torch.cat([embs, nxt.to(device=weight.device, dtype=weight.dtype)])
                if appended:
                    result.embeddings = torch.stack(appended)
                out.append(result)
    finally:
        model.train(was_training)
    return out


def generate_base_lcm(
    model: nn.Module,
    prompt_embeddings: Sequence[Tensor],
    *,
    max_sentences: int = 32,
    eos_embedding: Tensor,
    eos_threshold: float = 0.9,
    sample_latent_variable: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    decode_fn: DecodeFn | None = None,
    min_sentences: int = LCM_MIN_SENTENCES,
    stop_on_repetition_cosine_threshold: float | None = None,
    on_step: StepFn | None = None,
) -> list[ConceptGeneration]:
    """Continue every story with a Base-LCM (KV cache). The appended vector is the denormalised
    prediction (plus N(0, temperature^2) noise in normalised space when `sample_latent_variable`).
    The end embedding (and the repetition rule, None = off as Meta's default) stops a story from its
    `min_sentences`-th new concept on (default 2: Meta's generator cannot stop on the first; 1 is the option
    that can).
    `decode_fn`, if given, fills `texts` (decoding happens after generation in the LCM)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    def next_fn(last_hidden: Tensor, rows: list[int]) -> tuple[None, Tensor, None]:
        pred = model.predict_normalized(last_hidden)
        if sample_latent_variable:
            noise = torch.randn(pred.shape, generator=generator, device=pred.device, dtype=pred.dtype)
            pred = pred + noise * temperature
        return None, model.normalizer.denormalize(pred), None

    with _inference(model):
        results = _concept_loop(model, prompt_embeddings, next_fn, max_sentences=max_sentences,
                                eos_embedding=eos_embedding, eos_threshold=eos_threshold,
                                min_sentences=min_sentences, repetition_threshold=stop_on_repetition_cosine_threshold,
                                on_step=on_step)
        if decode_fn is not None:
            for r in results:
                r.texts = list(decode_fn(r.embeddings)) if r.embeddings.shape[0] else []
    return results


def sonar_llm_concepts(model: nn.Module, prompts: Sequence[Tensor], s: GenerationSettings
                       ) -> list[ConceptGeneration]:
    """`FamilySpec.generate` of SONAR-LLM: `generate_sonar_llm` with re-encoding."""
    if s.decode_fn is None:
        raise ValueError("SONAR-LLM generation needs settings.decode_fn (it decodes every predicted sentence)")
    return generate_sonar_llm(model, prompts, s.decode_fn, s.encode_fn, max_sentences=s.max_sentences,
                              eos_embedding=s.eos_embedding, eos_threshold=s.eos_threshold, reencode=True,
                              stop_on_repetition_cosine_threshold=s.stop_on_repetition_cosine_threshold,
                              on_step=s.on_step, reads_as_end=s.reads_as_end, draws=s.decode_draws)


def base_lcm_concepts(model: nn.Module, prompts: Sequence[Tensor], s: GenerationSettings
                      ) -> list[ConceptGeneration]:
    """`FamilySpec.generate` of Base-LCM: `generate_base_lcm` (deterministic), decoded per story."""
    return generate_base_lcm(model, prompts, max_sentences=s.max_sentences, eos_embedding=s.eos_embedding,
                             eos_threshold=s.eos_threshold, decode_fn=s.decode_fn,
                             stop_on_repetition_cosine_threshold=s.stop_on_repetition_cosine_threshold,
                             on_step=s.on_step)


def generate_token_llm(
    model: nn.Module,
    prompts: Sequence[Tensor],
    *,
    max_new_tokens: int = 256,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy continuation of each prompt (int64 ids [n_i]); stops a row at any of `stop_ids` (not
    returned) or after `max_new_tokens`. Batched with the KV cache; `use_cache=False` recomputes the
    full sequence every step (reference)."""
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, Tensor) or p.dim() != 1 or p.numel() == 0 or p.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts[{i}] must be a non-empty 1-D int64 tensor")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device, _ = _model_device_dtype(model)
    stops = set(int(s) for s in stop_ids)
    batch = len(prompts)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    with _inference(model):
        if not use_cache:
            for b, p in enumerate(prompts):
                ids = p.to(device, torch.int64)
                for _ in range(max_new_tokens):
                    hidden = model.backbone.forward_padded(model.embed(ids)[None])[0, -1]
                    tok = int(model.logits(hidden).argmax())
                    if tok in stops:
                        break
                    outputs[b].append(tok)
                    ids = torch.cat([ids, ids.new_tensor([tok])])
            return outputs
        lengths = torch.tensor([p.numel() for p in prompts], device=device)
        n_max = int(lengths.max())
        padded = torch.zeros(batch, n_max, dtype=torch.int64, device=device)
        for b, p in enumerate(prompts):
            padded[b, : p.numel()] = p.to(device, torch.int64)
        dtype = model.embed.weight.dtype
        cache = model.backbone.new_cache(batch, n_max + min(max_new_tokens, CACHE_STRETCH) + 1, device, dtype)
        hidden = model.backbone.step(model.embed(padded), cache, lengths=lengths)
        last = hidden[torch.arange(batch, device=device), lengths - 1]
        active = list(range(batch))
        for _ in range(max_new_tokens):
            toks = model.logits(last).argmax(-1)
            keep = []
            for j, b in enumerate(active):
                tok = int(toks[j])
                if tok in stops:
                    continue
                outputs[b].append(tok)
                if len(outputs[b]) < max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            active = [active[j] for j in keep]
            cache.reserve(cache.upper + 1)
            last = model.backbone.step(model.embed(toks.index_select(0, index))[:, None], cache)[:, 0]
    return outputs


def sonar_text_functions(
    text_to_embedding,
    embedding_to_text,
    lang: str | None = "eng_Latn",
    beam_size: int = 5,
    max_gen_len: int | tuple[float, float] | None = None,
    *,
    cfg=None,
    generator: torch.Generator | None = None,
) -> tuple[DecodeFn, EncodeFn]:
    """(decode_fn, encode_fn) from `sonar_llm.sonar.pipeline.TextToEmbedding` / `EmbeddingToText`, both in
    language `lang`. Decoding follows `cfg` (a `sonar_llm.sonar.generation.GenerationConfig`: beam, greedy
    or sampling with one sample per embedding; draws from `generator`, or from `decode_fn(embeddings,
    draws=[one generator per embedding])`), else `GenerationConfig(beam_size=beam_size, max_gen_len=max_gen_len)`
    (None: SONAR's own length rule)."""
    from sonar_llm.sonar.generation import GenerationConfig

    if cfg is None:
        cfg = GenerationConfig(beam_size=beam_size, **({} if max_gen_len is None else {"max_gen_len": max_gen_len}))
    if cfg.num_samples != 1:
        raise ValueError(f"decode_fn gives one text per embedding: cfg.num_samples must be 1, got {cfg.num_samples}"
                         " (repeat the prompts for several continuations)")

    def decode_fn(embeddings: Tensor, draws: Sequence[torch.Generator] | None = None) -> list[str]:
        return embedding_to_text.decode(embeddings, lang, cfg=cfg, generator=generator if draws is None else draws)

    def encode_fn(texts: list[str]) -> Tensor:
        return text_to_embedding.encode(texts, lang)

    return decode_fn, encode_fn


def end_reader(embedding_to_text, end_text: str, lang: str | None, cfg) -> EndFn | None:
    """`GenerationSettings.reads_as_end` for a decoding `cfg` (`sonar_llm.sonar.generation.GenerationConfig`):
    when it samples, the predictions whose greedy reading is `end_text` (`EmbeddingToText.reads_as`: one short
    teacher-forced pass, no decoding), so that sampling chooses the words of a sentence but not whether the
    document ends, as beam search and greedy decoding decide it; None (decode_fn alone) when it does not sample."""
    if not cfg.do_sample:
        return None

    def reads_as_end(predictions: Tensor) -> Tensor:
        return embedding_to_text.reads_as(predictions, end_text, lang, cfg=cfg)

    return reads_as_end
