"""TinyStories preparation (sonar_llm.data.tinystories) offline, on small files in each of the dataset's own
layouts written by the test (Hugging Face Parquet through `datasets` as the reference writer, the
<|endoftext|>-separated TXT, the TinyStories_all_data JSON), the online path with `datasets.load_dataset`
replaced by an in-memory DatasetDict, Punkt vs blingfire, the public splits, the 32-sentence cut + EOS,
encoding with a tiny SONAR, resuming."""
import json

import pytest
import torch
from fixtures_nltk import no_nltk_data, tiny_punkt  # noqa: F401  (fixtures)
from fixtures_sonar import TOY_LANGS, toy_encoder, toy_tokenizer

from sonar_llm.data import tinystories as T
from sonar_llm.data.preprocess import SonarCodec
from sonar_llm.data.shards import ShardedDataset
from sonar_llm.sonar.pipeline import TextToEmbedding

EOD = "End of sequence."
WORDS = "the cat dog sun sees likes big small red runs".split()


def _story(i, n):
    # sentences separated by one or two spaces and a paragraph break: Punkt's output is what the shards hold
    sents = [f"{WORDS[(i + k) % 10].capitalize()} {WORDS[(i * 3 + k) % 10]} story {i} line {k}." for k in range(n)]
    if n > 3:
        sents[1] = f"Mr. {WORDS[i % 10]} came on line 1."  # an abbreviation the tiny Punkt model knows
        sents[2] = f"Tom saw Mrs. Lee on line {i}."  # one it does not: Punkt splits here, blingfire does not
    return " ".join(sents[: n // 2]) + ("\n\n" if n > 2 else " ") + "  ".join(sents[n // 2:])


TRAIN = [_story(i, n) for i, n in enumerate([3, 5, 40, 1, 7, 2])] + [""]
VALID = [_story(100 + i, n) for i, n in enumerate([4, 6, 35, 2, 3])] + [""]


@pytest.fixture(scope="module")
def toy_sonar(tmp_path_factory):
    tok = toy_tokenizer(tmp_path_factory.mktemp("spm"))
    return toy_encoder(vocab_size=tok.vocab_size), tok


@pytest.fixture(scope="module")
def codec(toy_sonar):
    encoder, tok = toy_sonar
    return SonarCodec(TextToEmbedding(encoder, tok, batch_size=8), tok)


def _reference_embeddings(toy_sonar, sents):
    """Independent of the codec (its tokenizer wrapper, batching, sorting, padding): one sentence at a time,
    ids from SentencePiece itself in fairseq2's NLLB layout (raw id + 1; the eng_Latn tag = pieces + 1 + its
    index in the tokenizer's language list; </s> = 3), through the encoder module with no padding."""
    import sentencepiece as spm

    encoder, tok = toy_sonar
    sp = spm.SentencePieceProcessor(model_file=tok.model_path)
    tag = sp.GetPieceSize() + 1 + list(TOY_LANGS).index("eng_Latn")
    with torch.no_grad():
        return torch.stack([encoder(torch.tensor([[tag, *(p + 1 for p in sp.Encode(s)), 3]]))[0].float()
                            for s in sents])


def _punkt_split(text):
    import nltk

    return [s.strip() for s in nltk.sent_tokenize(text) if s.strip()]


def _write_layout(root, layout):
    root.mkdir()
    if layout == "parquet":
        import datasets

        (root / "data").mkdir()
        datasets.Dataset.from_dict({"text": TRAIN}).to_parquet(str(root / "data" / "train-00000-of-00001-abc.parquet"))
        datasets.Dataset.from_dict({"text": VALID}).to_parquet(str(root / "data" / "validation-00000-of-00001-def.parquet"))
    elif layout == "txt":
        (root / "TinyStoriesV2-GPT4-train.txt").write_text("\n<|endoftext|>\n".join(t for t in TRAIN if t) + "\n<|endoftext|>\n")
        (root / "TinyStoriesV2-GPT4-valid.txt").write_text("\n<|endoftext|>\n".join(t for t in VALID if t) + "\n")
    else:  # the all_data archive (train only) + the valid text file
        (root / "TinyStories_all_data").mkdir()
        half = len(TRAIN) // 2
        for k, part in enumerate((TRAIN[:half], TRAIN[half:])):
            items = [{"story": t, "instruction": {"prompt:": "x"}, "summary": "s", "source": "GPT-4"} for t in part]
            (root / "TinyStories_all_data" / f"data{k:02d}.json").write_text(json.dumps(items))
        (root / "TinyStories-valid.txt").write_text("<|endoftext|>".join(VALID))


def _check(out, toy_sonar, split_fn, holdout):
    train = [t for t in TRAIN if t]
    valid = [t for t in VALID if t]
    assert [json.loads(x)["text"] for x in (out / "prompts.jsonl").read_text().splitlines()] == valid[:-holdout]
    for split, stories in (("train", train), ("valid", valid[-holdout:])):
        ds = ShardedDataset(out / split)
        expect = [split_fn(s)[:32] for s in stories]
        expect = [e + [EOD] for e in expect if e]
        assert ds.num_docs == len(expect), split
        for i, sents in enumerate(expect):
            emb, _, _ = ds.doc(i)
            ref = _reference_embeddings(toy_sonar, sents)
            assert emb.shape == ref.shape, (split, i)
            torch.testing.assert_close(emb.float(), ref, atol=2e-3, rtol=2e-3)  # fp16 storage


@pytest.mark.parametrize("layout", ["parquet", "txt", "json"])
def test_layouts_with_punkt(tmp_path, codec, toy_sonar, tiny_punkt, layout):
    _write_layout(tmp_path / "ts", layout)
    out = tmp_path / "out"
    logs = []
    cfg = T.TinyStoriesConfig(out=str(out), data_dir=str(tmp_path / "ts"), validation_holdout=2, shard_size_docs=2)
    summary = T.prepare_tinystories(cfg, codec, log=logs.append)
    assert summary["segmenter"].startswith("nltk-punkt") and any("NLTK Punkt" in m for m in logs)
    _check(out, toy_sonar, _punkt_split, holdout=2)
    ds = ShardedDataset(out / "train")
    assert ds.manifest["config"]["segmenter"].startswith("nltk-punkt")
    assert max(ds.doc_lengths()[0]) == 33  # the 40-sentence story: 32 sentences + EOS
    # Punkt, not blingfire: "Mrs." ends a sentence for the tiny Punkt model, so the 5-sentence story has 6
    assert ds.doc_lengths()[0][1] == 6 + 1
    assert json.loads((out / "tinystories.json").read_text())["sources"]["source"] in ("parquet", "txt", "json+txt")


def test_blingfire_fallback_and_resume(tmp_path, codec, toy_sonar, no_nltk_data):
    _write_layout(tmp_path / "ts", "txt")
    out = tmp_path / "out"
    logs = []
    cfg = T.TinyStoriesConfig(out=str(out), data_dir=str(tmp_path / "ts"), validation_holdout=3, shard_size_docs=2)
    summary = T.prepare_tinystories(cfg, codec, log=logs.append)
    assert summary["segmenter"].startswith("blingfire")
    assert any("blingfire, NOT the public code's Punkt" in m and "punkt_tab" in m for m in logs)
    from sonar_llm.data.segment import split_sentences

    _check(out, toy_sonar, split_sentences, holdout=3)
    before = {p: p.read_bytes() for p in sorted((out / "train").rglob("*")) if p.is_file()}
    logs.clear()
    T.prepare_tinystories(cfg, codec, log=logs.append)  # a re-run reuses the stories and the shards
    assert any("reusing the stories" in m for m in logs) and any("already complete" in m for m in logs)
    assert {p: p.read_bytes() for p in sorted((out / "train").rglob("*")) if p.is_file()} == before
    with pytest.raises(ValueError, match="other sources"):
        T.prepare_tinystories(T.TinyStoriesConfig(out=str(out), data_dir=str(tmp_path / "ts"), validation_holdout=1),
                              codec, log=None)
    with pytest.raises(LookupError, match="punkt_tab"):
        T.make_segmenter("punkt")


def test_online_path_through_datasets(tmp_path, codec, toy_sonar, tiny_punkt, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, *a, **k):
        calls.append(name)
        return datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TRAIN}),
                                     "validation": datasets.Dataset.from_dict({"text": VALID})})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "out"
    T.prepare_tinystories(T.TinyStoriesConfig(out=str(out), validation_holdout=2), codec, log=None)
    assert calls == ["roneneldan/TinyStories"]
    _check(out, toy_sonar, _punkt_split, holdout=2)


def test_explicit_files_cli_and_errors(tmp_path, codec, tiny_punkt, monkeypatch):
    _write_layout(tmp_path / "ts", "txt")
    ts = tmp_path / "ts"
    monkeypatch.setattr(T, "_load_factory", lambda spec: (lambda: codec))
    out = tmp_path / "out"
    rc = T.main(["--out", str(out), "--train", str(ts / "TinyStoriesV2-GPT4-train.txt"), "--validation",
                 str(ts / "TinyStoriesV2-GPT4-valid.txt"), "--validation-holdout", "2", "--max-train-stories", "3",
                 "--codec-factory", "x:y"])
    assert rc == 0 and ShardedDataset(out / "train").num_docs == 3
    assert T.main(["--out", str(tmp_path / "o2"), "--data-dir", str(tmp_path / "nothing"), "--codec-factory", "x:y"]) == 2
    assert T.main(["--out", str(tmp_path / "o3"), "--train", "a.txt", "--codec-factory", "x:y"]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"story": "not a list"}))
    with pytest.raises(ValueError, match="JSON list"):
        list(T.read_story_file(bad))
    other = tmp_path / "x.csv"
    other.write_text("a")
    with pytest.raises(ValueError, match="unknown TinyStories file type"):
        list(T.read_story_file(other))


def test_summary_counts_log_and_small_validation_warning(tmp_path, codec, tiny_punkt, monkeypatch, capsys):
    """Issue 27: the summary's num_docs / num_sentences are the shards' (were always None), the log says
    'reading the given files' (was 'files files'), and a validation split no larger than the hold-out warns
    that prompts.jsonl gets no prompt."""
    _write_layout(tmp_path / "ts", "txt")
    ts = tmp_path / "ts"
    monkeypatch.setattr(T, "_load_factory", lambda spec: (lambda: codec))
    out = tmp_path / "out"
    files = ["--train", str(ts / "TinyStoriesV2-GPT4-train.txt"), "--validation", str(ts / "TinyStoriesV2-GPT4-valid.txt")]
    assert T.main(["--out", str(out), *files, "--validation-holdout", "2", "--codec-factory", "x:y"]) == 0
    err = capsys.readouterr().err
    assert "reading the given files" in err and "files files" not in err and "warning" not in err
    summary = json.loads((out / "tinystories.json").read_text())
    for split in ("train", "valid"):
        ds = ShardedDataset(out / split)
        assert summary["splits"][split]["num_docs"] == ds.num_docs > 0
        assert summary["splits"][split]["num_sentences"] == ds.num_sentences > ds.num_docs
    n_valid = len([t for t in VALID if t])
    small = tmp_path / "small"
    assert T.main(["--out", str(small), *files, "--validation-holdout", str(n_valid), "--codec-factory", "x:y"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1 and f"has {n_valid} stories" in warnings[0] and "prompts.jsonl" in warnings[0]
    assert (small / "prompts.jsonl").read_text() == ""


def test_every_flag_has_help():
    actions = [a for a in T._parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 15
    assert [a.option_strings[0] for a in actions if not a.help] == []


def test_sonar_falls_back_to_the_cached_tiny_sonar(tmp_path, monkeypatch):
    """No --encoder/--tokenizer and nothing registered: the cached tiny SONAR, as the other commands."""
    from sonar_llm.sonar import registry, train_tiny

    tiny = train_tiny.TinySonarPaths.in_dir(tmp_path / "tiny")

    def unregistered(name, path=None, **kw):
        if path:
            return tmp_path / path
        raise FileNotFoundError(f"cannot find the SONAR {name} file")

    monkeypatch.setattr(registry, "resolve_asset", unregistered)
    monkeypatch.setattr(train_tiny, "ensure_tiny_sonar", lambda: tiny)
    said = []
    assert T._sonar_paths(None, None, said.append) == (tiny.encoder, tiny.tokenizer)
    assert "tiny SONAR" in said[0]
    assert T._sonar_paths("enc.pt", None, said.append) == (tmp_path / "enc.pt", tiny.tokenizer)
