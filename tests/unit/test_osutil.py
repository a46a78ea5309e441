"""osutil: which filesystems get group commit (syncfs), read from /proc/self/mountinfo; the
kernel copy of a body's range with its fallback."""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import pytest

from relay import osutil
from relay.osutil import copy_range

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")


@linux_only
def test_filesystem_type_of_well_known_mounts() -> None:
    assert osutil.filesystem_type(Path("/proc/self")) == "proc"
    assert osutil.filesystem_type(Path("/")) != ""


@linux_only
def test_no_group_commit_where_syncfs_is_not_known_to_flush_like_fsync() -> None:
    assert osutil.filesystem_flush(Path("/proc")) is None  # not a filesystem we trust


def test_no_group_commit_on_old_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(osutil, "_kernel_version", lambda: (5, 16))
    assert osutil.filesystem_flush(Path("/")) is None


def test_copy_range_resumes_where_the_kernel_copy_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """copy_file_range fails after a first chunk (EXDEV, EIO...): the rest is copied by
    hand from where it stopped, never twice."""
    data = bytes(range(256)) * 8192  # 2 MiB
    source = tmp_path / "source"
    source.write_bytes(b"HEAD" + data)
    calls = []

    def flaky(src: int, dst: int, count: int, offset_src: int | None = None) -> int:
        calls.append(offset_src)
        if len(calls) > 1:
            raise OSError(errno.EXDEV, "cross-device")
        return os.write(dst, os.pread(src, min(count, 100_000), offset_src or 0))

    monkeypatch.setattr(os, "copy_file_range", flaky, raising=False)
    with source.open("rb") as src, (tmp_path / "copy").open("w+b") as dst:
        dst.write(b"new head ")
        dst.flush()
        copy_range(src, dst, 4, len(data))
    assert (tmp_path / "copy").read_bytes() == b"new head " + data
    assert len(calls) == 2
