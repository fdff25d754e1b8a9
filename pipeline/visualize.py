"""Small image helpers for previews: label overlays, grids on white, contact sheets.

Label maps are train-id maps (H, W) coloured in a label space's palette (``space=``,
Cityscapes-19 by default: `pipeline.labels.colorize`); images are RGB uint8 arrays
(H, W, 3) or PIL images.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline import storage
from pipeline.labels import CITYSCAPES19, LabelSpace, label_space

GAP = 2  # white pixels between grid cells
PAD = 4  # around text lines
SWATCH = 10

ImageLike = np.ndarray | Image.Image


def _array(image: ImageLike) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    return image


def _fit(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a label map to (height, width)."""
    label = np.asarray(label)
    if label.shape == size:
        return label
    return np.asarray(Image.fromarray(label.astype(np.uint8)).resize(size[::-1], Image.NEAREST))


def overlay(image: ImageLike, label: np.ndarray, alpha: float = 0.5,
            space: str | LabelSpace = CITYSCAPES19) -> np.ndarray:
    """The image with its coloured label map blended in; ignored pixels stay untouched."""
    image, space = _array(image), label_space(space)
    label = _fit(label, image.shape[:2])
    blend = (1 - alpha) * image + alpha * space.colorize(label)
    return np.where((label < space.num_classes)[..., None], blend, image).astype(np.uint8)


def label_cells(image: ImageLike, *label_maps: np.ndarray, space: str | LabelSpace = CITYSCAPES19) -> list[np.ndarray]:
    """[image, colorize(label_1), colorize(label_2), ...] with every label map resized
    (nearest) to the image's size: one row of cells for `side_by_side`."""
    image, space = _array(image), label_space(space)
    return [image] + [space.colorize(_fit(label, image.shape[:2])) for label in label_maps]


def preview_row(image: ImageLike, *label_maps: np.ndarray, space: str | LabelSpace = CITYSCAPES19) -> np.ndarray:
    """image | colorize(label_1) | colorize(label_2) ..., with white gaps; e.g. a
    pseudo-label and the ground truth."""
    cells = label_cells(image, *label_maps, space=space)
    gap = np.full((cells[0].shape[0], GAP, 3), 255, dtype=np.uint8)
    parts = [cells[0]]
    for cell in cells[1:]:
        parts += [gap, cell]
    return np.concatenate(parts, axis=1)


def side_by_side(rows: Sequence[Sequence[ImageLike]], headers: Sequence[str] | None = None) -> Image.Image:
    """A grid of images on white: one list per row, columns as wide as their widest cell;
    ``headers``: a caption over each column (e.g. the stage a column shows)."""
    rows = [[_array(cell) for cell in row] for row in rows]
    if not rows or not all(rows):
        raise ValueError("side_by_side needs at least one row and one image per row")
    ncols = max(len(row) for row in rows)
    widths = [max(row[c].shape[1] for row in rows if c < len(row)) for c in range(ncols)]
    if headers is not None:
        if len(headers) != ncols:
            raise ValueError(f"{len(headers)} headers for {ncols} columns")
        return side_by_side([[np.asarray(_text_strip(h, w)) for h, w in zip(headers, widths)], *rows])
    heights = [max(cell.shape[0] for cell in row) for row in rows]
    sheet = Image.new("RGB", (sum(widths) + GAP * (ncols + 1), sum(heights) + GAP * (len(rows) + 1)),
                      "white")
    y = GAP
    for row, height in zip(rows, heights):
        x = GAP
        for cell, width in zip(row, widths):
            sheet.paste(Image.fromarray(cell), (x, y))
            x += width + GAP
        y += height + GAP
    return sheet


def fit_width(image: ImageLike, width: int) -> np.ndarray:
    """The image scaled down (bilinear) to at most ``width`` pixels wide, aspect kept."""
    image = _array(image)
    if image.shape[1] <= width:
        return image
    height = round(image.shape[0] * width / image.shape[1])
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _text_strip(text: str, width: int) -> Image.Image:
    font = ImageFont.load_default()
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    strip = Image.new("RGB", (max(width, box[2] + 2 * PAD), box[3] + 2 * PAD), "white")
    ImageDraw.Draw(strip).text((PAD, PAD), text, fill="black", font=font)
    return strip


def legend(classes: Iterable[int], width: int, space: str | LabelSpace = CITYSCAPES19) -> Image.Image:
    """Coloured swatches and class names, wrapped into rows at most `width` wide."""
    classes, space = list(classes), label_space(space)
    names, palette = space.classes, space.palette
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max(measure.textbbox((0, 0), names[c], font=font)[2] for c in classes)
    text_h = measure.textbbox((0, 0), "Ag", font=font)[3]
    cell_w, cell_h = SWATCH + 3 + text_w + 2 * PAD, max(SWATCH, text_h) + PAD
    ncols = max(1, (width - PAD) // cell_w)
    nrows = -(-len(classes) // ncols)
    strip = Image.new("RGB", (max(width, cell_w + PAD), nrows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(strip)
    for i, c in enumerate(classes):
        x, y = PAD + (i % ncols) * cell_w, PAD + (i // ncols) * cell_h
        draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=tuple(int(v) for v in palette[c]),
                       outline="black")
        draw.text((x + SWATCH + 3, y - 1), names[c], fill="black", font=font)
    return strip


def _stack(parts: Sequence[Image.Image]) -> Image.Image:
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    return sheet


def contact_sheet(sections: Sequence[tuple[str, Sequence[Sequence[ImageLike]]]], title: str,
                  classes: Iterable[int] | None = None, space: str | LabelSpace = CITYSCAPES19) -> Image.Image:
    """A title, then per section a caption over a grid of rows (e.g. image | coloured label),
    then a legend of `classes` (default: all of the space's); everything as wide as the widest grid."""
    space = label_space(space)
    grids = [(caption, side_by_side(rows)) for caption, rows in sections]
    width = max(grid.width for _, grid in grids)
    parts = [_text_strip(title, width)]
    for caption, grid in grids:
        parts += [_text_strip(caption, width), grid]
    parts.append(legend(range(space.num_classes) if classes is None else classes, width, space))
    return _stack(parts)


def save_png(image: ImageLike, uri: str) -> None:
    """Write an image as PNG to a local path or s3:// URI."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())
