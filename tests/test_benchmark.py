import json
import runpy
from pathlib import Path

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from PIL import Image

from pipeline.data import benchmark
from pipeline.labels import CITYSCAPES_ID_TO_TRAIN, NUM_CLASSES, train_id
from pipeline.visualize import GAP

JOB = Path(__file__).resolve().parents[1] / "jobs" / "make_benchmark.py"
VALID_IDS = {lab.id for lab in cityscapes_labels if lab.id >= 0}


def _load(path) -> Image.Image:
    """The image, read and its file closed (Image.open alone keeps the file open until then)."""
    with Image.open(path) as image:
        image.load()
    return image


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _shares(dom: benchmark.Domain, n: int = 24) -> np.ndarray:
    counts = np.zeros(256)
    for i in range(n):
        _, ids = benchmark.render(dom, np.random.default_rng([7, i]))
        counts += np.bincount(CITYSCAPES_ID_TO_TRAIN[ids].ravel(), minlength=256)
    return counts[:NUM_CLASSES] / counts[:NUM_CLASSES].sum()


def test_same_seed_gives_identical_files_whatever_the_workers(tmp_path):
    for name, seed, workers in (("a", 3, 1), ("b", 3, 2), ("c", 4, 1)):
        benchmark.generate(str(tmp_path / name), seed=seed, num_source=3, num_target_train=2,
                           num_target_val=2, workers=workers)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 2 * (3 + 2 + 2)
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if "images" in k or "leftImg8bit" in k)


def test_layout_sizes_and_label_ids(tmp_path):
    counts = benchmark.generate(str(tmp_path), seed=0, num_source=2, num_target_train=3,
                                num_target_val=3, workers=1)
    names = set(_files(tmp_path))
    assert {"source/images/00001.png", "source/labels/00002.png"} <= names
    assert "target/leftImg8bit/train/aachen/aachen_000000_000000_leftImg8bit.png" in names
    assert "target/gtFine/train/zurich/zurich_000000_000002_gtFine_labelIds.png" in names
    assert "target/leftImg8bit/val/lindau/lindau_000000_000001_leftImg8bit.png" in names
    assert "target/gtFine/val/munster/munster_000000_000002_gtFine_labelIds.png" in names

    for i in range(2):
        image, label = (_load(p) for p in benchmark.source_paths(str(tmp_path), i))
        assert (image.mode, image.size) == ("RGB", benchmark.SOURCE_SIZE)
        assert (label.mode, label.size) == ("P", benchmark.SOURCE_SIZE)  # GTA5 ships palette PNGs
        ids = np.asarray(label)
        assert set(np.unique(ids)) <= VALID_IDS
        assert benchmark.EGO_VEHICLE not in ids
    for split in ("train", "val"):
        for i in range(3):
            image, label = (_load(p) for p in benchmark.target_paths(str(tmp_path), split, i))
            assert (image.mode, image.size) == ("RGB", benchmark.TARGET_SIZE)
            assert (label.mode, label.size) == ("L", benchmark.TARGET_SIZE)
            ids = np.asarray(label)
            assert set(np.unique(ids)) <= VALID_IDS
            assert ids[-1, benchmark.TARGET_SIZE[0] // 2] == benchmark.EGO_VEHICLE  # the bonnet, ignored
            assert benchmark.ROAD in ids

    # Label ids, not train ids: road is written as 7, and train ids 0..18 would include 0..6.
    source_ids = np.asarray(Image.open(benchmark.source_paths(str(tmp_path), 0)[1]))
    assert benchmark.ROAD == 7 and (source_ids == 7).mean() > 0.1
    assert counts["source"].sum() == 2 * np.prod(benchmark.SOURCE_SIZE)
    assert counts["target_val"].sum() == 3 * np.prod(benchmark.TARGET_SIZE)


def test_class_frequencies_differ_between_domains():
    src, tgt = _shares(benchmark.SOURCE), _shares(benchmark.TARGET)
    for name in ("person", "vegetation", "fence", "pole"):
        assert tgt[train_id(name)] > 1.5 * src[train_id(name)], name
    assert tgt[train_id("bicycle")] > src[train_id("bicycle")]  # both domains draw enough to learn
    for name in ("truck", "bus", "motorcycle"):
        assert src[train_id(name)] > 1.5 * tgt[train_id(name)], name
    vehicles = [train_id(name) for name in ("car", "truck", "bus")]
    assert src[vehicles].sum() > 1.3 * tgt[vehicles].sum()
    assert 0.5 * np.abs(src - tgt).sum() > 0.15  # total variation between the class distributions


def _stats(dom: benchmark.Domain, n: int = 12) -> tuple[float, float, float]:
    """Mean saturation, colour cast (red minus blue) and sharpness (|Laplacian| on label
    boundaries)."""
    saturation, cast, sharpness = [], [], []
    for i in range(n):
        image, ids = benchmark.render(dom, np.random.default_rng([11, i]))
        rgb = image.astype(np.float32)
        saturation.append(np.mean(rgb.max(2) - rgb.min(2)))
        cast.append(np.mean(rgb[..., 0] - rgb[..., 2]))
        g, ids = rgb.mean(2), ids[1:-1, 1:-1]
        lap = np.abs(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
        boundary = (ids != np.roll(ids, 1, 0)) | (ids != np.roll(ids, 1, 1))
        sharpness.append(lap[boundary].mean())
    return float(np.mean(saturation)), float(np.mean(cast)), float(np.mean(sharpness))


def test_appearance_differs_between_domains():
    src_sat, src_cast, src_sharp = _stats(benchmark.SOURCE)
    tgt_sat, tgt_cast, tgt_sharp = _stats(benchmark.TARGET)
    assert src_sat > 1.5 * tgt_sat  # GTA5-like: saturated; Cityscapes-like: dull
    assert src_cast > tgt_cast + 5  # warm sunlight against a cool overcast
    assert src_sharp > 1.3 * tgt_sharp  # a render, crisp but for some soft frames, against a blurred JPEG


def test_source_weather_varies_per_frame_and_target_has_none():
    rng = np.random.default_rng(5)
    assert benchmark._frame_look(benchmark.TARGET, rng) is benchmark.TARGET
    assert rng.random() == np.random.default_rng(5).random()  # the target's frames draw nothing extra
    looks = [benchmark._frame_look(benchmark.SOURCE, np.random.default_rng([3, i])) for i in range(400)]
    overcast = np.mean([not look.sun for look in looks])
    assert 0.25 < overcast < 0.45  # SOURCE.overcast = 0.35: no sun, no hard shadows on those frames
    assert all(look.skies == benchmark._OVERCAST_SKIES for look in looks if not look.sun)
    saturations = np.array([look.saturation for look in looks])
    assert saturations.std() > 0.1 and saturations.min() < benchmark.SOURCE.saturation < saturations.max()
    blurs = [look.blur for look in looks]
    assert 0.0 <= min(blurs) < 0.1 and 0.7 < max(blurs) <= benchmark.SOURCE.max_blur


def test_rejects_negative_counts(tmp_path):
    with pytest.raises(ValueError, match="num-source"):
        benchmark.generate(str(tmp_path), num_source=-1, num_target_train=0, num_target_val=0, workers=1)


def test_job_writes_benchmark_and_preview(tmp_path, capsys):
    main = runpy.run_path(str(JOB))["main"]
    out = tmp_path / "bench"
    assert main(["--out", str(out), "--seed", "1", "--num-source", "2", "--num-target-train", "1",
                 "--num-target-val", "2", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "preview.png" in printed and "target val" in printed
    sheet = np.asarray(Image.open(out / "preview.png"))
    # Two columns (image | coloured label) of 256 pixels on a white grid.
    assert sheet.shape[1] == 2 * 256 + 3 * GAP
    assert sheet.shape[0] > 2 * (benchmark.SOURCE_SIZE[1] + benchmark.TARGET_SIZE[1])
    # The first source frame appears unchanged in the left column.
    first = np.asarray(Image.open(benchmark.source_paths(str(out), 0)[0]))
    rows = [y for y in range(sheet.shape[0] - first.shape[0])
            if np.array_equal(sheet[y, GAP:GAP + 256], first[0])]
    assert rows and np.array_equal(sheet[rows[0]:rows[0] + first.shape[0], GAP:GAP + 256], first)


def test_held_out_source_frames_are_new_frames_in_the_gta5_layout(tmp_path):
    benchmark.generate(str(tmp_path / "a"), seed=5, num_source=3, num_target_train=1, num_target_val=1,
                       num_source_val=2, workers=1)
    benchmark.generate(str(tmp_path / "b"), seed=5, num_source=3, num_target_train=1, num_target_val=1,
                       num_source_val=2, workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b  # deterministic whatever the workers
    held_out = {k for k in a if k.startswith("source_val/")}
    assert held_out == {f"source_val/{d}/0000{i}.png" for d in ("images", "labels") for i in (1, 2)}
    train_images = {a[k] for k in a if k.startswith("source/images/")}
    assert all(a[f"source_val/images/0000{i}.png"] not in train_images for i in (1, 2))
    for i in range(2):
        image, label = (_load(p) for p in benchmark.source_paths(str(tmp_path / "a"), i, "source_val"))
        assert (image.mode, image.size) == ("RGB", benchmark.SOURCE_SIZE)
        assert (label.mode, label.size) == ("P", benchmark.SOURCE_SIZE)
        ids = np.asarray(label)
        assert set(np.unique(ids)) <= VALID_IDS and benchmark.EGO_VEHICLE not in ids
    # The source frames themselves do not depend on how many are held out.
    benchmark.generate(str(tmp_path / "c"), seed=5, num_source=3, num_target_train=1, num_target_val=1,
                       num_source_val=0, workers=1)
    c = _files(tmp_path / "c")
    assert {k: v for k, v in a.items() if not k.startswith("source_val/")} == c


def test_target_look_knobs_change_the_pixels_not_the_labels(tmp_path):
    rng = lambda: np.random.default_rng([9, 1])  # noqa: E731
    base_image, base_ids = benchmark.render(benchmark.TARGET, rng())
    horizon_rows = slice(int(0.38 * base_ids.shape[0]), int(0.5 * base_ids.shape[0]))
    looks = {
        "haze": benchmark.with_look(benchmark.TARGET, haze=0.6, haze_color=[230, 230, 235]),
        "cast": benchmark.with_look(benchmark.TARGET, tint=[1.15, 1.0, 0.8]),
        "blur": benchmark.with_look(benchmark.TARGET, blur=2.0),
        "noise": benchmark.with_look(benchmark.TARGET, noise=0.06),
        "jpeg": benchmark.with_look(benchmark.TARGET, jpeg_quality=10),
    }
    images = {}
    for name, dom in looks.items():
        images[name], ids = benchmark.render(dom, rng())
        assert np.array_equal(ids, base_ids), name  # the same scene, only its look differs
        assert not np.array_equal(images[name], base_image), name
    base = base_image.astype(float)
    # Haze lifts and greys the far rows (around the horizon) more than the near ones.
    lift = images["haze"].astype(float).mean(axis=(1, 2)) - base.mean(axis=(1, 2))
    assert lift[horizon_rows].mean() > 2 * lift[-10:].mean() > 0
    # A warm cast: more red, less blue.
    cast = images["cast"].astype(float)
    assert cast[..., 0].mean() > base[..., 0].mean() + 5 and cast[..., 2].mean() < base[..., 2].mean() - 5
    # Blur removes detail, noise and strong compression add it.
    detail = lambda im: np.abs(np.diff(im.astype(float), axis=1)).mean()  # noqa: E731
    assert detail(images["blur"]) < 0.8 * detail(base_image)
    assert detail(images["noise"]) > 1.2 * detail(base_image)
    assert np.abs(images["jpeg"].astype(float) - base).mean() > 2


def test_target_look_rejects_unknown_or_bad_settings():
    with pytest.raises(ValueError, match="unknown look setting.*fog"):
        benchmark.with_look(benchmark.TARGET, fog=0.3)
    with pytest.raises(ValueError, match="tint needs three values"):
        benchmark.with_look(benchmark.TARGET, tint=[1.0, 1.0])
    with pytest.raises(ValueError, match="jpeg_quality must be in 1..95"):
        benchmark.with_look(benchmark.TARGET, jpeg_quality=0)
    with pytest.raises(ValueError, match="haze must be in"):
        benchmark.with_look(benchmark.TARGET, haze=1.5)


def test_job_draws_a_target_with_another_look(tmp_path, capsys):
    main = runpy.run_path(str(JOB))["main"]
    args = ["--seed", "2", "--num-source", "1", "--num-target-train", "1", "--num-target-val", "1",
            "--num-source-val", "1", "--workers", "1"]
    assert main(["--out", str(tmp_path / "plain"), *args]) == 0
    assert main(["--out", str(tmp_path / "hazy"), *args, "--target-look", "haze=0.5", "tint=[1.1,1.0,0.9]"]) == 0
    plain, hazy = _files(tmp_path / "plain"), _files(tmp_path / "hazy")
    assert json.loads(hazy["target_look.json"]) == {"haze": 0.5, "tint": [1.1, 1.0, 0.9]}
    assert json.loads(plain["target_look.json"]) == {}
    for key in plain:
        if key.startswith("target/leftImg8bit"):
            assert plain[key] != hazy[key]
        elif key.startswith(("source", "target/gtFine")):
            assert plain[key] == hazy[key], key  # source and labels untouched
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "bad"), *args, "--target-look", "fog=1"])
    assert exit_info.value.code == 2
    assert "unknown look setting" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything is written
