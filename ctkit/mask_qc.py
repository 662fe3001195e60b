"""Quality control of the anatomy masks (written by make_masks.py, summarised when training starts; users
check masks before training on 50K).

Per case: the scan's extent in mm, the volume in ml of each structure QC covers (`qc_structures`: for
TotalSegmentator's scheme the paper's structures, of --region or of both regions, bowel merged; for another
segmenter's scheme every class), and the structures that are missing, tiny (under TINY_ML) or touching the
edge of the scanned volume (e.g. a lung cut by the field of view). <prep>/qc/<case>.json is written with the
case; <prep>/masks_summary.csv gathers all of them (all shards'), rewritten atomically. A preview is three
orthogonal slices through the mask, the way a reader checks it.
"""

import json
import os

import nibabel as nib
import numpy as np

from ctkit import structures, utils
from ctkit.prep import CT, MASK, QC, TOTALSEG, case_path
from ctkit.regions import REGIONS

TINY_ML = 5.0  # a structure smaller than this is flagged as tiny (a speck, not an organ)
SUMMARY = "masks_summary.csv"


def qc_structures(scheme, table, region=None):
    """{structure: its stored ids} that QC reports for a scheme (see the module's docstring)."""
    if scheme != TOTALSEG:
        return {name: (i,) for i, name in sorted(table.items())}
    groups = {}
    for r in [region] if region else list(REGIONS):
        groups.update(zip(*structures.parse("paper", table, r)))
    return groups


def case_row(case, mask, affine, groups):
    """One row of masks_summary.csv: the scan's extent, each structure's volume, and the flags."""
    spacing = np.abs(np.diag(affine)[:3])
    counts = np.bincount(mask.ravel(), minlength=256)
    volumes = {s: counts[list(ids)].sum() * spacing.prod() / 1000 for s, ids in groups.items()}  # ml
    faces = [mask[0], mask[-1], mask[:, 0], mask[:, -1], mask[:, :, 0], mask[:, :, -1]]
    on_edge = set(np.unique(np.concatenate([f.ravel() for f in faces]))) - {0}
    row = {"case_id": case}
    row.update({f"extent_{a}_mm": round(float(n * s), 1) for a, n, s in zip("xyz", mask.shape, spacing)})
    row.update({f"{s}_ml": round(float(v), 2) for s, v in volumes.items()})
    row["missing"] = ";".join(s for s, v in volumes.items() if v == 0)
    row["tiny"] = ";".join(s for s, v in volumes.items() if 0 < v < TINY_ML)
    row["edge"] = ";".join(s for s, ids in groups.items() if on_edge & set(ids))
    return row


def write_summary(dst, cases=None):
    """<dst>/masks_summary.csv, written atomically: rebuilt from every case's QC record (all shards'), or with
    `cases` only those records merged into the summary as it stands (cheap while a large run goes)."""
    path, rows = dst / SUMMARY, {}
    if cases is not None and path.exists():
        rows = {row["case_id"]: row for row in utils.read_csv(path, ["case_id"])}
    records = [dst / QC / f"{c}.json" for c in cases] if cases is not None else (dst / QC).glob("[!.]*.json")
    rows.update({row["case_id"]: row for row in (json.loads(p.read_text()) for p in records if p.exists())})
    if rows:  # records may differ in their structures (another --region): the union of the columns
        table = [rows[c] for c in sorted(rows)]
        header = list(dict.fromkeys(k for row in table for k in row))
        utils.write_csv(path, header, [[row.get(k, "") for k in header] for row in table])


def write_preview(dst, case, groups, window=(-1000, 400)):
    """<dst>/preview/<case>.png: axial, coronal and sagittal slices through the mask's centre, CT in the HU
    window, the QC structures `groups` coloured and named, the way a reader checks a segmentation."""
    import matplotlib  # optional for everything else: imported where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ct_img = nib.load(case_path(dst, CT, case))
    lut = np.zeros(256, np.uint8)
    for k, ids in enumerate(list(groups.values())[:20], start=1):  # 20 colours at most
        lut[list(ids)] = k
    mask = lut[np.asarray(nib.load(case_path(dst, MASK, case)).dataobj)]  # structure k + 1 of groups
    ct, (sx, sy, sz) = np.asarray(ct_img.dataobj), np.abs(np.diag(ct_img.affine)[:3])
    x, y, z = (np.argwhere(mask).mean(0) if mask.any() else np.array(mask.shape) / 2).astype(int)
    views = {  # (CT slice, mask slice, aspect); x reversed: the patient's right on the viewer's left
        "axial": (ct[::-1, :, z].T, mask[::-1, :, z].T, sy / sx),
        "coronal": (ct[::-1, y, :].T, mask[::-1, y, :].T, sz / sx),
        "sagittal": (ct[x, :, :].T, mask[x, :, :].T, sz / sy),
    }
    names, colours = list(groups), plt.get_cmap("tab20")
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, (image, structure_ids, aspect)) in zip(axes, views.items()):
        low, high = window
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=aspect)
        overlay = np.ma.masked_equal(structure_ids, 0)
        ax.imshow(overlay, cmap=colours, vmin=0.5, vmax=20.5, alpha=0.45, origin="lower", aspect=aspect)
        ax.set_title(f"{name} (patient's right on the left)" if name != "sagittal" else name, fontsize=9)
        ax.axis("off")
    handles = [Patch(color=colours((i - 0.5) / 20), label=s) for i, s in enumerate(names[:20], 1)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), fontsize=7)
    shown = f"{len(names)} structures" + (", the first 20 coloured" if len(names) > 20 else "")
    fig.suptitle(f"{case}: mask, {shown}", fontsize=10)
    (dst / "preview").mkdir(exist_ok=True)
    with utils.atomic_path(dst / "preview" / f"{case}.png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


def mask_report(prep_dir, case_ids):
    """One line on the masks' quality control (make_masks.py's masks_summary.csv) for these cases."""
    path = os.path.join(prep_dir, SUMMARY)
    if not os.path.exists(path):
        return f"masks: no {path} (make_masks.py writes it when it ends), not checked"
    rows = {r["case_id"]: r for r in utils.read_csv(path, ["case_id", "missing", "tiny", "edge"])}
    known = [rows[c] for c in case_ids if c in rows]
    missing = [r for r in known if r["missing"]]
    example = f", e.g. {missing[0]['case_id']}: {missing[0]['missing']}" if missing else ""
    return (
        f"masks (QC structures): {len(missing)} of {len(known)} case(s) miss one{example}; "
        f"{sum(bool(r['edge']) for r in known)} touch the scan's edge ({path})"
    )
