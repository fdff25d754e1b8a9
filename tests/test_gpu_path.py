"""The GPU cluster path, checked without a GPU: placement of a stage's DDP workers, one
gradient all-reduce per adversarial step, fp16 autocast only where it takes effect, the
GradScaler's state in the checkpoint."""

from __future__ import annotations

import pytest

# Only light imports at the top: the two-process test's workers import this module again.


def _train_cfg(tmp_path, **kw):
    from pipeline.train import TrainConfig

    base = dict(stage="source_only", name="run", storage=str(tmp_path / "runs"), iterations=5, lr=1e-3,
                arch="deeplabv2_small", batch_size=4, num_workers=4, use_gpu=True, cpus_per_worker=6)
    base.update(kw)
    return TrainConfig(**base)


def test_a_stages_workers_are_strictly_packed_on_one_node_by_default(tmp_path):
    from pipeline.train import scaling_config

    scaling = scaling_config(_train_cfg(tmp_path))
    assert scaling.placement_strategy == "STRICT_PACK"
    assert (scaling.num_workers, scaling.use_gpu) == (4, True)
    assert scaling._resources_per_worker_not_none == {"CPU": 6, "GPU": 1}  # what Ray reserves per worker
    # the bundles Ray reserves: one per worker, on one node
    assert scaling.as_placement_group_factory().strategy == "STRICT_PACK"
    assert scaling_config(_train_cfg(tmp_path, placement_strategy="SPREAD")).placement_strategy == "SPREAD"


def test_the_compute_setting_reaches_every_stage_and_is_checked(tmp_path):
    from pipeline import config
    from pipeline.experiment import ExperimentConfig

    data = {"target": {"dataset": "cityscapes", "root": str(tmp_path), "split": "train"},
            "val": {"dataset": "cityscapes", "root": str(tmp_path), "split": "val"},
            "source": {"dataset": "gta5", "root": str(tmp_path), "split": "train"}}
    raw = {"name": "x", "output": str(tmp_path / "out"), "data": data, "source_only": {"iterations": 10},
           "self_training": {"rounds": [{"alpha": 0.2, "lr": 1e-4, "pseudo_label_size": [64, 32]}],
                             "iterations": 10}}
    cfg = config.from_dict(ExperimentConfig, raw)
    assert cfg.warmup_config("source_only", None).placement_strategy == "STRICT_PACK"
    packed = config.from_dict(ExperimentConfig, {**raw, "compute": {"placement_strategy": "PACK"}})
    assert packed.round_train_config(1, "x.pt").placement_strategy == "PACK"
    assert cfg.round_label_config(1, "x.pt").amp is True  # fp16 labelling on GPUs unless turned off
    assert config.from_dict(ExperimentConfig, {**raw, "compute": {"inference_amp": False}}).round_label_config(
        1, "x.pt").amp is False
    with pytest.raises(ValueError, match="compute: placement_strategy must be one of STRICT_PACK"):
        config.from_dict(ExperimentConfig, {**raw, "compute": {"placement_strategy": "pack"}})


def _adversarial_step_worker(rank: int, port: int, out: str) -> None:
    """One adversarial step on a DDP-wrapped student, counting gradient all-reduces (each
    all-reduce of the whole model all-reduces bucket 0 once), as shipped and with
    no_sync patched away; then the same step without DDP for the reference gradients."""
    import os
    from contextlib import nullcontext
    from types import SimpleNamespace
    from unittest import mock

    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from pipeline import distributed
    from pipeline.methods.adversarial import Adversarial
    from pipeline.methods.base import StepContext
    from pipeline.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = SimpleNamespace(num_classes=19, discriminator_lr=1e-4, discriminator_betas=(0.9, 0.99), amp=False,
                          use_gpu=False, discriminator_schedule="constant", adversarial_weight=0.05)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank's own batch
    batch = {"main": [torch.randn(1, 3, 32, 64, generator=generator),
                      torch.randint(0, 19, (1, 32, 64), generator=generator)],
             "target": [torch.randn(1, 3, 32, 64, generator=generator)]}

    def step(ddp: bool):
        torch.manual_seed(0)  # the same student and discriminator every time
        method = Adversarial(cfg, build_model("deeplabv2_small", 19), torch.device("cpu"))
        rounds = []
        if ddp:
            method.model = DistributedDataParallel(method.student)

            def count(state, bucket):
                if bucket.index() == 0:
                    rounds.append(1)
                return allreduce_hook(None, bucket)

            method.model.register_comm_hook(None, count)
        ctx = StepContext(False)
        ctx.step = 1
        method.step(batch, ctx)
        return len(rounds), [p.grad.clone() for p in method.student.parameters() if p.requires_grad]

    try:
        shipped, grads = step(ddp=True)
        with mock.patch.object(distributed, "no_sync", lambda model: nullcontext()):
            unsynced, _ = step(ddp=True)
        _, local = step(ddp=False)
        torch.save({"shipped": shipped, "unsynced": unsynced, "grads": grads, "local": local},
                   os.path.join(out, f"adv{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_the_adversarial_step_all_reduces_the_students_gradients_once(tmp_path):
    import os

    import torch
    import torch.multiprocessing as mp

    port = 29700 + os.getpid() % 1000
    mp.spawn(_adversarial_step_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"adv{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["shipped"] == 1  # the first backward ran under no_sync
        assert r["unsynced"] == 2  # what it costs without
    # and the one all-reduce still averages both backwards of both ranks
    for g0, g1, l0, l1 in zip(ranks[0]["grads"], ranks[1]["grads"], ranks[0]["local"], ranks[1]["local"]):
        assert torch.equal(g0, g1)
        torch.testing.assert_close(g0, (l0 + l1) / 2, rtol=1e-4, atol=1e-6)


def test_the_loss_scales_are_checkpointed_and_restored(tmp_path):
    import torch

    from pipeline.train import LocalSession, _build, _restore, _save

    cfg = _train_cfg(tmp_path, use_gpu=False, num_workers=1, batch_size=2)
    session = LocalSession(cfg)
    student, optimizer, scheduler = _build(cfg)
    # CPU scalers stand in for the CUDA ones (same state; the CUDA one disables itself here)
    scaler, d_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for s, value in ((scaler, 1024.0), (d_scaler, 8.0)):
        s.scale(torch.ones(()))
        s.update(new_scale=value)  # what some overflows leave
    off = torch.amp.GradScaler("cpu", enabled=False)  # a run without AMP saves {}
    _save(session, cfg, 3, student, optimizer, scheduler, {},
          {"scaler": scaler, "discriminator_scaler": d_scaler, "other": off}, {}, {})

    fresh = {"scaler": torch.amp.GradScaler("cpu"), "discriminator_scaler": torch.amp.GradScaler("cpu"),
             "other": torch.amp.GradScaler("cpu"), "missing": torch.amp.GradScaler("cpu")}
    step, _ = _restore(session, student, optimizer, scheduler, {}, fresh)
    assert step == 3
    assert fresh["scaler"].get_scale() == 1024.0 and fresh["discriminator_scaler"].get_scale() == 8.0
    assert fresh["other"].get_scale() == fresh["missing"].get_scale() == 65536.0  # nothing saved: the default


def test_the_adversarial_method_declares_its_discriminators_scaler(tmp_path):
    import torch

    from pipeline.methods.adversarial import Adversarial
    from pipeline.models import build_model

    cfg = _train_cfg(tmp_path, stage="adversarial", use_gpu=False, num_workers=1, batch_size=2,
                     source=_data(tmp_path), target=_data(tmp_path))
    method = Adversarial(cfg, build_model("deeplabv2_small", 19), torch.device("cpu"))
    assert method.scalers() == {"discriminator_scaler": method.d_scaler}


def _data(tmp_path):
    from pipeline.data.datasets import DataConfig

    return DataConfig(dataset="cityscapes", root=str(tmp_path), split="train")


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the CUDA autocast built on a CPU machine
def test_inference_autocasts_to_fp16_on_cuda_only_and_leaves_the_cpu_bit_identical(small_checkpoint):
    import contextlib

    import torch

    from pipeline.evaluation import inference_autocast, predict_probs
    from pipeline.models import build_model, load_checkpoint

    on_gpu = inference_autocast(torch.device("cuda", 0), True)
    assert isinstance(on_gpu, torch.autocast) and (on_gpu.device, on_gpu.fast_dtype) == ("cuda", torch.float16)
    assert isinstance(inference_autocast(torch.device("cuda", 0), False), contextlib.nullcontext)
    assert isinstance(inference_autocast(torch.device("cpu"), True), contextlib.nullcontext)

    model = build_model("deeplabv2_small", 19)
    load_checkpoint(model, small_checkpoint)
    x = torch.randn(1, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    fp32 = predict_probs(model, x, sizes=[(128, 64), (64, 32)], flip=True)
    assert torch.equal(predict_probs(model, x, sizes=[(128, 64), (64, 32)], flip=True, autocast=True), fp32)


def test_labelling_records_autocast_only_where_it_takes_effect(benchmark_data, small_checkpoint, tmp_path):
    from pipeline.pseudo_label import PseudoLabelConfig, prediction_settings, uses_autocast

    target = benchmark_data["target"]
    samples = sorted(target.samples(), key=lambda s: s.name)

    def settings(**kw):
        cfg = PseudoLabelConfig(target=target, store=str(tmp_path / "s"), checkpoint=small_checkpoint,
                                arch="deeplabv2_small", size=(128, 64), **kw)
        return uses_autocast(cfg), prediction_settings(cfg, samples)

    cpu_used, cpu = settings()  # amp is on by default, but CPU actors never autocast
    off_used, gpu_fp32 = settings(gpus_per_worker=1, amp=False)
    gpu_used, gpu = settings(gpus_per_worker=1)
    assert (cpu_used, off_used, gpu_used) == (False, False, True)
    assert "autocast" not in cpu and gpu_fp32 == cpu  # existing stores keep their hashes
    assert gpu.pop("autocast") == "float16" and gpu == cpu  # fp16 and fp32 parts never mix


def _shipped(name: str, *overrides: str):
    from pathlib import Path

    from pipeline import config
    from pipeline.experiment import ExperimentConfig

    path = Path(__file__).resolve().parents[1] / "configs" / name
    return config.load(ExperimentConfig, str(path), list(overrides))


def _memory_problems(cfg) -> list[str]:
    return [p for p in cfg.problems() if "gpu_memory_gb" in p]


GPU_CONFIGS = ("gta5_cityscapes.yaml", "synthia_cityscapes.yaml", "gta5_cityscapes_stvm.yaml",
               "synthia_cityscapes_stvm.yaml", "cityscapes_nthu_stvm.yaml")


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_the_shipped_gpu_configs_fit_the_gpus_they_declare(name):
    cfg = _shipped(name)
    assert cfg.compute.use_gpu and cfg.compute.gpu_memory_gb is not None  # they are checked
    assert _memory_problems(cfg) == []
    # the 4 x 16 GB node's settings of the config's comment fit too
    assert _memory_problems(_shipped(name, "compute.num_workers=2", "compute.gpu_memory_gb=15.78")) == []


def test_a_batch_that_does_not_fit_the_gpu_is_refused_before_anything_starts_with_the_fix():
    found = _memory_problems(_shipped("gta5_cityscapes.yaml", "compute.gpu_memory_gb=15.78"))
    stages = sorted(p.split(":")[0] for p in found)
    assert stages == ["self_training", "source_only"]  # batch 8 on one GPU; the adversarial stage's 4 fit
    assert "8 image(s) of 1024x512 per GPU need about" in found[0]
    assert "set compute.num_workers to 2 or more" in found[0]
    # the sizes the review estimated independently (16.2 GiB before the reserve at 8 a GPU)
    from pipeline import memory

    est = memory.train_step_gib(_shipped("gta5_cityscapes.yaml").warmup_config("source_only", None))
    assert 15.5 < est["static"] + est["activations"] < 17.0 and est["per_gpu_batch"] == 8
    assert _memory_problems(_shipped("gta5_cityscapes.yaml", "compute.gpu_memory_gb=8")) != []  # even at 2 a GPU...
    # ... a GPU too small for 1 image says so
    tiny = _memory_problems(_shipped("gta5_cityscapes.yaml", "compute.gpu_memory_gb=2"))
    assert tiny and all("use GPUs with more memory" in p for p in tiny)


def test_the_memory_check_is_off_without_a_declared_gpu_memory():
    assert _memory_problems(_shipped("gta5_cityscapes.yaml", "compute.gpu_memory_gb=null")) == []
    assert _memory_problems(_shipped("benchmark.yaml", "compute.gpu_memory_gb=1")) == []  # a CPU config


# -- scripts/install_torch.sh, on a simulated machine ----------------------------------------


def _machine(tmp_path, gpus: str | None, torch_version: str = "2.13.0+cpu", pip_fails: bool = False):
    """A PATH with a fake nvidia-smi printing ``gpus`` (none: a CPU machine) and a fake
    python that reports ``torch_version`` and records its pip calls instead of running them."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {"python": f"""#!/bin/sh
if [ "$1" = -c ]; then echo {torch_version}; exit 0; fi
echo "$@" >> {tmp_path}/pip.log
exit {1 if pip_fails else 0}
"""}
    if gpus is not None:
        scripts["nvidia-smi"] = f"#!/bin/sh\nprintf '{gpus}'\n"
    for name, text in scripts.items():
        _write_script(bin_dir / name, text)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}, str(bin_dir / "python")


def _write_script(path, text: str) -> None:
    """Written beside and renamed into place: a script still open for writing cannot be
    executed (ETXTBSY), which a process forked meanwhile can cause."""
    import os
    import stat

    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.chmod(stat.S_IRWXU)
    os.replace(partial, path)


def _install_torch(env, python, *args):
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "install_torch.sh"
    return subprocess.run([str(script), python, *args], env=env, capture_output=True, text=True, timeout=60)


V100S = "Tesla V100-SXM2-16GB, 7.0, 580.65.06\\n" * 4


def test_a_v100_machine_gets_the_cuda_12_6_build(tmp_path):
    env, python = _machine(tmp_path, V100S)
    run = _install_torch(env, python)
    assert run.returncode == 0, run.stderr
    assert "4 NVIDIA GPU(s): Tesla V100-SXM2-16GB, compute capability 7.0-7.0" in run.stdout
    assert (tmp_path / "pip.log").read_text() == \
        "-m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126\n"


def test_the_check_refuses_the_wrong_build_with_the_command_and_passes_the_right_one(tmp_path):
    env, python = _machine(tmp_path, V100S, torch_version="2.13.0")  # PyPI's CUDA 13.0 build
    run = _install_torch(env, python, "--check")
    assert run.returncode == 1
    assert f"{python} -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in run.stderr
    assert not (tmp_path / "pip.log").exists()  # a check installs nothing
    _write_script(tmp_path / "bin" / "python", "#!/bin/sh\necho 2.13.0+cu126\n")
    assert _install_torch(env, python, "--check").returncode == 0
    assert _install_torch(env, python).returncode == 0 and not (tmp_path / "pip.log").exists()  # nothing to do


def test_a_cpu_machine_is_left_to_the_projects_install(tmp_path):
    env, python = _machine(tmp_path, None)
    run = _install_torch(env, python)
    assert run.returncode == 0 and "no NVIDIA GPU" in run.stdout
    assert _install_torch(env, python, "--check").returncode == 0
    assert not (tmp_path / "pip.log").exists()


@pytest.mark.parametrize("gpus, says", [
    ("Tesla P100-PCIE-16GB, 6.0, 580.65.06\\n", "compute capability 6.0: torch 2.13.0 has no kernels below 7.0"),
    ("Tesla V100-SXM2-16GB, 7.0, 535.104.05\\n", "driver 535.104.05 is older than the R560 branch"),
])
def test_gpus_the_build_cannot_serve_are_refused(tmp_path, gpus, says):
    env, python = _machine(tmp_path, gpus)
    run = _install_torch(env, python)
    assert run.returncode == 2 and says in run.stderr
    assert not (tmp_path / "pip.log").exists()


def test_a_failed_install_is_refused_with_the_command(tmp_path):
    env, python = _machine(tmp_path, V100S, pip_fails=True)
    run = _install_torch(env, python)
    assert run.returncode == 2
    assert f"{python} -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" in run.stderr


def test_make_installs_and_checks_torch_through_the_script():
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dry = subprocess.run(["make", "-n", "-B", "reproduce-gta5", "IMAGENET=/w/r101.pth"], cwd=root,
                         capture_output=True, text=True, timeout=60).stdout
    assert "scripts/install_torch.sh .venv/bin/python\n" in dry  # before the project's install
    assert dry.index("install_torch.sh .venv/bin/python\n") < dry.index("-e '.[test]'")
    assert "scripts/install_torch.sh .venv/bin/python --check" in dry  # before a reproduction


def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, str(script), "--device", "cpu", "--tiny", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    assert [r["per_gpu_batch"] for r in result["peak_memory"]] == [2, 1]
    assert all(r["estimate_gib"] > r["estimate_without_reserve_gib"] > 0 for r in result["peak_memory"])
    assert result["training"]["steps_per_s"] > 0
    labelling = result["labelling"]
    assert labelling["fp32_images_per_s"] > 0 and labelling["autocast_fp16_images_per_s"] > 0
    assert labelling["same_label_share"] == 1.0 and not labelling["autocast_takes_effect"]  # CPU: fp32 both ways
