import numpy as np
from cityscapesscripts.helpers.labels import id2label

from pipeline import labels


def test_cityscapes_and_gta5_ids_map_through_cityscapesscripts_table():
    # the reference's table (method.md §6): 7:0 8:1 11:2 ... 33:18, all else 255
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    for label_id in range(256):
        assert labels.GTA5_ID_TO_TRAIN[label_id] == expected.get(label_id, 255)
    assert labels.NUM_CLASSES == 19
    assert labels.CLASS_NAMES[labels.train_id("car")] == id2label[26].name


def test_synthia_mapping_and_protocol_subsets():
    expected = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
                17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}
    assert {i: int(labels.SYNTHIA_ID_TO_TRAIN[i]) for i in expected} == expected
    assert (labels.SYNTHIA_ID_TO_TRAIN[[0, 13, 14, 22, 65535]] == 255).all()
    names16 = {labels.CLASS_NAMES[i] for i in labels.MIOU16_CLASSES}
    names13 = {labels.CLASS_NAMES[i] for i in labels.MIOU13_CLASSES}
    assert len(names16) == 16 and not names16 & {"terrain", "truck", "train"}
    assert len(names13) == 13 and not names13 & {"wall", "fence", "pole"}


def test_colorize_uses_the_cityscapes_palette():
    rgb = labels.colorize(np.array([[0, 255]], np.uint8))
    assert rgb.shape == (1, 2, 3)
    assert tuple(rgb[0, 0]) == id2label[7].color  # road
    assert tuple(rgb[0, 1]) == (0, 0, 0)
