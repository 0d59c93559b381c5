"""Decode sentence embeddings to token ids: beam search (greedy = beam 1) as fairseq2 does, or sampling.

Defaults reproduce SONAR's ``EmbeddingToTextModelPipeline.predict`` (fairseq2 v0.4.6
``BeamSearchSeq2SeqGenerator`` with its defaults; read in ``generation/_beam_search/_generator.py`` and
``sonar/inference_pipelines/text.py``) token for token:

- **Prompt** ``[eos=3, lang]``; the prompt's own log-probability (of ``lang`` after ``eos``) is part of the
  score.
- **Length.** fairseq2 allows ``a * source_len + b`` generated tokens, ``max_gen_len=(a, b) = (1, 128)``.
  SONAR hands the generator the embedding batch ``[N, E]`` *as the source sequences* (a dummy encoder turns
  it into the one-key encoder output), so ``source_len`` is the embedding **width** ``E``, not 1: the
  default allows ``E + 128`` tokens. The whole sequence, prompt included, is then capped by ``max_seq_len``
  (default and upper bound: the decoder's position table, ``max_target_seq_len`` = 512 rows for the released
  models). So a sentence gets at most ``min(rows, 2 + E + 128) - 2`` tokens, final EOS included: 510 for
  the released models (``E`` = 1024), 192 for a 512-row decoder read with width 64, 126 for a 128-row
  decoder. (An older note here assumed ``source_len`` = 1 and a cap of 129: that is not what SONAR does.)
  The last allowed step forces EOS; EOS is banned while ``step < prompt_len + min_gen_len - 1``.
  :meth:`GenerationConfig.max_new_tokens` computes this cap, :meth:`GenerationConfig.summary` states it.
- **Banned ids.** fairseq2 never emits the model's ``vocab_info.pad_idx``; SONAR's model configs set it to
  1, the same id as ``<unk>`` (the tokenizer's real ``<pad>`` is 0). So the default bans id 1 only and
  *may emit id 0*, as SONAR does (its ``unk_penalty`` is 0). ``banned_ids=(0, 1)`` gives this module's
  former rule.
- **Beam step** (fairseq's): take the best ``2 * beam`` candidates of (cumulative score + log-prob), finish
  those among the first ``beam`` that are EOS, continue with the first ``beam`` that are not; a sentence is
  done when ``beam`` hypotheses have finished.
- **Scores**: log-probabilities of ``softmax(logits / temperature)`` in fp32, summed over the prompt's
  language tag and the generated tokens, divided by ``(seq_len - 1) ** len_penalty`` where ``seq_len``
  counts the prompt (``normalize_scores``); hypotheses are ranked by that score.

Saner caps for evaluation: the public SONAR-LLM generation passes ``max_seq_len=256`` (254 tokens per
sentence at width 1024); ``max_gen_len`` as a plain int caps the generated tokens (EOS included) directly.

**Length guard** (not in SONAR): a decoder that records the longest target it was trained on
(``SonarDecoderConfig.trained_target_len``; the tiny SONAR does, the released models do not) gets at most
``ceil(length_guard * trained_target_len)`` tokens per sentence (default 1.5x), on top of the caps above, so a
vector the decoder cannot read (e.g. a sentence it never saw) does not decode into hundreds of repeated tokens
at every generation step. ``length_guard=None`` keeps SONAR's own rule alone; the guard never applies to a
decoder that records nothing. :meth:`GenerationConfig.token_cap` is the resulting cap.

Sampling (``do_sample=True``) follows fairseq2's ``SamplingSeq2SeqGenerator``: the same prompt, length rule,
bans, forced final EOS and fp32 ``softmax(logits / temperature)``; banned ids get probability 0; the state
is fanned out to ``num_samples`` rows per embedding after the prompt. Filters: ``top_k`` keeps the ``k``
most likely tokens (ties broken by ``torch.topk``); ``top_p`` keeps the most likely tokens, in descending
order, while the probability mass *before* a token is ``<= p`` (fairseq2's ``TopPSampler``: the smallest
set whose mass reaches ``p``, plus ties at the boundary). fairseq2 takes one sampler; here both may be set
and apply in the order top-k, renormalise, top-p. Differences from fairseq2, chosen on purpose: the default
temperature stays 1.0 (fairseq2's sampling generator defaults to 0.6: pass ``temperature=0.6`` to match it),
and scores are always computed (as fairseq2's ``compute_scores=True``: from the temperature softmax before
the top-k/top-p filters). Draws come from ``generator`` (or one seeded from ``seed``), so they depend on
the batch composition: the same seed and batch give the same samples. Given one generator per embedding
instead (``story_generator``), each embedding's tokens are drawn from its own generator only, and only while
its sentence runs: they do not depend on the other embeddings of the batch nor on the batch size.

The incremental path uses the decoder's KV cache and the exact one-key cross-attention constants
(``W_o (W_v e + b_v) + b_o`` per layer); ``use_cache=False`` runs the full reference forward at every step
(slow; for checking the fast path).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import SonarDecoderConfig
from .decoder import SonarTextDecoder

__all__ = [
    "PROMPT_LEN", "DEFAULT_LENGTH_GUARD", "GenerationConfig", "Hypothesis", "decode_hypotheses", "beam_search", "sample_hypotheses",
    "generate", "greedy_decode", "greedy_reads", "make_generator", "story_generator",
]

Draws = torch.Generator | Sequence[torch.Generator] | None  # one generator, or one per embedding

PROMPT_LEN = 2  # [eos, lang]
DEFAULT_LENGTH_GUARD = 1.5  # x the longest trained target (GenerationConfig.length_guard)


@dataclass
class GenerationConfig:
    """How to turn one sentence embedding into tokens. The defaults are SONAR's own pipeline (module docstring)."""

    beam_size: int = 5
    """Beam width (1 = greedy). Unused when ``do_sample``."""
    min_gen_len: int = 1
    """EOS is banned until this many tokens have been generated (EOS counted)."""
    max_gen_len: int | tuple[float, float] = (1, 128)
    """Most generated tokens, EOS included: an int, or fairseq2's ``(a, b)`` = ``a * width + b`` where
    ``width`` is the embedding size (SONAR's source length; see the module docstring)."""
    max_seq_len: int | None = None
    """Cap on the whole sequence, 2-token prompt included; None = the decoder's position table (fairseq2's
    default). Larger values are cut to the table. The public SONAR-LLM generation uses 256."""
    normalize_scores: bool = True
    """Divide a hypothesis' score by ``(seq_len - 1) ** len_penalty`` (``seq_len`` counts the prompt)."""
    len_penalty: float = 1.0
    """Exponent of the length normalisation."""
    temperature: float = 1.0
    """Logits are divided by this before the softmax (beam search and sampling)."""
    banned_ids: tuple[int, ...] | None = None
    """Ids never generated (except the forced final EOS); None = SONAR's, ``(unk_idx,)`` = (1,): fairseq2's
    model pad index. ``(0, 1)`` also bans the tokenizer's pad."""
    use_cache: bool = True
    """Incremental decoding through the KV cache; False = full forward every step (reference, slow)."""
    do_sample: bool = False
    """Sample tokens instead of beam search."""
    top_k: int = 0
    """Sampling: keep only the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Sampling: nucleus threshold in (0, 1] (1 = all tokens)."""
    num_samples: int = 1
    """Sampling: continuations per embedding (beam search returns one best per embedding)."""
    seed: int | None = None
    """Sampling: seed of a fresh ``torch.Generator`` when none is passed (None = torch's global RNG)."""
    length_guard: float | None = DEFAULT_LENGTH_GUARD
    """At most ``ceil(length_guard * trained_target_len)`` tokens per sentence when the decoder records the
    longest target it was trained on (``SonarDecoderConfig.trained_target_len``); None = no guard (SONAR's own
    length rule, ``max_gen_len`` / ``max_seq_len``, alone)."""

    def __post_init__(self) -> None:
        def positive_int(name: str, value: Any, low: int = 1) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"GenerationConfig.{name} must be an int >= {low}, got {value!r}")

        positive_int("beam_size", self.beam_size)
        positive_int("min_gen_len", self.min_gen_len, 0)
        if isinstance(self.max_gen_len, list):  # e.g. read back from JSON
            self.max_gen_len = tuple(self.max_gen_len)
        if isinstance(self.max_gen_len, tuple):
            if len(self.max_gen_len) != 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.max_gen_len):
                raise ValueError(f"GenerationConfig.max_gen_len must be an int or a pair (a, b) meaning "
                                 f"a * embedding width + b, got {self.max_gen_len!r}")
        else:
            positive_int("max_gen_len", self.max_gen_len)
        if self.max_seq_len is not None:
            positive_int("max_seq_len", self.max_seq_len, PROMPT_LEN + 1)
        if not self.temperature > 0:
            raise ValueError(f"GenerationConfig.temperature must be > 0, got {self.temperature}")
        if self.banned_ids is not None:
            self.banned_ids = tuple(self.banned_ids)
            for i in self.banned_ids:
                positive_int("banned_ids[...]", i, 0)
        positive_int("top_k", self.top_k, 0)
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationConfig.top_p must be in (0, 1], got {self.top_p}")
        positive_int("num_samples", self.num_samples)
        if self.num_samples > 1 and not self.do_sample:
            raise ValueError("GenerationConfig.num_samples > 1 needs do_sample=True (beam search returns one "
                             "best hypothesis per embedding; beam_search() returns all finished ones)")
        if self.seed is not None:
            positive_int("seed", self.seed, 0)
        if self.length_guard is not None and (isinstance(self.length_guard, bool)
                                              or not isinstance(self.length_guard, (int, float))
                                              or not self.length_guard >= 1.0):
            raise ValueError(f"GenerationConfig.length_guard must be a number >= 1 (a multiple of the longest "
                             f"trained target) or None (no guard), got {self.length_guard!r}")

    def max_new_tokens(self, width: int, max_positions: int) -> int:
        """Most tokens one sentence can get, final EOS included, for embeddings of size ``width`` and a
        decoder with ``max_positions`` position rows: ``min(cap, 2 + max_gen_len) - 2`` with
        ``cap = min(max_seq_len or max_positions, max_positions)``."""
        if isinstance(self.max_gen_len, tuple):
            a, b = self.max_gen_len
            gen = int(a * width + b)
            if gen < 1:
                raise ValueError(f"GenerationConfig.max_gen_len={self.max_gen_len} gives {gen} tokens for "
                                 f"width {width}; it must allow at least 1")
        else:
            gen = self.max_gen_len
        cap = max_positions if self.max_seq_len is None else min(self.max_seq_len, max_positions)
        if cap <= PROMPT_LEN:
            raise ValueError(f"a sequence cap of {cap} positions leaves no room after the {PROMPT_LEN}-token prompt")
        return min(cap, PROMPT_LEN + gen) - PROMPT_LEN

    def guard_tokens(self, decoder_cfg: SonarDecoderConfig) -> int | None:
        """The length guard's cap for a decoder (None: no guard, or the decoder records no training length)."""
        trained = getattr(decoder_cfg, "trained_target_len", None)
        if self.length_guard is None or trained is None:
            return None
        return math.ceil(self.length_guard * trained)

    def token_cap(self, decoder_cfg: SonarDecoderConfig, width: int | None = None) -> int:
        """Most tokens one sentence can get with this decoder, final EOS included: :meth:`max_new_tokens`
        (``width`` defaults to the decoder's ``encoder_dim``), cut to :meth:`guard_tokens` when that applies."""
        width = decoder_cfg.encoder_dim if width is None else width
        cap = self.max_new_tokens(width, decoder_cfg.max_seq_len)
        guard = self.guard_tokens(decoder_cfg)
        return cap if guard is None else min(cap, guard)

    def resolved_banned_ids(self, decoder_cfg: SonarDecoderConfig) -> tuple[int, ...]:
        """The ids this configuration bans for a decoder: ``banned_ids``, or SONAR's ``(unk_idx,)``."""
        ids = (decoder_cfg.unk_idx,) if self.banned_ids is None else self.banned_ids
        for i in ids:
            if not 0 <= i < decoder_cfg.vocab_size:
                raise ValueError(f"banned id {i} is outside the decoder vocabulary [0, {decoder_cfg.vocab_size})")
        return ids

    def summary(self, decoder_cfg: SonarDecoderConfig, width: int | None = None) -> dict[str, Any]:
        """JSON-ready statement of the decoding actually run with this decoder (what an evaluation or
        generation command should print and store): every field plus the resolved ``max_new_tokens`` and
        ``banned_ids``. ``width`` defaults to the decoder's ``encoder_dim``."""
        width = decoder_cfg.encoder_dim if width is None else width
        out = dataclasses.asdict(self)
        out["max_gen_len"] = list(self.max_gen_len) if isinstance(self.max_gen_len, tuple) else self.max_gen_len
        out["strategy"] = "sample" if self.do_sample else ("greedy" if self.beam_size == 1 else "beam")
        out["banned_ids"] = list(self.resolved_banned_ids(decoder_cfg))
        out["decoder_positions"] = decoder_cfg.max_seq_len
        out["width"] = width
        out["trained_target_len"] = getattr(decoder_cfg, "trained_target_len", None)
        out["guard_tokens"] = self.guard_tokens(decoder_cfg)
        out["max_new_tokens"] = self.token_cap(decoder_cfg, width)
        return out


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, final EOS included
    score: float  # (normalised) score used for ranking


class _CachedStepper:
    def __init__(self, decoder: SonarTextDecoder, emb: Tensor, capacity: int) -> None:
        self.decoder = decoder
        self.state = decoder.init_state(emb, capacity)

    def __call__(self, seqs: Tensor, begin: int, end: int) -> Tensor:
        return self.decoder.step(seqs[:, begin:end], self.state)

    def reorder(self, index: Tensor) -> None:
        self.state.reorder(index)


class _BruteForceStepper:
    def __init__(self, decoder: SonarTextDecoder, emb: Tensor) -> None:
        self.decoder = decoder
        self.emb = emb

    def __call__(self, seqs: Tensor, begin: int, end: int) -> Tensor:
        return self.decoder(seqs[:, :end], self.emb)[:, begin:end]

    def reorder(self, index: Tensor) -> None:
        self.emb = self.emb.index_select(0, index)


def _lang_column(lang_ids: int | Tensor | list[int], batch: int, device) -> Tensor:
    if isinstance(lang_ids, int):
        return torch.full((batch,), lang_ids, dtype=torch.int64, device=device)
    col = torch.as_tensor(lang_ids, dtype=torch.int64, device=device).reshape(-1)
    if col.numel() != batch:
        raise ValueError(f"lang_ids must be an int or have one id per embedding ({batch}), got {col.numel()}")
    return col


def _check_embeddings(decoder: SonarTextDecoder, embeddings: Tensor) -> None:
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be [B, E], got {shape}")
    if embeddings.size(1) != decoder.cfg.encoder_dim:
        raise ValueError(f"embeddings dim {embeddings.size(1)} != decoder encoder_dim {decoder.cfg.encoder_dim}")


def _seq_lens(cfg: GenerationConfig, vcfg: SonarDecoderConfig, width: int) -> tuple[int, int]:
    """(max_seq_len, min_seq_len), prompt included: the last step forces EOS at max_seq_len - 1; EOS is banned
    before step min_seq_len - 1."""
    max_seq_len = PROMPT_LEN + cfg.token_cap(vcfg, width)
    return max_seq_len, min(max_seq_len, PROMPT_LEN + cfg.min_gen_len)


class _Setup:
    """What beam search and sampling share: checked embeddings, the prompt, the length limits, the stepper,
    and the prompt's score (the prefill)."""

    def __init__(self, decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
                 cfg: GenerationConfig) -> None:
        _check_embeddings(decoder, embeddings)
        vcfg = decoder.cfg
        w = decoder.decoder_frontend.embed.weight
        self.device = w.device
        self.emb = embeddings.to(device=self.device, dtype=w.dtype)
        self.num_prompts = self.emb.size(0)
        self.eos = vcfg.eos_idx
        self.banned = torch.tensor(cfg.resolved_banned_ids(vcfg), dtype=torch.int64, device=self.device)
        self.max_seq_len, self.min_seq_len = _seq_lens(cfg, vcfg, embeddings.size(1))
        self.cfg = cfg
        if self.num_prompts == 0:
            return
        self.seqs = torch.empty(self.num_prompts, self.max_seq_len, dtype=torch.int64, device=self.device)
        self.seqs[:, 0] = self.eos
        self.seqs[:, 1] = _lang_column(lang_ids, self.num_prompts, self.device)
        self.stepper = (_CachedStepper(decoder, self.emb, self.max_seq_len) if cfg.use_cache
                        else _BruteForceStepper(decoder, self.emb))
        # Prefill: score the language tag after EOS.
        lp = self.lprobs(self.stepper(self.seqs, 0, PROMPT_LEN - 1)[:, 0])
        self.prompt_score = lp.gather(-1, self.seqs[:, 1:2]).squeeze(-1)

    def lprobs(self, logits: Tensor) -> Tensor:
        return torch.log_softmax(logits.float() / self.cfg.temperature, dim=-1)

    def step_lprobs(self, step_nr: int) -> Tensor:
        """Log-probabilities for position ``step_nr`` with the rules applied: the last step forces EOS,
        otherwise banned ids and (before the minimum length) EOS get -inf."""
        lprobs = self.lprobs(self.stepper(self.seqs, step_nr - 1, step_nr)[:, 0])
        if step_nr == self.max_seq_len - 1:
            forced = torch.full_like(lprobs, -torch.inf)
            forced[:, self.eos] = lprobs[:, self.eos]
            return forced
        lprobs[:, self.banned] = -torch.inf
        if step_nr < self.min_seq_len - 1:
            lprobs[:, self.eos] = -torch.inf
        return lprobs

    def final_score(self, raw: float, step_nr: int) -> float:
        # (step_nr + 1) - 1: fairseq2 divides by the sequence length (prompt included) minus one.
        return raw / step_nr ** self.cfg.len_penalty if self.cfg.normalize_scores else raw

    def reorder(self, index: Tensor) -> None:
        self.stepper.reorder(index)
        self.seqs = self.seqs.index_select(0, index)


@torch.inference_mode()
def beam_search(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
                cfg: GenerationConfig | None = None) -> list[list[Hypothesis]]:
    """All finished hypotheses per embedding, best first. embeddings [B, E]; lang_ids: int or [B]."""
    cfg = cfg or GenerationConfig()
    run = _Setup(decoder, embeddings, lang_ids, cfg)
    num_prompts, device, eos = run.num_prompts, run.device, run.eos
    if num_prompts == 0:
        return []
    beam = cfg.beam_size
    scores = torch.zeros(num_prompts, run.max_seq_len, dtype=torch.float32, device=device)
    scores[:, 1] = run.prompt_score

    prompt_index = torch.arange(num_prompts, device=device)
    beam_sizes = [1] * num_prompts
    output: list[list[Hypothesis]] = [[] for _ in range(num_prompts)]

    for step_nr in range(PROMPT_LEN, run.max_seq_len):
        lprobs = run.step_lprobs(step_nr)
        vocab = lprobs.size(1)
        cand = lprobs + scores[:, step_nr - 1:step_nr]

        # One top-k over all prompts: their beams are padded to the widest with -inf rows.
        num_active = len(beam_sizes)
        widest = max(beam_sizes)
        sizes_t = torch.tensor(beam_sizes, device=device)
        offsets = torch.cumsum(sizes_t, 0) - sizes_t
        owner = torch.repeat_interleave(torch.arange(num_active, device=device), sizes_t)
        slot = torch.arange(cand.size(0), device=device) - offsets[owner]
        if cand.size(0) == num_active * widest:  # all beams equally wide: no padding needed
            padded = cand.view(num_active, widest, vocab)
        else:
            padded = cand.new_full((num_active, widest, vocab), -torch.inf)
            padded[owner, slot] = cand
        k = min(2 * beam, vocab)  # as fairseq2's StandardBeamSearchAlgorithm
        top_s, top_i = torch.topk(padded.view(num_active, -1), k)
        rows_all = (top_i // vocab + offsets[:, None]).tolist()
        toks_all = (top_i % vocab).tolist()
        scores_all = top_s.tolist()
        firsts = offsets.tolist()
        prompt_host = prompt_index.tolist()

        keep_rows, keep_tok, keep_score, new_sizes = [], [], [], []
        seqs_host: list[list[int]] | None = None
        for a in range(num_active):
            rows, toks, top_s_list = rows_all[a], toks_all[a], scores_all[a]
            pidx = prompt_host[firsts[a]]
            done = False
            conts: list[int] = []
            for j in range(k):
                if top_s_list[j] == -float("inf"):
                    break  # padding rows or banned tokens: nothing useful below
                if j < beam and toks[j] == eos:
                    if seqs_host is None:
                        seqs_host = run.seqs[:, PROMPT_LEN:step_nr].tolist()
                    score = run.final_score(top_s_list[j], step_nr)
                    output[pidx].append(Hypothesis(seqs_host[rows[j]] + [eos], float(score)))
                    if len(output[pidx]) == beam:
                        done = True
                        break
                elif toks[j] != eos:
                    conts.append(j)
            if not done:
                conts = conts[:beam]
                if conts:
                    keep_rows += [rows[j] for j in conts]
                    keep_tok += [toks[j] for j in conts]
                    keep_score += [top_s_list[j] for j in conts]
                    new_sizes.append(len(conts))
        if not new_sizes:
            break
        index = torch.tensor(keep_rows, dtype=torch.int64, device=device)
        run.reorder(index)
        scores = scores.index_select(0, index)
        prompt_index = prompt_index.index_select(0, index)
        run.seqs[:, step_nr] = torch.tensor(keep_tok, dtype=torch.int64, device=device)
        scores[:, step_nr] = torch.tensor(keep_score, dtype=torch.float32, device=device)
        beam_sizes = new_sizes

    for hyps in output:
        hyps.sort(key=lambda h: h.score, reverse=True)
    return output


@torch.inference_mode()
def greedy_reads(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
                 target: list[int], cfg: GenerationConfig | None = None) -> Tensor:
    """Bool [B]: whether greedy decoding of each embedding (beam 1 under ``cfg``'s rules: banned ids, minimum
    length, token cap; sampling fields ignored) gives exactly the ids ``target`` (final EOS excluded), found
    without decoding. Greedy decoding gives ``target`` iff ``target`` then EOS is the best token at every step,
    so one teacher-forced pass over ``[eos, lang, *target, eos]`` decides it: a few positions, however long
    the decoder would have run on a vector it cannot read. A tie for the best token counts as read."""
    cfg = dataclasses.replace(cfg or GenerationConfig(), beam_size=1, do_sample=False, num_samples=1)
    _check_embeddings(decoder, embeddings)
    vcfg = decoder.cfg
    w = decoder.decoder_frontend.embed.weight
    batch = embeddings.size(0)
    max_seq_len, min_seq_len = _seq_lens(cfg, vcfg, embeddings.size(1))
    length = PROMPT_LEN + len(target) + 1  # the prompt, the target, its EOS
    if batch == 0 or length > max_seq_len:  # the cap cuts greedy decoding before the target's EOS
        return torch.zeros(batch, dtype=torch.bool, device=w.device)
    seqs = torch.empty(batch, length, dtype=torch.int64, device=w.device)
    seqs[:, 0] = vcfg.eos_idx
    seqs[:, 1] = _lang_column(lang_ids, batch, w.device)
    seqs[:, PROMPT_LEN:-1] = torch.as_tensor(target, dtype=torch.int64, device=w.device)
    seqs[:, -1] = vcfg.eos_idx
    hidden = decoder.hidden_states(seqs[:, :-1], embeddings.to(device=w.device, dtype=w.dtype))
    logits = decoder.project(hidden[:, PROMPT_LEN - 1:]).float()  # the positions that choose a token
    steps = torch.arange(PROMPT_LEN, length, device=w.device)  # the step each row of logits chooses for
    allowed = torch.ones_like(logits[0], dtype=torch.bool)  # [steps, V], the rules of _Setup.step_lprobs
    allowed[:, list(cfg.resolved_banned_ids(vcfg))] = False
    allowed[steps < min_seq_len - 1, vcfg.eos_idx] = False
    last = steps == max_seq_len - 1  # the forced EOS
    allowed[last] = False
    allowed[last, vcfg.eos_idx] = True
    logits = logits.masked_fill(~allowed, -torch.inf)
    chosen = logits.gather(-1, seqs[:, PROMPT_LEN:, None]).squeeze(-1)
    return (torch.isfinite(chosen) & (chosen >= logits.amax(-1))).all(-1)


def make_generator(cfg: GenerationConfig, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` seeded with ``cfg.seed`` (None when no seed is set)."""
    if cfg.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(cfg.seed)


def story_generator(seed: int, story: int, sample: int = 0,
                    device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of one story's draws, seeded from (``seed``, story number, sample number) through numpy's
    ``SeedSequence`` (so neighbouring numbers give unrelated streams): a story's draws then depend on its own
    number only, not on the batch or on the stories before it."""
    import numpy as np

    state = int(np.random.SeedSequence([seed, story, sample]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(state)


def _per_row(generator, rows: int) -> list[torch.Generator] | None:
    """``generator`` as a list of one generator per embedding (None when it is one generator, or None)."""
    if generator is None or isinstance(generator, torch.Generator):
        return None
    gens = list(generator)
    if len(gens) != rows or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator: give one torch.Generator, or one per embedding ({rows}), got "
                         f"{len(gens)} item(s)")
    return gens


def _filter_probs(probs: Tensor, top_k: int, top_p: float) -> Tensor:
    """probs [N, V] (banned ids at 0) -> unnormalised sampling weights after top-k, then top-p. Each filter
    sees a renormalised distribution (the bans removed some mass), as fairseq2's samplers do."""
    vocab = probs.size(-1)
    probs = probs / probs.sum(-1, keepdim=True)
    if 0 < top_k < vocab:
        _, idx = torch.topk(probs, top_k, dim=-1)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, idx, True)
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


@torch.inference_mode()
def sample_hypotheses(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
           cfg: GenerationConfig | None = None, generator: Draws = None) -> list[list[Hypothesis]]:
    """``cfg.num_samples`` sampled hypotheses per embedding, in sample order (not sorted by score).
    ``generator`` (on the decoder's device) drives the draws: one for the batch, or one per embedding (each
    embedding's samples draw from its own, so they do not depend on the rest of the batch); None = one
    seeded from ``cfg.seed``, or torch's global RNG when no seed is set."""
    cfg = cfg or GenerationConfig(do_sample=True)
    run = _Setup(decoder, embeddings, lang_ids, cfg)
    own = _per_row(generator, embeddings.size(0))
    if run.num_prompts == 0:
        return []
    if generator is None:
        generator = make_generator(cfg, run.device)
    device, eos, n = run.device, run.eos, cfg.num_samples
    # Fan out after the prompt: row r is sample r % n of embedding r // n.
    fan_out = torch.arange(run.num_prompts, device=device).repeat_interleave(n)
    run.reorder(fan_out)
    score = run.prompt_score.index_select(0, fan_out)
    slot = torch.arange(run.num_prompts * n, device=device)  # row -> sample r % n of embedding r // n
    done: list[Hypothesis | None] = [None] * (run.num_prompts * n)

    for step_nr in range(PROMPT_LEN, run.max_seq_len):
        lprobs = run.step_lprobs(step_nr)
        if step_nr == run.max_seq_len - 1:
            tokens = torch.full((lprobs.size(0),), eos, dtype=torch.int64, device=device)
        else:
            weights = _filter_probs(lprobs.exp(), cfg.top_k, cfg.top_p)
            if own is None:
                tokens = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
            else:  # each running row draws from its embedding's generator, one row at a time
                tokens = torch.cat([torch.multinomial(weights[i:i + 1], 1, generator=own[r // n])[0]
                                    for i, r in enumerate(slot.tolist())])
        score = score + lprobs.gather(-1, tokens[:, None]).squeeze(-1)
        run.seqs[:, step_nr] = tokens
        finished = tokens == eos
        if bool(finished.any()):
            rows = finished.nonzero().squeeze(-1)
            for r, s, toks in zip(slot[rows].tolist(), score[rows].tolist(),
                                  run.seqs[rows, PROMPT_LEN:step_nr + 1].tolist()):
                done[r] = Hypothesis(toks, float(run.final_score(s, step_nr)))
            active = (~finished).nonzero().squeeze(-1)
            if active.numel() == 0:
                break
            run.reorder(active)
            score, slot = score.index_select(0, active), slot.index_select(0, active)
    return [[h for h in done[p * n:(p + 1) * n] if h is not None] for p in range(run.num_prompts)]


def decode_hypotheses(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
                      cfg: GenerationConfig | None = None, generator: Draws = None) -> list[list[Hypothesis]]:
    """:func:`sample_hypotheses` when ``cfg.do_sample``, else :func:`beam_search`."""
    cfg = cfg or GenerationConfig()
    if cfg.do_sample:
        return sample_hypotheses(decoder, embeddings, lang_ids, cfg, generator)
    return beam_search(decoder, embeddings, lang_ids, cfg)


def generate(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int], *,
             beam_size: int = 5, max_gen_len: int | tuple[float, float] | None = None, use_cache: bool = True,
             cfg: GenerationConfig | None = None, generator: Draws = None) -> list[list[int]]:
    """Token ids without the final EOS: the best hypothesis per embedding (beam search), or, when
    ``cfg.do_sample``, ``cfg.num_samples`` samples per embedding, embedding-major (``B * num_samples``
    lists). ``cfg`` overrides the keywords; ``max_gen_len=None`` keeps SONAR's default rule."""
    if cfg is None:
        extra = {} if max_gen_len is None else {"max_gen_len": max_gen_len}
        cfg = GenerationConfig(beam_size=beam_size, use_cache=use_cache, **extra)
    eos = decoder.cfg.eos_idx
    out = []
    for hyps in decode_hypotheses(decoder, embeddings, lang_ids, cfg, generator):
        chosen = hyps if cfg.do_sample else hyps[:1]
        for h in chosen or [Hypothesis([], float("-inf"))]:
            toks = h.tokens
            out.append(toks[:-1] if toks and toks[-1] == eos else toks)
    return out


def greedy_decode(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int], *,
                  max_gen_len: int | tuple[float, float] | None = None, use_cache: bool = True,
                  cfg: GenerationConfig | None = None) -> list[list[int]]:
    """Greedy decoding (beam size 1); ``cfg`` (its other fields) overrides the keywords."""
    if cfg is not None:
        cfg = dataclasses.replace(cfg, beam_size=1, do_sample=False, num_samples=1)
    return generate(decoder, embeddings, lang_ids, beam_size=1, max_gen_len=max_gen_len, use_cache=use_cache,
                    cfg=cfg)
