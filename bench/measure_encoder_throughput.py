"""SONAR text-encoder throughput at the real `basic` shapes with random weights (sentences/s).

    python bench/measure_encoder_throughput.py [--seconds 20] [--batch 64] [--tokens 18] [--dtype fp32|bf16]

TinyStories-length sentences are about 16 words, so 18 tokens with the language tag and </s>. Runs on the
GPU when there is one (use --dtype bf16 there), else on the CPU with torch's default thread count.
"""
from __future__ import annotations

import sys
import time

import torch

from sonar_llm.sonar import SonarEncoderConfig, SonarTextEncoder
from sonar_llm.sonar.checkpoint import DTYPES


def main(argv=None) -> int:
    """The command; errors follow sonar_llm.cli (bad input: exit 2, one line)."""
    from sonar_llm.cli import run

    return run("measure_encoder_throughput", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import float_in, int_at_least, parser

    ap = parser("bench/measure_encoder_throughput.py", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float_in(0, 86400, low_open=True), default=20.0, help="time to measure")
    ap.add_argument("--batch", type=int_at_least(1), default=64, help="sentences per forward")
    ap.add_argument("--tokens", type=int_at_least(2), default=18, help="tokens per sentence (tag and </s> included)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and compute dtype")
    a = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with torch.device("meta"):
        enc = SonarTextEncoder(SonarEncoderConfig.from_preset("basic"))
    enc = enc.to_empty(device=device)
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.02)
    enc = enc.to(DTYPES[a.dtype]).eval()
    tokens = torch.randint(4, 256000, (a.batch, a.tokens), device=device)
    mask = torch.ones(a.batch, a.tokens, dtype=torch.bool, device=device)
    with torch.inference_mode():
        enc(tokens, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < a.seconds:
            enc(tokens, mask)
            n += a.batch
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"basic SONAR encoder, {where}, {a.dtype}, batch {a.batch}x{a.tokens}: {n / dt:.1f} sentences/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
