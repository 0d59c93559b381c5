"""Tests for sonar_llm.models.base_lcm.BaseLCM: LCM state-dict names, the loss against a closed-form
per-document computation (mean and the LCM's sum reduction), gradients, and training progress."""
import pytest
import torch

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.models.backbone import BackboneConfig
from sonar_llm.models.base_lcm import BaseLCM, BaseLCMConfig
from sonar_llm.models.family import build_family
from sonar_llm.models.presets import backbone_config

E = 16


def make_batch(doc_lens, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    num = sum(doc_lens)
    cu = [0]
    for n in doc_lens:
        cu.append(cu[-1] + n)
    return ConceptBatch(
        embeddings=torch.randn(num, E, generator=g, dtype=dtype) * 0.01 + 0.003,
        doc_cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        tokens=torch.full((2 * num,), 3, dtype=torch.int64),
        tok_cu_seqlens=torch.arange(0, 2 * num + 1, 2, dtype=torch.int32),
        max_doc_len=max(doc_lens),
        max_sent_len=2,
    ).validate()


def make_model(reduction="mean", seed=1, dtype=torch.float64):
    torch.manual_seed(seed)
    cfg = BaseLCMConfig(backbone_config("tiny", numerics="lcm", dropout_p=0.0, model_dim=32, ffn_dim=48),
                        sonar_dim=E, reduction=reduction)
    model = BaseLCM(cfg).to(dtype)
    fit_data = torch.randn(200, E, dtype=torch.float64) * 0.01 + 0.003
    model.normalizer.fit(fit_data, quantile_quirk=False)  # the true-IQR option (200 samples: no 0.25% tail)
    return model


def test_lcm_state_dict_names():
    model = BaseLCM(BaseLCMConfig(backbone_config("tiny", numerics="lcm", num_layers=1), sonar_dim=E))
    keys = set(model.state_dict())
    assert {"frontend.pre_linear.weight", "frontend.pre_linear.bias", "frontend.sonar_normalizer.center",
            "frontend.sonar_normalizer.scale", "postnet.fc.weight", "postnet.fc.bias",
            "lcm.layer_norm.weight", "lcm.layers.0.self_attn.q_proj.bias",
            "lcm.layers.0.ffn.gate_proj.weight", "lcm.layers.0.self_attn.output_proj.bias"} <= keys
    assert all(k.startswith(("frontend.", "lcm.", "postnet.")) for k in keys)
    assert model.transformer_blocks() == list(model.lcm.layers)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_matches_closed_form(reduction):
    batch = make_batch([3, 1, 4])
    model = make_model(reduction)
    loss, metrics = model.loss(batch)
    # Independent: per document, padded forward; normalise by hand; sum of squares per target.
    center, scale = model.normalizer.center.double(), model.normalizer.scale.double()
    total, count = 0.0, 0
    cu = batch.doc_cu_seqlens.tolist()
    for d in range(len(cu) - 1):
        x = (batch.embeddings[cu[d] : cu[d + 1]] - center) / scale
        h = model.lcm.forward_padded(model.frontend.pre_linear(x)[None])[0]
        pred = model.postnet.fc(h)
        for k in range(1, cu[d + 1] - cu[d]):
            total = total + ((pred[k - 1] - x[k]) ** 2).sum()
            count += 1
    want = total / count if reduction == "mean" else total
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=0)
    assert metrics["target_sentences"] == count == 5
    # Gradients agree too.
    g1 = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    g2 = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_predict_embedding_denormalizes():
    model = make_model()
    h = torch.randn(3, 32, dtype=torch.float64)
    raw = model.predict_embedding(h)
    torch.testing.assert_close(model.normalizer.normalize(raw), model.predict_normalized(h), rtol=1e-10, atol=1e-10)


def test_training_lowers_loss():
    model = make_model(dtype=torch.float32)
    batch = make_batch([5, 4], dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(20):
        loss, _ = model.loss(batch)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_config_errors_and_registry():
    with pytest.raises(ValueError, match="reduction"):
        BaseLCMConfig(BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=32), reduction="none")
    model = build_family("base_lcm", BackboneConfig(model_dim=32, num_layers=1, num_heads=4, ffn_dim=32))
    assert isinstance(model, BaseLCM) and model.cfg.sonar_dim == 1024
    assert model.flops_per_batch(make_batch([2])) > 0
