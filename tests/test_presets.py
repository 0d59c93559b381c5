"""Tests for sonar_llm.models.presets: real (meta-device) parameter counts against the closed form,
the public shapes, the LCM 1.6B count and the public naming convention, and the CLI."""
import pytest

from sonar_llm.models.presets import (
    PRESETS,
    backbone_config,
    count_parameters,
    count_parameters_closed_form,
    main,
    public_name_count,
)


@pytest.mark.parametrize("name", list(PRESETS))
def test_count_matches_closed_form(name):
    cfg = backbone_config(name)
    for with_io in (False, True):
        assert count_parameters(name, with_io=with_io) == count_parameters_closed_form(cfg, with_io=with_io)


def test_public_shapes_and_names():
    cfg = backbone_config("900M")
    assert (cfg.model_dim, cfg.ffn_dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (1536, 6144, 17, 32, 64)
    assert cfg.rope_scaling == "llama3" and cfg.rope_theta == 5e5 and not cfg.attn_bias
    # The public names count a tied 128,256-token embedding: they land within 3% of the name.
    for name, target in [("39M", 39e6), ("100M", 100e6), ("300M", 300e6), ("600M", 600e6),
                         ("900M", 900e6), ("1.3B", 1.3e9)]:
        assert abs(public_name_count(name) / target - 1) < 0.03, name
    # The concept model itself is much smaller than its name at small sizes.
    assert count_parameters("100M", with_io=True) < 0.4 * public_name_count("100M")


def test_lcm_1_6b_count_matches_shape_count():
    # Base-LCM 1.6B: pre_linear + 32 layers + final norm + postnet, counted from the LCM's shapes.
    assert count_parameters("lcm_1.6B", with_io=True) == 1_649_185_792
    cfg = backbone_config("lcm_1.6B")
    assert cfg.rope_interleaved and cfg.attn_bias and cfg.ffn_bias and cfg.head_dim == 128


def test_overrides_and_errors():
    cfg = backbone_config("tiny", numerics="lcm", dropout_p=0.0, num_kv_heads=2)
    assert cfg.rope_interleaved and cfg.num_kv_heads == 2 and cfg.dropout_p == 0.0
    with pytest.raises(ValueError, match="unknown preset"):
        backbone_config("7B")
    with pytest.raises(ValueError, match="numerics"):
        backbone_config("tiny", numerics="gpt2")


def test_cli_prints_every_preset(capsys):
    main([])
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "1649.19M" in out
