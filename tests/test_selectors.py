"""The selectors against straightforward transcriptions of the released loops (IAST, CBST)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.selectors import (
    CODE_VALUES,
    IAS,
    ClassConfidence,
    NUM_CODES,
    _cbst_select_torch,
    _float16_codes,
    _histogram_torch,
    _percentile_with_extra,
    _select_torch,
    cbst_portion,
    cbst_select,
    cbst_thresholds,
    confidence_histogram,
    constant_select,
    dense_histogram,
    hard_classes,
    ias_select_sequence,
    select,
    sparse_histogram,
    spatial_prior,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- transcriptions of the released code -------------------------------------------------


def released_ias(instances, alpha, beta, gamma, n_class):
    """IAST's sl_trainer loop: an instance = a batch (N, H, W) of conf (float32) and labels."""
    cls_thresh = np.ones(n_class) * 0.9
    results = []
    for logits_pred, label_pred in instances:
        logits_cls_dict = {c: [cls_thresh[c]] for c in range(n_class)}
        for cls in range(n_class):
            logits_cls_dict[cls].extend(logits_pred[label_pred == cls].astype(np.float16))
        # ias_thresh
        tmp_cls_thresh = np.ones(n_class, dtype=np.float32)
        for idx_cls in np.arange(0, n_class):
            if logits_cls_dict[idx_cls] != None:  # noqa: E711 (as released)
                arr = np.array(logits_cls_dict[idx_cls])
                tmp_cls_thresh[idx_cls] = np.percentile(arr, 100 * (1 - alpha * cls_thresh[idx_cls] ** gamma))
        cls_thresh = beta * cls_thresh + (1 - beta) * tmp_cls_thresh
        cls_thresh[cls_thresh >= 1] = 0.999
        labels = []
        for i in range(len(logits_pred)):
            label = label_pred[i].astype(np.int64)
            label_cls_thresh = np.apply_along_axis(lambda x: [cls_thresh[e] for e in x], 1, label)
            label[logits_pred[i] < label_cls_thresh] = 255
            labels.append(label.astype(np.uint8))
        results.append((labels, cls_thresh.copy()))
    return results


def released_cbst(probmaps, init_tgt_port, n_class, stride):
    """CBST's _val_impl: per-class arrays (starting with np.float32(0)), kc, then labels."""
    arrays = {}
    cls_exist_array = np.zeros([1, n_class], dtype=int)
    cls_thresh = np.zeros([n_class])
    for probmap in probmaps:
        pred_label = probmap.argmax(0)
        probmap_max = np.amax(probmap, axis=0)
        for idx_cls in np.arange(0, n_class):
            idx_temp = pred_label == idx_cls
            arrays.setdefault(idx_cls, np.float32(0))
            if idx_temp.any():
                cls_exist_array[0, idx_cls] = 1
                probmap_max_cls_temp = probmap_max[idx_temp].astype(np.float32)
                len_cls = probmap_max_cls_temp.size
                probmap_cls = probmap_max_cls_temp[0:len_cls:stride]
                arrays[idx_cls] = np.append(arrays[idx_cls], probmap_cls)
    for idx_cls in np.arange(0, n_class):
        if cls_exist_array[0, idx_cls] == 1:
            values = sorted(arrays[idx_cls], reverse=True)
            len_cls = len(values)
            len_thresh = int(math.floor(len_cls * init_tgt_port))
            if len_thresh != 0:
                cls_thresh[idx_cls] = values[len_thresh - 1].copy()
    cls_thresh[cls_thresh == 0] = 1.0
    labels = []
    for probmap in probmaps:
        rw_probmap = np.zeros(probmap.shape, np.single)
        for idx_cls in np.arange(0, n_class):
            rw_probmap[idx_cls, :, :] = np.true_divide(probmap[idx_cls, :, :], cls_thresh[idx_cls])
        rw_probmap_max = np.amax(rw_probmap, axis=0)
        pseudo_label = np.argmax(rw_probmap, axis=0).astype(np.uint8)
        pseudo_label[rw_probmap_max < 1] = 255
        labels.append(pseudo_label)
    return cls_thresh, labels


# --- random inputs ------------------------------------------------------------------------


def random_maps(rng, shape, num_classes, present, ties):
    """conf in [0, 1] with exact 0s and 1s (and few distinct values if ties); argmax over a
    subset of the classes so that some are absent."""
    conf = rng.random(shape, dtype=np.float32)
    if ties:
        conf = (np.round(conf * 8) / 8).astype(np.float32)
    conf[rng.random(shape) < 0.05] = 0.0
    conf[rng.random(shape) < 0.05] = 1.0
    classes = rng.choice(num_classes, size=min(present, num_classes), replace=False)
    argmax = classes[rng.integers(0, len(classes), shape)].astype(np.uint8)
    return conf, argmax


IAS_CASES = [
    # (num_classes, (H, W), images per instance, instances, present classes, ties, alpha, beta, gamma)
    (19, (17, 23), 1, 6, 7, False, 0.2, 0.9, 8.0),
    (19, (32, 48), 2, 4, 19, False, 0.25, 0.9, 8.0),
    (19, (9, 31), 2, 5, 3, True, 0.3, 0.9, 8.0),
    (5, (1, 1), 1, 8, 1, False, 0.2, 0.9, 8.0),
    (3, (40, 5), 1, 5, 3, True, 0.5, 0.5, 1.0),
    (1, (6, 6), 2, 3, 1, True, 1.0, 0.0, 0.0),
    (19, (1, 64), 1, 10, 12, True, 0.2, 1.0, 8.0),
]


@pytest.mark.parametrize("case", IAS_CASES)
@pytest.mark.parametrize("conf_dtype", [np.float32, np.float16])
def test_ias_matches_released_loop(case, conf_dtype):
    num_classes, shape, per_instance, count, present, ties, alpha, beta, gamma = case
    rng = np.random.default_rng(hash(case) % 2**32)
    instances = []
    for _ in range(count):
        maps = [random_maps(rng, shape, num_classes, present, ties) for _ in range(per_instance)]
        conf = np.stack([c for c, _ in maps]).astype(conf_dtype)
        argmax = np.stack([a for _, a in maps])
        instances.append((conf, argmax))
    expected = released_ias(instances, alpha, beta, gamma, num_classes)

    as_lists = [([*conf], [*argmax]) for conf, argmax in instances]
    ours = list(ias_select_sequence(as_lists, alpha, beta, gamma, num_classes))
    for (labels, theta), (exp_labels, exp_theta) in zip(ours, expected, strict=True):
        assert theta.dtype == np.float64
        np.testing.assert_array_equal(theta, exp_theta)  # bit-exact
        for label, exp_label in zip(labels, exp_labels, strict=True):
            assert label.dtype == np.uint8
            np.testing.assert_array_equal(label, exp_label)

    # One stacked (N, H, W) array per instance is the same instance.
    stacked = list(ias_select_sequence(instances, alpha, beta, gamma, num_classes))
    for (label, theta), (exp_labels, exp_theta) in zip(stacked, expected, strict=True):
        np.testing.assert_array_equal(theta, exp_theta)
        np.testing.assert_array_equal(label, np.stack(exp_labels))


@pytest.mark.parametrize("device", DEVICES)
def test_ias_torch_equals_numpy(device):
    rng = np.random.default_rng(1)
    instances = [random_maps(rng, (2, 24, 40), 19, 9, ties) for ties in (False, True, False, True)]
    ours_np = list(ias_select_sequence(instances, 0.2, 0.9, 8.0))
    as_torch = [(torch.from_numpy(c).to(device), torch.from_numpy(a).to(device)) for c, a in instances]
    ours_torch = list(ias_select_sequence(as_torch, 0.2, 0.9, 8.0))
    for (label_np, theta_np), (label_t, theta_t) in zip(ours_np, ours_torch, strict=True):
        assert label_t.device.type == device and label_t.dtype == torch.uint8
        np.testing.assert_array_equal(theta_t, theta_np)
        np.testing.assert_array_equal(label_t.cpu().numpy(), label_np)


@pytest.mark.parametrize("conf_dtype", [np.float32, np.float16])
def test_torch_implementations_equal_numpy(conf_dtype):
    # CPU tensors go through numpy; the torch code (GPU tensors) is checked here on CPU.
    rng = np.random.default_rng(7)
    conf, argmax = random_maps(rng, (3, 29, 31), 19, 13, False)
    conf = conf.astype(conf_dtype)
    conf[0, 0, :4] = [-0.0, 1e-7, 3e-5, 2**-14]
    theta = IAS(0.2).update(conf, argmax)
    theta[:3] = [0.0, 1.0, float(conf[0, 1, 1])]
    conf_t, argmax_t = torch.from_numpy(conf), torch.from_numpy(argmax)
    for stride in (1, 4):
        np.testing.assert_array_equal(
            _histogram_torch(conf_t, argmax_t, 19, stride).reshape(19, NUM_CODES),
            confidence_histogram(conf, argmax, stride=stride),
        )
    np.testing.assert_array_equal(_select_torch(conf_t, argmax_t, theta).numpy(), select(conf, argmax, theta))


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_histograms_of_images_add_up_to_their_histogram(device):
    rng = np.random.default_rng(3)
    images = [random_maps(rng, (29, 31), 19, 7, ties) for ties in (False, True)]
    sparse = []
    for conf, argmax in images:
        conf16 = torch.from_numpy(conf).to(device).half()  # as the actors store them
        cells, counts = sparse_histogram(conf16, torch.from_numpy(argmax).to(device))
        assert cells.dtype == counts.dtype == np.int32 and (counts > 0).all()
        assert counts.sum() == conf.size and len(cells) < 19 * NUM_CODES
        sparse.append((cells, counts))
    expected = sum(confidence_histogram(conf.astype(np.float16), argmax) for conf, argmax in images)
    np.testing.assert_array_equal(dense_histogram(sparse), expected)
    cells, counts = sparse_histogram(images[0][0], images[0][1])  # numpy in, the same cells
    np.testing.assert_array_equal(cells, sparse[0][0])
    np.testing.assert_array_equal(counts, sparse[0][1])


def test_float16_codes_round_like_numpy():
    codes = np.arange(NUM_CODES, dtype=np.uint16)
    values = codes.view(np.float16).astype(np.float32)
    midpoints = ((values[:-1].astype(np.float64) + values[1:]) / 2).astype(np.float32)  # exact ties
    rng = np.random.default_rng(8)
    samples = np.concatenate([
        values, midpoints, np.nextafter(midpoints, 0), np.nextafter(midpoints, 1),
        rng.random(100_000, dtype=np.float32), rng.random(1000, dtype=np.float32) * 2**-14, [-0.0, 0.0, 1.0],
    ]).astype(np.float32)
    expected = samples.astype(np.float16).view(np.uint16) & 0x7FFF
    np.testing.assert_array_equal(_float16_codes(samples), expected)
    np.testing.assert_array_equal(_float16_codes(samples.astype(np.float16)), expected)


def test_histograms_summed_from_workers_give_the_same_update():
    # Pass 1 in parallel: per-image histograms; the sequential pass only adds them up.
    rng = np.random.default_rng(2)
    images = [random_maps(rng, (20, 30), 19, 11, False) for _ in range(2)]
    direct, from_hist = IAS(0.2), IAS(0.2)
    direct.update([c for c, _ in images], [a for _, a in images])
    from_hist.update_from_histogram(sum(confidence_histogram(c, a) for c, a in images))
    np.testing.assert_array_equal(direct.theta, from_hist.theta)


def test_percentile_with_extra_equals_numpy_percentile():
    rng = np.random.default_rng(3)
    for _ in range(300):
        values = rng.random(int(rng.integers(0, 12))).astype(np.float16)
        if rng.random() < 0.5:
            values = np.round(values * 4) / 4
        extra = np.float64(rng.choice([rng.random(), 0.0, 1.0, float(values[0]) if values.size else 0.5]))
        q = np.float64(rng.choice([rng.random(), 0.0, 1.0, 0.5]))
        codes = values.astype(np.float16).view(np.uint16).astype(np.intp)
        cum = np.cumsum(np.bincount(codes, minlength=NUM_CODES))
        expected = np.percentile(np.array([extra] + list(values.astype(np.float16))), 100 * q)
        assert _percentile_with_extra(cum, extra, np.true_divide(100 * q, 100)) == expected


def test_absent_class_threshold_moves_as_released():
    # V = [theta] only: t_hat = float32(theta), so theta drifts by float32 rounding, not 0.
    ias = IAS(0.2, num_classes=2)
    theta = ias.update(np.array([[0.5]], np.float32), np.array([[0]], np.uint8))
    assert theta[1] == 0.9 * 0.9 + np.float64(np.float32(1 - 0.9) * np.float32(0.9))
    assert theta[1] != 0.9


def test_threshold_reaching_one_is_clipped_to_0999():
    conf, argmax = np.ones((1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8)
    (_, expected), = released_ias([(conf, argmax)], 0.5, 0.0, 8.0, 2)
    theta = IAS(0.5, beta=0.0, num_classes=2).update(conf, argmax)
    np.testing.assert_array_equal(theta, expected)
    assert theta[0] == 0.999


def test_select_uses_float64_comparison_and_constant_threshold():
    # float32(0.9) < 0.9 < the next float32: a float32 comparison would keep both.
    conf = np.array([[np.nextafter(np.float32(0.9), 1), 0.9]], np.float32)
    argmax = np.array([[1, 1]], np.uint8)
    np.testing.assert_array_equal(select(conf, argmax, [0.0, 0.9]), [[1, 255]])
    rng = np.random.default_rng(4)
    conf, argmax = random_maps(rng, (15, 17), 19, 19, True)
    expected = argmax.copy()
    expected[conf < 0.75] = 255
    np.testing.assert_array_equal(constant_select(conf, argmax, 0.75), expected)
    label_t = constant_select(torch.from_numpy(conf), torch.from_numpy(argmax), 0.75)
    np.testing.assert_array_equal(label_t.numpy(), expected)


# --- CBST ---------------------------------------------------------------------------------


def random_probmaps(rng, count, num_classes, shape, present, ties):
    """Probability-like maps whose values are float16-exact (CBST ranks float16 confidences)."""
    maps = []
    for _ in range(count):
        probs = rng.random((num_classes, *shape)).astype(np.float16).astype(np.float32)
        if ties:
            probs = np.round(probs * 4) / 4
        absent = rng.choice(num_classes, size=num_classes - present, replace=False)
        probs[absent] *= 0.01  # rarely the argmax
        maps.append(probs.astype(np.float16).astype(np.float32))
    return maps


@pytest.mark.parametrize("stride", [1, 4])
@pytest.mark.parametrize(
    "num_classes,shape,present,ties,portion",
    [
        (19, (24, 40), 19, False, 0.2),
        (19, (16, 20), 6, True, 0.35),
        (4, (3, 5), 4, False, 0.05),
        (7, (30, 30), 3, True, 0.5),
    ],
)
def test_cbst_matches_released_loop(stride, num_classes, shape, present, ties, portion):
    rng = np.random.default_rng(num_classes * 100 + stride)
    probmaps = random_probmaps(rng, 3, num_classes, shape, present, ties)
    expected_theta, expected_labels = released_cbst(probmaps, portion, num_classes, stride)

    hist = sum(confidence_histogram(p.max(0), p.argmax(0), num_classes, stride=stride) for p in probmaps)
    theta = cbst_thresholds(hist, portion)
    np.testing.assert_array_equal(theta, expected_theta)
    for probmap, expected in zip(probmaps, expected_labels, strict=True):
        np.testing.assert_array_equal(cbst_select(probmap, theta), expected)
        np.testing.assert_array_equal(_cbst_select_torch(torch.from_numpy(probmap), theta).numpy(), expected)
        for device in DEVICES:
            label = cbst_select(torch.from_numpy(probmap).to(device), theta)
            assert label.device.type == device
            np.testing.assert_array_equal(label.cpu().numpy(), expected)


def test_cbst_rank_zero_and_empty_classes_get_threshold_one():
    conf = np.array([[0.5, 0.25, 0.75]], np.float32)
    argmax = np.array([[0, 1, 1]], np.uint8)
    hist = confidence_histogram(conf, argmax, num_classes=3)
    # class 0: N = 1 + 1, floor(2 * 0.4) = 0 -> 1; class 2 has no pixel -> 1;
    # class 1: N = 1 + 2, floor(3 * 0.4) = 1 -> the largest value.
    np.testing.assert_array_equal(cbst_thresholds(hist, 0.4), [1.0, 0.75, 1.0])
    # portion 1: rank N is the extra 0 -> treated as "no prediction" -> 1.
    np.testing.assert_array_equal(cbst_thresholds(hist, 1.0), [1.0, 1.0, 1.0])


@pytest.mark.parametrize("device", DEVICES)
def test_strided_histogram_torch_equals_numpy(device):
    rng = np.random.default_rng(5)
    conf, argmax = random_maps(rng, (37, 53), 19, 10, False)
    conf[0, :3] = -0.0
    for stride in (1, 3, 4):
        expected = confidence_histogram(conf, argmax, stride=stride)
        conf_t, argmax_t = torch.from_numpy(conf).to(device), torch.from_numpy(argmax).to(device)
        got = confidence_histogram(conf_t, argmax_t, stride=stride)
        np.testing.assert_array_equal(got, expected)
    assert expected.shape == (19, NUM_CODES) and CODE_VALUES[-1] == 1.0
    assert confidence_histogram(conf, argmax)[argmax[0, 0], 0] >= 1  # -0.0 counted as 0.0


def test_spatial_prior_counts_and_normalises_per_class():
    rng = np.random.default_rng(6)
    maps = [rng.choice([0, 1, 2, 255], size=(8, 12)).astype(np.uint8) for _ in range(3)]
    maps.append(rng.choice([0, 2], size=(16, 24)).astype(np.uint8))  # resized with nearest
    resized = maps[:3] + [np.asarray(Image.fromarray(maps[3]).resize((12, 8), Image.NEAREST))]
    counts = np.stack([sum((m == c).astype(np.float64) for m in resized) for c in range(4)])
    expected = np.zeros_like(counts)
    for c in range(3):
        expected[c] = counts[c] / counts[c].sum()
    expected /= expected.max()
    prior = spatial_prior(iter(maps), (8, 12), num_classes=4)
    assert prior.dtype == np.float32 and prior.shape == (4, 8, 12)
    np.testing.assert_allclose(prior, expected, rtol=1e-6)
    assert not prior[3].any()  # a class never seen in the source
    with pytest.raises(ValueError, match="train ids"):
        spatial_prior([np.full((8, 12), 7, np.uint8)], (8, 12), num_classes=4)


def test_cbst_portion_schedule():
    assert [cbst_portion(r) for r in range(8)] == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.5]
    assert [cbst_portion(r, start=0.15) for r in range(3)] == [0.15, 0.2, 0.25]


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "conf,argmax,message",
    [
        (np.zeros((2, 3), np.float32), np.zeros((3, 2), np.uint8), "shape"),
        (np.zeros((2, 3), np.float64), np.zeros((2, 3), np.uint8), "float16 or float32"),
        (np.full((2, 3), 1.5, np.float32), np.zeros((2, 3), np.uint8), r"\[0, 1\]"),
        (np.full((2, 3), np.nan, np.float32), np.zeros((2, 3), np.uint8), r"\[0, 1\]"),
        (np.zeros((2, 3), np.float32), np.full((2, 3), 19, np.uint8), "argmax must lie"),
        (np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), "integer"),
    ],
)
def test_bad_maps_are_rejected(conf, argmax, message):
    with pytest.raises(ValueError, match=message):
        IAS(0.2).update(conf, argmax)


def test_bad_parameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        IAS(1.5)
    with pytest.raises(ValueError, match="histogram"):
        IAS(0.2).update_from_histogram(np.zeros((19, 10), np.int64))
    with pytest.raises(ValueError, match="portion"):
        cbst_thresholds(np.zeros((19, NUM_CODES), np.int64), 0.0)
    with pytest.raises(ValueError, match="one threshold per class"):
        cbst_select(np.zeros((3, 2, 2), np.float32), [1.0, 1.0])


def test_class_confidence_starts_at_first_mean_then_moves_by_ema():
    tracker = ClassConfidence(num_classes=3, momentum=0.9)
    conf = np.array([[0.5, 0.7], [0.9, 0.2]])
    label = np.array([[0, 0], [1, 255]], np.uint8)  # class 2 never kept; 0.2 not kept
    v = tracker.update(conf, label).copy()
    assert v[0] == pytest.approx(0.6) and v[1] == pytest.approx(0.9) and np.isnan(v[2])
    v = tracker.update(np.full((2, 2), 0.8), np.array([[0, 2], [255, 255]], np.uint8)).copy()
    assert v[0] == pytest.approx(0.9 * 0.6 + 0.1 * 0.8)
    assert v[1] == pytest.approx(0.9)  # absent from the image: unchanged
    assert v[2] == pytest.approx(0.8)  # first seen: its own mean


def test_hard_classes_are_the_least_confident_with_probabilities_from_their_confidence():
    hard, probs = hard_classes([0.9, None, 0.5, 0.99, 0.7], num_hard=3)
    assert hard.tolist() == [2, 4, 0]  # lowest first; the class without confidence never
    expected = np.array([0.5, 0.3, 0.1]) ** 2
    np.testing.assert_allclose(probs, expected / expected.sum())
    hard, probs = hard_classes([1.0, 1.0, None], num_hard=14)
    assert hard.tolist() == [0, 1] and probs.tolist() == [0.5, 0.5]
