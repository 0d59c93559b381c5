"""The evaluation command: load a trained family, run the paper's generation protocol, score it.

    python -m sonar_llm.eval.evaluate --model EXPORTED.safetensors | --run RUN_DIR [--family auto]
        --stories HELDOUT.jsonl [--prompt-mode start|half] [--num-stories N] --out results.json
        [--encoder E --decoder D --tokenizer T] [--beam-size 1|5] [--nll-data HELDOUT_SHARDS]

Model: an exported consolidated safetensors file (train/export.py; its `model.json` beside it holds the
run config) or a run directory (latest complete checkpoint). The family is read from the run config
(`--family auto`) or checked against `--family`. SONAR assets: explicit flags, else the run config's
`[sonar]` paths, else the registry (`sonar_llm.sonar.registry`), else the cached tiny SONAR
(`ensure_tiny_sonar`).

Stories are split into sentences (`sonar_llm.data.segment.split_sentences`) and cut into prompt and
reference by `sonar_llm.eval.protocol`. Continuations per family:
  sonar_llm  `generate_sonar_llm`: decode every predicted embedding (beam `--beam-size`), re-encode the
             text, stop at cosine >= 0.98 with the end-of-document embedding or the sentence limit;
  base_lcm   `generate_base_lcm` (deterministic; cosine 0.9 stop), then decode;
  two_tower  `TwoTowerLCM.generate` with classifier-free guidance (40 requested steps, guidance 3,
             rescale 0.7, initial noise 0.6 by default), cosine 0.9 stop (the stop concept is dropped),
             then decode;
  token_llm  `generate_token_llm` (greedy) on the prompt's token stream, split at the sentence EOS
             ids, cut at the end-of-document sentence and the sentence limit.
Besides BLEU / ROUGE / METEOR (no WordNet) / REP-4 / OVL-3, concept families get the round-trip l2 and
cosine of their generated embeddings (decode, re-encode, compare). `--nll-data` adds the token NLL
(`sonar_llm.eval.nll`) for sonar_llm and token_llm. The JSON holds every generation and the metrics; the
markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import metrics as M
from .protocol import PROMPT_MODES, ProtocolConfig, metrics_table, run_protocol, write_result

__all__ = [
    "EvalConfig",
    "SonarAssets",
    "LoadedModel",
    "load_trained",
    "resolve_sonar_assets",
    "load_sonar_text",
    "read_stories",
    "make_generate_fn",
    "evaluate",
    "main",
]

FAMILIES = ("sonar_llm", "base_lcm", "two_tower", "token_llm")
DEFAULT_EOD_TEXT = "End of sequence."
EOS_THRESHOLDS = {"sonar_llm": 0.98, "base_lcm": 0.9, "two_tower": 0.9}


@dataclass
class EvalConfig:
    """Everything the evaluation command needs (the CLI flags)."""

    model: str = ""  # exported .safetensors (with model.json beside it)
    run: str = ""  # or a training run directory
    family: str = "auto"
    stories: str = ""  # held-out stories: JSONL ({"text": ...}), text or Parquet
    out: str = ""
    prompt_mode: str = "start"
    num_stories: int = 512
    max_story_sentences: int = 32
    encoder: str = ""
    decoder: str = ""
    tokenizer: str = ""
    lang: str = "eng_Latn"
    beam_size: int = 5
    max_gen_len: int = 129  # SONAR decoder token cap per sentence
    end_of_doc_text: str = ""  # "" = the training data's end sentence (manifest), else "End of sequence."
    eos_threshold: float = 0.0  # 0 = the family default (0.98 SONAR-LLM, 0.9 LCMs)
    batch_size: int = 16
    # two-tower diffusion sampling
    num_inference_steps: int = 40
    guidance_scale: float = 3.0
    guidance_rescale: float = 0.7
    initial_noise_scale: float = 0.6
    seed: int = 0
    # token LLM
    max_new_tokens: int = 512
    # concept-level extras
    round_trip: bool = True
    nll_data: str = ""  # held-out shard directory for the token NLL ("" = skip)
    nll_docs: int = 256
    device: str = "cpu"

    def validate(self) -> None:
        if bool(self.model) == bool(self.run):
            raise ValueError("give exactly one of --model (exported .safetensors) and --run (run directory)")
        if self.family != "auto" and self.family not in FAMILIES:
            raise ValueError(f"--family must be 'auto' or one of {FAMILIES}, got {self.family!r}")
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"--prompt-mode must be one of {PROMPT_MODES}, got {self.prompt_mode!r}")
        if not self.stories:
            raise ValueError("--stories is required")
        if self.beam_size < 1:
            raise ValueError(f"--beam-size must be >= 1, got {self.beam_size}")
        if self.num_stories < 1 or self.batch_size < 1 or self.max_new_tokens < 1:
            raise ValueError("--num-stories, --batch-size and --max-new-tokens must be >= 1")
        for name, value in (("--model", self.model), ("--run", self.run), ("--stories", self.stories),
                            ("--encoder", self.encoder), ("--decoder", self.decoder),
                            ("--tokenizer", self.tokenizer), ("--nll-data", self.nll_data)):
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{name}: path does not exist: {value}")


# ------------------------------------------------------------------------------------------ loading
def _import_train():
    """The `train` package lives at the repository root (not installed): make it importable."""
    try:
        import train.config  # noqa: F401  (probe)
    except ModuleNotFoundError:
        root = Path(__file__).resolve().parents[2]
        if not (root / "train" / "config.py").is_file():
            raise
        sys.path.insert(0, str(root))
    import train.config as tc
    import train.export as te
    import train.families as tf

    return tc, te, tf


@dataclass
class SonarAssets:
    """Paths of the SONAR encoder, decoder and tokenizer."""

    encoder: Path
    decoder: Path
    tokenizer: Path


def resolve_sonar_assets(encoder: str = "", decoder: str = "", tokenizer: str = "",
                         run_sonar: dict[str, Any] | None = None, allow_tiny: bool = True) -> SonarAssets:
    """Explicit paths, else the run config's `[sonar]` paths, else the registry, else the tiny SONAR."""
    from sonar_llm.sonar.registry import resolve_asset

    run_sonar = run_sonar or {}
    given = {"encoder": encoder or run_sonar.get("encoder", ""), "decoder": decoder or run_sonar.get("decoder", ""),
             "tokenizer": tokenizer or run_sonar.get("tokenizer", "")}
    out: dict[str, Path] = {}
    missing = []
    for name, path in given.items():
        if path:
            if not Path(path).is_file():
                raise FileNotFoundError(f"SONAR {name} file not found: {path}")
            out[name] = Path(path)
            continue
        try:
            out[name] = resolve_asset(name, None)
        except FileNotFoundError:
            missing.append(name)
    if missing:
        if not allow_tiny:
            raise FileNotFoundError(f"no SONAR {', '.join(missing)}: pass --{' --'.join(missing)} or register them")
        from sonar_llm.sonar.train_tiny import ensure_tiny_sonar

        tiny = ensure_tiny_sonar()
        for name in missing:
            out[name] = getattr(tiny, name)
    return SonarAssets(**out)


@dataclass
class LoadedModel:
    """A trained family instance with its name and the run configuration it was trained with."""

    model: nn.Module
    family: str
    run_config: dict[str, Any]
    source: str
    step: int | None = None


def _read_model_file(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"--model: file not found: {path}")
    info_path = path.with_suffix(".json")
    if not info_path.is_file():
        raise FileNotFoundError(f"--model: the export's config {info_path} is missing (train/export.py writes it)")
    info = json.loads(info_path.read_text())
    if not isinstance(info.get("run_config"), dict) or not info["run_config"]:
        raise ValueError(f"{info_path}: no 'run_config' (the training run's resolved config)")
    return load_file(str(path)), info


def load_trained(model: str = "", run: str = "", family: str = "auto", decoder: str | Path = "",
                 device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the trained family from an exported file (`model`) or a run directory (`run`).

    The run config is replayed through `train.families.build_model` with the data path cleared (the
    normalizer buffers come from the checkpoint) and, for sonar_llm, `decoder` as the frozen decoder."""
    tc, te, tf = _import_train()
    if bool(model) == bool(run):
        raise ValueError("give exactly one of model (exported .safetensors) and run (run directory)")
    if model:
        state, info = _read_model_file(Path(model))
        run_cfg, step, source = info["run_config"], info.get("step"), str(model)
    else:
        ckpt_dir = te.find_checkpoint(run)
        state = te.load_model_state(ckpt_dir)
        cfg_file = Path(run) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"--run: {cfg_file} is missing (the resolved run config)")
        run_cfg = json.loads(cfg_file.read_text())
        step, source = int((ckpt_dir / "COMPLETE").read_text().split()[0]), str(ckpt_dir)
    cfg = tc.from_dict(run_cfg)
    name = cfg.model.family
    if family != "auto" and family != name:
        raise ValueError(f"--family {family!r} does not match the trained family {name!r} ({source})")
    if name not in FAMILIES:
        raise ValueError(f"unknown family {name!r} in the run config of {source}")
    cfg.data.path = ""  # no normalizer fitting / vocabulary scan: the checkpoint holds them
    if name == "token_llm" and "vocab_size" not in cfg.model.overrides:
        if "embed.weight" not in state:
            raise ValueError(f"{source}: token_llm state has no 'embed.weight'")
        cfg.model.overrides = {**cfg.model.overrides, "vocab_size": int(state["embed.weight"].shape[0])}
    if name in ("base_lcm", "two_tower") and "sonar_dim" not in cfg.model.overrides:
        # training inferred the width from its data; the normalizer's center holds it too
        centers = [v for k, v in state.items() if k.endswith("normalizer.center")]
        if not centers:
            raise ValueError(f"{source}: {name} state has no normalizer center to read the SONAR width from")
        cfg.model.overrides = {**cfg.model.overrides, "sonar_dim": int(centers[0].numel())}
    if name == "sonar_llm":
        cfg.sonar.decoder = str(decoder) if decoder else cfg.sonar.decoder
    net = tf.build_model(cfg)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("freqs") and "rope" not in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{source}: state does not match the {name} model: missing {missing[:8]}, "
                         f"unexpected {result.unexpected_keys[:8]}")
    net = net.float().to(device).eval()
    if name == "sonar_llm":
        net.decoder_to(device, torch.float32)
    return LoadedModel(net, name, run_cfg, source, step)


def load_sonar_text(assets: SonarAssets, device: str | torch.device = "cpu", batch_size: int = 64):
    """(TextToEmbedding, EmbeddingToText, NllbTokenizer) over the assets, fp32."""
    from sonar_llm.sonar.checkpoint import load_sonar_decoder, load_sonar_encoder
    from sonar_llm.sonar.pipeline import EmbeddingToText, TextToEmbedding
    from sonar_llm.sonar.tokenizer import NllbTokenizer

    tok = NllbTokenizer(assets.tokenizer)
    enc = load_sonar_encoder(assets.encoder, dtype=torch.float32, device=device)
    dec = load_sonar_decoder(assets.decoder, dtype=torch.float32, device=device)
    return TextToEmbedding(enc, tok, batch_size=batch_size), EmbeddingToText(dec, tok, batch_size=batch_size), tok


def read_stories(path: str | Path, max_sentence_chars: int = 256) -> list[list[str]]:
    """Held-out stories (JSONL {"text"}, text or Parquet) split into sentences."""
    from sonar_llm.data.ingest import iter_documents
    from sonar_llm.data.segment import split_sentences

    if not Path(path).exists():
        raise FileNotFoundError(f"--stories: file not found: {path}")
    stories = [split_sentences(text, max_sentence_chars) for _, text in iter_documents(str(path))]
    stories = [s for s in stories if s]
    if not stories:
        raise ValueError(f"--stories: {path} holds no story with a sentence")
    return stories


def end_of_doc_text(run_cfg: dict[str, Any], explicit: str = "") -> str:
    """The end-of-document sentence the model was trained with (the data manifest), else the default."""
    if explicit:
        return explicit
    data_path = (run_cfg.get("data") or {}).get("path", "")
    if data_path:
        try:
            from sonar_llm.data.shards import read_manifest

            return str(read_manifest(data_path)["end_of_doc"]["text"])
        except (OSError, KeyError, ValueError):
            pass
    return DEFAULT_EOD_TEXT


# ------------------------------------------------------------------------------------------ generation
class _Recorder:
    """Keeps (generated embedding, its decoded text, its re-encoding) triples for the round trip."""

    def __init__(self) -> None:
        self.embeddings: list[Tensor] = []
        self.texts: list[str] = []
        self.reencoded: list[Tensor] = []

    def add(self, emb: Tensor, texts: list[str], reenc: Tensor | None = None) -> None:
        self.embeddings.append(emb.detach().float().cpu())
        self.texts.extend(texts)
        if reenc is not None:
            self.reencoded.append(reenc.detach().float().cpu())

    def round_trip(self, encode_fn: Callable[[list[str]], Tensor]) -> dict[str, float]:
        if not self.embeddings:
            return {}
        emb = torch.cat(self.embeddings)
        if emb.shape[0] == 0:
            return {}
        texts = list(self.texts)
        again = torch.cat(self.reencoded) if self.reencoded else None
        encode = (lambda _t: again) if again is not None and again.shape == emb.shape else encode_fn
        return M.round_trip(emb, lambda _e: texts, encode)


def make_generate_fn(loaded: LoadedModel, cfg: EvalConfig, t2e, e2t, tokenizer,
                     recorder: _Recorder | None = None) -> Callable[[list[list[str]]], list[list[str]]]:
    """`generate(prompts) -> continuations` for the protocol, for the loaded family."""
    from sonar_llm.models.generate import (generate_base_lcm, generate_sonar_llm, generate_token_llm,
                                           sonar_text_functions)

    model, family = loaded.model, loaded.family
    device = next(model.parameters()).device
    decode_fn, encode_fn = sonar_text_functions(t2e, e2t, cfg.lang, cfg.beam_size, cfg.max_gen_len)
    eod_text = end_of_doc_text(loaded.run_config, cfg.end_of_doc_text)
    eod_emb = encode_fn([eod_text])[0].to(device)
    threshold = cfg.eos_threshold or EOS_THRESHOLDS.get(family, 0.9)
    limit = cfg.max_story_sentences
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)

    def encode_prompts(prompts: list[list[str]]) -> list[Tensor]:
        flat = [s for p in prompts for s in p]
        emb = encode_fn(flat).to(device)
        out, i = [], 0
        for p in prompts:
            out.append(emb[i:i + len(p)])
            i += len(p)
        return out

    if family == "sonar_llm":
        def generate(prompts):
            pending: list[Tensor] = []

            def dec(e):
                texts = decode_fn(e)
                pending.append(e)
                if recorder is not None:
                    recorder.embeddings.append(e.detach().float().cpu())
                    recorder.texts.extend(texts)
                return texts

            def enc(texts):
                out = encode_fn(texts)
                if recorder is not None:
                    recorder.reencoded.append(out.detach().float().cpu())
                return out

            res = generate_sonar_llm(model, encode_prompts(prompts), dec, enc, max_sentences=limit,
                                     eos_embedding=eod_emb, eos_threshold=threshold, reencode=True)
            return [list(r.texts) for r in res]
        return generate

    if family == "base_lcm":
        def generate(prompts):
            res = generate_base_lcm(model, encode_prompts(prompts), max_sentences=limit, eos_embedding=eod_emb,
                                    eos_threshold=threshold, decode_fn=decode_fn)
            if recorder is not None:
                for r in res:
                    if r.embeddings.shape[0]:
                        recorder.add(r.embeddings, r.texts)
            return [list(r.texts) for r in res]
        return generate

    if family == "two_tower":
        def generate(prompts):
            embs = encode_prompts(prompts)
            outs: list[list[str] | None] = [None] * len(prompts)
            by_len: dict[int, list[int]] = {}
            for i, e in enumerate(embs):
                by_len.setdefault(int(e.shape[0]), []).append(i)
            for plen, idx in by_len.items():
                new = max(1, limit + 1 - plen)
                res = model.generate(torch.stack([embs[i] for i in idx]), new, eos_embedding=eod_emb,
                                     eos_threshold=threshold, num_inference_steps=cfg.num_inference_steps,
                                     guidance_scale=cfg.guidance_scale, guidance_rescale=cfg.guidance_rescale,
                                     initial_noise_scale=cfg.initial_noise_scale, generator=gen)
                for j, i in enumerate(idx):
                    e = res.embeddings[j]
                    if res.stopped_on_eos[j]:
                        e = e[:-1]  # the end-of-document concept is not part of the story
                    texts = list(decode_fn(e)) if e.shape[0] else []
                    if recorder is not None and e.shape[0]:
                        recorder.add(e, texts)
                    outs[i] = texts
            return [o or [] for o in outs]
        return generate

    if family == "token_llm":
        eos_id = tokenizer.eos_idx
        prefix = model.cfg.prefix_len
        bos = [model.cfg.bos_id] if model.cfg.prepend_bos else []

        def generate(prompts):
            ids = []
            for p in prompts:
                seq = list(bos)
                for t in tokenizer.encode_target(p, cfg.lang):
                    seq.extend(int(x) for x in list(t)[prefix:])
                ids.append(torch.tensor(seq, dtype=torch.int64, device=device))
            outs = generate_token_llm(model, ids, max_new_tokens=cfg.max_new_tokens, stop_ids=())
            conts = []
            for p, toks in zip(prompts, outs):
                sents, cur = [], []
                for t in toks:
                    if t == eos_id:
                        sents.append(cur)
                        cur = []
                    else:
                        cur.append(t)
                texts = [s.strip() for s in tokenizer.decode(sents)] if sents else []
                keep = []
                for s in texts:
                    if s == eod_text.strip() or len(p) + len(keep) > limit:
                        break
                    if s:
                        keep.append(s)
                conts.append(keep)
            return conts
        return generate

    raise ValueError(f"no generation loop for family {family!r}")


# ------------------------------------------------------------------------------------------ the command
def _run_sonar_section(cfg: EvalConfig) -> dict[str, Any] | None:
    """The `[sonar]` table of the evaluated run's config (None when it cannot be read)."""
    try:
        if cfg.model:
            info = json.loads(Path(cfg.model).with_suffix(".json").read_text())
            return (info.get("run_config") or {}).get("sonar")
        if cfg.run:
            return json.loads((Path(cfg.run) / "config.json").read_text()).get("sonar")
    except (OSError, ValueError):
        return None
    return None


def evaluate(cfg: EvalConfig, *, loaded: LoadedModel | None = None, sonar=None,
             log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run the protocol (and the token NLL when asked) and write `cfg.out`; returns the result dict."""
    if loaded is None:
        cfg.validate()
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    assets = None
    if sonar is None or loaded is None:
        assets = resolve_sonar_assets(cfg.encoder, cfg.decoder, cfg.tokenizer, _run_sonar_section(cfg))
    if sonar is None:
        sonar = load_sonar_text(assets, cfg.device)
    t2e, e2t, tokenizer = sonar
    if loaded is None:
        loaded = load_trained(cfg.model, cfg.run, cfg.family, assets.decoder, cfg.device)
    load_s = time.perf_counter() - t0
    stories = read_stories(cfg.stories)
    pcfg = ProtocolConfig(prompt_mode=cfg.prompt_mode, max_story_sentences=cfg.max_story_sentences,
                          num_stories=cfg.num_stories)
    recorder = _Recorder() if cfg.round_trip and loaded.family != "token_llm" else None
    gen_fn = make_generate_fn(loaded, cfg, t2e, e2t, tokenizer, recorder)
    torch.manual_seed(cfg.seed)
    result = run_protocol(stories, gen_fn, pcfg, batch_size=cfg.batch_size)
    if recorder is not None:
        result["metrics"].update(recorder.round_trip(lambda texts: t2e.encode(texts, cfg.lang)))
    if cfg.nll_data:
        from .nll import NLLConfig, dataset_token_nll

        if loaded.family in ("sonar_llm", "token_llm"):
            nll = dataset_token_nll(loaded.model, loaded.family, cfg.nll_data, NLLConfig(max_docs=cfg.nll_docs),
                                    device=cfg.device)
            result["metrics"].update({k: v for k, v in nll.items() if k in ("token_nll", "token_ppl")})
            result["nll"] = nll
        else:
            result["nll"] = None  # not defined for models without a token distribution
    result.update(family=loaded.family, source=loaded.source, step=loaded.step,
                  num_parameters=sum(p.numel() for p in loaded.model.parameters()),
                  settings=asdict(cfg), load_seconds=load_s)
    if cfg.out:
        write_result(result, cfg.out)
    log(metrics_table({f"{loaded.family} ({Path(loaded.source).name})": result}))
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sonar_llm.eval.evaluate", description=__doc__.split("\n\n")[0])
    d = EvalConfig()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default="", help="exported .safetensors (model.json beside it)")
    src.add_argument("--run", default="", help="training run directory (latest complete checkpoint)")
    p.add_argument("--family", default="auto", choices=("auto",) + FAMILIES)
    p.add_argument("--stories", required=True, help="held-out stories (JSONL with a 'text' field, text, Parquet)")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--prompt-mode", default=d.prompt_mode, choices=PROMPT_MODES)
    p.add_argument("--num-stories", type=int, default=d.num_stories)
    p.add_argument("--max-story-sentences", type=int, default=d.max_story_sentences)
    p.add_argument("--encoder", default="")
    p.add_argument("--decoder", default="")
    p.add_argument("--tokenizer", default="")
    p.add_argument("--lang", default=d.lang)
    p.add_argument("--beam-size", type=int, default=d.beam_size)
    p.add_argument("--max-gen-len", type=int, default=d.max_gen_len, help="SONAR decoder token cap")
    p.add_argument("--end-of-doc-text", default="")
    p.add_argument("--eos-threshold", type=float, default=0.0, help="0 = family default")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--num-inference-steps", type=int, default=d.num_inference_steps)
    p.add_argument("--guidance-scale", type=float, default=d.guidance_scale)
    p.add_argument("--guidance-rescale", type=float, default=d.guidance_rescale)
    p.add_argument("--initial-noise-scale", type=float, default=d.initial_noise_scale)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--no-round-trip", action="store_true")
    p.add_argument("--nll-data", default="", help="held-out shard directory for the token NLL")
    p.add_argument("--nll-docs", type=int, default=d.nll_docs)
    p.add_argument("--device", default=d.device)
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cfg = EvalConfig(model=a.model, run=a.run, family=a.family, stories=a.stories, out=a.out,
                     prompt_mode=a.prompt_mode, num_stories=a.num_stories,
                     max_story_sentences=a.max_story_sentences, encoder=a.encoder, decoder=a.decoder,
                     tokenizer=a.tokenizer, lang=a.lang, beam_size=a.beam_size, max_gen_len=a.max_gen_len,
                     end_of_doc_text=a.end_of_doc_text,
                     eos_threshold=a.eos_threshold, batch_size=a.batch_size,
                     num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale,
                     guidance_rescale=a.guidance_rescale, initial_noise_scale=a.initial_noise_scale, seed=a.seed,
                     max_new_tokens=a.max_new_tokens, round_trip=not a.no_round_trip, nll_data=a.nll_data,
                     nll_docs=a.nll_docs, device=a.device)
    try:
        evaluate(cfg)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(f"evaluate error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
