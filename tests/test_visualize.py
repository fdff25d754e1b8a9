import numpy as np
import pytest
from PIL import Image

from pipeline.labels import IGNORE_INDEX, colorize
from pipeline.visualize import (GAP, contact_sheet, fit_width, label_cells, legend, overlay, preview_row, save_png,
                                side_by_side)


def _image(h, w, value=0):
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _label(h, w):
    label = np.arange(h * w).reshape(h, w) % 19
    label[0, 0] = IGNORE_INDEX
    return label.astype(np.uint8)


def test_preview_row_concatenates_image_and_coloured_labels():
    image, gt = _image(8, 12), _label(8, 12)
    pseudo = gt[::2, ::2]  # a pseudo-label at half resolution is resized (nearest) to the image
    row = preview_row(image, pseudo, gt)
    assert row.shape == (8, 3 * 12 + 2 * GAP, 3)
    assert np.array_equal(row[:, :12], image)
    assert (row[:, 12:12 + GAP] == 255).all()
    assert np.array_equal(row[:, 12 + GAP:24 + GAP], colorize(np.repeat(np.repeat(pseudo, 2, 0), 2, 1)))
    assert np.array_equal(row[:, -12:], colorize(gt))


def test_label_cells_colour_each_map_at_the_image_size():
    image, gt = _image(8, 12), _label(8, 12)
    cells = label_cells(image, gt[::2, ::2], gt)
    assert len(cells) == 3 and np.array_equal(cells[0], image)
    assert np.array_equal(cells[1], colorize(np.repeat(np.repeat(gt[::2, ::2], 2, 0), 2, 1)))
    assert np.array_equal(cells[2], colorize(gt))


def test_side_by_side_puts_a_caption_over_each_column():
    a, b = _image(10, 30, 1), _image(10, 40, 2)
    sheet = np.asarray(side_by_side([[a, b], [b, a]], headers=["left", "right"]))
    header = sheet.shape[0] - 4 * GAP - 2 * 10  # the caption row's height
    assert header > 0 and sheet.shape[1] == GAP + 40 + GAP + 40 + GAP
    top = GAP + header + GAP
    assert np.array_equal(sheet[top:top + 10, GAP:GAP + 30], a)
    assert np.array_equal(sheet[top:top + 10, 2 * GAP + 40:2 * GAP + 80], b)
    assert np.array_equal(sheet[top + 10 + GAP:top + 20 + GAP, GAP:GAP + 40], b)
    for x in (GAP, 2 * GAP + 40):  # dark text over each column, on white
        caption = sheet[GAP:GAP + header, x:x + 40]
        assert caption.min() < 100 and np.median(caption) == 255
    with pytest.raises(ValueError, match="1 headers for 2 columns"):
        side_by_side([[a, b]], headers=["only one"])


def test_fit_width_scales_down_wide_images_only():
    wide, narrow = _image(100, 400), _image(10, 20)
    assert fit_width(wide, 200).shape == (50, 200, 3)
    assert np.array_equal(fit_width(narrow, 200), narrow)


def test_overlay_blends_labelled_pixels_only():
    image, label = _image(6, 6), _label(6, 6)
    assert np.array_equal(overlay(image, label, alpha=1.0)[1:, :], colorize(label)[1:, :])
    assert np.array_equal(overlay(image, label, alpha=1.0)[0, 0], image[0, 0])  # ignored
    assert np.array_equal(overlay(image, label, alpha=0.0), image)


def test_side_by_side_lays_out_a_white_grid():
    a, b, c = _image(4, 5, 1), _image(6, 3, 2), _image(2, 7, 3)
    sheet = np.asarray(side_by_side([[a, b], [c]]))
    # Columns as wide as their widest cell (7, 3), rows as tall as their tallest (6, 2).
    assert sheet.shape == (GAP + 6 + GAP + 2 + GAP, GAP + 7 + GAP + 3 + GAP, 3)
    assert np.array_equal(sheet[GAP:GAP + 4, GAP:GAP + 5], a)
    assert np.array_equal(sheet[GAP:GAP + 6, 2 * GAP + 7:2 * GAP + 10], b)
    assert np.array_equal(sheet[2 * GAP + 6:2 * GAP + 8, GAP:GAP + 7], c)
    assert (sheet[:GAP] == 255).all() and (sheet[:, :GAP] == 255).all()


def test_side_by_side_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one row"):
        side_by_side([])
    with pytest.raises(ValueError, match="RGB uint8"):
        side_by_side([[np.zeros((4, 4), dtype=np.uint8)]])


def test_legend_wraps_to_the_width():
    wide, narrow = legend(range(19), 600), legend(range(19), 150)
    assert wide.width == 600 and narrow.width == 150
    assert narrow.height > wide.height


def test_contact_sheet_stacks_title_sections_and_legend(tmp_path):
    rows = [preview_row(_image(10, 20, i), _label(10, 20)) for i in range(3)]
    sheet = contact_sheet([("first", [[r] for r in rows[:2]]), ("second", [[rows[2]]])], title="t")
    grid_width = GAP + rows[0].shape[1] + GAP
    assert sheet.width == max(grid_width, legend(range(19), grid_width).width)
    assert sheet.height > 3 * (10 + GAP) + legend(range(19), grid_width).height
    save_png(sheet, str(tmp_path / "sub" / "sheet.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "sub" / "sheet.png")), np.asarray(sheet))
