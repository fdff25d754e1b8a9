import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import (
    COLOUR_OPS,
    GTA5_CROP_HEIGHTS,
    HardClassPaste,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    FlipColourCrop,
    RandomBrightnessContrast,
    RandomHorizontalFlip,
    RandomSizedCrop,
    StrongColour,
    eval_transform,
    hard_class_donors,
    normalize,
    train_transform,
    weak_strong_transform,
)


def _sample(height, width, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 5, 18, 255], dtype=np.uint8), (height, width))
    return image, label


def _coordinates(height, width):
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return (rows * 1000 + cols).astype(np.int32)


def _crop_box(coords_out):
    """Rows and columns of the input that a nearest-resized coordinate map came from."""
    return np.unique(coords_out // 1000), np.unique(coords_out % 1000)


def test_train_transform_output_types_and_shapes():
    image, label = _sample(1052, 1914)  # GTA5 frame size
    out_image, out_label = train_transform(GTA5_CROP_HEIGHTS)(image, label, np.random.default_rng(0))
    # uint8 through the DataLoader (model_input normalises on the device)
    assert out_image.dtype == torch.uint8 and out_image.shape == (512, 1024, 3)
    assert out_label.dtype == torch.uint8 and out_label.shape == (512, 1024)
    assert set(torch.unique(out_label).tolist()) <= {0, 1, 5, 18, 255}


def test_crop_has_aspect_two_and_height_in_range():
    height_range = (10, 40)
    crop = RandomSizedCrop(height_range, output_size=(64, 128))  # upsampling: every crop row/col survives
    coords = _coordinates(60, 200)
    image = np.zeros((60, 200, 3), np.uint8)
    heights = set()
    for seed in range(30):
        _, out = crop(image, coords, np.random.default_rng(seed))
        rows, cols = _crop_box(out)
        crop_h, crop_w = len(rows), len(cols)
        assert height_range[0] <= crop_h <= height_range[1]
        assert crop_w == 2 * crop_h
        # contiguous window, then nearest: output (r, c) is input (top + r·h//64, left + c·w//128)
        assert np.array_equal(rows, np.arange(rows[0], rows[0] + crop_h))
        assert np.array_equal(cols, np.arange(cols[0], cols[0] + crop_w))
        expected = coords[rows[0] + np.arange(64) * crop_h // 64][:, cols[0] + np.arange(128) * crop_w // 128]
        assert np.array_equal(out, expected)
        heights.add(crop_h)
    assert len(heights) > 10


def test_crop_height_range_includes_both_ends():
    crop = RandomSizedCrop((10, 12), output_size=(16, 32))
    coords = _coordinates(40, 100)
    rng = np.random.default_rng(0)
    heights = {len(_crop_box(crop(np.zeros((40, 100, 3), np.uint8), coords, rng)[1])[0]) for _ in range(200)}
    assert heights == {10, 11, 12}


def test_crop_larger_than_image_is_clamped_to_fit():
    crop = RandomSizedCrop((341, 950), output_size=(64, 128))
    _, out = crop(np.zeros((50, 60, 3), np.uint8), _coordinates(50, 60), np.random.default_rng(0))
    rows, cols = _crop_box(out)
    assert (len(rows), len(cols)) == (30, 60)  # the largest 1:2 window of a 50x60 image


def test_crop_keeps_image_and_label_aligned():
    # 8x8 blocks: label = block id, image = 10·label in every channel.
    blocks = np.kron(np.arange(48).reshape(6, 8) % 19, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    image = np.repeat((blocks * 10)[..., None], 3, axis=2)
    transform = Compose([RandomHorizontalFlip(p=0.5), RandomSizedCrop((16, 24), output_size=(64, 128))])
    for seed in range(10):
        out_image, out_label = transform(image, blocks, np.random.default_rng(seed))
        # away from block borders bilinear interpolation reproduces the block value
        inner = np.ones_like(out_label, dtype=bool)
        for dr in (-3, 0, 3):
            for dc in (-3, 0, 3):
                inner &= np.roll(out_label, (dr, dc), axis=(0, 1)) == out_label
        inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
        assert inner.sum() > 1000
        assert np.array_equal(out_image[inner][:, 0], out_label[inner].astype(np.uint8) * 10)


@pytest.mark.parametrize("colour", [True, False])
def test_flip_colour_crop_equals_the_three_steps_on_the_whole_frame_bit_for_bit(colour):
    rng = np.random.default_rng(7)
    steps = [RandomHorizontalFlip(p=0.5), *([RandomBrightnessContrast(p=0.6)] if colour else []),
             RandomSizedCrop((20, 61), output_size=(24, 48))]
    whole_frame = Compose(steps)
    crop_first = Compose([FlipColourCrop(steps[0], steps[-1], steps[1] if colour else None)])
    flips = colour_changes = 0
    for seed in range(40):
        h, w = int(rng.integers(30, 70)), int(rng.integers(60, 130))
        image, label = rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, 19, (h, w), dtype=np.uint8)
        image.flags.writeable = False  # as a cached frame
        a, b = whole_frame(image, label, np.random.default_rng(seed)), crop_first(image, label, np.random.default_rng(seed))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]), seed
        flips += RandomHorizontalFlip(p=0.5).draw(np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        draws.random()
        colour_changes += colour and draws.random() < 0.6
    assert 10 < flips < 30 and (not colour or 10 < colour_changes < 35)  # both branches were taken


def test_image_resize_is_bilinear_with_half_pixel_centres():
    crop = RandomSizedCrop((2, 2), output_size=(4, 8))
    ramp = np.array([[0, 40, 80, 120]], dtype=np.uint8).repeat(2, axis=0)  # 2x4, crop covers it all
    image = np.repeat(ramp[..., None], 3, axis=2)
    out, _ = crop(image, np.zeros((2, 4), np.uint8), np.random.default_rng(0))
    # output column c samples x = (c + 0.5)/2 - 0.5, clamped to the border
    assert out[0, :, 0].tolist() == [0, 10, 30, 50, 70, 90, 110, 120]
    assert np.all(out == out[:1])


def test_flip_flips_image_and_label_together():
    image, label = _sample(5, 7)
    flipped_image, flipped_label = RandomHorizontalFlip(p=1.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    same_image, same_label = RandomHorizontalFlip(p=0.0)(image, label, np.random.default_rng(0))
    assert np.array_equal(same_image, image) and np.array_equal(same_label, label)
    flips = [
        np.array_equal(RandomHorizontalFlip()(image, label, np.random.default_rng(s))[1], label[:, ::-1])
        for s in range(200)
    ]
    assert 60 < sum(flips) < 140


def test_brightness_contrast_matches_albumentations_formula():
    image, label = _sample(6, 8)
    seed = 3
    out_image, out_label = RandomBrightnessContrast(p=1.0)(image, label, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    rng.random()  # the apply-or-not draw
    alpha = 1.0 + rng.uniform(-0.2, 0.2)
    beta = rng.uniform(-0.2, 0.2)
    expected = np.floor(np.clip(image.astype(np.float64) * alpha + beta * 255, 0, 255))
    assert np.abs(out_image.astype(np.int64) - expected).max() <= 1  # float32 LUT vs float64
    assert out_label is label
    assert not np.array_equal(out_image, image)


def test_brightness_contrast_limits_and_probability():
    image = np.full((1, 1, 3), 128, np.uint8)
    label = np.zeros((1, 1), np.uint8)
    values, changed = [], 0
    for seed in range(300):
        out, _ = RandomBrightnessContrast()(image, label, np.random.default_rng(seed))
        values.append(int(out[0, 0, 0]))
        changed += out[0, 0, 0] != 128
    assert min(values) >= int(128 * 0.8 - 0.2 * 255) and max(values) <= int(128 * 1.2 + 0.2 * 255)
    assert 60 < changed < 130  # p = 0.3


def test_same_seed_same_output_different_seed_different_output():
    image, label = _sample(120, 300)
    transform = train_transform((40, 100), output_size=(32, 64))
    a = transform(image, label, np.random.default_rng(7))
    b = transform(image, label, np.random.default_rng(7))
    c = transform(image, label, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_normalize():
    mean_image = np.broadcast_to(np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8), (2, 3, 3))
    out = normalize(mean_image)
    assert out.shape == (3, 2, 3) and out.dtype == torch.float32
    assert out.abs().max() < 0.01
    white = normalize(np.full((2, 3, 3), 255, np.uint8))
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(white[:, 0, 0], expected)
    # channel order is kept: red goes to channel 0
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert normalize(red)[0, 0, 0] > 2 and normalize(red)[1, 0, 0] < -2


def test_normalize_batches_tensors_and_read_only_arrays(recwarn):
    image, _ = _sample(4, 5)
    batch = torch.from_numpy(np.stack([image, image[::-1].copy()]))
    out = normalize(batch)
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out[0], normalize(image))
    read_only = image.copy()
    read_only.flags.writeable = False  # like np.asarray(PIL.Image)
    torch.testing.assert_close(normalize(read_only), normalize(image))
    assert not [w for w in recwarn if "not writable" in str(w.message)]
    with pytest.raises(ValueError, match="uint8 RGB"):
        normalize(image[..., :2])


def test_eval_transform_only_normalizes():
    image, label = _sample(7, 9)
    out_image, out_label = eval_transform()(image, label, np.random.default_rng(0))
    torch.testing.assert_close(out_image, normalize(image))
    assert torch.equal(out_label, torch.from_numpy(label.astype(np.int64)))


def test_bad_inputs_are_rejected():
    image, label = _sample(4, 6)
    transform = eval_transform()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="uint8"):
        transform(image.astype(np.float32), label, rng)
    with pytest.raises(ValueError, match="does not match"):
        transform(image, label[:3], rng)
    with pytest.raises(ValueError, match="integer"):
        transform(image, label.astype(np.float32), rng)
    with pytest.raises(ValueError, match="height_range"):
        RandomSizedCrop((500, 400))


@pytest.mark.parametrize("name", sorted(COLOUR_OPS))
def test_each_colour_op_keeps_shape_and_changes_colours_only(name):
    image, _ = _sample(40, 60)
    image[:20] = 200  # a flat region as well as noise
    out = np.asarray(COLOUR_OPS[name](Image.fromarray(image), np.random.default_rng(3)))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image)  # every op does something to this image
    if name != "blur":  # the others are per-pixel maps: equal colours stay equal
        assert len(np.unique(out[:20].reshape(-1, 3), axis=0)) == 1


def test_strong_colour_applies_num_ops_each_with_probability_p():
    image, _ = _sample(16, 16)
    never = StrongColour(num_ops=3, p=0.0)
    assert np.array_equal(never(image, np.random.default_rng(0)), image)
    changed = [not np.array_equal(StrongColour(3, 0.5)(image, np.random.default_rng(s)), image) for s in range(100)]
    assert 75 < sum(changed) < 100  # unchanged only when none of the 3 draws fires (1/8)
    with pytest.raises(ValueError, match="num_ops"):
        StrongColour(num_ops=9)


def test_weak_and_strong_views_share_geometry_and_labels():
    # 8x8 blocks: label = block id, image = 10·label in every channel (as in the crop test).
    blocks = np.kron(np.arange(48).reshape(6, 8) % 19, np.ones((8, 8), dtype=np.int64)).astype(np.uint8)
    image = np.repeat((blocks * 10)[..., None], 3, axis=2)
    transform = weak_strong_transform((16, 24), output_size=(64, 128))
    differs = 0
    for seed in range(10):
        weak, strong, label = transform(image, blocks, np.random.default_rng(seed))
        assert weak.shape == strong.shape == (64, 128, 3) and label.shape == (64, 128)
        assert weak.dtype == strong.dtype == label.dtype == torch.uint8
        weak_u8, strong_u8 = weak.numpy(), strong.numpy()
        # the weak view is the plain crop of the image: its grey level names the label
        inner = np.ones(label.shape, dtype=bool)
        for dr in (-3, 0, 3):
            for dc in (-3, 0, 3):
                inner &= np.roll(label.numpy(), (dr, dc), axis=(0, 1)) == label.numpy()
        inner[:3], inner[-3:], inner[:, :3], inner[:, -3:] = False, False, False, False
        assert np.array_equal(weak_u8[inner][:, 0], label.numpy()[inner].astype(np.uint8) * 10)
        # the strong view is the same crop: the block edges are where the weak view's are
        # (blurred at most), so within a block its colour is nearly flat
        for block in np.unique(label.numpy()[inner]):
            pixels = strong_u8[inner & (label.numpy() == block)].astype(int)
            assert np.ptp(pixels, axis=0).max() <= 40
        differs += not np.array_equal(weak_u8, strong_u8)
    assert differs >= 7
    a = transform(image, blocks, np.random.default_rng(1))
    b = transform(image, blocks, np.random.default_rng(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_hard_class_donors_drop_the_smallest_tenth():
    kept = np.zeros((25, 3), np.int64)
    kept[:20, 1] = np.arange(1, 21)  # images 0..19 keep 1..20 pixels of class 1
    kept[24, 2] = 5
    donors = hard_class_donors(kept, [0, 1, 2])
    assert donors[0].tolist() == []
    assert donors[1].tolist() == list(range(2, 20))  # the 2 smallest of 20 dropped
    assert donors[2].tolist() == [24]  # 10% of one image is none


def test_hard_class_paste_copies_every_hard_pixel_of_the_donor():
    donor_label = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    donor_image = np.full((2, 3, 3), 200, np.uint8)
    loaded = []

    def load(i):
        loaded.append(i)
        return donor_image, donor_label

    # class 3 has no donor: only class 1 can be drawn; hard = {1, 3}, so 1s and 3s are pasted
    paste = HardClassPaste(hard=[1, 3], probs=[0.5, 0.5], donors={1: [7], 3: []}, load_donor=load)
    image, label = np.zeros((2, 3, 3), np.uint8), np.full((2, 3), 255, np.uint8)
    out_image, out_label = paste(image, label, np.random.default_rng(0))
    assert loaded == [7]
    assert out_label.tolist() == [[255, 1, 255], [3, 255, 1]]
    assert (out_image[out_label != 255] == 200).all() and (out_image[out_label == 255] == 0).all()
    assert (image == 0).all() and (label == 255).all()  # the inputs are not modified
    with pytest.raises(ValueError, match="cannot be pasted"):
        paste(np.zeros((4, 3, 3), np.uint8), np.zeros((4, 3), np.uint8), np.random.default_rng(0))
    nothing = HardClassPaste(hard=[3], probs=[1.0], donors={3: []}, load_donor=load)  # no class has a donor
    same_image, same_label = nothing(image, label, np.random.default_rng(0))
    assert same_image is image and same_label is label and loaded == [7, 7]  # no donor loaded this time


def test_hard_class_paste_draws_classes_by_their_probabilities():
    labels = {0: np.full((1, 1), 4, np.uint8), 1: np.full((1, 1), 5, np.uint8)}
    paste = HardClassPaste([4, 5], [0.8, 0.2], {4: [0], 5: [1]},
                           lambda i: (np.full((1, 1, 3), i, np.uint8), labels[i]))
    rng = np.random.default_rng(0)
    drawn = [int(paste(np.zeros((1, 1, 3), np.uint8), np.zeros((1, 1), np.uint8), rng)[1][0, 0]) for _ in range(500)]
    assert 350 < drawn.count(4) < 450
