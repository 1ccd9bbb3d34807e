"""Float32 matrix products for the dense MLP: MKL's ``sgemm`` when the ``mkl`` extra is
installed, numpy's (OpenBLAS) otherwise.

On this project's Xeons MKL runs the dense layers' GEMMs 4-17 % faster than the OpenBLAS
numpy ships (140-165 against 155-179 GFLOP/s on one core at the DLRM and DLRM-v2 shapes),
and the dense MLP is most of a DLRM-v2 sample's work. MKL comes from the ``mkl`` wheel (``pip
install recserve[mkl]``): its ``libmkl_rt`` is found through the wheel's file list and called
through ``ctypes`` (which releases the GIL), in MKL's sequential threading layer: the gateway
runs batches side by side, one thread each, and a second OpenMP runtime beside numba's would
only spin. The two backends differ in the last bits of a sum's rounding, not more.

``select(name)`` chooses the backend for the process once, before the first product
(``auto``, the default: MKL when it loads); ``matmul(a, b)`` is ``a @ b``.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import threading

import numpy as np

from kernels.errors import KernelError

BACKENDS = ("auto", "mkl", "openblas")
_ROW_MAJOR, _NO_TRANS, _SEQUENTIAL = 101, 111, 1

_lock = threading.Lock()
_sgemm: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_backend: str | None = None  # chosen: "mkl" or "openblas"


def _load_mkl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    """MKL's ``cblas_sgemm`` from the ``mkl`` wheel, in the sequential layer; None if the
    wheel is not installed or its library does not load."""
    try:
        files = importlib.metadata.files("mkl") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name.startswith("libmkl_rt.so"):
            try:
                lib = ctypes.CDLL(str(f.locate()))
            except OSError:
                return None
            # Only before MKL's first call: later ones keep the layer it started with.
            lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
            lib.MKL_Set_Threading_Layer(_SEQUENTIAL)
            fn = lib.cblas_sgemm
            fn.argtypes = [ctypes.c_int] * 6 + [
                ctypes.c_float,
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_float,
                ctypes.c_void_p,
                ctypes.c_int,
            ]
            fn.restype = None
            return fn
    return None


def select(name: str = "auto") -> str:
    """Choose the process's backend and return it (``mkl`` or ``openblas``). ``mkl`` when
    the extra is missing raises ``KernelError``; choosing again keeps the first choice unless
    it names another backend, which is refused too (MKL cannot be unloaded)."""
    global _sgemm, _backend
    if name not in BACKENDS:
        raise KernelError(f"unknown BLAS {name!r} (one of {', '.join(BACKENDS)})")
    with _lock:
        if _backend is None:
            fn = _load_mkl() if name != "openblas" else None
            if name == "mkl" and fn is None:
                raise KernelError("--blas mkl needs the mkl extra: pip install 'recserve[mkl]'")
            _sgemm, _backend = fn, "mkl" if fn is not None else "openblas"
        elif name not in ("auto", _backend):
            raise KernelError(f"this process already multiplies with {_backend}, not {name}")
        return _backend


def backend() -> str:
    """The backend in use (choosing ``auto`` if nothing chose yet)."""
    return _backend or select()


def matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for float32 ``a`` ``[m, k]`` and C-contiguous float32 ``b`` ``[k, n]``,
    as a new C-contiguous ``[m, n]``."""
    if _backend is None:
        select()
    m, k = a.shape
    n = b.shape[1]
    if b.shape[0] != k:
        raise KernelError(f"cannot multiply [{m}, {k}] by {list(b.shape)}")
    fn = _sgemm
    if fn is None or not (m and n and k) or b.dtype != np.float32 or not b.flags.c_contiguous:
        return np.asarray(a @ b, np.float32)
    a = np.ascontiguousarray(a, np.float32)
    out = np.empty((m, n), np.float32)
    fn(_ROW_MAJOR, _NO_TRANS, _NO_TRANS, m, n, k, 1.0, a.ctypes.data, k, b.ctypes.data, n, 0.0,
       out.ctypes.data, n)  # fmt: skip
    return out
