"""Offline stand-in for TotalSegmentator's fast 'total' model (tests only).

``make_standin(home_dir)`` writes a tiny, randomly initialised nnU-Net v2 model
(PlainConvUNet, 2 stages of 4/8 features, ~30 KB) into ``home_dir`` using the
exact layout TotalSegmentator 2.x looks for in fast mode (task 'total', dataset
297, 3 mm).  Point ``$TOTALSEG_HOME_DIR`` at ``home_dir`` (and make sure
``$TOTALSEG_WEIGHTS_PATH`` is unset) before calling
``totalsegmentator(..., task='total', fast=True)``; TotalSegmentator then finds
the folder, skips the download and runs the whole pipeline on CPU in seconds.
The predictions are meaningless, unless ``bias_class`` is given: then every
voxel is labelled with that class (its id in ``class_map['total']``).
"""

import json
from pathlib import Path

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from totalsegmentator.map_to_binary import class_map

DATASET = "Dataset297_TotalSegmentator_total_3mm_1559subj"
TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
MODEL_FOLDER = f"{TRAINER}__nnUNetPlans__3d_fullres"
SPACING = [3.0, 3.0, 3.0]  # the fast model works on 3 mm isotropic images
PATCH_SIZE = [32, 64, 64]  # (z, y, x); must be divisible by 2 (one pooling)

ARCHITECTURE = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 2,
        "features_per_stage": [4, 8],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _plans() -> dict:
    resampling = {"order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": DATASET,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": SPACING,
        "original_median_shape_after_transp": [100, 128, 128],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        # typical CT foreground statistics (HU), used by CTNormalization
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 3071.0,
                "min": -1024.0,
                "mean": 100.0,
                "median": 80.0,
                "std": 300.0,
                "percentile_00_5": -1000.0,
                "percentile_99_5": 1500.0,
            }
        },
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": PATCH_SIZE,
                "median_image_size_in_voxels": [100, 128, 128],
                "spacing": SPACING,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, **resampling},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, **resampling},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, **resampling},
                "architecture": ARCHITECTURE,
                "batch_dice": False,
            }
        },
    }


def make_standin(home_dir, bias_class=None, seed=0) -> Path:
    """Create the stand-in model under ``home_dir`` and return the model folder.

    home_dir:   directory to be used as $TOTALSEG_HOME_DIR (created if needed).
    bias_class: optional TotalSegmentator class name (e.g. 'liver'); if given the
                network predicts that class for every voxel.
    seed:       torch seed for the random weights (the global RNG is left untouched).
    """
    home = Path(home_dir)
    labels = {"background": 0, **{name: idx for idx, name in sorted(class_map["total"].items())}}
    if bias_class is not None and bias_class not in labels:
        raise ValueError(f"unknown class for task 'total': {bias_class!r}")
    model_dir = home / "nnunet" / "results" / DATASET / MODEL_FOLDER
    (model_dir / "fold_0").mkdir(parents=True, exist_ok=True)

    plans = _plans()
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": labels,
        "numTraining": 0,
        "file_ending": ".nii.gz",
        "name": DATASET,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = get_network_from_plans(
            ARCHITECTURE["network_class_name"],
            ARCHITECTURE["arch_kwargs"],
            ARCHITECTURE["_kw_requires_import"],
            1,
            len(labels),
            deep_supervision=False,
        )
    if bias_class is not None:  # constant logits: argmax is bias_class everywhere
        with torch.no_grad():
            for layer in net.decoder.seg_layers:
                layer.weight.zero_()
                layer.bias.zero_()
                layer.bias[labels[bias_class]] = 10.0
    checkpoint = {
        "network_weights": net.state_dict(),
        "trainer_name": TRAINER,
        "init_args": {"configuration": "3d_fullres", "fold": 0},
        "inference_allowed_mirroring_axes": None,
    }
    torch.save(checkpoint, model_dir / "fold_0" / "checkpoint_final.pth")
    (model_dir / "plans.json").write_text(json.dumps(plans, indent=2))
    (model_dir / "dataset.json").write_text(json.dumps(dataset_json, indent=2))

    # config.json: usage statistics off; disclaimer flag set so TS does not print/rewrite it
    config_file = home / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    config.update({"send_usage_stats": False, "statistics_disclaimer_shown": True})
    config.setdefault("totalseg_id", "totalseg_standin")
    config.setdefault("prediction_counter", 0)
    config_file.write_text(json.dumps(config, indent=4))
    return model_dir


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Write the offline stand-in model into a TotalSegmentator home "
        "folder; then export TOTALSEG_HOME_DIR=<home>."
    )
    parser.add_argument("home", help="folder to use as $TOTALSEG_HOME_DIR")
    parser.add_argument("--bias", default=None, help="class name predicted everywhere (e.g. liver)")
    cli = parser.parse_args()
    print(f"stand-in model written to {make_standin(cli.home, cli.bias)}")
