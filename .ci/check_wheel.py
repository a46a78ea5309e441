"""List a wheel's files; fail if it holds anything but relay/ (with py.typed) and its dist-info.

Usage: python .ci/check_wheel.py dist/oauth_smtp_relay-X.Y.Z-py3-none-any.whl
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def main(path: str) -> int:
    names = zipfile.ZipFile(path).namelist()
    print(f"{Path(path).name} ({len(names)} files):")
    for name in names:
        print(f"  {name}")
    outside = [
        name
        for name in names
        if not (name.startswith("relay/") or name.split("/")[0].endswith(".dist-info"))
    ]
    problems = [f"outside relay/ and the dist-info: {name}" for name in outside]
    if "relay/py.typed" not in names:
        problems.append("relay/py.typed is missing")
    problems += [f"compiled file: {name}" for name in names if name.endswith(".pyc")]
    for problem in problems:
        print(f"wheel: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
