"""Decode sentence embeddings to token ids with beam search (greedy = beam 1), as fairseq2 does.

Semantics (fairseq2 ``BeamSearchSeq2SeqGenerator`` defaults used by SONAR's EmbeddingToText pipeline):
- prompt ``[eos=3, lang]``; the prompt's own log-probability (of ``lang`` after ``eos``) is part of the score;
- sequence cap ``min(max_seq_len, prompt_len + max_gen_len)`` (so at most ``max_gen_len`` = 128 + 1 = 129
  generated tokens by default), the last allowed step forces EOS; EOS is banned while
  ``step < prompt_len + min_gen_len - 1``; pad (0) and unk (1) are never emitted;
- fairseq's beam step: take the best ``2 * beam`` candidates of (cumulative score + log-prob), finish those
  among the first ``beam`` that are EOS, continue with the first ``beam`` that are not; a sentence is done
  when ``beam`` hypotheses have finished; hypotheses are ranked by ``score / (seq_len - 1) ** len_penalty``.

The incremental path uses the decoder's KV cache and the exact one-key cross-attention constants
(``W_o (W_v e + b_v) + b_o`` per layer); ``use_cache=False`` runs the full reference forward at every step
(slow; for checking the fast path).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .decoder import SonarTextDecoder

__all__ = ["GenerationConfig", "Hypothesis", "generate", "greedy_decode", "beam_search"]


@dataclass
class GenerationConfig:
    beam_size: int = 5
    min_gen_len: int = 1
    max_gen_len: int = 129  # fairseq2 (1, 128) with a source length of 1
    max_seq_len: int = 512
    normalize_scores: bool = True
    len_penalty: float = 1.0
    temperature: float = 1.0
    ban_unk: bool = True
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {self.max_gen_len}")
        if self.min_gen_len < 0:
            raise ValueError(f"min_gen_len must be >= 0, got {self.min_gen_len}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


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


@torch.inference_mode()
def beam_search(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int],
                cfg: GenerationConfig | None = None) -> list[list[Hypothesis]]:
    """All finished hypotheses per embedding, best first. embeddings [B, E]; lang_ids: int or [B]."""
    cfg = cfg or GenerationConfig()
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, Tensor) else type(embeddings).__name__
        raise ValueError(f"embeddings must be [B, E], got {shape}")
    if embeddings.size(1) != decoder.cfg.encoder_dim:
        raise ValueError(f"embeddings dim {embeddings.size(1)} != decoder encoder_dim {decoder.cfg.encoder_dim}")
    vcfg = decoder.cfg
    eos, pad, unk = vcfg.eos_idx, vcfg.pad_idx, vcfg.unk_idx
    w = decoder.decoder_frontend.embed.weight
    device = w.device
    emb = embeddings.to(device=device, dtype=w.dtype)
    num_prompts = emb.size(0)
    if num_prompts == 0:
        return []
    prompt_len = 2
    max_seq_len = min(cfg.max_seq_len, vcfg.max_seq_len, prompt_len + cfg.max_gen_len)
    min_seq_len = min(cfg.max_seq_len, vcfg.max_seq_len, prompt_len + cfg.min_gen_len)
    if max_seq_len <= prompt_len:
        raise ValueError(f"max_seq_len {max_seq_len} leaves no room after the {prompt_len}-token prompt")
    beam = cfg.beam_size

    seqs = torch.empty(num_prompts, max_seq_len, dtype=torch.int64, device=device)
    seqs[:, 0] = eos
    seqs[:, 1] = _lang_column(lang_ids, num_prompts, device)
    scores = torch.zeros(num_prompts, max_seq_len, dtype=torch.float32, device=device)
    stepper = _CachedStepper(decoder, emb, max_seq_len) if cfg.use_cache else _BruteForceStepper(decoder, emb)

    # Prefill: score the language tag after EOS.
    logits = stepper(seqs, 0, prompt_len - 1)
    lp = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
    scores[:, 1] = lp[:, 0].gather(-1, seqs[:, 1:2]).squeeze(-1)

    prompt_index = torch.arange(num_prompts, device=device)
    beam_sizes = [1] * num_prompts
    output: list[list[Hypothesis]] = [[] for _ in range(num_prompts)]

    for step_nr in range(prompt_len, max_seq_len):
        logits = stepper(seqs, step_nr - 1, step_nr)[:, 0]
        lprobs = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)
        if step_nr == max_seq_len - 1:
            forced = torch.full_like(lprobs, -torch.inf)
            forced[:, eos] = lprobs[:, eos]
            lprobs = forced
        else:
            lprobs[:, pad] = -torch.inf
            if cfg.ban_unk:
                lprobs[:, unk] = -torch.inf
            if step_nr < min_seq_len - 1:
                lprobs[:, eos] = -torch.inf
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
                        seqs_host = seqs[:, prompt_len:step_nr].tolist()
                    raw = top_s_list[j]
                    score = raw / (step_nr + 1 - 1) ** cfg.len_penalty if cfg.normalize_scores else raw
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
        stepper.reorder(index)
        seqs = seqs.index_select(0, index)
        scores = scores.index_select(0, index)
        prompt_index = prompt_index.index_select(0, index)
        seqs[:, step_nr] = torch.tensor(keep_tok, dtype=torch.int64, device=device)
        scores[:, step_nr] = torch.tensor(keep_score, dtype=torch.float32, device=device)
        beam_sizes = new_sizes

    for hyps in output:
        hyps.sort(key=lambda h: h.score, reverse=True)
    return output


def generate(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int], *,
             beam_size: int = 5, max_gen_len: int = 129, use_cache: bool = True,
             cfg: GenerationConfig | None = None) -> list[list[int]]:
    """Best hypothesis per embedding, as token ids without the final EOS. ``cfg`` overrides the keywords."""
    if cfg is None:
        cfg = GenerationConfig(beam_size=beam_size, max_gen_len=max_gen_len, use_cache=use_cache)
    eos = decoder.cfg.eos_idx
    out = []
    for hyps in beam_search(decoder, embeddings, lang_ids, cfg):
        toks = hyps[0].tokens if hyps else []
        out.append(toks[:-1] if toks and toks[-1] == eos else toks)
    return out


def greedy_decode(decoder: SonarTextDecoder, embeddings: Tensor, lang_ids: int | Tensor | list[int], *,
                  max_gen_len: int = 129, use_cache: bool = True) -> list[list[int]]:
    """Greedy decoding (beam size 1)."""
    return generate(decoder, embeddings, lang_ids, beam_size=1, max_gen_len=max_gen_len, use_cache=use_cache)
