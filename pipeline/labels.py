"""Label spaces: the train ids a model predicts, and how each dataset's raw ids map to them.

An experiment works in one label space (``label_space:`` in its config):

- ``cityscapes19`` (default): the 19 Cityscapes train ids; mIoU-19, and SYNTHIA's
  mIoU-16 / mIoU-13 over subsets of them;
- ``nthu13``: the 13 Cityscapes classes NTHU Cross-City labels (reference §11); mIoU-13;
- ``robotcar9``: Oxford RobotCar's 9 classes as HIAST uses them (reference §11); mIoU-9.

Each space is declared once (``LABEL_SPACES``) by its classes, each as the Cityscapes
classes it is made of; the palette, the metric keys and the mapping from every dataset's
raw ids follow from that declaration. The Cityscapes table (names, ids, train ids, colours) comes from cityscapesScripts'
own ``labels`` list, not a hand-typed copy. GTA5 ships Cityscapes label ids, so it
uses the same table. SYNTHIA-RAND-CITYSCAPES uses its own ids; its mapping is the one
of the released IAST/CBST code (reference §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE_INDEX = 255

_TRAIN_LABELS = sorted(
    (lab for lab in _CITYSCAPES_LABELS if 0 <= lab.trainId < IGNORE_INDEX),
    key=lambda lab: lab.trainId,
)
NUM_CLASSES = len(_TRAIN_LABELS)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)

# Train id -> RGB, for every uint8 value (ignore and unused ids are black).
PALETTE = np.zeros((256, 3), dtype=np.uint8)
for _lab in _TRAIN_LABELS:
    PALETTE[_lab.trainId] = _lab.color

# Cityscapes label id -> train id (label ids are 0..33, -1 for license plate).
CITYSCAPES_ID_TO_TRAIN = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _lab in _CITYSCAPES_LABELS:
    if 0 <= _lab.id < 256 and 0 <= _lab.trainId < IGNORE_INDEX:
        CITYSCAPES_ID_TO_TRAIN[_lab.id] = _lab.trainId

# GTA5 labels are Cityscapes label ids.
GTA5_ID_TO_TRAIN = CITYSCAPES_ID_TO_TRAIN

# SYNTHIA-RAND-CITYSCAPES class id (first channel of the 16-bit GT/LABELS png) -> train id.
_SYNTHIA_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9,
    1: 10, 10: 11, 17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}
SYNTHIA_ID_TO_TRAIN = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
for _sid, _tid in _SYNTHIA_TO_TRAIN.items():
    SYNTHIA_ID_TO_TRAIN[_sid] = _tid
# Ids that occur in SYNTHIA but have no Cityscapes train id (void, lanemarking, ...).
SYNTHIA_KNOWN_IDS = frozenset(range(0, 23))

# Classes of the SYNTHIA protocols: mIoU-16 drops terrain, truck, train;
# mIoU-13 also drops wall, fence, pole.
_NAME_TO_TRAIN = {name: i for i, name in enumerate(CLASS_NAMES)}
MIOU16_CLASSES: tuple[int, ...] = tuple(
    i for i, n in enumerate(CLASS_NAMES) if n not in ("terrain", "truck", "train")
)
MIOU13_CLASSES: tuple[int, ...] = tuple(
    i for i in MIOU16_CLASSES if CLASS_NAMES[i] not in ("wall", "fence", "pole")
)


def train_id(name: str) -> int:
    """Train id of a class by its Cityscapes name (e.g. ``train_id("car") == 13``)."""
    try:
        return _NAME_TO_TRAIN[name]
    except KeyError:
        raise KeyError(f"unknown class {name!r}; known: {', '.join(CLASS_NAMES)}") from None


def colorize(label: np.ndarray) -> np.ndarray:
    """Train-id map (H, W) -> RGB image (H, W, 3) in the Cityscapes palette."""
    return PALETTE[np.asarray(label, dtype=np.uint8)]


# ---------------------------------------------------------------------------- label spaces

# RobotCar annotation class id (channel 0 of the RGBA png) -> class name (reference §11).
_ROBOTCAR_RAW = {1: "sky", 2: "person", 3: "two-wheel", 4: "automobile", 5: "sign", 6: "light",
                 7: "building", 10: "sidewalk", 11: "road", 12: "road", 13: "road", 14: "road", 17: "road"}
# Raw ids of each dataset, as Cityscapes train ids (datasets labelled in Cityscapes' classes).
_RAW_TO_CITYSCAPES19 = {
    "gta5": GTA5_ID_TO_TRAIN, "synthia": SYNTHIA_ID_TO_TRAIN, "cityscapes": CITYSCAPES_ID_TO_TRAIN,
    "nthu": CITYSCAPES_ID_TO_TRAIN,  # NTHU's _eval.png hold Cityscapes label ids
}


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """The classes a model predicts (train ids 0..K-1, 255 ignore) and what is reported."""

    name: str
    classes: tuple[str, ...]
    palette: np.ndarray  # (256, 3) uint8: train id -> RGB, black past the classes
    miou: dict[str, tuple[int, ...]]  # metric key -> its classes; the first is the headline
    from_cityscapes19: np.ndarray  # (256,) uint8: Cityscapes train id -> train id here
    datasets: tuple[str, ...]  # the datasets whose labels map into this space
    raw_tables: dict[str, np.ndarray]  # dataset -> (raw id -> train id) lookup table

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def headline(self) -> str:
        """The metric the space is reported by: mIoU-19, mIoU-13, mIoU-9."""
        return next(iter(self.miou))

    def raw_to_train(self, dataset: str) -> np.ndarray:
        """Lookup table from ``dataset``'s raw label ids to this space's train ids."""
        if dataset not in self.raw_tables:
            raise ValueError(f"{dataset} labels do not map to label space {self.name}: use it with "
                             f"{', '.join(self.datasets)}, or another label_space")
        return self.raw_tables[dataset]

    def colorize(self, label: np.ndarray) -> np.ndarray:
        return self.palette[np.asarray(label, dtype=np.uint8)]

    def __repr__(self) -> str:
        return f"LabelSpace({self.name}, {self.num_classes} classes)"


def _declare(name: str, classes: dict[str, tuple[str, ...]], miou: dict[str, tuple[str, ...] | None],
             datasets: tuple[str, ...], own_raw: dict[str, dict[int, str]] | None = None) -> LabelSpace:
    """A space from its classes, each given as the Cityscapes classes merged into it (the
    first gives the colour), and its metrics as key -> class names (None: every class)."""
    names = tuple(classes)
    palette = np.zeros((256, 3), dtype=np.uint8)
    from_cs = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for k, members in enumerate(classes.values()):
        palette[k] = PALETTE[train_id(members[0])]
        for member in members:
            from_cs[train_id(member)] = k
    tables = {}
    for dataset in datasets:
        if dataset in (own_raw or {}):
            table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
            for raw, cls in own_raw[dataset].items():
                table[raw] = names.index(cls)
        else:
            table = from_cs[_RAW_TO_CITYSCAPES19[dataset]]
        table.flags.writeable = False
        tables[dataset] = table
    keys = {key: tuple(range(len(names))) if subset is None else tuple(names.index(n) for n in subset)
            for key, subset in miou.items()}
    return LabelSpace(name, names, palette, keys, from_cs, datasets, tables)


CITYSCAPES19 = _declare(
    "cityscapes19", {n: (n,) for n in CLASS_NAMES},
    {"mIoU-19": None, "mIoU-16": tuple(CLASS_NAMES[i] for i in MIOU16_CLASSES),
     "mIoU-13": tuple(CLASS_NAMES[i] for i in MIOU13_CLASSES)},
    ("gta5", "synthia", "cityscapes"))
NTHU13 = _declare(
    "nthu13", {n: (n,) for n in ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                 "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")},
    {"mIoU-13": None}, ("cityscapes", "nthu"))
ROBOTCAR9 = _declare(
    "robotcar9", {"sky": ("sky",), "person": ("person", "rider"), "two-wheel": ("bicycle", "motorcycle"),
                  "automobile": ("car", "truck", "bus"), "sign": ("traffic sign",), "light": ("traffic light",),
                  "building": ("building",), "sidewalk": ("sidewalk",), "road": ("road",)},
    {"mIoU-9": None}, ("cityscapes", "robotcar"), own_raw={"robotcar": _ROBOTCAR_RAW})
LABEL_SPACES: dict[str, LabelSpace] = {s.name: s for s in (CITYSCAPES19, NTHU13, ROBOTCAR9)}
# Every metric key of every space: what ConfusionMatrix.summary() may report.
ALL_METRIC_KEYS = frozenset(
    {f"IoU/{c}" for s in LABEL_SPACES.values() for c in s.classes}
    | {k for s in LABEL_SPACES.values() for k in s.miou} | {"pixel_accuracy"})


def label_space(space: str | LabelSpace) -> LabelSpace:
    """The label space of a name (``cityscapes19``, ``nthu13``, ``robotcar9``)."""
    if isinstance(space, LabelSpace):
        return space
    try:
        return LABEL_SPACES[space]
    except KeyError:
        raise ValueError(f"unknown label space {space!r}: use one of {', '.join(LABEL_SPACES)}") from None


def check_same_space(what: str, found: str | None, expected: str | LabelSpace, fix: str) -> None:
    """Refuse ``what`` (a file: checkpoint, label store, prepared labels) of another label
    space; ``found`` None is an older file, which is Cityscapes-19 (spaces came later)."""
    found, expected = label_space(found or CITYSCAPES19.name), label_space(expected)
    if found is not expected:
        raise ValueError(f"{what}: label space {found.name} ({found.num_classes} classes), but the experiment's "
                         f"is {expected.name} ({expected.num_classes} classes): {fix}")
