"""The built-in domain-shift benchmark: procedurally drawn street scenes in two domains.

A labelled *source* domain that looks like GTA5 (saturated flat colours, warm sun with
hard shadows, sharp, clean) and a *target* domain that looks like Cityscapes (dull, cool,
overcast, other asphalt, paving and foliage, dark windows, textured, blurred, noisy,
vignetted, JPEG-compressed, ego-vehicle bonnet). Both draw one street model: a
perspective road with sidewalks, verges, facades, walls and fences, trees, poles with
signs and lights, parked and moving traffic, pedestrians and cyclists, painted far to
near, at the scale of a miniature (``_SCALE``: thin things wider than life and nothing
small far away, so every class is a few pixels wide at 256x128). The domains differ in
materials, lighting and texture, and moderately in class frequencies (the source has more
and bigger vehicles, the target more people, vegetation, poles and fences), so a source
model transfers only in part. Like GTA5's weather and time-of-day cycle, a third of the
source frames are overcast and every source frame is graded and focused a little
differently; the target is one season's daytime, and ``with_look`` draws it with other
looks (haze, colour casts, blur, noise, compression, materials). docs/benchmark.md has
the measurements behind the design.

Files follow the real datasets' layouts (reference §6), so the same loaders read both:

    source/images/00001.png, source/labels/00001.png          (GTA5: Cityscapes label ids)
    source_val/images/00001.png, source_val/labels/00001.png  (held-out source frames)
    target/leftImg8bit/{train,val}/<city>/<city>_000000_NNNNNN_leftImg8bit.png
    target/gtFine/{train,val}/<city>/<city>_000000_NNNNNN_gtFine_labelIds.png

Every image has its own random generator seeded by (seed, set, index), so the files are
byte-identical whatever the number of worker processes.
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from cityscapesscripts.helpers.labels import name2label
from PIL import Image, ImageFilter

from pipeline import storage
from pipeline.labels import CITYSCAPES_ID_TO_TRAIN, colorize

# Cityscapes label ids (what the files hold), not train ids.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, \
    RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE, EGO_VEHICLE = (
        name2label[n].id for n in (
            "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
            "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
            "bus", "train", "motorcycle", "bicycle", "ego vehicle"))

SOURCE_SIZE = (256, 140)  # (width, height): GTA5's aspect 1914/1052
TARGET_SIZE = (256, 128)  # Cityscapes' aspect 2:1
TRAIN_CITIES = ("aachen", "bremen", "zurich")
VAL_CITIES = ("frankfurt", "lindau", "munster")
_SETS = ("source", "target_train", "target_val", "source_val")

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Domain:
    """How one domain lays out its streets and how it looks."""

    name: str
    size: tuple[int, int]  # (width, height)
    # Layout (lengths in metres, rates per 100 m of street and side).
    horizon: tuple[float, float]  # horizon row as a fraction of the height
    camera_height: float
    road_half_width: tuple[float, float]
    sidewalk_width: tuple[float, float]
    verge_prob: float  # a grass strip (terrain) between sidewalk and facades
    barrier_probs: tuple[float, float, float]  # wall, fence, hedge in front of the facades
    building_height: tuple[float, float]
    trees: float
    poles: float
    parked_cars: float
    moving_cars: float
    heavy_share: float  # share of vehicles that are trucks or buses
    pedestrians: float
    cyclists: float  # per image
    motorcyclists: float  # per image
    train_prob: float  # a tram, per image
    ego_vehicle: bool
    # Look.
    colors: dict[str, tuple[RGB, ...]]
    skies: tuple[tuple[RGB, RGB], ...]  # (zenith, horizon) colours, one drawn per frame
    window: RGB
    sun: bool  # hard shadows and sunlit/shaded facades
    texture: float  # amplitude of grain and blotches (per-class weights below)
    saturation: float
    tint: tuple[float, float, float]
    contrast: float
    gamma: float
    blur: float  # Gaussian radius in pixels
    noise: float  # sensor noise, std in [0, 1] units
    vignette: float
    jpeg_quality: int | None
    # Weather and time of day, drawn per frame (GTA5 cycles them; Cityscapes is one season's
    # daytime): the share of overcast frames and the spread of grading and focus around the look.
    overcast: float = 0.0
    look_jitter: float = 0.0
    max_blur: float = 0.0
    # Scale of the miniature: street things (poles, people, cars...) are drawn only up to
    # `far` metres, people and cyclists up to `near_things`, and the lateral sizes of
    # thin things (poles, signs, lights, people, two-wheelers) are multiplied by `thin_scale`,
    # so every class stays a few pixels wide at the benchmark's resolution.
    far: float = 90.0
    focal: float = 0.95  # focal length in image widths: a longer lens shows everything larger
    near_things: float = 60.0
    thin_scale: float = 1.0
    # Haze: the far rows (near the horizon) are blended towards `haze_color` with weight up
    # to `haze` (0: none).
    haze: float = 0.0
    haze_color: RGB = (200, 205, 210)
    fence_opacity: float = 0.55  # of a fence's mesh (its posts and rails are solid)
    barrier_height: tuple[float, float] = (1.0, 2.2)  # walls, fences and hedges, metres
    crossing_share: float = 0.35  # of two-wheelers crossing the road (seen from the side)
    wheel_scale: float = 1.0  # of two-wheelers' wheels
    helmets: bool = False  # riders wear helmets (colours: colors["helmet"])


# The world's materials, shared by both domains; each overrides what its look changes.
_COLORS: dict[str, tuple[RGB, ...]] = {
    "road": ((85, 84, 90),), "sidewalk": ((165, 155, 148), (150, 148, 146)),
    "curb": ((190, 188, 180),), "marking": ((230, 230, 222),),
    "building": ((200, 170, 130), (170, 100, 70), (215, 200, 170), (150, 150, 160), (185, 140, 105),
                 (130, 150, 170), (190, 190, 185)),
    "wall": ((178, 178, 172), (145, 140, 135)), "fence": ((115, 115, 118), (145, 120, 85)),
    "vegetation": ((80, 135, 40), (95, 145, 45), (65, 115, 45)),
    "terrain": ((175, 165, 60), (160, 150, 55)), "trunk": ((90, 70, 48),),
    "pole": ((110, 110, 115), (75, 95, 75)), "sign": ((35, 75, 200), (215, 35, 35), (240, 200, 10)),
    "light": ((35, 35, 35),),
    "car": ((40, 40, 45), (200, 200, 205), (120, 125, 130), (35, 45, 85), (150, 25, 25),
            (230, 230, 230)),
    "truck": ((235, 235, 235), (200, 45, 35), (60, 105, 180), (150, 150, 150)),
    "bus": ((240, 185, 25), (210, 45, 40), (230, 230, 220)), "train": ((40, 130, 80), (225, 225, 215)),
    "clothes": ((35, 35, 40), (70, 70, 80), (40, 50, 80), (110, 90, 70), (150, 150, 150),
                (120, 40, 40), (200, 45, 45), (45, 80, 190)),
    "skin": ((220, 175, 140), (155, 108, 78)), "glass": ((80, 110, 140),),
    "helmet": ((240, 240, 240), (250, 210, 30), (230, 60, 40), (40, 40, 45)),
}

# The miniature's scale, shared by both domains (measured: with GTA5's proportions at
# 256x128 poles, signs, people and two-wheelers are one to three pixels wide and a small
# model cannot learn them anywhere; see docs/benchmark.md).
_SCALE = dict(far=45.0, near_things=25.0, thin_scale=2.5, wheel_scale=1.4, crossing_share=0.7,
              fence_opacity=0.85, barrier_height=(1.3, 2.6), verge_prob=0.5, helmets=True)

SOURCE = Domain(
    name="source", size=SOURCE_SIZE,
    horizon=(0.36, 0.46), camera_height=1.6,
    road_half_width=(4.5, 8.0), sidewalk_width=(2.5, 4.0),
    barrier_probs=(0.3, 0.3, 0.1), building_height=(10.0, 40.0),
    trees=2.0, poles=4.0, parked_cars=8.0, moving_cars=8.0, heavy_share=0.25,
    pedestrians=2.5, cyclists=1.2, motorcyclists=1.0, train_prob=0.2, ego_vehicle=False,
    colors={  # a game's look: bright paint, lush green, blue glass, yellow lines
        **_COLORS,
        "marking": ((235, 235, 225), (240, 200, 40)),
        "vegetation": ((95, 150, 35), (110, 155, 40), (75, 130, 45)),
        "car": _COLORS["car"] + ((205, 25, 25), (245, 205, 20), (30, 80, 210), (30, 150, 60),
                                 (235, 115, 20)),
        "clothes": _COLORS["clothes"] + ((230, 200, 50), (235, 235, 235), (45, 140, 75)),
        "glass": ((90, 130, 170),),
    },
    skies=(((50, 120, 235), (175, 215, 250)), ((70, 140, 230), (200, 225, 245)),
           ((40, 100, 220), (150, 200, 250)), ((170, 180, 195), (220, 225, 230))),
    window=(90, 130, 170),
    sun=True, texture=0.03, saturation=1.2, tint=(1.05, 1.0, 0.92), contrast=1.1, gamma=0.95,
    blur=0.0, noise=0.0, vignette=0.0, jpeg_quality=None,
    overcast=0.35, look_jitter=0.2, max_blur=0.8, **_SCALE,
)

TARGET = Domain(
    name="target", size=TARGET_SIZE,
    horizon=(0.40, 0.48), camera_height=1.3,
    road_half_width=(3.0, 5.5), sidewalk_width=(2.5, 4.5),
    barrier_probs=(0.15, 0.35, 0.3), building_height=(9.0, 22.0),
    trees=7.0, poles=7.0, parked_cars=4.0, moving_cars=1.5, heavy_share=0.06,
    pedestrians=6.0, cyclists=1.2, motorcyclists=0.6, train_prob=0.2, ego_vehicle=True,
    colors={  # a German street: grey and white cars, dark coats, plaster facades, dark windows
        **_COLORS,
        "building": ((160, 158, 155), (200, 195, 185), (150, 110, 95), (180, 168, 150),
                     (215, 212, 205), (185, 150, 120)),
        "clothes": _COLORS["clothes"][:6],  # dark coats
        "glass": ((75, 95, 115),),
        # The large classes' materials differ too, as real asphalt, paving and foliage do
        # from a game's: without it the source model transfers 0.75 of the oracle's
        # accuracy (GTA5 -> Cityscapes: 0.55) and self-training has little to fix.
        "road": ((125, 118, 108),), "sidewalk": ((190, 178, 150), (175, 170, 160)),
        "vegetation": ((65, 105, 60), (80, 115, 55), (60, 95, 50)),
        "terrain": ((150, 125, 80), (140, 120, 85)),
    },
    skies=(((120, 160, 205), (215, 222, 230)), ((185, 190, 198), (225, 227, 230)),
           ((205, 208, 212), (235, 236, 238))),
    window=(80, 100, 120),
    sun=False, texture=0.05, saturation=0.85, tint=(0.96, 1.0, 1.02), contrast=0.95, gamma=1.05,
    blur=0.5, noise=0.015, vignette=0.3, jpeg_quality=70, **_SCALE,
)

# Texture weight per label id: vegetation and terrain are grainy, the sky smooth.
_TEXTURE = np.full(256, 0.6, dtype=np.float32)
for _id, _w in ((ROAD, 1.0), (SIDEWALK, 0.8), (BUILDING, 1.0), (WALL, 1.2), (VEGETATION, 2.5),
                (TERRAIN, 2.0), (SKY, 0.15)):
    _TEXTURE[_id] = _w

_NEAR = 0.8  # metres: geometry closer than this is clipped


# --- drawing ---------------------------------------------------------------------------------

class _Canvas:
    """Label ids and linear RGB in [0, 1], painted back to front; regions are
    (row slice, column slice, mask) over a bounding box."""

    def __init__(self, width: int, height: int):
        self.w, self.h = width, height
        self.label = np.full((height, width), SKY, dtype=np.uint8)
        self.rgb = np.zeros((height, width, 3), dtype=np.float32)

    def polygon(self, pts) -> tuple | None:
        """Convex polygon in pixel coordinates; a pixel is in if its centre is."""
        xs, ys = [float(p[0]) for p in pts], [float(p[1]) for p in pts]
        x0, x1 = max(math.floor(min(xs)), 0), min(math.ceil(max(xs)), self.w)
        y0, y1 = max(math.floor(min(ys)), 0), min(math.ceil(max(ys)), self.h)
        edges = list(zip(xs, ys, xs[1:] + xs[:1], ys[1:] + ys[:1]))
        orientation = math.copysign(1.0, sum(ax * by - bx * ay for ax, ay, bx, by in edges))
        if x0 >= x1 or y0 >= y1:
            return None
        px = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5
        py = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5
        mask = np.ones((y1 - y0, x1 - x0), dtype=bool)
        for ax, ay, bx, by in edges:  # inside = on the inner side of every edge
            mask &= orientation * (bx - ax) * (py - ay) >= orientation * (by - ay) * (px - ax)
        return slice(y0, y1), slice(x0, x1), mask

    def rect(self, x0, y0, x1, y1, min_width: float = 1.0) -> tuple | None:
        """Axis-aligned box; at least `min_width` pixels wide so thin far objects survive."""
        if x1 - x0 < min_width:
            xc = (x0 + x1) / 2
            x0, x1 = xc - min_width / 2, xc + min_width / 2
        # Pixels whose centre is inside: columns ceil(x0 - 0.5) .. ceil(x1 - 0.5) - 1.
        c0, c1 = max(math.ceil(x0 - 0.5), 0), min(math.ceil(x1 - 0.5), self.w)
        r0, r1 = max(math.ceil(y0 - 0.5), 0), min(math.ceil(y1 - 0.5), self.h)
        if c0 >= c1 or r0 >= r1:
            return None
        return slice(r0, r1), slice(c0, c1), np.ones((r1 - r0, c1 - c0), dtype=bool)

    def ellipse(self, cx, cy, rx, ry) -> tuple | None:
        rx, ry = max(rx, 0.5), max(ry, 0.5)
        x0, x1 = max(math.floor(cx - rx), 0), min(math.ceil(cx + rx), self.w)
        y0, y1 = max(math.floor(cy - ry), 0), min(math.ceil(cy + ry), self.h)
        if x0 >= x1 or y0 >= y1:
            return None
        px = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / rx
        py = (np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy) / ry
        return slice(y0, y1), slice(x0, x1), px ** 2 + py ** 2 <= 1

    def paint(self, region, label: int, color, alpha: float = 1.0) -> None:
        """Set `label` and blend `color` ((3,) or a (h, w, 3) array over the box) into `region`."""
        if region is None:
            return
        ys, xs, mask = region
        color = np.asarray(color, dtype=np.float32)
        if color.ndim == 3:
            color = color[mask]
        self.label[ys, xs][mask] = label
        rgb = self.rgb[ys, xs]
        rgb[mask] = color if alpha == 1.0 else alpha * color + (1 - alpha) * rgb[mask]


@dataclass
class _Camera:
    f: float
    cx: float
    horizon: float
    height: float

    def project(self, x, y, z):
        """World (lateral x, height y, depth z) in metres -> pixel (column, row)."""
        return self.cx + self.f * x / z, self.horizon + self.f * (self.height - y) / z


def _color(rng: np.random.Generator, dom: Domain, key: str, jitter: float = 0.08) -> np.ndarray:
    choices = dom.colors[key]
    base = np.asarray(choices[rng.integers(len(choices))], dtype=np.float32) / 255
    return np.clip(base * rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32), 0, 1)


def _rgb(c: RGB) -> np.ndarray:
    return np.asarray(c, dtype=np.float32) / 255


def _side_quad(canvas: _Canvas, cam: _Camera, x: float, z0: float, z1: float, y0: float, y1: float):
    """A vertical rectangle in the plane of constant x (a facade, a vehicle's side)."""
    z0 = max(z0, _NEAR)
    if z1 <= z0:
        return None
    pts = [cam.project(x, y, z) for x, y, z in ((x, y0, z0), (x, y1, z0), (x, y1, z1), (x, y0, z1))]
    return canvas.polygon(pts)


def _front_rect(canvas: _Canvas, cam: _Camera, x0, x1, y0, y1, z, min_width=1.0):
    """A rectangle facing the camera at depth z."""
    (u0, v1), (u1, v0) = cam.project(x0, y0, z), cam.project(x1, y1, z)
    return canvas.rect(u0, v0, u1, v1, min_width)


def _plane_coords(cam: _Camera, x: float, region) -> tuple[np.ndarray, np.ndarray]:
    """Depth and height (metres) of each pixel of `region` on the vertical plane at lateral x."""
    ys, xs, _ = region
    rows, cols = np.mgrid[ys, xs].astype(np.float32) + 0.5
    z = cam.f * x / np.where(np.abs(cols - cam.cx) < 1e-3, 1e-3, cols - cam.cx)
    return z, cam.height - (rows - cam.horizon) * z / cam.f


# --- the street ------------------------------------------------------------------------------

@dataclass
class _Street:
    center: float  # lateral position of the road centre relative to the camera
    road: float  # half width
    sidewalk: float
    verge: tuple[float, float]  # left, right (0: none)
    setback: tuple[float, float]
    end: float  # depth of the facades that close the street
    shadow: tuple[int, float]  # side in shadow (-1/1) and its lateral edge; side 0: no sun

    def curb(self, side: int) -> float:
        return self.center + side * self.road

    def verge_start(self, side: int) -> float:
        return self.center + side * (self.road + self.sidewalk)

    def barrier_line(self, side: int) -> float:
        return self.verge_start(side) + side * self.verge[side > 0]

    def facade_line(self, side: int) -> float:
        return self.barrier_line(side) + side * self.setback[side > 0]


def _sample_street(rng: np.random.Generator, dom: Domain) -> _Street:
    road = rng.uniform(*dom.road_half_width)
    verge = tuple(float(rng.uniform(1.0, 4.0)) if rng.random() < dom.verge_prob else 0.0 for _ in "lr")
    sun_side = int(rng.choice([-1, 1]))
    return _Street(
        center=rng.uniform(-0.6, 0.6) * road, road=road, sidewalk=rng.uniform(*dom.sidewalk_width),
        verge=verge, setback=tuple(float(rng.uniform(0.0, 3.0)) for _ in "lr"),
        end=rng.uniform(70, 220), shadow=(sun_side if dom.sun else 0, rng.uniform(-1.0, 1.0) * road),
    )


def _draw_sky(canvas: _Canvas, cam: _Camera, dom: Domain, rng: np.random.Generator) -> None:
    t = np.clip(np.arange(canvas.h, dtype=np.float32) / max(cam.horizon, 1.0), 0, 1)[:, None, None]
    zenith, horizon = (_rgb(c) for c in dom.skies[rng.integers(len(dom.skies))])
    canvas.rgb[:] = zenith + (horizon - zenith) * t ** 0.7
    clouds = np.clip(_smooth_noise(rng, canvas.h, canvas.w, cell=24) * 2.5 - 0.8, 0, 1)[..., None]
    canvas.rgb[:] += (1 - canvas.rgb) * clouds * 0.8


def _draw_ground(canvas: _Canvas, cam: _Camera, st: _Street, dom: Domain, rng: np.random.Generator) -> None:
    rows = np.arange(canvas.h, dtype=np.float32)[:, None] + 0.5
    cols = np.arange(canvas.w, dtype=np.float32)[None, :] + 0.5
    below = np.broadcast_to(rows > cam.horizon + 0.5, (canvas.h, canvas.w))
    z = cam.f * cam.height / np.maximum(rows - cam.horizon, 0.5)
    d = (cols - cam.cx) * z / cam.f - st.center  # lateral distance from the road centre
    a, right = np.abs(d), d > 0
    verge = np.where(right, st.verge[1], st.verge[0])
    beyond_sidewalk = st.road + st.sidewalk
    label = np.where(a < st.road, ROAD, np.where(a < beyond_sidewalk, SIDEWALK,
                     np.where(a < beyond_sidewalk + verge, TERRAIN, SIDEWALK)))
    label = np.where(below, label, canvas.label).astype(np.uint8)

    rgb = np.zeros_like(canvas.rgb)
    for lab, key in ((ROAD, "road"), (SIDEWALK, "sidewalk"), (TERRAIN, "terrain")):
        rgb[label == lab] = _color(rng, dom, key, 0.04)
    # Lane markings, a dashed centre line and edge lines; curbs; paving joints.
    dash = (z % 9.0) < 4.5
    marking = ((np.abs(d) < 0.08) & dash) | (np.abs(a - (st.road - 0.35)) < 0.07)
    if rng.random() < 0.3:  # a pedestrian crossing
        z0 = rng.uniform(8, 30)
        marking |= (z > z0) & (z < z0 + 4) & (a < st.road - 0.5) & ((d % 1.0) < 0.5)
    rgb[marking & (label == ROAD)] = _color(rng, dom, "marking", 0.03)
    rgb[(np.abs(a - st.road) < 0.15) & (a >= st.road) & (label == SIDEWALK)] = _color(rng, dom, "curb", 0.03)
    joints = ((z % 1.2) < 0.08) | ((d % 1.2) < 0.08)
    rgb[joints & (label == SIDEWALK) & (z < 25)] *= 0.85
    side, edge = st.shadow
    if side:  # shade from the buildings of one side; the rest of the ground is sunlit
        rgb *= np.where(d * side > edge * side, 0.55, 1.1)[..., None].astype(np.float32)
    canvas.label[below] = label[below]
    canvas.rgb[below] = rgb[below]


def _facade(canvas, cam, dom, rng, x, z0, z1, top, color, light) -> None:
    region = _side_quad(canvas, cam, x, z0, z1, 0.0, top)
    if region is None:
        return
    z, y = _plane_coords(cam, x, region)
    bay, floor = rng.uniform(2.2, 3.5), rng.uniform(2.9, 3.6)
    windows = ((z / bay) % 1 < 0.55) & ((y / floor) % 1 > 0.35) & (y > 3.5) & (y < top - 1.0)
    shop = (y > 0.4) & (y < 2.8) & ((z / (2 * bay)) % 1 < 0.7)
    glass = np.asarray(dom.window, np.float32) / 255
    rgb = np.where((windows | shop)[..., None], glass, color * light)
    canvas.paint(region, BUILDING, rgb)


def _draw_facades(canvas, cam, st: _Street, dom: Domain, rng) -> None:
    # The facades that close the street, then both sides.
    x = -80.0
    while x < 80.0:
        width = rng.uniform(10, 30)
        top = rng.uniform(*dom.building_height)
        canvas.paint(_front_rect(canvas, cam, x, x + width, 0.0, top, st.end), BUILDING,
                     _color(rng, dom, "building") * 0.9)
        x += width
    for side in (-1, 1):
        light = 1.0 if not st.shadow[0] else (0.6 if side == st.shadow[0] else 1.1)
        xf = st.facade_line(side)
        z = rng.uniform(-5.0, 2.0)
        while z < st.end:
            length = rng.uniform(8, 30)
            if rng.random() < 0.15:  # a gap between buildings, filled with a big tree
                _tree(canvas, cam, dom, rng, xf + side * 4, z + length / 2, radius=length / 3)
            else:
                _facade(canvas, cam, dom, rng, xf, z, z + length, rng.uniform(*dom.building_height),
                        _color(rng, dom, "building"), light)
            z += length


def _draw_barriers(canvas, cam, st: _Street, dom: Domain, rng) -> None:
    for side in (-1, 1):
        probs = [*dom.barrier_probs, 1 - sum(dom.barrier_probs)]
        kind = (WALL, FENCE, VEGETATION, None)[rng.choice(4, p=probs)]
        if kind is None:
            continue
        x = st.barrier_line(side)
        z0 = rng.uniform(0.0, 20.0)
        z1 = z0 + rng.uniform(15.0, 80.0)
        top = rng.uniform(*dom.barrier_height)
        region = _side_quad(canvas, cam, x, z0, z1, 0.0, top)
        if region is None:
            continue
        if kind == WALL:
            z, y = _plane_coords(cam, x, region)  # concrete blocks: dark joints
            joints = ((z % 1.6) < 0.08) | ((y % 0.5) < 0.05)
            color = _color(rng, dom, "wall")
            canvas.paint(region, WALL, np.where(joints[..., None], color * 0.7, color))
        elif kind == VEGETATION:  # a hedge
            canvas.paint(region, VEGETATION, _color(rng, dom, "vegetation"))
        else:  # a fence: solid posts and rails, see-through mesh
            z, y = _plane_coords(cam, x, region)
            solid = ((z % 2.5) < 0.25) | (np.abs(y - top) < 0.12) | (np.abs(y - 0.2) < 0.1)
            color = _color(rng, dom, "fence")
            canvas.paint(region, FENCE, color, alpha=dom.fence_opacity)
            ys, xs, mask = region
            canvas.paint((ys, xs, mask & solid), FENCE, color)


# --- street furniture, vegetation, traffic, people --------------------------------------------

def _tree(canvas, cam, dom, rng, x, z, radius=None) -> None:
    radius = radius or rng.uniform(1.5, 3.0)
    crown_y = rng.uniform(3.5, 5.5) + radius * 0.5
    canvas.paint(_front_rect(canvas, cam, x - 0.18, x + 0.18, 0.0, crown_y, z), VEGETATION,
                 _color(rng, dom, "trunk"))
    color = _color(rng, dom, "vegetation")
    for _ in range(3):
        dx, dy = rng.uniform(-0.5, 0.5) * radius, rng.uniform(-0.3, 0.3) * radius
        cx, cy = cam.project(x + dx, crown_y + dy, z)
        r = cam.f * radius * rng.uniform(0.7, 1.0) / z
        canvas.paint(canvas.ellipse(cx, cy, r, r * rng.uniform(0.8, 1.1)), VEGETATION,
                     color * rng.uniform(0.85, 1.1))


def _pole(canvas, cam, dom, rng, x, z, side) -> None:
    top = rng.uniform(4.5, 9.0)
    color = _color(rng, dom, "pole")
    k = dom.thin_scale
    canvas.paint(_front_rect(canvas, cam, x - 0.1 * k, x + 0.1 * k, 0.0, top, z), POLE, color)
    if rng.random() < 0.4:  # a street-light arm over the road
        canvas.paint(_front_rect(canvas, cam, min(x, x - side * 2.5), max(x, x - side * 2.5),
                                 top - 0.15, top, z), POLE, color)
    kind = rng.random()
    if kind < 0.45:  # a traffic sign, square or round
        y = rng.uniform(2.2, 3.2)
        s = rng.uniform(0.3, 0.45) * k
        sign = _color(rng, dom, "sign")
        if rng.random() < 0.5:
            region = _front_rect(canvas, cam, x - s, x + s, y - s, y + s, z)
        else:
            cx, cy = cam.project(x, y, z)
            region = canvas.ellipse(cx, cy, cam.f * s / z, cam.f * s / z)
        canvas.paint(region, SIGN, sign)
    elif kind < 0.75:  # a traffic light: dark housing, three lamps, one lit
        y = rng.uniform(2.8, 4.5)
        housing = _color(rng, dom, "light")
        canvas.paint(_front_rect(canvas, cam, x - 0.18 * k, x + 0.18 * k, y - 0.5 * k, y + 0.5 * k, z),
                     LIGHT, housing)
        lit = rng.integers(3)
        for i, lamp in enumerate(((255, 40, 30), (255, 190, 0), (40, 230, 90))):
            cx, cy = cam.project(x, y + (0.3 - 0.3 * i) * k, z)
            color = _rgb(lamp) if i == lit else housing * 0.5
            canvas.paint(canvas.ellipse(cx, cy, cam.f * 0.1 * k / z, cam.f * 0.1 * k / z), LIGHT, color)


_VEHICLES = {  # width, height, length, body starts above the ground
    CAR: (1.8, 1.5, 4.4, 0.25), TRUCK: (2.4, 3.4, 8.0, 0.45), BUS: (2.5, 3.1, 12.0, 0.35),
    TRAIN: (2.6, 3.6, 25.0, 0.4),
}


def _vehicle(canvas, cam, dom, rng, kind, x, z, oncoming: bool) -> None:
    """A vehicle seen from behind (or the front, if oncoming), its near side visible."""
    w, h, length, base = _VEHICLES[kind]
    color = _color(rng, dom, {CAR: "car", TRUCK: "truck", BUS: "bus", TRAIN: "train"}[kind])
    glass = _color(rng, dom, "glass", 0.04)
    tyre = np.full(3, 0.08, dtype=np.float32)
    cabin = h * 0.62 if kind == CAR else h  # cars: a narrower glass cabin above the body
    if abs(x) > w / 2:  # the side facing the camera
        xs = x - np.sign(x) * w / 2
        canvas.paint(_side_quad(canvas, cam, xs, z, z + length, base, cabin), kind, color * 0.85)
        if kind == CAR:
            canvas.paint(_side_quad(canvas, cam, xs, z + 0.25 * length, z + 0.8 * length, cabin, h),
                         kind, glass * 0.9)
        elif kind == TRUCK:  # a windowless cargo box behind a glazed cab
            canvas.paint(_side_quad(canvas, cam, xs, z + length - 1.6, z + length - 0.3, h * 0.55, h * 0.85),
                         kind, glass * 0.9)
            canvas.paint(_side_quad(canvas, cam, xs, z + 0.2, z + length - 2.0, h * 0.15, h * 0.2),
                         kind, color * 0.6)
        else:  # buses and trams: a band of windows along the side
            canvas.paint(_side_quad(canvas, cam, xs, z + 0.5, z + length - 0.5, h * 0.55, h * 0.85),
                         kind, glass * 0.9)
        for zw in (z + 0.8, z + length - 0.9):
            cx, cy = cam.project(xs, 0.33, zw)
            r = cam.f * 0.33 / zw
            canvas.paint(canvas.ellipse(cx, cy, r * 0.45, r), kind, tyre)
    # Back or front face: body, glass, lights, wheels.
    canvas.paint(_front_rect(canvas, cam, x - w / 2, x + w / 2, base, cabin, z), kind, color)
    if kind == CAR:
        (u0, v0), (u1, v1) = cam.project(x - w * 0.42, cabin, z), cam.project(x + w * 0.42, cabin, z)
        (t0, tv), (t1, _) = cam.project(x - w * 0.32, h, z), cam.project(x + w * 0.32, h, z)
        canvas.paint(canvas.polygon([(u0, v0), (u1, v1), (t1, tv), (t0, tv)]), kind, glass)
    elif kind == TRUCK and not oncoming:  # the cargo box's doors: a dark seam, no glass
        canvas.paint(_front_rect(canvas, cam, x - 0.04, x + 0.04, base + 0.2, h - 0.2, z), kind, color * 0.5)
    else:
        canvas.paint(_front_rect(canvas, cam, x - w * 0.42, x + w * 0.42, h * 0.55, h * 0.9, z), kind, glass)
    lamp = _rgb((250, 245, 220)) if oncoming else _rgb((230, 30, 30))
    for s in (-1, 1):
        canvas.paint(_front_rect(canvas, cam, x + s * w * 0.45 - 0.15, x + s * w * 0.45 + 0.15,
                                 base + 0.45, base + 0.62, z), kind, lamp)
        canvas.paint(_front_rect(canvas, cam, x + s * w * 0.4 - 0.15, x + s * w * 0.4 + 0.15,
                                 0.0, base + 0.1, z), kind, tyre)


def _person(canvas, cam, dom, rng, x, z, label=PERSON, ground=0.0, seated=False) -> None:
    """A person seen from the front or back; `seated` riders have short, bent legs."""
    h = rng.uniform(1.55, 1.9)
    clothes, trousers = _color(rng, dom, "clothes"), _color(rng, dom, "clothes") * 0.7
    skin = _color(rng, dom, "skin")
    hip = ground + (0.35 if seated else 0.5) * h
    top = hip + 0.5 * h
    k = dom.thin_scale
    stride = 0.0 if seated else rng.uniform(0.0, 0.2) * k
    (l0, v0), (l1, _) = cam.project(x - 0.16 * k, hip, z), cam.project(x + 0.16 * k, hip, z)
    (f0, v1), (f1, _) = cam.project(x - (0.16 * k + stride), ground, z), cam.project(x + 0.16 * k + stride, ground, z)
    pad = max(0.0, 0.5 - (l1 - l0) / 2)  # keep far legs a pixel wide
    canvas.paint(canvas.polygon([(l0 - pad, v0), (l1 + pad, v0), (f1 + pad, v1), (f0 - pad, v1)]),
                 label, trousers)
    for s in (-1, 1):  # arms
        canvas.paint(_front_rect(canvas, cam, x + s * 0.22 * k - 0.05 * k, x + s * 0.22 * k + 0.05 * k, hip - 0.05,
                                 top - 0.12, z, 0.5), label, clothes * 0.9)
    canvas.paint(_front_rect(canvas, cam, x - 0.2 * k, x + 0.2 * k, hip, top - 0.08, z), label, clothes)
    cx, cy = cam.project(x, top + 0.03, z)
    r = cam.f * 0.11 * k / z
    canvas.paint(canvas.ellipse(cx, cy, r, r * 1.15), label, skin)
    if label == RIDER and dom.helmets:  # a helmet over the head's upper half
        canvas.paint(canvas.ellipse(cx, cy - r * 0.35, r * 1.1, r * 0.8), label, _color(rng, dom, "helmet"))


def _two_wheeler(canvas, cam, dom, rng, kind, x, z, crossing: bool) -> None:
    """A bicycle or motorcycle with its rider; crossing ones are seen from the side."""
    r = (0.35 if kind == BICYCLE else 0.32) * dom.wheel_scale
    frame = _color(rng, dom, "car" if kind == MOTORCYCLE else "pole")
    tyre = np.full(3, 0.1, dtype=np.float32)
    if crossing:
        for dx in (-0.55, 0.55):
            cx, cy = cam.project(x + dx, r, z)
            rr = cam.f * r / z
            canvas.paint(canvas.ellipse(cx, cy, rr, rr), kind, tyre)
            canvas.paint(canvas.ellipse(cx, cy, rr * 0.8, rr * 0.8), kind, frame * 0.8, alpha=0.4)
        body = (x - 0.5, x + 0.5, r, r + (0.25 if kind == BICYCLE else 0.45))
    else:
        k = dom.thin_scale
        half = (0.3 if kind == BICYCLE else 0.4) * k
        canvas.paint(_front_rect(canvas, cam, x - 0.06 * k, x + 0.06 * k, 0.0, 2 * r, z, 0.5), kind, tyre)
        body = (x - half, x + half, r, 2 * r + 0.15) if kind == MOTORCYCLE else (x - half, x + half, 2 * r, 2 * r + 0.15)
    canvas.paint(_front_rect(canvas, cam, body[0], body[1], body[2], body[3], z), kind, frame)
    _person(canvas, cam, dom, rng, x, z - 0.05, label=RIDER, ground=r * 1.2, seated=True)


def _street_things(canvas, cam, st: _Street, dom: Domain, rng) -> list:
    """Everything in front of the facades, as (depth, draw) to paint far to near."""
    far = min(st.end, dom.far)  # beyond, things are a pixel or two
    things = []

    def per(rate):  # how many along the visible street
        return rng.poisson(rate * far / 100)

    def add(z, fn, *args):
        things.append((z, lambda: fn(canvas, cam, dom, rng, *args)))

    for side in (-1, 1):
        for z in rng.uniform(3, far, per(dom.trees)):
            x = st.verge_start(side) + side * (st.verge[side > 0] / 2 if st.verge[side > 0] else -0.6)
            add(z, _tree, x, z)
        for z in rng.uniform(3, far, per(dom.poles)):
            add(z, _pole, st.curb(side) + side * 0.4, z, side)
        for z in np.sort(rng.uniform(4, far, per(dom.parked_cars))):
            kind = rng.choice([TRUCK, BUS]) if rng.random() < dom.heavy_share / 2 else CAR
            add(z, _vehicle, kind, st.curb(side) - side * 1.2, z, rng.random() < 0.5)
        for z in rng.uniform(3, dom.near_things, per(dom.pedestrians)):
            add(z, _person, st.curb(side) + side * rng.uniform(0.6, st.sidewalk - 0.3), z)
            if rng.random() < 0.3:  # people walk in groups
                add(z + 0.5, _person, st.curb(side) + side * rng.uniform(0.6, st.sidewalk - 0.3), z + 0.5)
    lanes = (st.center - st.road / 2, st.center + st.road / 2)
    for z in rng.uniform(6, far, per(dom.moving_cars)):
        lane = int(rng.integers(2))
        kind = rng.choice([TRUCK, BUS]) if rng.random() < dom.heavy_share else CAR
        add(z, _vehicle, kind, lanes[lane] + rng.uniform(-0.4, 0.4), z, lane == 0)
    if rng.random() < dom.train_prob:
        z = rng.uniform(10, 40)
        add(z, _vehicle, TRAIN, st.center + rng.uniform(-0.5, 0.5), z, rng.random() < 0.5)
    for kind, rate in ((BICYCLE, dom.cyclists), (MOTORCYCLE, dom.motorcyclists)):
        for _ in range(rng.poisson(rate)):
            z = rng.uniform(5, min(40.0, dom.near_things))
            side = int(rng.choice([-1, 1]))
            crossing = rng.random() < dom.crossing_share
            x = rng.uniform(-st.road, st.road) + st.center if crossing else st.curb(side) - side * 0.9
            add(z, _two_wheeler, kind, x, z, crossing)
    if dom.cyclists and rng.random() < dom.cyclists / 2:  # a bicycle parked on the sidewalk
        side, z = int(rng.choice([-1, 1])), rng.uniform(5, 30)
        x = st.curb(side) + side * rng.uniform(0.5, st.sidewalk)
        add(z, _parked_bicycle, x, z)
    return things


def _parked_bicycle(canvas, cam, dom, rng, x, z) -> None:
    frame, tyre = _color(rng, dom, "pole"), np.full(3, 0.1, dtype=np.float32)
    for dz in (-0.55, 0.55):  # parked along the curb: wheels one behind the other
        cx, cy = cam.project(x, 0.35, z + dz)
        rr = cam.f * 0.35 / (z + dz)
        canvas.paint(canvas.ellipse(cx, cy, rr * 0.35, rr), BICYCLE, tyre)
    canvas.paint(_side_quad(canvas, cam, x, z - 0.5, z + 0.5, 0.35, 0.8), BICYCLE, frame)


def _draw_ego_vehicle(canvas: _Canvas, rng) -> None:
    """The bonnet at the bottom of every Cityscapes frame (label 'ego vehicle', ignored)."""
    h, w = canvas.h, canvas.w
    cols = (np.arange(w) + 0.5 - w * rng.uniform(0.45, 0.55)) / (w / 2)
    top = h - h * rng.uniform(0.08, 0.12) * (1 - 0.5 * cols ** 2)
    rows = np.arange(h)[:, None] + 0.5
    mask = rows > top[None, :]
    canvas.label[mask] = EGO_VEHICLE
    shine = np.clip(1 - (rows - top[None, :]) / (h * 0.1), 0, 1)[..., None]
    canvas.rgb[mask] = (0.12 + 0.25 * shine * np.array([1.0, 1.0, 1.05], np.float32))[mask]


# --- appearance ------------------------------------------------------------------------------

def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = rng.random((h // cell + 2, w // cell + 2)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _develop(canvas: _Canvas, dom: Domain, rng: np.random.Generator, horizon: float) -> np.ndarray:
    """Linear canvas -> the domain's photograph: texture, grading, optics, sensor, codec."""
    h, w = canvas.h, canvas.w
    grain = rng.standard_normal((h, w)).astype(np.float32)
    blotch = _smooth_noise(rng, h, w, cell=6) - 0.5
    amp = dom.texture * _TEXTURE[canvas.label]
    rgb = canvas.rgb * (1 + amp * (0.7 * grain + 1.5 * blotch))[..., None]
    if dom.haze:
        rows = np.arange(h, dtype=np.float32)[:, None, None]
        weight = dom.haze * np.exp(-np.abs(rows - horizon) / (0.18 * h))
        rgb = rgb * (1 - weight) + _rgb(dom.haze_color) * weight
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    rgb = grey[..., None] + dom.saturation * (rgb - grey[..., None])
    rgb = rgb * np.asarray(dom.tint, np.float32) * rng.uniform(0.85, 1.1)  # per-frame exposure
    rgb = np.clip((rgb - 0.5) * dom.contrast + 0.5, 0, 1) ** dom.gamma
    if dom.vignette:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
        rgb = rgb * (1 - dom.vignette * r2 / 2)[..., None]
    image = Image.fromarray((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8))
    if dom.blur:
        image = image.filter(ImageFilter.GaussianBlur(dom.blur))
    out = np.asarray(image, dtype=np.float32)
    if dom.noise:
        out = out + rng.normal(0, dom.noise * 255, out.shape).astype(np.float32)
    image = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))
    if dom.jpeg_quality:
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=dom.jpeg_quality)
        image = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return np.asarray(image, dtype=np.uint8)


_OVERCAST_SKIES = (((150, 160, 175), (210, 214, 220)), ((180, 184, 190), (222, 224, 228)))


def _frame_look(dom: Domain, rng: np.random.Generator) -> Domain:
    """This frame's weather: the domain's look, overcast on some frames, graded and focused
    a little differently on each (draws nothing for a domain without weather)."""
    if not (dom.overcast or dom.look_jitter or dom.max_blur):
        return dom
    overcast = rng.random() < dom.overcast
    j = dom.look_jitter
    return replace(
        dom, sun=dom.sun and not overcast, skies=_OVERCAST_SKIES if overcast else dom.skies,
        saturation=dom.saturation * rng.uniform(1 - j, 1 + j) * (0.8 if overcast else 1.0),
        tint=tuple(float(t * rng.uniform(1 - j / 4, 1 + j / 4)) for t in dom.tint),
        contrast=dom.contrast * rng.uniform(1 - j / 2, 1 + j / 2),
        gamma=dom.gamma * rng.uniform(1 - j / 2, 1 + j / 2),
        blur=float(rng.uniform(0, dom.max_blur)))


def render(dom: Domain, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One scene: RGB image (H, W, 3) uint8 and Cityscapes label ids (H, W) uint8."""
    dom = _frame_look(dom, rng)
    w, h = dom.size
    cam = _Camera(f=dom.focal * w, cx=w * rng.uniform(0.44, 0.56), horizon=h * rng.uniform(*dom.horizon),
                  height=dom.camera_height)
    canvas = _Canvas(w, h)
    street = _sample_street(rng, dom)
    _draw_sky(canvas, cam, dom, rng)
    _draw_ground(canvas, cam, street, dom, rng)
    _draw_facades(canvas, cam, street, dom, rng)
    _draw_barriers(canvas, cam, street, dom, rng)
    things = _street_things(canvas, cam, street, dom, rng)
    for _, draw in sorted(things, key=lambda t: -t[0]):
        draw()
    if dom.ego_vehicle:
        _draw_ego_vehicle(canvas, rng)
    return _develop(canvas, dom, rng, cam.horizon), canvas.label


# --- files -----------------------------------------------------------------------------------

def source_paths(out: str, index: int, folder: str = "source") -> tuple[str, str]:
    """Image and label path of source frame `index` (0-based; files count from 00001);
    folder "source_val" holds the held-out source frames, in the same GTA5 layout."""
    name = f"{index + 1:05d}.png"
    return storage.join(out, folder, "images", name), storage.join(out, folder, "labels", name)


def target_paths(out: str, split: str, index: int) -> tuple[str, str]:
    """Image and label path of target frame `index` of `split` ("train" or "val")."""
    cities = {"train": TRAIN_CITIES, "val": VAL_CITIES}[split]
    city = cities[index % len(cities)]
    stem = f"{city}_000000_{index:06d}"
    return (storage.join(out, "target", "leftImg8bit", split, city, f"{stem}_leftImg8bit.png"),
            storage.join(out, "target", "gtFine", split, city, f"{stem}_gtFine_labelIds.png"))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _label_png(ids: np.ndarray, palette: bool) -> bytes:
    """GTA5 ships palette PNGs, Cityscapes 8-bit grey ones; both hold label ids as values."""
    image = Image.fromarray(ids)
    if palette:  # putpalette turns the "L" image into "P", keeping its values
        image.putpalette(colorize(CITYSCAPES_ID_TO_TRAIN[np.arange(256, dtype=np.uint8)]).tobytes())
    return _png(image)


LOOK_KEYS = ("saturation", "tint", "contrast", "gamma", "blur", "noise", "vignette", "jpeg_quality",
             "texture", "haze", "haze_color", "window", "colors")


def with_look(dom: Domain, **look) -> Domain:
    """``dom`` with some of its look replaced (``LOOK_KEYS``): the knobs for drawing a target
    the defaults never use (stronger haze, colour casts, blur, noise, compression)."""
    unknown = sorted(set(look) - set(LOOK_KEYS))
    if unknown:
        raise ValueError(f"unknown look setting(s) {', '.join(unknown)}: choose from {', '.join(LOOK_KEYS)}")
    if "colors" in look:  # materials: {"road": [[r, g, b], ...], ...} replaces those keys' palettes
        unknown = sorted(set(look["colors"]) - set(dom.colors))
        if unknown:
            raise ValueError(f"unknown material(s) {', '.join(unknown)} in colors: choose from {', '.join(dom.colors)}")
        palettes = {k: tuple(tuple(int(x) for x in c) for c in v) for k, v in look["colors"].items()}
        if any(len(c) != 3 or not all(0 <= x <= 255 for x in c) for v in palettes.values() for c in v) or \
                not all(palettes.values()):
            raise ValueError(f"colors: every material needs one or more [R, G, B] in 0..255, got {look['colors']}")
        look["colors"] = {**dom.colors, **palettes}
    for key in ("tint", "haze_color", "window"):
        if key in look:
            look[key] = tuple(look[key])
            if len(look[key]) != 3:
                raise ValueError(f"{key} needs three values (R, G, B), got {look[key]}")
    if "jpeg_quality" in look and look["jpeg_quality"] is not None:
        look["jpeg_quality"] = int(look["jpeg_quality"])
        if not 1 <= look["jpeg_quality"] <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95 (or null for none), got {look['jpeg_quality']}")
    for key in ("blur", "noise", "vignette", "texture", "haze"):
        if key in look and not look[key] >= 0:
            raise ValueError(f"{key} must be >= 0, got {look[key]}")
    if "haze" in look and look["haze"] > 1:
        raise ValueError(f"haze must be in [0, 1], got {look['haze']}")
    return replace(dom, **look)


def map_frames(fn, tasks: list, workers: int | None = None, chunksize: int = 16) -> list:
    """``[fn(t) for t in tasks]`` over worker processes (default: the cores, at most 8); each
    frame seeds its own generator, so the results do not depend on the number of workers."""
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1:
        return [fn(t) for t in tasks]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, tasks, chunksize=chunksize))


def _make_one(task: tuple[str, int, int, str, Domain]) -> np.ndarray:
    """Render and write one frame; returns its pixel count per train id (255 = ignored)."""
    set_name, index, seed, out, dom = task
    rng = np.random.default_rng([seed, _SETS.index(set_name), index])
    image, ids = render(dom, rng)
    if set_name.startswith("source"):
        image_path, label_path = source_paths(out, index, set_name)
    else:
        image_path, label_path = target_paths(out, set_name.removeprefix("target_"), index)
    storage.write_bytes(image_path, _png(Image.fromarray(image)))
    storage.write_bytes(label_path, _label_png(ids, palette=set_name.startswith("source")))
    return np.bincount(CITYSCAPES_ID_TO_TRAIN[ids].ravel(), minlength=256)


def generate(out: str, seed: int = 0, num_source: int = 400, num_target_train: int = 300,
             num_target_val: int = 100, workers: int | None = None, num_source_val: int = 0,
             target_look: dict | None = None) -> dict[str, np.ndarray]:
    """Write the sets under `out` (source, its held-out source_val, target train and val);
    returns pixel counts per train id (256 bins) per set. ``target_look``: settings of
    ``with_look`` for the target (train and val alike)."""
    storage.check_uri(out)
    counts = {"source": num_source, "target_train": num_target_train, "target_val": num_target_val,
              "source_val": num_source_val}
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"--num-{name.replace('_', '-')} must be >= 0, got {n}")
    target = with_look(TARGET, **(target_look or {}))
    tasks = [(name, i, seed, out, SOURCE if name.startswith("source") else target)
             for name, n in counts.items() for i in range(n)]
    results = map_frames(_make_one, tasks, workers, chunksize=16)
    totals = {name: np.zeros(256, dtype=np.int64) for name in counts}
    for (name, *_), hist in zip(tasks, results):
        totals[name] += hist
    return totals


def read_pair(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """An image (H, W, 3) and its label ids (H, W) as written by `generate`."""
    image = Image.open(io.BytesIO(storage.read_bytes(image_path))).convert("RGB")
    label = Image.open(io.BytesIO(storage.read_bytes(label_path)))
    return np.asarray(image), np.asarray(label)


def write_preview(out: str, rows: int = 4) -> str:
    """A contact sheet of the first `rows` source and target-val frames: `<out>/preview.png`."""
    from pipeline.visualize import contact_sheet, save_png

    def section(paths):
        pairs = [read_pair(*p) for p in paths]
        return [(image, colorize(CITYSCAPES_ID_TO_TRAIN[ids])) for image, ids in pairs]

    source = section(source_paths(out, i) for i in range(rows))
    target = section(target_paths(out, "val", i) for i in range(rows))
    sheet = contact_sheet(
        [(f"source (GTA5-like, labelled) {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]}", source),
         (f"target val (Cityscapes-like) {TARGET_SIZE[0]}x{TARGET_SIZE[1]}", target)],
        title=f"IAST built-in benchmark: {out}")
    path = storage.join(out, "preview.png")
    save_png(sheet, path)
    return path
