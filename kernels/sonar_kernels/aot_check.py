"""Ahead-of-time compile check of the Triton kernels for real NVIDIA targets, on a machine without a GPU.

The test suite runs the kernels only in the Triton interpreter, which cannot see what breaks on hardware:
tl.dot shape/dtype rules, shared memory over the per-block limit, register spills, PTX/ptxas failures.
This module compiles every kernel of `triton_kernels/` for every autotune config it has on a GPU and every
constexpr variant our launchers use (`KERNEL_SPECS`, the one list to extend when a kernel is added),
for sm_90 (H100/H200) and sm_80 (A100), with `triton.compile` + the ptxas bundled with Triton. Per compiled
kernel it reports shared memory (Triton's metadata), registers and spills (parsed from `ptxas -v` run on
the kernel's PTX with Triton's own flags), whether it fits the target's limits, and the HGMMA (wgmma) /
HMMA instruction counts of its SASS (`cuobjdump --dump-sass`).

    python -m sonar_kernels.aot_check [--arch 90 80] [--json OUT] [--markdown OUT] [--only REGEX]

Exit status: 0 all compiled and fit, 1 a compile error or a limit exceeded, 2 ptxas/cuobjdump not found.
The GPU autotune configs exist only when TRITON_INTERPRET is unset when the kernel modules are imported:
the check clears it (and SONAR_KERNELS_AUTOTUNE, whose "0" keeps one config) and refuses to run in a
process that already imported them in interpreter mode.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import io
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

# Per-block limits: dynamic shared memory (bytes) and the register file (32-bit registers).
SMEM_LIMIT = {90: 232448, 80: 166912}  # H100/H200: 227 KiB, A100: 163 KiB
REGS_PER_THREAD = 255
REGS_PER_BLOCK = 65536

# A realistic launch: the SONAR decoder (D=1024, V=256206) on an odd token count. Values matter only
# through the JIT's specialisation (an int equal to 1 becomes a constant, multiples of 16 get a hint).
_N, _V, _D = 4099, 256206, 1024


def _lce_dtypes(mod) -> list[tuple[str, torch.dtype, bool, str]]:
    """(label, dtype, UPCAST, DOT_PRECISION) as `_dot_settings` gives them on a GPU with torch's defaults
    (fp32: 3xTF32; plain TF32, with allow_tf32, has the same tiles and fewer instructions)."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        return [(label, dtype, *mod._dot_settings(dtype))
                for label, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32))]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _lce_common(mod, dtype, bias: bool) -> dict:
    return dict(h_ptr=dtype, w_ptr=dtype, b_ptr=dtype if bias else None, t_ptr=torch.int64, N=_N, V=_V, D=_D,
                N_BUCKET=mod._n_bucket(_N), stride_hn=_D, stride_hd=1, stride_wv=_D, stride_wd=1)


def _lce_fwd_variants(mod) -> list[tuple[str, dict]]:
    out = []
    for label, dtype, upcast, precision in _lce_dtypes(mod):
        for bias in (False, True):
            for smooth in (False, True):
                args = _lce_common(mod, dtype, bias) | dict(
                    lse_ptr=torch.float32, zt_ptr=torch.float32, zsum_ptr=torch.float32 if smooth else None,
                    V_PER_SPLIT=16 * mod._SPLIT_ALIGN, HAS_BIAS=bias, SMOOTH=smooth, UPCAST=upcast,
                    DOT_PRECISION=precision)
                out.append((f"{label} {precision}{' bias' if bias else ''}{' smooth' if smooth else ''}", args))
    return out


def _lce_bwd_variants(mod) -> list[tuple[str, dict]]:
    out = []
    # frozen weight (d_hidden only, the case that matters), and everything (d_hidden, d_weight, d_bias)
    for bias, smooth, dw in ((False, False, False), (True, True, True)):
        for label, dtype, upcast, precision in _lce_dtypes(mod):
            args = _lce_common(mod, dtype, bias) | dict(
                lse_ptr=torch.float32, g_ptr=torch.float32, dh_ptr=torch.float32,
                dw_ptr=torch.float32 if dw else None, db_ptr=torch.float32 if dw else None,
                target_weight=0.9, uniform_weight=0.1 / _V, HAS_BIAS=bias, SMOOTH=smooth, UPCAST=upcast,
                DOT_PRECISION=precision, COMPUTE_DH=True, COMPUTE_DW=dw, COMPUTE_DB=dw)
            out.append((f"{label} {precision} {'dh+dw+db bias smooth' if dw else 'dh'}", args))
    return out


def _lce_dlogits_variants(mod) -> list[tuple[str, dict]]:
    out = []
    for bias, smooth in ((False, False), (True, True)):
        for label, dtype, upcast, precision in _lce_dtypes(mod):
            buf = torch.float32 if upcast else dtype  # as `_backward_dlogits` allocates it: [rows, V]
            rows = min(_N, mod.dlogits_chunk_rows(_V, torch.finfo(buf).bits // 8))
            args = _lce_common(mod, dtype, bias) | dict(
                N=rows, N_BUCKET=mod._n_bucket(rows), lse_ptr=torch.float32, g_ptr=torch.float32, out_ptr=buf,
                stride_on=_V, target_weight=0.9, uniform_weight=0.1 / _V, HAS_BIAS=bias, SMOOTH=smooth,
                UPCAST=upcast, DOT_PRECISION=precision)
            out.append((f"{label} {precision}{' bias smooth' if bias else ''}", args))
    return out


def _lce_softmax_grad_variants(mod) -> list[tuple[str, dict]]:
    """The row kernel of the gradient-in-forward strategy: fp32 logits in, the unit dlogits out in the input
    dtype (GPU half inputs: a separate buffer for the tensor-core GEMM) or in place (fp32)."""
    out = []
    for label, out_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for smooth, zloss in ((False, False), (True, True)):
            args = dict(z_ptr=torch.float32, out_ptr=out_dtype, t_ptr=torch.int64, loss_ptr=torch.float32,
                        lse_ptr=torch.float32, V=_V, stride_z=_V, stride_o=_V, ignore_index=-100,
                        target_weight=0.9, uniform_weight=0.1 / _V, z_loss=1e-4, SMOOTH=smooth, ZLOSS=zloss,
                        BLOCK_V=mod.SOFTMAX_GRAD_BLOCK_V, num_warps=mod.SOFTMAX_GRAD_WARPS, num_stages=1)
            out.append((f"{label}{' smooth zloss' if smooth else ''}", args))
    return out


def _ln_shapes(mod):
    for n in (1024, 256):
        block_m, block_n = mod._block_sizes(n)
        for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            yield f"N={n} {label}", n, dtype, dict(BLOCK_M=block_m, BLOCK_N=block_n,
                                                   num_warps=4 if block_n <= 2048 else 8)


def _ln_fwd_variants(mod) -> list[tuple[str, dict]]:
    out = []
    for label, n, dt, launch in _ln_shapes(mod):
        for res in (True, False):  # launcher: STORE_SUM = has residual; absent pointers are replaced by x
            args = dict(X=dt, R=dt, W=dt, B=dt, Y=dt, S=dt, Mean=torch.float32, Rstd=torch.float32, M=_N, N=n,
                        eps=1e-5, HAS_RES=res, HAS_W=True, HAS_B=True, STORE_SUM=res) | launch
            out.append((f"{label} {'residual' if res else 'no-residual'}", args))
    return out


def _ln_bwd_variants(mod) -> list[tuple[str, dict]]:
    out = []
    for label, n, dt, launch in _ln_shapes(mod):
        for grads in (True, False):  # trained LayerNorm with d_summed, or frozen weight/bias without it
            args = dict(DY=dt, DS=dt, S=dt, W=dt, Mean=torch.float32, Rstd=torch.float32, DX=dt,
                        DW_PART=torch.float32, DB_PART=torch.float32, M=_N, N=n, rows_per_prog=32,
                        HAS_DS=grads, HAS_W=True, COMPUTE_DW=grads, COMPUTE_DB=grads) | launch
            out.append((f"{label} {'ds+dw+db' if grads else 'frozen'}", args))
    return out


@dataclass(frozen=True)
class KernelSpec:
    """A Triton kernel and the launches of it to compile: `variants(module)` -> [(label, launch args)].

    Launch args name every kernel parameter as the launcher passes it: a torch dtype for a tensor, None
    for an absent pointer, Python scalars, constexpr values; plus num_warps/num_stages for kernels that
    are not autotuned (an Autotuner's configs supply those and the BLOCK_* constexprs).
    """
    name: str
    module: str  # under sonar_kernels.triton_kernels
    attr: str  # the @triton.jit function or triton.autotune Autotuner
    variants: Callable


# The kernels of triton_kernels/ and the variants our launchers use. Add a line per new kernel.
KERNEL_SPECS = [
    KernelSpec("lce_fwd", "linear_cross_entropy", "_lce_fwd_kernel", _lce_fwd_variants),
    KernelSpec("lce_bwd", "linear_cross_entropy", "_lce_bwd_kernel", _lce_bwd_variants),  # "atomic" backward
    KernelSpec("lce_dlogits", "linear_cross_entropy", "_lce_dlogits_kernel", _lce_dlogits_variants),
    # the gradient-in-forward strategy's row kernel (its GEMMs are cuBLAS)
    KernelSpec("lce_softmax_grad", "linear_cross_entropy", "_lce_softmax_grad_kernel", _lce_softmax_grad_variants),
    KernelSpec("add_ln_fwd", "add_layer_norm", "_add_ln_fwd_kernel", _ln_fwd_variants),
    KernelSpec("add_ln_bwd", "add_layer_norm", "_add_ln_bwd_kernel", _ln_bwd_variants),
]


@dataclass
class Record:
    """What one compile of one kernel variant, config and target gave."""
    kernel: str
    variant: str
    config: str
    arch: int
    num_warps: int
    num_stages: int
    shared: int | None = None
    smem_limit: int = 0
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    hgmma: int | None = None
    hmma: int | None = None
    fits: bool = False
    problems: list[str] = field(default_factory=list)
    error: str | None = None
    compile_s: float = 0.0

    @property
    def spills(self) -> bool:
        return bool(self.spill_stores or self.spill_loads)


class ToolMissing(RuntimeError):
    """ptxas or cuobjdump cannot be found."""


def tool_paths(arch: int) -> dict[str, str]:
    """Paths of the ptxas Triton uses for `arch` and of cuobjdump; raises ToolMissing."""
    try:
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError as e:
        raise ToolMissing(f"triton with its NVIDIA backend is not importable: {e}") from e
    try:
        return {"ptxas": get_ptxas(arch).path, "cuobjdump": knobs.nvidia.cuobjdump.path}
    except RuntimeError as e:  # knobs raise "Cannot find ptxas" when neither TRITON_PTXAS_PATH nor the wheel has it
        raise ToolMissing(f"{e} (Triton's bundled ptxas/cuobjdump, or TRITON_PTXAS_PATH / TRITON_CUOBJDUMP_PATH)") from e


_PTXAS_FIELDS = {"regs": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
                 "spill_loads": r"(\d+) bytes spill loads", "stack": r"(\d+) bytes stack frame",
                 "smem": r"(\d+) bytes smem"}


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per function of `ptxas -v` output: regs, spill_stores, spill_loads, stack and (static) smem bytes."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"(?:Compiling entry function '|Function properties for )([\w$.]+)", line):
            current = out.setdefault(m.group(1), dict.fromkeys(_PTXAS_FIELDS, 0))
        elif current is not None:
            for key, pattern in _PTXAS_FIELDS.items():
                if m := re.search(pattern, line):
                    current[key] = int(m.group(1))
    return out


def count_sass_opcodes(sass: str) -> Counter:
    """Base opcodes (HGMMA, HMMA, LDGSTS, ...) of `cuobjdump --dump-sass` output, predicates stripped."""
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass)
    return Counter(ops)


def _arg_type(value, specialize: bool = True) -> tuple[str, object | None, bool]:
    """(signature type, constexpr value, divisible by 16) of a launch argument, as Triton's JIT sees it
    (`specialize=False` for a parameter in the kernel's do_not_specialize)."""
    if value is None:
        return "constexpr", None, False
    if isinstance(value, torch.dtype):  # a tensor: fresh allocations are 16-byte aligned
        names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
                 torch.int32: "i32"}
        return "*" + names[value], None, specialize
    if isinstance(value, bool):
        return "u1", None, False
    if isinstance(value, int):
        if value == 1 and specialize:
            return "constexpr", 1, False
        return ("i32" if -2**31 <= value < 2**31 else "i64"), None, specialize and value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"unsupported launch argument {value!r}")


def _jit_function(kernel):
    """The @triton.jit function of a kernel, itself or inside a triton.autotune Autotuner."""
    from triton.runtime.autotuner import Autotuner

    return kernel.fn if isinstance(kernel, Autotuner) else kernel


def load_kernels():
    """Import the kernel modules outside the interpreter (GPU configs) and return them by name."""
    import importlib
    import warnings

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("SONAR_KERNELS_AUTOTUNE", None)  # "0" would keep one config per kernel
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")  # 3.9 keeps fusion on, as at launch
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: compile_job captures it
    from triton.runtime.jit import JITFunction

    mods = {}
    for spec in KERNEL_SPECS:
        mod = importlib.import_module(f"{__package__ or 'sonar_kernels'}.triton_kernels.{spec.module}")
        fn = _jit_function(getattr(mod, spec.attr))
        if getattr(mod, "_INTERPRET", False) or not isinstance(fn, JITFunction):
            raise RuntimeError(f"{mod.__name__} was imported with TRITON_INTERPRET=1, so it has only the "
                               "interpreter config: run the check in a fresh process without TRITON_INTERPRET")
        mods[spec.module] = mod
    return mods


@dataclass(frozen=True)
class Job:
    """One compile: kernel spec, variant, config and target."""
    spec: str
    variant: str
    args: dict
    config: dict
    options: dict
    arch: int

    @property
    def config_label(self) -> str:
        blocks = "x".join(str(v) for k, v in self.config.items() if k.startswith("BLOCK"))
        return f"{blocks} w{self.options['num_warps']} s{self.options['num_stages']}"


def make_jobs(archs, only: str | None = None) -> list[Job]:
    """Every (spec, variant, autotune config, arch) to compile; `only` filters 'kernel/variant/config'."""
    mods = load_kernels()
    jobs = []
    for spec in KERNEL_SPECS:
        mod = mods[spec.module]
        kernel = getattr(mod, spec.attr)
        for label, args in spec.variants(mod):
            args = dict(args)
            launch = {"num_warps": args.pop("num_warps", 4), "num_stages": args.pop("num_stages", 3)}
            configs = [(c.kwargs, {"num_warps": c.num_warps, "num_stages": c.num_stages, "num_ctas": c.num_ctas,
                                   "maxnreg": c.maxnreg}) for c in getattr(kernel, "configs", [])]
            for kwargs, options in configs or [({k: v for k, v in args.items() if k.startswith("BLOCK")}, launch)]:
                for arch in archs:
                    job = Job(spec.name, label, args | kwargs, kwargs, options, arch)
                    if only is None or re.search(only, f"{job.spec}/{job.variant}/{job.config_label}"):
                        jobs.append(job)
    return jobs


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)


def compile_job(job: Job) -> Record:
    """Compile one job with triton.compile, then read its resources from ptxas -v and its SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    mods = load_kernels()
    spec = next(s for s in KERNEL_SPECS if s.name == job.spec)
    fn = _jit_function(getattr(mods[spec.module], spec.attr))
    rec = Record(job.spec, job.variant, job.config_label, job.arch, job.options["num_warps"],
                 job.options["num_stages"], smem_limit=SMEM_LIMIT[job.arch])
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in job.args and not p.has_default:
            raise KeyError(f"{job.spec}/{job.variant}: no launch argument for kernel parameter {p.name!r}")
        value = job.args.get(p.name, p.default)
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", value
            continue
        signature[p.name], const, div16 = _arg_type(value, not p.do_not_specialize)
        if signature[p.name] == "constexpr":
            constexprs[p.name] = const
        elif div16 and not p.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    options = {k: v for k, v in job.options.items() if v is not None}
    t0 = time.perf_counter()
    log = io.StringIO()  # Triton's ptxas -v log; the whole PTX on a ptxas failure
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", job.arch, 32), options=options)
    except Exception as e:  # noqa: BLE001 - every compile failure is a finding to report
        rec.compile_s = time.perf_counter() - t0
        rec.error = f"{type(e).__name__}: {e}"[:4000]
        rec.problems.append("compile error")
        return rec
    rec.compile_s = time.perf_counter() - t0
    rec.shared = compiled.metadata.shared
    rec.num_warps, rec.num_stages = compiled.metadata.num_warps, compiled.metadata.num_stages
    tools = tool_paths(job.arch)
    name = compiled.metadata.name
    usage = parse_ptxas_log(log.getvalue()).get(name)
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        if usage is None:  # a Triton cache hit ran no ptxas: run it as Triton does, with -v
            fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
            ptxas = _run([tools["ptxas"], "-lineinfo", "-v", "--regAllocOptLevel=2", *fmad,
                          f"--gpu-name={sm_arch_from_capability(job.arch)}", ptx, "-o", os.path.join(tmp, "v.o")])
            usage = parse_ptxas_log(ptxas.stdout + ptxas.stderr).get(name)
            if usage is None:
                rec.problems.append("no ptxas -v report")
                rec.error = (ptxas.stdout + ptxas.stderr)[-2000:]
        sass = _run([tools["cuobjdump"], "--dump-sass", cubin])
    if usage is not None:
        rec.regs, rec.spill_stores, rec.spill_loads, rec.stack = (
            usage["regs"], usage["spill_stores"], usage["spill_loads"], usage["stack"])
    if sass.returncode == 0:
        ops = count_sass_opcodes(sass.stdout)
        rec.hgmma, rec.hmma = ops["HGMMA"], ops["HMMA"]
    threads = rec.num_warps * 32
    if rec.shared > rec.smem_limit:
        rec.problems.append(f"shared memory {rec.shared} > {rec.smem_limit}")
    if rec.regs is not None:
        if rec.regs > REGS_PER_THREAD:
            rec.problems.append(f"{rec.regs} registers per thread > {REGS_PER_THREAD}")
        per_warp = -(-rec.regs * 32 // 256) * 256  # allocated per warp in units of 256 registers
        if per_warp * rec.num_warps > REGS_PER_BLOCK:
            rec.problems.append(f"{per_warp * rec.num_warps} registers per block > {REGS_PER_BLOCK}")
    if threads > 1024:
        rec.problems.append(f"{threads} threads per block > 1024")
    rec.fits = not rec.problems
    return rec


def run_check(archs=(90, 80), only: str | None = None, jobs: int = 1) -> list[Record]:
    """Compile every spec'd kernel variant and config for each arch; returns one Record per compile."""
    for arch in archs:
        if arch not in SMEM_LIMIT:
            raise ValueError(f"arch must be one of {sorted(SMEM_LIMIT)}, got {arch}")
        tool_paths(arch)
    todo = make_jobs(archs, only)
    if jobs <= 1 or len(todo) <= 1:
        return [compile_job(j) for j in todo]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_job, todo))


def _ptxas_version(path: str) -> str:
    out = _run([path, "--version"]).stdout
    return next((line.split("release", 1)[1].strip() for line in out.splitlines() if "release" in line), out.strip())


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def table(records: list[Record]) -> str:
    """A markdown table of the records."""
    head = ("| kernel | variant | config (blocks, warps, stages) | sm | smem B (limit) | regs | spills st/ld B "
            "| HGMMA | HMMA | fits | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in records:
        fits = "yes" if r.fits else "**NO**: " + "; ".join(r.problems)
        spills = "0" if r.spill_stores == 0 and r.spill_loads == 0 else f"{_fmt(r.spill_stores)}/{_fmt(r.spill_loads)}"
        rows.append(f"| {r.kernel} | {r.variant} | {r.config} | {r.arch} | {_fmt(r.shared)} ({r.smem_limit}) "
                    f"| {_fmt(r.regs)} | {spills} | {_fmt(r.hgmma)} | {_fmt(r.hmma)} | {fits} | {r.compile_s:.1f} |")
    return "\n".join(rows)


def summary(records: list[Record]) -> str:
    """Per kernel and target: how many compiles fit, spill, use HGMMA/HMMA; variants where no config fits."""
    rows = ["| kernel | sm | compiles | fit | over a limit | spill | max smem B | regs | with HGMMA | with HMMA |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in records:
        groups.setdefault((r.kernel, r.arch), []).append(r)
    for (kernel, arch), rs in groups.items():
        regs = [r.regs for r in rs if r.regs is not None]
        rows.append(f"| {kernel} | {arch} | {len(rs)} | {sum(r.fits for r in rs)} | {sum(not r.fits for r in rs)} "
                    f"| {sum(r.spills for r in rs)} | {max((r.shared or 0) for r in rs)} "
                    f"| {min(regs, default=0)}-{max(regs, default=0)} | {sum(bool(r.hgmma) for r in rs)} "
                    f"| {sum(bool(r.hmma) for r in rs)} |")
    variants: dict = {}
    for r in records:
        variants.setdefault((r.kernel, r.variant, r.arch), []).append(r.fits)
    none_fit = [f"{k} / {v} / sm_{a}" for (k, v, a), fits in variants.items() if not any(fits)]
    rows += ["", "A config over a limit fails when it is loaded (OutOfResources); Triton's autotuner skips such a "
             "config, so a launch still works when another config of the same variant fits. Variants with no "
             f"fitting config (their launches would fail): {', '.join(none_fit) or 'none'}."]
    return "\n".join(rows)


def report(records: list[Record], meta: dict) -> str:
    """The markdown report: what it is (and is not), the summary, the table and the full errors."""
    bad = [r for r in records if not r.fits]
    spilling = [r for r in records if r.spills]
    lines = [
        "# Triton ahead-of-time compile check",
        "",
        "**Compile-time report produced on a CPU machine with no GPU; not a measurement on a GPU.** "
        "Shared memory is Triton's metadata, registers and spills are `ptxas -v` on the kernel's PTX, MMA "
        "counts are opcodes in `cuobjdump --dump-sass` of the cubin; nothing was run.",
        "",
        f"- date (UTC): {meta['date']}; host: {meta['host']}",
        f"- triton {meta['triton']}, torch {meta['torch']}; " +
        "; ".join(f"sm_{a}: ptxas {v}" for a, v in meta["ptxas"].items()),
        f"- limits: dynamic shared memory per block {', '.join(f'sm_{a} {b} B' for a, b in SMEM_LIMIT.items())}; "
        f"{REGS_PER_THREAD} registers per thread, {REGS_PER_BLOCK} per block",
        f"- launch arguments as for N={_N} tokens, V={_V}, D={_D} (only their specialisation matters)",
        f"- {len(records)} compiles in {meta['wall_s']:.0f} s wall ({meta['jobs']} processes); "
        f"{sum(r.error is not None for r in records)} compile errors, {len(bad)} over a limit or failed, "
        f"{len(spilling)} spill registers" + (f"; commit {meta['commit']}" if meta.get("commit") else ""),
        "",
        "## Summary",
        "",
        summary(records),
        "",
        "## Every compile",
        "",
        table(records),
    ]
    errors = [r for r in records if r.error]
    if errors:
        lines += ["", "## Errors", ""]
        for r in errors:
            lines += [f"### {r.kernel} / {r.variant} / {r.config} / sm_{r.arch}", "", "```", r.error, "```", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sonar_kernels.aot_check", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT),
                   help="compute capabilities")
    p.add_argument("--json", help="write the records and metadata here")
    p.add_argument("--markdown", help="write the markdown report here")
    p.add_argument("--only", help="regex on 'kernel/variant/config' selecting what to compile")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--no-cache", action="store_true", help="recompile even what Triton's cache holds")
    p.add_argument("--fail-on-spills", action="store_true", help="exit 1 when a kernel spills registers")
    a = p.parse_args(argv)
    try:
        ptxas = {arch: tool_paths(arch)["ptxas"] for arch in a.arch}
    except ToolMissing as e:
        print(f"aot_check: ptxas not found, cannot compile for real GPUs: {e}", file=sys.stderr)
        return 2
    if a.no_cache:
        os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    import triton

    t0 = time.perf_counter()
    records = run_check(a.arch, a.only, a.jobs)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "host": f"{platform.machine()}, {os.cpu_count()} CPUs, no GPU used", "triton": triton.__version__,
        "torch": torch.__version__, "wall_s": time.perf_counter() - t0, "jobs": a.jobs,
        "ptxas": {arch: _ptxas_version(path) for arch, path in ptxas.items()},
    }
    print(table(records))
    bad = [r for r in records if not r.fits or (a.fail_on_spills and r.spills)]
    print(f"\n{len(records)} compiles in {meta['wall_s']:.0f} s; {len(bad)} failing", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "records": [dataclasses.asdict(r) for r in records]}, f, indent=1)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(report(records, meta))
    return 1 if bad or not records else 0


if __name__ == "__main__":
    sys.exit(main())
