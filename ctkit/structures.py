"""Which stored labels a run learns: `train.py --structures SPEC` -> the run's seg classes -> a lookup table.

make_masks.py stores what the segmenter said (TotalSegmentator's whole 'total' map, or another segmenter's
with its own id -> name table; ctkit/prep.py); the run chooses its supervision when it reads a sample:

    paper                     the region's structures of the paper (Table 3; bowel merged)
    all                       every class of the stored scheme, in id order
    liver,spleen,bowel=esophagus+stomach+duodenum+small_bowel+colon
                              names of the scheme; `name=a+b+c` merges classes into one

Run class k + 1 (0 is background) holds the stored ids ids[k]; every other class of the scheme is background.
`lookup_table` maps a stored uint8 map to the run's classes in one indexing operation; ids outside the scheme
map to UNKNOWN, which the loader reports with the file's name.
"""

import numpy as np

from ctkit.regions import MERGED, REGIONS
from ctkit.utils import BadInput

UNKNOWN = 255  # a stored label that is not in the scheme's table


def parse(spec, table, region):
    """(names, ids): the run's seg classes of a spec for a scheme {id: name}; ids[k] a tuple of stored ids.
    A paper structure the scheme has under its own name (e.g. a segmenter's 'bowel') is taken as it is."""
    by_name = {name: int(i) for i, name in table.items()}
    if spec == "all":
        order = sorted(table, key=int)
        return tuple(table[i] for i in order), tuple((int(i),) for i in order)
    if spec == "paper":  # merged from its parts unless the scheme has the structure itself
        items = [
            f"{s}={'+'.join(MERGED[s])}" if s in MERGED and s not in by_name else s
            for s in REGIONS[region]["structures"]
        ]
    else:
        items = [item.strip() for item in spec.split(",") if item.strip()]
    names, ids = [], []
    for item in items:
        name, _, parts = item.partition("=")
        name, parts = name.strip(), [p.strip() for p in parts.split("+")] if parts else [name.strip()]
        unknown = [p for p in parts if p not in by_name]
        if unknown:
            raise BadInput(
                f"--structures {spec}: {unknown} not in the stored label scheme (classes such as "
                f"{', '.join(list(by_name)[:5])}, ...)"
            )
        names.append(name.strip())
        ids.append(tuple(by_name[p] for p in parts))
    used = [i for group in ids for i in group]
    if not names or len(set(names)) < len(names) or len(set(used)) < len(used):
        raise BadInput(f"--structures {spec}: needs at least one class, each name and stored label once")
    return tuple(names), tuple(ids)


def lookup_table(ids, table):
    """uint8 (256,): stored label -> run class (0 background); labels outside the scheme -> UNKNOWN."""
    lut = np.full(256, UNKNOWN, np.uint8)
    lut[0] = 0
    lut[[int(i) for i in table]] = 0
    for k, group in enumerate(ids, start=1):
        lut[list(group)] = k
    return lut
