"""A full disk, a read-only place or a denied write becomes one `StorageError` line that names
the place and the fix; other failures pass through untouched."""

from __future__ import annotations

import errno

import pytest

from pipeline.heads.io import atomic_file, write_safetensors
from stores.errors import InputError, StorageError, storage_error, storage_errors, write_failure


@pytest.mark.parametrize(
    ("code", "reason", "fix"),
    [
        (errno.ENOSPC, "no space left", "free space"),
        (errno.EDQUOT, "quota", "free space"),
        (errno.EROFS, "read-only", "writable place"),
        (errno.EACCES, "permission denied", "writable place"),
    ],
)
def test_write_failures_name_the_place_the_reason_and_the_fix(code, reason, fix):
    err = storage_error(OSError(code, "x"), "store /s.zarr", then="it resumes")
    assert isinstance(err, StorageError) and isinstance(err, InputError)
    text = str(err)
    assert "\n" not in text and "store /s.zarr" in text and reason in text and fix in text
    assert text.endswith("(it resumes)")


def test_the_failure_is_found_behind_a_wrapping_exception():
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert write_failure(outer).errno == errno.ENOSPC


@pytest.mark.parametrize("exc", [OSError(errno.ENOENT, "gone"), ValueError("no"), OSError("x")])
def test_other_failures_are_not_storage_errors(exc):
    assert storage_error(exc, "x", then="y") is None
    with pytest.raises(type(exc)), storage_errors("x", then="y"):
        raise exc


def test_storage_errors_maps_inside_the_block():
    match = "cannot write run folder /r: no space"
    with pytest.raises(StorageError, match=match), storage_errors("run folder /r", then="kept"):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_write_safetensors_is_atomic_and_returns_the_digest(tmp_path):
    import hashlib

    import torch
    from safetensors.torch import load_file

    path = tmp_path / "w.safetensors"
    digest = write_safetensors(path, {"w": torch.arange(6.0).reshape(2, 3)}, {"k": "v"})
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(load_file(path)["w"], torch.arange(6.0).reshape(2, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "x.json") as tmp:
        tmp.write_text("{")
        raise RuntimeError("stopped")
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
