"""3D CT classifiers and the auxiliary segmentation objective (paper §2.2, eq. 1-5, Table 5, A.4).

Backbones are torchvision's video models with the "time" axis used for depth; input is (B, 1, D, H, W):
  r3d   R3D-18, stem conv 1->64, kernel = stride = 2x2x2                       -> (B, 512, D/16, H/16, W/16)
  mvit  MViT-v2-S, patch projection kernel = stride = 16x2x2, 1 channel,
        relative-position tables sized to the token grid (D/16, H/2, W/2)     -> (B, 768, D/16, H/16, W/16)
  swin  Swin3D-T, patch embedding 16x2x2, 1 channel, embed dim 96             -> (B, 768, D/16, H/16, W/16)

The method is the block "the objective" below: classification = global average pooling of the last feature
map + linear (eq. 1); segmentation = a 1x1x1 conv on the same feature map, trilinear upsampling to the input
size and cross-entropy against the TotalSegmentator mask (eq. 3); L = L_cls + L_seg (eq. 4, eq. 5 for RATIC).
`CTClassifier(x)` is the plain classifier, what is saved and deployed (it never runs the seg head);
`Objective(classifier, ...)(x, labels, mask)` is the whole training loss, (L, L_cls, L_seg), in one place.
Kinetics-400 loading is in ctkit/pretrained.py.

    python model.py    # prints feature-map shapes and parameter counts for the paper's crops
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torchvision.models import video as tv_video

from ctkit.labels import RATIC_COLUMNS

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
        if arch in ("mvit", "swin") and input_size[0] % PATCH_DEPTH:
            raise ValueError(f"{arch} needs a crop depth divisible by {PATCH_DEPTH}, got {input_size}")
        self.arch, net = arch, torchvision_model(arch)
        if arch == "r3d":
            stem = nn.Conv3d(1, 64, kernel_size=2, stride=2, bias=False)
            nn.init.kaiming_normal_(stem.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
            net.stem[0] = stem
            del net.fc, net.avgpool
        elif arch == "mvit":
            net.conv_proj = nn.Conv3d(1, 96, kernel_size=(16, 2, 2), stride=(16, 2, 2))
            # Positions are relative in MViT-v2: the only grid-sized parameters are the per-block tables.
            grid = (input_size[0] // 16, input_size[1] // 2, input_size[2] // 2)
            net.pos_encoding.temporal_size, net.pos_encoding.spatial_size = grid[0], grid[1:]
            for attn, sizes in mvit_grid_sizes(net, grid):
                for name, length in sizes.items():
                    setattr(
                        attn,
                        name,
                        nn.Parameter(nn.init.trunc_normal_(torch.empty(length, attn.head_dim), std=0.02)),
                    )
            del net.head
        else:
            net.patch_embed.proj = nn.Conv3d(1, 96, kernel_size=(16, 2, 2), stride=(16, 2, 2))
            net.patch_embed.tuple_patch_size = (16, 2, 2)
            del net.head, net.avgpool
        self.net, self.out_channels = net, 512 if arch == "r3d" else 768

    def forward(self, x):  # x: (B, 1, D, H, W)
        net = self.net
        if self.arch == "r3d":
            return net.layer4(net.layer3(net.layer2(net.layer1(net.stem(x)))))
        if self.arch == "mvit":
            x = net.conv_proj(x)  # (B, 96, t, h, w)
            thw = tuple(x.shape[2:])
            expected = (net.pos_encoding.temporal_size, *net.pos_encoding.spatial_size)
            if thw != expected:
                raise ValueError(f"mvit was built for a {expected} token grid, got {thw}")
            x = net.pos_encoding(x.flatten(2).transpose(1, 2))  # (B, 1 + thw, 96), class token first
            for block in net.blocks:
                x, thw = block(x, thw)
            x = net.norm(x)[:, 1:]  # drop the class token: eq. 1 pools the feature map itself
            return x.transpose(1, 2).reshape(x.shape[0], -1, *thw)
        x = net.features(net.pos_drop(net.patch_embed(x)))  # (B, t, h, w, C) channels-last
        return net.norm(x).permute(0, 4, 1, 2, 3)


# ----------------------------------------------------------------------------- the objective (eq. 1, 3, 4, 5)


class CTClassifier(nn.Module):
    """Backbone -> global average pooling + linear (eq. 1). With seg_classes > 0 (structures + background), a
    1x1x1 conv on the same lowest-resolution feature map, which only the training Objective uses (eq. 3)."""

    def __init__(self, arch, num_outputs, input_size, seg_classes=0):
        super().__init__()
        self.backbone = Backbone(arch, input_size)
        self.head = nn.Linear(self.backbone.out_channels, num_outputs)
        # built after the head: the same seed gives both arms the same backbone and classifier weights
        self.seg_head = nn.Conv3d(self.backbone.out_channels, seg_classes, 1) if seg_classes else None

    def forward(self, x):
        """x (B, 1, D, H, W) -> logits (B, K): the deployed classifier, with or without a seg head."""
        return self.classify(self.backbone(x))

    def classify(self, features):
        """Eq. 1 without its normalizing function: (B, C, d, h, w) -> (B, K)."""
        return self.head(features.mean(dim=(2, 3, 4)))


class Objective(nn.Module):
    """The training objective, top to bottom (eq. 1, 3, 4; eq. 5 for RATIC):

        features = backbone(x)                                        (B, C, d, h, w)
        L_cls    = BCE(linear(mean over voxels of features), y)       eq. 1, 4 (RATIC: eq. 5's heads)
        L_seg    = CE(trilinear upsample(conv1x1(features)), mask)    eq. 3, only with a mask (--seg)
        L        = L_cls + seg_weight * L_seg                         eq. 4; seg_weight 1 in the paper

    forward(x, labels, mask=None) -> (L, L_cls, L_seg), L_seg = 0 without a mask. It wraps the classifier
    (DistributedDataParallel wraps it in turn); the classifier itself never computes a loss. seg_chunk N > 0
    computes the same L_seg N slices at a time (less memory; tested equal to the plain form)."""

    def __init__(self, classifier, kind, seg_weight=1.0, seg_chunk=0):
        super().__init__()
        self.classifier, self.kind, self.seg_weight, self.seg_chunk = classifier, kind, seg_weight, seg_chunk

    def forward(self, x, labels, mask=None):
        net = self.classifier
        features = net.backbone(x)  # (B, C, d, h, w)
        cls_loss = classification_loss(net.classify(features), labels, self.kind)
        if mask is None:
            return cls_loss, cls_loss, torch.zeros((), device=x.device)
        if net.seg_head is None:
            raise ValueError("this model has no segmentation head (built without --seg): give no mask")
        seg_loss = segmentation_loss(net.seg_head(features), mask, self.seg_chunk)  # (B, S, d, h, w) logits
        return cls_loss + self.seg_weight * seg_loss, cls_loss, seg_loss


def segmentation_loss(seg_logits, mask, chunk=0):
    """Eq. 3: the (B, S, d, h, w) logits upsampled trilinearly to the mask's size, cross-entropy per voxel."""
    if chunk:  # opt-in: equal value and gradient, less memory (tested against these two lines)
        return chunked_segmentation_loss(seg_logits, mask, chunk)
    full = F.interpolate(seg_logits.float(), size=mask.shape[1:], mode="trilinear")  # (B, S, D, H, W)
    return F.cross_entropy(full, mask.long())


def classification_loss(logits, labels, kind):
    """Eq. 4's L_cls: BCE-with-logits over the findings; RATIC: eq. 5's weighted losses over its heads."""
    if kind == "ratic":
        return ratic_loss(logits.float(), labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels)


# ----------------------------------------------------------------------------- building and using a model


def build_model(arch, task, seg=False):
    """The classifier for a data.Task: an output per class (RATIC: its 11 head outputs) and, with seg, a
    segmentation head over the task's structures + background."""
    outputs = RATIC_OUTPUTS if task.kind == "ratic" else len(task.classes)
    return CTClassifier(arch, outputs, task.crop, len(task.structures) + 1 if seg else 0)


def probabilities(logits, task):
    """The normalizing function of eq. 1: (B, outputs) logits -> (B, len(task.classes)) probabilities."""
    if task.kind != "ratic":
        return torch.sigmoid(logits)
    probs = ratic_probabilities(logits)
    return torch.stack([probs[c] for c in task.classes], 1)


# ----------------------------------------------------------------------------- RATIC (eq. 2, eq. 5)

RATIC_BINARY = ("bowel", "extravasation")  # sigmoid P(injury)
RATIC_ORGANS = ("kidney", "liver", "spleen")  # softmax over healthy / low / high
RATIC_GRADES = ("healthy", "low", "high")
RATIC_OUTPUTS = len(RATIC_BINARY) + len(RATIC_GRADES) * len(RATIC_ORGANS)
RATIC_INJURY_WEIGHTS = {"bowel": 2.0, "extravasation": 6.0}  # sample weights; healthy samples weigh 1
RATIC_GRADE_WEIGHTS = (1.0, 2.0, 4.0)  # healthy, low, high
RATIC_ANY_WEIGHT, RATIC_ANY_LAMBDA = 6.0, 0.1  # any_injury: weight 6, its loss scaled by 0.1


def organ_logits(logits, k):
    return logits[:, 2 + 3 * k : 5 + 3 * k]  # (B, 3): healthy, low, high of organ k


def ratic_probabilities(logits):
    """(B, 11) logits -> {RATIC column: (B,) probability}; p_any_injury = 1 - prod of p_healthy (eq. 2)."""
    probs = {}
    for k, name in enumerate(RATIC_BINARY):
        probs[f"{name}_injury"] = torch.sigmoid(logits[:, k])
        probs[f"{name}_healthy"] = 1 - probs[f"{name}_injury"]
    for k, organ in enumerate(RATIC_ORGANS):
        grades = organ_logits(logits, k).softmax(1)
        for g, grade in enumerate(RATIC_GRADES):
            probs[f"{organ}_{grade}"] = grades[:, g]
    healthy = torch.stack([probs[f"{name}_healthy"] for name in (*RATIC_BINARY, *RATIC_ORGANS)])
    probs["any_injury"] = 1 - healthy.prod(0)
    return probs


def weighted_mean(losses, weights):
    return (losses * weights).sum() / weights.sum()


def any_injury_bce(logits, any_injury):
    """BCE of eq. 2's p_any_injury, from log-probabilities (exact near 0 and 1, and safe under CUDA autocast,
    which refuses F.binary_cross_entropy); p_any is kept within [1e-6, 1 - 1e-6]."""
    log_healthy = [F.logsigmoid(-logits[:, k]) for k in range(len(RATIC_BINARY))]
    log_healthy += [F.log_softmax(organ_logits(logits, k), 1)[:, 0] for k in range(len(RATIC_ORGANS))]
    log_none = torch.stack(log_healthy).sum(0).clamp(math.log(1e-6), math.log1p(-1e-6))  # log(1 - p_any)
    log_any = torch.log(-torch.expm1(log_none))  # log(p_any)
    return -(any_injury * log_any + (1 - any_injury) * log_none)


def ratic_loss(logits, labels):
    """Eq. 5: L_cls1 (weighted BCE, mean over bowel and extravasation) + L_cls2 (weighted CE, mean over the
    organs) + 0.1 * weighted BCE of p_any_injury. `labels` are the columns of labels.RATIC_COLUMNS."""
    y = {name: labels[:, i] for i, name in enumerate(RATIC_COLUMNS)}
    binary = []
    for k, name in enumerate(RATIC_BINARY):
        injured = y[f"{name}_injury"]
        bce = F.binary_cross_entropy_with_logits(logits[:, k], injured, reduction="none")
        binary.append(weighted_mean(bce, 1 + (RATIC_INJURY_WEIGHTS[name] - 1) * injured))
    organs = []
    for k, organ in enumerate(RATIC_ORGANS):
        one_hot = torch.stack([y[f"{organ}_{g}"] for g in RATIC_GRADES], 1)
        grade = one_hot.argmax(1)  # 0 healthy, 1 low, 2 high
        ce = F.cross_entropy(organ_logits(logits, k), grade, reduction="none")
        organs.append(weighted_mean(ce, logits.new_tensor(RATIC_GRADE_WEIGHTS)[grade]))
    any_weights = 1 + (RATIC_ANY_WEIGHT - 1) * y["any_injury"]
    any_loss = weighted_mean(any_injury_bce(logits, y["any_injury"]), any_weights)
    return sum(binary) / len(binary) + sum(organs) / len(organs) + RATIC_ANY_LAMBDA * any_loss


# ----------------------------------------------------------------------------- opt-in: same loss, less memory


def upsample_depth(planar, depth, start, stop):
    """Output slices start:stop of a linear upsampling along depth to `depth` slices, each a blend of two
    input slices at F.interpolate's align_corners=False coordinates."""
    d = planar.shape[2]
    src = ((torch.arange(start, stop, device=planar.device) + 0.5) * (d / depth) - 0.5).clamp(min=0)
    lower = src.floor().long().clamp(max=d - 1)
    weight = (src - lower).view(1, 1, -1, 1, 1).to(planar.dtype)
    return planar[:, :, lower] * (1 - weight) + planar[:, :, (lower + 1).clamp(max=d - 1)] * weight


def chunk_cross_entropy(planar, target, start, depth):
    """Summed CE over output slices start:start + n, their logits made from the in-plane upsampled planar."""
    logits = upsample_depth(planar, depth, start, start + target.shape[1])  # (B, S, n, H, W)
    return F.cross_entropy(logits, target, reduction="sum")


def chunked_segmentation_loss(seg_logits, mask, chunk):
    """segmentation_loss without ever holding the (B, S, D, H, W) logits and their softmax: upsample
    in-plane once (B, S, d, H, W), then make `chunk` full-resolution slices at a time, recomputed in the
    backward pass."""
    depth, mask = mask.shape[1], mask.long()
    size = (seg_logits.shape[2], *mask.shape[2:])
    seg_logits = seg_logits.to(torch.promote_types(seg_logits.dtype, torch.float32))  # bf16 -> fp32
    planar = F.interpolate(seg_logits, size=size, mode="trilinear")  # trilinear = in-plane, then along depth
    total = 0
    for z in range(0, depth, chunk):
        part = mask[:, z : z + chunk]
        total = total + checkpoint(chunk_cross_entropy, planar, part, z, depth, use_reentrant=False)
    return total / mask.numel()


if __name__ == "__main__":
    for name, crop in (("chest", (96, 192, 192)), ("abdomen", (160, 192, 176))):
        for arch in ARCHS:
            with torch.device("meta"):
                model = CTClassifier(arch, 18, crop, seg_classes=7)
                fmap = model.backbone(torch.empty(1, 1, *crop))
            n = sum(p.numel() for p in model.parameters())
            print(f"{name:8s} {arch:5s} input {crop} -> features {tuple(fmap.shape)}, {n / 1e6:.2f} M params")
