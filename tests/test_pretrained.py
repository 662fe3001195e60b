"""Kinetics-400 initialisation (paper §3.3, A.4), offline: torchvision's models in their original
configuration with random weights stand in for the published files."""

import pytest
import torch

from ctkit.pretrained import REPLACED, load_pretrained, resize_bias_table, resize_rel_pos
from helpers import train_cli
from model import ARCHS, CTClassifier, torchvision_model

CHEST, ABDOMEN, SMALL = (96, 192, 192), (160, 192, 176), (32, 48, 48)


@pytest.fixture(scope="module")
def pretrained_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("k400")
    files = {}
    for arch in ARCHS:
        torch.manual_seed(1)
        net = torchvision_model(arch)
        for module in net.modules():  # trained statistics, not the fresh ones
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
        files[arch] = folder / f"{arch}_kinetics400.pth"
        torch.save(net.state_dict(), files[arch])
    return files


@pytest.mark.parametrize("arch", ARCHS)
def test_every_kept_tensor_equals_the_file(arch, pretrained_files):
    state = torch.load(pretrained_files[arch], weights_only=True)
    torch.manual_seed(0)
    model = CTClassifier(arch, 18, CHEST, seg_classes=7)
    before = {k: v.clone() for k, v in model.backbone.net.state_dict().items()}
    report = load_pretrained(model.backbone, pretrained_files[arch])
    own = model.backbone.net.state_dict()
    same, adapted = 0, 0
    for name, value in state.items():
        if name.startswith(REPLACED[arch]):
            assert name not in own or torch.equal(own[name], before[name])  # new stem / head stay new
        elif value.shape == own[name].shape:
            assert torch.equal(own[name], value), name
            same += 1
        else:
            assert ".rel_pos_" in name and arch == "mvit"
            torch.testing.assert_close(own[name], resize_rel_pos(value, own[name].shape[0]))
            adapted += 1
    assert f"loaded {same} tensors as they are, adapted {adapted}" in report[0]
    assert same > 100 and adapted == (48 if arch == "mvit" else 0)  # MViT: h, w, t tables of 16 blocks
    assert model.backbone.net.state_dict().keys() == before.keys()


def test_r3d_stem_is_newly_initialised_batchnorm_included(pretrained_files):
    """A.4: the 1-channel stem does not use pretrained weights; its BatchNorm statistics described the
    3-channel conv's output, so they are not loaded either."""
    model = CTClassifier("r3d", 18, SMALL)
    report = load_pretrained(model.backbone, pretrained_files["r3d"])
    stem_norm, state = model.backbone.net.stem[1], torch.load(pretrained_files["r3d"], weights_only=True)
    assert torch.equal(stem_norm.running_var, torch.ones(64))
    assert torch.equal(stem_norm.running_mean, torch.zeros(64))
    assert not torch.equal(state["stem.1.running_var"], torch.ones(64))  # the file has other values
    assert "newly initialised" in report[0] and "stem.0" in report[0] and "stem.1" in report[0]
    assert torch.equal(model.backbone.net.layer1[0].conv1[0].weight, state["layer1.0.conv1.0.weight"])


def test_mvit_adapted_tables_reproduce_torchvision_attention(pretrained_files):
    """torchvision's MViT resizes rel-pos tables to the token grid at run time; the adapted tables must
    give the same attention when the original block runs on our grid (2 x 24 x 24 tokens, small crop)."""
    original = torchvision_model("mvit")
    original.load_state_dict(torch.load(pretrained_files["mvit"], weights_only=True))
    ours = CTClassifier("mvit", 5, SMALL)
    load_pretrained(ours.backbone, pretrained_files["mvit"])
    thw = (2, 24, 24)
    x = torch.randn(2, 1 + 2 * 24 * 24, 96)
    original.eval(), ours.eval()
    with torch.no_grad():
        for block_ours, block_original in zip(ours.backbone.net.blocks[:4], original.blocks[:4]):
            (y_ours, thw_ours), (y_original, thw_original) = block_ours(x, thw), block_original(x, thw)
            assert thw_ours == thw_original
            torch.testing.assert_close(y_ours, y_original)
            x, thw = y_ours, thw_ours


def test_swin_bias_table_resize():
    table = torch.randn(15 * 13 * 13, 3)
    assert torch.equal(resize_bias_table(table, (8, 7, 7), (8, 7, 7)), table)
    resized = resize_bias_table(table, (8, 7, 7), (6, 7, 7))  # 15 -> 11 relative depths
    grid, new = table.reshape(15, 13, 13, 3), resized.reshape(11, 13, 13, 3)
    for a, b in ((0, 0), (7, 5), (14, 10)):  # nearest, zero and farthest offsets coincide
        torch.testing.assert_close(new[b], grid[a])


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_at_paper_crops_after_loading(arch, pretrained_files):
    for crop in (CHEST, ABDOMEN):
        model = CTClassifier(arch, 3, crop).eval()
        load_pretrained(model.backbone, pretrained_files[arch])
        with torch.no_grad():
            logits = model(torch.randn(1, 1, *crop))
        assert logits.shape == (1, 3) and torch.isfinite(logits).all()


def test_wrong_file_is_refused(pretrained_files, tmp_path):
    with pytest.raises(ValueError, match="no value for"):
        load_pretrained(CTClassifier("swin", 3, SMALL).backbone, pretrained_files["r3d"])
    torch.save({}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no value for"):
        load_pretrained(CTClassifier("r3d", 3, SMALL).backbone, tmp_path / "empty.pth")
    (tmp_path / "cut.pth").write_bytes(pretrained_files["r3d"].read_bytes()[:1000])
    with pytest.raises(SystemExit, match=r"--pretrained .*cut.pth: not a readable state dict"):  # one line
        train_cli("--pretrained", tmp_path / "cut.pth", "--epochs", "1", "--output-dir", tmp_path / "run")


def test_train_with_pretrained_file(pretrained_files, tmp_path, capsys):
    short = "--seg --synthetic-cases 4 2 2 -b 2 -j 0 --epochs 1 --max-steps 1".split()
    train_cli("--model", "mvit", "--pretrained", pretrained_files["mvit"], *short, "--output-dir", tmp_path)
    assert "adapted 48" in capsys.readouterr().out
    assert (tmp_path / "predictions_test.csv").exists()
