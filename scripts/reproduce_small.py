"""Small-scale reproduction of the SONAR-LLM paper's comparison, on the embedded corpus and tiny SONAR.

    python scripts/reproduce_small.py [--quick] [--steps N] [--out bench/results/reproduction]

1. prepares the data like train/sonar_train/default_pipeline.py: the project's story corpus, the tiny SONAR trained on
   it (cached), every sentence encoded into train / held-out shards;
2. trains every family (sonar_llm, base_lcm, two_tower, token_llm over SONAR tokens) and the paper's token
   baseline format (token_llm_bpe: whole stories [BOS] ... [EOS] in a byte-level BPE trained with the
   `tokenizers` library on the training stories, `sonar_llm.data.preprocess_tokens`) at four backbone
   sizes (`--sizes`, default d 64 x 2, d 96 x 3, d 128 x 4, d 192 x 4 layers, FFN 2d) with the SAME budget:
   same steps, learning-rate schedule, seed, and batches of the same stories;
3. evaluates each with sonar_llm.eval.evaluate (the paper's protocol on held-out stories, "start"
   prompts, greedy SONAR decoding) and sonar_llm.eval.nll (token NLL and bits per byte of the true
   continuation after the first two sentences, for the families with a token distribution);
4. fits L(N) = E + A * N^-alpha per family (sonar_llm.eval.scaling) to the final validation loss and to
   bits per byte against non-embedding parameters;
5. writes report.md, loss_vs_params.png, scaling_val_loss.png, scaling_bpb.png, scaling_fits.json and
   results.json into the output folder.

This is a small-scale sanity check on a synthetic children's-story corpus with a tiny SONAR autoencoder,
not the paper's scale (the paper trains 39M-1.3B models on TinyStories with the real 1024-d SONAR).
`--quick` shrinks everything (corpus, tiny SONAR, steps, stories) to test the script in a few minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT / "train") not in sys.path:  # `sonar_train` without installing the checkout
    sys.path.insert(0, str(_ROOT / "train"))

import torch  # noqa: E402

from sonar_llm.models.family import FAMILIES as _REGISTRY  # noqa: E402
from sonar_llm.models.family import get_family  # noqa: E402

BPE = "token_llm_bpe"  # the token LLM family over whole stories in a BPE tokenizer (the paper's baseline format)
FAMILIES = tuple(_REGISTRY) + (BPE,)
BPE_VOCAB = 2000  # as many pieces as the tiny SONAR's SentencePiece model


def _registry_family(name: str) -> str:
    return "token_llm" if name == BPE else name


FAMILY_NAMES = {name: get_family(_registry_family(name)).title for name in FAMILIES}
FAMILY_NAMES[BPE] = "token LLM (BPE, whole stories)"
# backbone sizes: name -> (preset, backbone overrides); the same for every family
SIZES = {
    "tiny": ("tiny", {}),  # d=64, 2 layers, 4 heads, FFN 128
    "d96": ("tiny", {"model_dim": 96, "ffn_dim": 192, "num_layers": 3}),
    "d128": ("tiny", {"model_dim": 128, "ffn_dim": 256, "num_layers": 4}),
    "d192": ("tiny", {"model_dim": 192, "ffn_dim": 384, "num_layers": 4}),
    "tiny-wide": ("tiny", {"model_dim": 128, "ffn_dim": 512, "num_layers": 4}),
    "small": ("small", {}),  # d=256, 4 layers, FFN 1024
}
DEFAULT_SIZES = ("tiny", "d96", "d128", "d192")
LOSS_KIND = {name: get_family(_registry_family(name)).loss_name for name in FAMILIES}
LOSS_KIND[BPE] = "token CE (nats per BPE token)"


@dataclass
class ReproConfig:
    """The shared budget and the evaluation settings."""

    out: str = "bench/results/reproduction"
    work: str = "runs/reproduction"
    sizes: tuple[str, ...] = DEFAULT_SIZES  # names in SIZES
    families: tuple[str, ...] = FAMILIES
    steps: int = 150
    max_docs: int = 4  # stories per batch, every family (the same stories in every batch)
    max_sentences: int = 96  # never binds: 4 stories x (<= 20 sentences + the end sentence)
    max_tokens: int = 8192
    lr: float = 1e-3
    warmup_steps: int = 30
    seed: int = 0
    n_stories: int = 4000  # the corpus (and split) the tiny SONAR is trained on: held-out stays held out
    train_stories: int = 1000  # training stories encoded into shards (0 = all); enough for the step budget
    eval_stories: int = 16
    max_story_sentences: int = 24  # the corpus has <= 20 sentences per story; caps run-away generations
    nll_docs: int = 48
    tiny_steps: int | None = None  # tiny SONAR training steps (None = TinySonarConfig's)
    tiny_config: dict = field(default_factory=dict)  # TinySonarConfig overrides ({} = the default's)
    two_tower_steps: int = 40
    quick: bool = False
    command: str = ""  # the command line that made the report (its arguments)

    @classmethod
    def quick_config(cls, **kw) -> "ReproConfig":
        base = dict(steps=20, n_stories=300, train_stories=0, eval_stories=6, nll_docs=10, tiny_steps=250, quick=True,
                    tiny_config=dict(n_stories=300, model_dim=64, num_layers=1, ffn_dim=128, eval_sentences=50),
                    two_tower_steps=10, work="runs/reproduction_quick", out="runs/reproduction_quick/report")
        return cls(**{**base, **kw})


def _say(msg: str) -> None:
    print(f"[reproduce] {msg}", flush=True)


# ------------------------------------------------------------------------------------------ data
def prepare(rc: ReproConfig) -> dict:
    """Corpus, tiny SONAR and shards: the default pipeline's steps 1-3 with this script's sizes."""
    from sonar_llm.sonar.train_tiny import TinySonarConfig, default_cache_dir
    from sonar_train import default_pipeline as dp

    # a cache of its own: a copy trained here under a short budget must not stand in for the default's
    cache = default_cache_dir().with_name("tiny_sonar_quick" if rc.quick else "tiny_sonar_reproduction")
    assets = dp.prepare(Path(rc.work), rc.tiny_steps, n_stories=rc.n_stories, train_stories=rc.train_stories,
                        tiny_config=TinySonarConfig(**rc.tiny_config), tiny_cache_dir=cache, say=_say)
    if BPE in rc.families:
        assets.update(prepare_bpe(Path(rc.work) / "data", assets))
    return assets


def prepare_bpe(data: Path, assets: dict) -> dict:
    """A byte-level BPE (`tokenizers`) trained on the training stories the shards hold, and both splits as
    whole-story token shards (`preprocess_tokens`): the same stories as the SONAR shards."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sonar_llm.data.ingest import iter_documents
    from sonar_llm.data.preprocess_tokens import TokenStreamConfig, preprocess_tokens
    from sonar_llm.data.shards import input_paths, read_manifest
    from sonar_llm.data.text_tokenizer import load_text_tokenizer

    t0 = time.perf_counter()
    inputs = input_paths(read_manifest(assets["train"]), assets["train"])  # the stories the SONAR training shards hold
    texts = [t for _, t in iter_documents(inputs)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    path = data / "bpe" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    text_tok = load_text_tokenizer(path)
    out = {"bpe_tokenizer": str(path)}
    for split in ("train", "valid"):
        src = input_paths(read_manifest(assets[split]), assets[split])
        preprocess_tokens(src, data / "bpe" / split, text_tok, TokenStreamConfig(shard_size_docs=1000),
                          overwrite=True, log=None)
        out[f"bpe_{split}"] = str(data / "bpe" / split)
    _say(f"BPE tokenizer ({text_tok.vocab_size} ids) and whole-story token shards ready "
         f"({time.perf_counter() - t0:.0f}s)")
    return out


# ------------------------------------------------------------------------------------------ training
def run_config(rc: ReproConfig, assets: dict, family: str, size: str, sonar_dim: int):
    from sonar_train.config import RunConfig, validate

    cfg = RunConfig()
    preset, size_over = SIZES[size]
    cfg.model.family, cfg.model.preset = _registry_family(family), preset
    # sentence-embedding models read sonar_dim-wide inputs; a `num_layers` override is the total layer count
    # (the Two-Tower LCM splits it between its towers itself)
    spec = get_family(_registry_family(family))
    cfg.model.overrides = {**size_over, "sonar_dim": sonar_dim} if spec.concept_level else dict(size_over)
    cfg.data.path, cfg.data.val_path = assets["train"], assets["valid"]
    cfg.data.max_sentences, cfg.data.max_tokens, cfg.data.seed = rc.max_sentences, rc.max_tokens, rc.seed
    if family == BPE:  # one segment per story: the same number of stories per batch as the sentence families
        cfg.model.overrides["text_tokenizer"] = assets["bpe_tokenizer"]
        cfg.data.path, cfg.data.val_path = assets["bpe_train"], assets["bpe_valid"]
        cfg.data.max_docs, cfg.data.max_sentences = rc.max_docs, rc.max_docs
    else:
        cfg.data.max_docs = rc.max_docs
    cfg.optim.lr, cfg.optim.warmup_steps = rc.lr, rc.warmup_steps
    cfg.train.steps, cfg.train.seed = rc.steps, rc.seed
    cfg.train.precision, cfg.train.device = "fp32", "cpu" if not torch.cuda.is_available() else "auto"
    cfg.train.log_every = max(1, rc.steps // 10)
    cfg.train.eval_every, cfg.train.eval_batches = rc.steps, 4
    cfg.train.checkpoint_every, cfg.train.keep_last, cfg.train.resume = 0, 1, False
    cfg.train.out_dir = str(Path(rc.work) / "runs" / f"{family}_{size}")
    if family != BPE:  # the BPE token LLM reads no SONAR (its data have no end sentence to check either)
        cfg.sonar.decoder, cfg.sonar.encoder, cfg.sonar.tokenizer = assets["decoder"], assets["encoder"], assets["tokenizer"]
    validate(cfg)
    return cfg


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters inside the Transformer blocks, all trainable parameters incl. IO projections/embeddings)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks = {id(p) for blk in model.transformer_blocks() for p in blk.parameters()}
    return sum(p.numel() for p in trainable if id(p) in blocks), sum(p.numel() for p in trainable)


def train_and_evaluate(rc: ReproConfig, assets: dict, family: str, size: str, sonar, sonar_dim: int) -> dict:
    import shutil

    from sonar_llm.eval.evaluate import EvalConfig, evaluate, load_trained
    from sonar_llm.eval.public_scoring import score_records
    from sonar_train.loop import run_training

    cfg = run_config(rc, assets, family, size, sonar_dim)
    shutil.rmtree(cfg.train.out_dir, ignore_errors=True)  # the same budget from scratch every time
    t0 = time.perf_counter()
    final = run_training(cfg, stream=open(os.devnull, "w"))
    train_s = time.perf_counter() - t0
    loaded = load_trained(run=cfg.train.out_dir, decoder=assets["decoder"])
    blocks, total = parameter_counts(loaded.model)
    nll_data = assets["bpe_valid"] if family == BPE else assets["valid"]
    ecfg = EvalConfig(run=cfg.train.out_dir, stories=assets["corpus_valid"], prompt_mode="start",
                      num_stories=rc.eval_stories, max_story_sentences=rc.max_story_sentences,
                      beam_size=1, max_gen_len=48,
                      num_inference_steps=rc.two_tower_steps, max_new_tokens=400, seed=rc.seed,
                      nll_data=nll_data if get_family(_registry_family(family)).token_nll is not None else "",
                      nll_docs=rc.nll_docs, batch_size=rc.eval_stories)
    res = evaluate(ecfg, loaded=loaded, sonar=sonar, log=None)
    public = score_records(res["public_records"])  # the public evaluate_nlg.py scoring of the same generations
    res["metrics"].update({f"public_{k}": v for k, v in public["metrics"].items()})
    row = {"family": family, "size": size, "params_blocks": blocks, "params_total": total,
           "train_loss": _smoothed_train_loss(Path(cfg.train.out_dir), final.get("loss")), "val_loss": final.get("eval_loss"), "train_seconds": train_s,
           "steps": final.get("step"), "steps_per_s": final.get("steps_per_s"),
           "generation_seconds": res["generation_seconds"], "metrics": res["metrics"],
           "public_scoring": {"missing": public["missing"], "nltk": public["nltk"], "prompts": "ours"},
           "nll": {k: v for k, v in (res.get("nll") or {}).items() if k != "tokenizer"} or None,
           "examples": res["items"][:2]}
    bpb = res["metrics"].get("bits_per_byte")
    _say(f"{family:13s} {size:5s} params {total:>10,d}  train loss {row['train_loss']:.4f}  val loss "
         f"{row['val_loss']:.4f}  bpb {_fmt(bpb)}  BLEU {res['metrics']['bleu']:.2f}  ({train_s:.0f}s train, "
         f"{res['generation_seconds']:.0f}s generation)")
    return row


def _smoothed_train_loss(run_dir: Path, last: float | None, n: int = 3) -> float | None:
    """Mean of the last `n` logged training losses (metrics.jsonl), else the last step's loss."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return last
    losses = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind", "train") == "train" and isinstance(rec.get("loss"), (int, float)):
            losses.append(float(rec["loss"]))
    return sum(losses[-n:]) / len(losses[-n:]) if losses else last


# ------------------------------------------------------------------------------------------ report
def _fmt(v, spec=".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return format(v, spec)


def _public(m: dict, key: str) -> str:
    """A public-scoring cell: the value, "missing" (NLTK data absent: never a substitute) or — (not run)."""
    if key not in m:
        return "—"
    return "missing" if m[key] is None else _fmt(m[key], ".3f")


def _missing_note(rows: list[dict]) -> str:
    reasons = sorted({part for r in rows for why in ((r.get("public_scoring") or {}).get("missing") or {}).values()
                      for part in why.split("; ")})
    return (" Here: " + " / ".join(reasons) + ".") if reasons else ""


def write_report(rc: ReproConfig, assets: dict, rows: list[dict], out: Path, elapsed: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tiny = assets["tiny_info"].get("metrics", {})
    lines = [
        "# Small-scale reproduction of the SONAR-LLM comparison",
        "",
        "**This is a small-scale check on a synthetic corpus, not the paper's scale.** The corpus is the "
        "project's generated children's stories (`sonar_llm.sonar.story_corpus`), the sentence space is a tiny "
        f"SONAR autoencoder trained on it ({assets['tiny_info'].get('encoder_config', {}).get('model_dim', '?')}-d, "
        f"held-out round-trip exact match {_fmt(tiny.get('exact_match'), '.1%')}, BLEU {_fmt(tiny.get('bleu'), '.1f')}), "
        "and the models are far smaller than the paper's 39M-1.3B. The numbers test that the families "
        "train and generate through the same pipeline and show their relative behaviour at this scale only.",
        "",
        f"Budget (identical for every family and size): {rc.steps} optimizer steps, batches of {rc.max_docs} "
        f"stories (at most {rc.max_sentences} sentences / {rc.max_tokens} tokens, which never bind), AdamW "
        f"lr {rc.lr} with {rc.warmup_steps} warm-up steps and cosine decay, fp32 on "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'}, seed {rc.seed}.",
        "Sizes: " + "; ".join(f"`{n}` = preset {SIZES[n][0]} {SIZES[n][1] or ''}" for n in rc.sizes) + ".",
        f"Evaluation: {rc.eval_stories} held-out stories (at most {rc.max_story_sentences} sentences, also the "
        f"generation limit), prompt = first 2 sentences, greedy SONAR decoding "
        f"(beam 1), Two-Tower CFG with {rc.two_tower_steps} requested steps (guidance 3, rescale 0.7, noise 0.6); "
        f"token NLL and bits per byte over the first {rc.nll_docs} held-out stories (the continuation after the "
        f"first 2 sentences, its end included).",
        f"Script: `python scripts/reproduce_small.py{' ' + rc.command if rc.command else (' --quick' if rc.quick else '')}` "
        f"({elapsed / 60:.1f} min).",
        "",
        "| family | size | params (blocks) | params (incl. IO) | final train loss | val loss | token NLL | "
        "bits per byte | BLEU | ROUGE-L | METEOR (no WordNet) | public BLEU | public ROUGE-L | public METEOR | "
        "REP-4 | OVL-3 | round-trip cos | gen. time (s) |",
        "|---" * 18 + "|",
    ]
    for r in rows:
        m = r["metrics"]
        lines.append(
            f"| {FAMILY_NAMES[r['family']]} | {r['size']} | {r['params_blocks']:,} | {r['params_total']:,} | "
            f"{_fmt(r['train_loss'])} | {_fmt(r['val_loss'])} | {_fmt(m.get('token_nll'))} | "
            f"{_fmt(m.get('bits_per_byte'), '.4f')} | {_fmt(m['bleu'], '.2f')} | "
            f"{_fmt(m['rougeL'], '.2f')} | {_fmt(m['meteor_no_wordnet'], '.2f')} | "
            + " | ".join(_public(m, k) for k in ("public_bleu", "public_rougeL", "public_meteor")) + " | "
            f"{_fmt(m['rep4'], '.3f')} | "
            f"{_fmt(m['ovl3'], '.3f')} | {_fmt(m.get('round_trip_cos'))} | {_fmt(r['generation_seconds'], '.1f')} |")
    lines += [
        "",
        "Reading the table:",
        "- The train / val losses are each family's own objective and are NOT comparable across families: "
        + "; ".join(f"{FAMILY_NAMES[f]}: {LOSS_KIND[f]}" for f in FAMILIES) + ".",
        "- Token NLL (nats per token, `sonar_llm.eval.nll`) is comparable between SONAR-LLM and the token LLM over "
        "SONAR tokens: same held-out sentences, same tokenizer, same scored tokens (words + EOS of every sentence "
        "after the first two). The BPE token LLM's token NLL is per BPE token (another unit).",
        "- Bits per byte (`sonar_llm.eval.nll`) is comparable across all three: -log2 P(continuation, then the end "
        "of the story | the first two sentences) over the UTF-8 bytes of the continuation \" \" + the later "
        "sentences joined by \" \" (the same bytes for every model: see `num_bytes` in results.json). What each "
        "conditions on differs: the token LLMs see the exact previous tokens; SONAR-LLM sees the previous "
        "sentences only through their SONAR embeddings and each sentence's own earlier tokens only inside the "
        "frozen decoder (docs/evaluation.md). Undefined (—) for the LCMs, which have no token distribution. "
        "SONAR-LLM's number goes through the frozen SONAR decoder, itself a sentence-level language model trained "
        "on this corpus (not counted in its parameters, N): much of its likelihood is the decoder's.",
        "- BLEU / ROUGE-L / METEOR compare the generated continuation with the original one (0-100); METEOR runs "
        "without WordNet synonyms (a lower bound). REP-4: repeated 4-grams in the continuation; OVL-3: share of "
        "its 3-grams copied from the prompt. Round-trip cos: cosine between a generated embedding and the "
        "re-encoding of its decoded text (1.0 = on the decoder's manifold).",
        "- public BLEU / ROUGE-L / METEOR: the public SONAR-LLM `evaluate_nlg.py` scoring of the same generations "
        "(`sonar_llm.eval.public_scoring`): FIRST generated sentence against the FIRST original sentence (NLTK "
        "Punkt), NLTK sentence BLEU (method4), ROUGE-L F (stemmed), NLTK METEOR with WordNet, 0-1. \"missing\" "
        "means the NLTK data it needs is not installed on the machine that made this report, never a 0; \"—\" "
        "means the row was made before this scoring existed (re-run the script)."
        + _missing_note(rows),
    ]
    huge = [r for r in rows if get_family(_registry_family(r["family"])).token_nll is None  # the MSE families
            and (r.get("val_loss") or 0) > 1e4]
    if huge:
        lines.append("- The LCM losses are MSEs in the normaliser's space (Meta's robust scaler fitted on the "
                     "training embeddings, with its percent reading of the quantile range): SONAR dimensions that "
                     "barely vary get tiny scales, so a weak tiny SONAR gives very large values (here "
                     f"{min(r['val_loss'] for r in huge):.3g}-{max(r['val_loss'] for r in huge):.3g}); they still "
                     "rank sizes within a family.")
    empty = [r for r in rows if r["metrics"].get("mean_generated_sentences", 1.0) < 0.5]
    if empty:
        lines.append("- Empty continuations (" + ", ".join(f"{FAMILY_NAMES[r['family']]} {r['size']}" for r in empty)
                     + "): with greedy decoding the model's most likely next sentence right after the prompt is "
                     "the end-of-document sentence (the whole-story BPE model: its EOS), so it stops at once and its text metrics are 0; at this "
                     "budget its token NLL is the informative number.")
    lines += ["", "![loss vs parameters](loss_vs_params.png)", ""] + fit_section(rows) + [
        "",
        "## Example continuations (first held-out story)",
        "",
    ]
    for r in rows:
        if r["examples"]:
            ex = r["examples"][0]
            lines.append(f"- **{FAMILY_NAMES[r['family']]} ({r['size']})**: " + " ".join(ex["generation"][:4])[:400])
    if rows and rows[0]["examples"]:
        ex = rows[0]["examples"][0]
        lines += ["", "Prompt: " + " ".join(ex["prompt"]), "", "Original: " + " ".join(ex["reference"][:4])[:400]]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def scaling_fits(rows: list[dict]) -> dict:
    """L(N) = E + A N^-alpha per family (`sonar_llm.eval.scaling`), N = non-embedding (block) parameters:
    {"val_loss": fits of the final validation loss, "bits_per_byte": fits of bits per byte}."""
    from sonar_llm.eval.scaling import fit_families

    out = {}
    for key, get in (("val_loss", lambda r: r.get("val_loss")),
                     ("bits_per_byte", lambda r: r["metrics"].get("bits_per_byte"))):
        pts = [{"family": r["family"], "params": r["params_blocks"], "value": get(r), "source": r["size"]}
               for r in rows if isinstance(get(r), (int, float))]
        out[key] = fit_families(pts) if pts else {}
    return out


def fit_section(rows: list[dict]) -> list[str]:
    fits = scaling_fits(rows)
    lines = ["## Scaling fits", "",
             "L(N) = E + A * N^-alpha per family, N = non-embedding parameters (the Transformer blocks), fitted with "
             "`scipy.optimize.curve_fit` by `sonar_llm.eval.scaling`; 95% confidence intervals from the fit's "
             "covariance (Student t, n - 3 degrees of freedom: with 4 sizes, ONE degree of freedom, so the "
             "intervals are wide). At this scale and step budget (every size gets the same few hundred steps, far "
             "from compute-optimal) the exponents are NOT estimates of the paper's (0.49-0.57 for SONAR-LLM, "
             "0.79 for the token LLM); they show the machinery on real runs.", "",
             "| family | fitted to | points | alpha | 95% CI of alpha | E | A | RMS residual |", "|---" * 8 + "|"]
    for key, label in (("val_loss", "val loss (own objective)"), ("bits_per_byte", "bits per byte")):
        for fam in FAMILIES:
            fit = fits[key].get(fam)
            if fit is None:
                continue
            if "alpha" not in fit:
                lines.append(f"| {FAMILY_NAMES[fam]} | {label} | {len(fit['points'])} | not fitted: {fit['error']} "
                             "| | | | |")
                continue
            ci = fit.get("ci")
            ci_s = f"[{ci['alpha'][0]:.3f}, {ci['alpha'][1]:.3f}]" if ci else "— (exact fit)"
            lines.append(f"| {FAMILY_NAMES[fam]} | {label} | {fit['num_points']} | {fit['alpha']:.3f} | {ci_s} | "
                         f"{fit['E']:.4f} | {fit['A']:.4g} | {fit['rms_residual']:.2g} |")
    lines += ["", "![scaling fits, validation loss](scaling_val_loss.png) "
              "![scaling fits, bits per byte](scaling_bpb.png)"]
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for fam in FAMILIES:
        rs = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["params_total"])
        if not rs:
            continue
        x = [r["params_total"] for r in rs]
        color = f"C{FAMILIES.index(fam)}"  # one colour per family in both panels
        axes[0].plot(x, [r["val_loss"] for r in rs], "o-", color=color, label=f"{FAMILY_NAMES[fam]} ({LOSS_KIND[fam]})")
        bpb = [r["metrics"].get("bits_per_byte") for r in rs]
        if all(v is not None for v in bpb):
            axes[1].plot(x, bpb, "o-", color=color, label=FAMILY_NAMES[fam])
    axes[0].set(xscale="log", yscale="log", xlabel="trainable parameters (incl. IO)",
                ylabel="final validation loss (own objective)", title="Validation loss vs size (not comparable across families)")
    axes[1].set(xscale="log", xlabel="trainable parameters (incl. IO)", ylabel="bits per byte",
                title="Held-out bits per byte (same continuation text)")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Small-scale check on a synthetic corpus with a tiny SONAR (not the paper's scale)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(rc: ReproConfig, assets: dict, rows: list[dict], out: Path, elapsed: float,
                  results_json: bool = True) -> None:
    """report.md + loss_vs_params.png + results.json (unless `results_json` is False) for the rows so far."""
    out.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=lambda r: (FAMILIES.index(r["family"]), r["params_total"]))
    plot(rows, out / "loss_vs_params.png")
    write_report(rc, assets, rows, out, elapsed)
    from sonar_llm.eval.scaling import plot_fits

    fits = scaling_fits(rows)
    for key, name, ylabel in (("val_loss", "scaling_val_loss.png", "final validation loss (own objective)"),
                              ("bits_per_byte", "scaling_bpb.png", "bits per byte")):
        plot_fits({FAMILY_NAMES[f]: v for f, v in fits[key].items()}, out / name, ylabel=ylabel,
                  title=f"{ylabel}: E + A N^-alpha")
    (out / "scaling_fits.json").write_text(json.dumps(fits, indent=1))
    if not results_json:
        return
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(rc).items()}
    (out / "results.json").write_text(json.dumps({"settings": settings, "tiny_sonar": assets["tiny_info"],
                                                  "elapsed_seconds": elapsed, "rows": rows}, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny budget everywhere, to test the script")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--stories", type=int, default=None,
                   help="corpus size (5%% held out; default 4000, --quick 300); the tiny SONAR keeps its own")
    p.add_argument("--eval-stories", type=int, default=None, help="held-out stories generated and scored")
    p.add_argument("--nll-docs", type=int, default=None, help="held-out stories of the token NLL / bits per byte")
    p.add_argument("--tiny-steps", type=int, default=None,
                   help="tiny SONAR training steps (default: its config's; fewer = a shorter run, a weaker autoencoder)")
    p.add_argument("--out", default=None)
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--sizes", default=",".join(DEFAULT_SIZES), help=f"comma-separated, from {sorted(SIZES)}")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and the plot from results.json")
    a = p.parse_args(argv)
    if a.report_only:
        out = Path(a.out or ReproConfig().out)
        if not (out / "results.json").is_file():
            p.error(f"--report-only: {out / 'results.json'} not found")
        data = json.loads((out / "results.json").read_text())
        st = data["settings"]
        known = {f.name for f in dataclasses.fields(ReproConfig)}
        older = sorted(set(st) - known)  # settings of an earlier version of this script (e.g. tiny_budget_s)
        if older:
            _say(f"results.json was written by an earlier version of this script; settings kept as recorded, "
                 f"not used: {', '.join(f'{k}={st[k]!r}' for k in older)}")
        rc = ReproConfig(**{k: (tuple(v) if k in ("sizes", "families") else v) for k, v in st.items() if k in known})
        write_outputs(rc, {"tiny_info": data["tiny_sonar"]}, data["rows"], out, data["elapsed_seconds"],
                      results_json=False)  # the measured results stay as they were written
        _say(f"rewrote {out / 'report.md'} and {out / 'loss_vs_params.png'}")
        return 0
    fams = tuple(f for f in a.families.split(",") if f)
    sizes = tuple(x for x in a.sizes.split(",") if x)
    if any(x not in SIZES for x in sizes):
        p.error(f"--sizes: choose from {sorted(SIZES)}")
    bad = [f for f in fams if f not in FAMILIES]
    if bad:
        p.error(f"--families: unknown {bad}; choose from {FAMILIES}")
    extra = {"families": fams, "sizes": sizes}
    if a.out:
        extra["out"] = a.out
    rc = ReproConfig.quick_config(**extra) if a.quick else ReproConfig(**extra)
    if a.steps:
        rc.steps = a.steps
    if a.tiny_steps:
        rc.tiny_steps = a.tiny_steps
    rc.command = " ".join(argv if argv is not None else sys.argv[1:])
    for flag, key in (("stories", "n_stories"), ("eval_stories", "eval_stories"), ("nll_docs", "nll_docs")):
        if getattr(a, flag):
            setattr(rc, key, getattr(a, flag))
    t_start = time.perf_counter()
    assets = prepare(rc)
    from sonar_llm.eval.evaluate import SonarAssets, load_sonar_text

    sonar = load_sonar_text(SonarAssets(Path(assets["encoder"]), Path(assets["decoder"]), Path(assets["tokenizer"])))
    sonar_dim = sonar[0].encoder.cfg.model_dim
    out = Path(rc.out)
    rows: list[dict] = []
    for size in rc.sizes:
        for fam in rc.families:
            rows.append(train_and_evaluate(rc, assets, fam, size, sonar, sonar_dim))
            write_outputs(rc, assets, rows, out, time.perf_counter() - t_start)  # partial results survive
    elapsed = time.perf_counter() - t_start
    write_outputs(rc, assets, rows, out, elapsed)
    _say(f"wrote {out / 'report.md'}, {out / 'loss_vs_params.png'}, {out / 'results.json'} "
         f"({elapsed / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
