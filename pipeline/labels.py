"""The label space every dataset is mapped into: the 19 Cityscapes train ids.

The Cityscapes table (names, ids, train ids, colours) comes from cityscapesScripts'
own ``labels`` list, not a hand-typed copy. GTA5 ships Cityscapes label ids, so it
uses the same table. SYNTHIA-RAND-CITYSCAPES uses its own ids; its mapping is the one
of the released IAST/CBST code (reference §6).
"""

from __future__ import annotations

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
