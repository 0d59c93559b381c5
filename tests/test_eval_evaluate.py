"""The evaluation command end to end on toy SONAR models, and the shared token NLL against references.

Toy setup: a tiny random SONAR encoder/decoder pair and SentencePiece tokenizer (tests/fixtures_sonar.py),
a few generated stories, and untrained models of every family exported like train/export.py does
(safetensors + model.json with the run config).
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fixtures_sonar import toy_decoder, toy_encoder, toy_tokenizer

from sonar_llm.data.batch import ConceptBatch
from sonar_llm.eval import evaluate as EV
from sonar_llm.eval import metrics as M
from sonar_llm.eval.nll import (NLLConfig, dataset_token_nll, scored_sentence_mask, sonar_llm_token_nll,
                                token_llm_token_nll)

LANG = "eng_Latn"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from sonar_llm.data.stories import generate_story_sentences
    from sonar_llm.sonar.checkpoint import save_fairseq2_checkpoint

    root = tmp_path_factory.mktemp("toy_eval")
    from sonar_llm.sonar import NllbTokenizer

    toy_tokenizer(root / "spm")
    spm_path = next((root / "spm").glob("*.model"))
    tok = NllbTokenizer(spm_path)  # every language, as the command loads it
    kw = dict(vocab_size=tok.vocab_size, lang_offset=tok.lang_offset)
    enc = toy_encoder(seed=1, **kw)
    dec = toy_decoder(seed=2, std=0.5, **kw)
    save_fairseq2_checkpoint(enc, root / "enc.pt")
    save_fairseq2_checkpoint(dec, root / "dec.pt")
    stories = generate_story_sentences(4, seed=3)
    with (root / "stories.jsonl").open("w") as f:
        for s in stories:
            f.write(json.dumps({"text": " ".join(s[:5])}) + "\n")
    return {"root": root, "tok": tok, "enc": enc, "dec": dec, "stories": root / "stories.jsonl",
            "enc_path": root / "enc.pt", "dec_path": root / "dec.pt", "spm": spm_path,
            "dim": enc.cfg.model_dim}


def _export_untrained(toy, family: str, seed: int = 0):
    """Build an untrained `family` through train/sonar_train/families.py and write it like train/export.py."""
    from safetensors.torch import save_file

    import sonar_train.config as tc
    import sonar_train.families as tf

    cfg = tc.RunConfig()
    cfg.model.family = family
    cfg.model.preset = "tiny"
    cfg.sonar.decoder = str(toy["dec_path"])
    cfg.model.overrides = ({"vocab_size": toy["tok"].vocab_size} if family == "token_llm"
                           else {"sonar_dim": toy["dim"]})
    torch.manual_seed(seed)
    model = tf.build_model(cfg)
    if family in ("base_lcm", "two_tower"):  # as when training inferred the width from its data
        del cfg.model.overrides["sonar_dim"]
    if hasattr(model, "normalizer") and family == "base_lcm":  # give the normalizer a non-trivial state
        model.normalizer.center.normal_(0, 0.1)
    path = toy["root"] / f"{family}.safetensors"
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"run_config": cfg.to_dict(), "step": 0, "family": family}))
    return path, model


def _cli(toy, path, out, *extra):
    return EV.main(["--model", str(path), "--stories", str(toy["stories"]), "--out", str(out),
                    "--encoder", str(toy["enc_path"]), "--decoder", str(toy["dec_path"]),
                    "--tokenizer", str(toy["spm"]), "--num-stories", "2", "--max-story-sentences", "6",
                    "--beam-size", "1", "--max-gen-len", "12", *extra])


@pytest.mark.parametrize("family", ["sonar_llm", "base_lcm", "two_tower", "token_llm"])
def test_evaluate_command_end_to_end(toy, tmp_path, capsys, family):
    path, _ = _export_untrained(toy, family)
    out = tmp_path / "res.json"
    rc = _cli(toy, path, out, "--num-inference-steps", "3", "--max-new-tokens", "30")
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["family"] == family and len(res["items"]) == 2
    for it in res["items"]:
        assert len(it["prompt"]) == 2
        assert all(isinstance(s, str) for s in it["generation"])
        assert len(it["prompt"]) + len(it["generation"]) <= 7  # the sentence limit (+1, the public rule)
    hyps = [" ".join(it["generation"]) for it in res["items"]]
    refs = [" ".join(it["reference"]) for it in res["items"]]
    assert res["metrics"]["bleu"] == pytest.approx(M.bleu(hyps, refs), abs=1e-9)
    assert res["metrics"]["rep4"] == pytest.approx(sum(M.repetition_n(h, 4) for h in hyps) / 2, abs=1e-12)
    if family != "token_llm" and any(it["generation"] for it in res["items"]):
        assert 0.0 <= res["metrics"]["round_trip_l2"] and -1.0 <= res["metrics"]["round_trip_cos"] <= 1.0
    assert "| model |" in capsys.readouterr().out


def test_sonar_llm_generations_match_the_reference_loop(toy, tmp_path):
    """The command's SONAR-LLM continuations equal the public code's loop run by hand."""
    from sonar_llm.models.generate import generate_sonar_llm_reference, sonar_text_functions
    from sonar_llm.sonar import EmbeddingToText, TextToEmbedding

    path, _ = _export_untrained(toy, "sonar_llm", seed=5)
    out = tmp_path / "res.json"
    assert _cli(toy, path, out, "--eos-threshold", "0.999") == 0
    res = json.loads(out.read_text())
    loaded = EV.load_trained(model=str(path), decoder=toy["dec_path"])
    t2e, e2t = TextToEmbedding(toy["enc"], toy["tok"]), EmbeddingToText(toy["dec"], toy["tok"])
    dec_fn, enc_fn = sonar_text_functions(t2e, e2t, LANG, beam_size=1, max_gen_len=12)
    eod = enc_fn(["End of sequence."])[0]
    for it in res["items"]:
        ref = generate_sonar_llm_reference(loaded.model, [enc_fn(it["prompt"])], dec_fn, enc_fn, max_sentences=6,
                                           eos_embedding=eod, eos_threshold=0.999)[0]
        assert it["generation"] == ref.texts


def test_round_trip_of_base_lcm_matches_direct_computation(toy):
    """Round-trip metrics from the recorder equal decode -> re-encode computed directly."""
    from sonar_llm.models.generate import generate_base_lcm

    _, model = _export_untrained(toy, "base_lcm", seed=7)
    from sonar_llm.sonar import EmbeddingToText, TextToEmbedding

    sonar = (TextToEmbedding(toy["enc"], toy["tok"]), EmbeddingToText(toy["dec"], toy["tok"]), toy["tok"])
    loaded = EV.LoadedModel(model.eval(), "base_lcm", {}, "memory")
    cfg = EV.EvalConfig(stories=str(toy["stories"]), num_stories=2, max_story_sentences=5, beam_size=1,
                        max_gen_len=12)
    res = EV.evaluate(cfg, loaded=loaded, sonar=sonar, log=None)
    prompts = [it["prompt"] for it in res["items"]]
    eod = sonar[0].encode(["End of sequence."], LANG)[0]
    gens = generate_base_lcm(model, [sonar[0].encode(p, LANG) for p in prompts], max_sentences=5,
                             eos_embedding=eod, eos_threshold=0.9)
    emb = torch.cat([g.embeddings for g in gens]).double()
    again = sonar[0].encode(sonar[1].decode(emb.float(), LANG, beam_size=1, max_gen_len=12), LANG).double()
    assert res["metrics"]["round_trip_l2"] == pytest.approx(float((emb - again).norm(dim=-1).mean()), rel=1e-4)
    assert res["metrics"]["round_trip_cos"] == pytest.approx(
        float(F.cosine_similarity(emb, again, dim=-1).mean()), rel=1e-4)


# ------------------------------------------------------------------------------------------ token NLL
def _toy_batch(toy, n_docs=3, seed=0):
    """A ConceptBatch of short documents: true encoder embeddings and target-mode tokens."""
    from sonar_llm.data.stories import generate_story_sentences

    docs = [s[:5 + i] for i, s in enumerate(generate_story_sentences(n_docs, seed=seed))]
    sents = [s for d in docs for s in d]
    emb = toy["enc"](*toy["tok"].pad_batch(toy["tok"].encode_source(sents, LANG))).detach()
    toks = [list(map(int, t)) for t in toy["tok"].encode_target(sents, LANG)]
    lens = [len(t) for t in toks]
    dl = [len(d) for d in docs]
    return ConceptBatch(
        embeddings=emb.double(),
        doc_cu_seqlens=torch.tensor([0] + torch.tensor(dl).cumsum(0).tolist(), dtype=torch.int32),
        tokens=torch.tensor([x for t in toks for x in t], dtype=torch.int64),
        tok_cu_seqlens=torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32),
        max_doc_len=max(dl), max_sent_len=max(lens)), docs, toks


def test_scored_sentence_mask():
    cu = torch.tensor([0, 3, 3, 7], dtype=torch.int32)
    got = scored_sentence_mask(cu, 7, 2)
    assert got.tolist() == [False, False, True, False, False, True, True]
    with pytest.raises(ValueError, match="context_sentences"):
        scored_sentence_mask(cu, 7, 0)


def test_nll_of_uniform_models_is_log_vocab(toy):
    """Zero output weights give uniform next-token distributions: NLL = log V per scored token, and the
    scored tokens (words + EOS of sentences >= 2) are the same for both families."""
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig
    from sonar_llm.models.token_llm import TokenLLM

    batch, docs, toks = _toy_batch(toy)
    V = toy["tok"].vocab_size
    expected_count = sum(len(toks[sum(len(d) for d in docs[:j]) + k]) - 2
                         for j, d in enumerate(docs) for k in range(2, len(d)))
    dec = toy_decoder(seed=3, vocab_size=V, lang_offset=toy["tok"].lang_offset).double()
    with torch.no_grad():
        dec.decoder_frontend.embed.weight.zero_()  # tied final projection: all logits 0
    sl = SonarLLM(SonarLLMConfig(backbone_config("tiny"), sonar_dim=toy["dim"]), decoder=dec).double()
    s_sum, s_n = sonar_llm_token_nll(sl, batch, 2)
    tl = TokenLLM(backbone_config("tiny"), vocab_size=V).double()
    with torch.no_grad():
        tl.embed.weight.zero_()
    t_sum, t_n = token_llm_token_nll(tl, batch, 2)
    assert s_n == t_n == expected_count
    assert s_sum == pytest.approx(expected_count * math.log(V), rel=1e-9)
    assert t_sum == pytest.approx(expected_count * math.log(V), rel=1e-9)


def test_sonar_llm_nll_matches_float64_reference(toy):
    """Fused-kernel per-token losses == the plain decoder's full-logit log-softmax, sentence by sentence."""
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.sonar_llm import SonarLLM, SonarLLMConfig

    torch.manual_seed(11)
    batch, docs, toks = _toy_batch(toy, seed=4)
    dec = toy_decoder(seed=4, std=0.3, vocab_size=toy["tok"].vocab_size, lang_offset=toy["tok"].lang_offset).double()
    model = SonarLLM(SonarLLMConfig(backbone_config("tiny"), sonar_dim=toy["dim"]), decoder=dec).double().eval()
    got_sum, got_n = sonar_llm_token_nll(model, batch, 2)
    ref, n, row = 0.0, 0, 0
    with torch.no_grad():
        for d in docs:
            emb = batch.embeddings[row:row + len(d)]
            for k in range(2, len(d)):
                h = model.backbone.forward_padded(model.input_proj(emb[:k])[None])[0, -1]
                pred = model.output_proj(h)
                t = torch.tensor(toks[row + k])
                logp = dec(t[None, :-1], pred[None, None]).log_softmax(-1)[0]
                lab = t[1:]
                ref -= float(logp[torch.arange(1, lab.numel()), lab[1:]].sum())
                n += lab.numel() - 1
            row += len(d)
    assert got_n == n
    assert got_sum == pytest.approx(ref, rel=1e-9)


def test_token_llm_nll_matches_float64_reference(toy):
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.token_llm import TokenLLM

    torch.manual_seed(12)
    batch, docs, toks = _toy_batch(toy, seed=5)
    model = TokenLLM(backbone_config("tiny"), vocab_size=toy["tok"].vocab_size).double().eval()
    got_sum, got_n = token_llm_token_nll(model, batch, 2)
    ref, n, row = 0.0, 0, 0
    with torch.no_grad():
        for d in docs:
            stream, owner = [2], [-1]
            for k in range(len(d)):
                stream += toks[row + k][2:]
                owner += [k] * (len(toks[row + k]) - 2)
            ids = torch.tensor(stream)
            logp = (model.backbone.forward_padded(model.embed(ids)[None])[0] @ model.embed.weight.t()).log_softmax(-1)
            for p in range(1, len(stream)):
                if owner[p] >= 2:
                    ref -= float(logp[p - 1, stream[p]])
                    n += 1
            row += len(d)
    assert got_n == n
    assert got_sum == pytest.approx(ref, rel=1e-9)


def test_dataset_token_nll_summary_and_errors(toy):
    from sonar_llm.models.presets import backbone_config
    from sonar_llm.models.token_llm import TokenLLM

    batch, _, _ = _toy_batch(toy)
    model = TokenLLM(backbone_config("tiny"), vocab_size=toy["tok"].vocab_size).double()
    s, n = token_llm_token_nll(model, batch, 2)
    out = dataset_token_nll(model, "token_llm", [batch], NLLConfig())
    assert out["num_tokens"] == n and out["token_nll"] == pytest.approx(s / n)
    assert out["token_ppl"] == pytest.approx(math.exp(s / n))
    with pytest.raises(ValueError, match="base_lcm"):
        dataset_token_nll(model, "base_lcm", [batch])
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        dataset_token_nll(model, "token_llm", "/nonexistent/no_such_dir")
    with pytest.raises(ValueError, match="context_sentences"):
        NLLConfig(context_sentences=0)


# ------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs_are_named(toy, tmp_path, capsys):
    path, _ = _export_untrained(toy, "base_lcm")
    out = tmp_path / "r.json"
    assert EV.main(["--model", str(tmp_path / "missing.safetensors"), "--stories", str(toy["stories"]),
                    "--out", str(out)]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    assert EV.main(["--model", str(path), "--stories", str(tmp_path / "nostories.jsonl"), "--out", str(out)]) == 2
    assert "nostories.jsonl" in capsys.readouterr().err
    assert _cli(toy, path, out, "--family", "token_llm") == 2
    assert "does not match" in capsys.readouterr().err
    lonely = tmp_path / "lonely.safetensors"
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match="lonely.json"):
        EV.load_trained(model=str(lonely))
    with pytest.raises(ValueError, match="exactly one"):
        EV.load_trained()
    with pytest.raises(FileNotFoundError, match="no_run_here"):
        EV.load_trained(run=str(tmp_path / "no_run_here"))
    with pytest.raises(ValueError, match="--beam-size"):
        EV.EvalConfig(model=str(path), stories=str(toy["stories"]), beam_size=0).validate()


def test_a_run_config_that_does_not_describe_the_weights_is_named(toy, tmp_path, capsys):
    """A user trial: model.json (or a run's config.json) edited to another preset, or emptied, gave a traceback
    (a size mismatch in load_state_dict, a KeyError). Now one line naming the file, exit 2."""
    path, _ = _export_untrained(toy, "sonar_llm")
    info = json.loads(path.with_suffix(".json").read_text())
    out = tmp_path / "r.json"
    for model, says in (({**info["run_config"]["model"], "overrides": {"num_layers": 2, "model_dim": 64,
                                                                           "num_heads": 4, "ffn_dim": 96}},
                          "the run config does not describe these weights (sonar_llm): "),
                         ({}, "(its run_config): not a run config (no [model] table with a family)")):
        edited = tmp_path / f"edited{len(says)}.safetensors"
        edited.write_bytes(path.read_bytes())
        edited.with_suffix(".json").write_text(json.dumps({**info, "run_config": {**info["run_config"],
                                                                                   "model": model}}))
        assert _cli(toy, edited, out) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and says in err and str(edited.with_suffix("")) in err, err
    assert not out.exists()


def test_bad_stories_and_an_empty_run_folder_are_named_before_any_sonar_is_resolved(toy, tmp_path, capsys,
                                                                                      monkeypatch):
    """A held-out file is read whole: a non-UTF-8 or non-JSON line after good ones is an error naming file and
    line (ingestion for training skips such lines; evaluation must not silently drop a story). A run folder
    with no checkpoint is refused before SONAR assets are resolved (which could train the tiny SONAR)."""
    path, _ = _export_untrained(toy, "base_lcm")
    good = json.dumps({"text": "Tom had a ball. He liked it."})
    cases = {"nonutf.jsonl": (good + "\n").encode() + b'{"text": "bad \xff byte"}\n',
             "cut.jsonl": (good + "\n" + good[:12] + "\n").encode()}
    monkeypatch.setattr(EV, "resolve_sonar_assets", lambda *a, **k: pytest.fail("resolved SONAR before checking"))
    for name, data in cases.items():
        stories = tmp_path / name
        stories.write_bytes(data)
        out = tmp_path / "r.json"
        assert EV.main(["--model", str(path), "--stories", str(stories), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{stories}:2" in err[0], err
        assert not out.exists()
    (tmp_path / "emptyrun").mkdir()
    assert EV.main(["--run", str(tmp_path / "emptyrun"), "--stories", str(toy["stories"]),
                    "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0] and "emptyrun" in err[0], err


def test_run_directory_after_training_and_nll_data(toy, tmp_path):
    """--run: a real 2-step training run on toy shards is reloaded from its DCP checkpoint; the token NLL
    over the held-out shards equals the per-batch function summed over the same documents."""
    from sonar_llm.data.preprocess import SonarCodec, preprocess
    from sonar_llm.data.shards import ShardedDataset
    from sonar_llm.eval.nll import batches_from_dataset
    from sonar_llm.sonar import TextToEmbedding

    import sonar_train.config as tc
    from sonar_train.loop import run_training

    codec = SonarCodec(TextToEmbedding(toy["enc"], toy["tok"]), toy["tok"])
    for split in ("train", "valid"):
        preprocess(toy["stories"], tmp_path / split, codec, shard_size_docs=10, log=None)
    cfg = tc.RunConfig()
    cfg.model.family, cfg.model.preset = "token_llm", "tiny"
    cfg.data.path, cfg.data.val_path, cfg.data.max_sentences = str(tmp_path / "train"), str(tmp_path / "valid"), 16
    cfg.train.steps, cfg.train.precision, cfg.train.device, cfg.train.log_every = 2, "fp32", "cpu", 1
    cfg.train.out_dir = str(tmp_path / "run")
    cfg.sonar.encoder, cfg.sonar.decoder, cfg.sonar.tokenizer = (str(toy["enc_path"]), str(toy["dec_path"]),
                                                                 str(toy["spm"]))
    run_training(cfg)
    out = tmp_path / "res.json"
    assert EV.main(["--run", cfg.train.out_dir, "--stories", str(toy["stories"]), "--out", str(out),
                    "--num-stories", "2", "--max-story-sentences", "6", "--max-new-tokens", "20",
                    "--nll-data", str(tmp_path / "valid")]) == 0
    res = json.loads(out.read_text())
    assert res["family"] == "token_llm" and res["step"] == 2
    loaded = EV.load_trained(run=cfg.train.out_dir)
    total, count = 0.0, 0
    for b in batches_from_dataset(ShardedDataset(tmp_path / "valid"), NLLConfig()):
        s, n = token_llm_token_nll(loaded.model, b, 2)
        total, count = total + s, count + n
    assert res["nll"]["num_tokens"] == count
    assert res["metrics"]["token_nll"] == pytest.approx(total / count, rel=1e-6)


def test_decoding_caps_are_applied_and_stated(toy, tmp_path):
    """The report states the SONAR decoding it ran; --max-seq-len reaches the decoder (positions minus the
    [</s>, lang] prompt, and at most --max-gen-len), and the default is the public generation's 256."""
    from sonar_llm.sonar.generation import GenerationConfig

    path, _ = _export_untrained(toy, "sonar_llm", seed=3)
    out = tmp_path / "res.json"
    assert _cli(toy, path, out, "--max-seq-len", "9", "--eos-threshold", "0.999") == 0
    dec = json.loads(out.read_text())["decoding"]
    assert dec["max_seq_len"] == 9 and dec["max_gen_len"] == 12 and dec["beam_size"] == 1
    assert dec["max_new_tokens"] == min(12, 9 - 2)
    default = EV.decoding_config(EV.EvalConfig(stories="x"))
    assert default == GenerationConfig(beam_size=5, max_seq_len=256)
    assert default.max_new_tokens(1024, 512) == 256 - 2  # the public cap binds before SONAR's 510


def test_sampled_decoding_reaches_the_decoder_and_is_seeded(toy, tmp_path, capsys):
    """--temperature/--top-k/--top-p/--sample sample the SONAR decoder's tokens (seeded by --seed); top-k 1 sampling is greedy decoding, so it must give the greedy run's stories; the
    teacher-forced end recall decodes greedily either way."""
    from sonar_llm.sonar.generation import GenerationConfig

    path, _ = _export_untrained(toy, "sonar_llm", seed=4)

    def stories(*extra):
        out = tmp_path / "res.json"
        assert _cli(toy, path, out, "--eos-threshold", "0.999", "--end-recall-docs", "2", *extra) == 0, \
            capsys.readouterr().err
        res = json.loads(out.read_text())
        return [it["generation"] for it in res["items"]], res

    greedy, greedy_res = stories()
    top1, res = stories("--top-k", "1", "--temperature", "0.5")
    assert top1 == greedy and any(greedy)
    assert res["decoding"]["do_sample"] and res["decoding"]["top_k"] == 1 and res["decoding"]["temperature"] == 0.5
    hot, res = stories("--temperature", "2.0", "--seed", "1")
    again, _ = stories("--temperature", "2.0", "--seed", "1")
    other, _ = stories("--temperature", "2.0", "--seed", "2")
    assert hot == again and hot != other and hot != greedy
    assert res["decoding"]["seed"] == 1 and res["decoding"]["strategy"] != "greedy"
    assert res["end_recall"] == greedy_res["end_recall"]  # the decoded predictions it names included
    assert greedy_res["end_recall"]["missed_end_examples"]
    sampled = EV.EvalConfig(stories="x", top_p=0.9, seed=3)
    assert EV.decoding_config(sampled) == GenerationConfig(beam_size=1, max_seq_len=256, do_sample=True, top_p=0.9,
                                                           seed=3)
    assert EV.decoding_config(sampled, sampled=False) == GenerationConfig(beam_size=1, max_seq_len=256)


def test_sampled_stories_do_not_depend_on_the_batching(toy, tmp_path, capsys):
    """With sampling, SONAR-LLM's k-th story draws its words from story_generator(--seed, k): --batch-size 1
    and 2 give the same stories, and the first story is the same whether one or two are evaluated."""
    path, _ = _export_untrained(toy, "sonar_llm", seed=4)

    def stories(*extra):
        out = tmp_path / "res.json"
        assert _cli(toy, path, out, "--eos-threshold", "0.999", "--end-recall-docs", "0", "--temperature", "5",
                    "--seed", "2", *extra) == 0, capsys.readouterr().err
        return [it["generation"] for it in json.loads(out.read_text())["items"]]

    pairs, singles = stories("--batch-size", "2"), stories("--batch-size", "1")
    assert pairs == singles and len(pairs) == 2 and pairs[0] != pairs[1]
    assert stories("--num-stories", "1") == pairs[:1]


def test_sampling_leaves_the_end_to_the_greedy_reading(toy, tmp_path, capsys, monkeypatch):
    """With sampling, the evaluation asks the decoder whether each prediction's greedy reading is the end sentence
    (EmbeddingToText.reads_as, under the run's decoding; tested against greedy decoding in test_sonar_pipeline.py)
    and ends a story where it is, whatever the draw; beam search and greedy decoding are not asked."""
    import sonar_llm.sonar.pipeline as P

    asked = []

    def reads_as(self, embeddings, text, lang=None, *, cfg=None):
        asked.append((embeddings.shape[0], text, lang, cfg.do_sample, cfg.temperature))
        return torch.ones(embeddings.shape[0], dtype=torch.bool)

    monkeypatch.setattr(P.EmbeddingToText, "reads_as", reads_as)
    path, _ = _export_untrained(toy, "sonar_llm", seed=4)
    out = tmp_path / "res.json"

    def items(*extra):
        assert _cli(toy, path, out, "--eos-threshold", "0.999", "--end-recall-docs", "0", *extra) == 0, \
            capsys.readouterr().err
        return [(it["generation"], it["stop_reason"]) for it in json.loads(out.read_text())["items"]]

    assert items() == [([""] * 5, "sentence_cap")] * 2 and not asked  # greedy: never ends, never asked
    assert items("--temperature", "3.0") == [([], "end")] * 2
    assert asked == [(2, "End of sequence.", "eng_Latn", True, 3.0)]


def test_bad_sampling_flags_are_one_line_errors(toy, tmp_path, capsys):
    path, _ = _export_untrained(toy, "sonar_llm")
    token, _ = _export_untrained(toy, "token_llm")
    out = tmp_path / "r.json"
    for extra, says in ((["--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
                        (["--temperature", "inf"], "--temperature must be a finite number > 0, got inf"),
                        (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
                        (["--top-k", "-1"], "--top-k must be >= 0"),
                        (["--beam-size", "3", "--sample"], "--beam-size > 1 and sampling"),
                        (["--seed", str(2**64)], "--seed must be in [0, 2^64 - 1]"),
                        # a new user's trial: these named internal fields, or came only after the generation
                        (["--max-seq-len", "1"], "--max-seq-len must be >= 3"),
                        (["--max-gen-len", "0"], "--max-gen-len must be >= 1"),
                        (["--nll-docs", "0"], "--nll-docs must be >= 1"),
                        (["--lang", "xx"], "--lang: unknown language 'xx'"),
                        (["--max-story-sentences", "3"], f"--stories {toy['stories']}: no story has between 3 and 3 "
                                                         "sentences (--max-story-sentences 3)"),
                        (["--out", ""], "--out: the path is empty"),
                        (["--initial-noise-scale", "nan"], "--initial-noise-scale must be a finite number >= 0"),
                        (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0"),
                        (["--num-inference-steps", "0"], "--num-inference-steps must be >= 1")):
        assert _cli(toy, path, out, *extra) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and says in err and "Traceback" not in err, err
    assert _cli(toy, token, out, "--top-p", "0.9") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not apply to a token_llm model" in err
    assert not out.exists()
