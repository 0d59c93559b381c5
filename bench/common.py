"""Shared builders and measurement helpers of the model-level benchmarks (training, generation, encoder).

* `bench_scale(quick, device)` picks one `BenchScale`: "quick" (CI smoke run), "cpu" (reduced shapes)
  or "gpu" (the paper's shapes: the released SONAR text models' shape, d=1024, 24 layers, V=256,206,
  bf16, and the 600M SONAR-LLM backbone). `SONAR_BENCH_SCALE=quick|cpu|gpu` forces one.
* Random-weight SONAR encoder/decoder (`random_sonar_decoder`, `random_sonar_encoder`) and tokenizer-free
  synthetic data (`synthetic_concept_batch`, `synthetic_source_sentences`, `synthetic_prompts`): throughput
  depends on shapes, not on weights, so no checkpoint or tokenizer is needed.
* `IdTextCodec`: a tokenizer-free "text" (token ids written as decimal numbers) so the generation loops
  that decode to text and re-encode text run end to end with the real decoder and encoder costs.
* `PeakMemory`, `tensor_bytes`, `peak_flops`, `mfu`, `sonar_encoder_flops`, `record_throughput`: what
  goes into `benchmark.extra_info`.
* `issue_targets` / `python bench/common.py targets RESULT.json`: the benchmark issue's targets against a
  result file.

Random weights never emit EOS on their own, so decoding is pinned to a fixed length
(`min_gen_len = max_gen_len`): every method decodes exactly the same number of tokens per sentence.
"""
from __future__ import annotations

import os
import resource
import sys
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.sonar.config import decoder_preset, encoder_preset
from sonar_llm.sonar.decoder import SonarTextDecoder
from sonar_llm.sonar.encoder import SonarTextEncoder
from sonar_llm.sonar.generation import GenerationConfig, generate

__all__ = [
    "SonarShape",
    "BenchScale",
    "SCALES",
    "bench_scale",
    "compute_dtype",
    "sync",
    "random_sonar_decoder",
    "random_sonar_encoder",
    "synthetic_concept_batch",
    "synthetic_source_sentences",
    "synthetic_prompts",
    "pad_batch",
    "IdTextCodec",
    "PeakMemory",
    "tensor_bytes",
    "peak_flops",
    "mfu",
    "sonar_encoder_flops",
    "mean_seconds",
    "shape_from_env",
    "record_throughput",
    "cached",
    "TARGETS",
    "issue_targets",
    "format_targets",
]

NUM_LANG_TAGS = 205  # SONAR's 202 languages + spares: the last ids of the vocabulary are language tags


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SonarShape:
    """Shape of a SONAR text encoder/decoder (the encoder and decoder share it, as the released ones do)."""

    model_dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    vocab_size: int

    @property
    def lang_offset(self) -> int:
        """Id of the first language tag (the last `NUM_LANG_TAGS` ids, at least id 4)."""
        return max(4, self.vocab_size - NUM_LANG_TAGS)

    @property
    def lang_id(self) -> int:
        """The language tag used by the synthetic data (the first one)."""
        return self.lang_offset


@dataclass(frozen=True)
class BenchScale:
    """Every size the model-level benchmarks use, for one scale."""

    name: str
    sonar: SonarShape
    backbone: str  # a sonar_llm.models.presets name
    # training: documents x sentences per document, words per sentence (target-mode adds 3 ids)
    train_docs: int
    train_sents_per_doc: int
    words: tuple[int, int]
    train_rounds: int
    # generation
    gen_stories: int
    gen_prompt_len: int
    gen_max_sentences: int  # the public rule: generate while the story has <= this many sentences
    gen_max_gen_len: int  # tokens decoded per sentence (EOS included), fixed, see the module docstring
    gen_beam: int
    gen_rounds: int
    gen_reference_rounds: int
    two_tower_steps: int  # requested DDIM steps (the LCM's 40 -> 50 effective with its step quirk)
    # the SONAR decoder's own decoding
    decode_sentences: int
    decode_rounds: int
    # the SONAR encoder
    encode_sentences: int
    encode_batch: int
    encode_rounds: int

    @property
    def gen_new_sentences(self) -> int:
        """Sentences generated per story when nothing stops early (prompt of gen_prompt_len)."""
        return self.gen_max_sentences + 1 - self.gen_prompt_len


SCALES: dict[str, BenchScale] = {
    "quick": BenchScale(
        name="quick", sonar=SonarShape(64, 2, 4, 128, 512), backbone="tiny",
        train_docs=2, train_sents_per_doc=4, words=(3, 8), train_rounds=1,
        gen_stories=2, gen_prompt_len=2, gen_max_sentences=3, gen_max_gen_len=6, gen_beam=5, gen_rounds=1,
        gen_reference_rounds=1, two_tower_steps=4,
        decode_sentences=4, decode_rounds=1, encode_sentences=16, encode_batch=8, encode_rounds=1,
    ),
    "cpu": BenchScale(
        name="cpu", sonar=SonarShape(256, 2, 4, 1024, 8192), backbone="small",
        train_docs=4, train_sents_per_doc=8, words=(8, 20), train_rounds=3,
        gen_stories=4, gen_prompt_len=2, gen_max_sentences=6, gen_max_gen_len=16, gen_beam=5, gen_rounds=2,
        gen_reference_rounds=1, two_tower_steps=40,
        decode_sentences=16, decode_rounds=2, encode_sentences=512, encode_batch=64, encode_rounds=3,
    ),
    "gpu": BenchScale(
        name="gpu", sonar=SonarShape(1024, 24, 16, 8192, 256_206), backbone="600M",
        train_docs=16, train_sents_per_doc=32, words=(8, 20), train_rounds=5,
        gen_stories=16, gen_prompt_len=2, gen_max_sentences=16, gen_max_gen_len=20, gen_beam=5, gen_rounds=2,
        gen_reference_rounds=1, two_tower_steps=40,
        decode_sentences=256, decode_rounds=3, encode_sentences=8192, encode_batch=512, encode_rounds=3,
    ),
}


def bench_scale(quick: bool, device: torch.device) -> BenchScale:
    """The scale for this run: `SONAR_BENCH_SCALE` if set, else "quick" in quick mode, "gpu" on CUDA,
    "cpu" otherwise."""
    env = os.environ.get("SONAR_BENCH_SCALE", "").strip()
    if env:
        if env not in SCALES:
            raise ValueError(f"SONAR_BENCH_SCALE must be one of {sorted(SCALES)}, got {env!r}")
        return SCALES[env]
    if quick:
        return SCALES["quick"]
    return SCALES["gpu"] if device.type == "cuda" else SCALES["cpu"]


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (a no-op on the CPU), so a timed body measures its own work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CACHE: dict[tuple, object] = {}


def cached(key: tuple, build: Callable[[], object]) -> object:
    """Build once per process (the paper-scale SONAR models take seconds to initialise)."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


# ----------------------------------------------------------------------------------------------
# Random-weight SONAR models
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """N(0, std) for every weight and bias except LayerNorms (kept at 1 / 0), drawn on the model's device."""
    gens: dict[torch.device, torch.Generator] = {}
    for name, p in model.named_parameters():
        if "layer_norm" in name:
            continue
        if p.device not in gens:
            gens[p.device] = torch.Generator(device=p.device).manual_seed(seed)
        p.normal_(0.0, std, generator=gens[p.device])


def _check_shape(shape: SonarShape) -> None:
    if not isinstance(shape, SonarShape):
        raise TypeError(f"shape must be a SonarShape, got {type(shape).__name__}")


def random_sonar_decoder(shape: SonarShape, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 0) -> SonarTextDecoder:
    """A frozen SONAR text decoder of `shape` with N(0, 0.02) weights, in eval mode, no dropout."""
    _check_shape(shape)
    cfg = decoder_preset("basic", model_dim=shape.model_dim, num_layers=shape.num_layers,
                         num_heads=shape.num_heads, ffn_dim=shape.ffn_dim, vocab_size=shape.vocab_size,
                         lang_offset=shape.lang_offset, dropout_p=0.0)
    dec = SonarTextDecoder(cfg, device=device, dtype=dtype)
    _randomize(dec, seed)
    return dec.eval().requires_grad_(False)


def random_sonar_encoder(shape: SonarShape, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32, seed: int = 1) -> SonarTextEncoder:
    """A SONAR text encoder of `shape` with N(0, 0.02) weights, in eval mode, no dropout."""
    _check_shape(shape)
    cfg = encoder_preset("basic", model_dim=shape.model_dim, num_layers=shape.num_layers,
                         num_heads=shape.num_heads, ffn_dim=shape.ffn_dim, vocab_size=shape.vocab_size,
                         lang_offset=shape.lang_offset, dropout_p=0.0)
    enc = SonarTextEncoder(cfg, device=device, dtype=dtype)
    _randomize(enc, seed)
    return enc.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Synthetic data (no tokenizer)
# ----------------------------------------------------------------------------------------------


def _word_ids(n: int, shape: SonarShape, g: torch.Generator) -> Tensor:
    """`n` ordinary word ids: above the 4 special ids, below the language tags."""
    return torch.randint(4, shape.lang_offset, (n,), generator=g)


def synthetic_concept_batch(shape: SonarShape, num_docs: int, sents_per_doc: int, words: tuple[int, int],
                            *, emb_dim: int | None = None, seed: int = 0,
                            device: torch.device | str = "cpu") -> ConceptBatch:
    """A `ConceptBatch` of `num_docs` documents with exactly `sents_per_doc` sentences each (same
    batch for every method), sentences of words[0]..words[1] word ids in target mode
    `[3, lang, w1..wn, 3]`, and N(0, 1/E)-scaled random embeddings of width `emb_dim` (default
    shape.model_dim)."""
    _check_shape(shape)
    if num_docs < 1 or sents_per_doc < 2:
        raise ValueError(f"need num_docs >= 1 and sents_per_doc >= 2, got {num_docs} and {sents_per_doc}")
    lo, hi = words
    if not 1 <= lo <= hi:
        raise ValueError(f"words must be (min, max) with 1 <= min <= max, got {words}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    e = emb_dim or shape.model_dim
    num_sent = num_docs * sents_per_doc
    n_words = torch.randint(lo, hi + 1, (num_sent,), generator=g)
    lengths = n_words + 3
    tok_cu = torch.zeros(num_sent + 1, dtype=torch.int64)
    tok_cu[1:] = lengths.cumsum(0)
    tokens = _word_ids(int(tok_cu[-1]), shape, g)
    starts = tok_cu[:-1]
    tokens[starts] = 3
    tokens[starts + 1] = shape.lang_id
    tokens[tok_cu[1:] - 1] = 3
    doc_cu = torch.arange(0, num_sent + 1, sents_per_doc, dtype=torch.int32)
    emb = torch.randn(num_sent, e, generator=g) / e ** 0.5
    batch = ConceptBatch(emb, doc_cu, tokens, tok_cu.to(torch.int32), sents_per_doc, int(lengths.max()))
    return batch.validate().to(device)


def synthetic_source_sentences(shape: SonarShape, num: int, words: tuple[int, int],
                               seed: int = 0) -> list[list[int]]:
    """`num` source-mode sentences `[lang, w1..wn, 3]` (the encoder's input) of words[0]..words[1] words,
    in random length order."""
    _check_shape(shape)
    lo, hi = words
    if not 1 <= lo <= hi:
        raise ValueError(f"words must be (min, max) with 1 <= min <= max, got {words}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_words = torch.randint(lo, hi + 1, (num,), generator=g).tolist()
    return [[shape.lang_id] + _word_ids(n, shape, g).tolist() + [3] for n in n_words]


def synthetic_prompts(num: int, length: int, dim: int, seed: int = 0) -> list[Tensor]:
    """`num` story prompts of `length` random unit-norm-ish sentence embeddings [length, dim] (fp32, CPU)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randn(length, dim, generator=g) / dim ** 0.5 for _ in range(num)]


def pad_batch(seqs: list[list[int]], device: torch.device | str = "cpu", pad: int = 0) -> tuple[Tensor, Tensor]:
    """Right-pad id lists to the longest: (tokens [B, S] int64, padding_mask [B, S] bool, True = real)."""
    if not seqs:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = torch.tensor(s, dtype=torch.int64)
        mask[i, :len(s)] = True
    return tokens.to(device), mask.to(device)


@dataclass
class IdTextCodec:
    """Tokenizer-free text for the generation loops: a sentence's word ids written as "17 254 9".

    `decode_fn(embeddings[B, E]) -> list[str]` decodes with the SONAR decoder (beam `beam_size`, exactly
    `max_gen_len` tokens per sentence, EOS included), `encode_fn(texts) -> [B, E]` re-encodes source-mode
    `[lang, ids.., 3]` with the SONAR encoder in batches (`encode_fn` needs `encoder`)."""

    decoder: SonarTextDecoder
    encoder: SonarTextEncoder | None
    lang_id: int
    beam_size: int = 5
    max_gen_len: int = 16

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_gen_len < 1:
            raise ValueError(f"max_gen_len must be >= 1, got {self.max_gen_len}")

    @staticmethod
    def ids_to_text(ids: list[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    @staticmethod
    def text_to_ids(text: str) -> list[int]:
        try:
            return [int(t) for t in text.split()]
        except ValueError as exc:
            raise ValueError(f"IdTextCodec text must be space-separated integers, got {text!r}") from exc

    @property
    def generation_config(self) -> GenerationConfig:
        return GenerationConfig(beam_size=self.beam_size, min_gen_len=self.max_gen_len,
                                max_gen_len=self.max_gen_len)

    def decode_ids(self, embeddings: Tensor, use_cache: bool = True) -> list[list[int]]:
        cfg = replace(self.generation_config, use_cache=use_cache)
        return generate(self.decoder, embeddings, self.lang_id, cfg=cfg)

    def decode_fn(self, embeddings: Tensor) -> list[str]:
        return [self.ids_to_text(ids) for ids in self.decode_ids(embeddings)]

    @torch.inference_mode()
    def encode_fn(self, texts: list[str]) -> Tensor:
        if self.encoder is None:
            raise ValueError("IdTextCodec.encode_fn needs an encoder")
        w = self.encoder.encoder_frontend.embed.weight
        seqs = [[self.lang_id] + self.text_to_ids(t) + [3] for t in texts]
        tokens, mask = pad_batch(seqs, w.device)
        return self.encoder(tokens, mask).float()


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


class PeakMemory:
    """Memory of the code run inside `with PeakMemory(device) as pm:`.

    CUDA: `pm.extra_peak_bytes` = torch.cuda.max_memory_allocated during the block minus what was
    allocated when it began (activations, logits, gradients, temporaries: what the block adds on top of
    the resident weights and optimizer state); `pm.resident_bytes` = allocated at the start (everything
    alive in the process, other benchmarks' cached models included). CPU: `pm.rss_growth_bytes` = growth
    of the process's resident-set high-water mark (ru_maxrss) during the block, 0 when an earlier peak
    was already higher (a lower bound at best)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.extra_peak_bytes: int | None = None
        self.resident_bytes: int | None = None
        self.rss_growth_bytes: int | None = None

    @staticmethod
    def _maxrss_bytes() -> int:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss) if sys.platform == "darwin" else int(rss) * 1024  # KiB on Linux

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.resident_bytes = int(torch.cuda.memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._rss0 = self._maxrss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - self.resident_bytes
        else:
            self.rss_growth_bytes = self._maxrss_bytes() - self._rss0

    def info(self, state_bytes: int | None = None) -> dict[str, int | None]:
        """extra_info entries. With `state_bytes` (the method's own weights, gradients and optimizer state,
        see `tensor_bytes`), CUDA also gets `peak_mem_bytes` = state_bytes + extra_peak_bytes: the peak
        the method needs on its own, independent of what else the process holds."""
        out: dict[str, int | None] = {}
        if state_bytes is not None:
            out["state_bytes"] = int(state_bytes)
        if self.device.type == "cuda":
            out["step_extra_peak_bytes"] = self.extra_peak_bytes
            out["peak_mem_bytes"] = (state_bytes + self.extra_peak_bytes) if state_bytes is not None else None
        else:
            out["cpu_maxrss_growth_bytes"] = self.rss_growth_bytes
        return out


def tensor_bytes(*items) -> int:
    """Bytes of the distinct tensor storages reachable from `items`: tensors, modules (parameters,
    their .grad, buffers) and optimizers (their state tensors). Shared storages count once."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if not isinstance(t, Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if key not in seen:
            seen.add(key)
            total += st.nbytes()

    for item in items:
        if isinstance(item, Tensor):
            add(item)
        elif isinstance(item, torch.nn.Module):
            for p in item.parameters():
                add(p)
                add(p.grad)
            for b in item.buffers():
                add(b)
        elif isinstance(item, torch.optim.Optimizer):
            for state in item.state.values():
                for v in state.values():
                    add(v)
        elif item is not None:
            raise TypeError(f"tensor_bytes accepts tensors, modules and optimizers, got {type(item).__name__}")
    return total


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak FLOP/s of the CUDA device (train.metrics table: H100/H200 989e12, A100 312e12, ...),
    None on the CPU or for an unknown GPU (then no MFU is reported)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    from sonar_train.metrics import gpu_peak_flops

    return gpu_peak_flops(torch.cuda.get_device_name(device), "bf16")


def mfu(flops: float, seconds: float | None, peak: float | None) -> float | None:
    """Model FLOPs utilisation = flops / seconds / peak (None when either is unknown)."""
    if flops < 0:
        raise ValueError(f"flops must be >= 0, got {flops}")
    if not seconds or not peak:
        return None
    return flops / seconds / peak


def sonar_encoder_flops(cfg, lengths: list[int] | Tensor, padded_to: list[int] | None = None) -> float:
    """Forward FLOPs of the SONAR encoder over sentences of `lengths` tokens: per token
    2 x L x (4 D^2 + 2 D F) (projections and FFN) plus attention scores and mixing 4 x L x D x keys
    per query. `padded_to[i]` (optional) is the padded length sentence i was computed at; by default
    the useful FLOPs of the unpadded sentences are counted."""
    d, f, layers = cfg.model_dim, cfg.ffn_dim, cfg.num_layers
    lengths = [int(x) for x in (lengths.tolist() if isinstance(lengths, Tensor) else lengths)]
    widths = lengths if padded_to is None else [int(x) for x in padded_to]
    if len(widths) != len(lengths):
        raise ValueError(f"padded_to has {len(widths)} entries for {len(lengths)} sentences")
    tokens = float(sum(widths))
    pairs = float(sum(w * w for w in widths))
    return 2.0 * layers * (4 * d * d + 2 * d * f) * tokens + 4.0 * layers * d * pairs


def shape_from_env(var: str, fields: str) -> tuple[int, ...] | None:
    """The shape override in environment variable `var`, e.g. SONAR_BENCH_LCE_SHAPE="4096,8192,256" with
    fields "N,V,D"; None when it is unset. Raises a ValueError naming the variable when it is malformed."""
    env = os.environ.get(var)
    if not env:
        return None
    n_fields = len(fields.split(","))
    try:
        shape = tuple(int(x) for x in env.split(","))
    except ValueError:
        shape = ()
    if len(shape) != n_fields:
        raise ValueError(f"{var} must be '{fields}' integers, got {env!r}")
    return shape


def mean_seconds(benchmark) -> float | None:
    """Mean seconds per round of a finished pytest-benchmark run (None with --benchmark-disable)."""
    stats = getattr(benchmark, "stats", None)
    inner = getattr(stats, "stats", None)
    mean = getattr(inner, "mean", None)
    return float(mean) if mean else None


def record_throughput(benchmark, *, flops: float | None = None, peak: float | None = None,
                      **counts: float | None) -> None:
    """After `benchmark(...)`: extra_info[f"{name}_per_s"] = count / mean seconds for each count given
    (e.g. sentences=512 -> sentences_per_s), the counts themselves, `flops_per_call`, `mfu` and
    `peak_flops_used`. Rates are None when timing is disabled."""
    mean = mean_seconds(benchmark)
    info = benchmark.extra_info
    for name, count in counts.items():
        info[name] = count
        info[f"{name}_per_s"] = (count / mean) if (mean and count is not None) else None
    if flops is not None:
        info["flops_per_call"] = float(flops)
        info["peak_flops_used"] = peak
        info["mfu"] = mfu(flops, mean, peak)


# ----------------------------------------------------------------------------------------------
# The issue's targets, read from a result file
# ----------------------------------------------------------------------------------------------

# (name, group, numerator role, denominator role or None, extra_info key, threshold)
TARGETS: list[tuple[str, str, str, str | None, str, float]] = [
    ("SONAR-LLM training, fast / reference sentences/s", "training-sonar-llm", "ours", "reference",
     "sentences_per_s", 3.0),
    ("SONAR-LLM training MFU (fast path, frozen decoder counted)", "training-sonar-llm", "ours", None, "mfu", 0.45),
    ("SONAR-LLM generation, ours / public loop sentences/s", "generation-sonar-llm", "ours", "reference",
     "sentences_per_s", 10.0),
    ("SONAR-LLM / Two-Tower LCM (CFG, 40 steps) generation sentences/s", "generation-families", "ours",
     "reference", "sentences_per_s", 5.0),
    ("SONAR encoder sentences/s", "sonar-encoder", "ours", None, "sentences_per_s", 10_000.0),
]


def issue_targets(result: dict) -> list[dict]:
    """The issue's targets against a pytest-benchmark result (the dict of a bench/results JSON): one row
    per target with `value` (a ratio of two roles of one group, or one role's figure), `threshold`,
    `met` (None when the figure is missing, e.g. with timing disabled) and the scale it was measured at."""
    by_role: dict[tuple[str, str], dict] = {}
    for b in result.get("benchmarks", []):
        info = b.get("extra_info", {}) or {}
        by_role[(b.get("group") or "-", info.get("role", "-"))] = info
    rows = []
    for name, group, num_role, den_role, key, threshold in TARGETS:
        num = by_role.get((group, num_role), {}).get(key)
        value = None
        if den_role is None:
            value = num
        else:
            den = by_role.get((group, den_role), {}).get(key)
            if num is not None and den:
                value = num / den
        rows.append({"target": name, "value": value, "threshold": threshold,
                     "met": None if value is None else bool(value >= threshold),
                     "scale": by_role.get((group, num_role), {}).get("scale")})
    return rows


def format_targets(rows: list[dict], gpu: str | None) -> str:
    """A markdown table of `issue_targets` rows (the targets are stated for one H200 at the paper's shapes;
    other devices and the CPU's reduced shapes are for comparison only)."""
    lines = [f"Targets of the benchmark issue (stated for one H200, bf16, paper shapes; this run: "
             f"{gpu or 'CPU'})", "", "| target | measured | threshold | met | scale |", "|---|---|---|---|---|"]
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.4g}"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        lines.append(f"| {r['target']} | {v} | {r['threshold']:g} | {met} | {r['scale'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The command; errors follow sonar_llm.cli (bad input: exit 2, one line)."""
    from sonar_llm.cli import run

    return run("common", _main, argv)


def _main(argv: list[str]) -> int:
    from pathlib import Path

    from report import read_result

    from sonar_llm.cli import parser

    ap = parser("bench/common.py", description="bench/common.py helpers: `targets RESULT.json` prints the "
                                                "issue's targets against a result file")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("targets", help="the issue's targets against a result")
    t.add_argument("result", type=Path, help="a pytest-benchmark JSON result")
    args = ap.parse_args(argv)
    result = read_result(args.result)
    gpu = (result.get("machine_info_sonar") or {}).get("gpu")
    print(format_targets(issue_targets(result), gpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
