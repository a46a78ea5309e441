"""osutil: which filesystems get group commit (syncfs), read from /proc/self/mountinfo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from relay import osutil

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
