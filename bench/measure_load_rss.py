"""Measure the peak resident memory of loading a SONAR decoder checkpoint, against the file size.

Writes a full-width (d=1024, FFN 8192), full-vocabulary (256,206) decoder with few layers (default 2) to a
temporary folder, then loads it in fresh subprocesses with ``load_sonar_decoder`` and reports
``ru_maxrss`` after import, after loading, and after one forward step (which touches every weight).
The loader memory-maps the file and assigns tensors into a meta-built model, so the peak should stay near
one copy of the weights (file-backed pages), not two.

    python bench/measure_load_rss.py [--layers 2] [--dir /tmp] [--dtype float32] [--format safetensors]

Measured on the CPU dev box (2 layers, fp32 file of 1193 MiB): loading adds 13 MiB; after a forward that
touches every weight the peak is 1.015x the file size; with a bf16 conversion at load time 1.51x.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
from sonar_llm.sonar import load_sonar_decoder
def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
out = {"after_import_mib": rss_mib()}
t = time.perf_counter()
dec = load_sonar_decoder(sys.argv[1], dtype=(None if sys.argv[2] == "keep" else sys.argv[2]))
out["load_s"] = time.perf_counter() - t
out["after_load_mib"] = rss_mib()
with torch.inference_mode():
    dec(torch.tensor([[3, 256047, 100]]), torch.randn(1, 1024, dtype=dec.final_proj.weight.dtype))
out["after_forward_mib"] = rss_mib()
print(json.dumps(out))
"""


_WRITER = r"""
import sys
import torch
from sonar_llm.sonar import SonarTextDecoder, decoder_preset, save_fairseq2_checkpoint
with torch.device("meta"):
    dec = SonarTextDecoder(decoder_preset("basic", num_layers=int(sys.argv[2])))
dec.to_empty(device="cpu")
with torch.no_grad():
    for p in dec.parameters():
        p.normal_(0, 0.02)
dec.tie_weights()
save_fairseq2_checkpoint(dec, sys.argv[1])
if sys.argv[3] == "safetensors":
    from sonar_llm.sonar import convert_to_safetensors
    del dec
    convert_to_safetensors(sys.argv[1], sys.argv[1] + ".safetensors")
"""


_LOAD_DTYPES = ("keep", "fp32", "bf16", "fp16", "float32", "bfloat16", "float16")


def main(argv: list[str] | None = None) -> int:
    """The command; errors follow sonar_llm.cli (bad input: exit 2, one line). Imports no torch (see below)."""
    from sonar_llm.cli import run

    return run("measure_load_rss", _main, argv)


def _main(argv: list[str]) -> int:
    from sonar_llm.cli import int_at_least, parser

    ap = parser("bench/measure_load_rss.py", description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int_at_least(1), default=2, help="decoder layers of the written checkpoint")
    ap.add_argument("--dir", default=None, help="where to write the temporary checkpoint (an existing folder)")
    ap.add_argument("--dtype", default="keep", choices=_LOAD_DTYPES, help="dtype requested at load time (keep = file dtype)")
    ap.add_argument("--format", choices=["pt", "safetensors"], default="pt", help="checkpoint file format")
    args = ap.parse_args(argv)
    if args.dir is not None and not os.path.isdir(args.dir):
        raise FileNotFoundError(f"--dir: not a folder: {args.dir}")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # This process stays small (no torch import): Linux keeps ru_maxrss across exec, so a big parent
    # would inflate the child's figure.
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "decoder.pt")
        subprocess.run([sys.executable, "-c", _WRITER, path, str(args.layers), args.format], check=True, env=env)
        if args.format == "safetensors":
            path += ".safetensors"
        size_mib = os.path.getsize(path) / 2**20
        res = subprocess.run([sys.executable, "-c", _CHILD, path, args.dtype], check=True,
                             capture_output=True, text=True, env=env)
        stats = json.loads(res.stdout.strip().splitlines()[-1])
    stats["file_mib"] = size_mib
    stats["load_delta_mib"] = stats["after_load_mib"] - stats["after_import_mib"]
    stats["forward_delta_mib"] = stats["after_forward_mib"] - stats["after_import_mib"]
    stats["peak_delta_over_file"] = stats["forward_delta_mib"] / size_mib
    print(json.dumps({k: round(v, 3) for k, v in stats.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
