"""TotalSegmentator's fast 'total' model, loaded once per process (paper §2.1: one pass over every CT).

`totalsegmentator(img, task="total", fast=True, ml=True)` rebuilds nnU-Net's predictor and starts about twenty
worker processes for every image. `FastTotal` builds the predictor once, from the weights folder
TotalSegmentator itself uses (dataset 297, the 3 mm model), and runs TotalSegmentator's own pipeline around it
with TotalSegmentator's and nnU-Net's functions: reorientation to the closest canonical orientation,
resampling to 3 mm (order 1, cast to int32), nnU-Net's sliding window (step 0.8, Gaussian weighting, no
mirroring), resampling back (order 0), undoing the reorientation, and the label map in the NIfTI header. No
worker processes. tests/test_totalseg.py checks that its labels equal `totalsegmentator()`'s. (For an input
already on the 3 mm grid TotalSegmentator's affine passes through nnU-Net's files and can differ from the
input's by float32 rounding; the labels do not, and make_masks.py only uses the labels.)

    engine = FastTotal("gpu")          # or "cpu", "gpu:1", "mps"; downloads the weights once if needed
    labels = engine(nib.Nifti1Image(ct, affine))   # a Nifti1Image of class ids (class_map["total"])
"""

# TotalSegmentator and nnU-Net are heavy (they import at start-up what training never needs): every function
# here imports them where it runs.
import json
import multiprocessing
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from ctkit import utils

TASK_ID = 297  # total, fast: Dataset297_TotalSegmentator_total_3mm_1559subj
TRAINER, PLANS, CONFIGURATION, FOLDS = (
    "nnUNetTrainer_4000epochs_NoMirroring",
    "nnUNetPlans",
    "3d_fullres",
    [0],
)
SPACING = [3.0, 3.0, 3.0]  # the fast model's resolution
STEP_SIZE = 0.8  # TotalSegmentator's sliding-window step for the total tasks


def disable_usage_stats():
    """TotalSegmentator sends usage statistics unless its config.json says otherwise (no variable for it)."""
    from totalsegmentator.config import get_totalseg_dir

    home = get_totalseg_dir()
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {"totalseg_id": "totalseg_anonymous"}
    if config.get("send_usage_stats") is not False:
        config["send_usage_stats"] = False
        with utils.atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(config, indent=4))


def reference(img, device):
    """The per-case call: TotalSegmentator's own Python API (make_masks.py --engine totalsegmentator)."""
    from totalsegmentator.python_api import totalsegmentator

    return totalsegmentator(img, None, task="total", fast=True, ml=True, device=device, quiet=True)


class FastTotal:
    """TotalSegmentator's fast 'total' pipeline with one nnU-Net predictor, built here once."""

    def __init__(self, device="gpu"):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.file_path_utilities import get_output_folder
        from totalsegmentator.config import setup_nnunet, setup_totalseg
        from totalsegmentator.libs import download_pretrained_weights
        from totalsegmentator.python_api import select_device

        disable_usage_stats()
        setup_nnunet()  # TotalSegmentator's weights folder, as its own calls see it
        setup_totalseg()
        download_pretrained_weights(TASK_ID)  # a no-op once the folder is there
        device = select_device(device)
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.predictor = nnUNetPredictor(
            tile_step_size=STEP_SIZE,
            use_gaussian=True,
            use_mirroring=False,
            perform_everything_on_device=True,
            device=self.device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        folder = get_output_folder(TASK_ID, TRAINER, PLANS, CONFIGURATION)
        self.predictor.initialize_from_trained_model_folder(folder, FOLDS, "checkpoint_final.pth")

    def __call__(self, img):
        """A 3D Nifti1Image in HU -> TotalSegmentator's multilabel image for it (same grid, uint8)."""
        from totalsegmentator.alignment import as_closest_canonical, undo_canonical
        from totalsegmentator.map_to_binary import class_map
        from totalsegmentator.nifti_ext_header import add_label_map_to_nifti
        from totalsegmentator.postprocessing import remove_auxiliary_labels
        from totalsegmentator.resampling import change_spacing

        on_gpu = self.device.type == "cuda"
        canonical = as_closest_canonical(nib.Nifti1Image(img.get_fdata(), img.affine))
        resampled = change_spacing(canonical, SPACING, order=1, dtype=np.int32, nr_cpus=1, use_gpu=on_gpu)
        labels = self.predict(np.asanyarray(resampled.dataobj), resampled.header.get_zooms()[:3])
        prediction = remove_auxiliary_labels(nib.Nifti1Image(labels, resampled.affine), "total")
        prediction = change_spacing(
            prediction,
            SPACING,
            canonical.shape,
            order=0,
            dtype=np.uint8,
            nr_cpus=1,
            force_affine=canonical.affine,
            use_gpu=on_gpu,
        )
        prediction = undo_canonical(prediction, img)
        header = img.header.copy()
        header.set_data_dtype(np.uint8)
        out = nib.Nifti1Image(prediction.get_fdata().astype(np.uint8), prediction.affine, header)
        return add_label_map_to_nifti(out, class_map["total"])

    def predict(self, volume, zooms):
        """nnU-Net on an (x, y, z) volume: it takes (channel, z, y, x) with the spacing in that order."""
        threads = torch.get_num_threads()  # TotalSegmentator's call: all cores on a CPU, one thread on a GPU
        torch.set_num_threads(multiprocessing.cpu_count() if self.device.type == "cpu" else 1)
        try:
            image = np.ascontiguousarray(volume.transpose(2, 1, 0))[None].astype(np.float32)
            spacing = [float(z) for z in zooms][::-1]
            labels = self.predictor.predict_single_npy_array(image, {"spacing": spacing}, None, None, False)
        finally:
            torch.set_num_threads(threads)
        labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels
        return labels.transpose(2, 1, 0).astype(np.uint8)
