"""Bad settings and inputs fail before any side effect, all at once, with the fix; a failed
start never blocks the corrected re-run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline import config, processes, storage
from pipeline.experiment import ExperimentConfig

JOB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "run_experiment.py")


def _tiny(benchmark_data, output, *overrides) -> list[str]:
    d = benchmark_data
    return [f"output={output}", f"data.source.root={d['source'].root}", f"data.target.root={d['target'].root}",
            f"data.val.root={d['val'].root}", "data.source_val=null", "model.arch=deeplabv2_small",
            "crop_size=[64,32]", "source_crop_heights=[48,96]", "target_crop_heights=[48,96]",
            "source_only.iterations=2", "source_only.batch_size=2", "source_only.checkpoint_every=2",
            "self_training.iterations=2", "self_training.batch_size=2",
            "self_training.rounds=[{alpha: 0.2, lr: 1.0e-4, pseudo_label_size: [128, 64]}]",
            "final_eval.sizes=[]", "final_eval.flip=false", "oracle.iterations=0", "compute.loader_workers=0",
            "compute.cpus_per_worker=1", "compute.cpus_per_label_worker=1", *overrides]


def _run(args, timeout=600):
    return subprocess.run([sys.executable, JOB, "--config", "configs/benchmark.yaml", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override, message", [
    ("compute.num_workers=0", "compute: num_workers must be > 0, got 0"),
    ("self_training.rounds=[{alpha: 1.5, lr: 1.0e-4, pseudo_label_size: [256, 128]}]",
     r"self_training.rounds\[0\]: alpha must be in \(0, 1\], got 1.5"),
    ("self_training.beta=2", r"self_training: beta must be in \[0, 1\]"),
    ("source_only.lr=-1", "source_only: lr must be > 0"),
    ("stvm.metric_lr=0", "stvm.metric_lr must be > 0"),
    ("self_training.selector=ias2", "'ias2' is not one of"),
    ("output=s3//bucket/run", r"output: 's3//bucket/run' looks like a mistyped URI .*write s3://bucket/run"),
    ("output=s3:/bucket/run", r"looks like a mistyped URI \(s3:/ instead of s3://\)"),
    ("data.source.root=s3//bucket/gta5", r"data.source: root: 's3//bucket/gta5' looks like a mistyped URI"),
    ("model.init=s3:bucket/w.pt", r"model: init: 's3:bucket/w.pt' looks like a mistyped URI"),
    ("output=gs://bucket/run", "unsupported storage URI 'gs://bucket/run'"),
])
def test_a_bad_setting_is_refused_with_its_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.load(ExperimentConfig, "configs/benchmark.yaml", [override])


def test_every_problem_is_listed_at_once(benchmark_data, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(
        benchmark_data, tmp_path / "file" / "out", f"data.target.root={tmp_path / 'nowhere'}",
        f"model.init={tmp_path / 'missing.pt'}"))
    with pytest.raises(config.ConfigError) as err:
        cfg.check()
    text = str(err.value)
    assert text.startswith("3 problems before any work started")
    assert f"no prepared list {tmp_path}/nowhere/lists/cityscapes_train.txt" in text and "prepare_data.py" in text
    assert f"model.init: weights file {tmp_path}/missing.pt not found" in text
    assert f"output: {tmp_path}/file is a file, not a folder" in text


def test_weights_of_another_model_are_refused_before_work(benchmark_data, small_checkpoint, tmp_path):
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(
        benchmark_data, tmp_path / "out", f"model.init={small_checkpoint}", "label_space=robotcar9"))
    with pytest.raises(config.ConfigError, match=rf"(?s)model.init: checkpoint {small_checkpoint}: label space "
                                                 r"cityscapes19 \(19 classes\), but the experiment's is robotcar9"):
        cfg.check()
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(
        benchmark_data, tmp_path / "out", f"model.init={small_checkpoint}", "model.arch=deeplabv2_resnet101"))
    with pytest.raises(config.ConfigError, match=r"(?s)model.init: .*do not fit .*model.arch deeplabv2_resnet101"):
        cfg.check()


def test_the_job_refuses_bad_input_before_any_side_effect(benchmark_data, tmp_path):
    out = tmp_path / "out"
    done = _run(_tiny(benchmark_data, out, f"data.target.root={tmp_path / 'nowhere'}", "self_training.beta=0.5",
                      f"model.imagenet_backbone={tmp_path / 'r101.pth'}"))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "2 problems before any work started" in done.stderr and "nothing was started or written" in done.stderr
    assert not out.exists()  # no MLflow store, no record, no folder
    debug = _run(_tiny(benchmark_data, out, f"data.target.root={tmp_path / 'nowhere'}", "--debug"))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_a_failed_start_does_not_block_the_corrected_rerun(benchmark_data, tmp_path):
    from pipeline.tracking import ExperimentTracker, default_tracking_uri

    out = tmp_path / "out"
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(benchmark_data, out))
    # a start that created its parent run with other settings, then failed before any stage finished
    first = ExperimentTracker(default_tracking_uri(cfg.output), cfg.name, run_name="benchmark: IAST, 1 round")
    first.log_config(first.parent_run_id, {**config.to_dict(cfg), "seed": 1})
    old_parent = first.parent_run_id
    import common  # jobs/common.py

    tracker = common.experiment_tracker(cfg)
    assert tracker.parent_run_id != old_parent
    old = tracker.client.get_run(old_parent)
    assert old.info.status == "FAILED" and "superseded" in old.data.tags and old.info.run_name.endswith("(superseded)")
    assert tracker.client.get_run(tracker.parent_run_id).data.params["seed"] == str(cfg.seed)
    # with a finished stage, a changed configuration is refused, as its outputs would mix settings
    storage.write_bytes(cfg.stage_record("source_only"), b"{}")
    changed = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(benchmark_data, out, "seed=5"))
    with pytest.raises(SystemExit, match="stages finished under the old settings: source_only"):
        common.experiment_tracker(changed)
    # a section the experiment does not run is not part of it: STvM's settings of an IAST experiment
    unused = config.load(ExperimentConfig, "configs/benchmark.yaml", _tiny(benchmark_data, out, "stvm.proxy_scale=8"))
    assert common.experiment_tracker(unused).parent_run_id == tracker.parent_run_id


def _marked(marker: bytes) -> list[int]:
    return processes.marked({marker})


@pytest.mark.slow  # a private Ray instance started and stopped: a minute or more each
@pytest.mark.parametrize("how, grace", [
    ("SIGTERM", 60),
    # SIGKILL gives the driver no chance: Ray's DashboardAgent and RuntimeEnvAgent outlive it
    # and exit once they find their raylet gone (measured: 60-120 s).
    ("SIGKILL", 240),
])
def test_a_stopped_job_leaves_no_process_behind(benchmark_data, tmp_path, how, grace):
    import signal
    import time
    import uuid

    marker = f"IAST_ORPHAN_TEST={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a private instance
    env[marker.split("=")[0]] = marker.split("=")[1]
    job = subprocess.Popen(
        [sys.executable, JOB, "--config", "configs/benchmark.yaml",
         *_tiny(benchmark_data, tmp_path / "out", "source_only.iterations=100000")],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        for line in job.stdout:  # until training runs: Ray, its agents and a train worker are up
            if "[source_only] source_only" in line or time.time() > deadline:
                break
        assert job.poll() is None, "the job ended before training started"
        assert len(_marked(marker.encode())) > 3  # driver, raylet, agents, workers
        job.send_signal(getattr(signal, how))
        job.wait(timeout=120)
        deadline = time.time() + grace
        while _marked(marker.encode()) and time.time() < deadline:
            time.sleep(1)
        left = _marked(marker.encode())
        names = [open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ")[:80] for p in left]
        assert not left, f"left running {grace} s after {how}: {names}"
    finally:
        for pid in _marked(marker.encode()):
            os.kill(pid, signal.SIGKILL)


_OUTLIVER = r"""
import os, subprocess, sys
sys.path.insert(0, "jobs")
import common, ray

raylets = common.start_local_ray(num_cpus=1, include_dashboard=False)

@ray.remote
def leave_a_process():  # a grandchild of the worker, parented to init: Ray cannot see it
    return int(subprocess.run([sys.executable, "-c", "import subprocess, sys; print(subprocess.Popen("
                               "[sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True, "
                               "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)"],
                              capture_output=True, text=True, check=True).stdout)

pid = ray.get(leave_a_process.remote())
ray.shutdown()  # Ray's own shutdown: the process outlives it
os.kill(pid, 0)
print("outlived", pid, flush=True)
"""  # then the script exits: stop_local_ray, registered at exit, ends it


def test_a_process_that_outlives_the_jobs_ray_instance_is_ended_at_exit():
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a private instance
    done = subprocess.run([sys.executable, "-c", _OUTLIVER], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    pid = int(done.stdout.split("outlived")[1].split()[0])
    try:
        assert "outlived the job's Ray instance" in done.stderr and f"{pid} " in done.stderr
        time.sleep(0.5)  # SIGKILL is asynchronous; then the process is gone (a zombie of init at most)
        state = open(f"/proc/{pid}/stat").read().split(")")[1].split()[0] if os.path.exists(f"/proc/{pid}") else "gone"
        assert state in ("gone", "Z", "X"), f"still running: {state}"
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
