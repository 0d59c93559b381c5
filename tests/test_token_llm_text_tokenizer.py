"""The token LLM with a user's tokenizer (the paper's token baseline format): whole stories [BOS] ... [EOS].

A byte-level BPE is trained with the `tokenizers` library (and a SentencePiece model with `sentencepiece`) on
the project's embedded story corpus in a temporary folder. Checked: the ids `preprocess_tokens` stores equal
the libraries' own whole-document ids (the BPE's TemplateProcessing "<s> $A </s>" post-processor; spm's
add_bos/add_eos) on 500 stories; a token LLM trains a few steps on them through the trainer, is reloaded
from its run directory and generates through `python -m sonar_llm.generate`; a wrong or missing tokenizer is
named; the public-recipe configs load with the values the public train_llm.py uses.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from sonar_llm.data.preprocess_tokens import main as preprocess_main  # noqa: E402
from sonar_llm.data.shards import ShardedDataset  # noqa: E402
from sonar_llm.sonar.story_corpus import generate_stories, write_corpus  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _train_bpe(texts: list[str], path: Path, vocab: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    # the library's own document format, the reference: <s> text </s>
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>")),
                                                                       ("</s>", tok.token_to_id("</s>"))])
    tok.save(str(path))
    return path


def _train_spm(texts: list[str], directory: Path, vocab: int = 300) -> Path:
    import sentencepiece as spm

    (directory / "spm_corpus.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(directory / "spm_corpus.txt"), model_prefix=str(directory / "story"),
                                   vocab_size=vocab, model_type="bpe", character_coverage=1.0, unk_id=0,
                                   bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2)
    return directory / "story.model"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_tok")
    stories = generate_stories(560, seed=7)
    train, held = stories[:500], stories[500:]
    write_corpus(root / "train.jsonl", train)
    write_corpus(root / "valid.jsonl", held)
    return {"root": root, "train": train, "valid": held, "bpe": _train_bpe(train, root / "tokenizer.json"),
            "spm": _train_spm(train, root)}


def _stored_docs(path: Path) -> list[list[int]]:
    ds = ShardedDataset(path)
    return [np.asarray(ds.doc(i)[1]).tolist() for i in range(ds.num_docs)]


def test_bpe_ids_equal_the_tokenizers_library_on_500_stories(corpus):
    from tokenizers import Tokenizer

    out = corpus["root"] / "bpe_train"
    assert preprocess_main(["--input", str(corpus["root"] / "train.jsonl"), "--output", str(out),
                            "--tokenizer", str(corpus["bpe"]), "--shard-size-docs", "200"]) == 0
    ref = Tokenizer.from_file(str(corpus["bpe"]))
    got = _stored_docs(out)
    assert len(got) == 500
    for text, ids in zip(corpus["train"], got):
        assert ids == ref.encode(text).ids  # <s> ... </s> by the library's post-processor
        assert ref.decode(ids, skip_special_tokens=True) == text  # and they are the whole story
    manifest = json.loads((out / "manifest.json").read_text())
    stream = manifest["config"]["token_stream"]
    assert stream["format"] == "whole_document" and stream["vocab_size"] == ref.get_vocab_size()
    assert (stream["bos_id"], stream["eos_id"]) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))


def test_sentencepiece_ids_equal_the_library(corpus):
    import sentencepiece as spm

    out = corpus["root"] / "spm_train"
    assert preprocess_main(["--input", str(corpus["root"] / "train.jsonl"), "--output", str(out),
                            "--tokenizer", str(corpus["spm"]), "--max-tokens", "60"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(corpus["spm"]))
    got = _stored_docs(out)
    # the public block_size cut: the first max_tokens ids of [BOS] + ids + [EOS]
    assert got == [sp.encode(t, add_bos=True, add_eos=True)[:60] for t in corpus["train"]]


def test_preprocess_errors_are_one_line(corpus, tmp_path, capsys):
    inp = str(corpus["root"] / "valid.jsonl")
    assert preprocess_main(["--input", inp, "--output", str(tmp_path / "a"), "--tokenizer",
                            str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "missing.json" in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert preprocess_main(["--input", inp, "--output", str(tmp_path / "b"), "--tokenizer", str(bad)]) == 2
    assert "bad.json" in capsys.readouterr().err
    assert preprocess_main(["--input", inp, "--output", str(tmp_path / "c"), "--tokenizer", str(corpus["bpe"]),
                            "--bos-token", "<nope>"]) == 2
    assert "<nope>" in capsys.readouterr().err
    assert preprocess_main(["--input", inp, "--output", str(tmp_path / "d"), "--tokenizer", str(corpus["bpe"]),
                            "--max-tokens", "1"]) == 2
    assert "max-tokens" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "d").exists()


def test_missing_tokenizers_library_is_one_line(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as if not installed
    assert preprocess_main(["--input", str(corpus["root"] / "valid.jsonl"), "--output", str(tmp_path / "e"),
                            "--tokenizer", str(corpus["bpe"])]) == 2
    err = capsys.readouterr().err.strip()
    assert "sonar-llm[tokenizers]" in err and len(err.splitlines()) == 1 and not (tmp_path / "e").exists()


def _train(corpus, tmp_path, tokenizer: Path, data: Path, steps: int = 3):
    from sonar_train.config import load_config
    from sonar_train.loop import run_training

    cfg = load_config(None, [
        "--model.family=token_llm", "--model.preset=tiny", f'--model.overrides.text_tokenizer="{tokenizer}"',
        f"--data.path={data}", f"--data.val_path={data}", "--data.max_docs=4", "--data.max_sentences=4",
        "--data.max_tokens=4096", f"--train.steps={steps}", "--train.precision=fp32", "--train.log_every=1",
        f"--train.eval_every={steps}", "--train.eval_batches=1", f"--train.out_dir={tmp_path / 'run'}",
        "--optim.lr=3e-3", "--optim.warmup_steps=1"])
    return cfg, run_training(cfg)


def test_trains_reloads_and_generates(corpus, tmp_path, capsys, monkeypatch):
    from sonar_llm import generate as G
    from sonar_llm.eval.evaluate import load_trained

    data = corpus["root"] / "bpe_gen"
    assert preprocess_main(["--input", str(corpus["root"] / "train.jsonl"), "--output", str(data),
                            "--tokenizer", str(corpus["bpe"])]) == 0
    cfg, res = _train(corpus, tmp_path, corpus["bpe"], data, steps=4)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x).get("kind") == "train"]
    assert res["step"] == 4 and all(np.isfinite(losses)) and np.isfinite(res["eval_loss"])
    # a uniform model over V ids starts near log V per token
    assert abs(losses[0] - np.log(400)) < 0.5
    loaded = load_trained(run=str(tmp_path / "run"))
    assert loaded.model.cfg.whole_documents and loaded.model.vocab_size == 400
    # the scaling command's reading of a run: non-embedding parameters = the blocks', the final validation loss
    from sonar_llm.eval.scaling import points_from_runs

    (pt,) = points_from_runs([tmp_path / "run"])
    blocks = sum(p.numel() for layer in loaded.model.backbone.layers for p in layer.parameters())
    assert pt == {"family": "token_llm", "params": blocks, "value": pytest.approx(res["eval_loss"]),
                  "source": str(tmp_path / "run")}
    # generation through the command, with no SONAR: resolving or loading one fails here (nothing may fall back
    # to training a tiny SONAR either); the prompt goes through the BPE
    import sonar_llm.eval.evaluate as EV

    def no_sonar(*a, **k):
        raise AssertionError("a SONAR was asked for")

    monkeypatch.setattr(EV, "resolve_sonar_assets", no_sonar)
    monkeypatch.setattr(EV, "load_sonar_text", no_sonar)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": corpus["valid"][0].split(". ")[0] + "."}) + "\n")
    out = tmp_path / "gen.jsonl"
    rc = G.main(["--run", str(tmp_path / "run"), "--prompts", str(prompts), "--out", str(out),
                 "--max-sentences", "4", "--beam", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rec = json.loads(out.read_text().splitlines()[0])
    assert rec["family"] == "token_llm" and len(rec["sentences"]) <= 4
    assert all(isinstance(t, str) and t for t in rec["sentences"])


def test_wrong_tokenizer_for_the_data_is_named(corpus, tmp_path):
    data = corpus["root"] / "bpe_wrong"
    assert preprocess_main(["--input", str(corpus["root"] / "valid.jsonl"), "--output", str(data),
                            "--tokenizer", str(corpus["bpe"])]) == 0
    with pytest.raises(ValueError, match="is not the tokenizer"):
        _train(corpus, tmp_path, corpus["spm"], data, steps=1)


@pytest.mark.parametrize("size", ["100m", "300m", "600m", "900m"])
def test_public_token_configs_load(size):
    from sonar_llm.models.presets import backbone_config
    from sonar_train.config import load_config

    cfg = load_config(str(ROOT / "configs" / "public" / f"token_llm_{size}.toml"), [], check_paths=False,
                      check_model=False)  # the data and the Llama-3 tokenizer are not here
    assert cfg.model.family == "token_llm" and cfg.model.preset == size.upper()
    assert cfg.model.overrides["text_tokenizer"].endswith("tokenizer.json")
    # train_llm.py: AdamW(lr=5e-4, eps=1e-5) with torch's defaults, constant schedule after 820 warm-up
    # steps, clip 1.0, 4 epochs, block_size 2048, fp16 autocast
    o = cfg.optim
    assert (o.lr, o.eps, o.weight_decay, o.betas, o.warmup_steps, o.min_lr_ratio, o.grad_clip) == \
        (5e-4, 1e-5, 0.01, [0.9, 0.999], 820, 1.0, 1.0)
    assert o.decay_all_params and cfg.train.precision == "fp16"
    assert cfg.data.max_docs * cfg.train.grad_accum * 8 == 512 and cfg.data.max_tokens >= 2048 * cfg.data.max_docs
    # the same Llama shapes as SonarLLM_{size}.json (tied embeddings: the public LlamaConfig)
    bb = backbone_config(cfg.model.preset)
    public = {"100m": (512, 2048, 8, 16), "300m": (1024, 4096, 10, 16), "600m": (1280, 5120, 16, 26),
              "900m": (1536, 6144, 17, 32)}[size]
    assert (bb.model_dim, bb.ffn_dim, bb.num_layers, bb.num_heads) == public


def test_trainer_end_sentence_check_skips_whole_document_data(corpus, tmp_path):
    """The trainer's end-sentence round trip (a SONAR configured) has nothing to check in whole-story token shards
    (no end sentence, no embeddings) and must not fail on them."""
    import torch

    from fixtures_sonar import toy_decoder, toy_tokenizer
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
    from sonar_train.config import RunConfig
    from sonar_train.end_sentence import warn_if_end_sentence_lost

    data = tmp_path / "held"
    assert preprocess_main(["--input", str(corpus["root"] / "valid.jsonl"), "--output", str(data),
                            "--tokenizer", str(corpus["bpe"])]) == 0
    tok = toy_tokenizer(tmp_path / "spm")
    save_fairseq2_checkpoint(toy_decoder(vocab_size=tok.vocab_size, lang_offset=tok.lang_offset), tmp_path / "dec.pt")
    cfg = RunConfig()
    cfg.data.path, cfg.sonar.decoder = str(data), str(tmp_path / "dec.pt")
    assert warn_if_end_sentence_lost(torch.nn.Linear(1, 1), cfg, warn=lambda m: None, tokenizer=tok) is None
