"""Classes and label tables of each dataset, read from the files it distributes (paper §3.1, Tables 2, 7-9).

Every table is {split: (case ids, labels (N, K) float32, groups)}; a group is the patient, so that held-out
validation and RATIC's per-patient evaluation never mix one patient's scans across sets. The predictions
files a run writes (true and predicted labels per case) are read and written here too.
"""

import os
import zlib
from pathlib import Path

import numpy as np

from ctkit import prep, utils
from ctkit.utils import BadInput, read_csv

# fmt: off
CTRATE_CLASSES = {  # the 18 columns of multi_abnormality_labels in the paper's Table 7 order: abbreviation
    "Arterial wall calcification": "AWC", "Atelectasis": "ATL", "Bronchiectasis": "BRE",
    "Cardiomegaly": "CDM", "Consolidation": "CON", "Coronary artery wall calcification": "CAC",
    "Emphysema": "EMP", "Hiatal hernia": "HH", "Interlobular septal thickening": "IST", "Lung nodule": "LN",
    "Lung opacity": "LOP", "Lymphadenopathy": "LAP", "Medical material": "MM",
    "Mosaic attenuation pattern": "MAP", "Peribronchial thickening": "PBT", "Pericardial effusion": "PCE",
    "Pleural effusion": "PLE", "Pulmonary fibrotic sequela": "PFS",
}
RADCHEST_CLASSES = {  # paper Table 2 / 8 ("spetal" is "septal"; the column is "opacity")
    "catheter_or_port": "COP", "lymphadenopathy": "LAP", "septal_thickening": "ST", "hernia": "HER",
    "nodule": "NOD", "pericardial_effusion": "PCE", "scarring": "SCR", "bronchial_wall_thickening": "BWT",
    "opacity": "OPC", "emphysema": "EMP", "cardiomegaly": "CDM", "pleural_effusion": "PLE",
    "bronchiectasis": "BRE", "consolidation": "CON", "atelectasis": "ATL", "calcification": "CAL",
}
RATIC_COLUMNS = {  # evaluated columns, paper Table 9 order; the model has 11 outputs (model.py)
    "any_injury": "AI", "bowel_healthy": "BH", "bowel_injury": "BI", "extravasation_healthy": "EH",
    "extravasation_injury": "EI", "kidney_healthy": "KH", "kidney_high": "KHI", "kidney_low": "KL",
    "liver_healthy": "LH", "liver_high": "LHI", "liver_low": "LL", "spleen_healthy": "SH",
    "spleen_high": "SHI", "spleen_low": "SL",
}
SYNTHETIC_CLASSES = {  # ctkit/synthetic.py's phantoms
    "nodule_right_upper_lobe": "NOD-RUL", "nodule_left_lower_lobe": "NOD-LLL", "cardiomegaly": "CDM",
    "pleural_effusion": "PLE", "emphysema": "EMP",
}
# fmt: on
CLASSES = {"ctrate": CTRATE_CLASSES, "radchest": RADCHEST_CLASSES, "ratic": RATIC_COLUMNS}
CLASSES["synthetic"] = SYNTHETIC_CLASSES
ABBREVIATIONS = {name: short for table in CLASSES.values() for name, short in table.items()}
RATIC_SPLIT = (2500, 647)  # patients, paper §3.1


def label_matrix(rows, columns, path):
    try:
        values = [[float(r[c]) for c in columns] for r in rows]
    except (TypeError, ValueError) as error:
        raise BadInput(f"{path}: non-numeric or empty label ({error})") from None
    return np.array(values, np.float32).reshape(len(rows), len(columns))


def find_file(root, name, max_depth=4):
    """root/name, or the shallowest file of that name below root (datasets get unpacked at different depths);
    breadth first, so the label files are found without listing tens of thousands of volumes."""
    level = [root]
    for _ in range(max_depth + 1):
        for folder in level:
            if os.path.isfile(os.path.join(folder, name)):
                return os.path.join(folder, name)
        level = [
            e.path for folder in level for e in sorted(os.scandir(folder), key=lambda e: e.name) if e.is_dir()
        ]
    raise FileNotFoundError(f"no {name} under {root} (searched {max_depth} folders deep)")


def ctrate_tables(root):
    """Split as distributed: train, and valid as the test set. Groups = patients (train_<n>)."""
    tables = {}
    for split, name in (("train", "train_predicted_labels.csv"), ("test", "valid_predicted_labels.csv")):
        path = find_file(root, name)
        rows = read_csv(path, ["VolumeName", *CTRATE_CLASSES])
        ids = [r["VolumeName"].split(".nii")[0] for r in rows]
        tables[split] = (
            ids,
            label_matrix(rows, CTRATE_CLASSES, path),
            ["_".join(i.split("_")[:2]) for i in ids],
        )
    return tables


def radchest_tables(root):
    """Class = max over the columns '<abnormality>*<location>' whose abnormality equals the class exactly
    (so 'nodule' does not take 'nodulegr1cm'). Train + valid for training, test for testing (paper §3.1)."""
    tables = {}
    for split in ("train", "valid", "test"):
        path = find_file(root, f"img{split}_Abnormality_and_Location_Labels.csv")
        rows = read_csv(path, ["NoteAcc_DEID"])
        header = list(rows[0]) if rows else []
        groups = [[c for c in header if c.split("*")[0] == name] for name in RADCHEST_CLASSES]
        absent = [name for name, cols in zip(RADCHEST_CLASSES, groups) if not cols]
        if absent:
            raise BadInput(f"{path}: no '<abnormality>*<location>' column for {absent}")
        values = [label_matrix(rows, cols, path).max(1) for cols in groups]
        ids = [r["NoteAcc_DEID"] for r in rows]
        tables[split] = (ids, np.stack(values, 1).reshape(len(ids), -1), ids)
    train, valid = tables.pop("train"), tables.pop("valid")
    tables["train"] = (train[0] + valid[0], np.concatenate([train[1], valid[1]]), train[2] + valid[2])
    return tables


def patient_split(patients, split_file, seed, test_fraction, val_fraction=0.0, same_settings=True):
    """{patient: "train" | "val" | "test"}: drawn once at random (seeded), saved to `split_file` and reused;
    never one patient in two splits. same_settings: refuse a saved split drawn with another seed or fractions
    (RATIC's, kept beside the volumes, is shared by every run whatever its seed)."""
    drawn = {"seed": str(seed), "test_fraction": f"{test_fraction:g}", "val_fraction": f"{val_fraction:g}"}
    if os.path.exists(split_file):
        rows = read_csv(split_file, ["patient_id", "split", *drawn])
        split_of = {r["patient_id"]: r["split"] for r in rows}
        if set(split_of) != set(patients):
            raise BadInput(
                f"{split_file}: its patients differ from the label file's; delete it to draw a new split"
            )
        other = [f"{k} {rows[0][k]}" for k in drawn if rows and rows[0][k] != drawn[k]]
        if other and same_settings:
            asked = ", ".join(f"{k} {drawn[k]}" for k in drawn)
            raise BadInput(
                f"{split_file}: drawn with {', '.join(other)}, this run asks for {asked}; delete "
                "it or use another --output-dir"
            )
        return split_of
    order = np.random.default_rng(seed).permutation(sorted(patients))
    n_test, n_val = round(len(order) * test_fraction), round(len(order) * val_fraction)
    split_of = {
        p: "test" if i < n_test else "val" if i < n_test + n_val else "train" for i, p in enumerate(order)
    }
    os.makedirs(os.path.dirname(os.path.abspath(split_file)), exist_ok=True)
    rows = [[p, split, *drawn.values()] for p, split in sorted(split_of.items())]
    utils.write_csv(split_file, ["patient_id", "split", *drawn], rows)
    return split_of


def ratic_tables(root, split_file, seed=0):
    """One sample per series, carrying its patient's labels; groups = patients."""
    label_path, series_path = find_file(root, "train.csv"), find_file(root, "train_series_meta.csv")
    patients = {r["patient_id"]: r for r in read_csv(label_path, ["patient_id", *RATIC_COLUMNS])}
    series = read_csv(series_path, ["patient_id", "series_id"])
    unknown = [s["patient_id"] for s in series if s["patient_id"] not in patients]
    if unknown:
        raise BadInput(f"{series_path}: patient(s) {unknown[:5]} have no row in {label_path}")
    split_of = patient_split(
        patients, split_file, seed, RATIC_SPLIT[1] / sum(RATIC_SPLIT), same_settings=False
    )
    tables = {}
    for split in ("train", "test"):
        chosen = [s for s in series if split_of[s["patient_id"]] == split]
        ids = [f"{s['patient_id']}_{s['series_id']}" for s in chosen]
        labels = label_matrix([patients[s["patient_id"]] for s in chosen], RATIC_COLUMNS, label_path)
        tables[split] = (ids, labels, [s["patient_id"] for s in chosen])
    return tables


def synthetic_tables(root):
    """Phantoms of `python -m ctkit.synthetic --write DIR`: DIR/labels.csv (case_id, split, classes)."""
    path = os.path.join(root, "labels.csv")
    rows = read_csv(path, ["case_id", "split", *SYNTHETIC_CLASSES])
    tables = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in rows if r["split"] == split]
        ids = [r["case_id"] for r in chosen]
        tables[split] = (ids, label_matrix(chosen, SYNTHETIC_CLASSES, path), ids)
    return tables


CUSTOM_ID_COLUMNS = ("case_id", "path", "patient_id", "split")  # the other columns of a labels CSV: findings


def custom_classes(path):
    """The finding columns of a labels CSV (--dataset custom), in the file's order."""
    header = utils.read_table(path, [])[0]
    classes = tuple(c for c in header if c not in CUSTOM_ID_COLUMNS)
    if not classes:
        raise BadInput(f"{path}: no finding columns (every column but {', '.join(CUSTOM_ID_COLUMNS)} is one)")
    if "case_id" not in header and "path" not in header:
        raise BadInput(
            f"{path}: needs a case_id column (make_masks.py's ids) or a path column (CT file or "
            "DICOM series folder, relative to the CSV's folder)"
        )
    return classes


def custom_case(row, number, path):
    """The case id of a labels CSV row: its case_id, or the id make_masks.py gives its path."""
    if row.get("case_id"):
        return row["case_id"]
    target = os.path.join(os.path.dirname(os.path.abspath(path)), row.get("path") or "")
    if not row.get("path") or not os.path.exists(target):
        raise BadInput(
            f"{path} row {number} column path: {row.get('path')!r} is not a file or folder below "
            f"{os.path.dirname(os.path.abspath(path))}"
        )
    return prep.case_id(Path(target.rstrip("/")))


def custom_label(value, number, column, path):
    if value.strip() not in ("0", "1", "0.0", "1.0"):
        raise BadInput(f"{path} row {number} column {column}: {value!r} is not 0 or 1")
    return float(value)


def custom_tables(path, prep_dir, split_file, seed=0, val_fraction=0.0, test_fraction=None):
    """A labels CSV (--dataset custom): {split: (case ids, labels, patients)}. Rows are numbered as
    utils.read_table does (the header is row 1). Without a split column the patients are split at random
    (test_fraction, default 0.2; val_fraction) and the split is kept in split_file."""
    classes, rows = custom_classes(path), read_csv(path, [])
    cases, seen, values, patients, given = [], {}, [], [], []
    for number, row in enumerate(rows, start=2):
        case = custom_case(row, number, path)
        if case in seen:
            raise BadInput(f"{path} rows {seen[case]} and {number}: case {case} twice")
        seen[case] = number
        cases.append(case)
        values.append([custom_label(row[c] or "", number, c, path) for c in classes])
        patients.append(row.get("patient_id") or case)
        given.append(row.get("split"))
        if given[-1] is not None and given[-1] not in ("train", "val", "test"):
            raise BadInput(f"{path} row {number} column split: {given[-1]!r} is not train, val or test")
    split_of = {}
    for number, (patient, split) in enumerate(zip(patients, given), start=2):
        if split is not None and split_of.setdefault(patient, (split, number))[0] != split:
            first, row = split_of[patient]
            raise BadInput(f"{path} rows {row} and {number}: patient {patient} in both {first} and {split}")
    if "split" not in (rows[0] if rows else {}):
        fraction = 0.2 if test_fraction is None else test_fraction
        split_of = patient_split(set(patients), split_file, seed, fraction, val_fraction)
        given = [split_of[p] for p in patients]
    y, tables = np.array(values, np.float32).reshape(len(cases), len(classes)), {}
    for split in ("train", "val", "test"):
        pick = [i for i, g in enumerate(given) if g == split]
        if pick or split != "val":
            tables[split] = ([cases[i] for i in pick], y[pick], [patients[i] for i in pick])
    if val_fraction and "val" not in tables:  # a split column without val rows: hold out patients
        hold_out(tables, val_fraction)
    single = [c for k, c in enumerate(classes) if len(np.unique(tables["train"][1][:, k])) < 2]
    if single:
        print(
            f"warning: {path}: column(s) {', '.join(single)} have a single value in the training split "
            "(evaluated as skipped classes)"
        )
    return tables


def hold_out(tables, fraction):
    """Move a fraction of the training groups (patients) to a validation split, chosen by a stable hash."""
    ids, labels, groups = tables["train"]
    val = np.array([zlib.crc32(g.encode()) % 1000 < fraction * 1000 for g in groups], bool)

    def pick(values, keep):
        return [v for v, k in zip(values, keep) if k]

    tables["train"] = (pick(ids, ~val), labels[~val], pick(groups, ~val))
    tables["val"] = (pick(ids, val), labels[val], pick(groups, val))


def tables(dataset, data_path, prep_dir, split_seed=0):
    """{split: (case ids, labels, patients)} of a dataset on disk."""
    if dataset == "ctrate":
        return ctrate_tables(data_path)
    if dataset == "radchest":
        return radchest_tables(data_path)
    if dataset == "ratic":  # the patient split is drawn once and kept beside the volumes
        return ratic_tables(data_path, os.path.join(prep_dir, "ratic_split.csv"), split_seed)
    return synthetic_tables(data_path)


# ----------------------------------------------------------------------------- predictions files


def read_predictions(path, per="case"):
    """Predictions CSV (case_id, patient_id, true:<class>..., prob:<class>...) -> {"cases", "patients",
    "y_true", "y_prob", "classes"}: a row per case, or per patient (by_patient) if per is "patient"/"auto"."""
    header, rows = utils.read_table(path, ["case_id"])
    names = [h[len("true:") :] for h in header if h.startswith("true:")]
    if not names or [h[len("prob:") :] for h in header if h.startswith("prob:")] != names or not rows:
        raise BadInput(f"{path}: needs matching true:<class> and prob:<class> columns and at least one row")
    values = np.empty((len(rows), 2 * len(names)))
    for number, row in enumerate(rows, start=2):
        for k, column in enumerate([f"true:{n}" for n in names] + [f"prob:{n}" for n in names]):
            try:
                values[number - 2, k] = float(row[column])
            except ValueError:
                values[number - 2, k] = np.nan
            if not 0 <= values[number - 2, k] <= 1:  # nan too
                raise BadInput(
                    f"{path} row {number} column {column}: {row[column]!r} is not a number in [0, 1]"
                )
    patients = [r.get("patient_id", r["case_id"]) for r in rows]
    cases = [r["case_id"] for r in rows]
    predictions = dict(cases=cases, patients=patients, y_true=values[:, : len(names)], classes=names)
    predictions["y_prob"] = values[:, len(names) :]
    return by_patient(predictions, path) if unit(per, names) == "patient" else predictions


def unit(per, classes):
    """What a row of the metrics is: RATIC is evaluated per patient (paper §3.1: 2,500 / 647 patients)."""
    return ("patient" if set(classes) == set(RATIC_COLUMNS) else "case") if per == "auto" else per


def by_patient(predictions, source="predictions"):
    """A row per patient: the mean probability of the patient's cases (RATIC: series); their labels agree."""
    order, group = np.unique(predictions["patients"], return_inverse=True)
    counts = np.bincount(group)[:, None]
    sums = {key: np.zeros((len(order), predictions[key].shape[1])) for key in ("y_true", "y_prob")}
    for key, total in sums.items():
        np.add.at(total, group, predictions[key])
    y_true = sums["y_true"] / counts
    if not np.all((y_true == 0) | (y_true == 1)):
        raise ValueError(
            f"{source}: the cases of one patient carry different labels; cannot evaluate per patient"
        )
    patients = [str(p) for p in order]
    return dict(
        cases=patients,
        patients=patients,
        y_true=y_true,
        y_prob=sums["y_prob"] / counts,
        classes=predictions["classes"],
        unit="patient",
    )


def write_predictions(path, case_ids, y_true, y_prob, class_names, patients=None):
    header = (
        ["case_id", "patient_id"] + [f"true:{c}" for c in class_names] + [f"prob:{c}" for c in class_names]
    )
    rows = [
        [case, patient] + [f"{v:g}" for v in t] + [f"{v:.6g}" for v in p]
        for case, patient, t, p in zip(case_ids, patients or case_ids, y_true, y_prob)
    ]
    utils.write_csv(path, header, rows)
