"""Fast CPU checks of the whole method: models, cropping, training, resume and metrics.

    python -m pytest -q test_smoke.py
"""
import csv
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

import data
import evaluate
import synthetic
import train
import model
from model import ARCHS, Backbone, CTClassifier, torchvision_model

STEMS = {"r3d": "stem.0.", "mvit": "conv_proj.", "swin": "patch_embed.proj."}  # replaced: 1 input channel
HEADS = {"r3d": "fc.", "mvit": "head.", "swin": "head."}


def grid_sized(name):
    return ".rel_pos_" in name  # MViT's relative-position tables follow the token grid


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("crop", [(96, 192, 192), (160, 176, 192)], ids=["chest", "abdomen"])
def test_feature_maps_and_parameters_match_torchvision(arch, crop):
    with torch.device("meta"):
        ours = Backbone(arch, crop)
        fmap = ours(torch.empty(2, 1, *crop))
        reference = torchvision_model(arch)
    d, h, w = crop
    channels = 512 if arch == "r3d" else 768
    assert tuple(fmap.shape) == (2, channels, d // 16, math.ceil(h / 16), math.ceil(w / 16))
    kept = {k: v.shape for k, v in ours.net.state_dict().items()
            if not k.startswith(STEMS[arch]) and not grid_sized(k)}
    expected = {k: v.shape for k, v in reference.state_dict().items()
                if not k.startswith((STEMS[arch], HEADS[arch])) and not grid_sized(k)}
    assert kept == expected  # same tensors, names and shapes: the backbone is torchvision's own
    count = lambda m, skip: sum(p.numel() for n, p in m.named_parameters() if not n.startswith(skip) and not grid_sized(n))
    assert count(ours.net, STEMS[arch]) == count(reference, (STEMS[arch], HEADS[arch]))
    stem = dict(ours.net.named_parameters())[STEMS[arch] + "weight"]
    assert stem.shape[1] == 1 and tuple(stem.shape[2:]) == ((2, 2, 2) if arch == "r3d" else (16, 2, 2))
    if arch == "mvit":  # tables sized to the token grid (d/16, h/2, w/2), as torchvision sizes them for its own
        assert ours.net.blocks[0].attn.rel_pos_t.shape[0] == 2 * (d // 16) - 1
        assert ours.net.blocks[0].attn.rel_pos_h.shape[0] == 2 * (max(h, w) // 2) - 1


def test_seg_head_only_when_asked():
    torch.manual_seed(0)
    plain = CTClassifier("r3d", 3, (32, 32, 32))
    seg = CTClassifier("r3d", 3, (32, 32, 32), seg_classes=7)
    assert plain.seg_head is None and not any("seg" in n for n, _ in plain.named_parameters())
    n_plain = sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in seg.parameters()) == n_plain + 512 * 7 + 7
    x = torch.randn(2, 1, 32, 32, 32)
    logits, seg_logits = seg.train()(x)
    assert logits.shape == (2, 3) and seg_logits.shape == (2, 7, 2, 2, 2)  # 1x1x1 conv on the last feature map
    seg.eval()
    assert isinstance(seg(x), torch.Tensor)  # inference is the plain classifier
    assert seg(x, with_seg=True)[1].shape == (2, 7, 2, 2, 2)


@pytest.mark.parametrize("size", [(32, 48, 40), (96, 192, 192), (7, 5, 9)])
def test_two_step_upsampling_is_trilinear(size):
    seg = torch.randn(2, 3, 2, 3, 4, dtype=torch.float64)
    reference = torch.nn.functional.interpolate(seg, size=size, mode="trilinear", align_corners=False)
    # PyTorch computes the coordinate scale in single precision: agreement to ~1e-7, not to float64 rounding
    torch.testing.assert_close(model.upsample_seg(seg, size), reference, rtol=0, atol=1e-6)
    planar = model.upsample_planar(seg, size)
    torch.testing.assert_close(model.upsample_depth(planar, size[0], 3, 6), reference[:, :, 3:6], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["ce", "dice", "dice_ce"])
def test_chunked_segmentation_loss_equals_the_one_shot_loss(kind):
    torch.manual_seed(0)
    seg = torch.randn(2, 7, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 7, (2, 32, 48, 48))
    full = torch.nn.functional.interpolate(seg, size=(32, 48, 48), mode="trilinear", align_corners=False)
    reference = torch.nn.functional.cross_entropy(full, target) if kind != "dice" else 0
    if kind != "ce":
        probs, onehot = full.softmax(1), torch.nn.functional.one_hot(target, 7).permute(0, 4, 1, 2, 3).double()
        dice = (2 * (probs * onehot).sum((0, 2, 3, 4)) + 1e-5) / ((probs + onehot).sum((0, 2, 3, 4)) + 1e-5)
        reference = reference + 1 - dice[1:].mean()
    (expected,) = torch.autograd.grad(reference, seg)
    loss = train.segmentation_loss(seg, target, kind, chunk=5)
    (got,) = torch.autograd.grad(loss, seg)
    torch.testing.assert_close(loss.double(), reference)
    torch.testing.assert_close(got, expected)


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
    np.testing.assert_allclose(data.normalize(x, (-1000, 200)).numpy(), [-1, -1, 0, 1, 1], atol=1e-6)


def test_synthetic_is_seeded_and_anatomical():
    a = synthetic.synthetic_split("val", 3)
    b = synthetic.synthetic_split("val", 3)
    np.testing.assert_array_equal(a[1][0][0], b[1][0][0])
    for (ct, mask), label in zip(a[1], a[2]):
        assert ct.dtype == np.int16 and mask.dtype == np.uint8 and set(np.unique(mask)) <= set(range(7))
        assert ct[mask == 6].mean() > 0 and ct[(mask >= 1) & (mask <= 5)].mean() < -500  # heart, aerated lung
        left, right = np.argwhere(mask == 1)[:, 2].mean(), np.argwhere(mask == 3)[:, 2].mean()
        assert left < right  # RAS: the patient's left lung sits at low x
        assert np.argwhere(mask == 2)[:, 0].mean() < np.argwhere(mask == 1)[:, 0].mean()  # lower lobe is lower


def run_train(tmp_path, *extra):
    args = train.get_args_parser().parse_args(
        ["--synthetic-cases", "6", "2", "3", "-b", "2", "-j", "0", "--print-freq", "2",
         "--output-dir", str(tmp_path), *extra])
    train.main(args)
    return tmp_path


def read_rows(path):
    with open(path) as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seg", [False, True], ids=["noseg", "seg"])
def test_each_backbone_trains(tmp_path, arch, seg):
    run_train(tmp_path, "--model", arch, "--epochs", "1", "--max-steps", "2", "--crop", "32", "32", "32",
              *(["--seg"] if seg else []))
    rows = read_rows(tmp_path / "iterations.csv")
    assert len(rows) == 2
    for epoch, it, loss, cls_loss, seg_loss, grad_norm, lr, _ in rows:
        assert all(math.isfinite(float(v)) for v in (loss, cls_loss, seg_loss, grad_norm))
        assert (float(seg_loss) > 0) == seg and math.isclose(float(loss), float(cls_loss) + float(seg_loss), rel_tol=1e-4)
    assert len(read_rows(tmp_path / "predictions_test.csv")) == 1 + 3
    assert (tmp_path / "metrics_test.json").exists() and (tmp_path / "checkpoint.pth").exists()


def test_fixed_batch_overfits():
    torch.manual_seed(0)
    cases, volumes, labels = synthetic.synthetic_split("train", 4)
    ds = data.CTDataset(cases, volumes, labels, (40, 60, 60), (32, 48, 48), train=False, with_mask=True)
    batch = ds.collate([ds[i] for i in range(4)])
    model = CTClassifier("r3d", labels.shape[1], (32, 48, 48), seg_classes=7).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = data.normalize(batch["ct"], (-1000, 200))
    losses = []
    for _ in range(12):
        logits, seg_logits = model(x)
        loss = train.classification_loss(logits, batch["label"], {"task": "multilabel"}) + train.segmentation_loss(
            seg_logits, batch["mask"].long(), "dice_ce")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("crash_at", [3, 4], ids=["epoch-boundary", "mid-epoch"])
def test_resume_round_trip_gives_identical_predictions(tmp_path, monkeypatch, crash_at):
    straight = run_train(tmp_path / "straight", "--epochs", "2")
    real_save = train.save_checkpoint

    def save_then_crash(args, model, optimizer, scaler, iteration, best_auc, name="checkpoint.pth"):
        real_save(args, model, optimizer, scaler, iteration, best_auc, name)
        if name == "checkpoint.pth" and iteration == crash_at:
            raise KeyboardInterrupt  # stands in for a crash right after the checkpoint landed

    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):  # 3 iterations per epoch; mid-epoch checkpoints every 2
        run_train(tmp_path / "resumed", "--epochs", "2", "--checkpoint-every", "2")
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    resumed = run_train(tmp_path / "resumed", "--epochs", "2", "--checkpoint-every", "2", "--resume")
    assert read_rows(straight / "predictions_test.csv") == read_rows(resumed / "predictions_test.csv")
    assert [r[:7] for r in read_rows(straight / "iterations.csv")] == [r[:7] for r in read_rows(resumed / "iterations.csv")]
    state = torch.load(resumed / "checkpoint.pth", weights_only=False)
    assert state["iteration"] == 6 and set(state) >= {"model", "optimizer", "scaler", "args", "best_auc"}


def test_cosine_schedule():
    assert train.cosine_lr(0, 100, 1e-4) == 1e-4
    assert math.isclose(train.cosine_lr(50, 100, 1e-4), 5e-5)
    assert train.cosine_lr(100, 100, 1e-4) == 0.0
    assert train.cosine_lr(0, 100, 1e-4, warmup_iterations=10) == 1e-5


def test_metrics_against_sklearn_and_hand_made_cases():
    y = np.array([[0, 1, 0], [0, 1, 1], [1, 1, 0], [1, 1, 1], [0, 1, 0], [1, 1, 1]], float)
    p = np.array([[0.1, 0.3, 0.5], [0.3, 0.2, 0.5], [0.35, 0.9, 0.1], [0.8, 0.5, 0.9], [0.2, 0.1, 0.2],
                  [0.7, 0.4, 0.5]])  # class c has a tie at 0.5 across both labels; class b has one label value
    rows, macro, skipped = evaluate.compute_metrics(y, p, ["a", "b", "c"])
    assert skipped == ["b"] and macro["classes"] == 2 and macro["skipped"] == 1
    by_class = {r["class"]: r for r in rows}
    for k, name in ((0, "a"), (2, "c")):
        r = by_class[name]
        assert math.isclose(r["auc"], roc_auc_score(y[:, k], p[:, k]))
        pred = (p[:, k] >= r["threshold"]).astype(int)
        tn, fp, fn, tp = confusion_matrix(y[:, k], pred, labels=[0, 1]).ravel()
        assert math.isclose(r["sensitivity"], tp / (tp + fn)) and math.isclose(r["specificity"], tn / (tn + fp))
        assert math.isclose(r["f1_weighted"], f1_score(y[:, k], pred, average="weighted"))
        assert math.isclose(r["f1_positive"], f1_score(y[:, k], pred))
    # a is separable at 0.35; c by hand: AUC 8/9 (the tie counts 1/2), Youden J 2/3 at >= 0.5 (sens 1, spec 2/3)
    assert by_class["a"]["auc"] == 1.0 and by_class["a"]["sensitivity"] == 1.0 == by_class["a"]["specificity"]
    assert by_class["a"]["threshold"] == 0.35
    assert math.isclose(by_class["c"]["auc"], 8 / 9) and by_class["c"]["threshold"] == 0.5
    assert by_class["c"]["sensitivity"] == 1.0 and math.isclose(by_class["c"]["specificity"], 2 / 3)
    assert math.isclose(by_class["c"]["precision"], 3 / 4) and math.isclose(by_class["c"]["f1_positive"], 6 / 7)
    assert math.isclose(macro["auc"], (1.0 + 8 / 9) / 2)


def test_predictions_csv_round_trip(tmp_path):
    y, p = np.array([[0, 1], [1, 0], [1, 1]], float), np.array([[0.25, 0.5], [0.75, 0.125], [0.5, 1.0]])
    path = tmp_path / "predictions_test.csv"
    evaluate.write_predictions(path, ["a", "b", "c"], y, p, ["Lung nodule", "x,y"])
    cases, y2, p2, names = evaluate.read_predictions(path)
    assert cases == ["a", "b", "c"] and names == ["Lung nodule", "x,y"]
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(p, p2)
