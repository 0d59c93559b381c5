"""LLM judge of generated story continuations, like the public SONAR-LLM `gpt_eval.py`.

    python -m sonar_llm.eval.judge generated.json --url https://api.openai.com/v1 --model gpt-4o-2024-08-06 \
        --api-key-env OPENAI_API_KEY [--concurrency 4] [--out judged.json]

`generated.json` is a list of `{"prefix", "full_text"}` records (the public `generate.py` output, or the
`public_records` of our evaluation report); the continuation is `full_text` without the prefix.

Per story, two chat turns on any OpenAI-compatible `POST {url}/chat/completions` endpoint (standard-library
HTTP, no client package): the system prompt and the first task (story beginning `***` continuation) ask for
a short review; the review is sent back as the assistant's message with the second task, which asks for
`Grammar: x/10`, `Creativity`, `Consistency`, `Plot` (and an age group). The prompt text is
`sonar_llm/assets/judge_prompt.txt` (the public script's words). `max_tokens` 512 as the public script.

Marks are read as the public `get_final_marks` does: for each answer line, the first aspect name it
contains (grammar, creativity, consistency, plot, in that order) and the number before the "/" of the
first `\\d*/\\d*` on it. A mark that is missing, unreadable or outside 1-10 is never counted as 0: the
story is listed in `unparsed` with the answer text and the aspects it lacks, and the means use the
stories that have the mark (`counts` gives n per aspect, as the public script prints it).

Transport: at most `concurrency` stories in flight; each request has a timeout; timeouts, connection
errors, HTTP 429 and 5xx and bodies that are not a chat completion are retried with exponential backoff
(`backoff * 2**attempt` seconds, at most `max_backoff`) up to `retries` times; other HTTP errors are not
retried. A story whose requests fail is listed in `failed` with the error, not scored. Every retry is said on
stderr as it happens (story, reason, attempt, delay), so a failing endpoint is never silent.

Failure: when more than `max_failed_share` of the stories failed (default 0: any), the command exits 1 with
one line giving the count and the first reasons, and writes no `--out` (the evaluation command's judge does
the same). Bad input (flags, the input file, a missing API key) exits 2 with one line (`sonar_llm.cli`).
"""
from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["ASPECTS", "JudgeConfig", "JudgePrompt", "JudgeError", "load_prompt", "parse_marks", "ChatClient",
           "judge", "check_failures", "read_records", "main"]

ASPECTS = ("grammar", "creativity", "consistency", "plot")
_MARK = re.compile(r"\d*/\d*")
_PLACEHOLDER = re.compile(r"\{(story_prompt|generation)\}")


class JudgeError(RuntimeError):
    """A chat request that failed for good (after the retries, or not retryable)."""


@dataclass
class JudgeConfig:
    """Endpoint and transport settings of the judge."""

    url: str = ""  # OpenAI-compatible base URL (".../v1") or the full ".../chat/completions" URL
    model: str = "gpt-4o-2024-08-06"  # the public gpt_eval.py's judge
    api_key_env: str = ""  # name of the environment variable holding the API key ("" = no key)
    max_tokens: int = 512
    concurrency: int = 4  # stories judged at the same time
    timeout: float = 60.0  # seconds per HTTP request
    retries: int = 5  # extra attempts after a retryable failure
    backoff: float = 1.0  # first retry delay (seconds), doubled each retry
    max_backoff: float = 60.0
    prompt_file: str = ""  # "" = the packaged sonar_llm/assets/judge_prompt.txt
    max_failed_share: float = 0.0  # the command fails (exit 1) when more than this share of the stories failed

    def validate(self, flags: str = "--") -> None:
        """ValueError naming the flag (`flags` + the field's name: "--" for the judge command, "--judge-" for
        evaluate's) of a wrong setting, and a key variable that is named but not set."""
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"{flags}url must start with http:// or https://, got {self.url!r}")
        if not self.model:
            raise ValueError(f"{flags}model: the judge model name is empty")
        for name, value, ok, rule in (("concurrency", self.concurrency, self.concurrency >= 1, ">= 1"),
                                      ("retries", self.retries, self.retries >= 0, ">= 0"),
                                      ("timeout", self.timeout, 0 < self.timeout < math.inf, "a finite number > 0"),
                                      ("backoff", self.backoff, 0 <= self.backoff < math.inf, "a finite number >= 0"),
                                      ("max-tokens", self.max_tokens, self.max_tokens >= 1, ">= 1"),
                                      ("max-failed-share", self.max_failed_share, 0.0 <= self.max_failed_share <= 1.0,
                                       "in [0, 1]")):
            if not ok:
                raise ValueError(f"{flags}{name} must be {rule}, got {value}")
        if self.api_key_env and not os.environ.get(self.api_key_env):  # said now, not after the generation
            raise ValueError(f"{flags}api-key-env {self.api_key_env}: the judge's API key variable is not set")

    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def api_key(self) -> str:
        if not self.api_key_env:
            return ""
        key = os.environ.get(self.api_key_env, "")
        if not key:
            raise ValueError(f"the judge's API key variable {self.api_key_env} is not set")
        return key


# ------------------------------------------------------------------------------------------ the prompt
@dataclass
class JudgePrompt:
    """The three texts of the judge conversation ({story_prompt} / {generation} in user_1)."""

    system: str
    user_1: str
    user_2: str

    def first_turn(self, story_prompt: str, generation: str) -> list[dict[str, str]]:
        values = {"story_prompt": story_prompt, "generation": generation}
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user_1)  # one pass: values are not re-read
        return [{"role": "system", "content": self.system}, {"role": "user", "content": user}]

    def second_turn(self, messages: list[dict[str, str]], review: str) -> list[dict[str, str]]:
        return messages + [{"role": "assistant", "content": review}, {"role": "user", "content": self.user_2}]


def load_prompt(path: str | os.PathLike = "") -> JudgePrompt:
    """Read a judge prompt file: '=== system' / '=== user_1' / '=== user_2' sections, '#' comments before."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"judge prompt file not found: {p}")
        text, name = p.read_text(encoding="utf-8"), str(p)
    else:
        text = resources.files("sonar_llm").joinpath("assets/judge_prompt.txt").read_text(encoding="utf-8")
        name = "sonar_llm/assets/judge_prompt.txt"
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.split("\n"):
        if line.startswith("=== "):
            current = line[4:].strip()
            if current in sections:
                raise ValueError(f"{name}: section {current!r} appears twice")
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
        elif line.strip() and not line.startswith("#"):
            raise ValueError(f"{name}: text before the first '=== <section>' line: {line[:60]!r}")
    want = ("system", "user_1", "user_2")
    if sorted(sections) != sorted(want):
        raise ValueError(f"{name}: sections must be exactly {want}, got {tuple(sections)}")
    body = {k: "\n".join(v).strip("\n") for k, v in sections.items()}
    for ph in ("{story_prompt}", "{generation}"):
        if ph not in body["user_1"]:
            raise ValueError(f"{name}: section user_1 has no {ph} placeholder")
    return JudgePrompt(**body)


# ------------------------------------------------------------------------------------------ the marks
def parse_marks(answer: str) -> tuple[dict[str, float], dict[str, str]]:
    """(marks, problems): marks read as the public get_final_marks; problems name each aspect not read."""
    marks: dict[str, float] = {}
    problems: dict[str, str] = {}
    for line in answer.split("\n"):
        low = line.lower()
        aspect = next((a for a in ASPECTS if a in low), None)
        if aspect is None:
            continue
        found = _MARK.findall(line)
        try:
            value = float(found[0].split("/")[0])
        except (IndexError, ValueError):
            problems.setdefault(aspect, f"no 'x/10' mark on the line {line.strip()!r}")
            continue
        if not 1.0 <= value <= 10.0:
            problems[aspect] = f"mark {value:g} outside 1-10 on the line {line.strip()!r}"
            marks.pop(aspect, None)
            continue
        marks[aspect] = value  # a later line overrides, as in the public script
        problems.pop(aspect, None)
    for a in ASPECTS:
        if a not in marks and a not in problems:
            problems[a] = "no line names it"
    return marks, problems


# ------------------------------------------------------------------------------------------ transport
class ChatClient:
    """Minimal OpenAI-compatible chat client over urllib, with timeouts and retries with backoff."""

    def __init__(self, cfg: JudgeConfig, *, sleep: Callable[[float], None] = time.sleep,
                 progress: Callable[[str], None] | None = None):
        cfg.validate()
        self.cfg = cfg
        self.url = cfg.endpoint()
        self.key = cfg.api_key()
        self.sleep = sleep
        self.progress = progress  # told about every retry ("retry 2/5 in 2.0s after HTTP 500 ...")

    def _once(self, messages: list[dict[str, str]]) -> str:
        body = json.dumps({"model": self.cfg.model, "messages": messages, "max_tokens": self.cfg.max_tokens}).encode()
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(req, timeout=self.cfg.timeout) as resp:
            raw = resp.read()
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _BadBody(f"not a chat completion ({type(e).__name__}): {raw[:200]!r}") from None
        if not isinstance(content, str):
            raise _BadBody(f"message content is {type(content).__name__}, not text")
        return content

    def complete(self, messages: list[dict[str, str]], what: str = "") -> tuple[str, int]:
        """(answer text, attempts used); JudgeError when it fails for good. `what` names the request in the
        retry messages."""
        last = ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                delay = min(self.cfg.max_backoff, self.cfg.backoff * 2 ** (attempt - 1))
                if self.progress is not None:
                    self.progress(f"judge: {what + ': ' if what else ''}{last}; retry {attempt}/{self.cfg.retries} "
                                  f"in {delay:g}s")
                self.sleep(delay)
            try:
                return self._once(messages), attempt + 1
            except urllib.error.HTTPError as e:
                detail = e.read()[:200] if e.fp is not None else b""
                last = f"HTTP {e.code} from {self.url}: {detail!r}"
                if e.code != 429 and e.code < 500:
                    raise JudgeError(last) from None
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # timeouts, resets, ...
                last = f"{type(e).__name__} from {self.url}: {getattr(e, 'reason', e)}"
            except _BadBody as e:
                last = f"bad response body from {self.url}: {e}"
        raise JudgeError(f"gave up after {self.cfg.retries + 1} attempts; last error: {last}")


class _BadBody(Exception):
    pass


# ------------------------------------------------------------------------------------------ judging
def _judge_one(client: ChatClient, prompt: JudgePrompt, index: int, story_prompt: str, generation: str) -> dict:
    item: dict[str, Any] = {"index": index, "review": None, "answer": None, "marks": {}, "problems": {},
                            "attempts": 0, "error": None}
    try:
        messages = prompt.first_turn(story_prompt, generation)
        review, n1 = client.complete(messages, f"story {index} review")
        item["review"] = review
        answer, n2 = client.complete(prompt.second_turn(messages, review), f"story {index} marks")
        item["answer"], item["attempts"] = answer, n1 + n2
    except JudgeError as e:
        item["error"] = str(e)
        return item
    item["marks"], item["problems"] = parse_marks(answer)
    return item


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def judge(story_prompts: Sequence[str], generations: Sequence[str], cfg: JudgeConfig, *,
          client: ChatClient | None = None, log: Callable[[str], None] | None = None,
          progress: Callable[[str], None] | None = _stderr) -> dict[str, Any]:
    """Judge every (prompt, continuation) pair; returns the JSON-ready judge section of a report.
    `progress` sees each retry as it happens (default: stderr)."""
    if len(story_prompts) != len(generations):
        raise ValueError(f"{len(story_prompts)} story prompts but {len(generations)} generations")
    client = client or ChatClient(cfg, progress=progress)
    prompt = load_prompt(cfg.prompt_file)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        items = list(pool.map(lambda a: _judge_one(client, prompt, *a),
                              [(i, p, g) for i, (p, g) in enumerate(zip(story_prompts, generations))]))
    counts = {a: sum(a in it["marks"] for it in items) for a in ASPECTS}
    means = {a: (sum(it["marks"][a] for it in items if a in it["marks"]) / counts[a]) if counts[a] else None
             for a in ASPECTS}
    settings = {k: v for k, v in asdict(cfg).items()}
    result = {
        "mode": "llm_judge", "model": cfg.model, "endpoint": client.url, "settings": settings,
        "num_items": len(items), "means": means, "counts": counts,
        "failed": [{"index": it["index"], "error": it["error"]} for it in items if it["error"]],
        "unparsed": [{"index": it["index"], "problems": it["problems"], "answer": it["answer"]}
                     for it in items if not it["error"] and it["problems"]],
        "items": items, "seconds": time.perf_counter() - t0,
    }
    if log:
        log(format_judge(result))
    return result


def check_failures(result: dict[str, Any], max_failed_share: float) -> None:
    """CommandFailed (exit 1, one line with the first reasons) when more than `max_failed_share` of the stories
    of a judge result failed."""
    from sonar_llm.cli import CommandFailed

    failed, n = result["failed"], result["num_items"]
    if failed and len(failed) > max_failed_share * n:
        first = "; ".join(f"story {f['index']}: {f['error']}" for f in failed[:3])
        more = f" (+{len(failed) - 3} more)" if len(failed) > 3 else ""
        raise CommandFailed(f"{len(failed)} of {n} stories failed (allowed: {max_failed_share:.0%}, "
                            f"--max-failed-share); first reasons: {first}{more}")


def format_judge(result: dict[str, Any]) -> str:
    """Mean marks as the public script prints them, plus the failed / unparsed counts."""
    lines = ["Mean scores:"]
    for a in ASPECTS:
        m = result["means"][a]
        lines.append(f"{a.capitalize():<12}: {m:.2f} (n={result['counts'][a]})" if m is not None
                     else f"{a.capitalize():<12}: — (n=0)")
    lines.append(f"{len(result['failed'])} stories failed, {len(result['unparsed'])} answers not fully parsed "
                 f"(of {result['num_items']})")
    return "\n".join(lines)


def split_records(records: Sequence[dict], source: str = "records") -> tuple[list[str], list[str]]:
    """(story prompts, continuations) from generate.py records: the continuation is full_text after the prefix."""
    prompts, gens = [], []
    for i, r in enumerate(records):
        prefix, full = r.get("prefix"), r.get("full_text")
        if not isinstance(prefix, str) or not isinstance(full, str):
            raise ValueError(f"{source}: record {i} has no string 'prefix' and 'full_text'")
        if not full.startswith(prefix):
            raise ValueError(f"{source}: record {i}: full_text does not start with its prefix")
        prompts.append(prefix)
        gens.append(full[len(prefix):])
    return prompts, gens


def add_judge_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The judge's flags (`--{prefix}url` ...), shared by this command and the evaluation command."""
    d = JudgeConfig()
    p.add_argument(f"--{prefix}url", default="", help="OpenAI-compatible base URL (e.g. https://api.openai.com/v1)")
    p.add_argument(f"--{prefix}model", default=d.model)
    p.add_argument(f"--{prefix}api-key-env", default="", help="environment variable holding the API key")
    p.add_argument(f"--{prefix}concurrency", type=int, default=d.concurrency)
    p.add_argument(f"--{prefix}timeout", type=float, default=d.timeout)
    p.add_argument(f"--{prefix}retries", type=int, default=d.retries)
    p.add_argument(f"--{prefix}backoff", type=float, default=d.backoff)
    p.add_argument(f"--{prefix}prompt-file", default="", help="default: sonar_llm/assets/judge_prompt.txt")
    p.add_argument(f"--{prefix}max-failed-share", type=float, default=d.max_failed_share,
                   help="fail (exit 1, nothing written) when more than this share of the stories failed "
                        "(default 0: any failed story; e.g. 0.05 accepts up to 5%%)")


def config_from_args(a: argparse.Namespace, prefix: str = "") -> JudgeConfig:
    g = lambda name: getattr(a, (prefix + name).replace("-", "_"))  # noqa: E731
    return JudgeConfig(url=g("url"), model=g("model"), api_key_env=g("api-key-env"), concurrency=g("concurrency"),
                       timeout=g("timeout"), retries=g("retries"), backoff=g("backoff"), prompt_file=g("prompt-file"),
                       max_failed_share=g("max-failed-share"))


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a judge input: a JSON list of {prefix, full_text}, or an evaluation report (its
    `public_records`); errors name the file (and the line of bad JSON or bytes)."""
    from sonar_llm.cli import read_utf8

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: input file not found")
    try:
        records = json.loads(read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(records, dict):  # an evaluation report
        records = records.get("public_records") or []
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: expected a JSON list of {{prefix, full_text}} records or an evaluation report")
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """The command; exit 0, 2 on bad input, 1 when more than --max-failed-share of the stories failed."""
    from sonar_llm.cli import atomic_output, check_output_path, parser, run

    def body(args: list[str]) -> int:
        p = parser("python -m sonar_llm.eval.judge", description=__doc__.split("\n")[0])
        p.add_argument("input_json", help="JSON list of {prefix, full_text} records (generate.py output)")
        p.add_argument("--out", default="", help="write the judge result (every review and answer) here")
        add_judge_arguments(p)
        a = p.parse_args(args)
        cfg = config_from_args(a)
        cfg.validate()
        if a.out:
            check_output_path(a.out)
        records = read_records(a.input_json)
        prompts, gens = split_records(records, a.input_json)
        if not prompts:
            raise ValueError(f"{a.input_json}: no records to judge")
        result = judge(prompts, gens, cfg, log=print)
        check_failures(result, cfg.max_failed_share)
        if a.out:
            with atomic_output(a.out) as tmp:
                tmp.write_text(json.dumps(result, indent=1))
        return 0

    return run("judge", body, argv)


if __name__ == "__main__":
    sys.exit(main())
