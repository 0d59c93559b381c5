"""Ahead-of-time compile check of the Triton kernels for sm_90 (no GPU needed), and its output parsers.

The compile test runs `python -m sonar_kernels.aot_check` in a subprocess without TRITON_INTERPRET (the
root conftest sets it, and the kernel modules pick their GPU autotune configs only without it) on one
representative variant and config per kernel; the full set is the CLI's job (bench/results/aot/).
"""
import json
import os
import subprocess
import sys

import pytest

from sonar_kernels import aot_check

# One variant and the largest-tile config of each kernel of aot_check.KERNEL_SPECS.
SUBSET = (r"^(lce_fwd/bf16 tf32/64x256x64 w8 s4|lce_bwd/bf16 tf32 dh/128x256x64 w8 s3"
          r"|lce_dlogits/bf16 tf32/64x256x64 w8 s4|lce_softmax_grad/bf16/"
          r"|add_ln_fwd/N=1024 bf16 residual/|add_ln_bwd/N=1024 bf16 ds)")

PTXAS_SAMPLE = """\
ptxas info    : 11 bytes gmem, 8 bytes cmem[4]
ptxas info    : Compiling entry function 'spilly' for 'sm_80'
ptxas info    : Function properties for spilly
    664 bytes stack frame, 824 bytes spill stores, 732 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 664 bytes cumulative stack size, 440 bytes cmem[0]
ptxas info    : Compile time = 1311.261 ms
ptxas info    : Compiling entry function 'clean' for 'sm_90a'
ptxas info    : Function properties for clean
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 72 registers, 1024 bytes smem, 400 bytes cmem[0]
"""

SASS_SAMPLE = """\
        /*0a50*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;    /* 0x... */
        /*0a60*/              @P0  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                    /* 0x... */
        /*0a70*/             @!P1  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                    /* 0x... */
        /*0a80*/                   WARPGROUP.ARRIVE ;                                        /* 0x... */
"""


def test_parse_ptxas_log_per_function():
    usage = aot_check.parse_ptxas_log(PTXAS_SAMPLE)
    assert set(usage) == {"spilly", "clean"}
    assert usage["spilly"] == {"regs": 255, "spill_stores": 824, "spill_loads": 732, "stack": 664, "smem": 0}
    assert usage["clean"] == {"regs": 72, "spill_stores": 0, "spill_loads": 0, "stack": 0, "smem": 1024}


def test_count_sass_opcodes_strips_modifiers_and_predicates():
    ops = aot_check.count_sass_opcodes(SASS_SAMPLE)
    assert ops == {"HGMMA": 1, "HMMA": 2, "WARPGROUP": 1}


def test_missing_ptxas_exits_2(monkeypatch, capsys):
    def missing(arch):
        raise aot_check.ToolMissing("Cannot find ptxas")

    monkeypatch.setattr(aot_check, "tool_paths", missing)
    assert aot_check.main(["--arch", "90"]) == 2
    assert "ptxas not found" in capsys.readouterr().err


def test_sm90_subset_compiles_and_fits(tmp_path):
    try:
        aot_check.tool_paths(90)
    except aot_check.ToolMissing as e:
        pytest.skip(f"no Triton NVIDIA backend or bundled ptxas/cuobjdump: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run(
        [sys.executable, "-m", "sonar_kernels.aot_check", "--arch", "90", "--only", SUBSET, "--json", str(out),
         "--jobs", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.read_text())["records"]
    assert {r["kernel"] for r in records} == {s.name for s in aot_check.KERNEL_SPECS}, "a kernel is not tested"
    for r in records:
        where = f"{r['kernel']} / {r['variant']} / {r['config']}"
        assert r["error"] is None, where + ": " + r["error"]
        assert r["shared"] <= aot_check.SMEM_LIMIT[90], where
        assert r["regs"] <= aot_check.REGS_PER_THREAD, where
        assert r["fits"], where + ": " + "; ".join(r["problems"])
        if r["kernel"] == "lce_softmax_grad":  # the gradient-in-forward row kernel (SONAR-LLM's default)
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where + ": spills registers"
        if r["kernel"] in ("lce_fwd", "lce_dlogits"):  # SONAR-LLM's hot path: bf16, no bias, no smoothing
            assert r["spill_stores"] == 0 and r["spill_loads"] == 0, where + ": spills registers"
            assert r["hgmma"] > 0, where + ": no wgmma (HGMMA) in its SASS"
