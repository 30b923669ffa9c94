"""The torch-free dtype table (what ``trainstate ls``/``inspect``/``verify`` describe tensors with)
agrees with torch itself: every dtype name torch has, its canonical name, size and safetensors code."""

from __future__ import annotations

import pytest
import torch

from trainstate.errors import CorruptCheckpointError
from trainstate.format.dtypes import dtype_info, stored_as_name
from trainstate.format.tensorfile import SAFETENSORS_DTYPES, dtype_name, stored_as

TORCH_DTYPES = {name: value for name, value in vars(torch).items() if isinstance(value, torch.dtype)}


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_table_matches_torch(name):
    dtype = TORCH_DTYPES[name]
    info = dtype_info(name, where="t")
    assert (info.name, info.itemsize, info.safetensors) == (
        dtype_name(dtype),
        dtype.itemsize,
        SAFETENSORS_DTYPES.get(dtype),
    )
    for shape in ([], [0], [3, 5]):
        assert stored_as_name(info, shape) == stored_as(dtype, shape)


@pytest.mark.parametrize("bad", ["Tensor", "nn", "_C", "float128", "", 5, None, ["float32"], "float32 "])
def test_unknown_names_are_corruption(bad):
    with pytest.raises(CorruptCheckpointError, match="unknown dtype"):
        dtype_info(bad, where="ckpt: key 'w'")


def test_a_name_newer_than_the_table_is_asked_of_torch(monkeypatch):
    from trainstate.format import dtypes

    monkeypatch.delitem(dtypes._KNOWN, "float8_e8m0fnu")
    assert dtype_info("float8_e8m0fnu", where="t") == dtypes.DtypeInfo("float8_e8m0fnu", 1, None)


@pytest.mark.parametrize("text", ["|b1", "<i1", "<i8", ">u2", "<u4", "=f2", "<f8", ">c8", "<c16"])
def test_numpy_names_without_numpy_match_numpy(text):
    from trainstate.format.dtypes import numpy_dtype, numpy_dtype_info

    info, dtype = numpy_dtype_info(text), numpy_dtype(text)
    assert (info.name, info.itemsize) == (dtype.name, dtype.itemsize)
