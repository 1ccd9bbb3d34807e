"""The GEMM backends: each in a fresh process (the choice is the process's), against float64
products; the dense forward the same under both."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kernels import KernelError
from kernels.blas import matmul, select

CHECK = """
import numpy as np
from kernels import CrossLayer, CrossNet, DenseNet, Interaction, KernelError, Linear
from kernels.blas import backend, matmul, select

assert select({name!r}) == {want!r} and backend() == {want!r}
rng = np.random.default_rng(3)
for m, k, n in ((1, 1, 1), (7, 13, 5), (256, 415, 512), (300, 3456, 64)):
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    want = a.astype(np.float64) @ b.astype(np.float64)
    got = matmul(a, b)
    assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == (m, n)
    err = np.abs(got - want).max() / max(1.0, np.abs(want).max())
    assert err < 1e-5, (m, k, n, err)
    assert np.array_equal(matmul(a[:, ::1][::2], b), matmul(np.ascontiguousarray(a[::2]), b))
assert not matmul(np.ones((3, 0), np.float32), np.ones((0, 2), np.float32)).any()
try:
    matmul(np.ones((2, 3), np.float32), np.ones((4, 2), np.float32))
except KernelError as exc:
    assert "cannot multiply" in str(exc)
else:
    raise AssertionError("a shape mismatch passed")
other = "mkl" if {want!r} == "openblas" else "openblas"
try:
    select(other)
except KernelError as exc:
    assert "already" in str(exc) or "extra" in str(exc)
else:
    raise AssertionError("a second backend was chosen")
np.save({out!r}, DenseNet(
    (Linear(rng.standard_normal((32, 13)).astype(np.float32), np.ones(32, np.float32), "relu"),),
    CrossNet((CrossLayer(*(rng.standard_normal(s).astype(np.float32) / 8
                           for s in ((16, 96), (96, 16), (96,)))),)),
    (Linear(rng.standard_normal((1, 96)).astype(np.float32), np.zeros(1, np.float32), "sigmoid"),),
).forward(rng.standard_normal((64, 13)).astype(np.float32),
          rng.standard_normal((64, 2, 32)).astype(np.float32)))
"""


def run_check(name: str, want: str, out: str) -> None:
    code = textwrap.dedent(CHECK.format(name=name, want=want, out=out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the mkl extra is x86-64 only")
def test_mkl_and_openblas_agree_with_float64(tmp_path) -> None:
    # make test installs the mkl extra: both backends run here.
    run_check("openblas", "openblas", str(tmp_path / "openblas.npy"))
    run_check("mkl", "mkl", str(tmp_path / "mkl.npy"))
    run_check("auto", "mkl", str(tmp_path / "auto.npy"))
    a, b = np.load(tmp_path / "openblas.npy"), np.load(tmp_path / "mkl.npy")
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.array_equal(b, np.load(tmp_path / "auto.npy"))


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(KernelError, match="unknown BLAS"):
        select("atlas")


def test_matmul_falls_back_for_what_mkl_does_not_take() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.arange(12, dtype=np.float64).reshape(3, 4)  # float64 weights: numpy's product
    np.testing.assert_array_equal(matmul(a, b), (a @ b).astype(np.float32))
    bt = np.arange(12, dtype=np.float32).reshape(4, 3).T  # not C-contiguous
    np.testing.assert_array_equal(matmul(a, bt), a @ bt)
