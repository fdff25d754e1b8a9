"""The rehearsal (make rehearsal) at 1/16 of the real sizes: every stage of the GTA5 ->
Cityscapes config finishes and the report holds every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import rehearsal
from pipeline.data import synthetic
from pipeline.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]


def test_the_synthetic_datasets_have_the_real_layouts(tmp_path):
    # at 1/16 of the real sizes (a full-size frame takes seconds to draw; the rehearsal draws them)
    assert (synthetic.GTA5_SIZE, synthetic.CITYSCAPES_SIZE) == ((1914, 1052), (2048, 1024))
    roots = synthetic.write(str(tmp_path), 1, 1, 1, source_size=(120, 66), target_size=(128, 64), workers=1)
    gta5 = Image.open(tmp_path / "GTA5" / "images" / "00001.png")
    label = Image.open(tmp_path / "GTA5" / "labels" / "00001.png")
    assert gta5.size == (120, 66) and label.mode == "P" and label.size == (120, 66)
    image, ids = synthetic.frame_paths(str(tmp_path), "cityscapes_val", 0)
    assert Image.open(image).size == (128, 64) and image.endswith("_leftImg8bit.png")
    assert Image.open(ids).mode == "L" and ids.endswith("_gtFine_labelIds.png")
    assert np.asarray(Image.open(ids)).max() > 18  # label ids, not train ids
    # the project's own converter accepts them as the real datasets
    assert prepare("gta5", roots["gta5"], workers=1).frames == {"train": 1}
    assert prepare("cityscapes", roots["cityscapes"], workers=1).frames == {"train": 1, "val": 1}


@pytest.mark.slow
def test_the_rehearsal_runs_every_stage_and_reports_them(tmp_path):
    out = tmp_path / "rehearsal"
    cmd = [sys.executable, "jobs/rehearsal.py", "--out", str(out), "--scale", "0.0625", "--source", "2",
           "--target-train", "4", "--target-val", "1"]
    # Ray's socket paths must stay under 107 bytes: a short folder of its own, not tmp_path
    with tempfile.TemporaryDirectory(prefix="ray", dir="/tmp") as ray_tmp:
        env = {**os.environ, "RAY_TMPDIR": ray_tmp}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "peak memory (RSS) per process" in proc.stdout

    report = json.loads((out / "rehearsal_report.json").read_text())
    stages = ["source_only", "adversarial", "round_1", "round_2", "round_3", "final_eval"]
    assert set(report["finished"]) == set(stages)
    assert list(report["stages"]) == ["preparation", *stages]
    for stage in report["stages"].values():
        assert stage["wall_s"] > 0 and stage["slowest_part"][0] in stage["parts_s"]
    assert {"round_1", "round_2", "round_3"} == set(report["pseudo_labels"])
    first, second = report["pseudo_labels"]["round_1"], report["pseudo_labels"]["round_2"]
    assert (first["size"], second["size"]) == ([80, 40], [96, 48])  # 1280x640 and 1536x768 at 1/16
    for store in report["pseudo_labels"].values():
        assert store["images"] == 4 and store["images_per_s"] > 0
        assert set(store["images_per_s_by_part"]) == {"decode", "forward", "selection", "write"}
        assert store["bytes_per_image"]["labels"] > 0 and store["bytes_per_2975_images"]["predictions"] > 0
    loader = report["loader"]
    assert set(loader["images_per_s_by_loader_processes"]) == {"1", "2"}
    assert set(loader["v100_consumes_images_per_s"]) == {"15 TFLOPS", "40 TFLOPS"}
    assert 0 <= loader["sample_seconds_by_part"]["label-store read share"] <= 1
    assert len(report["evaluation_one_image"]["seconds_by_part"]) == 6  # decode and five sizes
    assert {"driver", "train worker", "label actor"} <= set(report["memory"])
    assert all(m["peak_mib"] > 0 for m in report["memory"].values())


@pytest.mark.parametrize("title, parent, role", [
    # a worker before it names itself: its arguments name the raylet, it is no service
    ("/x/.venv/bin/python /x/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1 "
     "--raylet-name=/tmp/ray/session_1/sockets/raylet --webui=127.0.0.1:8265", None, "other ray worker"),
    ("/x/.venv/bin/python -u /x/ray/_private/workers/setup_worker.py --worker-type=dashboard", None,
     "other ray worker"),
    ("ray::RayTrainWorker.run_train_fn", None, "train worker"),
    ("ray::RayTrainWorker.run_train_fn", "train worker", "train data loader"),  # a forked DataLoader
    ("ray::MapWorker(MapBatches(_Predictor))", None, "label actor"),
    ("ray::IDLE", None, "other ray worker"),
    ("ray::DashboardAgent", None, "ray service"),
    ("/x/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s/sockets/raylet", None, "ray service"),
    ("/x/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp/ray/s/logs", None, "ray service"),
    ("/x/.venv/bin/python /x/ray/dashboard/dashboard.py --host=127.0.0.1", None, "ray service"),
    ("/x/.venv/bin/python -u /x/ray/_private/log_monitor.py --session-dir=/tmp/ray/s", None, "ray service"),
    ("/usr/bin/chromium --headless", None, "other"),
])
def test_each_process_is_counted_under_what_it_is(title, parent, role):
    assert rehearsal._role(title, parent) == role


def test_the_report_counts_the_labels_as_the_training_workers_hold_them_compressed(tmp_path):
    from pipeline.label_store import LabelStore

    rng = np.random.default_rng(0)
    sizes = {}
    for kind, make in (("noise", lambda: rng.integers(0, 19, (64, 128), dtype=np.uint8)),
                       ("flat", lambda: np.full((64, 128), 255, np.uint8))):
        store = LabelStore(str(tmp_path / kind))
        rows = [{"index": i, "name": f"{i}", "image": "x.png", "height": 64, "width": 128, "label": make().tobytes(),
                 "thresholds": [0.9] * 19, "class_pixels": [0] * 19, "class_kept": [0] * 19, "class_correct": None}
                for i in range(20)]
        store.write_labels(0, rows, {"config_hash": "h"})
        store.commit({"num_parts": 1, "num_images": 20, "config_hash": "h", "statistics": {"confidence": [0.5] * 19}})
        sizes[kind] = rehearsal._held_label_bytes(str(tmp_path / kind))
    raw = 64 * 128
    assert 0.5 * raw < sizes["noise"] < raw  # 19 classes of noise: about 4.2 of 8 bits
    assert sizes["flat"] < 0.02 * raw  # all ignored: nearly nothing
