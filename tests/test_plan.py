"""The run planner (train/sonar_train/plan.py) against a real CPU training step at small shapes.

Reference measurements, independent of the planner's machinery (no MemTracker, no fake tensors):
- peak memory of the real step = bytes resident before it (the distinct storages of the model's
  parameters and buffers, the frozen decoder held outside the module tree, and the batch) + the highest
  running total of the CPU allocator's allocations and frees during the step, read from the PyTorch
  profiler's memory events (`profile_memory=True`: every c10 CPU allocation and free, in time order,
  including those made inside ATen kernels, which no dispatch-level tracker sees). Tolerance: 20%.
- FLOPs of the real step: torch.utils.flop_counter.FlopCounterMode on real tensors, with the closed form of
  the CPU attention kernel's products added (FlopCounterMode counts that kernel as zero); the planner's fake
  count must be equal (same ops, same shapes: attention traced on the CPU path in both).
- The traced count against the family's closed form (SonarLLM.flops_per_batch) for our path and the public
  one, with and without activation checkpointing (its recompute counted apart).
"""
import contextlib

import pytest
import torch
from torch import nn

from sonar_train import plan
from sonar_train import plan_inference as pi
from sonar_train.config import load_config
from sonar_train.optim import build_optimizer
from sonar_train.parallel import DistInfo, parallelize

DECODER = "tiny"  # the embedded default's SONAR shapes: d=128, 2+2 layers, vocabulary 2206


def _cfg(tmp_path, family="sonar_llm", sentences=64):
    from sonar_llm.sonar.config import decoder_preset

    vocab = decoder_preset(DECODER).vocab_size
    data = plan.write_planning_shards(tmp_path / "shards", 4 * sentences, seed=1, embed_dim=128, vocab_size=vocab)
    cfg = load_config(None, [f"--model.family={family}", "--model.preset=tiny", "--train.precision=fp32",
                             f"--data.path={data}", f"--data.max_sentences={sentences}", "--data.max_tokens=4096",
                             "--optim.fused=false"], check_paths=False)
    return cfg, plan.one_batch(str(data), sentences, 4096)


def _real_model(cfg):
    from sonar_llm.models.build import ModelConfig, build_model
    from sonar_llm.models.family import get_family
    from sonar_llm.sonar.config import decoder_preset
    from sonar_llm.sonar.decoder import SonarTextDecoder

    torch.manual_seed(0)
    spec = get_family(cfg.model.family)
    deps = {"decoder": SonarTextDecoder(decoder_preset(DECODER))} if spec.needs_decoder else {}
    model = build_model(ModelConfig.from_sections(cfg.model, cfg.sonar, cfg.data), **deps)
    return parallelize(model, cfg, DistInfo()), spec


def _resident_bytes(model, batch) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    for value in vars(model).values():  # modules held outside the module tree (the frozen decoder)
        if isinstance(value, nn.Module):
            tensors += list(value.parameters()) + list(value.buffers())
    tensors += [batch.embeddings, batch.tokens, batch.tok_cu_seqlens, batch.doc_cu_seqlens]
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def _allocator_peak(prof) -> int:
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    running = peak = 0
    for e in events:
        running += e.nbytes()
        peak = max(peak, running)
    return peak


# FlopCounterMode counts the CPU fused attention kernel as zero; the reference gives it the closed form of its
# products: forward QK^T and AV (2 x 2 x B x H x Sq x Sk x Dh), backward the scores again + four products (2.5 x)
def _attention_fwd_flops(q, k, v, *args, out_shape=None, **kwargs):
    return 4 * q[0] * q[1] * q[2] * k[2] * q[3]


def _attention_bwd_flops(grad, q, k, v, *args, out_shape=None, **kwargs):
    return 10 * q[0] * q[1] * q[2] * k[2] * q[3]


def _real_step(cfg, batch, count_flops=False):
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    model, spec = _real_model(cfg)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    resident = _resident_bytes(model, batch)
    aten = torch.ops.aten
    cpu_attention = {aten._scaled_dot_product_flash_attention_for_cpu: _attention_fwd_flops,
                     aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_bwd_flops}
    counter = FlopCounterMode(display=False, custom_mapping=cpu_attention) if count_flops else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, counter:
        loss, _ = spec.loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() if count_flops else None
    return resident + _allocator_peak(prof), flops


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm"])
def test_planned_peak_memory_within_20_percent_of_a_real_cpu_step(tmp_path, family):
    cfg, batch = _cfg(tmp_path, family)
    planned = plan.trace_step(cfg, 1, batch, attention="traced", decoder_preset=DECODER, replay_kernels=False)
    measured, _ = _real_step(cfg, batch)
    ratio = planned["memory"]["peak_total"] / measured
    print(f"{family}: planned {planned['memory']['peak_total']} B, measured {measured} B, ratio {ratio:.3f}")
    assert 0.8 <= ratio <= 1.2, (planned["memory"], measured)


def test_planned_flops_equal_flop_counter_on_real_tensors(tmp_path):
    cfg, batch = _cfg(tmp_path)
    planned = plan.trace_step(cfg, 1, batch, attention="traced", decoder_preset=DECODER, replay_kernels=False)
    _, real_flops = _real_step(cfg, batch, count_flops=True)
    assert planned["flops"]["per_micro_batch"] == real_flops
    split = planned["flops"]
    assert split["concept_model"] + split["decoder_and_loss"] + split["vocab_projection"] == real_flops
    # the vocabulary projection of a frozen 2206 x 128 output matrix: two products per predicted token
    # (logits, d_hidden) = 2 x 2 x N x D x V with N = the tokens the loss predicts
    assert split["vocab_projection"] == 4 * planned["target_tokens"] * 128 * 2206
    assert split["concept_model"] > 0 and split["decoder_and_loss"] > 0


def test_sharded_state_per_rank_is_one_shard(tmp_path):
    """Under FSDP2 on 4 fake ranks each rank holds a quarter of the trainable parameters (up to dim-0 padding),
    and its fp32 gradients are exactly as large as its fp32 parameter shards."""
    cfg, batch = _cfg(tmp_path)
    planned = plan.trace_step(cfg, 4, batch, attention="traced", decoder_preset=DECODER, replay_kernels=False,
                              count_flops=False)
    mem = planned["memory"]
    total = 4 * planned["trainable_parameters"]  # fp32 bytes of every trainable parameter
    assert mem["gradients"] == mem["parameters"]
    assert total / 4 <= mem["parameters"] <= total / 4 * 1.1
    # AdamW: exp_avg + exp_avg_sq per shard, plus one 4-byte step counter per parameter tensor
    assert 2 * mem["parameters"] <= mem["optimizer_state"] <= 2 * mem["parameters"] + 4 * 64


# ------------------------------------------------------------------------------ inference cost vs context
# small decoding / diffusion settings keep the counts quick (the form is checked, not the settings)
INFER = dict(tokens_per_sentence=3, beam=2, settings={"num_inference_steps": 4})


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower", "token_llm"])
def test_inference_closed_form_matches_counted_flops(family):
    """The closed form fitted at (tiny preset, tiny SONAR, contexts 2 and 6) must give the counted FLOPs per
    generated sentence at context 9 exactly, and at another size (small preset, toy SONAR) within 1%."""
    model, spec, dec, enc = pi.build(family, "tiny", "tiny", 2206, fake=False)
    coeffs = pi.fit(model, spec, dec, enc, (2, 6), **INFER)
    counted = pi.count_sentence(model, spec, dec, enc, 9, **INFER)
    predicted = pi.closed_form(coeffs, pi.sizes_of(model, dec, enc), 9)
    for g in counted:
        assert predicted[g] == pytest.approx(counted[g]["total"], rel=1e-9, abs=1e-6), g
    assert counted["model"]["total"] > 0
    if spec.generate is not None:  # every concept model's sentence is decoded by the SONAR decoder
        assert counted["decoder"]["total"] > 0
    model2, spec2, dec2, enc2 = pi.build(family, "small", "toy", 96, fake=False)
    counted2 = pi.count_sentence(model2, spec2, dec2, enc2, 5, **INFER)
    predicted2 = pi.closed_form(coeffs, pi.sizes_of(model2, dec2, enc2), 5)
    for g in counted2:
        assert predicted2[g] == pytest.approx(counted2[g]["total"], rel=0.01, abs=1e-6), g


def test_inference_cost_grows_with_context_only_through_attention():
    """Counted at two contexts, a concept model's extra cost per context sentence is its attention over one more
    cached key: 4 x sum(heads x head_dim) FLOPs (QK^T and AV, one query per layer) for the KV-cached backbone."""
    model, spec, dec, enc = pi.build("base_lcm", "tiny", "tiny", 2206, fake=False)
    a = pi.count_sentence(model, spec, dec, enc, 3, **INFER)["model"]["total"]
    b = pi.count_sentence(model, spec, dec, enc, 7, **INFER)["model"]["total"]
    width = sum(m.num_heads * m.head_dim for m in model.modules()
                if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int))
    assert (b - a) / 4 == 4 * width


# ------------------------------------------------------------------------------ traced count vs the closed form
@pytest.mark.parametrize("path,checkpointing", [("fast", "none"), ("reference", "none"), ("fast", "full")])
def test_traced_flops_equal_the_family_closed_form(tmp_path, path, checkpointing):
    """The planner's traced FLOPs, less the activation-checkpointing recompute it counts apart, equal the family's
    closed form (SonarLLM.flops_per_batch, model FLOPs of the path it runs) within 0.5%: the closed form counts
    6 x parameters per sentence for the concept model, which the code does not exactly run (the input
    projection needs no input gradient, the output projection sees only the predicting rows). The public
    path (`reference`) is priced as it runs: its padding and full cross-attention on top of our fast path's
    closed form for the same batch."""
    cfg, batch = _cfg(tmp_path, sentences=48)
    cfg.train.activation_checkpointing = checkpointing
    traced = plan.trace_step(cfg, 1, batch, attention="flash", decoder_preset=DECODER, replay_kernels=False,
                             overrides={"path": path})
    f = traced["flops"]
    assert f["forward"] + f["backward"] + f["recompute"] == f["per_micro_batch"]
    assert (f["recompute"] > 0) == (checkpointing != "none")
    assert abs((f["per_micro_batch"] - f["recompute"]) / f["family_formula"] - 1) <= 5e-3
    if path == "reference":
        assert f["family_formula"] > 1.5 * f["family_formula_fast_path"]  # padding to the longest sentence
    else:
        assert f["family_formula_fast_path"] == f["family_formula"]


def test_cpu_attention_is_counted():
    """FlopCounterMode has no formula for the CPU fused attention kernel; the planner's counter gives it the
    GPU kernels' count: forward 4 x B x H x Sq x Sk x Dh (QK^T and AV over the whole square), backward 2.5 x."""
    from torch.utils.flop_counter import FlopCounterMode

    from sonar_train.plan_trace import PlanFlopCounter

    b, h, s, dh = 2, 3, 10, 8
    q = torch.randn(b, h, s, dh, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert plain.get_total_flops() == 0  # the gap this closes
    counter = PlanFlopCounter([], "model")
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert counter.phases["forward"] == 4 * b * h * s * s * dh
    assert counter.phases["backward"] == 10 * b * h * s * s * dh
