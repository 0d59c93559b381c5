"""Tests of the tiny SONAR training command (sonar_llm/sonar/train_tiny.py), with very small dimensions."""
import json
import math
import os
import random
import stat
import time

import pytest
import torch
import torch.nn.functional as F

from sonar_llm.sonar import train_tiny as tt
from sonar_llm.sonar.checkpoint import load_sonar_decoder, load_sonar_encoder, load_state_dict_file
from sonar_llm.sonar.tokenizer import NllbTokenizer
from sonar_llm.sonar.story_corpus import CORPUS_VERSION
from sonar_llm.sonar.train_tiny import (
    TinySonarConfig,
    default_cache_dir,
    ensure_tiny_sonar,
    train_sentencepiece,
)

SMALL = dict(n_stories=120, spm_vocab_size=300, model_dim=32, num_layers=1, num_heads=2, ffn_dim=64,
             train_steps=30, lr=5e-3, warmup_steps=5, max_batch_tokens=1024, eval_sentences=16, noise_std=0.0)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "tiny_sonar"
    cfg = TinySonarConfig(**SMALL)
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    paths = ensure_tiny_sonar(root, progress=False, config=cfg, num_threads=1)
    # the caller's RNG stream and thread count are left as they were
    after = torch.rand(3)
    torch.manual_seed(1234)
    assert torch.equal(after, torch.rand(3))
    assert torch.get_num_threads() == threads
    return cfg, paths


def test_files_and_info(trained):
    cfg, paths = trained
    assert paths.exist() and paths.root.is_dir()
    info = paths.load_info()
    assert info["config_hash"] == cfg.config_hash()
    assert info["tokenizer"]["vocab_size"] == info["encoder_config"]["vocab_size"]
    m = info["metrics"]
    assert m["eval_sentences"] == 16 and 0.0 <= m["exact_match"] <= 1.0 and m["bleu"] >= 0.0
    assert not [p for p in paths.root.parent.iterdir() if p.name.startswith(".tiny_sonar.tmp")]


def test_checkpoints_load_strictly_and_match_training(trained):
    cfg, paths = trained
    info = paths.load_info()
    for p in (paths.encoder, paths.decoder):  # fairseq2 layout: {"model": state_dict}
        raw = torch.load(p, map_location="cpu", weights_only=True)
        assert isinstance(raw, dict) and "model" in raw
    enc = load_sonar_encoder(paths.encoder)
    dec = load_sonar_decoder(paths.decoder)
    assert enc.cfg.model_dim == cfg.model_dim and dec.cfg.num_layers == cfg.num_layers
    sd = load_state_dict_file(paths.decoder)
    assert "decoder.layers.0.encoder_decoder_attn.q_proj.weight" in sd and "decoder_frontend.embed.weight" in sd
    assert "encoder.layers.0.self_attn.k_proj.bias" in load_state_dict_file(paths.encoder)
    tok = NllbTokenizer(paths.tokenizer)
    assert tok.vocab_size == enc.cfg.vocab_size == dec.cfg.vocab_size
    assert tok.lang_id("eng_Latn") == info["tokenizer"]["lang_id"]

    # the loaded weights are the trained ones: their teacher-forced loss on training sentences is far
    # below the uniform-guess loss log(V) and close to the loss logged at the end of training
    from sonar_llm.data.stories import generate_story_sentences, split_stories

    train, _ = split_stories(generate_story_sentences(cfg.n_stories, cfg.corpus_seed), cfg.held_out_fraction,
                             cfg.corpus_seed)
    sents = random.Random(0).sample([s for st in train for s in st], 64)
    src, src_mask = tok.pad_batch(tok.encode_source(sents))
    tgt, tgt_mask = tok.pad_batch(tok.encode_target(sents))
    with torch.no_grad():
        emb = enc(src, src_mask)
        logits = dec(tgt[:, :-1], emb, tgt_mask[:, :-1])
        labels = tgt[:, 1:].masked_fill(~tgt_mask[:, 1:], -100)
        loss = float(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    assert loss < math.log(tok.vocab_size) - 1.0
    assert abs(loss - info["train"]["final_loss"]) < 0.75


def test_loss_goes_down(trained):
    _, paths = trained
    tr = paths.load_info()["train"]
    assert tr["steps"] == 30  # exactly train_steps: no clock, no early stop
    assert tr["final_loss"] < tr["first_loss"] - 1.0


def test_cache_hit_returns_without_training(trained, monkeypatch):
    cfg, paths = trained
    before = {p: p.stat().st_mtime_ns for p in (paths.encoder, paths.decoder, paths.tokenizer, paths.info)}

    def boom(*a, **k):
        raise AssertionError("retrained on a cache hit")

    monkeypatch.setattr(tt, "_train", boom)
    monkeypatch.setattr(tt, "train_sentencepiece", boom)
    t0 = time.perf_counter()
    again = ensure_tiny_sonar(paths.root, progress=False, config=TinySonarConfig(**SMALL))
    assert time.perf_counter() - t0 < 2.0
    assert again == paths
    assert before == {p: p.stat().st_mtime_ns for p in before}
    # another configuration does not hit this cache (and would train: here it raises)
    with pytest.raises(AssertionError, match="retrained"):
        ensure_tiny_sonar(paths.root, progress=False, config=TinySonarConfig(**{**SMALL, "seed": 1}))
    with pytest.raises(AssertionError, match="retrained"):
        ensure_tiny_sonar(paths.root, progress=False, force=True, config=TinySonarConfig(**SMALL))
    assert paths.exist() and before == {p: p.stat().st_mtime_ns for p in before}  # old copy survives


def test_config_hash_and_validation():
    a = TinySonarConfig()
    assert a.config_hash() == TinySonarConfig().config_hash()
    assert a.config_hash() != TinySonarConfig(model_dim=96).config_hash()
    with pytest.raises(ValueError, match="model_dim"):
        TinySonarConfig(model_dim=0)
    with pytest.raises(ValueError, match="spm_model_type"):
        TinySonarConfig(spm_model_type="word")
    with pytest.raises(TypeError, match="config"):
        ensure_tiny_sonar("/nonexistent", config={"model_dim": 8})
    with pytest.raises(ValueError, match="train_steps"):
        TinySonarConfig(train_steps=0)
    assert a.config_hash() != TinySonarConfig(train_steps=a.train_steps + 1).config_hash()  # steps are in the key
    # a cache trained on another version of the story generator is stale
    assert a.corpus_version == CORPUS_VERSION
    assert a.config_hash() != TinySonarConfig(corpus_version=a.corpus_version - 1).config_hash()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SONAR_LLM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tiny_sonar"
    monkeypatch.delenv("SONAR_LLM_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "sonar_llm" / "tiny_sonar"


def test_sentencepiece_deterministic_and_raw_layout(tmp_path):
    from sonar_llm.data.stories import generate_story_sentences

    sents = [s for st in generate_story_sentences(150, seed=3) for s in st]
    a = train_sentencepiece(sents, tmp_path / "a.model", vocab_size=400)
    b = train_sentencepiece(list(reversed(sents)), tmp_path / "b.model", vocab_size=400)
    assert a.read_bytes() == b.read_bytes()  # input order does not matter
    tok = NllbTokenizer(a)
    assert tok.spm_size == 400
    text = sents[7]
    assert tok.decode(tok.encode_source([text])) == [text]
    with pytest.raises(ValueError, match="no non-empty"):
        train_sentencepiece(["", "  "], tmp_path / "c.model")


def test_length_bucketed_batches():
    rng = random.Random(0)
    lengths = [rng.randint(3, 30) for _ in range(500)]
    batches = tt._make_batches(lengths, max_tokens=256, max_sentences=40, rng=random.Random(1))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    for b in batches:
        assert len(b) <= 40
        assert max(lengths[i] for i in b) * len(b) <= 256 or len(b) == 1
    # bucketing: the lengths inside a batch are close (sorted order is cut into runs)
    assert sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches) <= 2


def test_publish_replaces_existing(tmp_path):
    root = tmp_path / "tiny_sonar"
    root.mkdir()
    (root / "old.txt").write_text("old")
    new = tmp_path / ".tiny_sonar.tmp-1"
    new.mkdir()
    (new / "new.txt").write_text("new")
    os.chmod(new / "new.txt", 0o600)
    os.chmod(new, 0o700)
    umask = os.umask(0o022)
    try:
        tt._publish(new, root)
    finally:
        os.umask(umask)
    assert sorted(p.name for p in root.iterdir()) == ["new.txt"]
    assert stat.S_IMODE(root.stat().st_mode) == 0o755 and stat.S_IMODE((root / "new.txt").stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_sonar"]


def test_damaged_cache_is_named_and_retrained(tmp_path, capsys):
    """A cached copy whose checkpoint was truncated is not used: the next call says which file differs from its
    recorded size and trains again, leaving intact files behind."""
    cfg = TinySonarConfig(**SMALL)
    paths = ensure_tiny_sonar(tmp_path / "tiny_sonar", progress=False, config=cfg, num_threads=1)
    good = paths.decoder.read_bytes()
    assert paths.load_info()["checksums"]["tiny_sonar_decoder.pt"]["size"] == len(good)
    paths.decoder.write_bytes(good[: len(good) // 2])
    capsys.readouterr()
    again = ensure_tiny_sonar(tmp_path / "tiny_sonar", progress=True, config=cfg, num_threads=1)
    err = capsys.readouterr().err
    assert "damaged" in err and "tiny_sonar_decoder.pt" in err and "size differs" in err
    assert again.decoder.stat().st_size == len(good)
    load_sonar_decoder(again.decoder)  # loads
    # a flipped byte of the same size is caught by the sha256
    raw = bytearray(again.encoder.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    again.encoder.write_bytes(bytes(raw))
    ensure_tiny_sonar(tmp_path / "tiny_sonar", progress=True, config=cfg, num_threads=1)
    assert "tiny_sonar_encoder.pt" in capsys.readouterr().err and again.encoder.read_bytes() != bytes(raw)
    # a record that names other files (hand-edited, or pointing outside the cache) is not trusted either
    info = json.loads(again.info.read_text())
    info["checksums"] = {"../elsewhere.pt": {"sha256": "0", "size": 1}}
    again.info.write_text(json.dumps(info))
    ensure_tiny_sonar(tmp_path / "tiny_sonar", progress=True, config=cfg, num_threads=1)
    assert "does not record the checksums" in capsys.readouterr().err
    assert sorted(json.loads(again.info.read_text())["checksums"]) == sorted(
        ["tiny_sonar_encoder.pt", "tiny_sonar_decoder.pt", "tiny_sonar.model"])


def test_training_sweeps_what_a_killed_training_left(tmp_path):
    """A SIGKILLed training leaves its temporary folder (no `except` runs); the next training removes the folders
    of processes that are gone and keeps those of a live process and anything it cannot attribute."""
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead, live = gone.pid, os.getpid()
    names = {f".tiny_sonar.tmp-{dead}-ab12": False, f"tiny_sonar.old-{dead}-1700000000": False,
             f".tiny_sonar.tmp-{live}-cd34": True, ".tiny_sonar.tmp-legacy": True, f".other.tmp-{dead}-x": True}
    for n in names:
        (tmp_path / n).mkdir()
        (tmp_path / n / "encoder.pt").write_bytes(b"partial")
    ensure_tiny_sonar(tmp_path / "tiny_sonar", progress=False, config=TinySonarConfig(**SMALL), num_threads=1)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"tiny_sonar"} | {n for n, keep in names.items() if keep}


def test_cli_passes_arguments_and_prints_metrics(trained, monkeypatch, capsys):
    _, paths = trained
    calls = []

    def fake(cache_dir, **kw):
        calls.append((cache_dir, kw))
        return paths

    monkeypatch.setattr(tt, "ensure_tiny_sonar", fake)
    assert tt.main(["--cache-dir", str(paths.root), "--force", "--steps", "12", "--threads", "1",
                    "--quiet"]) == 0
    assert calls == [(str(paths.root), dict(force=True, progress=False, config=TinySonarConfig(train_steps=12),
                                            num_threads=1))]
    out = json.loads(capsys.readouterr().out)
    assert out["root"] == str(paths.root) and "exact_match" in out["metrics"]
    with pytest.raises(SystemExit):
        tt.main(["--threads", "0"])


def test_same_seed_gives_bit_identical_weights(trained, tmp_path):
    """The tiny SONAR trains a fixed number of steps: a second run with the same config and seed (same thread
    count) writes the same tokenizer and bit-identical weights; another seed does not."""
    cfg, paths = trained
    again = ensure_tiny_sonar(tmp_path / "again", progress=False, config=TinySonarConfig(**SMALL), num_threads=1)
    assert again.tokenizer.read_bytes() == paths.tokenizer.read_bytes()
    for a, b in ((paths.encoder, again.encoder), (paths.decoder, again.decoder)):
        sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), a.name
    other = ensure_tiny_sonar(tmp_path / "other", progress=False, config=TinySonarConfig(**{**SMALL, "seed": 1}),
                              num_threads=1)
    so, sp = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (other.decoder, paths.decoder))
    assert any(not torch.equal(so[k], sp[k]) for k in sp)
