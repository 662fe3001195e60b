"""What the five scripts stand on, one module a concern (utils, the plumbing, imports nothing of the project).

regions          the paper's two regions (Table 3): structures, HU window, pad and crop
ct_io            reading CTs as stored, resampling to RAS 1.5 x 1.5 x 3 mm, writing NIfTI, HU -> [-1, 1]
structures       `--structures SPEC` -> the run's seg classes and the stored labels each holds
prep             the prepared folder make_masks.py writes and training reads: layout, mask stamp, checks
mask_qc          quality control of the masks (qc/<case>.json, masks_summary.csv, previews)
totalseg         TotalSegmentator's fast 'total' model, loaded once per process
labels           each dataset's label tables as distributed; the predictions CSV format
synthetic        seeded chest phantoms with localised findings (python -m ctkit.synthetic)
pretrained       Kinetics-400 initialisation of the backbones
learning_report  did the seg head learn each case's anatomy? floors from the training masks
evidence         the linear head at every feature voxel: where a classifier's evidence lies
inference        a trained classifier over a split: probabilities, the seg head's CE and Dice, evidence shares
compare          several runs side by side: Tables 1, 6-9, bootstrap CIs, Figure 3
precision        --amp: the autocast dtype; a known-answer check of the CPU's bf16 3D convolutions
utils            plumbing: atomic writes, CSV logs, torchrun, checkpoints, errors
"""
