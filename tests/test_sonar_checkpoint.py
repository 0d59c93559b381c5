"""Checkpoint save/load round trips (.pt and safetensors), architecture inference, and every error path."""
from __future__ import annotations

import os

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_encoder
from sonar_llm.sonar import (
    SonarTextDecoder,
    convert_from_safetensors,
    convert_to_safetensors,
    decoder_preset,
    load_sonar_decoder,
    load_sonar_encoder,
    load_state_dict_file,
    save_fairseq2_checkpoint,
)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_decoder_pt_round_trip(tmp_path):
    dec = toy_decoder(seed=1)
    path = tmp_path / "dec.pt"
    save_fairseq2_checkpoint(dec, path)
    assert os.listdir(tmp_path) == ["dec.pt"]  # atomic write leaves no temporary file
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"model", "sonar_llm_config"} and "final_proj.weight" in raw["model"]
    loaded = load_sonar_decoder(path)
    assert loaded.cfg == dec.cfg
    assert_same_state(dec, loaded)
    assert loaded.final_proj.weight is loaded.decoder_frontend.embed.weight
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    assert not loaded.training
    tokens, emb = torch.tensor([[3, 80, 5, 6]]), torch.randn(1, 32)
    torch.testing.assert_close(loaded(tokens, emb), dec(tokens, emb), atol=0, rtol=0)


def test_encoder_pt_round_trip_with_overwrite(tmp_path):
    path = tmp_path / "enc.pt"
    save_fairseq2_checkpoint(toy_encoder(seed=7), path)
    enc = toy_encoder(seed=2)
    save_fairseq2_checkpoint(enc, path)  # replaces the older file
    loaded = load_sonar_encoder(path, "toy")
    assert_same_state(enc, loaded)
    tokens = torch.tensor([[80, 5, 6, 3]])
    torch.testing.assert_close(loaded(tokens), enc(tokens), atol=0, rtol=0)


def test_architecture_inferred_from_shapes(tmp_path):
    # a plain fairseq2 file, no config entry: layers/dims/vocab from shapes, heads from head_dim 64
    dec = toy_decoder(seed=3, model_dim=128, num_heads=2, ffn_dim=96, num_layers=3, vocab_size=50)
    path = tmp_path / "plain.pt"
    torch.save({"model": dec.state_dict()}, path)
    loaded = load_sonar_decoder(path)
    c = loaded.cfg
    assert (c.model_dim, c.num_heads, c.ffn_dim, c.num_layers, c.vocab_size) == (128, 2, 96, 3, 50)
    assert_same_state(dec, loaded)
    bare = tmp_path / "bare.pt"  # fairseq2 >= 0.5 style: no top-level "model" key
    torch.save(toy_encoder(seed=4, model_dim=64, num_heads=1).state_dict(), bare)
    assert load_sonar_encoder(bare).cfg.num_layers == 2


def test_preset_name_takes_vocab_from_file(tmp_path):
    enc = toy_encoder(seed=9, vocab_size=120)
    save_fairseq2_checkpoint(enc, tmp_path / "e.pt")
    loaded = load_sonar_encoder(tmp_path / "e.pt", "toy")
    assert loaded.cfg.vocab_size == 120
    assert_same_state(enc, loaded)


def test_decoder_without_final_proj_key_is_tied(tmp_path):
    dec = toy_decoder(seed=5)
    sd = {k: v for k, v in dec.state_dict().items() if k != "final_proj.weight"}
    torch.save({"model": sd}, tmp_path / "d.pt")
    loaded = load_sonar_decoder(tmp_path / "d.pt", "toy")
    assert loaded.final_proj.weight is loaded.decoder_frontend.embed.weight


def test_safetensors_round_trip(tmp_path):
    dec = toy_decoder(seed=6)
    pt, st, back = tmp_path / "d.pt", tmp_path / "d.safetensors", tmp_path / "back.pt"
    save_fairseq2_checkpoint(dec, pt)
    convert_to_safetensors(pt, st)
    sd = load_state_dict_file(st)
    assert "final_proj.weight" not in sd  # stored once
    from_st = load_sonar_decoder(st)
    assert from_st.cfg == dec.cfg  # config travels in the safetensors metadata
    assert_same_state(dec, from_st)
    assert from_st.final_proj.weight is from_st.decoder_frontend.embed.weight
    convert_from_safetensors(st, back)
    assert "final_proj.weight" in load_state_dict_file(back)
    assert_same_state(dec, load_sonar_decoder(back))
    enc = toy_encoder(seed=6)
    save_fairseq2_checkpoint(enc, tmp_path / "e.pt")
    convert_to_safetensors(tmp_path / "e.pt", tmp_path / "e.safetensors")
    assert_same_state(enc, load_sonar_encoder(tmp_path / "e.safetensors"))


def test_dtype_and_device_requests(tmp_path):
    path = tmp_path / "d.pt"
    save_fairseq2_checkpoint(toy_decoder(seed=8), path)
    half = load_sonar_decoder(path, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    assert half.decoder_frontend.pos_encoder.freqs.dtype == torch.float32
    assert {p.dtype for p in load_sonar_decoder(path, dtype="bf16").parameters()} == {torch.bfloat16}
    with pytest.raises(TypeError, match="floating"):
        load_sonar_decoder(path, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_sonar_decoder(path, dtype="fp8")
    with pytest.raises(TypeError, match="dtype"):
        load_sonar_decoder(path, dtype=3)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_sonar_encoder(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_state_dict_file(tmp_path)


@pytest.mark.parametrize("suffix", ["pt", "safetensors"])
def test_truncated_file(tmp_path, suffix):
    pt = tmp_path / "d.pt"
    save_fairseq2_checkpoint(toy_decoder(), pt)
    src = pt
    if suffix == "safetensors":
        src = tmp_path / "d.safetensors"
        convert_to_safetensors(pt, src)
    data = src.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_sonar_decoder(cut)


def test_garbage_and_empty_files(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"hello, this is not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_sonar_decoder(tmp_path / "g.pt")
    (tmp_path / "e.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_sonar_decoder(tmp_path / "e.pt")


def test_foreign_files(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_sonar_decoder(tmp_path / "list.pt")
    torch.save({"model": {"step": 3}}, tmp_path / "nontensor.pt")
    with pytest.raises(ValueError, match="non-tensor"):
        load_sonar_decoder(tmp_path / "nontensor.pt")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a SONAR text decoder checkpoint"):
        load_sonar_decoder(tmp_path / "foreign.pt")
    save_fairseq2_checkpoint(toy_encoder(), tmp_path / "enc.pt")
    with pytest.raises(ValueError, match="looks like an encoder checkpoint"):
        load_sonar_decoder(tmp_path / "enc.pt")


def test_wrong_architecture_lists_keys_and_shapes(tmp_path):
    path = tmp_path / "d.pt"
    save_fairseq2_checkpoint(toy_decoder(), path)
    with pytest.raises(ValueError, match=r"missing keys: decoder\.layers\.2\."):
        load_sonar_decoder(path, decoder_preset("toy", num_layers=3))
    with pytest.raises(ValueError, match=r"unexpected keys: decoder\.layers\.1\."):
        load_sonar_decoder(path, decoder_preset("toy", num_layers=1))
    with pytest.raises(ValueError, match=r"shape mismatches: decoder\.layers\.0\.ffn\.inner_proj\.bias: "
                                         r"checkpoint \(64,\) vs model \(128,\)"):
        load_sonar_decoder(path, decoder_preset("toy", ffn_dim=128))
    with pytest.raises(TypeError, match="cfg_or_preset"):
        load_sonar_decoder(path, 42)


def test_untied_final_proj_is_rejected(tmp_path):
    sd = dict(toy_decoder().state_dict())
    sd["final_proj.weight"] = sd["final_proj.weight"].clone() + 1.0
    torch.save({"model": sd}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match="final_proj.weight differs"):
        load_sonar_decoder(tmp_path / "d.pt", "toy")
    sd["final_proj.weight"] = sd["decoder_frontend.embed.weight"].clone()  # equal copy: accepted
    torch.save({"model": sd}, tmp_path / "ok.pt")
    dec = load_sonar_decoder(tmp_path / "ok.pt", "toy")
    assert isinstance(dec, SonarTextDecoder) and dec.final_proj.weight is dec.decoder_frontend.embed.weight
