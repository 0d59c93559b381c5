"""Two-Tower LCM generation: the LCM's two-tower generator (DDIM + classifier-free guidance per concept).

`generate_two_tower(model, prompt_embeddings, max_sentences, ...)` (also `TwoTowerLCM.generate`) continues
a batch of prompts of any lengths (a list of [P_b, E], or an equal-length [B, P, E] tensor) in one batch:
the contextualizer prefills the right-padded prompts into its KV cache (`Backbone.step` with per-row
lengths), and `CachedCrossAttention` (the denoiser's inference cross-attention over the growing context,
keys/values cached per layer) masks the padded keys per row; finished rows leave both caches. With one
`torch.Generator` per prompt the noise of a prompt does not depend on the rest of the batch, so batched
generation gives the concepts of one-at-a-time generation (up to float summation order).
`two_tower_concepts` adapts it to the common concept-generation interface
(`sonar_llm.models.generate.GenerationSettings` -> `ConceptGeneration`s): every prompt in one batch with its
own limit, the stopping (end-of-document) concept dropped.
Imports point one way: `two_tower` (the model and its family spec) imports this module, never the reverse;
the model and its denoiser are typed `nn.Module` here (a `TwoTowerLCM` and its `Denoiser`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sonar_llm.models.backbone import Attention
from sonar_llm.models.diffusion import cfg_combine

from sonar_llm.models.generate import (
    CACHE_STRETCH,
    LCM_MIN_SENTENCES,
    STOP_SENTENCE_CAP,
    ConceptGeneration,
    GenerationSettings,
    stop_reasons,
)

__all__ = ["TwoTowerGeneration", "CachedCrossAttention", "generate_two_tower", "two_tower_concepts",
           "LCM_MIN_SENTENCES"]
# LCM_MIN_SENTENCES = 2 (sonar_llm.models.generate): Meta's two-tower generator (`finalize_step`) cannot
# stop before the second generated concept.


@dataclass
class TwoTowerGeneration:
    """Output of :func:`generate_two_tower` for a batch of prompts.

    ``embeddings[b]``: the generated (denormalised) concepts of prompt b, [n_b, E], the stopping concept
    included (as the LCM does); ``stopped_on_eos[b]``: whether it stopped on the EOS/repetition rule (Meta's
    ``stopped_on_eos``); ``stop_reasons[b]``: which (``STOP_END``, ``STOP_REPETITION``) or ``STOP_SENTENCE_CAP``.
    ``num_denoiser_steps``: DDIM steps actually run per concept (50 for T=100, S=40 with the quirk).
    """

    embeddings: list[Tensor]
    stopped_on_eos: list[bool]
    num_denoiser_steps: int
    timesteps: list[int] = field(default_factory=list)
    stop_reasons: list[str] = field(default_factory=list)


def _zero_key_output(attn: Attention) -> Tensor:
    """What a query gets when its only key is the zero vector: output_proj(v_proj(0)), shape [d]."""
    v0 = attn.v_proj.bias if attn.v_proj.bias is not None else attn.v_proj.weight.new_zeros(attn.v_proj.out_features)
    v0 = v0.view(attn.num_kv_heads, attn.head_dim)
    v0 = v0.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=0).reshape(-1)
    return attn.output_proj(v0)


class CachedCrossAttention:
    """Inference cross-attention for B conditional rows (+ ``num_uncond`` unconditional rows).

    Keeps per-layer keys/values of ``[0 ; context so far]`` ([B, Hkv, K, Dh]) and ``valid`` [B, K] (False at
    the padded context slots of a ragged prefill); ``extend`` appends new context rows, ``reorder`` keeps a
    subset of rows. Unconditional rows see only the zero vector: their output is a constant.
    """

    def __init__(self, denoiser: nn.Module, batch: int, dtype: torch.dtype, device: torch.device) -> None:
        self.denoiser = denoiser
        self.batch = batch
        self.num_uncond = 0
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        zero = torch.zeros(batch, 1, denoiser.model_dim, dtype=dtype, device=device)
        for layer in denoiser.layers:
            k, v = self._kv(layer.cross_attention, zero)
            self.keys.append(k)
            self.values.append(v)
        self.valid = torch.ones(batch, 1, dtype=torch.bool, device=device)
        self._uncond_out = [_zero_key_output(layer.cross_attention) for layer in denoiser.layers]

    @staticmethod
    def _kv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        k = attn.k_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        return k, v

    def extend(self, context: Tensor, valid: Tensor | None = None) -> None:
        """Append context rows [B, m, d] (contextualizer outputs) to every layer's keys/values;
        ``valid`` [B, m] (default all True) marks the real ones (a ragged prefill's padding is False)."""
        for i, layer in enumerate(self.denoiser.layers):
            k, v = self._kv(layer.cross_attention, context)
            self.keys[i] = torch.cat([self.keys[i], k], dim=2)
            self.values[i] = torch.cat([self.values[i], v], dim=2)
        if valid is None:
            valid = torch.ones(context.shape[:2], dtype=torch.bool, device=self.valid.device)
        self.valid = torch.cat([self.valid, valid.to(self.valid.device)], dim=1)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (finished prompts leave the batch)."""
        self.keys = [k.index_select(0, index) for k in self.keys]
        self.values = [v.index_select(0, index) for v in self.values]
        self.valid = self.valid.index_select(0, index)
        self.batch = int(index.numel())

    def __call__(self, attn: Attention, h: Tensor, layer_idx: int) -> Tensor:
        b = self.batch
        hc = h[:b]
        q = attn.q_proj(hc).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, self.keys[layer_idx], self.values[layer_idx], attn_mask=self.valid[:, None, None, :],
            enable_gqa=attn.num_heads != attn.num_kv_heads,
        )
        out = attn.output_proj(out.transpose(1, 2).reshape(b, -1))
        if self.num_uncond:
            uncond = self._uncond_out[layer_idx].to(out.dtype).expand(self.num_uncond, -1)
            out = torch.cat([out, uncond])
        return out


@torch.no_grad()
def generate_two_tower(
    model: nn.Module,
    prompt_embeddings: Tensor | Sequence[Tensor],
    max_sentences: int | Sequence[int],
    eos_embedding: Tensor | None = None,
    eos_threshold: float = 0.9,
    num_inference_steps: int = 40,
    guidance_scale: float = 3.0,
    guidance_rescale: float = 0.7,
    initial_noise_scale: float = 0.6,
    epsilon_scaling: float | None = None,
    clip_noise: float = 100.0,
    ddim_eta: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    *,
    reproduce_lcm_step_quirk: bool = True,
    stop_on_repetition_cosine_threshold: float | None = None,
    min_sentences: int = LCM_MIN_SENTENCES,
    on_step: Callable[[list[int], Tensor, None], None] | None = None,
) -> TwoTowerGeneration:
    """Generate up to ``max_sentences`` concepts after each prompt (the LCM's two-tower generator).

    ``prompt_embeddings``: raw SONAR embeddings [P, E], [B, P, E], or a list of [P_b, E] of any lengths
    (one batch: right-padded prefill with per-row lengths, padded keys masked). ``max_sentences``: one
    limit for all prompts or one per prompt. The prompt (normalised) is prefilled into the
    contextualizer's KV cache except its last concept; per new concept the last concept is encoded
    incrementally, ``z ~ N(0, I) * initial_noise_scale`` (clipped to +-clip_noise) is denoised by DDIM over
    the scheduler's timesteps with classifier-free guidance (a doubled batch whose second half sees only the
    zero vector; combined with :func:`cfg_combine`, rescale ``guidance_rescale``; skipped at t = T-1, where
    alpha_bar = 0 and the conditional x0 is used directly; ``guidance_scale == 1`` disables CFG). The final
    x0 is denormalised and appended.

    ``generator``: one ``torch.Generator`` for the batch (the draws then depend on the batch), or one per
    prompt (each prompt's initial latents and, with ``ddim_eta`` > 0, its DDIM noise come from its own
    generator: batched == one-at-a-time). ``on_step(prompt_indices, concepts[k, E], None)``, if given, is
    called after every step with the new concepts of the prompts (the stopping ones excluded).

    **Step count**: with ``reproduce_lcm_step_quirk=True`` (default) the schedule is the LCM's:
    T=100 with ``num_inference_steps=40`` runs 50 DDIM steps (t = 99, 97, ..., 1); ``False`` runs
    exactly ``num_inference_steps`` (see :mod:`sonar_llm.models.diffusion`).

    Stop rules (per prompt, `sonar_llm.models.generate.stop_reasons`): cos(concept, eos_embedding) >=
    eos_threshold, cos(concept, previous) >= stop_on_repetition_cosine_threshold (if set; None = off, Meta's
    default), or its ``max_sentences``; the EOS/repetition rules apply
    only once ``min_sentences`` concepts exist, the stopping one included (default 2 = Meta's generator,
    which cannot stop before the second generated concept; see ``LCM_MIN_SENTENCES``). The stopping
    concept is kept in the output.
    """
    E = model.cfg.sonar_dim
    if isinstance(prompt_embeddings, Tensor):
        if prompt_embeddings.dim() == 2:
            prompt_embeddings = prompt_embeddings.unsqueeze(0)
        if prompt_embeddings.dim() != 3 or prompt_embeddings.shape[-1] != E or prompt_embeddings.shape[1] < 1:
            raise ValueError(f"prompt_embeddings must be [P, {E}] or [B, P, {E}] with P >= 1, "
                             f"got {tuple(prompt_embeddings.shape)}")
        prompts = list(prompt_embeddings.unbind(0))
    else:
        prompts = list(prompt_embeddings)
        if not prompts:
            raise ValueError("prompt_embeddings is empty")
        for i, p in enumerate(prompts):
            if not isinstance(p, Tensor) or p.dim() != 2 or p.shape[0] < 1 or p.shape[1] != E:
                shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
                raise ValueError(f"prompt_embeddings[{i}] must be a non-empty [P, {E}] tensor, got {shape}")
    B = len(prompts)
    limits = [max_sentences] * B if isinstance(max_sentences, int) else list(max_sentences)
    if len(limits) != B or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in limits):
        raise ValueError(f"max_sentences must be a positive int or one per prompt ({B}), got {max_sentences!r}")
    if eos_embedding is not None and eos_embedding.reshape(-1).shape[0] != E:
        raise ValueError(f"eos_embedding must have {E} values, got shape {tuple(eos_embedding.shape)}")
    for i, (p, m) in enumerate(zip(prompts, limits)):
        if p.shape[0] + m > model.cfg.max_seq_len:
            raise ValueError(f"prompt {i}: length {p.shape[0]} + max_sentences {m} exceeds max_seq_len "
                             f"{model.cfg.max_seq_len}")
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) != B:
            raise ValueError(f"generator: one torch.Generator per prompt ({B}) or one for all, got {len(generator)}")
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, prompts, limits, eos_embedding, eos_threshold, num_inference_steps,
            guidance_scale, guidance_rescale, initial_noise_scale, epsilon_scaling, clip_noise, ddim_eta,
            generator, reproduce_lcm_step_quirk, stop_on_repetition_cosine_threshold, min_sentences, on_step,
        )
    finally:
        model.train(was_training)


def _randn(rows: list[int], E: int, generator, device: torch.device) -> Tensor:
    """[len(rows), E] standard normal fp32 draws on `device`: from the shared generator, or row by row from
    each prompt's own generator (so a prompt's draws do not depend on the batch). A generator draws on its own
    device (a CPU generator serves a CUDA model)."""
    def draw(shape, g):
        where = device if g is None else g.device
        return torch.randn(shape, generator=g, device=where, dtype=torch.float32).to(device)

    if not isinstance(generator, list):
        return draw((len(rows), E), generator)
    return torch.stack([draw((E,), generator[b]) for b in rows])


def _generate(model, prompts, limits, eos_embedding, eos_threshold, num_inference_steps,
              guidance_scale, guidance_rescale, initial_noise_scale, epsilon_scaling, clip_noise, ddim_eta,
              generator, quirk, rep_threshold, min_sentences, on_step) -> TwoTowerGeneration:
    B = len(prompts)
    E = model.cfg.sonar_dim
    device = prompts[0].device
    dtype = model.encoder_frontend.pre_linear.weight.dtype
    sched = model.noise_scheduler
    timesteps = sched.set_timesteps(num_inference_steps, reproduce_lcm_step_quirk=quirk).tolist()
    T = sched.num_train_steps
    use_cfg = guidance_scale != 1.0
    lengths = [int(p.shape[0]) for p in prompts]

    x = [model.sonar_normalizer.normalize(p.to(device).float()).to(dtype) for p in prompts]
    cache = model.context_encoder.new_cache(B, min(max(n + m for n, m in zip(lengths, limits)),
                                                   max(lengths) + CACHE_STRETCH), device=device, dtype=dtype)
    cross = CachedCrossAttention(model.denoiser, B, dtype, device)
    ctx_max = max(lengths) - 1
    if ctx_max > 0:  # prefill every prompt but its last concept: right-padded, per-row lengths
        padded = torch.zeros(B, ctx_max, E, device=device, dtype=dtype)
        for b in range(B):
            padded[b, : lengths[b] - 1] = x[b][:-1]
        ctx_lens = torch.tensor([n - 1 for n in lengths], device=device)
        hidden = model.context_encoder.step(model.encoder_frontend(padded), cache, lengths=ctx_lens)
        cross.extend(hidden, torch.arange(ctx_max, device=device)[None, :] < ctx_lens[:, None])
    last = torch.stack([xb[-1:] for xb in x])  # [B, 1, E]
    eos = None if eos_embedding is None else eos_embedding.reshape(1, E).to(device=device, dtype=torch.float32)

    outputs: list[list[Tensor]] = [[] for _ in range(B)]
    reasons = [STOP_SENTENCE_CAP] * B
    active = list(range(B))  # prompt index of each row of the running batch
    prev_raw = torch.stack([p[-1].to(device).float() for p in prompts])
    while active:
        A = len(active)
        cache.reserve(cache.upper + 1)  # it starts small and grows as the stories run
        cross.extend(model.context_encoder.step(model.encoder_frontend(last), cache))
        z = (_randn(active, E, generator, device) * initial_noise_scale).clamp(-clip_noise, clip_noise)
        pred_x0 = z  # latents and DDIM maths in fp32
        for t in timesteps:
            noise = _randn(active, E, generator, device) if ddim_eta > 0 and isinstance(generator, list) else None
            shared = None if isinstance(generator, list) else generator
            if use_cfg and t != T - 1:
                cross.num_uncond = A
                out = model.denoiser(torch.cat([z, z]).to(dtype), t, cross).float()
                eps_c = sched.to_epsilon(out[:A], z, t)
                eps_u = sched.to_epsilon(out[A:], z, t)
                eps = cfg_combine(eps_c, eps_u, guidance_scale, guidance_rescale)
                z, pred_x0 = sched.step(eps, t, z, eta=ddim_eta, epsilon_scaling=epsilon_scaling,
                                        generator=shared, prediction_type="epsilon", variance_noise=noise)
            else:
                cross.num_uncond = 0
                out = model.denoiser(z.to(dtype), t, cross).float()
                z, pred_x0 = sched.step(out, t, z, eta=ddim_eta, epsilon_scaling=epsilon_scaling,
                                        generator=shared, prediction_type="sample", variance_noise=noise)
            z = z.clamp(-clip_noise, clip_noise)
        cross.num_uncond = 0
        raw = model.sonar_normalizer.denormalize(pred_x0.float())  # [A, E]
        why = stop_reasons(raw, prev_raw, eos_embedding=eos, eos_threshold=eos_threshold,
                           repetition_threshold=rep_threshold)
        keep, stopping = [], set()
        for j, b in enumerate(active):
            outputs[b].append(raw[j])
            if why[j] is not None and len(outputs[b]) >= min_sentences:
                reasons[b] = why[j]
                stopping.add(b)
            elif len(outputs[b]) < limits[b]:
                keep.append(j)
        if on_step is not None:
            cont = [j for j, b in enumerate(active) if b not in stopping]
            if cont:
                on_step([active[j] for j in cont], raw[cont], None)
        if not keep:
            break
        if len(keep) < A:
            index = torch.tensor(keep, device=device)
            cache.reorder(index)
            cross.reorder(index)
            raw = raw.index_select(0, index)
        active = [active[j] for j in keep]
        prev_raw = raw
        last = model.sonar_normalizer.normalize(raw).to(dtype).unsqueeze(1)
    embeddings = [torch.stack(rows) for rows in outputs]
    return TwoTowerGeneration(embeddings, [r != STOP_SENTENCE_CAP for r in reasons], len(timesteps), timesteps,
                              reasons)


def two_tower_concepts(model: nn.Module, prompts: Sequence[Tensor], s: GenerationSettings
                       ) -> list[ConceptGeneration]:
    """`FamilySpec.generate` of the Two-Tower LCM: every prompt in one batch (any lengths), continued by
    `generate_two_tower` with classifier-free guidance up to the story limit (max_sentences + 1 - prompt
    length new concepts, at least one); the end-of-document concept is dropped; decoded per story.
    `s.generator` may be one generator per prompt (batched == one-at-a-time)."""
    limits = [max(1, s.max_sentences + 1 - int(e.shape[0])) for e in prompts]
    res = generate_two_tower(model, list(prompts), limits, eos_embedding=s.eos_embedding,
                             eos_threshold=s.eos_threshold, num_inference_steps=s.num_inference_steps,
                             guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
                             initial_noise_scale=s.initial_noise_scale, generator=s.generator,
                             stop_on_repetition_cosine_threshold=s.stop_on_repetition_cosine_threshold,
                             on_step=s.on_step)
    out = []
    for e, stop, why in zip(res.embeddings, res.stopped_on_eos, res.stop_reasons):
        if stop:
            e = e[:-1]  # the stopping concept (end of document, or a repetition) is not part of the story
        texts = list(s.decode_fn(e)) if s.decode_fn is not None and e.shape[0] else []
        out.append(ConceptGeneration(e, texts, why))
    return out
