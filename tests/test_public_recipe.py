"""configs/public/sonar_llm_{100m,300m,600m,900m}.toml reproduce the public training recipe.

References are the public code's own values and the real libraries it used: SonarLLM_*.json's llama_config
blocks (copied below from Pabiya/SONAR-LLM), torch.optim.AdamW(model.parameters(), lr=5e-4, eps=1e-5), HF
transformers' get_cosine_schedule_with_warmup(820, 16480), and the public dataset class's document cut.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import sonar_train.main as train_main
from sonar_llm.models.presets import backbone_config
from sonar_train.config import load_config

REPO = Path(__file__).resolve().parents[1]
SIZES = {"100m": "100M", "300m": "300M", "600m": "600M", "900m": "900M"}
_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
         "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_COMMON = {"hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
           "use_cache": True, "pretraining_tp": 1, "tie_word_embeddings": True, "rope_theta": 500000.0,
           "rope_scaling": _ROPE, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False}
PUBLIC_JSON = {  # SonarLLM_{100M,300M,600M,900M}.json, llama_config
    "100M": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 16,
             "head_dim": 32, **_COMMON},
    "300M": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 10, "num_attention_heads": 16,
             "head_dim": 64, **_COMMON},
    "600M": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 16, "num_attention_heads": 26,
             "head_dim": 64, **_COMMON},
    "900M": {"hidden_size": 1536, "intermediate_size": 6144, "num_hidden_layers": 17, "num_attention_heads": 32,
             "head_dim": 64, **_COMMON},
}


@pytest.fixture(autouse=True)
def _sonar_decoder(tmp_path, monkeypatch):
    """A findable SONAR decoder: validation (and --dry-run) checks that a SONAR-LLM run could load one."""
    (tmp_path / "sonar_decoder.pt").write_bytes(b"placeholder")
    monkeypatch.setenv("SONAR_DECODER", str(tmp_path / "sonar_decoder.pt"))


def _config(size, tmp_path):
    return load_config(REPO / "configs" / "public" / f"sonar_llm_{size}.toml",
                       [f"--data.path={tmp_path}", f"--data.val_path={tmp_path}"])


@pytest.mark.parametrize("size", list(SIZES))
def test_config_validates_with_dry_run_and_holds_the_public_values(size, tmp_path, capsys):
    rc = train_main.main(["--config", str(REPO / "configs" / "public" / f"sonar_llm_{size}.toml"),
                          f"--data.path={tmp_path}", f"--data.val_path={tmp_path}", "--dry-run"])
    assert rc == 0 and f'preset = "{SIZES[size]}"' in capsys.readouterr().out
    cfg = _config(size, tmp_path)
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.eps, tuple(o.betas), o.weight_decay, o.decay_all_params) == (5e-4, 1e-5, (0.9, 0.999), 0.01, True)
    assert (o.warmup_steps, o.total_steps, o.min_lr_ratio, o.grad_clip) == (820, 16480, 0.0, 1.0)
    assert (t.steps, t.seed, t.eval_every) == (16480, 42, 200)
    assert cfg.model.family == "sonar_llm" and cfg.model.overrides == {"extra_eos_target": True}
    # the preset is the public JSON's architecture, numerics included (read against the JSON and transformers'
    # own Llama, never through the project's converter)
    _assert_is_public_llama(backbone_config(cfg.model.preset), PUBLIC_JSON[SIZES[size]])


# transformers' LlamaDecoderLayer parameter -> ours (the mapping is spelled here, independent of public_format)
_HF_TO_OURS = {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.k_proj",
               "self_attn.v_proj": "self_attn.v_proj", "self_attn.o_proj": "self_attn.output_proj",
               "mlp.gate_proj": "ffn.gate_proj", "mlp.up_proj": "ffn.inner_proj", "mlp.down_proj": "ffn.output_proj",
               "input_layernorm": "self_attn_layer_norm", "post_attention_layernorm": "ffn_layer_norm"}


def _assert_is_public_llama(bb, public: dict) -> None:
    """Our BackboneConfig against the public llama_config values, transformers' LlamaModel parameter shapes
    (built on the meta device) and transformers' llama3 RoPE frequencies."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from sonar_llm.models.backbone import Backbone

    heads = public["num_attention_heads"]
    assert (bb.model_dim, bb.ffn_dim, bb.num_layers, bb.num_heads, bb.head_dim) == (
        public["hidden_size"], public["intermediate_size"], public["num_hidden_layers"], heads, public["head_dim"])
    assert bb.num_kv_heads == public.get("num_key_value_heads", heads)  # HF's default: no grouped KV
    assert (bb.norm_eps, bb.rope_theta, bb.rope_scaling, bb.rope_scaling_factor) == (
        public["rms_norm_eps"], public["rope_theta"], public["rope_scaling"]["rope_type"],
        public["rope_scaling"]["factor"])
    assert not bb.rope_interleaved and not bb.ffn_bias
    assert bb.attn_bias == bb.output_proj_bias == public["attention_bias"]
    # transformers 5 refuses hidden_size % heads != 0 (600M: 1280 / 26) although head_dim is explicit, as the
    # public model (built with transformers 4) had it: set the head count after the constructor's check
    hf_cfg = transformers.LlamaConfig(**{**public, "num_attention_heads": 1, "num_key_value_heads": 1})
    hf_cfg.num_attention_heads = heads
    hf_cfg.num_key_value_heads = public.get("num_key_value_heads", heads)
    with torch.device("meta"):
        hf, ours = transformers.LlamaModel(hf_cfg), Backbone(bb)
    rope = Backbone(dataclasses.replace(bb, num_layers=1, model_dim=8, ffn_dim=8, num_heads=1,
                                         num_kv_heads=1)).rope  # real tensors
    hf_params = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    our_params = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    expected = {"layer_norm.weight": hf_params["norm.weight"]}
    for name, shape in hf_params.items():
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            module, kind = rest.rsplit(".", 1)
            expected[f"layers.{i}.{_HF_TO_OURS[module]}.{kind}"] = shape
    assert our_params == expected  # embed_tokens/lm_head are not part of SONAR-LLM's backbone
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS[public["rope_scaling"]["rope_type"]](hf_cfg, "cpu")
    torch.testing.assert_close(rope.inv_freq(torch.device("cpu"), torch.float64), hf_inv_freq.double(),
                               rtol=1e-6, atol=0)  # HF computes in float32


def test_overrides_build_a_sonar_llm_config(tmp_path):
    """`extra_eos_target` is a SonarLLMConfig field (the model builder names unknown override keys)."""
    from sonar_llm.models.build import ModelConfig, check_fields, split_overrides
    from sonar_llm.models.sonar_llm import SonarLLMConfig

    cfg = _config("100m", tmp_path)
    mc = ModelConfig.from_sections(cfg.model)
    bb, fam = split_overrides(mc.overrides)
    check_fields(SonarLLMConfig, fam, mc.family)
    assert SonarLLMConfig(backbone=backbone_config(mc.preset, **bb), **fam).extra_eos_target is True


def test_optimizer_equals_public_adamw(tmp_path):
    """build_optimizer with the recipe == torch.optim.AdamW(model.parameters(), lr=5e-4, eps=1e-5) (torch's
    default weight decay 0.01 on every parameter): same parameters after three steps on the same gradients."""
    from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig
    from sonar_train.optim import build_optimizer

    cfg = _config("100m", tmp_path)
    split_cfg = _config("100m", tmp_path).optim
    split_cfg.decay_all_params = False  # our default split, as a control: it must differ
    torch.manual_seed(0)
    models = [SonarLLM(SonarLLMConfig(backbone=backbone_config("tiny"), sonar_dim=16)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    ours, split, public = models
    opts = [build_optimizer(ours, cfg.optim, torch.device("cpu")),
            build_optimizer(split, split_cfg, torch.device("cpu")),
            torch.optim.AdamW(public.parameters(), lr=5e-4, eps=1e-5)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for params in zip(*(m.parameters() for m in models)):
            g = torch.randn(params[0].shape, generator=gen)
            for p in params:
                p.grad = g.clone()
        for opt in opts:
            opt.step()
    for (name, a), (_, b) in zip(ours.named_parameters(), public.named_parameters()):
        assert (a - b).abs().max().item() <= 1e-7, name
    norm = "backbone.layer_norm.weight"
    assert (dict(split.named_parameters())[norm] - dict(public.named_parameters())[norm]).abs().max() > 1e-7


def test_schedule_against_hf_cosine_with_warmup():
    """Our lr factor with the recipe vs HF get_cosine_schedule_with_warmup(820, 16480): equal from step 820
    on; during warm-up ours is HF's one step later (HF: s/820, first update at lr 0; ours: (s+1)/820)."""
    get_cosine_schedule_with_warmup = pytest.importorskip("transformers.optimization").get_cosine_schedule_with_warmup

    from sonar_train.optim import lr_factor

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=820, num_training_steps=16480)
    hf = [fn(s) for fn in sched.lr_lambdas for s in range(16481)]
    ours = [lr_factor(s, 820, 16480, 0.0) for s in range(16481)]
    assert max(abs(a - b) for a, b in zip(ours[820:], hf[820:])) <= 1e-12
    assert max(abs(ours[s] - hf[s + 1]) for s in range(820)) <= 1e-12
    assert hf[0] == 0.0 and ours[-1] == 0.0 and math.isclose(ours[820], 1.0)


def test_preprocess_cut_is_the_public_document_cut():
    """doc_overflow="cut", max_sentences_per_doc=33 == the public NextSentenceEmbeddingDataset (max_sentences
    32): the first 32 sentences, then the end sentence; kept when at least 2 entries."""
    from sonar_llm.data.preprocess import PreprocessConfig, _chunk_document

    def public(sents, max_sentences=32):  # transcribed from train_sonarllm_fast.py
        out = sents[:max_sentences]
        out.append("End of sequence.")
        return [out] if len(out) >= 2 else []

    cfg = PreprocessConfig(max_sentences_per_doc=33, doc_overflow="cut", min_doc_sentences=2)
    for n in (1, 2, 31, 32, 33, 34, 80):
        sents = [f"s{i}." for i in range(n)]
        assert _chunk_document(list(sents), "End of sequence.", cfg) == public(list(sents)), n
