"""The two arms of a comparison differ only in the seg head: the same cases with --skip-missing,
the same initial backbone and classifier weights, and the same crops and labels, step by step."""

import pytest
import torch

import data
import train
from helpers import prepared_synthetic, train_cli

MISSING = "synthetic_train_0002"  # its mask is deleted: a case TotalSegmentator failed on


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = prepared_synthetic(tmp_path_factory.mktemp("arms") / "syn", train=6, val=2, test=2)
    (root / "prep" / "mask" / f"{MISSING}.nii").unlink()
    return root


def arm(root, tmp_path, seg):
    """(settings, task, splits, model) of one arm, as train.main builds them."""
    flags = ["--data-path", root, "--skip-missing", "-b", "2", "-j", "0", "--output-dir", tmp_path / str(seg)]
    args = train.get_args_parser().parse_args([str(f) for f in flags] + (["--seg"] if seg else []))
    s, notes = train.resolve(args, "chest", "cpu")
    task, splits = train.prepare_run(s, notes, "chest", "cpu")
    model, *_ = train.setup_model(s, task, torch.device("cpu"))
    return s, task, splits, model


def test_both_arms_train_and_test_on_the_same_cases_and_start_from_the_same_weights(root, tmp_path):
    s0, _, plain_splits, plain = arm(root, tmp_path, seg=False)
    s1, _, seg_splits, seg = arm(root, tmp_path, seg=True)
    for split in ("train", "val", "test"):
        assert plain_splits[split].case_ids == seg_splits[split].case_ids, split
    assert MISSING not in plain_splits["train"].case_ids and len(plain_splits["train"]) == 5
    plain_state, seg_state = plain.state_dict(), seg.state_dict()
    assert {k for k in seg_state if k not in plain_state} == {"seg_head.weight", "seg_head.bias"}
    for name, value in plain_state.items():
        assert torch.equal(value, seg_state[name]), name
    plain_loader, _ = train.loaders_for(plain_splits, s0)
    seg_loader, _ = train.loaders_for(seg_splits, s1)
    for epoch in (0, 1):
        plain_loader.sampler.set_epoch(epoch)
        seg_loader.sampler.set_epoch(epoch)
        for a, b in zip(plain_loader, seg_loader, strict=True):
            assert torch.equal(a["ct"], b["ct"]) and torch.equal(a["label"], b["label"])
            assert torch.equal(a["index"], b["index"]) and "mask" not in a and "mask" in b


def test_without_skip_missing_the_seg_arm_refuses_and_the_baseline_keeps_every_case(root, tmp_path):
    expected = f"{MISSING}.nii \\(run make_masks.py first, or pass --skip-missing\\)"
    with pytest.raises(SystemExit, match=expected):
        train_cli("--data-path", root, "--seg", "-b", "2", "--output-dir", tmp_path / "refused")
    source = data.Source("synthetic", str(root), str(root / "prep"))
    splits = data.build_datasets(data.make_task("synthetic"), source, seed=0, with_mask=False)
    assert MISSING in splits["train"].case_ids and len(splits["train"]) == 6
