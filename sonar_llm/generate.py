"""The generation command: give a trained concept model a text, read what it writes (every family).

    python -m sonar_llm.generate --model model.safetensors --prompt "Tom had a red ball. He liked it."
    python -m sonar_llm.generate --model model.safetensors --prompts prompts.jsonl --out generations.jsonl
    cat prompts.jsonl | python -m sonar_llm.generate --run runs/default --prompts - --num-samples 3 --top-p 0.9

Model: an exported safetensors file (`train/export.py`, `model.json` beside it) or a run directory (latest
complete checkpoint), rebuilt by the library (`sonar_llm.checkpoints` + `sonar_llm.models.build`); everything
family-specific comes from the family's `FamilySpec`. SONAR assets are resolved as the evaluation command does
(`sonar_llm.eval.evaluate.resolve_sonar_assets`: `--encoder/--decoder/--tokenizer`, else the run config's
`[sonar]` paths, else the registry, else the cached tiny SONAR).

Per prompt: the text is split into sentences (`sonar_llm.data.segment.split_sentences`), encoded with SONAR in
`--source-lang`, and continued by the family's concept-level generation (`FamilySpec.generate`: SONAR-LLM
decodes and re-encodes every predicted sentence; the LCMs generate concepts, the Two-Tower with DDIM and
classifier-free guidance, `--steps/--guidance/--guidance-rescale/--noise`); every new sentence is decoded in
`--target-lang` (any of SONAR's 202 languages, e.g. fra_Latn, deu_Latn, zho_Hans: the decoder's input starts
with `</s>` and that language's tag). A story stops at the end-of-document sentence (cosine >=
`--eos-threshold`, default the family's), on a repetition (`--stop-on-repetition COSINE`: a new sentence with that
cosine to the previous one; Meta's LCM option, off by default) or after `--max-sentences` new sentences. A family without
sentence embeddings (the token LLM) continues the prompt's tokens with its own greedy decoder (the SONAR
decoder options do not apply: no sampling, no other target language); one with its own tokenizer
(`text_tokenizer`, whole stories) loads no SONAR at all.

Decoder options (`sonar_llm.sonar.generation.GenerationConfig`): beam search `--beam` (default 5, 1 = greedy),
or sampling (`--sample`, implied by `--temperature`, `--top-k K >= 1` or `--top-p`; `--top-k 0` means no top-k
filter, as in Hugging Face, and leaves beam search on) with `--seed`; caps `--max-seq-len`
(default 256 positions, prompt included, as the public SONAR-LLM generation: 254 tokens per sentence) and
`--max-gen-len` (tokens per sentence; default SONAR's rule, embedding width + 128). `--num-samples N` writes N
continuations per prompt (they differ where something is random: decoder sampling, the Two-Tower's noise; the
decoding summary's `num_samples` counts them).
Randomness: the Two-Tower's noise, and SONAR-LLM's sampled words, come from one generator per continuation
seeded from (`--seed`, prompt number, sample number) (`sonar_llm.sonar.generation.story_generator`), so a
continuation does not depend on the batch or on the other prompts; the decoder's sampling for Base-LCM and the
Two-Tower draws from one generator per batch (same `--seed` and `--batch-size` -> same output).

Output: a single prompt to a terminal streams its sentences as they are generated; several prompts print one
block per continuation, with a progress line on stderr. `--out FILE.jsonl` writes one JSON record per
continuation, in input order (prompt, then sample), once all are done (a failed run leaves the file as it was):
prompt, its sentences, the new sentences, stop reason (`end` | `repetition` | `sentence_cap`, and the token LLM's
`token_cap`: its tokens ran out, the last sentence may be unterminated; `sonar_llm.models.generate.STOP_REASONS`),
timings, and the decoding actually run (`GenerationConfig.summary`). A `--source-lang` or
`--target-lang` that the SONAR's files say it was not trained on (the tiny SONAR: English only) gets a warning.
Errors follow `sonar_llm.cli`: bad input exits 2 with one line naming the flag or file, `--debug` shows tracebacks.
Prompts are batched (`--batch-size`, sorted by length); any lengths mix in one batch, and a continuation
does not depend on the other prompts of its batch (tests/test_generate_cli.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

if __name__ == "__main__":  # the command (python -m ...), before torch loads OpenMP
    from sonar_llm.cli import wait_passively

    wait_passively()

import torch  # noqa: E402
from torch import Tensor

from sonar_llm.eval.evaluate import (
    FAMILIES,
    SAMPLING_FLAGS,
    add_sampling_arguments,
    add_stop_arguments,
    check_decoding,
    check_diffusion,
    check_sampling,
    sampling_kwargs,
    sampling_requested,
)

__all__ = ["GenerateConfig", "read_prompts", "decoding_config", "Generator", "main"]


@dataclass
class GenerateConfig:
    """The command's settings (one per flag)."""

    model: str = ""  # exported .safetensors (model.json beside it)
    verify: bool = True  # check the export's sha256 against its model.json before loading (--no-verify: off)
    run: str = ""  # or a training run directory
    family: str = "auto"  # checked against the run config's family
    prompt: str = ""  # one prompt text
    prompts: str = ""  # or a JSONL file, one prompt per line ({"prompt": ...} or similar); "-" = stdin
    out: str = ""  # JSONL output ("" = print the continuations)
    source_lang: str = "eng_Latn"  # language of the prompts (SONAR encoder)
    target_lang: str = ""  # language of the continuation ("" = source_lang)
    max_sentences: int = 32  # new sentences per continuation at most
    eos_threshold: float = 0.0  # 0 = the family's default
    end_of_doc_text: str = ""  # "" = the training data's end sentence, else "End of sequence."
    batch_size: int = 8
    num_samples: int = 1  # continuations per prompt
    seed: int = 0
    # SONAR decoder
    beam: int | None = None  # beam size (None: 5, SONAR's default; 1 = greedy)
    sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_seq_len: int = 256  # positions per sentence, [</s>, lang] included (the public SONAR-LLM value)
    max_gen_len: int | None = None  # tokens per sentence (None: SONAR's rule, width + 128)
    length_guard: float | None = 1.5  # x the decoder's longest trained target, when recorded (0/None: SONAR's rule)
    stop_on_repetition: float | None = None  # Meta's stop_on_repetition_cosine_threshold (None = off)
    # Two-Tower diffusion
    steps: int = 40
    guidance: float = 3.0
    guidance_rescale: float = 0.7
    noise: float = 0.6
    # token LLM
    max_new_tokens: int = 512
    # assets
    encoder: str = ""
    decoder: str = ""
    tokenizer: str = ""
    device: str = "cpu"

    @property
    def sampling(self) -> bool:
        """Sampling instead of beam search (`sonar_llm.eval.evaluate.sampling_requested`)."""
        return sampling_requested(self)

    def validate(self) -> None:
        if bool(self.model) == bool(self.run):
            raise ValueError("give exactly one of --model (exported .safetensors) and --run (run directory)")
        if bool(self.prompt) == bool(self.prompts):
            raise ValueError("give exactly one of --prompt TEXT and --prompts FILE.jsonl (or - for stdin)")
        if not self.prompt.strip() and not self.prompts:
            raise ValueError("--prompt: the prompt is empty (give the text to continue)")
        for name in ("max_sentences", "batch_size", "num_samples", "steps", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.family != "auto" and self.family not in FAMILIES:
            raise ValueError(f"--family must be 'auto' or one of {FAMILIES}, got {self.family!r}")
        if not 0.0 <= self.eos_threshold <= 1.0:
            raise ValueError(f"--eos-threshold must be a cosine in [0, 1] (0 = the family's default), "
                             f"got {self.eos_threshold}")
        check_decoding(self)
        check_sampling(self, self.beam, "--beam")
        check_diffusion(self.steps, self.guidance, self.guidance_rescale, self.noise,
                        ("--steps", "--guidance", "--guidance-rescale", "--noise"))
        for name, value in (("--model", self.model), ("--run", self.run), ("--encoder", self.encoder),
                            ("--decoder", self.decoder), ("--tokenizer", self.tokenizer)):
            if value and not Path(value).exists():
                raise FileNotFoundError(f"{name}: path does not exist: {value}")
        if self.prompts and self.prompts != "-" and Path(self.prompts).is_dir():
            raise IsADirectoryError(f"--prompts: {self.prompts} is a folder (expected a prompts file, JSONL or one "
                                    "prompt per line, or - for stdin)")
        if self.prompts and self.prompts != "-" and not Path(self.prompts).is_file():
            raise FileNotFoundError(f"--prompts: file not found: {self.prompts}")


def read_prompts(source: str, stream: TextIO | None = None) -> list[str]:
    """Prompt texts of a JSONL file (or `stream` for "-"): per non-empty line {"prompt": text}, {"text": text}
    or a JSON string; any other line is plain text, including one that opens with a quote but is not a JSON
    string (`"Hi," said Tom.`). A line starting with `{` must be a JSON object. Text that is not UTF-8 is refused
    naming the file and line."""
    from sonar_llm.cli import read_utf8

    name = "<stdin>" if source == "-" else source
    if source == "-":
        try:
            text = (stream or sys.stdin).read()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts <stdin>: not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        text = read_utf8(source, "--prompts")
    lines = text.splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if line[0] not in '{"':
            out.append(line)
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            if line[0] == '"':  # dialogue opening a story, not a JSON string
                out.append(line)
                continue
            raise ValueError(f"--prompts {name}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(value, dict):
            value = value.get("prompt", value.get("text"))
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"--prompts {name}:{n}: expected {{\"prompt\": text}}, {{\"text\": text}} "
                             "or a JSON string")
        out.append(value)
    if not out:
        raise ValueError(f"--prompts {name}: no prompt in it")
    return out


def decoding_config(cfg: GenerateConfig):
    """The SONAR decoder's `GenerationConfig` for these flags (one sample per embedding)."""
    from sonar_llm.sonar.generation import GenerationConfig

    beam = 1 if cfg.sampling else 5 if cfg.beam is None else cfg.beam  # sampling: no beam (summary says so)
    kw: dict[str, Any] = dict(beam_size=beam, max_seq_len=cfg.max_seq_len, length_guard=cfg.length_guard or None)
    if cfg.max_gen_len is not None:
        kw["max_gen_len"] = cfg.max_gen_len
    if cfg.sampling:
        kw.update(sampling_kwargs(cfg))
    return GenerationConfig(**kw)


class _StreamedTexts:
    """The decode_fn of a streamed story: `decode_new(emb)` decodes the concepts of one step for the terminal and
    queues each row's text under its values; a later call (the family decoding its story at the end) takes the
    queued texts first, in order, and decodes only the rest. So the printed and the returned sentences are the
    same decoding (also when sampling), decoded once; equal concepts still get a decoding each."""

    def __init__(self, decode: Callable[[Tensor], list[str]]) -> None:
        self.decode = decode
        self.queued: dict[bytes, deque[str]] = defaultdict(deque)

    @staticmethod
    def _key(row: Tensor) -> bytes:
        return row.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()

    def decode_new(self, emb: Tensor) -> list[str]:
        texts = list(self.decode(emb))
        for row, text in zip(emb, texts):
            self.queued[self._key(row)].append(text)
        return texts

    def __call__(self, emb: Tensor, draws: list[torch.Generator] | None = None) -> list[str]:
        out: list[str | None] = [None] * emb.shape[0]
        todo = []
        for i, row in enumerate(emb):
            queue = self.queued.get(self._key(row))
            if queue:
                out[i] = queue.popleft()
            else:
                todo.append(i)
        if todo:
            kw = {} if draws is None else {"draws": [draws[i] for i in todo]}  # the rows' own generators
            for i, text in zip(todo, self.decode(emb[todo], **kw)):
                out[i] = text
        return out  # type: ignore[return-value]


@dataclass
class Continuation:
    """One generated continuation (one JSONL record)."""

    index: int  # prompt number (input order)
    sample: int
    prompt: str
    prompt_sentences: list[str]
    sentences: list[str] = field(default_factory=list)
    stop_reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    embeddings: Tensor | None = None  # the new sentences' concepts [len(sentences), E] (concept families)


class Generator:
    """A loaded model + SONAR, ready to continue prompts (`continue_prompts`)."""

    def __init__(self, cfg: GenerateConfig) -> None:
        from sonar_llm.checkpoints import read_exported, read_run
        from sonar_llm.eval.evaluate import end_of_doc_text, load_sonar_text, resolve_sonar_assets
        from sonar_llm.models.build import build_trained
        from sonar_llm.models.family import get_family

        t0 = time.perf_counter()
        self.cfg = cfg
        weights = read_exported(cfg.model, verify=cfg.verify) if cfg.model else read_run(cfg.run)
        self.family = weights.run_config["model"]["family"]
        if cfg.family not in ("auto", self.family):
            raise ValueError(f"--family {cfg.family}: {weights.source} holds a {self.family!r} model")
        self.spec = get_family(self.family)
        # a token LLM with its own tokenizer (`text_tokenizer`) reads and writes text itself: no SONAR is loaded
        own_text = not self.spec.concept_level and bool((weights.run_config["model"].get("overrides") or {})
                                                        .get("text_tokenizer"))
        self.assets = None if own_text else resolve_sonar_assets(cfg.encoder, cfg.decoder, cfg.tokenizer,
                                                                 weights.run_config.get("sonar"))
        self.model = build_trained(weights, decoder="" if own_text else str(self.assets.decoder),
                                   device=cfg.device).eval()
        self.t2e, self.e2t, self.tokenizer = (None, None, None) if own_text else load_sonar_text(self.assets, cfg.device)
        self.target_lang = cfg.target_lang or cfg.source_lang
        self.warnings: list[str] = []  # printed on stderr by `generate`
        trained = None if own_text else trained_languages(self.assets.decoder)
        for flag, lang in () if own_text else (("--source-lang", cfg.source_lang), ("--target-lang", self.target_lang)):
            try:
                self.tokenizer.lang_id(lang)
            except ValueError as e:
                raise ValueError(f"{flag}: {e} (tokenizer {self.assets.tokenizer})") from None
            if trained is not None and lang not in trained and (flag == "--source-lang" or cfg.target_lang):
                self.warnings.append(
                    f"warning: {flag} {lang}: this SONAR ({self.assets.decoder}) was trained on "
                    f"{', '.join(trained)} only; its tokenizer knows the tag, but expect no {lang} text")
        if not self.spec.concept_level:
            if self.target_lang != cfg.source_lang:
                raise ValueError(f"--target-lang: a {self.family} model writes tokens itself, in the prompt's "
                                 "language; only concept models decode into another language")
            if cfg.sampling:
                raise ValueError(f"sampling ({SAMPLING_FLAGS}) does not apply to a {self.family} "
                                 "model: it decodes its own tokens greedily")
        self.decoding = decoding_config(cfg)
        self.eod_text = end_of_doc_text(weights.run_config, cfg.end_of_doc_text)
        self.eos_embedding = None if own_text else self.t2e.encode([self.eod_text], cfg.source_lang)[0]
        self.eos_threshold = cfg.eos_threshold or self.spec.eos_threshold
        self.step = weights.step
        self.source = weights.source
        self.load_seconds = time.perf_counter() - t0

    def decoding_summary(self) -> dict[str, Any] | None:
        """What the SONAR decoder runs (None for a family that decodes its own tokens)."""
        if not self.spec.concept_level:
            return None
        out = self.decoding.summary(self.e2t.decoder.cfg)
        out["num_samples"] = self.cfg.num_samples  # continuations per prompt (each decodes one sample per sentence)
        if not out.get("do_sample"):  # beam search draws nothing: a "seed": null here read as --seed being ignored
            out.pop("seed", None)
        return out

    def continue_prompts(self, prompts: list[str], *, indices: list[int] | None = None,
                         samples: list[int] | None = None,
                         stream: Callable[[int, str], None] | None = None) -> list[Continuation]:
        """Continue `prompts` as one batch (`num_samples` continuations each, prompt-major). `indices`: the
        prompts' numbers (records, and the seeds of the random draws; default 0, 1, ...). `samples`: one sample
        number per prompt, which then gets that one continuation only (a prompt may repeat: how the command
        splits many samples of a prompt over batches). `stream(k, text)` sees each new sentence of continuation
        k as it is generated (concept families)."""
        from sonar_llm.data.segment import split_sentences
        from sonar_llm.models.generate import STOP_SENTENCE_CAP

        cfg = self.cfg
        indices = list(range(len(prompts))) if indices is None else list(indices)
        numbers = [None] * len(prompts) if samples is None else list(samples)
        stories = []
        for i, text, sample in zip(indices, prompts, numbers):
            sents = split_sentences(text)
            if not sents:
                raise ValueError(f"prompt {i + 1} has no sentence: {text!r}")
            stories += [Continuation(i, j, text, sents)
                        for j in (range(cfg.num_samples) if sample is None else [sample])]
        # the family limit counts the story (prompt included) and allows one more: room for max_sentences new
        # ones after the longest prompt; each continuation is cut at its own max_sentences below
        limit = max(len(s.prompt_sentences) for s in stories) + cfg.max_sentences - 1
        t0 = time.perf_counter()
        if self.spec.concept_level:
            results = self._concepts(stories, limit, stream)
        else:
            results = self._stories(stories, limit)
        seconds = time.perf_counter() - t0
        for s, (sents, by_eos, emb) in zip(stories, results):
            s.sentences = sents[: cfg.max_sentences]
            s.embeddings = None if emb is None else emb[: cfg.max_sentences]
            if len(sents) >= cfg.max_sentences:
                s.stop_reason = STOP_SENTENCE_CAP
            else:
                s.stop_reason = by_eos
            s.timings = {"batch_seconds": round(seconds, 4), "batch_size": len(stories),
                         "seconds_per_sentence": round(seconds / max(1, sum(len(x[0]) for x in results)), 4)}
        return stories

    def _concepts(self, stories: list[Continuation], limit: int, stream) -> list[tuple[list[str], str, Tensor]]:
        from sonar_llm.models.generate import GenerationSettings, end_reader, sonar_text_functions
        from sonar_llm.sonar.generation import make_generator, story_generator

        cfg = self.cfg
        device = next(self.model.parameters()).device
        flat = [t for s in stories for t in s.prompt_sentences]
        emb = self.t2e.encode(flat, cfg.source_lang).to(device)
        prompts, i = [], 0
        for s in stories:
            prompts.append(emb[i:i + len(s.prompt_sentences)])
            i += len(s.prompt_sentences)
        decode_fn, encode_fn = sonar_text_functions(self.t2e, self.e2t, self.target_lang, cfg=self.decoding,
                                                    generator=make_generator(self.decoding, self.e2t.device))
        on_step = None
        if stream is not None:
            decode_fn = streamed = _StreamedTexts(decode_fn)

            def on_step(indices: list[int], concepts: Tensor, texts: list[str] | None) -> None:
                texts = streamed.decode_new(concepts) if texts is None else texts  # SONAR-LLM decoded them already
                for k, text in zip(indices, texts):
                    stream(k, text)

        settings = GenerationSettings(
            eos_embedding=self.eos_embedding.to(device), max_sentences=limit, eos_threshold=self.eos_threshold,
            decode_fn=decode_fn, encode_fn=encode_fn, num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
            guidance_rescale=cfg.guidance_rescale, initial_noise_scale=cfg.noise,
            generator=[story_generator(cfg.seed, s.index, s.sample) for s in stories], on_step=on_step,
            decode_draws=[story_generator(cfg.seed, s.index, s.sample, self.e2t.device) for s in stories]
            if self.decoding.do_sample else None,
            stop_on_repetition_cosine_threshold=cfg.stop_on_repetition,
            reads_as_end=end_reader(self.e2t, self.eod_text, self.target_lang, self.decoding))
        res = self.spec.generate(self.model, prompts, settings)
        return [(list(r.texts), r.stop_reason, r.embeddings) for r in res]

    def _stories(self, stories: list[Continuation], limit: int) -> list[tuple[list[str], str, None]]:
        from sonar_llm.models.generate import GenerationSettings
        from sonar_llm.models.stories import StoryContext

        cfg = self.cfg
        settings = GenerationSettings(eos_embedding=self.eos_embedding, max_sentences=limit)
        ctx = StoryContext(settings, end_of_doc_text=self.eod_text, tokenizer=self.tokenizer, lang=cfg.source_lang,
                           max_new_tokens=cfg.max_new_tokens)
        conts = self.spec.story_generator(self.model, ctx)([s.prompt_sentences for s in stories])
        return [(list(c), c.stop_reason, None) for c in conts]


def trained_languages(decoder: str | Path) -> list[str] | None:
    """The languages a SONAR decoder was trained on, where its files record them (the tiny SONAR's
    `tiny_sonar.json` beside its decoder: {"tokenizer": {"lang"}}, or {"languages": [...]}); None when
    nothing records them (a released SONAR: the 202 languages of its tokenizer)."""
    from sonar_llm.sonar.train_tiny import DECODER_FILE, INFO_FILE

    path = Path(decoder)
    info_file = path.with_name(INFO_FILE)
    if path.name != DECODER_FILE or not info_file.is_file():
        return None
    try:
        info = json.loads(info_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    langs = info.get("languages") or [(info.get("tokenizer") or {}).get("lang")]
    langs = [x for x in langs if isinstance(x, str)]
    return langs or None


def _record(g: Generator, c: Continuation) -> dict[str, Any]:
    return {"prompt": c.prompt, "prompt_index": c.index, "sample": c.sample, "prompt_sentences": c.prompt_sentences,
            "sentences": c.sentences, "continuation": " ".join(c.sentences), "stop_reason": c.stop_reason,
            "timings": c.timings, "family": g.family, "model": g.source, "step": g.step,
            "source_lang": g.cfg.source_lang, "target_lang": g.target_lang, "decoding": g.decoding_summary(),
            "seed": g.cfg.seed}


def generate(cfg: GenerateConfig, *, stdout: TextIO | None = None, stderr: TextIO | None = None,
             stdin: TextIO | None = None) -> list[Continuation]:
    """Run the command: load, continue every prompt (batched by length), print or write JSONL."""
    from sonar_llm.cli import atomic_output, check_device, check_output_path

    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    cfg.validate()
    check_device(cfg.device)
    if cfg.out:
        check_output_path(cfg.out)
    texts = [cfg.prompt] if cfg.prompt else read_prompts(cfg.prompts, stdin)
    g = Generator(cfg)
    for line in g.warnings:
        print(line, file=stderr, flush=True)
    print(f"[generate] {g.family} from {g.source} (step {g.step}); {len(texts)} prompt(s) x {cfg.num_samples}, "
          f"{g.cfg.source_lang} -> {g.target_lang}; decoding {json.dumps(g.decoding_summary())} "
          f"(loaded in {g.load_seconds:.1f}s)", file=stderr, flush=True)
    to_file = bool(cfg.out)
    streaming = len(texts) == 1 and cfg.num_samples == 1 and not to_file and g.spec.concept_level
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths share a batch
    # (prompt, sample) pairs, --batch-size of them per batch: the samples of one prompt may span batches
    units = [(i, j) for i in order for j in range(cfg.num_samples)]
    what = "prompts" if cfg.num_samples == 1 else "continuations"
    done: list[Continuation] = []
    t0 = time.perf_counter()

    def stream(_k: int, text: str) -> None:
        print("  " + text, file=stdout, flush=True)

    for start in range(0, len(units), cfg.batch_size):
        chunk = units[start:start + cfg.batch_size]
        if streaming:
            print(texts[0], file=stdout, flush=True)
        conts = g.continue_prompts([texts[i] for i, _ in chunk], indices=[i for i, _ in chunk],
                                   samples=[j for _, j in chunk], stream=stream if streaming else None)
        for c in conts:
            done.append(c)
            if to_file:
                continue
            if not streaming:
                sample = f", sample {c.sample + 1}" if cfg.num_samples > 1 else ""
                print(f"--- prompt {c.index + 1}{sample} ---\n{c.prompt}", file=stdout)
                for sent in c.sentences:
                    print("  " + sent, file=stdout)
            print(f"  [{c.stop_reason}]", file=stdout, flush=True)
        if len(units) > 1:
            n = min(start + cfg.batch_size, len(units))
            elapsed = time.perf_counter() - t0
            print(f"[generate] {n}/{len(units)} {what}, {elapsed:.1f}s, {elapsed / n:.2f}s per {what[:-1]}",
                  file=stderr, flush=True)
    done.sort(key=lambda c: (c.index, c.sample))  # input order (batches are sorted by length)
    if to_file:  # written once every continuation is done: a failed run leaves no partial or changed file
        with atomic_output(cfg.out) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for c in done:
                f.write(json.dumps(_record(g, c), ensure_ascii=False) + "\n")
        print(f"[generate] wrote {len(done)} continuations to {cfg.out}", file=stderr, flush=True)
    return done


def _parser() -> argparse.ArgumentParser:
    from sonar_llm.cli import parser

    p = parser("python -m sonar_llm.generate", description=__doc__.split("\n\n")[0],
               epilog="examples:\n" + __doc__.split("\n\n")[1] + "\n\ndetails: docs/generation.md",
               formatter_class=argparse.RawDescriptionHelpFormatter)
    d = GenerateConfig()
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", default="", help="exported .safetensors (model.json beside it)")
    src.add_argument("--run", default="", help="training run directory (latest complete checkpoint)")
    p.add_argument("--family", default="auto", help="check the model's family (default: read it from the run config)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the sha256 check of the --model export against its model.json (load a file known to differ)")
    pr = p.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", default=None, help="one prompt text")
    pr.add_argument("--prompts", default="", help="one prompt per line: {\"prompt\": ...} or {\"text\": ...}, "
                    "a JSON string, or plain text (a line starting with { must be JSON); - = stdin")
    p.add_argument("--out", default="", help="write JSONL records here instead of printing")
    p.add_argument("--source-lang", default=d.source_lang, help="prompt language (SONAR code, e.g. eng_Latn)")
    p.add_argument("--target-lang", default="", help="continuation language (default: the source language)")
    p.add_argument("--max-sentences", type=int, default=d.max_sentences, help="new sentences per continuation")
    p.add_argument("--eos-threshold", type=float, default=0.0,
                   help="cosine in [0, 1] with the end sentence that stops a story; 0 = the family's default")
    p.add_argument("--end-of-doc-text", default="", help="end sentence (default: the training data's)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="continuations per batch")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="continuations per prompt")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the sampling and of the Two-Tower's noise")
    g = p.add_argument_group("SONAR decoder")
    g.add_argument("--beam", "--beam-size", dest="beam", type=int, default=None,
                   help="beam size (1 = greedy; default 5, SONAR's); --beam-size is the evaluate command's name for it")
    add_sampling_arguments(g)
    g.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="positions per sentence, [</s>, lang] included (default 256, the public SONAR-LLM value)")
    g.add_argument("--max-gen-len", type=int, default=None,
                   help="tokens per sentence, EOS included (default: SONAR's rule, embedding width + 128)")
    add_stop_arguments(g, d.length_guard)
    t = p.add_argument_group("Two-Tower diffusion")
    t.add_argument("--steps", type=int, default=d.steps, help="requested DDIM steps per concept")
    t.add_argument("--guidance", type=float, default=d.guidance, help="classifier-free guidance scale")
    t.add_argument("--guidance-rescale", type=float, default=d.guidance_rescale, help="guidance rescale factor")
    t.add_argument("--noise", type=float, default=d.noise, help="std of the initial latent")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="token LLM: tokens per continuation")
    p.add_argument("--encoder", default="", help="SONAR encoder (default: run config, registry, tiny SONAR)")
    p.add_argument("--decoder", default="", help="SONAR decoder (default: run config, registry, tiny SONAR)")
    p.add_argument("--tokenizer", default="", help="SONAR tokenizer (default: run config, registry, tiny SONAR)")
    p.add_argument("--device", default=d.device, help="cpu, cuda or cuda:N (must exist on this machine)")
    return p


def main(argv: list[str] | None = None, *, stdin: TextIO | None = None) -> int:
    """The command; exit 0, 2 on bad input (one line on stderr), 1 when the work fails (sonar_llm.cli)."""
    from sonar_llm.cli import UsageError, run

    def body(args: list[str]) -> int:
        a = vars(_parser().parse_args(args))
        a.pop("debug")
        if a["prompt"] is not None and not a["prompt"].strip():
            raise UsageError("--prompt: the prompt is empty (give the text to continue)")
        a["prompt"] = a["prompt"] or ""
        generate(GenerateConfig(**a), stdin=stdin)
        return 0

    return run("generate", body, argv)


if __name__ == "__main__":
    sys.exit(main())
