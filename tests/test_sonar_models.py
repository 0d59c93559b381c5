"""SONAR encoder/decoder modules vs independent float64 references, key names, tying, configs."""
from __future__ import annotations

import math

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_encoder
from sonar_llm.sonar import (
    SonarDecoderConfig,
    SonarEncoderConfig,
    SonarTextDecoder,
    SonarTextEncoder,
    decoder_preset,
    encoder_preset,
    sinusoid_table,
)

# ----------------------------------------------------------------------------- independent references


def ref_positions(num_rows: int, dim: int, start: int = 2) -> torch.Tensor:
    half = dim // 2
    steps = torch.arange(start, start + num_rows, dtype=torch.float64)[:, None]
    freq = torch.tensor([math.exp(-i * math.log(10000.0) / (half - 1)) for i in range(half)], dtype=torch.float64)
    return torch.cat([torch.sin(steps * freq), torch.cos(steps * freq)], dim=1)


def ref_ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def ref_attn(x, kv, p, prefix, heads, allowed):
    """allowed: [B, S, T] bool."""
    q = x @ p[f"{prefix}.q_proj.weight"].T + p[f"{prefix}.q_proj.bias"]
    k = kv @ p[f"{prefix}.k_proj.weight"].T + p[f"{prefix}.k_proj.bias"]
    v = kv @ p[f"{prefix}.v_proj.weight"].T + p[f"{prefix}.v_proj.bias"]
    b, s, d = q.shape
    t = k.shape[1]
    dh = d // heads
    q = q.reshape(b, s, heads, dh).permute(0, 2, 1, 3)
    k = k.reshape(b, t, heads, dh).permute(0, 2, 1, 3)
    v = v.reshape(b, t, heads, dh).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    out = out.permute(0, 2, 1, 3).reshape(b, s, d)
    return out @ p[f"{prefix}.output_proj.weight"].T + p[f"{prefix}.output_proj.bias"]


def ref_ffn(x, p, prefix):
    h = torch.relu(x @ p[f"{prefix}.inner_proj.weight"].T + p[f"{prefix}.inner_proj.bias"])
    return h @ p[f"{prefix}.output_proj.weight"].T + p[f"{prefix}.output_proj.bias"]


def ref_encoder(p, cfg, tokens, mask):
    d = cfg.model_dim
    x = p["encoder_frontend.embed.weight"][tokens] * math.sqrt(d) + ref_positions(tokens.shape[1], d)
    allowed = mask[:, None, :].expand(-1, tokens.shape[1], -1)
    for i in range(cfg.num_layers):
        pre = f"encoder.layers.{i}"
        h = ref_ln(x, p[f"{pre}.self_attn_layer_norm.weight"], p[f"{pre}.self_attn_layer_norm.bias"])
        x = x + ref_attn(h, h, p, f"{pre}.self_attn", cfg.num_heads, allowed)
        h = ref_ln(x, p[f"{pre}.ffn_layer_norm.weight"], p[f"{pre}.ffn_layer_norm.bias"])
        x = x + ref_ffn(h, p, f"{pre}.ffn")
    x = ref_ln(x, p["layer_norm.weight"], p["layer_norm.bias"])
    m = mask.double()[..., None]
    return (x * m).sum(1) / (m.sum(1) + 1e-7)


def ref_decoder_logits(p, cfg, tokens, emb):
    d = cfg.model_dim
    b, s = tokens.shape
    x = p["decoder_frontend.embed.weight"][tokens] * math.sqrt(d) + ref_positions(s, d)
    causal = torch.tril(torch.ones(s, s, dtype=torch.bool))[None].expand(b, -1, -1)
    one_key = torch.ones(b, s, 1, dtype=torch.bool)
    enc = emb[:, None, :]
    for i in range(cfg.num_layers):
        pre = f"decoder.layers.{i}"
        h = ref_ln(x, p[f"{pre}.self_attn_layer_norm.weight"], p[f"{pre}.self_attn_layer_norm.bias"])
        x = x + ref_attn(h, h, p, f"{pre}.self_attn", cfg.num_heads, causal)
        h = ref_ln(x, p[f"{pre}.encoder_decoder_attn_layer_norm.weight"],
                   p[f"{pre}.encoder_decoder_attn_layer_norm.bias"])
        x = x + ref_attn(h, enc, p, f"{pre}.encoder_decoder_attn", cfg.num_heads, one_key)
        h = ref_ln(x, p[f"{pre}.ffn_layer_norm.weight"], p[f"{pre}.ffn_layer_norm.bias"])
        x = x + ref_ffn(h, p, f"{pre}.ffn")
    x = ref_ln(x, p["decoder.layer_norm.weight"], p["decoder.layer_norm.bias"])
    return x @ p["decoder_frontend.embed.weight"].T


def params64(model):
    return {k: v.detach().double().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- key names / shapes


def expected_encoder_shapes(layers=24, d=1024, f=8192, v=256206):
    shapes = {"encoder_frontend.embed.weight": (v, d), "layer_norm.weight": (d,), "layer_norm.bias": (d,)}
    for n in range(layers):
        pre = f"encoder.layers.{n}"
        for ln in ("self_attn_layer_norm", "ffn_layer_norm"):
            shapes[f"{pre}.{ln}.weight"] = (d,)
            shapes[f"{pre}.{ln}.bias"] = (d,)
        for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
            shapes[f"{pre}.self_attn.{proj}.weight"] = (d, d)
            shapes[f"{pre}.self_attn.{proj}.bias"] = (d,)
        shapes[f"{pre}.ffn.inner_proj.weight"] = (f, d)
        shapes[f"{pre}.ffn.inner_proj.bias"] = (f,)
        shapes[f"{pre}.ffn.output_proj.weight"] = (d, f)
        shapes[f"{pre}.ffn.output_proj.bias"] = (d,)
    return shapes


def expected_decoder_shapes(layers=24, d=1024, f=8192, v=256206):
    shapes = {"decoder_frontend.embed.weight": (v, d), "final_proj.weight": (v, d),
              "decoder.layer_norm.weight": (d,), "decoder.layer_norm.bias": (d,)}
    for n in range(layers):
        pre = f"decoder.layers.{n}"
        for ln in ("self_attn_layer_norm", "encoder_decoder_attn_layer_norm", "ffn_layer_norm"):
            shapes[f"{pre}.{ln}.weight"] = (d,)
            shapes[f"{pre}.{ln}.bias"] = (d,)
        for attn in ("self_attn", "encoder_decoder_attn"):
            for proj in ("q_proj", "k_proj", "v_proj", "output_proj"):
                shapes[f"{pre}.{attn}.{proj}.weight"] = (d, d)
                shapes[f"{pre}.{attn}.{proj}.bias"] = (d,)
        shapes[f"{pre}.ffn.inner_proj.weight"] = (f, d)
        shapes[f"{pre}.ffn.inner_proj.bias"] = (f,)
        shapes[f"{pre}.ffn.output_proj.weight"] = (d, f)
        shapes[f"{pre}.ffn.output_proj.bias"] = (d,)
    return shapes


def test_basic_encoder_keys_and_shapes_on_meta():
    with torch.device("meta"):
        enc = SonarTextEncoder(encoder_preset("basic"))
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected_encoder_shapes()
    assert sum(p.numel() for p in enc.parameters()) == 766_091_264  # reference parameter count
    assert enc.encoder_frontend.pos_encoder.freqs.shape == (514, 1024)


def test_basic_decoder_keys_and_shapes_on_meta():
    with torch.device("meta"):
        dec = SonarTextDecoder(decoder_preset("basic"))
    got = {k: tuple(v.shape) for k, v in dec.state_dict().items()}
    assert got == expected_decoder_shapes()
    assert sum(p.numel() for p in dec.parameters()) == 866_902_016  # tied: embedding counted once
    assert dec.decoder_frontend.pos_encoder.freqs.shape == (512, 1024)
    assert dec.final_proj.bias is None


# ----------------------------------------------------------------------------- positions


def test_sinusoid_table_matches_closed_form():
    table = sinusoid_table(514, 1024, 2)
    ref = ref_positions(514, 1024, 2)
    # fp32 angle rounding at step 515 is about 515 * 6e-8 = 3e-5
    torch.testing.assert_close(table.double(), ref, atol=1e-4, rtol=0)
    # row 0 is step 2: sin(2) in column 0, cos(2) in column 512; the last frequency is 1e-4
    assert abs(float(table[0, 0]) - math.sin(2.0)) < 1e-6
    assert abs(float(table[0, 512]) - math.cos(2.0)) < 1e-6
    assert abs(float(table[10, 511]) - math.sin(12 * 1e-4)) < 1e-7


def test_positions_survive_low_precision_cast():
    dec = toy_decoder(seed=1).to(torch.bfloat16)
    tokens = torch.randint(4, 96, (1, 5))
    dec(tokens, torch.randn(1, 32, dtype=torch.bfloat16))
    assert dec.decoder_frontend.pos_encoder.freqs.dtype == torch.float32


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("seed", [0, 1])
def test_encoder_matches_float64_reference(seed):
    enc = toy_encoder(seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(100 + seed)
    tokens = torch.randint(4, enc.cfg.vocab_size, (3, 9), generator=g)
    lengths = torch.tensor([9, 5, 2])
    mask = torch.arange(9)[None] < lengths[:, None]
    tokens = tokens.masked_fill(~mask, 0)
    got = enc(tokens, mask)
    ref = ref_encoder(params64(enc), enc.cfg, tokens, mask)
    assert got.shape == (3, 32)
    # the sinusoid table is fp32 by design (as in fairseq2), hence 1e-6 and not 1e-12
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    # fp32 model vs the float64 reference
    enc32 = toy_encoder(seed=seed)
    torch.testing.assert_close(enc32(tokens, mask).double(), ref, atol=2e-5, rtol=2e-5)


def test_encoder_padding_does_not_change_embedding():
    enc = toy_encoder(seed=3, dtype=torch.float64)
    tokens = torch.randint(4, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    alone = enc(tokens)
    padded = torch.cat([tokens, torch.zeros(1, 4, dtype=torch.int64)], dim=1)
    mask = torch.arange(10)[None] < 6
    torch.testing.assert_close(enc(padded, mask), alone, atol=1e-12, rtol=1e-12)


def test_encoder_input_errors():
    enc = toy_encoder()
    with pytest.raises(TypeError, match="int64"):
        enc(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        enc(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="padding_mask shape"):
        enc(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        enc(torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3))
    with pytest.raises(ValueError, match="max_seq_len"):
        enc(torch.zeros(1, 67, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids must lie"):
        enc(torch.full((1, 3), 96, dtype=torch.int64))


# ----------------------------------------------------------------------------- decoder


@pytest.mark.parametrize("emb_rank", [2, 3])
def test_decoder_matches_float64_reference(emb_rank):
    dec = toy_decoder(seed=5, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 96, (2, 7), generator=g)
    emb = torch.randn(2, 32, generator=g, dtype=torch.float64)
    got = dec(tokens, emb if emb_rank == 2 else emb[:, None])
    ref = ref_decoder_logits(params64(dec), dec.cfg, tokens, emb)
    assert got.shape == (2, 7, 96)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)  # fp32 sinusoid table
    hidden = dec.hidden_states(tokens, emb)
    torch.testing.assert_close(hidden @ dec.decoder_frontend.embed.weight.T, got, atol=1e-12, rtol=0)


def test_cross_attention_is_the_one_key_constant():
    dec = toy_decoder(seed=6, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(3, 32, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, 32, generator=g, dtype=torch.float64)
    consts = dec.cross_attention_constants(emb)
    assert consts.shape == (3, dec.cfg.num_layers, 32)
    p = params64(dec)
    for i, layer in enumerate(dec.decoder.layers):
        full = layer.encoder_decoder_attn(x, emb[:, None])
        pre = f"decoder.layers.{i}.encoder_decoder_attn"
        closed = (emb @ p[f"{pre}.v_proj.weight"].T + p[f"{pre}.v_proj.bias"]) @ p[f"{pre}.output_proj.weight"].T \
            + p[f"{pre}.output_proj.bias"]
        torch.testing.assert_close(full, closed[:, None].expand_as(full), atol=1e-12, rtol=0)
        torch.testing.assert_close(consts[:, i], closed, atol=1e-12, rtol=0)


def test_folded_cross_attention_matches_constants():
    dec = toy_decoder(seed=13, dtype=torch.float64, num_layers=3)
    emb = torch.randn(4, 32, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    w, b = dec.folded_cross_attention()
    assert w.shape == (3 * 32, 32) and b.shape == (3 * 32,)
    folded = (emb @ w.T + b).view(4, 3, 32)
    torch.testing.assert_close(folded, dec.cross_attention_constants(emb), atol=1e-12, rtol=1e-12)


def test_final_proj_is_tied():
    dec = toy_decoder(seed=2)
    assert dec.final_proj.weight is dec.decoder_frontend.embed.weight
    sd = dec.state_dict()
    assert "final_proj.weight" in sd and "decoder_frontend.embed.weight" in sd
    assert sd["final_proj.weight"].data_ptr() == sd["decoder_frontend.embed.weight"].data_ptr()
    assert len(list(dec.parameters())) == len(sd) - 1
    tokens = torch.tensor([[3, 80, 10]])
    emb = torch.randn(1, 32)
    before = dec(tokens, emb)
    with torch.no_grad():
        dec.decoder_frontend.embed.weight[50] += 1.0
    after = dec(tokens, emb)
    assert not torch.allclose(before[..., 50], after[..., 50])
    for dtype in (torch.float64, torch.bfloat16):  # module-wide casts keep the tie
        dec = dec.to(dtype)
        assert dec.final_proj.weight is dec.decoder_frontend.embed.weight


def test_incremental_steps_match_full_forward():
    dec = toy_decoder(seed=9, dtype=torch.float64)
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(0, 96, (3, 8), generator=g)
    emb = torch.randn(3, 32, generator=g, dtype=torch.float64)
    full = dec(tokens, emb)
    state = dec.init_state(emb, capacity=8)
    pieces = [dec.step(tokens[:, :3], state), dec.step(tokens[:, 3:4], state), dec.step(tokens[:, 4:], state)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-10, rtol=1e-10)
    assert state.step_nr == 8
    with pytest.raises(ValueError, match="overflow"):
        dec.step(tokens[:, :1], state)


def test_incremental_reorder_follows_rows():
    dec = toy_decoder(seed=10, dtype=torch.float64)
    g = torch.Generator().manual_seed(10)
    tokens = torch.randint(0, 96, (3, 5), generator=g)
    emb = torch.randn(3, 32, generator=g, dtype=torch.float64)
    state = dec.init_state(emb, capacity=5)
    dec.step(tokens[:, :3], state)
    order = torch.tensor([2, 2, 0, 1])
    state.reorder(order)
    got = dec.step(tokens[order][:, 3:], state)
    ref = dec(tokens[order], emb[order])[:, 3:]
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-10)


def test_decoder_padding_matches_unpadded_rows():
    dec = toy_decoder(seed=11, dtype=torch.float64)
    g = torch.Generator().manual_seed(11)
    a = torch.randint(4, 96, (1, 6), generator=g)
    b = torch.randint(4, 96, (1, 3), generator=g)
    emb = torch.randn(2, 32, generator=g, dtype=torch.float64)
    batch = torch.zeros(2, 6, dtype=torch.int64)
    batch[0] = a
    batch[1, :3] = b
    mask = torch.arange(6)[None] < torch.tensor([[6], [3]])
    out = dec(batch, emb, padding_mask=mask)
    torch.testing.assert_close(out[0:1], dec(a, emb[0:1]), atol=1e-12, rtol=0)
    torch.testing.assert_close(out[1:2, :3], dec(b, emb[1:2]), atol=1e-12, rtol=0)


def test_decoder_embed_tokens_positions():
    dec = toy_decoder(seed=12, dtype=torch.float64)
    tokens = torch.tensor([[5, 6, 7, 8]])
    x = dec.embed_tokens(tokens)
    ref = dec.decoder_frontend.embed.weight[tokens] * math.sqrt(32) + ref_positions(4, 32)
    torch.testing.assert_close(x, ref, atol=1e-6, rtol=0)
    shifted = dec.embed_tokens(tokens[:, 2:], start_step=2)
    torch.testing.assert_close(shifted, x[:, 2:], atol=0, rtol=0)
    explicit = dec.embed_tokens(tokens, positions=torch.tensor([[0, 1, 0, 1]]))
    torch.testing.assert_close(explicit[:, 2:], dec.embed_tokens(tokens[:, 2:]), atol=0, rtol=0)


def test_decoder_input_errors():
    dec = toy_decoder()
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="encoder_output"):
        dec(tokens, torch.randn(2, 16))
    with pytest.raises(ValueError, match="batch"):
        dec(tokens, torch.randn(3, 32))
    with pytest.raises(TypeError, match="floating"):
        dec(tokens, torch.zeros(2, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="max_seq_len"):
        dec(torch.zeros(1, 65, dtype=torch.int64), torch.randn(1, 32))


def test_dropout_only_in_training():
    dec = toy_decoder(seed=14, dropout_p=0.3)
    enc = toy_encoder(seed=14, dropout_p=0.3)
    tokens, emb = torch.tensor([[3, 80, 5, 6, 7]]), torch.randn(1, 32)
    torch.testing.assert_close(dec(tokens, emb), dec(tokens, emb), atol=0, rtol=0)
    torch.testing.assert_close(enc(tokens), enc(tokens), atol=0, rtol=0)
    torch.manual_seed(0)
    assert not torch.allclose(dec.train()(tokens, emb), dec.eval()(tokens, emb))
    assert not torch.allclose(enc.train()(tokens), enc.eval()(tokens))


def test_eval_mode_is_the_dropout_free_function():
    """Eval mode must compute exactly the model without dropout (not only deterministically): the same weights
    with dropout_p = 0.3 in eval mode equal the float64 reference, which has no dropout at all."""
    dec = toy_decoder(seed=15, dropout_p=0.3, dtype=torch.float64)
    enc = toy_encoder(seed=15, dropout_p=0.3, dtype=torch.float64)
    tokens = torch.tensor([[3, 80, 5, 6, 7], [3, 81, 9, 10, 11]])
    emb = torch.randn(2, dec.cfg.encoder_dim, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    # 1e-6: the sinusoid table is fp32 by design (as in test_decoder_matches_float64_reference)
    torch.testing.assert_close(dec(tokens, emb), ref_decoder_logits(params64(dec), dec.cfg, tokens, emb),
                               atol=1e-6, rtol=1e-6)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    torch.testing.assert_close(enc(tokens, mask), ref_encoder(params64(enc), enc.cfg, tokens, mask),
                               atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- configs


def test_presets_and_overrides():
    enc = encoder_preset("basic")
    dec = SonarDecoderConfig.from_preset("basic")
    assert (enc.model_dim, enc.num_layers, enc.num_heads, enc.ffn_dim, enc.vocab_size, enc.max_seq_len) == (
        1024, 24, 16, 8192, 256206, 514)
    assert (dec.max_seq_len, dec.encoder_dim, dec.pos_start_step, dec.pad_idx, dec.eos_idx) == (512, 1024, 2, 0, 3)
    tiny = decoder_preset("tiny", vocab_size=5000)
    assert (tiny.model_dim, tiny.num_layers, tiny.num_heads, tiny.ffn_dim, tiny.vocab_size) == (128, 2, 4, 512, 5000)
    assert SonarEncoderConfig.from_preset("toy").head_dim == 8
    with pytest.raises(ValueError, match="unknown"):
        encoder_preset("huge")
    with pytest.raises(TypeError, match="unknown"):
        encoder_preset("toy", model_size=3)
    with pytest.raises(ValueError, match="divisible"):
        SonarEncoderConfig(model_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="vocab_size"):
        SonarDecoderConfig(vocab_size=0)
    with pytest.raises(TypeError, match="SonarEncoderConfig"):
        SonarTextEncoder(decoder_preset("toy"))
