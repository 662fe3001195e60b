"""Shared by the tests: the scripts' command lines, and the synthetic phantoms written and preprocessed."""

import make_masks
import synthetic
import train


def make_masks_cli(*args):
    """make_masks.py with these command-line arguments (paths may be Path objects)."""
    make_masks.main(make_masks.get_args_parser().parse_args([str(a) for a in args]))


def train_cli(*args):
    """train.py with these command-line arguments, in this process."""
    train.main(train.get_args_parser().parse_args([str(a) for a in args]))


def prepared_synthetic(root, train=4, val=2, test=2):
    """Phantoms written as a dataset (root/ct, root/totalseg, root/labels.csv) and run through make_masks.py
    with --from-totalseg into root/prep; returns root."""
    synthetic.write_synthetic(root, {"train": train, "val": val, "test": test})
    make_masks_cli("--src", root / "ct", "--dst", root / "prep", "--region", "chest", "--from-totalseg",
                   root / "totalseg")  # fmt: skip
    return root
