"""Tests of the benchmark suite's shared helpers (bench/common.py) and the pieces of the model-level
benchmarks that compute something (matched Two-Tower shape, encoder batching)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import common  # noqa: E402
from common import (  # noqa: E402
    IdTextCodec,
    PeakMemory,
    SonarShape,
    bench_scale,
    mfu,
    pad_batch,
    random_sonar_decoder,
    random_sonar_encoder,
    record_throughput,
    sonar_encoder_flops,
    synthetic_concept_batch,
    synthetic_prompts,
    synthetic_source_sentences,
    tensor_bytes,
)

SHAPE = SonarShape(model_dim=32, num_layers=2, num_heads=4, ffn_dim=64, vocab_size=300)


def test_bench_scale_selection(monkeypatch):
    monkeypatch.delenv("SONAR_BENCH_SCALE", raising=False)
    assert bench_scale(True, torch.device("cpu")).name == "quick"
    assert bench_scale(False, torch.device("cpu")).name == "cpu"
    assert bench_scale(False, torch.device("cuda")).name == "gpu"
    gpu = common.SCALES["gpu"]
    assert (gpu.sonar.model_dim, gpu.sonar.num_layers, gpu.sonar.vocab_size) == (1024, 24, 256_206)
    assert gpu.backbone == "600M"
    monkeypatch.setenv("SONAR_BENCH_SCALE", "quick")
    assert bench_scale(False, torch.device("cuda")).name == "quick"
    monkeypatch.setenv("SONAR_BENCH_SCALE", "huge")
    with pytest.raises(ValueError, match="SONAR_BENCH_SCALE"):
        bench_scale(False, torch.device("cpu"))


def test_shape_from_env(monkeypatch):
    monkeypatch.delenv("SONAR_BENCH_X_SHAPE", raising=False)
    assert common.shape_from_env("SONAR_BENCH_X_SHAPE", "N,V,D") is None
    monkeypatch.setenv("SONAR_BENCH_X_SHAPE", "4096,8192,256")
    assert common.shape_from_env("SONAR_BENCH_X_SHAPE", "N,V,D") == (4096, 8192, 256)
    for bad in ("4096,8192", "4096,8192,256,1", "a,b,c"):
        monkeypatch.setenv("SONAR_BENCH_X_SHAPE", bad)
        with pytest.raises(ValueError, match="SONAR_BENCH_X_SHAPE must be 'N,V,D' integers"):
            common.shape_from_env("SONAR_BENCH_X_SHAPE", "N,V,D")


def test_synthetic_concept_batch_layout():
    batch = synthetic_concept_batch(SHAPE, num_docs=3, sents_per_doc=5, words=(2, 6), emb_dim=16, seed=4)
    batch.validate()
    assert batch.num_docs == 3 and batch.num_sentences == 15 and batch.embeddings.shape == (15, 16)
    assert batch.doc_cu_seqlens.tolist() == [0, 5, 10, 15]
    cu = batch.tok_cu_seqlens.tolist()
    for s in range(15):
        sent = batch.tokens[cu[s]:cu[s + 1]].tolist()
        assert 5 <= len(sent) <= 9  # 2..6 words + [3, lang] + 3
        assert sent[0] == 3 and sent[1] == SHAPE.lang_id and sent[-1] == 3
        assert all(4 <= w < SHAPE.lang_offset for w in sent[2:-1])
    again = synthetic_concept_batch(SHAPE, 3, 5, (2, 6), emb_dim=16, seed=4)
    assert torch.equal(again.tokens, batch.tokens) and torch.equal(again.embeddings, batch.embeddings)
    with pytest.raises(ValueError, match="sents_per_doc"):
        synthetic_concept_batch(SHAPE, 2, 1, (2, 6))
    with pytest.raises(ValueError, match="words"):
        synthetic_concept_batch(SHAPE, 2, 3, (5, 2))


def test_source_sentences_prompts_and_padding():
    seqs = synthetic_source_sentences(SHAPE, 20, (3, 7), seed=1)
    assert len(seqs) == 20
    assert all(s[0] == SHAPE.lang_id and s[-1] == 3 and 5 <= len(s) <= 9 for s in seqs)
    tokens, mask = pad_batch(seqs[:4])
    width = max(len(s) for s in seqs[:4])
    assert tokens.shape == mask.shape == (4, width)
    for i, s in enumerate(seqs[:4]):
        assert tokens[i, :len(s)].tolist() == s and mask[i].sum().item() == len(s)
        assert (tokens[i, len(s):] == 0).all()
    prompts = synthetic_prompts(3, 2, 16, seed=0)
    assert len(prompts) == 3 and all(p.shape == (2, 16) for p in prompts)
    with pytest.raises(ValueError, match="at least one"):
        pad_batch([])


def test_random_models_are_frozen_and_layer_norms_untouched():
    dec = random_sonar_decoder(SHAPE, seed=0)
    enc = random_sonar_encoder(SHAPE, seed=1)
    for model in (dec, enc):
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
            else:
                assert 0.01 < p.std().item() < 0.03, name  # N(0, 0.02)
    assert dec.final_proj.weight is dec.decoder_frontend.embed.weight
    with pytest.raises(TypeError, match="SonarShape"):
        random_sonar_decoder((32, 2, 4, 64, 300))


def test_id_text_codec_round_trip_and_fixed_length():
    torch.manual_seed(0)
    dec = random_sonar_decoder(SHAPE, dtype=torch.float64, seed=2)
    enc = random_sonar_encoder(SHAPE, dtype=torch.float64, seed=3)
    assert IdTextCodec.text_to_ids(IdTextCodec.ids_to_text([5, 17, 299])) == [5, 17, 299]
    with pytest.raises(ValueError, match="space-separated"):
        IdTextCodec.text_to_ids("5 x")
    emb = torch.randn(3, SHAPE.model_dim, dtype=torch.float64)
    for beam in (1, 5):
        codec = IdTextCodec(dec, enc, SHAPE.lang_id, beam_size=beam, max_gen_len=7)
        cached_ids = codec.decode_ids(emb, use_cache=True)
        assert [len(x) for x in cached_ids] == [6, 6, 6]  # 7 decoded tokens, the forced final EOS removed
        assert all(3 not in ids for ids in cached_ids)
        assert codec.decode_ids(emb, use_cache=False) == cached_ids  # the no-cache reference decodes the same
    texts = codec.decode_fn(emb)
    assert [IdTextCodec.text_to_ids(t) for t in texts] == cached_ids
    # batched, padded re-encoding equals encoding every sentence alone (padding invariance)
    texts = ["5 6 7", "8 9 10 11 12 13", "14"]
    got = codec.encode_fn(texts)
    for i, t in enumerate(texts):
        ids = torch.tensor([[SHAPE.lang_id] + IdTextCodec.text_to_ids(t) + [3]])
        want = enc(ids, torch.ones_like(ids, dtype=torch.bool)).float()
        torch.testing.assert_close(got[i:i + 1], want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs an encoder"):
        IdTextCodec(dec, None, SHAPE.lang_id).encode_fn(["5"])


def test_sonar_encoder_flops_matches_flop_counter():
    enc = random_sonar_encoder(SHAPE)
    for length in (5, 11):
        tokens = torch.randint(4, SHAPE.lang_offset, (2, length))
        # the math SDPA backend runs attention as matmuls, which the counter sees
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
            enc(tokens, None)
        assert sonar_encoder_flops(enc.cfg, [length, length]) == pytest.approx(counter.get_total_flops(), rel=1e-9)
    # closed form: 2 sentences of 3 tokens, one padded to 5
    d, f, layers = 32, 64, 2
    useful = 2 * layers * (4 * d * d + 2 * d * f) * 6 + 4 * layers * d * (9 + 9)
    padded = 2 * layers * (4 * d * d + 2 * d * f) * 8 + 4 * layers * d * (9 + 25)
    assert sonar_encoder_flops(enc.cfg, [3, 3]) == useful
    assert sonar_encoder_flops(enc.cfg, [3, 3], padded_to=[3, 5]) == padded
    with pytest.raises(ValueError, match="padded_to"):
        sonar_encoder_flops(enc.cfg, [3, 3], padded_to=[3])


def test_mfu_and_record_throughput():
    assert mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    assert mfu(1.0, None, 1e12) is None and mfu(1.0, 1.0, None) is None
    with pytest.raises(ValueError, match="flops"):
        mfu(-1.0, 1.0, 1.0)
    bench = SimpleNamespace(extra_info={}, stats=SimpleNamespace(stats=SimpleNamespace(mean=0.25)))
    record_throughput(bench, flops=1e12, peak=1e13, sentences=100, target_tokens=None)
    info = bench.extra_info
    assert info["sentences"] == 100 and info["sentences_per_s"] == pytest.approx(400.0)
    assert info["target_tokens"] is None and info["target_tokens_per_s"] is None
    assert info["mfu"] == pytest.approx(1e12 / 0.25 / 1e13) and info["flops_per_call"] == 1e12
    disabled = SimpleNamespace(extra_info={}, stats=None)  # --benchmark-disable: no timing
    record_throughput(disabled, flops=1.0, peak=None, sentences=3)
    assert disabled.extra_info["sentences_per_s"] is None and disabled.extra_info["mfu"] is None


def test_tensor_bytes_and_peak_memory_on_cpu():
    lin = torch.nn.Linear(8, 4)  # 32 + 4 fp32 values
    emb = torch.nn.Embedding(10, 8)
    assert tensor_bytes(lin) == 36 * 4
    opt = torch.optim.AdamW(lin.parameters())
    lin(torch.randn(2, 8)).sum().backward()
    opt.step()
    # parameters + gradients + exp_avg + exp_avg_sq (+ scalar step counters, 4 bytes each)
    assert tensor_bytes(lin, opt) == 4 * 36 * 4 + sum(s["step"].nbytes for s in opt.state.values())
    tied = torch.nn.Linear(8, 10, bias=False)
    tied.weight = emb.weight
    assert tensor_bytes(emb, tied) == 80 * 4  # shared storage counted once
    with pytest.raises(TypeError, match="tensor_bytes"):
        tensor_bytes("weights")
    with PeakMemory(torch.device("cpu")) as mem:
        big = torch.ones(64, 1024, 1024)  # 256 MiB, touched
        del big
    info = mem.info(state_bytes=123)
    assert info["state_bytes"] == 123 and info["cpu_maxrss_growth_bytes"] >= 0
    assert "peak_mem_bytes" not in info


def test_matched_two_tower_and_encoder_batches():
    from test_bench_encoder import make_batches

    from sonar_llm.models.build import ModelConfig, build_model

    def two_tower_config(preset: str, sonar_dim: int):  # the benchmark's Two-Tower: built by the registry
        with torch.device("meta"):
            return build_model(ModelConfig("two_tower", preset, {"sonar_dim": sonar_dim})).cfg

    tt = two_tower_config("600M", 1024)
    assert (tt.context_layers, tt.denoiser_layers, tt.model_dim, tt.num_heads, tt.ffn_dim) == (4, 12, 1280, 20, 5120)
    tiny = two_tower_config("tiny", 64)
    assert (tiny.context_layers, tiny.denoiser_layers, tiny.num_heads) == (1, 1, 4)
    seqs = [[0] * n for n in (5, 2, 9, 3, 7, 2, 8)]
    for sort in (False, True):
        batches = make_batches(seqs, 3, sort_by_length=sort)
        assert sorted(i for b in batches for i in b) == list(range(7)) and [len(b) for b in batches] == [3, 3, 1]
    padded = {s: sum(len(b) * max(len(seqs[i]) for i in b) for b in make_batches(seqs, 3, s)) for s in (False, True)}
    assert padded[True] < padded[False]
    with pytest.raises(ValueError, match="batch_size"):
        make_batches(seqs, 0, True)


def test_issue_targets_from_a_result():
    def bench(group, role, **info):
        return {"group": group, "extra_info": {"role": role, "scale": "gpu", **info}}

    result = {"machine_info_sonar": {"gpu": "NVIDIA H200"}, "benchmarks": [
        bench("training-sonar-llm", "ours", sentences_per_s=3000.0, mfu=0.5),
        bench("training-sonar-llm", "reference", sentences_per_s=1200.0, mfu=0.2),
        bench("generation-sonar-llm", "ours", sentences_per_s=90.0),
        bench("generation-sonar-llm", "reference", sentences_per_s=10.0),
        bench("generation-families", "ours", sentences_per_s=90.0),
        bench("generation-families", "reference", sentences_per_s=30.0),
        bench("sonar-encoder", "ours", sentences_per_s=None),  # timing disabled
    ]}
    rows = {r["target"]: r for r in common.issue_targets(result)}
    got = [(r["value"], r["met"]) for r in rows.values()]
    assert got == [(2.5, False), (0.5, True), (9.0, False), (3.0, False), (None, None)]
    table = common.format_targets(list(rows.values()), "NVIDIA H200")
    assert "NVIDIA H200" in table and table.count("| NO |") == 3 and table.count("| yes |") == 1
    assert common.main(["targets", "/nonexistent/result.json"]) == 2
