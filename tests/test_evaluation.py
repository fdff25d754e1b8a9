import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.transforms import normalize
from pipeline.evaluation import ConfusionMatrix, evaluate, predict_probs
from pipeline.labels import (
    CITYSCAPES_ID_TO_TRAIN,
    CLASS_NAMES,
    MIOU13_CLASSES,
    MIOU16_CLASSES,
    NUM_CLASSES,
    PALETTE,
    train_id,
)


# ---------------------------------------------------------------- confusion matrix


def test_update_counts_target_rows_prediction_columns():
    target = np.array([[0, 0, 1], [1, 2, 2]])
    pred = np.array([[0, 1, 1], [1, 2, 0]])
    cm = ConfusionMatrix(3)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix, [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    # class 0: tp 1, fp 1 (a 2 predicted 0), fn 1 -> 1/3; class 1: 2/3; class 2: 1/2
    np.testing.assert_allclose(cm.iou(), [1 / 3, 2 / 3, 1 / 2])
    assert cm.mean_iou() == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 6)


def test_ignored_target_pixels_count_nowhere_whatever_predicted():
    target = np.array([255, 0, 255, 1], dtype=np.uint8)
    pred = np.array([1, 0, 0, 1], dtype=np.uint8)
    cm = ConfusionMatrix(2)
    cm.update(pred, target)
    np.testing.assert_array_equal(cm.matrix, [[1, 0], [0, 1]])
    np.testing.assert_allclose(cm.iou(), [1.0, 1.0])


def test_torch_and_numpy_inputs_give_the_same_counts():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 20, size=(32, 48)).astype(np.uint8)
    target[target == 19] = 255
    pred = rng.integers(0, 19, size=(32, 48))
    a, b = ConfusionMatrix(), ConfusionMatrix()
    a.update(pred, target)
    b.update(torch.from_numpy(pred), torch.from_numpy(target))
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.matrix.sum() == (target != 255).sum()


def test_out_of_range_values_raise():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="target"):
        cm.update(np.zeros(4, np.uint8), np.array([0, 1, 3, 255], np.uint8))
    with pytest.raises(ValueError, match="target"):
        cm.update(np.zeros(2, np.uint8), np.array([0, 300]))
    with pytest.raises(ValueError, match="prediction"):
        cm.update(np.array([0, 255, 0, 0], np.uint8), np.zeros(4, np.uint8))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 3)), np.zeros((3, 2)))


def test_absent_class_is_nan_and_predicted_only_class_is_zero():
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 2])  # class 2 predicted but absent from the target; class 3 nowhere
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], [1.0, 0.5, 0.0])
    assert math.isnan(iou[3])
    assert cm.mean_iou() == pytest.approx(0.5)  # NaN left out, 0 counted
    assert math.isnan(ConfusionMatrix(4).mean_iou())


def test_merge_of_shards_equals_one_shot():
    rng = np.random.default_rng(1)
    images = [(rng.integers(0, 19, (20, 30)), rng.choice([0, 3, 5, 255], (20, 30))) for _ in range(6)]
    one_shot = ConfusionMatrix()
    shards = [ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()]
    for i, (pred, target) in enumerate(images):
        one_shot.update(pred, target)
        shards[i % 3].update(pred, target)
    # Shards travel between Ray workers by pickle.
    shards = [pickle.loads(pickle.dumps(s)) for s in shards]
    np.testing.assert_array_equal(ConfusionMatrix.merge(shards).matrix, one_shot.matrix)
    np.testing.assert_array_equal((shards[0] + shards[1] + shards[2]).matrix, one_shot.matrix)
    # an all-reduced plain array wraps back into a ConfusionMatrix
    summed = sum(s.matrix for s in shards)
    assert ConfusionMatrix(matrix=summed).mean_iou() == one_shot.mean_iou()
    with pytest.raises(ValueError):
        ConfusionMatrix(3) + ConfusionMatrix(4)


def test_miou_16_and_13_use_the_synthia_protocol_classes():
    # Every class one block; the six non-13 classes are predicted as each other (IoU 0).
    target = np.arange(NUM_CLASSES).repeat(10)
    swap = {"wall": "fence", "fence": "pole", "pole": "wall", "terrain": "truck", "truck": "train", "train": "terrain"}
    lut = np.arange(NUM_CLASSES)
    for a, b in swap.items():
        lut[train_id(a)] = train_id(b)
    cm = ConfusionMatrix()
    cm.update(lut[target], target)
    assert cm.mean_iou() == pytest.approx(13 / 19)
    assert cm.mean_iou(MIOU16_CLASSES) == pytest.approx(13 / 16)
    assert cm.mean_iou(MIOU13_CLASSES) == pytest.approx(1.0)
    summary = cm.summary()
    assert summary["mIoU-19"] == pytest.approx(13 / 19)
    assert summary["mIoU-16"] == pytest.approx(13 / 16)
    assert summary["mIoU-13"] == pytest.approx(1.0)
    assert summary["IoU/road"] == 1.0 and summary["IoU/train"] == 0.0
    assert summary["pixel_accuracy"] == pytest.approx(13 / 19)


def test_table_lists_every_class_and_the_means_in_percent():
    cm = ConfusionMatrix()
    cm.update(np.array([0, 0, 1, 13]), np.array([0, 0, 1, 1]))
    lines = cm.table().splitlines()
    assert len(lines) == 2 + NUM_CLASSES + 3
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in lines[2:]}
    assert list(rows)[:NUM_CLASSES] == list(CLASS_NAMES)
    assert rows["road"] == "100.00" and rows["sidewalk"] == "50.00" and rows["car"] == "0.00"
    assert rows["sky"] == "n/a"
    assert rows["mIoU-19"] == "50.00"
    with pytest.raises(ValueError, match="19"):
        ConfusionMatrix(3).table()


def test_confusions_name_what_each_class_is_taken_for():
    cm = ConfusionMatrix()
    # car (13): 6 pixels called road, 3 car, 1 sidewalk; road: all right; sky: no pixels.
    target = np.array([13] * 10 + [0] * 4)
    pred = np.array([0] * 6 + [13] * 3 + [1] + [0] * 4)
    cm.update(pred, target)
    conf = cm.confusions(k=2)
    assert set(conf) == {"road", "car"}  # classes without ground truth are left out
    assert conf["car"] == [("road", pytest.approx(0.6)), ("car", pytest.approx(0.3))]
    assert conf["road"] == [("road", 1.0)]  # classes never predicted for it are not listed
    rows = {line.split("|")[1].strip(): line for line in cm.confusion_table(k=3).splitlines()[2:]}
    assert rows["car"].split("|")[2:4] == [" 30.00 ", " road 60, car 30, sidewalk 10 "]
    with pytest.raises(ValueError, match="19"):
        ConfusionMatrix(3).confusions()


# ---------------------------------------------------------- cityscapesScripts agreement


def _cityscapes_args(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    args = cs_eval.CArgs()
    args.cityscapesPath = str(tmp_path)
    args.exportFile = str(tmp_path / "result.json")
    args.groundTruthSearch = str(tmp_path / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")
    args.evalInstLevelScore = False  # needs *_instanceIds.png; irrelevant to IoU
    args.evalPixelAccuracy = False
    args.evalLabels = []
    args.printRow = 5
    args.normalized = True
    args.colorized = False
    args.bold = ""
    args.nocol = ""
    args.JSONOutput = False
    args.quiet = True
    args.avgClassSize = cs_eval.args.avgClassSize
    args.predictionPath = None
    args.predictionWalk = None
    return cs_eval, args


def test_miou_matches_cityscapes_scripts(tmp_path):
    from cityscapesscripts.helpers.labels import labels, trainId2label

    rng = np.random.default_rng(7)
    train_to_id = np.zeros(256, np.uint8)
    for t in range(NUM_CLASSES):
        train_to_id[t] = trainId2label[t].id
    # GT: every label id (ignored ones included) except train and motorcycle.
    gt_ids = [lab.id for lab in labels if lab.id >= 0 and lab.name not in ("train", "motorcycle")]
    # Predictions: never train (absent from both -> NaN) nor bicycle (in GT only -> 0);
    # motorcycle is predicted but absent from GT (-> 0).
    pred_classes = [t for t in range(NUM_CLASSES) if CLASS_NAMES[t] not in ("train", "bicycle")]

    ours = ConfusionMatrix()
    pred_files, gt_files = [], []
    for i, (h, w) in enumerate([(48, 96), (40, 80), (64, 64)]):
        coarse = rng.choice(gt_ids, size=(h // 8, w // 8))
        gt = np.kron(coarse, np.ones((8, 8), np.int64)).astype(np.uint8)
        target = CITYSCAPES_ID_TO_TRAIN[gt]
        pred = np.where(target == 255, rng.choice(pred_classes, size=gt.shape), target)
        noise = (rng.random(gt.shape) < 0.25) | (pred == train_id("bicycle"))
        pred = np.where(noise, rng.choice(pred_classes, size=gt.shape), pred).astype(np.uint8)
        ours.update(pred, target)

        name = f"frankfurt_000000_{i:06d}"
        gt_dir, pred_dir = tmp_path / "gtFine" / "val" / "frankfurt", tmp_path / "results"
        gt_dir.mkdir(parents=True, exist_ok=True)
        pred_dir.mkdir(exist_ok=True)
        gt_files.append(str(gt_dir / f"{name}_gtFine_labelIds.png"))
        pred_files.append(str(pred_dir / f"{name}_pred.png"))
        Image.fromarray(gt).save(gt_files[-1])
        Image.fromarray(train_to_id[pred]).save(pred_files[-1])

    cs_eval, args = _cityscapes_args(tmp_path)
    result = cs_eval.evaluateImgLists(pred_files, gt_files, args)

    iou = ours.iou()
    for t, name in enumerate(CLASS_NAMES):
        theirs = result["classScores"][name]
        if math.isnan(theirs):
            assert math.isnan(iou[t]), name
        else:
            assert iou[t] == pytest.approx(theirs, abs=1e-6), name
    assert ours.mean_iou() == pytest.approx(result["averageScoreClasses"], abs=1e-6)
    # the case exercises all three rules
    assert math.isnan(iou[train_id("train")])
    assert iou[train_id("motorcycle")] == 0.0 and iou[train_id("bicycle")] == 0.0
    assert 0.3 < ours.mean_iou() < 0.95


# ------------------------------------------------------------------------ inference


def _conv_model(symmetric: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3, padding=1), torch.nn.Dropout(0.5))
    if symmetric:  # a horizontally mirror-symmetric kernel makes the model flip-equivariant
        with torch.no_grad():
            w = model[0].weight
            w.copy_((w + w.flip(-1)) / 2)
    return model


def test_single_pass_is_the_softmax_of_the_model():
    model = _conv_model(symmetric=False)
    model.train()
    x = torch.randn(2, 3, 12, 20)
    probs = predict_probs(model, x)
    assert model.training  # mode restored; dropout was off during prediction
    with torch.no_grad():
        expected = model.eval()(x).softmax(1)
    torch.testing.assert_close(probs, expected)


def test_multi_scale_and_flip_shapes_and_probabilities():
    model = _conv_model(symmetric=False)
    x = torch.randn(2, 3, 12, 20)
    probs = predict_probs(model, x, sizes=[(10, 6), (20, 12), (40, 24)], flip=True, output_size=(30, 18))
    assert probs.shape == (2, 5, 18, 30)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 18, 30))
    # flip averages the prediction of the mirrored image, mirrored back
    with torch.no_grad():
        model.eval()
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1).flip(-1)) / 2
    torch.testing.assert_close(predict_probs(model, x, flip=True), expected)
    # one size at another resolution: resize in, softmax, resize back out
    with torch.no_grad():
        small = torch.nn.functional.interpolate(x, size=(6, 10), mode="bilinear", align_corners=True)
        expected = torch.nn.functional.interpolate(
            model(small).softmax(1), size=(12, 20), mode="bilinear", align_corners=True
        )
    torch.testing.assert_close(predict_probs(model, x, sizes=[(10, 6)]), expected)
    with pytest.raises(ValueError, match="normalize"):
        predict_probs(model, torch.zeros(1, 3, 4, 4, dtype=torch.uint8))


def test_flip_averaging_leaves_a_flip_equivariant_model_unchanged():
    model = _conv_model(symmetric=True)
    x = torch.randn(1, 3, 16, 24)
    single = predict_probs(model, x)
    torch.testing.assert_close(predict_probs(model, x, flip=True), single)
    assert not torch.allclose(predict_probs(_conv_model(symmetric=False), x, flip=True),
                              predict_probs(_conv_model(symmetric=False), x))


class _NearestPaletteColour(torch.nn.Module):
    """Per-pixel classifier: the class whose (normalised) palette colour is nearest.

    argmin_k |x - c_k|^2 = argmax_k (2 c_k . x - |c_k|^2), a 1x1 convolution.
    """

    def __init__(self):
        super().__init__()
        colours = normalize(PALETTE[None, :NUM_CLASSES]).squeeze(1).T  # (K, 3)
        self.conv = torch.nn.Conv2d(3, NUM_CLASSES, 1)
        with torch.no_grad():
            self.conv.weight.copy_(100 * 2 * colours[:, :, None, None])
            self.conv.bias.copy_(-100 * (colours**2).sum(1))

    def forward(self, x):
        return self.conv(x)


def test_evaluate_counts_predictions_at_label_resolution():
    rng = np.random.default_rng(3)
    model = _NearestPaletteColour()
    samples, expected = [], ConfusionMatrix()
    for h, w in [(16, 24), (20, 20)]:
        truth = rng.integers(0, NUM_CLASSES, (h, w)).astype(np.uint8)
        label = truth.copy()
        label[rng.random((h, w)) < 0.2] = 255
        wrong = rng.random((h, w)) < 0.1
        label[wrong] = rng.integers(0, NUM_CLASSES, wrong.sum())
        samples.append((PALETTE[truth], label))
        expected.update(truth, label)
    cm = evaluate(model, samples, progress=False)
    np.testing.assert_array_equal(cm.matrix, expected.matrix)

    # a collated batch (N, H, W, 3) with labels (N, H, W) counts the same pixels
    image, label = samples[0]
    batched = evaluate(model, [(torch.from_numpy(np.stack([image, image])), np.stack([label, label]))], progress=False)
    single = evaluate(model, [samples[0]], progress=False)
    np.testing.assert_array_equal(batched.matrix, 2 * single.matrix)

    with pytest.raises(ValueError, match="classes"):
        evaluate(model, samples, num_classes=5, progress=False)
