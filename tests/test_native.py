"""Tests of the optional native CPU linear cross-entropy (sonar_kernels.native).

When the library is not built, only the "absent library" behaviour runs (import works, "auto" does not
pick it, forcing it raises); everything else skips with the reason, except under SONAR_NATIVE_REQUIRED=1
(.ci/run where cmake and a compiler exist), where such a skip is a failure (the root conftest.py). When it is built: float64 full-logits
references (F.cross_entropy + autograd) on fresh random inputs, float64 gradcheck, agreement with the
plain-PyTorch path, small explicit tiles so that several token and vocabulary tiles (and a ragged last
tile) are exercised at tiny shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sonar_kernels import native
from sonar_kernels.functional.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_native
from sonar_kernels.torch_ops import linear_cross_entropy as torch_lce

built = pytest.mark.skipif(not native.native_available(), reason=str(native.native_load_error()))


def _inputs(seed, n, d, v, dtype=torch.float32, bias=False, ignore_frac=0.25, ignore_index=-100, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    return hidden, weight, target, b


def _reference(hidden, weight, target, bias, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
               grad_out=None):
    """float64 loss, lse and gradients (hidden, weight, bias) through the full logits."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = bias.detach().double().requires_grad_() if bias is not None else None
    logits = h @ w.t() + (b if b is not None else 0.0)
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if reduction == "mean" and bool((target == ignore_index).all()):
        loss = (logits * 0.0).sum()  # documented convention: 0, not NaN
    loss.backward(grad_out.double() if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), torch.logsumexp(logits.detach(), -1), h.grad, w.grad, (b.grad if b is not None else None)


def _run(fn, hidden, weight, target, bias, *, grad_weight=True, grad_out=None, **kw):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(grad_weight)
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    loss, lse = fn(h, w, target, bias=b, return_lse=True, **kw)
    loss.backward(grad_out.to(loss.dtype) if grad_out is not None else torch.ones_like(loss))
    return loss.detach(), lse, h.grad, w.grad, (b.grad if b is not None else None)


def _close(got, want, atol, rtol=0.0, what=""):
    assert got is not None and want is not None, what
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- built or skipped, visibly

def test_library_required_where_it_is_built_for():
    """A plain `pytest` skips the native tests with the reason (shown by `-ra`) when the library is not
    built; where a run is meant to cover the native path (SONAR_NATIVE_REQUIRED=1, e.g. after a CI build)
    a missing or unloadable library is a failure naming why, not a row of skips."""
    import os

    if os.environ.get("SONAR_NATIVE_REQUIRED", "") not in ("", "0"):
        assert native.native_available(), f"SONAR_NATIVE_REQUIRED is set but {native.native_load_error()}"
    elif not native.native_available():
        pytest.skip(f"native tests skipped: {native.native_load_error()}")


def test_required_library_turns_native_skips_into_failures(tmp_path):
    """The root conftest.py's rule, run by a real pytest on a planted test: under SONAR_NATIVE_REQUIRED=1 a
    test skipped for the missing library fails (naming the library), while an unrelated skip stays a skip;
    without the variable both skip."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    shutil.copy(Path(__file__).resolve().parents[1] / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_planted.py").write_text(
        "import pytest\nfrom sonar_kernels import native\n"
        "@pytest.mark.skipif(not native.native_available(), reason=f'native library: {native.native_load_error()}')\n"
        "def test_needs_native():\n    pass\n"
        "def test_unrelated():\n    pytest.skip('unrelated')\n")
    env = {**os.environ, "SONAR_NATIVE_LIB": str(tmp_path / "missing.so")}

    def run(required):
        env["SONAR_NATIVE_REQUIRED"] = required
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_planted.py"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    required = run("1")
    assert required.returncode == 1, required.stdout[-2000:]
    assert "1 skipped, 1 error" in required.stdout and "missing.so does not exist" in required.stdout, required.stdout
    plain = run("0")
    assert plain.returncode == 0 and "2 skipped" in plain.stdout, plain.stdout[-2000:]


# ----------------------------------------------------------------------------- without the library

def test_absent_library_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setenv("SONAR_NATIVE_LIB", str(tmp_path / "missing.so"))
    native._load.cache_clear()
    try:
        assert native.native_available() is False
        assert "missing.so" in native.native_load_error()
        h = torch.zeros(2, 3)
        assert native.use_native("auto", h) is False
        assert native.use_native("torch", h) is False
        with pytest.raises(RuntimeError, match="not built"):
            native.use_native("native", h)
        with pytest.raises(RuntimeError, match="not built"):
            linear_cross_entropy_native(h, torch.zeros(4, 3), torch.zeros(2, dtype=torch.long))
    finally:
        native._load.cache_clear()


def test_build_reports_missing_cmake(monkeypatch):
    monkeypatch.setattr(native.native_build.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="cmake"):
        native.build()


def _fake_torch(root, config_text):
    """A torch package tree with only what CMakeLists.txt reads: TorchConfig.cmake, include/, lib/*.so."""
    (root / "share" / "cmake" / "Torch").mkdir(parents=True)
    (root / "share" / "cmake" / "Torch" / "TorchConfig.cmake").write_text(config_text)
    (root / "include").mkdir()
    (root / "lib").mkdir()
    for name in ("libc10.so", "libtorch_cpu.so"):
        (root / "lib" / name).write_bytes(b"")
    return root / "share" / "cmake"


@pytest.mark.parametrize("config_line,standard", [("CXX_STANDARD 20", 20), ("CXX_STANDARD 23", 23), ("", 17)])
def test_configure_takes_the_cxx_standard_from_torch_without_find_package(tmp_path, config_line, standard):
    """The CMake configure reads the C++ standard from TorchConfig.cmake's `torch` target (at least 17) and
    never runs TorchConfig.cmake itself (so a CUDA build of torch needs no CUDA toolkit): the fake config
    here stops any configure that includes it."""
    import shutil
    import subprocess

    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    prefix = _fake_torch(tmp_path / "torch", "message(FATAL_ERROR \"TorchConfig.cmake was executed\")\n"
                         f"set_target_properties(torch PROPERTIES\n    {config_line}\n)\n")
    res = subprocess.run(["cmake", "-S", str(native.native_build.SOURCE_ROOT), "-B", str(tmp_path / "build"),
                          f"-DCMAKE_PREFIX_PATH={prefix}"], capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert f"C++{standard}," in out, out[-3000:]
    assert str(tmp_path / "torch") in out


def test_configure_without_torch_names_the_prefix(tmp_path):
    import shutil
    import subprocess

    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    res = subprocess.run(["cmake", "-S", str(native.native_build.SOURCE_ROOT), "-B", str(tmp_path / "build"),
                          f"-DCMAKE_PREFIX_PATH={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "TorchConfig.cmake not found" in res.stdout + res.stderr


def test_build_steps_pass_torch_prefix_and_abi(tmp_path, monkeypatch):
    monkeypatch.setattr(native.native_build.shutil, "which", lambda name: f"/usr/bin/{name}")
    configure, build, install = native.native_build.cmake_steps(tmp_path / "out", tmp_path / "build", jobs=3)
    assert f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}" in configure
    assert f"-DSONAR_TORCH_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}" in configure
    assert f"-DCMAKE_INSTALL_PREFIX={tmp_path / 'out'}" in configure
    assert build[-2:] == ["--parallel", "3"] and install[1:] == ["--install", str(tmp_path / "build")]


# ----------------------------------------------------------------------------- with the library

@built
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_matches_float64_reference(reduction, label_smoothing):
    seed = {"mean": 11, "sum": 12, "none": 13}[reduction] + int(label_smoothing * 100)
    # V = 1100 is not a multiple of the default 512-column tile
    hidden, weight, target, bias = _inputs(seed, n=37, d=48, v=1100, bias=True)
    go = torch.randn(37, generator=torch.Generator().manual_seed(seed)) if reduction == "none" else None
    kw = dict(reduction=reduction, label_smoothing=label_smoothing)
    ref = _reference(hidden, weight, target, bias, grad_out=go, **kw)
    got = _run(linear_cross_entropy_native, hidden, weight, target, bias, grad_out=go, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    if reduction == "none":
        assert bool((got[0][target == -100] == 0).all())
    _close(got[0], ref[0], atol=3e-5, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=3e-5, rtol=1e-6, what="lse")
    _close(got[2], ref[2], atol=2e-6, rtol=1e-4, what="d_hidden")
    _close(got[3], ref[3], atol=2e-6, rtol=1e-4, what="d_weight")
    _close(got[4], ref[4], atol=2e-6, rtol=1e-4, what="d_bias")


@built
@pytest.mark.parametrize("blocks", [(1, 1), (16, 128), (7, 333), (64, 5000)])
def test_tile_sizes_do_not_change_the_result(blocks):
    """Several ragged token x vocabulary tiles (and tiles larger than the problem) vs float64."""
    br, bv = blocks
    n, v = (6, 40) if blocks == (1, 1) else (45, 700)  # 1 x 1 tiles: one GEMM call per logit, keep it small
    hidden, weight, target, bias = _inputs(21, n=n, d=32, v=v, bias=True, scale=3.0)
    ref = _reference(hidden, weight, target, bias, reduction="none", label_smoothing=0.05)
    loss, lse = native.forward(hidden, weight, target, bias, label_smoothing=0.05, block_rows=br, block_vocab=bv)
    _close(loss, ref[0], atol=5e-5, rtol=1e-5, what="loss")
    _close(lse, ref[1], atol=5e-5, rtol=1e-6, what="lse")
    g = torch.ones(n)
    dh, dw, db = native.backward(hidden, weight, target, bias, lse, g, label_smoothing=0.05, need_hidden=True,
                                 need_weight=True, need_bias=True, block_rows=br, block_vocab=bv)
    _close(dh, ref[2], atol=1e-5, rtol=1e-4, what="d_hidden")
    _close(dw, ref[3], atol=1e-5, rtol=1e-4, what="d_weight")
    _close(db, ref[4], atol=1e-5, rtol=1e-4, what="d_bias")
    dh_only = native.backward(hidden, weight, target, bias, lse, g, label_smoothing=0.05, block_rows=br,
                              block_vocab=bv)
    assert dh_only[1] is None and dh_only[2] is None
    _close(dh_only[0], dh, atol=1e-6, rtol=1e-5, what="d_hidden (hidden-only path vs weight path)")


@built
def test_large_logits_online_lse_is_stable():
    """Logits of magnitude ~100 across tiles: the running max must rescale the partial sums."""
    hidden, weight, target, _ = _inputs(31, n=20, d=16, v=900, scale=60.0, ignore_frac=0.0)
    ref = _reference(hidden, weight, target, None, reduction="none")
    loss, lse = native.forward(hidden, weight, target, None, block_rows=8, block_vocab=100)
    assert ref[1].abs().max() > 80
    _close(lse, ref[1], atol=1e-4, rtol=2e-6, what="lse")
    _close(loss, ref[0], atol=2e-4, rtol=2e-6, what="loss")


@built
def test_float64_matches_reference_tightly_and_gradcheck():
    hidden, weight, target, bias = _inputs(41, n=9, d=6, v=530, dtype=torch.float64, bias=True)
    ref = _reference(hidden, weight, target, bias, reduction="sum", label_smoothing=0.2)
    got = _run(linear_cross_entropy_native, hidden, weight, target, bias, reduction="sum",
               label_smoothing=0.2)
    assert got[0].dtype == torch.float64 and got[2].dtype == torch.float64
    for i, what in enumerate(["loss", "lse", "d_hidden", "d_weight", "d_bias"]):
        _close(got[i], ref[i], atol=1e-10, rtol=1e-10, what=what)
    hidden, weight, target, bias = _inputs(42, n=5, d=4, v=37, dtype=torch.float64, bias=True)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = bias.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy_native(h, w, target, bias=b, reduction="mean",
                                                           label_smoothing=0.1), (h, w, b))


@built
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    hidden, weight, target, _ = _inputs(51, n=33, d=40, v=600, dtype=dtype)
    # reference: float64 of the same (rounded) half inputs
    ref = _reference(hidden, weight, target, None, reduction="sum")
    got = _run(linear_cross_entropy_native, hidden, weight, target, None, reduction="sum")
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    _close(got[0], ref[0], atol=1e-3, rtol=1e-5, what="loss")
    _close(got[1], ref[1], atol=1e-4, rtol=1e-5, what="lse")
    half_eps = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11  # the gradient is rounded to the input dtype
    _close(got[2], ref[2], atol=1e-5, rtol=half_eps, what="d_hidden")
    _close(got[3], ref[3], atol=1e-5, rtol=half_eps, what="d_weight")


@built
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_grads(reduction):
    hidden, weight, target, _ = _inputs(61, n=12, d=8, v=300, ignore_frac=1.0, ignore_index=-1)
    assert bool((target == -1).all())
    loss, _, dh, dw, _ = _run(linear_cross_entropy_native, hidden, weight, target, None,
                              ignore_index=-1, reduction=reduction)
    assert bool(torch.isfinite(loss).all()) and bool((loss == 0).all())
    assert bool((dh == 0).all()) and bool((dw == 0).all())


@built
def test_single_token_and_custom_ignore_index():
    hidden, weight, target, _ = _inputs(71, n=1, d=24, v=517, ignore_frac=0.0)
    ref = _reference(hidden, weight, target, None)
    got = _run(linear_cross_entropy_native, hidden, weight, target, None)
    for i, what in enumerate(["loss", "lse", "d_hidden", "d_weight"]):
        _close(got[i], ref[i], atol=2e-6, rtol=1e-5, what=what)
    # ignore_index that is also a valid class id: those rows are ignored, like F.cross_entropy does
    hidden, weight, target, _ = _inputs(72, n=30, d=24, v=50, ignore_frac=0.0)
    target[::3] = 7
    ref = _reference(hidden, weight, target, None, ignore_index=7)
    got = _run(linear_cross_entropy_native, hidden, weight, target, None, ignore_index=7)
    for i, what in enumerate(["loss", "lse", "d_hidden", "d_weight"]):
        _close(got[i], ref[i], atol=2e-6, rtol=1e-5, what=what)


@built
def test_agrees_with_the_torch_path_and_frozen_weight_gets_no_grad():
    hidden, weight, target, _ = _inputs(81, n=70, d=64, v=2100)
    got = _run(linear_cross_entropy_native, hidden, weight, target, None, grad_weight=False)
    want = _run(linear_cross_entropy, hidden, weight, target, None, grad_weight=False, impl="torch")
    assert got[3] is None and want[3] is None
    for i, what in enumerate(["loss", "lse", "d_hidden"]):
        _close(got[i], want[i], atol=1e-5, rtol=1e-5, what=what)
    # and the op-level functions return what torch_ops returns, argument for argument
    lse = want[1]
    g = torch.full((70,), 1.0 / 70)
    for a, b in zip(native.backward(hidden, weight, target, None, lse, g),
                    torch_lce.backward(hidden, weight, target, None, lse, g)):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b, atol=1e-7, rtol=1e-5, what="backward vs torch_ops.backward")


@built
def test_thread_count_does_not_change_the_result():
    hidden, weight, target, bias = _inputs(91, n=64, d=32, v=800, bias=True)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            loss, lse = native.forward(hidden, weight, target, bias, block_rows=16, block_vocab=256)
            dh, dw, db = native.backward(hidden, weight, target, bias, lse, torch.ones(64), need_weight=True,
                                         need_bias=True, block_rows=16, block_vocab=256)
            outs.append((loss, lse, dh, dw, db))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*outs):
        _close(a, b, atol=1e-6, rtol=1e-6, what="1 vs 2 threads")


@built
def test_non_contiguous_inputs_and_validation_errors():
    hidden, weight, target, _ = _inputs(101, n=20, d=16, v=300)
    h_t = hidden.t().contiguous().t()  # same values, column-major
    assert not h_t.is_contiguous()
    ref = _reference(hidden, weight, target, None)
    _close(linear_cross_entropy_native(h_t, weight, target), ref[0], atol=2e-6, rtol=1e-5, what="loss")
    with pytest.raises(ValueError, match="D"):
        linear_cross_entropy_native(hidden, weight[:, :8], target)
    with pytest.raises(TypeError, match="target"):
        linear_cross_entropy_native(hidden, weight, target.float())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_native(hidden, weight, target, reduction="avg")
    with pytest.raises(ValueError, match="need_bias"):
        native.backward(hidden, weight, target, None, torch.zeros(20), torch.ones(20), need_bias=True)
    with pytest.raises(RuntimeError, match="block_rows"):
        native.forward(hidden, weight, target, None, block_rows=-1)


def test_auto_dispatch_takes_native_only_when_asked(monkeypatch):
    """"auto" stays on the PyTorch path (native does not win on a quiet machine, docs/native.md);
    SONAR_KERNELS_IMPL=native routes "auto" CPU calls to the library when it is available."""
    import sonar_kernels

    calls = []
    real = native.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "forward", spy)
    g = torch.Generator().manual_seed(7)
    h, w = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    t = torch.randint(0, 11, (5,), generator=g)
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, t)
    out = sonar_kernels.linear_cross_entropy(h, w, t, impl="auto")
    assert float(out) == pytest.approx(float(ref), rel=1e-5)
    assert calls == []
    monkeypatch.setenv("SONAR_KERNELS_IMPL", "native")
    out = sonar_kernels.linear_cross_entropy(h, w, t, impl="auto")
    assert float(out) == pytest.approx(float(ref), rel=1e-5)
    sonar_kernels.linear_cross_entropy(h.double(), w.double(), t, impl="auto")  # fp64 stays on PyTorch
    assert len(calls) == (1 if native.native_available() else 0)
