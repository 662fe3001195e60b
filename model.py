"""3D CT classifiers with an optional training-only segmentation head (paper §2.2, Table 5, A.4).

Backbones are torchvision's video models with the "time" axis used for depth; input is (B, 1, D, H, W):
  r3d   R3D-18, stem conv 1->64, kernel = stride = 2x2x2                       -> (B, 512, D/16, H/16, W/16)
  mvit  MViT-v2-S, patch projection kernel = stride = 16x2x2, 1 channel,
        relative-position tables sized to the token grid (D/16, H/2, W/2)     -> (B, 768, D/16, H/16, W/16)
  swin  Swin3D-T, patch embedding 16x2x2, 1 channel, embed dim 96             -> (B, 768, D/16, H/16, W/16)

Classification = global average pooling of the lowest-resolution feature map + linear (eq. 1).
Segmentation   = 1x1x1 conv on the same feature map + trilinear upsampling to the input size (eq. 3); the
upsampling is split in two (in-plane, then along depth) so the loss can produce the full-resolution logits a
few slices at a time (train.segmentation_loss).
The segmentation head is built only with `seg_classes > 0` and only evaluated when asked for (training by
default), so inference of a seg-trained model is exactly the plain classifier.

    python model.py    # prints feature-map shapes and parameter counts for the paper's crops
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import video as tv_video

ARCHS = ("r3d", "mvit", "swin")
PATCH_DEPTH = 16  # mvit and swin embed 16 slices per token; crops' depth must be a multiple of it


def torchvision_model(arch, **kwargs):
    """The unmodified torchvision model (3-channel stem, Kinetics-400 configuration)."""
    builders = {"r3d": tv_video.r3d_18, "mvit": tv_video.mvit_v2_s, "swin": tv_video.swin3d_t}
    if arch not in builders:
        raise ValueError(f"unknown model {arch!r}; choose from {ARCHS}")
    return builders[arch](**kwargs)


def mvit_grid_sizes(net, grid):
    """Yield (attention module, {table name: length}) for MViT's relative-position tables on a token grid
    (t, h, w), with the sizes torchvision's MViT constructor would give them for that grid."""
    t, h, w = grid
    for block in net.blocks:
        attn = block.attn
        stride_q = attn.pool_q.pool.stride if attn.pool_q is not None else (1, 1, 1)
        stride_kv = attn.pool_k.pool.stride if attn.pool_k is not None else (1, 1, 1)
        spatial = 2 * max(max(h, w) // stride_q[1], max(h, w) // stride_kv[1]) - 1
        yield attn, {"rel_pos_h": spatial, "rel_pos_w": spatial, "rel_pos_t": 2 * t - 1}
        t, h, w = t // stride_q[0], h // stride_q[1], w // stride_q[2]


class Backbone(nn.Module):
    """A torchvision video model without its classifier, returning the last feature map (B, C, d, h, w)."""

    def __init__(self, arch, input_size):
        super().__init__()
        self.arch = arch
        net = torchvision_model(arch)
        if arch == "r3d":
            stem = nn.Conv3d(1, 64, kernel_size=2, stride=2, bias=False)
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits convs
            net.stem[0] = stem
            del net.fc, net.avgpool
            self.out_channels = 512
        elif arch == "mvit":
            net.conv_proj = nn.Conv3d(1, 96, kernel_size=(16, 2, 2), stride=(16, 2, 2))
            # Positions are relative in MViT-v2: the only grid-sized parameters are the per-block tables.
            grid = (input_size[0] // 16, input_size[1] // 2, input_size[2] // 2)
            net.pos_encoding.temporal_size, net.pos_encoding.spatial_size = grid[0], grid[1:]
            for attn, sizes in mvit_grid_sizes(net, grid):
                for name, length in sizes.items():
                    table = nn.Parameter(torch.empty(length, attn.head_dim))
                    nn.init.trunc_normal_(table, std=0.02)
                    setattr(attn, name, table)
            del net.head
            self.out_channels = 768
        else:
            net.patch_embed.proj = nn.Conv3d(1, 96, kernel_size=(16, 2, 2), stride=(16, 2, 2))
            net.patch_embed.tuple_patch_size = (16, 2, 2)
            del net.head, net.avgpool
            self.out_channels = 768
        self.net = net

    def forward(self, x):  # x: (B, 1, D, H, W)
        net = self.net
        if self.arch == "r3d":
            x = net.stem(x)
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        if self.arch == "mvit":
            x = net.conv_proj(x)  # (B, 96, t, h, w)
            thw = tuple(x.shape[2:])
            if thw != (net.pos_encoding.temporal_size, *net.pos_encoding.spatial_size):
                raise ValueError(f"mvit was built for a {net.pos_encoding.temporal_size}x"
                                 f"{'x'.join(map(str, net.pos_encoding.spatial_size))} token grid, got {thw}")
            x = net.pos_encoding(x.flatten(2).transpose(1, 2))  # (B, 1 + thw, 96), class token first
            for block in net.blocks:
                x, thw = block(x, thw)
            x = net.norm(x)[:, 1:]  # drop the class token: eq. 1 pools the feature map itself
            return x.transpose(1, 2).reshape(x.shape[0], -1, *thw)
        x = net.features(net.pos_drop(net.patch_embed(x)))  # (B, t, h, w, C) channels-last
        return net.norm(x).permute(0, 4, 1, 2, 3)


# Kinetics-400 initialisation (paper §3.3, A.4): everything but the 1-channel stem and the classifier head
PRETRAINED_WEIGHTS = {"r3d": tv_video.R3D_18_Weights.KINETICS400_V1, "mvit": tv_video.MViT_V2_S_Weights.KINETICS400_V1,
                      "swin": tv_video.Swin3D_T_Weights.KINETICS400_V1}
REPLACED = {"r3d": ("stem.0.", "fc."), "mvit": ("conv_proj.", "head."), "swin": ("patch_embed.proj.", "head.")}
SOURCE_SWIN_WINDOW = (8, 7, 7)  # the window Swin3D-T was trained with


def resize_rel_pos(table, length):
    """(L, C) -> (length, C) by linear interpolation, as torchvision's MViT resizes its tables at run time."""
    return table if table.shape[0] == length else F.interpolate(table.T[None], size=length, mode="linear")[0].T


def resize_bias_table(table, source_window, window):
    """Swin's (prod(2w - 1), heads) relative-position bias, trilinearly resampled to another window."""
    src, dst = [2 * w - 1 for w in source_window], [2 * w - 1 for w in window]
    grid = table.T.reshape(1, -1, *src)  # (1, heads, 2Wd-1, 2Wh-1, 2Ww-1)
    return F.interpolate(grid, size=dst, mode="trilinear", align_corners=True).reshape(table.shape[1], -1).T


def load_pretrained(backbone, source):
    """Load Kinetics-400 weights into backbone.net from torchvision ("download": its weights API and cache) or
    from a state-dict file. Returns report lines; raises if any backbone tensor is left without a value."""
    if source == "download":
        state = PRETRAINED_WEIGHTS[backbone.arch].get_state_dict(progress=True, check_hash=True)
    else:
        state = torch.load(source, map_location="cpu", weights_only=True)
    own = backbone.net.state_dict()
    new, adapted, skipped = {}, [], []
    for name, value in state.items():
        if name.startswith(REPLACED[backbone.arch]) or name not in own:
            skipped.append(name)
        elif value.shape == own[name].shape:
            new[name] = value
        elif ".rel_pos_" in name:  # MViT: sized by the token grid
            new[name] = resize_rel_pos(value, own[name].shape[0])
            adapted.append(f"{name} {tuple(value.shape)} -> {tuple(own[name].shape)}")
        elif name.endswith("relative_position_bias_table"):  # Swin: sized by the window
            window = backbone.net.get_submodule(name.rsplit(".", 1)[0]).window_size
            new[name] = resize_bias_table(value, SOURCE_SWIN_WINDOW, window)
            adapted.append(f"{name} {tuple(value.shape)} -> {tuple(own[name].shape)}")
        elif not name.endswith("relative_position_index"):  # the index is rebuilt for the window
            raise ValueError(f"{source}: {name} has shape {tuple(value.shape)}, the model {tuple(own[name].shape)}")
    missing = [k for k in own if k not in new and not k.startswith(REPLACED[backbone.arch])
               and not k.endswith(("num_batches_tracked", "relative_position_index"))]
    if missing or not new:
        raise ValueError(f"{source}: no value for {len(missing)} of {len(own)} backbone tensors, e.g. {missing[:3]} "
                         f"(is it the Kinetics-400 {backbone.arch} state dict?)")
    backbone.net.load_state_dict(new, strict=False)
    return [f"pretrained {backbone.arch} from {source}: loaded {len(new) - len(adapted)} tensors as they are, "
            f"adapted {len(adapted)}, not used {len(skipped)} ({', '.join(sorted({s.split('.')[0] for s in skipped}))})",
            *(f"  adapted {a}" for a in adapted)]


# RATIC (eq. 2): sigmoid P(injury) for bowel and extravasation, softmax over healthy/low/high for each organ.
RATIC_BINARY = ("bowel", "extravasation")
RATIC_ORGANS = ("kidney", "liver", "spleen")


def num_outputs(task, num_classes):
    return len(RATIC_BINARY) + 3 * len(RATIC_ORGANS) if task == "ratic" else num_classes


def ratic_probabilities(logits):
    """(B, 11) logits -> {RATIC column: (B,) probability}; p_any_injury = 1 - prod of p_healthy (eq. 2)."""
    probs = {}
    for k, name in enumerate(RATIC_BINARY):
        probs[f"{name}_injury"] = torch.sigmoid(logits[:, k])
        probs[f"{name}_healthy"] = 1 - probs[f"{name}_injury"]
    for k, organ in enumerate(RATIC_ORGANS):
        grades = logits[:, 2 + 3 * k: 5 + 3 * k].softmax(1)
        for g, grade in enumerate(("healthy", "low", "high")):
            probs[f"{organ}_{grade}"] = grades[:, g]
    healthy = torch.stack([probs[f"{name}_healthy"] for name in (*RATIC_BINARY, *RATIC_ORGANS)])
    probs["any_injury"] = 1 - healthy.prod(0)
    return probs


def probabilities(logits, task, classes):
    """The normalizing function of eq. 1: (B, outputs) logits -> (B, len(classes)) probabilities."""
    if task != "ratic":
        return torch.sigmoid(logits)
    probs = ratic_probabilities(logits)
    return torch.stack([probs[c] for c in classes], 1)


# RATIC losses (eq. 5): weighted means with the paper's sample weights; healthy samples weigh 1.
RATIC_INJURY_WEIGHTS = {"bowel": 2.0, "extravasation": 6.0}
RATIC_GRADE_WEIGHTS = (1.0, 2.0, 4.0)  # healthy, low, high
RATIC_ANY_WEIGHT, RATIC_ANY_LAMBDA = 6.0, 0.1  # any_injury: weight 6, loss scaled by 0.1 (its gradients are large)


def weighted_mean(losses, weights):
    return (losses * weights).sum() / weights.sum()


def ratic_loss(logits, labels, classes):
    """L_cls1 (weighted BCE, mean over bowel and extravasation) + L_cls2 (weighted CE, mean over the organs)
    + 0.1 * weighted BCE of p_any_injury; labels are the RATIC columns named by `classes`."""
    y = {name: labels[:, i] for i, name in enumerate(classes)}
    cls1 = sum(weighted_mean(F.binary_cross_entropy_with_logits(logits[:, k], y[f"{name}_injury"], reduction="none"),
                             1 + (RATIC_INJURY_WEIGHTS[name] - 1) * y[f"{name}_injury"]) for k, name in enumerate(RATIC_BINARY))
    cls2 = 0
    grade_weights = logits.new_tensor(RATIC_GRADE_WEIGHTS)
    for k, organ in enumerate(RATIC_ORGANS):
        target = torch.stack([y[f"{organ}_{g}"] for g in ("healthy", "low", "high")], 1).argmax(1)
        ce = F.cross_entropy(logits[:, 2 + 3 * k: 5 + 3 * k], target, reduction="none")
        cls2 = cls2 + weighted_mean(ce, grade_weights[target])
    p_any = ratic_probabilities(logits)["any_injury"].clamp(1e-6, 1 - 1e-6)  # eq. 2
    any_loss = weighted_mean(F.binary_cross_entropy(p_any, y["any_injury"], reduction="none"),
                             1 + (RATIC_ANY_WEIGHT - 1) * y["any_injury"])
    return cls1 / len(RATIC_BINARY) + cls2 / len(RATIC_ORGANS) + RATIC_ANY_LAMBDA * any_loss


class CTClassifier(nn.Module):
    def __init__(self, arch, num_outputs, input_size, seg_classes=0):
        super().__init__()
        if arch in ("mvit", "swin") and input_size[0] % PATCH_DEPTH:
            raise ValueError(f"{arch} needs a crop depth divisible by {PATCH_DEPTH}, got {input_size}")
        self.backbone = Backbone(arch, input_size)
        self.head = nn.Linear(self.backbone.out_channels, num_outputs)
        # The auxiliary branch (eq. 3): one linear layer per voxel of the lowest-resolution feature map.
        self.seg_head = nn.Conv3d(self.backbone.out_channels, seg_classes, 1) if seg_classes else None

    def forward(self, x, with_seg=None):
        """x: (B, 1, D, H, W) -> logits (B, K), and with_seg (default: in training) also the segmentation logits at
        the feature map's resolution (B, S, d, h, w); upsample_seg() takes them to the input size (eq. 3)."""
        features = self.backbone(x)  # (B, C, d, h, w)
        logits = self.head(features.mean(dim=(2, 3, 4)))
        if with_seg is None:
            with_seg = self.training and self.seg_head is not None
        return (logits, self.seg_head(features)) if with_seg else logits


def upsample_planar(seg, size):
    """First half of eq. 3's trilinear upsampling: in-plane only, (B, S, d, h, w) -> (B, S, d, H, W)."""
    return F.interpolate(seg, size=(seg.shape[2], *size[1:]), mode="trilinear", align_corners=False)


def upsample_depth(planar, depth, start=0, stop=None):
    """Second half: output slices start:stop of `depth`, each a linear blend of two input slices, with
    F.interpolate's align_corners=False coordinates. Together: F.interpolate(seg, size, mode="trilinear")."""
    d = planar.shape[2]
    src = ((torch.arange(start, stop or depth, device=planar.device) + 0.5) * (d / depth) - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=d - 1)
    weight = (src - lower).view(1, 1, -1, 1, 1).to(planar.dtype)
    return planar[:, :, lower] * (1 - weight) + planar[:, :, (lower + 1).clamp(max=d - 1)] * weight


def upsample_seg(seg, size):
    """(B, S, d, h, w) -> (B, S, D, H, W), trilinear (eq. 3)."""
    return upsample_depth(upsample_planar(seg, size), size[0])


if __name__ == "__main__":
    for name, crop in (("chest", (96, 192, 192)), ("abdomen", (160, 176, 192))):
        for arch in ARCHS:
            with torch.device("meta"):
                model = CTClassifier(arch, 18, crop, seg_classes=7)
                fmap = model.backbone(torch.empty(1, 1, *crop))
            n = sum(p.numel() for p in model.parameters())
            print(f"{name:8s} {arch:5s} input {crop} -> features {tuple(fmap.shape)}, {n / 1e6:.2f} M parameters")
