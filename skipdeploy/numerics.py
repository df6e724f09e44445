"""The numeric rules every part of skipdeploy shares: the mask value, dtypes, tolerances, errors.

Each rule has exactly one home here, so that the exporter's graphs, the engines, ``verify`` and
the tests cannot drift apart.
"""

from __future__ import annotations

import numpy as np

# Attention bias of a masked key. Finite on purpose: a padding query whose keys are all masked
# must not turn into NaN, because its value vector is later multiplied by a zero weight in real
# rows, and 0 x NaN is NaN.
MASK_VALUE = -1e9

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}

# Relative to max(1, max |reference|) (see ``relative_error``). Per graph: what the exporter's
# check and ``verify`` accept for one graph's outputs; on logits: for a whole generation.
# int8: measured 1-2% per graph and 2-5% on logits.
GRAPH_TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "int8": 5e-2}
LOGITS_TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "int8": 1e-1}


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(NUMPY_DTYPES[name])


def itemsize(name: str) -> int:
    """Bytes per element of an export's ``dtype`` ("float32" or "float16")."""
    return numpy_dtype(name).itemsize


def relative_error(got, want) -> float:
    """Max absolute error over ``max(1, max |want|)``: absolute for small outputs, relative for
    large ones (logits, whose scale grows with the vocabulary)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def round_up(n: int, step: int) -> int:
    """The smallest multiple of ``step`` that is >= ``n`` (0 stays 0)."""
    return -(-n // step) * step
