"""Hypothesis strategies for NumPy arrays of every layout and dtype kind, and exact comparison."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

_SCALAR_DTYPES = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(endianness="?"),
    hnp.unsigned_integer_dtypes(endianness="?"),
    hnp.floating_dtypes(endianness="?"),
    hnp.complex_number_dtypes(endianness="?"),
    hnp.datetime64_dtypes(endianness="?"),
    hnp.timedelta64_dtypes(endianness="?"),
    hnp.byte_string_dtypes(min_len=1, max_len=6),
    hnp.unicode_string_dtypes(min_len=1, max_len=6),
)
_STRUCTURED = hnp.array_dtypes(
    subtype_strategy=st.one_of(
        hnp.integer_dtypes(endianness="?"), hnp.floating_dtypes(), hnp.byte_string_dtypes()
    ),
    min_size=1,
    max_size=3,
)


@st.composite
def arrays(draw: st.DrawFn, max_side: int = 8, object_dtype: bool = True) -> np.ndarray:
    """An array of a random dtype (scalar, structured, object) and shape (0-d, empty, up to
    4-D), in C order, Fortran order, or a non-contiguous view (step, transpose, negative
    stride)."""
    kinds = ["scalar", "structured"] + (["object"] if object_dtype else [])
    kind = draw(st.sampled_from(kinds))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=max_side))
    if kind == "object":
        elems = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.tuples(st.integers()))
        a = draw(hnp.arrays(object, shape, elements=elems, fill=st.nothing()))
    else:
        dtype = draw(_SCALAR_DTYPES if kind == "scalar" else _STRUCTURED)
        a = draw(hnp.arrays(dtype, shape))
    layout = draw(st.sampled_from(["C", "F", "step", "transpose", "reversed"]))
    if layout == "F":
        a = np.asfortranarray(a)
    elif layout == "step" and a.ndim:
        a = a[(slice(None, None, 2),) * a.ndim]
    elif layout == "transpose":
        a = a.T
    elif layout == "reversed" and a.ndim:
        a = a[::-1]
    return a


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Leaves inside lists, tuples and dicts, a few levels deep."""
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            st.lists(kids, max_size=4),
            st.tuples(kids, kids),
            st.dictionaries(st.text(max_size=4), kids, max_size=4),
        ),
        max_leaves=8,
    )


def assert_same_array(a: np.ndarray, b: Any) -> None:
    """``b`` is exactly ``a``: type, dtype, shape, values (bit for bit, NaNs included), and
    memory order where ``a`` has one (non-contiguous arrays arrive contiguous)."""
    assert type(b) is np.ndarray
    assert b.dtype == a.dtype, (b.dtype, a.dtype)
    assert b.shape == a.shape
    if a.dtype.hasobject:
        assert a.tolist() == b.tolist()
    else:
        assert np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
        if a.dtype.kind not in "fcmM" and a.dtype.fields is None:
            assert np.array_equal(a, b)
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        assert b.flags.f_contiguous
    elif a.flags.c_contiguous:
        assert b.flags.c_contiguous
    else:
        assert b.flags.c_contiguous or b.flags.f_contiguous


def assert_same(a: Any, b: Any) -> None:
    """Structural equality for containers of arrays (types of containers kept)."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert_same_array(a, b)
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, memoryview):
        assert (a.format, a.shape, a.tolist()) == (b.format, b.shape, b.tolist())
    else:
        assert a == b
