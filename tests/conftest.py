"""Where the real example CT is, found once per test session (before any test module is imported)."""

import os
import subprocess
from pathlib import Path


def pytest_configure(config):
    """$TOTALSEG_EXAMPLE: TotalSegmentator's example CT and reference outputs; if not given, at
    shared/data/... beside this checkout, else beside the checkout it was cloned from (a fresh
    `git clone . /tmp/x`, as CI runs)."""
    if os.environ.get("TOTALSEG_EXAMPLE"):
        return
    root, tail = Path(__file__).resolve().parents[1], Path("shared", "data", "totalsegmentator_example")
    origin = subprocess.run(
        ["git", "-C", str(root), "config", "--get", "remote.origin.url"], capture_output=True, text=True
    ).stdout.strip()
    candidates = [root.parent / tail] + ([Path(origin).resolve().parent / tail] if origin else [])
    os.environ["TOTALSEG_EXAMPLE"] = str(next((p for p in candidates if p.exists()), candidates[0]))
