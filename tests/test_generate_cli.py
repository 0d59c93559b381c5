"""`python -m sonar_llm.generate` end to end, for every family, from exported models of the embedded default run.

Setup (once per module): a toy SONAR (tests/fixtures_sonar.py: random encoder/decoder, a tiny SentencePiece
model with every NLLB language tag), the project's story corpus encoded into shards by the data package's
`preprocess`, each family trained 2 steps by `train.loop.run_training` from configs/default.toml (the embedded
default run's config; only the family, the tiny preset, the data/SONAR paths and the step count overridden)
and exported by train/export.py. The command is then called in-process through `main()`.

What is checked: the records (fields, limits, stop reasons, the decoding actually run); the SONAR-LLM
continuation against the public code's loop run by hand with the same decoder settings; streaming output ==
the record; batched prompts of mixed lengths == one prompt per batch (Two-Tower with noise: per-prompt seeds);
stdin and file prompts; sampling flags reach the decoder and repeat under a seed; `--target-lang`: the
decoder's input starts with `</s>` and the requested tag, which the tokenizer knows; errors exit 2 naming
the problem.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from fixtures_sonar import toy_decoder, toy_encoder, toy_tokenizer

from sonar_llm import generate as G

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["sonar_llm", "base_lcm", "two_tower", "token_llm"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Toy SONAR + shards of the story corpus + each family trained 2 steps with configs/default.toml, exported."""
    from sonar_llm.data.preprocess import load_sonar_codec, preprocess
    from sonar_llm.sonar import NllbTokenizer
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
    from sonar_llm.sonar.story_corpus import generate_stories, write_corpus
    from sonar_train.config import load_config
    from sonar_train.export import export
    from sonar_train.loop import run_training

    root = tmp_path_factory.mktemp("gen_cli")
    toy_tokenizer(root / "spm")
    spm = next((root / "spm").glob("*.model"))
    tok = NllbTokenizer(spm)  # every NLLB language, as the commands load it
    kw = dict(vocab_size=tok.vocab_size, lang_offset=tok.lang_offset)
    save_fairseq2_checkpoint(toy_encoder(seed=1, **kw), root / "enc.pt")
    save_fairseq2_checkpoint(toy_decoder(seed=2, std=0.5, **kw), root / "dec.pt")
    write_corpus(root / "corpus.jsonl", generate_stories(24, seed=0))
    codec = load_sonar_codec(root / "enc.pt", spm)
    preprocess(root / "corpus.jsonl", root / "shards", codec, shard_size_docs=100, log=None, rank=0, world_size=1)
    models = {}
    for family in FAMILIES:
        run_dir = root / f"run_{family}"
        cfg = load_config(str(ROOT / "configs" / "default.toml"), [
            f"--model.family={family}", "--model.preset=tiny", f"--data.path={root / 'shards'}",
            f"--data.val_path={root / 'shards'}", "--data.max_sentences=64", "--data.max_tokens=2048",
            "--train.steps=2", "--train.precision=fp32", "--train.eval_every=2", "--train.eval_batches=1",
            "--train.checkpoint_every=2", "--train.log_every=1", "--train.peak_flops=1e9",
            f"--train.out_dir={run_dir}", f"--sonar.decoder={root / 'dec.pt'}",
            f"--sonar.encoder={root / 'enc.pt'}", f"--sonar.tokenizer={spm}"])
        run_training(cfg)
        models[family] = export(run_dir, root / f"{family}.safetensors")
    return {"root": root, "models": models, "tok": tok, "spm": spm}


PROMPTS = ["Tom had a red ball. He liked to play with it in the garden.",
           "The sun was warm.",
           "Mia found a small cat. The cat was hungry. She gave it some milk. Then they played."]


def _run(argv, stdin=None) -> int:
    return G.main([str(a) for a in argv], stdin=stdin)


def _common(default_run, family, *extra):
    return ["--model", default_run["models"][family], "--beam", "1", "--max-gen-len", "8", "--max-sentences", "3",
            "--steps", "3", "--max-new-tokens", "40", *extra]


def _records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.mark.parametrize("family", FAMILIES)
def test_command_writes_records_for_every_family(default_run, tmp_path, family):
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, family), "--prompt", PROMPTS[0], "--out", out]) == 0
    (rec,) = _records(out)
    assert rec["family"] == family and rec["step"] == 2 and rec["prompt"] == PROMPTS[0]
    assert rec["prompt_sentences"] == ["Tom had a red ball.", "He liked to play with it in the garden."]
    assert len(rec["sentences"]) <= 3 and all(isinstance(s, str) for s in rec["sentences"])
    assert rec["continuation"] == " ".join(rec["sentences"])
    assert rec["timings"]["batch_seconds"] > 0 and rec["timings"]["batch_size"] == 1
    if family == "token_llm":
        assert rec["decoding"] is None and rec["stop_reason"] in ("end", "token_cap", "sentence_cap")
    else:
        assert rec["stop_reason"] in ("end", "sentence_cap")
        assert rec["stop_reason"] == "sentence_cap" or len(rec["sentences"]) < 3
        d = rec["decoding"]
        assert (d["strategy"], d["beam_size"], d["max_gen_len"], d["max_seq_len"]) == ("greedy", 1, 8, 256)
        assert d["max_new_tokens"] == 8 and d["width"] == 32 and rec["target_lang"] == "eng_Latn"


def test_run_directory_reads_like_its_export(default_run, tmp_path):
    """--run RUN_DIR (the latest checkpoint, SONAR paths from the run config) == --model of its export."""
    outs = []
    for src in (["--model", default_run["models"]["base_lcm"]], ["--run", default_run["root"] / "run_base_lcm"]):
        out = tmp_path / f"{src[0][2:]}.jsonl"
        argv = [*_common(default_run, "base_lcm"), "--prompt", PROMPTS[2], "--out", out]
        argv[:2] = src
        assert _run(argv) == 0
        outs.append(_records(out)[0])
    assert outs[0]["sentences"] == outs[1]["sentences"] and outs[1]["step"] == 2
    assert outs[0]["decoding"] == outs[1]["decoding"]


def test_sonar_llm_continuation_equals_the_public_loop_by_hand(default_run, tmp_path):
    """Independent path: the public code's loop (no KV cache, one story) with the same decoder settings."""
    from sonar_llm.eval.evaluate import load_sonar_text, resolve_sonar_assets
    from sonar_llm.checkpoints import read_exported
    from sonar_llm.data.segment import split_sentences
    from sonar_llm.models.build import build_trained
    from sonar_llm.sonar.generation import GenerationConfig

    root = default_run["root"]
    out = tmp_path / "gen.jsonl"
    path = default_run["models"]["sonar_llm"]
    assert _run([*_common(default_run, "sonar_llm"), "--max-sentences", "4", "--eos-threshold", "0.999",
                 "--prompt", PROMPTS[2], "--out", out]) == 0
    (rec,) = _records(out)
    t2e, e2t, _ = load_sonar_text(resolve_sonar_assets(str(root / "enc.pt"), str(root / "dec.pt"),
                                                       str(default_run["spm"])))
    model = build_trained(read_exported(path), decoder=str(root / "dec.pt"))
    cfg = GenerationConfig(beam_size=1, max_gen_len=8, max_seq_len=256)
    dec = lambda e: e2t.decode(e, "eng_Latn", cfg=cfg)  # noqa: E731
    enc = lambda t: t2e.encode(t, "eng_Latn")  # noqa: E731
    prompt = split_sentences(PROMPTS[2])
    # the public loop, written here (no library generation helper): run the backbone over every embedding so
    # far (no cache), project, decode, re-encode the text and append it; stop when cos(re-encoded, "End of
    # sequence.") >= threshold (float64 here) or after 4 new sentences
    eos = enc(["End of sequence."])[0].double()
    embs, texts, stopped = enc(prompt), [], False
    model.eval()
    with torch.no_grad():
        while len(texts) < 4:
            hidden = model.backbone.forward_padded(model.embed_inputs(embs)[None])[0, -1:]
            text = list(dec(model.predict_embedding(hidden)))
            again = enc(text)
            v = again[0].double()
            if float(v @ eos) / float(v.norm() * eos.norm()) >= 0.999:
                stopped = True
                break
            texts.append(text[0])
            embs = torch.cat([embs, again.to(embs.dtype)])
    assert texts and rec["sentences"] == texts
    assert rec["stop_reason"] == ("end" if stopped else "sentence_cap")


@pytest.mark.parametrize("family", ["sonar_llm", "two_tower"])
def test_single_prompt_streams_the_sentences_of_the_record(default_run, tmp_path, capsys, family):
    assert _run([*_common(default_run, family), "--prompt", PROMPTS[0]]) == 0
    printed = capsys.readouterr().out.splitlines()
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, family), "--prompt", PROMPTS[0], "--out", out]) == 0
    (rec,) = _records(out)
    assert printed == [PROMPTS[0], *("  " + s for s in rec["sentences"]), f"  [{rec['stop_reason']}]"]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_prompts_of_mixed_lengths_equal_one_at_a_time(default_run, tmp_path, capsys, family):
    """Three prompts of 1-4 sentences in one batch vs one per batch; the Two-Tower samples its noise
    (--noise 0.6, seeds per prompt), so equality needs per-prompt randomness."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join([json.dumps({"prompt": PROMPTS[0]}), json.dumps(PROMPTS[1]), PROMPTS[2]]) + "\n")
    outs = []
    for bs in ("3", "1"):
        out = tmp_path / f"gen_{bs}.jsonl"
        assert _run([*_common(default_run, family), "--prompts", prompts, "--batch-size", bs, "--out", out]) == 0
        outs.append(_records(out))
    err = capsys.readouterr().err
    assert "[generate] 3/3 prompts" in err and "[generate] 1/3 prompts" in err  # progress lines
    batched, single = ({r["prompt_index"]: r for r in rs} for rs in outs)
    assert sorted(batched) == [0, 1, 2]
    for i in range(3):
        assert batched[i]["prompt"] == PROMPTS[i]
        assert batched[i]["sentences"] == single[i]["sentences"]
        assert batched[i]["stop_reason"] == single[i]["stop_reason"]
    assert batched[0]["timings"]["batch_size"] == 3 and single[0]["timings"]["batch_size"] == 1


def test_sampled_sonar_llm_stories_do_not_depend_on_the_batch(default_run, tmp_path):
    """With decoder sampling, each continuation draws its words from its own generator, seeded from (--seed,
    prompt number, sample number): three prompts in one batch give what each gives alone, and the sample numbers
    of one prompt differ. The prompts are one text three times: one batch, one prediction, only the draws differ."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([PROMPTS[0]] * 3) + "\n")
    runs = {}
    for bs in ("3", "1"):
        out = tmp_path / f"gen_{bs}.jsonl"
        argv = [*_common(default_run, "sonar_llm"), "--prompts", prompts, "--batch-size", bs, "--temperature", "5",
                "--seed", "3", "--num-samples", "2", "--eos-threshold", "1", "--out", out]
        argv.remove("--beam"), argv.remove("1")
        assert _run(argv) == 0
        runs[bs] = [(r["prompt_index"], r["sample"], r["sentences"]) for r in _records(out)]
    assert runs["3"] == runs["1"] and len(runs["3"]) == 6
    assert len({tuple(r[2]) for r in runs["3"]}) == 6  # each prompt number and sample number its own draws


def test_samples_of_a_prompt_span_batches_of_batch_size(default_run, tmp_path, capsys):
    """A user trial: all --num-samples of a prompt went into one batch whatever --batch-size (a million samples
    were killed for memory). Now --batch-size continuations per batch, the samples of a prompt spread over
    batches, with the same continuations as in one batch (each draws from its own generator)."""
    runs = {}
    for bs in ("2", "8"):
        out = tmp_path / f"gen_{bs}.jsonl"
        argv = [*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[0], "--num-samples", "5", "--batch-size",
                bs, "--temperature", "5", "--eos-threshold", "1", "--out", out]
        argv.remove("--beam"), argv.remove("1")
        assert _run(argv) == 0
        runs[bs] = _records(out)
    assert [r["timings"]["batch_size"] for r in runs["2"]] == [2, 2, 2, 2, 1]
    assert [r["timings"]["batch_size"] for r in runs["8"]] == [5] * 5
    assert [(r["sample"], r["sentences"]) for r in runs["2"]] == [(r["sample"], r["sentences"]) for r in runs["8"]]
    assert "[generate] 5/5 continuations" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower"])
def test_generator_batches_mixed_lengths_like_single_prompts(default_run, family):
    """The command's Generator: the concepts of a mixed-length batch == those of each prompt alone (the
    toy decoder's texts are too uniform to tell stories apart, the embeddings are not)."""
    root = default_run["root"]
    cfg = G.GenerateConfig(model=str(default_run["models"][family]), prompt="x", beam=1, max_gen_len=8,
                           max_sentences=3, steps=3, eos_threshold=1.1, encoder=str(root / "enc.pt"),
                           decoder=str(root / "dec.pt"), tokenizer=str(default_run["spm"]))
    gen = G.Generator(cfg)
    batched = gen.continue_prompts(PROMPTS)
    assert [c.index for c in batched] == [0, 1, 2] and [len(c.prompt_sentences) for c in batched] == [2, 1, 4]
    for i, text in enumerate(PROMPTS):
        (alone,) = gen.continue_prompts([text], indices=[i])
        assert alone.sentences == batched[i].sentences and alone.embeddings.shape == (3, 32)
        torch.testing.assert_close(alone.embeddings, batched[i].embeddings, rtol=0, atol=1e-5)
    if family != "sonar_llm":  # SONAR-LLM appends re-encodings of the (uniform) decoded texts
        assert not torch.allclose(batched[0].embeddings, batched[2].embeddings, atol=1e-3)


def test_two_tower_samples_and_seeds(default_run, tmp_path):
    """--num-samples gives different continuations (the Two-Tower's noise); the same --seed repeats them."""
    runs = []
    for seed in ("1", "1", "2"):
        out = tmp_path / f"s{len(runs)}.jsonl"
        assert _run([*_common(default_run, "two_tower"), "--prompt", PROMPTS[1], "--num-samples", "2",
                     "--seed", seed, "--out", out, "--eos-threshold", "1"]) == 0
        runs.append(_records(out))
    assert [r["sample"] for r in runs[0]] == [0, 1]
    assert runs[0] == [dict(r, timings=a["timings"]) for r, a in zip(runs[1], runs[0])]
    texts = [[r["sentences"] for r in rs] for rs in runs]
    assert texts[0][0] != texts[0][1] or texts[0] != texts[2]  # noise differs across samples or seeds


def test_stdin_prompts_and_sampling_flags_reach_the_decoder(default_run, tmp_path):
    out = tmp_path / "gen.jsonl"
    stdin = io.StringIO(json.dumps({"text": PROMPTS[1]}) + "\n\n" + json.dumps({"prompt": PROMPTS[0]}) + "\n")
    argv = [*_common(default_run, "sonar_llm"), "--prompts", "-", "--temperature", "0.7", "--top-k", "5",
            "--top-p", "0.9", "--seed", "3", "--out", out]
    argv.remove("--beam"), argv.remove("1")
    assert _run(argv, stdin=stdin) == 0
    first = _records(out)
    first.sort(key=lambda r: r["prompt_index"])  # written batch by batch, shortest prompts first
    assert [r["prompt"] for r in first] == [PROMPTS[1], PROMPTS[0]]  # the empty line is skipped
    d = first[0]["decoding"]
    assert (d["strategy"], d["temperature"], d["top_k"], d["top_p"], d["seed"], d["do_sample"]) == \
        ("sample", 0.7, 5, 0.9, 3, True)
    stdin = io.StringIO(json.dumps({"text": PROMPTS[1]}) + "\n" + json.dumps({"prompt": PROMPTS[0]}) + "\n")
    assert _run(argv, stdin=stdin) == 0
    again = _records(out)
    again.sort(key=lambda r: r["prompt_index"])
    assert [r["sentences"] for r in again] == [r["sentences"] for r in first]


def test_sampling_flags_change_the_decoding(default_run, tmp_path):
    """The flags act, not only get recorded: at --temperature 5 the seed picks the draw (same seed, same text;
    other seeds, other texts), while --top-k 1 or a tiny --top-p leave only the most likely token: greedy."""
    def sentences(*flags):
        out = tmp_path / "gen.jsonl"
        argv = [*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[2], *flags, "--out", out]
        if flags:
            argv.remove("--beam"), argv.remove("1")
        assert _run(argv) == 0
        return _records(out)[0]["sentences"]

    greedy = sentences()
    hot = [sentences("--temperature", "5", "--seed", str(s)) for s in (1, 1, 2, 3)]
    assert hot[0] == hot[1] and (hot[2] != hot[0] or hot[3] != hot[0])
    assert greedy not in hot
    assert sentences("--temperature", "5", "--top-k", "1", "--seed", "2") == greedy
    assert sentences("--temperature", "5", "--top-p", "1e-9", "--seed", "2") == greedy


def test_target_lang_starts_the_decoder_with_eos_and_the_tag(default_run, tmp_path, monkeypatch):
    """--target-lang fra_Latn: every decoded sentence starts from [</s>, __fra_Latn__] (the tokenizer's id for
    the tag), while the prompt is encoded in --source-lang."""
    from sonar_llm.sonar.decoder import SonarTextDecoder
    from sonar_llm.sonar.encoder import SonarTextEncoder

    tok = default_run["tok"]
    fra = tok.lang_id("fra_Latn")
    assert fra != tok.lang_id("eng_Latn") and fra >= tok.lang_offset
    assert tok.id_to_token(fra) == "__fra_Latn__"
    starts, encoded = [], []
    step = SonarTextDecoder.step

    def spy_step(self, seqs, state):
        starts.append(seqs[:, 0].tolist())
        return step(self, seqs, state)

    forward = SonarTextEncoder.forward

    def spy_forward(self, tokens, padding_mask=None):
        encoded.append(tokens[:, 0].tolist())
        return forward(self, tokens, padding_mask)

    monkeypatch.setattr(SonarTextDecoder, "step", spy_step)
    monkeypatch.setattr(SonarTextEncoder, "forward", spy_forward)
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, "base_lcm"), "--prompt", PROMPTS[0], "--target-lang", "fra_Latn",
                 "--eos-threshold", "1", "--out", out]) == 0
    (rec,) = _records(out)
    assert rec["target_lang"] == "fra_Latn" and len(rec["sentences"]) == 3
    # decode calls: the prefill feeds </s> (3) to every row, the next step the language tag
    assert starts[0] == [3] * len(starts[0]) and starts[1] == [fra] * len(starts[1])
    eng = tok.lang_id("eng_Latn")
    assert all(row == [eng] * len(row) for row in encoded)  # source-mode encoder input starts with the tag


@pytest.mark.parametrize("argv, message", [
    (["--target-lang", "xxx_Latn"], "--target-lang: unknown language 'xxx_Latn'"),
    (["--source-lang", "en"], "--source-lang: unknown language 'en'"),
    (["--beam", "2", "--top-k", "3"], "exclude each other"),
    (["--max-sentences", "0"], "--max-sentences must be >= 1"),
    (["--seed", str(2**64)], "--seed must be in [0, 2^64 - 1]"),  # was said only when sampling, after the load
    (["--noise", "nan"], "--noise must be a finite number >= 0, got nan"),  # a NaN gave empty sentences, exit 0
    (["--guidance", "nan"], "--guidance must be a finite number >= 0"),
    (["--guidance-rescale", "-1"], "--guidance-rescale must be a finite number in [0, 1]"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bad_flags_exit_2_naming_the_problem(default_run, capsys, argv, message):
    assert _run([*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[1], *argv]) == 2
    assert message in capsys.readouterr().err


def test_token_llm_refuses_another_language_and_decoder_options(default_run, capsys, tmp_path):
    assert _run([*_common(default_run, "token_llm"), "--prompt", PROMPTS[1], "--target-lang", "fra_Latn"]) == 2
    assert "only concept models decode into another language" in capsys.readouterr().err
    assert _run([*_common(default_run, "token_llm"), "--prompt", PROMPTS[1], "--sample"]) == 2
    assert "decodes its own tokens greedily" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok."}\n{"prompt": \n')
    assert _run([*_common(default_run, "base_lcm"), "--prompts", bad]) == 2
    assert f"--prompts {bad}:2: not valid JSON" in capsys.readouterr().err


def test_prompt_lines_that_open_with_dialogue_are_plain_text(tmp_path):
    """A user trial: a plain-text prompt opening with a quote ("Hi," said Tom.) was refused as bad JSON. A line
    starting with a quote that is not a JSON string is plain text; a JSON string is still decoded; a line starting
    with { must still be JSON."""
    f = tmp_path / "p.txt"
    f.write_text('"Hi," said Tom. He ran home.\n"Tom had a \\"red\\" ball."\n{"text": "Ann sang."}\nPlain words.\n')
    assert G.read_prompts(str(f)) == ['"Hi," said Tom. He ran home.', 'Tom had a "red" ball.', "Ann sang.",
                                      "Plain words."]
    f.write_text('"Hi," said Tom.\n{"text": "Ann\n')
    with pytest.raises(ValueError, match=f"--prompts {f}:2: not valid JSON"):
        G.read_prompts(str(f))


def test_imported_public_checkpoint_generates(tmp_path):
    """A public SONAR-LLM checkpoint (Pabiya/SONAR-LLM layout, written as its trainer does) imported by
    `python -m sonar_llm.convert`, then continued by the command: its first sentence is the decoding of the
    public model's own prediction (transformers' LlamaForCausalLM, the test-only reference)."""
    pytest.importorskip("transformers")
    from test_public_checkpoint import make_wrapper, save_public

    from sonar_llm import convert
    from sonar_llm.data.segment import split_sentences
    from sonar_llm.sonar import EmbeddingToText, NllbTokenizer, TextToEmbedding
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint
    from sonar_llm.sonar.generation import GenerationConfig

    toy_tokenizer(tmp_path / "spm")
    spm = next((tmp_path / "spm").glob("*.model"))
    tok = NllbTokenizer(spm)
    kw = dict(vocab_size=tok.vocab_size, lang_offset=tok.lang_offset)
    enc, dec = toy_encoder(seed=1, model_dim=1024, **kw), toy_decoder(seed=2, std=0.5, encoder_dim=1024, **kw)
    save_fairseq2_checkpoint(enc, tmp_path / "enc.pt")
    save_fairseq2_checkpoint(dec, tmp_path / "dec.pt")
    w, cfg_json = make_wrapper("width_eq_hidden")
    save_public(w, tmp_path / "checkpoint_step_7.pt")
    (tmp_path / "SonarLLM.json").write_text(json.dumps(cfg_json))
    model = tmp_path / "model.safetensors"
    assert convert.main(["--from", "public", "--checkpoint", str(tmp_path / "checkpoint_step_7.pt"),
                         "--config", str(tmp_path / "SonarLLM.json"), "--out", str(model)]) == 0
    out = tmp_path / "gen.jsonl"
    assert _run(["--model", model, "--prompt", PROMPTS[0], "--encoder", tmp_path / "enc.pt", "--decoder",
                 tmp_path / "dec.pt", "--tokenizer", spm, "--beam", "1", "--max-gen-len", "8", "--max-sentences", "2",
                 "--eos-threshold", "1", "--out", out]) == 0
    (rec,) = _records(out)
    assert rec["family"] == "sonar_llm" and rec["step"] == 7 and len(rec["sentences"]) == 2
    prompt = TextToEmbedding(enc, tok).encode(split_sentences(PROMPTS[0]), "eng_Latn")
    first = w.predict(prompt)[-1:]
    cfg = GenerationConfig(beam_size=1, max_gen_len=8, max_seq_len=256)
    assert rec["sentences"][0] == EmbeddingToText(dec, tok).decode(first, "eng_Latn", cfg=cfg)[0]


def test_samples_of_one_prompt_are_decoded_apart(default_run, tmp_path):
    """--num-samples 2 with decoder sampling: both continuations start from the same prediction, yet each gets
    its own draw (a cache of decodings must not merge equal embeddings)."""
    out = tmp_path / "gen.jsonl"
    argv = [*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[1], "--num-samples", "2", "--temperature", "5",
            "--eos-threshold", "1", "--out", out]
    argv.remove("--beam"), argv.remove("1")
    assert _run(argv) == 0
    a, b = _records(out)
    assert (a["sample"], b["sample"]) == (0, 1) and a["sentences"][0] != b["sentences"][0]


def test_streamed_texts_are_the_returned_ones_and_equal_rows_decode_apart():
    draws = iter(range(1000))

    def decode(emb):  # a "sampling" decoder: every row a new text
        return [f"t{next(draws)}" for _ in range(emb.shape[0])]

    st = G._StreamedTexts(decode)
    e = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
    assert st(e) == ["t0", "t1", "t2"]  # equal rows, each its own decoding; nothing queued: nothing reused
    assert st.decode_new(e[:2]) == ["t3", "t4"]  # streamed
    assert st(e) == ["t3", "t4", "t5"]  # the streamed texts come back, in order; the rest is decoded
    assert st(e[:1]) == ["t6"]  # each streamed text is used once


def test_out_in_input_order_and_summary_counts_samples(default_run, tmp_path):
    """Issue 27: --out came in batch (length-sorted) order; now prompt, then sample, as given. The decoding
    summary said num_samples 1 under --num-samples 2; it counts the continuations per prompt."""
    src = tmp_path / "prompts.jsonl"
    src.write_text("\n".join(json.dumps({"prompt": p}) for p in PROMPTS) + "\n")  # lengths: middle, short, long
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, "base_lcm"), "--prompts", src, "--num-samples", "2", "--batch-size", "2",
                 "--out", out]) == 0
    recs = _records(out)
    assert [(r["prompt_index"], r["sample"]) for r in recs] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert [r["prompt"] for r in recs[::2]] == PROMPTS and all(r["decoding"]["num_samples"] == 2 for r in recs)


def test_warning_for_a_target_language_the_sonar_never_learned(default_run, tmp_path, capsys):
    """The tiny SONAR knows every language tag but learned English only (its tiny_sonar.json records the
    language): --target-lang fra_Latn warns once on stderr and still runs; English does not warn; a SONAR
    whose files record no languages (a released one) never warns."""
    import shutil

    tiny = tmp_path / "tiny"
    tiny.mkdir()
    shutil.copy(default_run["root"] / "dec.pt", tiny / "tiny_sonar_decoder.pt")
    (tiny / "tiny_sonar.json").write_text(json.dumps({"tokenizer": {"lang": "eng_Latn"}}))
    base = [*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[1], "--max-sentences", "1"]
    for decoder, lang, warned in ((tiny / "tiny_sonar_decoder.pt", "fra_Latn", True),
                                  (tiny / "tiny_sonar_decoder.pt", "eng_Latn", False),
                                  (default_run["root"] / "dec.pt", "fra_Latn", False)):
        assert _run([*base, "--decoder", decoder, "--target-lang", lang, "--out", tmp_path / "o.jsonl"]) == 0
        warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning")]
        assert warnings == ([f"warning: --target-lang fra_Latn: this SONAR ({decoder}) was trained on eng_Latn "
                             "only; its tokenizer knows the tag, but expect no fra_Latn text"] if warned else [])


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower"])
def test_stop_on_repetition_reaches_every_concept_family(default_run, tmp_path, family):
    """--stop-on-repetition (Meta's stop_on_repetition_cosine_threshold): at cosine -1 every new concept 'repeats'
    the one before it, so SONAR-LLM stops on its first and the LCMs on their second (Meta's minimum length);
    the repeated concept is not kept and the record says why."""
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, family), "--prompt", PROMPTS[0], "--out", out,
                 "--stop-on-repetition", "-1"]) == 0
    (rec,) = _records(out)
    assert rec["stop_reason"] == "repetition" and len(rec["sentences"]) == (0 if family == "sonar_llm" else 1)


def test_a_beam_search_header_shows_no_unused_decoder_seed(default_run, tmp_path):
    """Beam search draws nothing: the decoding record must not carry the decoder's `"seed": null` (read by a new
    user as --seed being ignored); the command's --seed stays in the record."""
    out = tmp_path / "gen.jsonl"
    assert _run([*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[0], "--seed", "4", "--out", out]) == 0
    rec = _records(out)[0]
    assert rec["decoding"]["strategy"] != "sample" and "seed" not in rec["decoding"] and rec["seed"] == 4


def test_sampling_leaves_the_end_to_the_greedy_reading(default_run, tmp_path, monkeypatch):
    """Sampled SONAR-LLM continuations end where the decoder says a prediction's greedy reading is the end
    sentence (EmbeddingToText.reads_as, under the command's decoding; tested against greedy decoding in
    test_sonar_pipeline.py), whatever the draw; beam search and greedy decoding are not asked."""
    import sonar_llm.sonar.pipeline as P

    asked = []

    def reads_as(self, embeddings, text, lang=None, *, cfg=None):
        asked.append((text, lang, cfg.do_sample, cfg.top_p))
        return torch.ones(embeddings.shape[0], dtype=torch.bool)

    monkeypatch.setattr(P.EmbeddingToText, "reads_as", reads_as)
    out = tmp_path / "gen.jsonl"
    argv = [*_common(default_run, "sonar_llm"), "--prompt", PROMPTS[0], "--eos-threshold", "1", "--out", out]
    assert _run(argv) == 0
    assert _records(out)[0]["stop_reason"] == "sentence_cap" and not asked
    argv.remove("--beam"), argv.remove("1")
    assert _run([*argv, "--top-p", "0.9"]) == 0
    (rec,) = _records(out)
    assert (rec["sentences"], rec["stop_reason"]) == ([], "end")
    assert asked == [("End of sequence.", "eng_Latn", True, 0.9)]
