"""The library's model building: ModelConfig -> family (registry specs), trained weights -> family, and the
knobs a `[model.overrides]` table or the run's activation-checkpointing mode must reach."""
import json

import pytest
import torch

from fixtures_sonar import toy_decoder
from sonar_llm.activation_checkpointing import checkpointed_indices
from sonar_llm.checkpoints import read_exported
from sonar_llm.models.build import ModelConfig, build_model, build_trained
from sonar_llm.models.family import FAMILIES, ConceptFamily, FamilySpec, get_family
from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint


@pytest.fixture(scope="module")
def decoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("dec") / "decoder.pt"
    save_fairseq2_checkpoint(toy_decoder(), path)
    return path


def _cfg(family, decoder_file, **overrides):
    spec = get_family(family)
    shape = {"sonar_dim": 32} if spec.concept_level else {"vocab_size": 97}
    return ModelConfig(family=family, preset="tiny", overrides={**shape, **overrides}, sonar_decoder=str(decoder_file))


def test_every_registered_family_has_a_spec_and_builds(decoder_file):
    for name in FAMILIES:
        spec = get_family(name)
        assert isinstance(spec, FamilySpec) and spec.title and spec.loss_name
        model = build_model(_cfg(name, decoder_file))
        assert isinstance(model, spec.model_cls) and isinstance(model, ConceptFamily)
        assert len(model.transformer_blocks()) >= 2  # the tiny preset's 2 layers (Two-Tower: 1 + 1)
    with pytest.raises(ValueError, match="model.family: unknown model family 'gpt'"):
        build_model(ModelConfig(family="gpt"))
    with pytest.raises(ValueError, match="model.preset"):
        build_model(ModelConfig(family="base_lcm", preset="huge"))


def test_sonar_llm_decoder_overrides_reach_the_packed_decoder(decoder_file):
    model = build_model(_cfg("sonar_llm", decoder_file, decoder_attn_impl="sdpa", decoder_fuse_qkv=False,
                             decoder_impl="torch"))
    packed = model.packed_decoder
    assert (packed.attn_impl, packed.fuse_qkv, packed.impl) == ("sdpa", False, "torch")
    assert not hasattr(packed, "qkv_weight_0")  # no fused copy kept
    default = build_model(_cfg("sonar_llm", decoder_file)).packed_decoder
    assert (default.attn_impl, default.fuse_qkv) == ("auto", True) and hasattr(default, "qkv_weight_0")


@pytest.mark.parametrize("mode, want", [("none", set()), ("selective", {0}), ("full", {0, 1})])
def test_the_one_checkpointing_knob_reaches_blocks_and_the_frozen_decoder(decoder_file, mode, want):
    model = build_model(_cfg("sonar_llm", decoder_file))
    model.apply_activation_checkpointing(mode)
    assert checkpointed_indices(model.transformer_blocks()) == want
    assert model.packed_decoder.activation_checkpointing == mode
    with pytest.raises(ValueError, match="activation_checkpointing"):
        model.apply_activation_checkpointing("most")


def test_the_run_knob_reaches_the_decoder_through_parallelize(decoder_file):
    from sonar_train.config import RunConfig
    from sonar_train.parallel import DistInfo, parallelize

    cfg = RunConfig()
    cfg.train.activation_checkpointing, cfg.train.precision = "full", "fp32"
    model = parallelize(build_model(_cfg("sonar_llm", decoder_file)), cfg, DistInfo())
    assert model.packed_decoder.activation_checkpointing == "full"
    assert checkpointed_indices(model.transformer_blocks()) == {0, 1}


@pytest.mark.parametrize("family", ["base_lcm", "two_tower", "token_llm"])
def test_build_trained_reads_width_and_vocabulary_from_the_weights(decoder_file, tmp_path, family):
    """An export whose run config lacks sonar_dim / vocab_size (training read them from its data) rebuilds
    the same model: the family's `trained_overrides` take them from the state dict."""
    from safetensors.torch import save_file

    torch.manual_seed(3)
    model = build_model(_cfg(family, decoder_file))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    run = {"model": {"family": family, "preset": "tiny", "overrides": {}}, "data": {"path": "/nowhere"}}
    path.with_suffix(".json").write_text(json.dumps({"run_config": run, "step": 7}))
    weights = read_exported(path)
    again = build_trained(weights)
    assert weights.step == 7 and not again.training
    for (k, a), (k2, b) in zip(sorted(model.state_dict().items()), sorted(again.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    with pytest.raises(ValueError, match="does not match the trained family"):
        build_trained(weights, family="sonar_llm")
