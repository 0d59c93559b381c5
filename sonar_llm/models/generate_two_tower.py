"""Two-Tower LCM generation: the LCM's two-tower generator (DDIM + classifier-free guidance per concept).

`generate_two_tower(model, prompt_embeddings, max_sentences, ...)` (also `TwoTowerLCM.generate`) continues
equal-length prompts [B, P, E]; `CachedCrossAttention` is the denoiser's inference cross-attention over
the growing context (keys/values cached per layer). `two_tower_concepts` adapts it to the common
concept-generation interface (`sonar_llm.models.generate.GenerationSettings` -> `ConceptGeneration`s):
prompts of different lengths are grouped by length, and the stopping (end-of-document) concept is dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from sonar_llm.models.backbone import Attention
from sonar_llm.models.diffusion import cfg_combine

from sonar_llm.models.generate import ConceptGeneration, GenerationSettings

if TYPE_CHECKING:  # pragma: no cover
    from sonar_llm.models.two_tower import Denoiser, TwoTowerLCM

__all__ = ["TwoTowerGeneration", "CachedCrossAttention", "generate_two_tower", "two_tower_concepts",
           "LCM_MIN_SENTENCES"]

# Meta's stop rule (lcm/inference/two_tower_diffusion_lcm/generator.py, `finalize_step`): the EOS/repetition
# stop needs `step_nr - prompt_len >= min_gen_len`, i.e. min_gen_len concepts generated *before* the
# stopping one, with LCMGeneratorOptions.min_seq_len = 1 (used when min_gen_len is not given): no stop
# before the second generated concept. Here `min_sentences` counts the stopping concept too, so Meta's
# min_gen_len = m is min_sentences = m + 1; 1 (an option, not Meta's) lets the first concept stop.
LCM_MIN_SENTENCES = 2


@dataclass
class TwoTowerGeneration:
    """Output of :func:`generate_two_tower` for a batch of prompts.

    ``embeddings[b]``: the generated (denormalised) concepts of prompt b, [n_b, E], the stopping concept
    included (as the LCM does); ``stopped_on_eos[b]``: whether it stopped on the EOS/repetition rule.
    ``num_denoiser_steps``: DDIM steps actually run per concept (50 for T=100, S=40 with the quirk).
    """

    embeddings: list[Tensor]
    stopped_on_eos: list[bool]
    num_denoiser_steps: int
    timesteps: list[int] = field(default_factory=list)


def _zero_key_output(attn: Attention) -> Tensor:
    """What a query gets when its only key is the zero vector: output_proj(v_proj(0)), shape [d]."""
    v0 = attn.v_proj.bias if attn.v_proj.bias is not None else attn.v_proj.weight.new_zeros(attn.v_proj.out_features)
    v0 = v0.view(attn.num_kv_heads, attn.head_dim)
    v0 = v0.repeat_interleave(attn.num_heads // attn.num_kv_heads, dim=0).reshape(-1)
    return attn.output_proj(v0)


class CachedCrossAttention:
    """Inference cross-attention for B conditional rows (+ ``num_uncond`` unconditional rows).

    Keeps per-layer keys/values of ``[0 ; context so far]`` ([B, Hkv, n+1, Dh]); ``extend`` appends
    new context rows. Unconditional rows see only the zero vector: their output is a constant.
    """

    def __init__(self, denoiser: "Denoiser", batch: int, dtype: torch.dtype, device: torch.device) -> None:
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
        self._uncond_out = [_zero_key_output(layer.cross_attention) for layer in denoiser.layers]

    @staticmethod
    def _kv(attn: Attention, x: Tensor) -> tuple[Tensor, Tensor]:
        b, n, _ = x.shape
        k = attn.k_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, n, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        return k, v

    def extend(self, context: Tensor) -> None:
        """Append context rows [B, m, d] (contextualizer outputs) to every layer's keys/values."""
        for i, layer in enumerate(self.denoiser.layers):
            k, v = self._kv(layer.cross_attention, context)
            self.keys[i] = torch.cat([self.keys[i], k], dim=2)
            self.values[i] = torch.cat([self.values[i], v], dim=2)

    def __call__(self, attn: Attention, h: Tensor, layer_idx: int) -> Tensor:
        b = self.batch
        hc = h[:b]
        q = attn.q_proj(hc).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, self.keys[layer_idx], self.values[layer_idx], enable_gqa=attn.num_heads != attn.num_kv_heads
        )
        out = attn.output_proj(out.transpose(1, 2).reshape(b, -1))
        if self.num_uncond:
            uncond = self._uncond_out[layer_idx].to(out.dtype).expand(self.num_uncond, -1)
            out = torch.cat([out, uncond])
        return out


@torch.no_grad()
def generate_two_tower(
    model: "TwoTowerLCM",
    prompt_embeddings: Tensor,
    max_sentences: int,
    eos_embedding: Tensor | None = None,
    eos_threshold: float = 0.9,
    num_inference_steps: int = 40,
    guidance_scale: float = 3.0,
    guidance_rescale: float = 0.7,
    initial_noise_scale: float = 0.6,
    epsilon_scaling: float | None = None,
    clip_noise: float = 100.0,
    ddim_eta: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    reproduce_lcm_step_quirk: bool = True,
    stop_on_repetition_threshold: float | None = None,
    min_sentences: int = LCM_MIN_SENTENCES,
) -> TwoTowerGeneration:
    """Generate up to ``max_sentences`` concepts after each prompt (the LCM's two-tower generator).

    ``prompt_embeddings``: raw SONAR embeddings [P, E] or [B, P, E] (equal-length prompts).
    The prompt (normalised) is prefilled into the contextualizer's KV cache except its last
    concept; per new concept the last concept is encoded incrementally, ``z ~ N(0, I) *
    initial_noise_scale`` (clipped to +-clip_noise) is denoised by DDIM over the scheduler's
    timesteps with classifier-free guidance (a doubled batch whose second half sees only the zero
    vector; combined with :func:`cfg_combine`, rescale ``guidance_rescale``; skipped at t = T-1,
    where alpha_bar = 0 and the conditional x0 is used directly; ``guidance_scale == 1`` disables
    CFG). The final x0 is denormalised and appended.

    **Step count**: with ``reproduce_lcm_step_quirk=True`` (default) the schedule is the LCM's:
    T=100 with ``num_inference_steps=40`` runs 50 DDIM steps (t = 99, 97, ..., 1); ``False`` runs
    exactly ``num_inference_steps`` (see :mod:`sonar_llm.models.diffusion`).

    Stop rules (per prompt): cos(concept, eos_embedding) >= eos_threshold, cos(concept, previous)
    >= stop_on_repetition_threshold (if set), or ``max_sentences``; the EOS/repetition rules apply
    only once ``min_sentences`` concepts exist, the stopping one included (default 2 = Meta's generator,
    which cannot stop before the second generated concept; see ``LCM_MIN_SENTENCES``). The stopping
    concept is kept in the output.
    """
    if prompt_embeddings.dim() == 2:
        prompt_embeddings = prompt_embeddings.unsqueeze(0)
    E = model.cfg.sonar_dim
    if prompt_embeddings.dim() != 3 or prompt_embeddings.shape[-1] != E or prompt_embeddings.shape[1] < 1:
        raise ValueError(f"prompt_embeddings must be [P, {E}] or [B, P, {E}] with P >= 1, "
                         f"got {tuple(prompt_embeddings.shape)}")
    if not isinstance(max_sentences, int) or max_sentences < 1:
        raise ValueError(f"max_sentences must be a positive int, got {max_sentences!r}")
    if eos_embedding is not None and eos_embedding.reshape(-1).shape[0] != E:
        raise ValueError(f"eos_embedding must have {E} values, got shape {tuple(eos_embedding.shape)}")
    B, P, _ = prompt_embeddings.shape
    if P + max_sentences > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {P} + max_sentences {max_sentences} exceeds max_seq_len {model.cfg.max_seq_len}"
        )
    was_training = model.training
    model.eval()
    try:
        return _generate(
            model, prompt_embeddings, max_sentences, eos_embedding, eos_threshold, num_inference_steps,
            guidance_scale, guidance_rescale, initial_noise_scale, epsilon_scaling, clip_noise, ddim_eta,
            generator, reproduce_lcm_step_quirk, stop_on_repetition_threshold, min_sentences,
        )
    finally:
        model.train(was_training)


def _generate(model, prompt, max_sentences, eos_embedding, eos_threshold, num_inference_steps,
              guidance_scale, guidance_rescale, initial_noise_scale, epsilon_scaling, clip_noise, ddim_eta,
              generator, quirk, rep_threshold, min_sentences) -> TwoTowerGeneration:
    B, P, E = prompt.shape
    device = prompt.device
    dtype = model.encoder_frontend.pre_linear.weight.dtype
    sched = model.noise_scheduler
    timesteps = sched.set_timesteps(num_inference_steps, reproduce_lcm_step_quirk=quirk).tolist()
    T = sched.num_train_steps
    use_cfg = guidance_scale != 1.0

    x = model.sonar_normalizer.normalize(prompt.float()).to(dtype)
    cache = model.context_encoder.new_cache(B, P + max_sentences, device=device, dtype=dtype)
    cross = CachedCrossAttention(model.denoiser, B, dtype, device)
    if P > 1:
        cross.extend(model.context_encoder.step(model.encoder_frontend(x[:, :-1]), cache))
    last = x[:, -1:]
    eos = None if eos_embedding is None else eos_embedding.reshape(1, E).to(device=device, dtype=torch.float32)

    outputs: list[list[Tensor]] = [[] for _ in range(B)]
    finished = [False] * B
    stopped = [False] * B
    prev_raw = prompt[:, -1].float()
    for n in range(max_sentences):
        cross.extend(model.context_encoder.step(model.encoder_frontend(last), cache))
        z = torch.randn((B, E), generator=generator, device=device, dtype=torch.float32)
        z = (z * initial_noise_scale).clamp(-clip_noise, clip_noise)  # latents and DDIM maths in fp32
        pred_x0 = z
        for t in timesteps:
            if use_cfg and t != T - 1:
                cross.num_uncond = B
                out = model.denoiser(torch.cat([z, z]).to(dtype), t, cross).float()
                eps_c = sched.to_epsilon(out[:B], z, t)
                eps_u = sched.to_epsilon(out[B:], z, t)
                eps = cfg_combine(eps_c, eps_u, guidance_scale, guidance_rescale)
                z, pred_x0 = sched.step(eps, t, z, eta=ddim_eta, epsilon_scaling=epsilon_scaling,
                                        generator=generator, prediction_type="epsilon")
            else:
                cross.num_uncond = 0
                out = model.denoiser(z.to(dtype), t, cross).float()
                z, pred_x0 = sched.step(out, t, z, eta=ddim_eta, epsilon_scaling=epsilon_scaling,
                                        generator=generator, prediction_type="sample")
            z = z.clamp(-clip_noise, clip_noise)
        cross.num_uncond = 0
        raw = model.sonar_normalizer.denormalize(pred_x0.float())  # [B, E]
        stop_now = torch.zeros(B, dtype=torch.bool, device=device)
        if n + 1 >= min_sentences:
            if eos is not None:
                stop_now |= F.cosine_similarity(raw, eos, dim=-1) >= eos_threshold
            if rep_threshold is not None:
                stop_now |= F.cosine_similarity(raw, prev_raw, dim=-1) >= rep_threshold
        stop_list = stop_now.tolist()
        for b in range(B):
            if not finished[b]:
                outputs[b].append(raw[b])
                if stop_list[b]:
                    finished[b] = stopped[b] = True
        if all(finished):
            break
        prev_raw = raw
        last = model.sonar_normalizer.normalize(raw).to(dtype).unsqueeze(1)
    embeddings = [torch.stack(rows) for rows in outputs]
    return TwoTowerGeneration(embeddings, stopped, len(timesteps), timesteps)




def two_tower_concepts(model: "TwoTowerLCM", prompts: Sequence[Tensor], s: GenerationSettings
                       ) -> list[ConceptGeneration]:
    """`FamilySpec.generate` of the Two-Tower LCM: prompts grouped by length, each group continued by
    `generate_two_tower` with classifier-free guidance up to the story limit (max_sentences + 1 - prompt
    length new concepts, at least one); the end-of-document concept is dropped; decoded per story."""
    out: list[ConceptGeneration | None] = [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(prompts):
        by_len.setdefault(int(e.shape[0]), []).append(i)
    for plen, idx in by_len.items():
        new = max(1, s.max_sentences + 1 - plen)
        res = generate_two_tower(model, torch.stack([prompts[i] for i in idx]), new, eos_embedding=s.eos_embedding,
                                 eos_threshold=s.eos_threshold, num_inference_steps=s.num_inference_steps,
                                 guidance_scale=s.guidance_scale, guidance_rescale=s.guidance_rescale,
                                 initial_noise_scale=s.initial_noise_scale, generator=s.generator)
        for j, i in enumerate(idx):
            e = res.embeddings[j]
            if res.stopped_on_eos[j]:
                e = e[:-1]  # the end-of-document concept is not part of the story
            texts = list(s.decode_fn(e)) if s.decode_fn is not None and e.shape[0] else []
            out[i] = ConceptGeneration(e, texts, bool(res.stopped_on_eos[j]))
    return out  # type: ignore[return-value]
