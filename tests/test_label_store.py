import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.label_store import LabelStore, decode_label


def _prediction_row(index, h=4, w=6, gt=True):
    rng = np.random.default_rng(index)
    pred = rng.integers(0, 19, (h, w), dtype=np.uint8)
    conf = rng.random((h, w)).astype("<f2")
    return {
        "index": index, "name": f"img{index:03d}", "image": f"/x/img{index:03d}.png",
        "height": h, "width": w,
        "prediction": pred.tobytes(), "confidence": conf.tobytes(),
        "class_pixels": np.bincount(pred.ravel(), minlength=19).tolist(),
        "ground_truth": pred.tobytes() if gt else None,
    }


def test_predictions_round_trip_in_canonical_order(tmp_path):
    store = LabelStore(str(tmp_path / "store"))
    store.write_predictions(1, [_prediction_row(2), _prediction_row(3, gt=False)], {"config_hash": "a"})
    store.write_predictions(0, [_prediction_row(0), _prediction_row(1)], {"config_hash": "a"})
    records = list(store.iter_predictions(2))
    assert [r.index for r in records] == [0, 1, 2, 3]
    row = _prediction_row(1)
    assert records[1].prediction.tobytes() == row["prediction"]
    assert records[1].confidence.dtype == np.float16 and records[1].confidence.shape == (4, 6)
    assert records[3].ground_truth is None
    assert records[0].class_pixels.sum() == 24


def test_finished_parts_respect_config_hash_and_torn_files(tmp_path):
    store = LabelStore(str(tmp_path / "store"))
    store.write_predictions(0, [_prediction_row(0)], {"config_hash": "a"})
    store.write_predictions(1, [_prediction_row(1)], {"config_hash": "b"})
    (tmp_path / "store" / "predictions" / "part-00002.parquet").write_bytes(b"PAR1 torn")
    assert store.finished_prediction_parts(3, "a") == {0}
    assert store.finished_prediction_parts(3, "b") == {1}


def test_manifest_marks_completion_and_labels_read_with_plain_pyarrow(tmp_path):
    store = LabelStore(str(tmp_path / "store"))
    assert not store.is_complete()
    with pytest.raises(FileNotFoundError, match="not complete"):
        store.read_labels()
    label = np.full((4, 6), 255, np.uint8)
    label[0] = 7
    row = {
        "index": 0, "name": "a", "image": "/x/a.png", "height": 4, "width": 6,
        "label": label.tobytes(), "thresholds": [0.9] * 19, "class_pixels": [1] * 19,
        "class_kept": [0] * 19, "class_correct": None,
    }
    store.write_labels(0, [row], {"config_hash": "h"})
    store.commit({"num_parts": 1, "config_hash": "h"})
    assert store.is_complete()
    assert json.loads((tmp_path / "store" / "manifest.json").read_text())["config_hash"] == "h"
    plain = pq.read_table(tmp_path / "store" / "labels" / "part-00000.parquet").to_pylist()
    np.testing.assert_array_equal(decode_label(plain[0]), label)
    assert store.read_labels(columns=["name"]).column("name").to_pylist() == ["a"]
    # no temporary files left behind
    assert not [p for p in (tmp_path / "store").rglob(".tmp-*")]


def test_rejects_bad_storage_uri():
    with pytest.raises(ValueError, match="unsupported storage URI"):
        LabelStore("gs://bucket/labels")
