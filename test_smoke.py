"""Fast CPU checks of the whole method: models, cropping, training, resume and metrics.

python -m pytest -q test_smoke.py
"""

import csv
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

import data
import evaluate
import model
import train
from ctkit import ct_io, inference, synthetic, utils
from ctkit.labels import read_predictions, write_predictions
from ctkit.regions import REGIONS
from model import ARCHS, Backbone, CTClassifier, torchvision_model

STEMS = {"r3d": "stem.0.", "mvit": "conv_proj.", "swin": "patch_embed.proj."}  # replaced: 1 input channel
HEADS = {"r3d": "fc.", "mvit": "head.", "swin": "head."}


def grid_sized(name):
    return ".rel_pos_" in name  # MViT's relative-position tables follow the token grid


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("crop", [(96, 192, 192), (160, 192, 176)], ids=["chest", "abdomen"])
def test_feature_maps_and_parameters_match_torchvision(arch, crop):
    with torch.device("meta"):
        ours = Backbone(arch, crop)
        fmap = ours(torch.empty(2, 1, *crop))
        reference = torchvision_model(arch)
    d, h, w = crop
    channels = 512 if arch == "r3d" else 768
    assert tuple(fmap.shape) == (2, channels, d // 16, math.ceil(h / 16), math.ceil(w / 16))
    kept = {
        k: v.shape
        for k, v in ours.net.state_dict().items()
        if not k.startswith(STEMS[arch]) and not grid_sized(k)
    }
    expected = {
        k: v.shape
        for k, v in reference.state_dict().items()
        if not k.startswith((STEMS[arch], HEADS[arch])) and not grid_sized(k)
    }
    assert kept == expected  # same tensors, names and shapes: the backbone is torchvision's own

    def count(module, skip):
        return sum(
            p.numel() for n, p in module.named_parameters() if not n.startswith(skip) and not grid_sized(n)
        )

    assert count(ours.net, STEMS[arch]) == count(reference, (STEMS[arch], HEADS[arch]))
    stem = dict(ours.net.named_parameters())[STEMS[arch] + "weight"]
    assert stem.shape[1] == 1 and tuple(stem.shape[2:]) == ((2, 2, 2) if arch == "r3d" else (16, 2, 2))
    if arch == "mvit":  # tables sized to the token grid (d/16, h/2, w/2), as torchvision sizes its own
        assert ours.net.blocks[0].attn.rel_pos_t.shape[0] == 2 * (d // 16) - 1
        assert ours.net.blocks[0].attn.rel_pos_h.shape[0] == 2 * (max(h, w) // 2) - 1


def test_seg_head_only_when_asked():
    torch.manual_seed(0)
    plain = CTClassifier("r3d", 3, (32, 32, 32))
    seg = CTClassifier("r3d", 3, (32, 32, 32), seg_classes=7)
    assert plain.seg_head is None and not any("seg" in n for n, _ in plain.named_parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in seg.parameters()) == n_plain + 512 * 7 + 7
    x, mask = torch.randn(2, 1, 32, 32, 32), torch.randint(0, 7, (2, 32, 32, 32))
    loss, cls_loss, seg_loss = model.Objective(seg.train(), "multilabel")(x, torch.ones(2, 3), mask)
    assert seg_loss.ndim == 0 and seg_loss > 0 and torch.isclose(loss, cls_loss + seg_loss)
    assert seg(x).shape == (2, 3)
    label_map = inference.segment(seg, x)  # a label map from the 2x2x2 feature map
    assert label_map.shape == (2, 32, 32, 32) and label_map.min() >= 0 and label_map.max() < 7
    calls = []
    seg.seg_head.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():  # inference is exactly the plain classifier: one tensor, the seg head never runs
        torch.testing.assert_close(seg.train()(x), logits_without_seg_head(seg, x))
        torch.testing.assert_close(seg.eval()(x), logits_without_seg_head(seg, x))
    assert calls == []


def logits_without_seg_head(net, x):
    return net.head(net.backbone(x).mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("seg_weight", [1.0, 0.3])
def test_objective_is_the_papers_equations_written_out(seg_weight):
    """Objective(x, y, mask) against eq. 1, 3 and 4 written out by hand; without a mask L = L_cls. (The
    losses are taken in float32, as under autocast: hence the tolerance on a float64 model.)"""
    torch.manual_seed(0)
    net = CTClassifier("r3d", 3, (32, 32, 32), seg_classes=7).double().eval()
    x, y = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64), torch.tensor([[1.0, 0, 1], [0, 0, 1]]).double()
    mask = torch.randint(0, 7, (2, 32, 32, 32), dtype=torch.uint8)
    features = net.backbone(x)  # (2, 512, 2, 2, 2)
    cls = F.binary_cross_entropy_with_logits(net.head(features.mean(dim=(2, 3, 4))), y)  # eq. 1, 4
    full = F.interpolate(net.seg_head(features), size=(32, 32, 32), mode="trilinear", align_corners=False)
    seg = F.cross_entropy(full, mask.long())  # eq. 3
    objective = model.Objective(net, "multilabel", seg_weight)
    with torch.no_grad():
        got = objective(x, y, mask)
        expected = (cls + seg_weight * seg, cls, seg)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7, check_dtype=False)
        without = objective(x, y)
        torch.testing.assert_close(without, (cls, cls, torch.zeros(())), rtol=1e-6, atol=0, check_dtype=False)


def test_default_segmentation_loss_is_the_papers_three_lines():
    torch.manual_seed(0)
    seg_logits = torch.randn(2, 7, 2, 3, 3, requires_grad=True)
    mask = torch.randint(0, 7, (2, 32, 48, 48), dtype=torch.uint8)
    full = F.interpolate(seg_logits, size=(32, 48, 48), mode="trilinear", align_corners=False)
    reference = F.cross_entropy(full, mask.long())
    assert torch.equal(model.segmentation_loss(seg_logits, mask), reference)


@pytest.mark.parametrize("size", [(32, 48, 40), (96, 192, 192), (7, 5, 9)])
def test_chunked_segmentation_loss_equals_the_plain_one(size):
    """The opt-in --seg-chunk path: same value and gradient as interpolate + cross_entropy (float64)."""
    torch.manual_seed(0)
    seg_logits = torch.randn(2, 7, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.randint(0, 7, (2, *size))
    full = F.interpolate(seg_logits, size=size, mode="trilinear", align_corners=False)
    reference = F.cross_entropy(full, mask)
    (expected,) = torch.autograd.grad(reference, seg_logits)
    for chunk in (1, 5, 1000):
        loss = model.chunked_segmentation_loss(seg_logits, mask, chunk)
        (got,) = torch.autograd.grad(loss, seg_logits)
        # PyTorch computes the coordinate scale in single precision: agreement to ~1e-7, not to float64
        torch.testing.assert_close(loss, reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-7)


def test_table3_sizes_in_our_axis_order():
    """Table 3 writes x × y × z; arrays here are (D, H, W) = (z, y, x)."""
    chest, abdomen = REGIONS["chest"], REGIONS["abdomen"]
    assert chest["pad"] == (120, 240, 240) and chest["crop"] == (96, 192, 192)  # 240x240x120, 192x192x96
    assert abdomen["pad"] == (192, 256, 256)  # 256 x 256 x 192
    assert abdomen["crop"] == (160, 192, 176)  # 176 x 192 x 160
    assert chest["window"] == (-1000, 200) and abdomen["window"] == (-150, 250)


def test_a_smaller_crop_scales_the_pad_box():
    """The pad box keeps the paper's pad/crop ratio, so a random crop still mostly covers the patient."""
    assert data.make_task("radchest", crop=(32, 48, 48)).pad == (40, 60, 60)
    assert data.make_task("ratic", crop=(80, 96, 88)).pad == (96, 128, 128)
    assert data.make_task("ratic", crop=(80, 96, 88), pad=(90, 100, 100)).pad == (90, 100, 100)
    assert data.make_task("radchest").pad == (120, 240, 240)
    with pytest.raises(data.BadInput, match="smaller than the crop"):
        data.make_task("radchest", crop=(32, 48, 48), pad=(30, 60, 60))


def test_window_and_padding_known_answers():
    # pad/crop 10 -> 6 of an axis of 8: the padded box starts at -1, its centre crop at -1 + 2 = 1
    assert data.window_start((8, 20, 4), (10, 10, 10), (6, 6, 6)) == [1, 7, -1]
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    out = data.read_window(volume, [-1, 1, 4], (3, 2, 4), fill=-7)
    assert out.shape == (3, 2, 4)
    assert (out[0] == -7).all() and (out[:, :, 2:] == -7).all()
    np.testing.assert_array_equal(out[1:, :, :2], volume[0:2, 1:3, 4:6])
    rng = np.random.default_rng(0)
    for _ in range(50):  # a random crop stays inside the padded box
        s = data.window_start((30, 30, 30), (40, 40, 40), (32, 32, 32), rng)
        assert all(-5 <= v <= 3 for v in s)
    x = torch.tensor([-2000, -1000, -400, 200, 900], dtype=torch.int16)
    np.testing.assert_allclose(ct_io.normalize(x, (-1000, 200)).numpy(), [-1, -1, 0, 1, 1], atol=1e-6)


def test_synthetic_is_seeded_and_anatomical():
    a = synthetic.synthetic_split("val", 3)
    b = synthetic.synthetic_split("val", 3)
    np.testing.assert_array_equal(a[1][0][0], b[1][0][0])
    for ct, mask in a[1]:
        assert ct.dtype == np.int16 and mask.dtype == np.uint8 and set(np.unique(mask)) <= set(range(7))
        assert ct[mask == 6].mean() > 0 and ct[(mask >= 1) & (mask <= 5)].mean() < -500  # heart, aerated lung
        left, right = np.argwhere(mask == 1)[:, 2].mean(), np.argwhere(mask == 3)[:, 2].mean()
        assert left < right  # RAS: the patient's left lung sits at low x
        lower, upper = np.argwhere(mask == 2)[:, 0].mean(), np.argwhere(mask == 1)[:, 0].mean()
        assert lower < upper  # the lower lobe is lower


def run_train(tmp_path, *extra):
    small = ["--synthetic-cases", "6", "2", "3", "-b", "2", "-j", "0", "--print-freq", "2"]
    train.main(train.get_args_parser().parse_args([*small, "--output-dir", str(tmp_path), *extra]))
    return tmp_path


def read_rows(path):
    with open(path) as f:
        return list(csv.reader(f))


def read_dicts(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seg", [False, True], ids=["noseg", "seg"])
def test_each_backbone_trains(tmp_path, arch, seg):
    short = ["--epochs", "1", "--max-steps", "2", "--crop", "32", "32", "32"]
    run_train(tmp_path, "--model", arch, *short, *(["--seg"] if seg else []))
    rows = read_dicts(tmp_path / "iterations.csv")
    assert len(rows) == 2 and list(rows[0]) == list(utils.StepLog.FIELDS)
    for row in rows:
        loss, cls_loss, seg_loss, grad_norm, backbone_norm = (float(row[k]) for k in utils.StepLog.VALUES)
        assert all(math.isfinite(v) for v in (loss, cls_loss, seg_loss, grad_norm))
        assert (seg_loss > 0) == seg and math.isclose(loss, cls_loss + seg_loss, rel_tol=1e-4)
        assert 0 < backbone_norm < grad_norm  # the heads' gradients add to the total
    assert len(read_rows(tmp_path / "predictions_test.csv")) == 1 + 3
    assert (tmp_path / "metrics_test.json").exists() and (tmp_path / "checkpoint.pth").exists()


def test_fixed_batch_overfits():
    torch.manual_seed(0)
    cases, volumes, labels = synthetic.synthetic_split("train", 4)
    ds = data.CTDataset(cases, volumes, labels, (40, 60, 60), (16, 32, 32), train=False, with_mask=True)
    batch = torch.utils.data.default_collate([ds[i] for i in range(4)])
    net = CTClassifier("r3d", labels.shape[1], (16, 32, 32), seg_classes=7).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x = ct_io.normalize(batch["ct"], (-1000, 200))
    losses = []
    for _ in range(12):
        loss, _, _ = model.Objective(net, "multilabel")(x, batch["label"], batch["mask"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


TWO_EPOCHS = ["--epochs", "2", "--crop", "16", "32", "32"]  # 3 iterations per epoch


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run each crash below is compared with (trained once)."""
    return run_train(tmp_path_factory.mktemp("straight"), *TWO_EPOCHS)


@pytest.mark.parametrize("crash_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_round_trip_gives_identical_predictions(tmp_path, monkeypatch, crash_at, straight):
    real_save = utils.save_checkpoint

    def save_then_crash(path, state):
        real_save(path, state)
        if str(path).endswith("/checkpoint.pth") and state["iteration"] == crash_at:
            raise KeyboardInterrupt  # stands in for a crash right after the checkpoint landed

    monkeypatch.setattr(utils, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):  # mid-epoch checkpoints every 2 iterations
        run_train(tmp_path / "resumed", *TWO_EPOCHS, "--checkpoint-every", "2")
    monkeypatch.setattr(utils, "save_checkpoint", real_save)
    resumed = run_train(tmp_path / "resumed", *TWO_EPOCHS, "--checkpoint-every", "2", "--resume")
    assert read_rows(straight / "predictions_test.csv") == read_rows(resumed / "predictions_test.csv")
    log = [[r[k] for k in utils.StepLog.FIELDS[:-1]] for r in read_dicts(straight / "iterations.csv")]
    resumed_log = [[r[k] for k in utils.StepLog.FIELDS[:-1]] for r in read_dicts(resumed / "iterations.csv")]
    assert log == resumed_log
    state = utils.load_checkpoint(resumed / "checkpoint.pth")  # tensors and plain types only
    assert state["iteration"] == 6
    assert set(state) >= {"model", "optimizer", "scaler", "args", "task", "best_auc", "world_size"}
    assert data.Task.from_dict(state["task"]) == data.make_task("synthetic", crop=(16, 32, 32))


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import argparse

    torch.save({"model": {}, "args": argparse.Namespace(lr=1.0)}, tmp_path / "shared.pth")
    with pytest.raises(ValueError, match=r"shared.pth: refused: .*pickled Python objects.*Namespace"):
        utils.load_checkpoint(tmp_path / "shared.pth")


def test_cosine_schedule():
    assert train.cosine_lr(0, 100, 1e-4) == 1e-4
    assert math.isclose(train.cosine_lr(50, 100, 1e-4), 5e-5)
    assert train.cosine_lr(100, 100, 1e-4) == 0.0
    assert train.cosine_lr(0, 100, 1e-4, warmup_iterations=10) == 1e-5


def test_metrics_against_sklearn_and_hand_made_cases():
    y = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 0], [1, 1, 1]], float)
    # class c has a tie at 0.5 across both labels; class b has one label value
    p = np.array(
        [
            [0.1, 0.3, 0.5],
            [0.3, 0.2, 0.5],
            [0.35, 0.9, 0.1],
            [0.8, 0.5, 0.9],
            [0.2, 0.1, 0.2],
            [0.7, 0.4, 0.5],
        ]
    )
    rows, macro, skipped = evaluate.compute_metrics(y, p, ["a", "b", "c"])
    assert skipped == ["b"] and macro["classes"] == 2 and macro["skipped"] == 1
    by_class = {r["class"]: r for r in rows}
    for k, name in ((0, "a"), (2, "c")):
        r = by_class[name]
        assert math.isclose(r["auc"], roc_auc_score(y[:, k], p[:, k]))
        pred = (p[:, k] >= r["threshold"]).astype(int)
        tn, fp, fn, tp = confusion_matrix(y[:, k], pred, labels=[0, 1]).ravel()
        assert math.isclose(r["sensitivity"], tp / (tp + fn)) and math.isclose(
            r["specificity"], tn / (tn + fp)
        )
        assert math.isclose(r["f1_weighted"], f1_score(y[:, k], pred, average="weighted"))
        assert math.isclose(r["f1_positive"], f1_score(y[:, k], pred))
    # a is separable at 0.35; c by hand: AUC 8/9 (the tie counts 1/2), Youden J 2/3 at >= 0.5 (sens 1,
    # spec 2/3)
    assert by_class["a"]["auc"] == 1.0 and by_class["a"]["sensitivity"] == 1.0 == by_class["a"]["specificity"]
    assert by_class["a"]["threshold"] == 0.35
    assert math.isclose(by_class["c"]["auc"], 8 / 9) and by_class["c"]["threshold"] == 0.5
    assert by_class["c"]["sensitivity"] == 1.0 and math.isclose(by_class["c"]["specificity"], 2 / 3)
    assert math.isclose(by_class["c"]["precision"], 3 / 4) and math.isclose(
        by_class["c"]["f1_positive"], 6 / 7
    )
    assert math.isclose(macro["auc"], (1.0 + 8 / 9) / 2)


def test_predictions_csv_round_trip(tmp_path):
    y, p = np.array([[0, 1], [1, 0], [1, 1]], float), np.array([[0.25, 0.5], [0.75, 0.125], [0.5, 1.0]])
    path = tmp_path / "predictions_test.csv"
    write_predictions(path, ["a", "b", "c"], y, p, ["Lung nodule", "x,y"])
    read = read_predictions(path)
    assert read["cases"] == read["patients"] == ["a", "b", "c"] and read["classes"] == ["Lung nodule", "x,y"]
    np.testing.assert_array_equal(y, read["y_true"])
    np.testing.assert_array_equal(p, read["y_prob"])


def test_a_model_without_seg_head_says_so_when_given_a_mask():
    net = CTClassifier("r3d", 3, (32, 32, 32))
    with pytest.raises(ValueError, match="no segmentation head"):
        model.Objective(net, "multilabel")(
            torch.randn(1, 1, 32, 32, 32), torch.ones(1, 3), torch.zeros(1, 32, 32, 32)
        )


def test_grad_norm_of_some_parameters():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])  # c has no gradient
    assert float(utils.grad_norm([a, b, c])) == 5.0 and float(utils.grad_norm([c])) == 0.0
