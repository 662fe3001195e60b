"""Kinetics-400 initialisation of the backbones (paper §3.3, A.4): everything but the 1-channel stem and the
classifier head comes from torchvision's published weights.

MViT's relative-position tables are resized to the new token grid by linear interpolation (the resize
torchvision's MViT itself applies at run time); Swin's window is unchanged, so its bias tables load as they
are (another window would be resized trilinearly). A file that leaves any backbone tensor without a value is
refused.
"""

import torch
import torch.nn.functional as F
from torchvision.models import video as tv_video

WEIGHTS = {
    "r3d": tv_video.R3D_18_Weights.KINETICS400_V1,
    "mvit": tv_video.MViT_V2_S_Weights.KINETICS400_V1,
    "swin": tv_video.Swin3D_T_Weights.KINETICS400_V1,
}
# Newly initialised: the 1-channel stem and the classifier head. For R3D-18 the whole stem (conv and
# BatchNorm) and for Swin3D-T the whole patch embedding (conv and LayerNorm): their norms' Kinetics statistics
# and weights belonged to the 3-channel conv's output.
REPLACED = {
    "r3d": ("stem.", "fc."),
    "mvit": ("conv_proj.", "head."),
    "swin": ("patch_embed.", "head."),  # the conv and the LayerNorm of its 3-channel output
}
SOURCE_SWIN_WINDOW = (8, 7, 7)  # the window Swin3D-T was trained with


def resize_rel_pos(table, length):
    """(L, C) -> (length, C) by linear interpolation, as torchvision's MViT resizes its tables at run time."""
    if table.shape[0] == length:
        return table
    return F.interpolate(table.T[None], size=length, mode="linear")[0].T


def resize_bias_table(table, source_window, window):
    """Swin's (prod(2w - 1), heads) relative-position bias, trilinearly resampled to another window."""
    src, dst = [2 * w - 1 for w in source_window], [2 * w - 1 for w in window]
    grid = table.T.reshape(1, -1, *src)  # (1, heads, 2Wd-1, 2Wh-1, 2Ww-1)
    return F.interpolate(grid, size=dst, mode="trilinear", align_corners=True).reshape(table.shape[1], -1).T


def adapt(backbone, name, value, own):
    """The file's tensor `name` in the shape of ours, with a note if it had to be resized; None to skip it."""
    if value.shape == own.shape:
        return value, None
    note = f"{name} {tuple(value.shape)} -> {tuple(own.shape)}"
    if ".rel_pos_" in name:  # MViT: sized by the token grid
        return resize_rel_pos(value, own.shape[0]), note
    if name.endswith("relative_position_bias_table"):  # Swin: sized by the window
        window = backbone.net.get_submodule(name.rsplit(".", 1)[0]).window_size
        return resize_bias_table(value, SOURCE_SWIN_WINDOW, window), note
    if name.endswith("relative_position_index"):  # rebuilt for the window
        return None, None
    raise ValueError(f"{name} has shape {tuple(value.shape)}, the model {tuple(own.shape)}")


def load_pretrained(backbone, source):
    """Load Kinetics-400 weights into backbone.net from torchvision ("download": its weights API and cache) or
    from a state-dict file. Returns report lines; raises if any backbone tensor is left without a value."""
    if source == "download":
        state = WEIGHTS[backbone.arch].get_state_dict(progress=True, check_hash=True)
    else:
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # missing, empty, truncated, pickled objects: torch raises several kinds
            reason = " ".join(str(error).split())[:200]
            raise ValueError(
                f"--pretrained {source}: not a readable state dict ({type(error).__name__}: {reason})"
            ) from None
    replaced, own = REPLACED[backbone.arch], backbone.net.state_dict()
    new, adapted, skipped = {}, [], []
    for name, value in state.items():
        if name.startswith(replaced) or name not in own:
            skipped.append(name)
            continue
        try:
            tensor, note = adapt(backbone, name, value, own[name])
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        if tensor is not None:
            new[name] = tensor
        if note:
            adapted.append(note)
    ignored = ("num_batches_tracked", "relative_position_index")
    missing = [k for k in own if k not in new and not k.startswith(replaced) and not k.endswith(ignored)]
    if missing or not new:
        raise ValueError(
            f"{source}: no value for {len(missing)} of {len(own)} backbone tensors, e.g. {missing[:3]} "
            f"(is it the Kinetics-400 {backbone.arch} state dict?)"
        )
    backbone.net.load_state_dict(new, strict=False)
    modules = sorted({s.rsplit(".", 1)[0] for s in skipped})
    return [
        f"pretrained {backbone.arch} from {source}: loaded {len(new) - len(adapted)} tensors as they are, "
        f"adapted {len(adapted)}, not used {len(skipped)}: newly initialised {', '.join(modules)}",
        *(f"  adapted {a}" for a in adapted),
    ]
