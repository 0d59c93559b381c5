"""Benchmark: story generation of the concept models and the SONAR decoder's own decoding.

Every story method runs on the same prompts (random 2-sentence prompts), decodes every new sentence to
text with the same SONAR decoder (beam 5, a fixed number of tokens per sentence: random weights never
stop by themselves, see bench/common.py) and generates the same number of sentences per story (the
public rule: up to max_sentences; the end-of-document stop never fires on random embeddings).

Group "generation-sonar-llm":
  ours       generate_sonar_llm: all stories batched, backbone KV cache, decode + re-encode per step
  reference  generate_sonar_llm_reference: the public code's loop, one story at a time, the backbone
             re-run over the whole story every step (no KV cache), decode + re-encode per step
Group "generation-families" (backbones matched as in the training benchmark):
  ours       SONAR-LLM as above
  reference  Two-Tower LCM with classifier-free guidance (scale 3, rescale 0.7) at 40 requested DDIM
             steps (50 run, the LCM's step quirk), then the generated embeddings decoded to text
  base_lcm   Base-LCM (KV cache), then decoded to text
Groups "sonar-decode-greedy" and "sonar-decode-beam5": the SONAR decoder alone on a batch of embeddings,
  ours = incremental decoding with the KV cache and the one-key cross-attention constants,
  reference = the full decoder re-run over the prefix at every step (`use_cache=False`).
extra_info: sentences/s, stories/s, per-story latency (seconds per story = round time / stories; for the
batched methods every story of the batch finishes at about the same time, so this is throughput-latency),
generated tokens/s for the decoder groups.
"""
from __future__ import annotations

import pytest
import torch

from common import (
    IdTextCodec,
    bench_scale,
    cached,
    compute_dtype,
    mean_seconds,
    random_sonar_decoder,
    random_sonar_encoder,
    record_throughput,
    sync,
    synthetic_prompts,
)
from sonar_llm.models.family import get_family
from sonar_llm.models.generate import GenerationSettings, generate_sonar_llm, generate_sonar_llm_reference
from test_bench_training import build_family

SONAR_GROUP = "generation-sonar-llm"
FAMILY_GROUP = "generation-families"


def _models(scale, device):
    dtype = compute_dtype(device)
    dec = cached(("decoder", scale.name, str(device), dtype),
                 lambda: random_sonar_decoder(scale.sonar, device=device, dtype=dtype))
    enc = cached(("encoder", scale.name, str(device), dtype),
                 lambda: random_sonar_encoder(scale.sonar, device=device, dtype=dtype))
    return dec, enc


def _concept_model(family: str, scale, device, decoder):
    model = build_family(family, scale, device, decoder=decoder)
    return model.to(compute_dtype(device)).eval()  # the decoder it holds (if any) is not used by generation


def _eos(scale) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randn(scale.sonar.model_dim, generator=g)


def _finish(benchmark, scale, stories: int, sentences: int, role: str, method: str) -> None:
    benchmark.extra_info.update({
        "role": role, "method": method, "scale": scale.name, "backbone": scale.backbone,
        "stories": stories, "beam": scale.gen_beam, "tokens_per_sentence": scale.gen_max_gen_len,
        "prompt_sentences": scale.gen_prompt_len,
    })
    record_throughput(benchmark, sentences=sentences)
    mean = mean_seconds(benchmark)
    benchmark.extra_info["seconds_per_story"] = (mean / stories) if mean else None


def _sonar_llm_runner(scale, device, reference: bool):
    dec, enc = _models(scale, device)
    model = _concept_model("sonar_llm", scale, device, dec)
    codec = IdTextCodec(dec, enc, scale.sonar.lang_id, beam_size=scale.gen_beam, max_gen_len=scale.gen_max_gen_len)
    prompts = synthetic_prompts(scale.gen_stories, scale.gen_prompt_len, scale.sonar.model_dim)
    fn = generate_sonar_llm_reference if reference else generate_sonar_llm
    eos = _eos(scale)

    def run(prompt_list=prompts, max_sentences=scale.gen_max_sentences):
        out = fn(model, prompt_list, codec.decode_fn, codec.encode_fn, max_sentences=max_sentences,
                 eos_embedding=eos, eos_threshold=0.98)
        sync(device)
        return out

    return run, prompts


def _check_sentences(out, scale, stories: int) -> int:
    n = sum(len(r.texts) for r in out)
    want = stories * scale.gen_new_sentences
    assert n == want, f"generated {n} sentences, expected {want} (an end-of-document stop fired?)"
    return n


@pytest.mark.benchmark(group=SONAR_GROUP)
@pytest.mark.parametrize("role", ["ours", "reference"])
def test_bench_generate_sonar_llm(benchmark, bench_quick, bench_device, role):
    scale = bench_scale(bench_quick, bench_device)
    reference = role == "reference"
    run, prompts = _sonar_llm_runner(scale, bench_device, reference)
    run(prompts[:1], scale.gen_prompt_len)  # warm-up: one sentence of one story
    rounds = scale.gen_reference_rounds if reference else scale.gen_rounds
    out = benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    sentences = _check_sentences(out, scale, len(prompts))
    _finish(benchmark, scale, len(prompts), sentences, role,
            "generate_sonar_llm_reference" if reference else "generate_sonar_llm")


@pytest.mark.benchmark(group=FAMILY_GROUP)
@pytest.mark.parametrize("family,role", [("sonar_llm", "ours"), ("two_tower", "reference"),
                                         ("base_lcm", "base_lcm")])
def test_bench_generate_family(benchmark, bench_quick, bench_device, family, role):
    """Every family through its spec's `generate` (GenerationSettings: the same prompts, story limit and
    diffusion settings); concepts a family does not decode itself are decoded afterwards in one batch."""
    scale = bench_scale(bench_quick, bench_device)
    device = bench_device
    stories = scale.gen_stories
    spec = get_family(family)
    dec, enc = _models(scale, device)
    model = _concept_model(family, scale, device, dec if spec.needs_decoder else None)
    codec = IdTextCodec(dec, enc, scale.sonar.lang_id, beam_size=scale.gen_beam, max_gen_len=scale.gen_max_gen_len)
    dtype = compute_dtype(device)
    prompts = [p.to(device=device, dtype=dtype)
               for p in synthetic_prompts(stories, scale.gen_prompt_len, scale.sonar.model_dim)]
    eos = _eos(scale)

    def run(count=scale.gen_new_sentences):
        settings = GenerationSettings(
            eos_embedding=eos, max_sentences=scale.gen_prompt_len - 1 + count, eos_threshold=spec.eos_threshold,
            decode_fn=codec.decode_fn, encode_fn=codec.encode_fn, num_inference_steps=scale.two_tower_steps,
            guidance_scale=3.0, guidance_rescale=0.7, generator=torch.Generator(device=device).manual_seed(0))
        if not spec.needs_decoder:
            settings.decode_fn = None  # decoded below, all stories in one batch
        out = spec.generate(model, prompts, settings)
        undecoded = [r.embeddings for r in out if r.embeddings.shape[0] and not r.texts]
        if undecoded:
            codec.decode_fn(torch.cat(undecoded).to(device))
        sync(device)
        return out

    run(1)  # warm-up: one sentence per story
    out = benchmark.pedantic(run, rounds=scale.gen_rounds, warmup_rounds=0, iterations=1)
    sentences = sum(int(r.embeddings.shape[0]) for r in out)
    want = stories * scale.gen_new_sentences
    assert sentences == want, f"{family}: {sentences} sentences, expected {want} (an end stop fired?)"
    _finish(benchmark, scale, stories, sentences, role, f"{spec.generate.__name__} (FamilySpec.generate)")
    scheduler = getattr(model, "noise_scheduler", None)
    if scheduler is not None:
        benchmark.extra_info["ddim_steps_run"] = int(scheduler.set_timesteps(scale.two_tower_steps).numel())


@pytest.mark.parametrize("mode", [
    pytest.param("greedy", marks=pytest.mark.benchmark(group="sonar-decode-greedy")),
    pytest.param("beam5", marks=pytest.mark.benchmark(group="sonar-decode-beam5")),
])
@pytest.mark.parametrize("role", ["ours", "reference"])
def test_bench_sonar_decode(benchmark, bench_quick, bench_device, mode, role):
    scale = bench_scale(bench_quick, bench_device)
    dec, _ = _models(scale, bench_device)
    beam = 1 if mode == "greedy" else 5
    codec = IdTextCodec(dec, None, scale.sonar.lang_id, beam_size=beam, max_gen_len=scale.gen_max_gen_len)
    g = torch.Generator().manual_seed(7)
    emb = (torch.randn(scale.decode_sentences, scale.sonar.model_dim, generator=g)
           / scale.sonar.model_dim ** 0.5).to(bench_device)
    use_cache = role == "ours"

    def run():
        out = codec.decode_ids(emb, use_cache=use_cache)
        sync(bench_device)
        return out

    codec.decode_ids(emb[:1], use_cache=use_cache)  # warm-up
    benchmark.extra_info.update({"role": role, "mode": mode, "kv_cache": use_cache, "scale": scale.name,
                                 "sonar_shape": f"d={scale.sonar.model_dim} L={scale.sonar.num_layers} "
                                                f"V={scale.sonar.vocab_size}",
                                 "batch": scale.decode_sentences})
    out = benchmark.pedantic(run, rounds=scale.decode_rounds, warmup_rounds=0, iterations=1)
    # the fixed length: max_gen_len tokens, the final EOS removed
    assert all(len(ids) == scale.gen_max_gen_len - 1 for ids in out), "decoding length is not pinned"
    record_throughput(benchmark, sentences=scale.decode_sentences,
                      generated_tokens=scale.decode_sentences * scale.gen_max_gen_len)
