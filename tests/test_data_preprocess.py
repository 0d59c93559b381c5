"""Tests for sonar_llm.data.preprocess: content, chunking, kill-and-resume, ranks, CLI (with a fake codec)."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sonar_llm.data.preprocess import SentenceCodec, SonarCodec, main, preprocess
from sonar_llm.data.segment import split_sentences
from sonar_llm.data.shards import DatasetSettingsMismatch, ShardedDataset

E = 8
EOD = "End of sequence."
SHARD = 3
MAXS = 4


class FakeCodec:
    """Deterministic stand-in for SONAR: embeddings from a hash of the sentence, tokens from its bytes.

    die_after: exit the process abruptly (os._exit, like a kill) on that encode call.
    """

    encoder_id = "fake-encoder"
    tokenizer_id = "fake-bytes"

    def __init__(self, die_after=None):
        self.calls = 0
        self.die_after = die_after

    def encode(self, sentences):
        self.calls += 1
        if self.die_after is not None and self.calls >= self.die_after:
            os._exit(17)
        return torch.stack([self.embed(s) for s in sentences])

    @staticmethod
    def embed(s):
        seed = int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
        return torch.randn(E, generator=torch.Generator().manual_seed(seed))

    def target_tokens(self, sentences):
        return [[3, 7] + [10 + b for b in s.encode()] + [3] for s in sentences]


def _decode(tokens):
    assert tokens[0] == 3 and tokens[1] == 7 and tokens[-1] == 3
    return bytes(t - 10 for t in tokens[2:-1]).decode()


def _make_corpus(root: Path) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "blue", "sky", "river", "runs", "far", "away"]

    def doc(n):
        return " ".join(" ".join(rng.choice(words, rng.integers(2, 7))).capitalize() + "." for _ in range(n))

    root.mkdir()
    texts = [doc(int(n)) for n in rng.integers(1, 10, 10)]
    (root / "a.txt").write_text("\n\n".join(texts) + "\n")
    jl = [doc(int(n)) for n in rng.integers(1, 10, 6)]
    lines = [json.dumps({"text": t}) for t in jl[:3]] + ["{broken", json.dumps({"text": 3})] + \
            [json.dumps({"text": t}) for t in jl[3:]]
    (root / "b.jsonl").write_text("\n".join(lines) + "\n")
    return texts + jl


def _run(inputs, out, codec=None, **kw):
    kw.setdefault("shard_size_docs", SHARD)
    kw.setdefault("max_sentences_per_doc", MAXS)
    return preprocess(inputs, out, codec or FakeCodec(), log=None, **kw)


def _tree(root: Path) -> dict:
    """Every file's bytes; a manifest's `config.inputs` (paths relative to its folder, so they differ between
    two datasets in different folders) by the absolute paths they point to."""
    def content(p: Path) -> bytes:
        if not p.name.startswith("manifest"):
            return p.read_bytes()
        m = json.loads(p.read_text())
        m["config"]["inputs"] = [os.path.normpath(os.path.join(p.parent, x)) for x in m["config"]["inputs"]]
        return json.dumps(m, sort_keys=True).encode()

    return {str(p.relative_to(root)): content(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    base = tmp_path_factory.mktemp("pre")
    docs = _make_corpus(base / "corpus")
    ref = base / "ref"
    _run(base / "corpus", ref)
    return base, docs, ref


def test_content_chunking_and_counts(corpus):
    base, docs, ref = corpus
    ds = ShardedDataset(ref, verify="full")
    expected = []
    for text in docs:
        stream = split_sentences(text) + [EOD]
        expected += [c for c in (stream[i:i + MAXS] for i in range(0, len(stream), MAXS)) if len(c) >= 2]
    assert ds.num_docs == len(expected)
    for i, want in enumerate(expected):
        emb, tokens, offs = ds.doc(i)
        got = [_decode(tokens[offs[j]:offs[j + 1]].tolist()) for j in range(len(offs) - 1)]
        assert got == want
        ref_emb = torch.stack([FakeCodec.embed(s) for s in want]).half()
        assert torch.equal(emb, ref_emb)
    m = ds.manifest
    assert m["ingest"] == {"files": 2, "records": 18, "documents": 16, "skipped": {"bad_json": 1,
                                                                                   "non_string_field": 1}}
    assert m["num_planned_shards"] == len(m["shards"]) == -(-16 // SHARD)
    assert m["end_of_doc"]["text"] == EOD and _decode(m["end_of_doc"]["tokens"]) == EOD
    assert torch.equal(ds.end_of_doc_embedding(), FakeCodec.embed(EOD).half())
    assert m["encoder"] == "fake-encoder" and m["tokenizer"] == "fake-bytes"
    assert isinstance(FakeCodec(), SentenceCodec)


_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from test_data_preprocess import FakeCodec, _run
_run({corpus!r}, sys.argv[1], FakeCodec(die_after=4))  # calls: 1 end-of-doc, 2-3 shards 0-1, dies in shard 2
"""


class _Killed(BaseException):
    """Raised by the patched np.save: nothing in the writer may catch it (like a kill)."""


def _check_killed_state(out, shard2_folder=False):
    m = json.loads((out / "manifest.json").read_text())
    assert not m["complete"] and [s["index"] for s in m["shards"]] == [0, 1]
    assert (out / "shard_000002").exists() == shard2_folder  # never listed in the manifest
    ds = ShardedDataset(out, verify="full", allow_incomplete=True)  # completed shards are readable
    assert ds.num_docs == sum(s["num_docs"] for s in m["shards"])


def test_killed_process_resumes_to_identical_dataset(corpus, tmp_path):
    base, _, ref = corpus
    out = tmp_path / "out"
    script = _CHILD.format(tests=str(Path(__file__).parent), corpus=str(base / "corpus"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 17, r.stderr
    _check_killed_state(out)
    _run(base / "corpus", out)
    assert _tree(out) == _tree(ref)  # byte for byte


@pytest.mark.parametrize("where", ["array_write", "manifest_update"])
def test_interrupted_write_stays_hidden_and_resumes(corpus, tmp_path, monkeypatch, where):
    import sonar_llm.data.shards as shards_mod

    base, _, ref = corpus
    out = tmp_path / "out"
    # np.save calls: 1 end_of_doc.npy, 2-5 shard 0, 6-9 shard 1, 10-13 shard 2;
    # write_json_atomic calls: 1 initial manifest, 2-3 after shards 0-1, 4 after shard 2
    target, name, die_at = (np, "save", 11) if where == "array_write" else (shards_mod, "write_json_atomic", 4)
    real, calls = getattr(target, name), [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == die_at:
            raise _Killed()
        return real(*a, **k)

    monkeypatch.setattr(target, name, dying)
    with pytest.raises(_Killed):
        _run(base / "corpus", out)
    monkeypatch.setattr(target, name, real)
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == ([f".shard_000002.tmp-{os.getpid()}"] if where == "array_write" else [])
    _check_killed_state(out, shard2_folder=where == "manifest_update")
    _run(base / "corpus", out)
    assert _tree(out) == _tree(ref)  # byte for byte, leftovers gone or rewritten


def test_two_ranks_match_single_rank(corpus, tmp_path):
    base, _, ref = corpus
    out = tmp_path / "ranks"
    r1 = _run(base / "corpus", out, rank=1, world_size=2)
    assert r1["rank"] == 1 and not (out / "manifest.json").exists()
    merged = _run(base / "corpus", out, rank=0, world_size=2)
    assert merged["complete"] and (out / "manifest.json").exists()
    a, b = ShardedDataset(ref, verify="full"), ShardedDataset(out, verify="full")
    assert a.num_docs == b.num_docs and a.manifest["totals"] == b.manifest["totals"]
    for i in range(a.num_docs):
        ea, ta, oa = a.doc(i)
        eb, tb, ob = b.doc(i)
        assert torch.equal(ea, eb) and np.array_equal(ta, tb) and np.array_equal(oa, ob)
    # re-running a finished rank is a no-op that returns the merged manifest
    assert _run(base / "corpus", out, rank=1, world_size=2)["rank"] is None


def test_rerun_with_other_settings_is_refused(corpus, tmp_path):
    base, _, _ = corpus
    out = tmp_path / "o"
    _run(base / "corpus", out, shard_size_docs=100)
    with pytest.raises(ValueError, match="shard_size_docs"):
        _run(base / "corpus", out, shard_size_docs=5)
    m = _run(base / "corpus", out, shard_size_docs=5, overwrite=True, dtype="bf16")
    assert m["complete"] and len(m["shards"]) == 4
    assert sorted(p.name for p in out.glob("shard_*")) == [f"shard_{k:06d}" for k in range(4)]
    assert ShardedDataset(out).doc(0)[0].dtype == torch.bfloat16


def test_a_moved_tree_of_inputs_and_dataset_is_the_same_dataset(corpus, tmp_path):
    """Inputs and dataset moved together: re-running preprocess finds the same settings (it used to compare the
    inputs' absolute paths, call them other settings and make the caller rebuild), leaves the manifest
    byte-identical, and the manifest's inputs name the moved files. Other inputs are still other settings."""
    import shutil

    from sonar_llm.data.shards import input_paths, read_manifest

    base, _, _ = corpus
    old = tmp_path / "old"
    shutil.copytree(base / "corpus", old / "corpus")
    _run(old / "corpus", old / "data")
    before = (old / "data" / "manifest.json").read_bytes()
    new = tmp_path / "new"
    shutil.move(old, new)
    m = _run(new / "corpus", new / "data")
    assert m["complete"] and (new / "data" / "manifest.json").read_bytes() == before
    assert sorted(input_paths(read_manifest(new / "data"), new / "data")) == sorted(
        str(p) for p in (new / "corpus").iterdir())
    (new / "other").mkdir()
    shutil.copy(new / "corpus" / "a.txt", new / "other" / "a.txt")
    with pytest.raises(DatasetSettingsMismatch, match="config.inputs"):
        _run(new / "other", new / "data")


def test_a_manifest_with_absolute_inputs_still_matches_where_they_point(corpus, tmp_path):
    """Manifests written before recorded absolute input paths: the same inputs are the same settings."""
    base, _, _ = corpus
    out = tmp_path / "o"
    _run(base / "corpus", out)
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["config"]["inputs"] = [str((out / p).resolve()) for p in manifest["config"]["inputs"]]
    path.write_text(json.dumps(manifest))
    assert _run(base / "corpus", out)["complete"]


def test_truncation_of_long_targets_and_truncate_mode(tmp_path):
    (tmp_path / "c.txt").write_text(("é" * 200) + ".\n\n" + " ".join(f"S{i} here." for i in range(9)) + "\n")
    ds_dir = tmp_path / "o"
    _run(tmp_path / "c.txt", ds_dir, doc_overflow="truncate", max_target_tokens=256)
    ds = ShardedDataset(ds_dir)
    assert ds.num_docs == 2  # the 10-sentence document is cut to its first chunk only
    emb, tokens, offs = ds.doc(0)
    assert offs[1] == 256 and tokens[0] == 3 and tokens[255] == 3  # 2 + 401 + 1 ids cut to 256, </s> kept
    assert ds.doc_lengths()[0].tolist() == [2, MAXS]


def test_cli_with_codec_factory(corpus, tmp_path, capsys, monkeypatch):
    base, _, ref = corpus
    out = tmp_path / "cli"
    rc = main(["--input", str(base / "corpus" / "a.txt"), str(base / "corpus" / "b.jsonl"), "--output", str(out),
              "--codec-factory", "test_data_preprocess:FakeCodec", "--shard-size-docs", str(SHARD),
              "--max-sentences-per-doc", str(MAXS)])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["totals"] == json.loads((ref / "manifest.json").read_text())["totals"]
    assert "2 skipped (bad_json=1, non_string_field=1)" in capsys.readouterr().err
    monkeypatch.setenv("SONAR_ENCODER", str(tmp_path / "missing.pt"))
    monkeypatch.setenv("SONAR_LLM_REGISTRY", str(tmp_path / "none.toml"))
    # no --encoder: the registry is asked; its answer is one line (sonar_llm.cli), exit 2, nothing written
    assert main(["--input", str(base / "corpus"), "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("none.toml" in err[0] or "missing.pt" in err[0]) and not (tmp_path / "x").exists()
    assert main(["--output", str(out)]) == 2  # argparse: --input is required
    assert capsys.readouterr().err.strip().splitlines() == [
        "preprocess error: the following arguments are required: --input"]


def test_sonar_codec_with_toy_sonar_models(tmp_path):
    from fixtures_sonar import make_spm_model, toy_encoder
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
    from sonar_llm.sonar.pipeline import TextToEmbedding
    from sonar_llm.sonar.tokenizer import NllbTokenizer

    from sonar_llm.data.preprocess import load_sonar_codec

    spm_path = make_spm_model(tmp_path / "spm")
    tok = NllbTokenizer(spm_path)
    enc = toy_encoder(seed=3, vocab_size=tok.vocab_size)
    save_fairseq2_checkpoint(enc, tmp_path / "enc.pt")
    codec = load_sonar_codec(tmp_path / "enc.pt", spm_path, batch_size=4)
    digest = hashlib.sha256((tmp_path / "enc.pt").read_bytes()).hexdigest()
    assert isinstance(codec, SentenceCodec) and codec.encoder_id == f"enc.pt (sha256 {digest[:16]})"
    text = "The small cat sees a bird. The old dog sleeps under the tree! A child reads a story."
    (tmp_path / "c.txt").write_text(text + "\n")
    _run(tmp_path / "c.txt", tmp_path / "ds", codec=codec, max_sentences_per_doc=128)
    ds = ShardedDataset(tmp_path / "ds", verify="full")
    sents = split_sentences(text) + [EOD]
    assert len(sents) == 4
    emb, tokens, offs = ds.doc(0)
    ref = TextToEmbedding(enc, tok).encode(sents, lang="eng_Latn")  # independent pipeline, other batching
    torch.testing.assert_close(emb.float(), ref.half().float(), atol=2e-3, rtol=2e-3)
    want = tok.encode_target(sents, lang="eng_Latn")
    assert [tokens[offs[j]:offs[j + 1]].tolist() for j in range(4)] == want
    assert all(w[0] == 3 and w[1] == tok.lang_id("eng_Latn") and w[-1] == 3 for w in want)
    # another encoder saved under the same file name: resuming into the same folder is refused (its
    # embeddings are not silently reused), and the refusal names the encoder
    save_fairseq2_checkpoint(toy_encoder(seed=4, vocab_size=tok.vocab_size), tmp_path / "enc.pt")
    other = load_sonar_codec(tmp_path / "enc.pt", spm_path, batch_size=4)
    assert other.encoder_id != codec.encoder_id
    with pytest.raises(DatasetSettingsMismatch, match="encoder"):
        _run(tmp_path / "c.txt", tmp_path / "ds", codec=other, max_sentences_per_doc=128)


def test_sonar_codec_duck_typing():
    class Enc:
        def predict(self, sentences):
            return torch.zeros(len(sentences), 4)

    class Tok:
        def encode_target(self, texts, lang):
            assert lang == "eng_Latn"
            return [torch.tensor([3, 256047] + [100] * len(s) + [3]) for s in texts]

    codec = SonarCodec(Enc(), Tok(), max_target_tokens=6)
    assert codec.encode(["a", "b"]).shape == (2, 4)
    assert codec.target_tokens(["ab", "abcdef"]) == [[3, 256047, 100, 100, 3], [3, 256047, 100, 100, 100, 3]]
    with pytest.raises(TypeError, match="encode_target"):
        SonarCodec(Enc(), object())
    with pytest.raises(ValueError, match="expected \\[n=1, E\\]"):
        SonarCodec(lambda xs: torch.zeros(4), Tok()).encode(["x"])


def test_empty_corpus_is_an_error_naming_the_input(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    with pytest.raises(ValueError, match=f"the input holds no documents: {empty}"):
        _run(empty, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()  # nothing written
    rc = main(["--input", str(empty), "--output", str(tmp_path / "cli"), "--codec-factory",
               "test_data_preprocess:FakeCodec"])
    err = capsys.readouterr().err
    assert rc == 2 and f"the input holds no documents: {empty}" in err and not (tmp_path / "cli").exists()
