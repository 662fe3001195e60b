"""Shared by the tests: the scripts' command lines, the synthetic phantoms written and preprocessed, and where
the real example CT is."""

import os
import subprocess
from pathlib import Path

import make_masks
import train
from ctkit import synthetic


def make_masks_cli(*args):
    """make_masks.py with these command-line arguments (paths may be Path objects)."""
    make_masks.cli([str(a) for a in args])


def train_cli(*args):
    """train.py with these command-line arguments, in this process (errors end as the script's one line)."""
    train.cli([str(a) for a in args])


def prepared_synthetic(root, train=4, val=2, test=2):
    """Phantoms written as a dataset (root/ct, root/totalseg, root/labels.csv) and run through make_masks.py
    with --from-totalseg into root/prep; returns root."""
    synthetic.write_synthetic(root, {"train": train, "val": val, "test": test})
    make_masks_cli("--src", root / "ct", "--dst", root / "prep", "--region", "chest", "--from-totalseg",
                   root / "totalseg")  # fmt: skip
    return root


def example_folder():
    """TotalSegmentator's example CT and reference outputs: $TOTALSEG_EXAMPLE, else shared/data/... beside
    this checkout, else beside the checkout it was cloned from (a fresh `git clone . /tmp/x`, as CI does)."""
    if os.environ.get("TOTALSEG_EXAMPLE"):
        return Path(os.environ["TOTALSEG_EXAMPLE"])
    root, tail = Path(__file__).resolve().parents[1], Path("shared", "data", "totalsegmentator_example")
    origin = subprocess.run(["git", "-C", str(root), "config", "--get", "remote.origin.url"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    candidates = [root.parent / tail] + ([Path(origin).resolve().parent / tail] if origin else [])
    return next((path for path in candidates if path.exists()), candidates[0])


EXAMPLE = example_folder()
