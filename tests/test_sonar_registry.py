"""Asset path resolution: explicit path > environment variable > registry TOML, with clear errors."""
from __future__ import annotations

import pytest

from sonar_llm.sonar.registry import read_registry, resolve_asset, resolve_assets


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for var in ("SONAR_ENCODER", "SONAR_DECODER", "SONAR_FINETUNED_DECODER", "SONAR_TOKENIZER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SONAR_LLM_REGISTRY", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_explicit_then_env_then_registry(clean_env, tmp_path):
    enc_arg, enc_env, enc_reg = (tmp_path / n for n in ("arg.pt", "env.pt", "reg.pt"))
    for p in (enc_arg, enc_env, enc_reg):
        p.write_bytes(b"x")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "spm.model").write_bytes(b"x")
    reg = tmp_path / "registry.toml"
    reg.write_text(f'encoder = "{enc_reg}"\n[sonar]\ntokenizer = "models/spm.model"\n')
    clean_env.setenv("SONAR_LLM_REGISTRY", str(reg))
    assert resolve_asset("encoder") == enc_reg
    assert resolve_asset("tokenizer") == tmp_path / "models" / "spm.model"  # relative to the TOML
    clean_env.setenv("SONAR_ENCODER", str(enc_env))
    assert resolve_asset("encoder") == enc_env
    assert resolve_asset("encoder", enc_arg) == enc_arg
    assert resolve_assets(["encoder", "tokenizer"], encoder=enc_arg) == {
        "encoder": enc_arg, "tokenizer": tmp_path / "models" / "spm.model"}
    assert read_registry(reg) == {"encoder": enc_reg, "tokenizer": tmp_path / "models" / "spm.model"}


def test_error_lists_every_place(clean_env, tmp_path):
    clean_env.setenv("SONAR_DECODER", str(tmp_path / "gone.pt"))
    clean_env.delenv("SONAR_LLM_REGISTRY")
    with pytest.raises(FileNotFoundError) as err:
        resolve_asset("decoder")
    msg = str(err.value)
    assert "SONAR_DECODER" in msg and "gone.pt" in msg and "registry.toml" in msg
    with pytest.raises(FileNotFoundError, match="SONAR_FINETUNED_DECODER \\(unset\\)"):
        resolve_asset("finetuned_decoder")
    with pytest.raises(FileNotFoundError, match="explicitly"):
        resolve_asset("encoder", tmp_path / "nothing.pt")


def test_bad_names_and_files(clean_env, tmp_path):
    with pytest.raises(ValueError, match="unknown SONAR asset"):
        resolve_asset("vocoder")
    with pytest.raises(ValueError, match="unknown SONAR asset"):
        resolve_assets(vocoder="x")
    with pytest.raises(FileNotFoundError, match="registry file not found"):
        read_registry(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("encoder = [unclosed")
    with pytest.raises(ValueError, match="invalid TOML"):
        read_registry(bad)
    bad.write_text("encoder = 3")
    with pytest.raises(ValueError, match="path string"):
        read_registry(bad)
