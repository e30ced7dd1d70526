"""Scoped denormal flushing (pipeline.denormals): on inside the block, the mode found after."""

from __future__ import annotations

import pytest
import torch

from pipeline.denormals import flush_denormals, flushing_denormals


def test_flushing_is_on_inside_and_restored_after():
    assert not flushing_denormals()  # the process default
    with flush_denormals() as on:
        if not on:
            pytest.skip("this CPU cannot flush denormals")
        assert flushing_denormals()
        assert float(torch.tensor([1e-39]) * 1.0) == 0.0
    assert not flushing_denormals()
    assert float(torch.tensor([1e-39]) * 1.0) > 0.0


def test_flushing_is_restored_when_the_block_raises():
    with pytest.raises(RuntimeError), flush_denormals():
        raise RuntimeError("boom")
    assert not flushing_denormals()


def test_a_caller_that_flushes_keeps_flushing():
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        with flush_denormals():
            pass
        assert flushing_denormals()
        with flush_denormals(enabled=False) as on:
            assert on  # left as the caller set it
    finally:
        torch.set_flush_denormal(False)
