"""Inference cost of each family vs context length: FLOPs per generated sentence, counted and extrapolated.

Counted: FlopCounterMode's formulas (torch.utils.flop_counter) applied to every op of the families' real
generation paths at small sizes on real tensors: a concept family's `spec.generate` (with SONAR decoding
of every new embedding to tokens, beam `BEAM`, exactly `TOKENS` tokens, and SONAR re-encoding where the
family's loop re-encodes: SONAR-LLM), a family without concept-level generation (spec.generate is None:
the token LLM) through `generate_token_llm`. The cost of ONE generated sentence at context n is the
difference of two runs on the same prompt of n-1 sentences: the run allowed n sentences minus the run
allowed n-1 (the prefill and the first prediction cancel). Attention runs PyTorch's math SDPA (the same
matmuls; FlopCounterMode has no formula for the CPU fused kernel). A run's total is checked against
FlopCounterMode's own total.

Every counted FLOP goes to a group (decoding and re-encoding run in `decode_fn` / `encode_fn` here:
"decoder", "encoder"; the rest is "model": backbone, heads, the diffusion loop with its guidance) and,
inside it, to the parameter it multiplies (by storage) or, with no parameter operand, to attention.
Closed form, per group g:
    F_g(n) = sum_p u_p * 2 * numel(p) + (c_g + a_g * n) * A_g
u_p = passes over weight p per generated sentence (tokens x beams for the decoder; denoising steps x 2
for classifier-free guidance; 1 for a concept backbone), a_g and c_g = attention work per context sentence
and per sentence in units of A_g = sum of heads x head_dim over the group's attention modules. u, c, a are
read from the counts at the small size (two context lengths; parameters matched by name, layer index
replaced by '#'); tests/test_plan.py checks F at a third context length and at a second small size; the
paper-size curves put the presets' parameters and attention widths into F.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, flop_registry

TOKENS = 16  # decoded tokens per sentence (about the mean of the planner's sentence-length histogram)
BEAM = 5  # SONAR's default beam search (the public SONAR-LLM generation uses it)
CONTEXTS = (2, 6)  # context lengths (sentences) counted at the small size to read u, c and a
GROUPS = ("model", "decoder", "encoder")


def _norm(name: str) -> str:
    return re.sub(r"\.\d+\.", ".#.", name)


def attention_width(modules: list[nn.Module]) -> int:
    """Sum over attention modules (any module with integer `num_heads` and `head_dim`) of heads x head_dim."""
    total = 0
    for root in modules:
        for m in root.modules():
            h, dh = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
            if isinstance(h, int) and isinstance(dh, int):
                total += h * dh
    return total


def build(family: str, preset: str, sonar_preset: str, vocab_size: int, fake: bool):
    """(model, spec, decoder, encoder) of `family` at `preset` with a SONAR decoder/encoder of
    `sonar_preset` shapes; on fake tensors (no memory) when `fake`."""
    import contextlib

    from sonar_llm.models.build import ModelConfig, build_model
    from sonar_llm.models.family import get_family
    from sonar_llm.sonar.config import decoder_preset as dec_cfg
    from sonar_llm.sonar.config import encoder_preset as enc_cfg
    from sonar_llm.sonar.decoder import SonarTextDecoder
    from sonar_llm.sonar.encoder import SonarTextEncoder

    ctx = contextlib.nullcontext()
    if fake:
        from sonar_train.plan_trace import PlanFakeMode

        ctx = PlanFakeMode()
    with ctx:
        torch.manual_seed(0)
        spec = get_family(family)
        decoder = SonarTextDecoder(dec_cfg(sonar_preset))
        encoder = SonarTextEncoder(enc_cfg(sonar_preset))
        overrides = {}
        if not spec.needs_decoder and spec.generate is not None:
            overrides["sonar_dim"] = decoder.cfg.encoder_dim
        if spec.generate is None:
            overrides["vocab_size"] = vocab_size
        deps = {"decoder": decoder} if spec.needs_decoder else {}
        model = build_model(ModelConfig(family=family, preset=preset, overrides=overrides), **deps)
    return model.eval(), spec, decoder.eval(), encoder.eval()


def groups(model, decoder, encoder) -> dict[str, list[nn.Module]]:
    return {"model": [model], "decoder": [decoder], "encoder": [encoder]}


class _Attribution(TorchDispatchMode):
    """FLOPs (FlopCounterMode's formulas) per group and per parameter name; `phase` names the group."""

    def __init__(self, owners: dict[int, tuple[str, str]]) -> None:
        super().__init__()
        self.owners = owners  # storage data_ptr -> (group, normalised parameter name)
        self.phase = "model"
        self.params: dict[str, dict[str, int]] = {g: defaultdict(int) for g in GROUPS}
        self.attention: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        formula = flop_registry.get(func.overloadpacket)
        if formula is None and func is not torch.ops.prim.device.default:
            with self:  # composite ops (e.g. aten.linear under inference_mode) into counted ones, as FlopCounterMode
                r = func.decompose(*args, **kwargs)
                if r is not NotImplemented:
                    return r
        out = func(*args, **kwargs)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            owner, size = None, -1  # the largest parameter operand (the weight, not addmm's bias)
            for a in tree_leaves((args, kwargs)):
                if isinstance(a, torch.Tensor):
                    found = self.owners.get(a.untyped_storage().data_ptr())
                    if found is not None and a.untyped_storage().nbytes() > size:
                        owner, size = found, a.untyped_storage().nbytes()
            if owner is not None:
                self.params[self.phase][owner[1]] += flops
            else:
                self.attention[self.phase] += flops
        return out


def _sonar_fns(decoder, encoder, mode: _Attribution, tokens: int, beam: int):
    from sonar_llm.sonar.generation import GenerationConfig, generate

    cfg = GenerationConfig(beam_size=beam, min_gen_len=tokens, max_gen_len=tokens)
    lang = decoder.cfg.vocab_size - 1
    last: dict[str, Any] = {}

    def decode_fn(emb):
        mode.phase = "decoder"
        try:
            ids = generate(decoder, emb.float(), lang, cfg=cfg)
        finally:
            mode.phase = "model"
        last["ids"] = ids
        return ["x"] * len(ids)

    def encode_fn(texts):
        rows = [[3, lang, *t, 3] for t in last["ids"]]  # target-mode ids of the decoded sentences
        n = max(len(r) for r in rows)
        tokens_ = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mode.phase = "encoder"
        try:
            return encoder(tokens_, tokens_ != 0)
        finally:
            mode.phase = "model"

    return decode_fn, encode_fn


def _run(model, spec, decoder, encoder, context: int, allowed: int, tokens: int, beam: int,
         settings_kw: dict | None = None) -> dict[str, Any]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    owners = {}
    for g, mods in groups(model, decoder, encoder).items():
        for root in mods:
            for name, p in root.named_parameters():
                owners.setdefault(p.untyped_storage().data_ptr(), (g, _norm(name)))
    mode = _Attribution(owners)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc, mode:
        if spec.generate is not None:
            from sonar_llm.models.generate import GenerationSettings

            dim = decoder.cfg.encoder_dim
            gen = torch.Generator().manual_seed(0)
            prompt = torch.randn(context - 1, dim, generator=gen) * 0.1
            decode_fn, encode_fn = _sonar_fns(decoder, encoder, mode, tokens, beam)
            settings = GenerationSettings(eos_embedding=torch.ones(dim), max_sentences=allowed, eos_threshold=2.0,
                                          decode_fn=decode_fn, encode_fn=encode_fn, generator=gen,
                                          **(settings_kw or {}))
            spec.generate(model, [prompt], settings)
        else:
            from sonar_llm.models.generate import generate_token_llm

            vocab = max(m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding))
            prompt = torch.randint(4, min(100, vocab), ((context - 1) * tokens,))
            generate_token_llm(model, [prompt], max_new_tokens=(allowed - context + 1) * tokens + 1, stop_ids=())
    total = sum(sum(v.values()) for v in mode.params.values()) + sum(mode.attention.values())
    if total != fc.get_total_flops():
        raise AssertionError(f"attributed {total} FLOPs but FlopCounterMode counted {fc.get_total_flops()}")
    return {"params": {g: dict(v) for g, v in mode.params.items()}, "attention": dict(mode.attention)}


def count_sentence(model, spec, decoder, encoder, context: int, tokens_per_sentence: int = TOKENS,
                   beam: int = BEAM, settings: dict | None = None) -> dict[str, Any]:
    """FLOPs of generating the sentence at position `context` (the prompt holds context-1 sentences):
    per group, the total, the attention part and the part per weight (normalised name). `settings`:
    GenerationSettings fields (default: the families' defaults, e.g. 40 DDIM steps, guidance 3)."""
    lo = _run(model, spec, decoder, encoder, context, context - 1, tokens_per_sentence, beam, settings)
    hi = _run(model, spec, decoder, encoder, context, context, tokens_per_sentence, beam, settings)
    out = {}
    for g in GROUPS:
        names = set(lo["params"][g]) | set(hi["params"][g])
        per = {n: hi["params"][g].get(n, 0) - lo["params"][g].get(n, 0) for n in names}
        per = {n: v for n, v in per.items() if v}
        att = hi["attention"].get(g, 0) - lo["attention"].get(g, 0)
        out[g] = {"total": sum(per.values()) + att, "attention": att, "params": per}
    return out


def _numel_by_name(modules: list[nn.Module]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    seen = set()
    for root in modules:
        for name, p in root.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[_norm(name)] += p.numel()
    return out


def fit(model, spec, decoder, encoder, contexts=CONTEXTS, **kw) -> dict[str, dict[str, Any]]:
    """u_p, c_g, a_g of the closed form from counts at two context lengths (module docstring)."""
    c1, c2 = contexts
    f1 = count_sentence(model, spec, decoder, encoder, c1, **kw)
    f2 = count_sentence(model, spec, decoder, encoder, c2, **kw)
    out = {}
    for g, mods in groups(model, decoder, encoder).items():
        numel, width = _numel_by_name(mods), attention_width(mods)
        uses = {n: f / (2 * numel[n]) for n, f in f1[g]["params"].items()}
        slope = (f2[g]["attention"] - f1[g]["attention"]) / (c2 - c1)
        const = f1[g]["attention"] - slope * c1
        out[g] = {"uses": uses, "c": const / width if width else 0.0, "a": slope / width if width else 0.0}
    return out


def sizes_of(model, decoder, encoder) -> dict[str, dict[str, Any]]:
    """Per group: parameter counts by normalised name and the attention width A."""
    return {g: {"numel": dict(_numel_by_name(m)), "A": attention_width(m)}
            for g, m in groups(model, decoder, encoder).items()}


def closed_form(coeffs: dict[str, dict[str, Any]], sizes: dict[str, dict[str, Any]], n: float) -> dict[str, float]:
    """F_g(n) per group for models of `sizes` with the fitted coefficients."""
    out = {}
    for g, c in coeffs.items():
        numel = sizes[g]["numel"]
        weights = sum(u * 2 * numel[name] for name, u in c["uses"].items())
        out[g] = weights + (c["c"] + c["a"] * n) * sizes[g]["A"]
    return out


def inference_curves(families: list[str], presets: list[str], contexts: list[int], *, small_preset: str = "tiny",
                     small_sonar: str = "tiny", paper_sonar: str = "basic", token_vocab: int = 128_256,
                     **count_kw) -> dict[str, Any]:
    """Fitted coefficients per family (small size, real tensors) and FLOPs per sentence at paper sizes."""
    from sonar_llm.models.presets import PUBLIC_TOKEN_VOCAB

    token_vocab = token_vocab or PUBLIC_TOKEN_VOCAB
    out: dict[str, Any] = {"tokens_per_sentence": count_kw.get("tokens_per_sentence", TOKENS),
                           "beam": count_kw.get("beam", BEAM), "contexts": contexts, "families": {}}
    for fam in families:
        model, spec, dec, enc = build(fam, small_preset, small_sonar, 2206, fake=False)
        coeffs = fit(model, spec, dec, enc, **count_kw)
        entry = {"title": spec.title or fam, "coefficients": coeffs, "presets": {}}
        for preset in presets:
            big, _, bdec, benc = build(fam, preset, paper_sonar, token_vocab, fake=True)
            sz = sizes_of(big, bdec, benc)
            entry["presets"][preset] = {"sizes": sz, "flops": [closed_form(coeffs, sz, n) for n in contexts]}
        out["families"][fam] = entry
    return out


def plot(curves: dict[str, Any], presets: list[str], path: str) -> None:
    """GFLOP per generated sentence vs context length, one panel per preset (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(presets), figsize=(6 * len(presets), 4.5), squeeze=False)
    ns = curves["contexts"]
    for ax, preset in zip(axes[0], presets):
        for e in curves["families"].values():
            ys = [sum(f.values()) / 1e9 for f in e["presets"][preset]["flops"]]
            ax.plot(ns, ys, marker="o", ms=3, label=e["title"])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("context length (sentences)")
        ax.set_ylabel("GFLOP per generated sentence")
        ax.set_title(f"{preset} models + SONAR decoder (computed from the code, not measured)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["count_sentence", "fit", "closed_form", "sizes_of", "inference_curves", "plot", "build",
           "attention_width", "TOKENS", "BEAM"]
