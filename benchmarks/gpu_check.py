"""The GPU check: what the cluster path's estimates assume, measured on one GPU in one call
(no Ray, no data: random images and labels of the protocol's sizes).

    .venv/bin/python benchmarks/gpu_check.py [--out gpu_check.json]      # on a GPU, ~2-4 min
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny         # the same code, tiny, on the CPU

1. Peak memory of one training step (source-only cross-entropy, AMP, Adam) at 8, 4 and 2
   images per GPU, next to pipeline.memory's estimate (what ExperimentConfig.problems()
   checks against compute.gpu_memory_gb); a batch that does not fit is reported as OOM.
2. Training steps/s with AMP at 2 images per GPU (the 4 x 16 GB setting's share).
3. Pseudo-labelling images/s at 1536x768 in fp32 and under fp16 autocast
   (compute.inference_amp), and the share of pixels whose label is the same both ways.

Not measured here (one GPU, one process): DDP's all-reduce over NVLink or between nodes,
SyncBatchNorm's cost, and Ray Data's actor pool; docs/performance.md says what they are
estimated at.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from pipeline import memory  # noqa: E402
from pipeline.evaluation import predict_probs  # noqa: E402
from pipeline.losses import cross_entropy  # noqa: E402
from pipeline.models import build_model, param_groups  # noqa: E402
from pipeline.train import TrainConfig  # noqa: E402

FULL = {"arch": "deeplabv2_resnet101", "crop": (1024, 512), "label_size": (1536, 768), "batches": (8, 4, 2),
        "speed_batch": 2, "steps": 20, "images": 20}
TINY = {"arch": "deeplabv2_small", "crop": (128, 64), "label_size": (128, 64), "batches": (2, 1),
        "speed_batch": 1, "steps": 2, "images": 2}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err)


def _trainer(arch: str, device):
    torch.manual_seed(0)
    model = build_model(arch, 19).to(device).train()
    optimizer = torch.optim.Adam(param_groups(model, 1e-4), betas=(0.9, 0.999))
    amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss

    return model, step


def _batch(n: int, crop, device):
    w, h = crop
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 3, h, w, generator=g).to(device)
    y = torch.randint(0, 19, (n, h, w), generator=g).to(device)
    return x, y


def peak_memory(setup: dict, device) -> list[dict]:
    """One step at each per-GPU batch: torch's peak allocated / reserved, and the estimate."""
    rows = []
    for n in setup["batches"]:
        cfg = TrainConfig(stage="source_only", name="check", storage="/tmp/gpu_check", iterations=1, lr=1e-4,
                          arch=setup["arch"], batch_size=n, crop_size=setup["crop"], use_gpu=device.type == "cuda")
        est = memory.train_step_gib(cfg)
        row = {"per_gpu_batch": n, "estimate_gib": round(est["total"], 2),
               "estimate_without_reserve_gib": round(est["total"] - est["reserve"], 2)}
        model = step = None
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            model, step = _trainer(setup["arch"], device)
            step(*_batch(n, setup["crop"], device))
            _sync(device)
            if device.type == "cuda":
                row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
                row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
            else:
                row["peak_allocated_gib"] = None  # torch keeps no peak for the CPU
        except RuntimeError as err:
            if not _is_oom(err):
                raise
            row["peak_allocated_gib"] = "OOM"
        finally:
            del model, step
        rows.append(row)
        print(f"  batch {n}/GPU: peak {row['peak_allocated_gib']} GiB allocated, "
              f"{row.get('peak_reserved_gib')} reserved; estimated {row['estimate_gib']} GiB "
              f"({row['estimate_without_reserve_gib']} before the reserve)", flush=True)
    return rows


def training_speed(setup: dict, device) -> dict:
    n = setup["speed_batch"]
    _, step = _trainer(setup["arch"], device)
    x, y = _batch(n, setup["crop"], device)
    for _ in range(2):  # warm-up: cuDNN's algorithm choice, the allocator
        step(x, y)
    _sync(device)
    t = time.perf_counter()
    for _ in range(setup["steps"]):
        step(x, y)
    _sync(device)
    rate = setup["steps"] / (time.perf_counter() - t)
    print(f"  training at {n}/GPU{' with AMP' if device.type == 'cuda' else ''}: {rate:.2f} steps/s "
          f"({rate * n:.1f} images/s)", flush=True)
    return {"per_gpu_batch": n, "amp": device.type == "cuda", "steps_per_s": round(rate, 3)}


def labelling_speed(setup: dict, device) -> dict:
    torch.manual_seed(0)
    model = build_model(setup["arch"], 19).to(device).eval()
    w, h = setup["label_size"]
    x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1)).to(device)
    out = {"size": [w, h]}
    labels = {}
    for name, autocast in (("fp32", False), ("autocast_fp16", True)):
        predict_probs(model, x, autocast=autocast)  # warm-up
        _sync(device)
        t = time.perf_counter()
        for _ in range(setup["images"]):
            probs = predict_probs(model, x, autocast=autocast)
        _sync(device)
        out[f"{name}_images_per_s"] = round(setup["images"] / (time.perf_counter() - t), 3)
        labels[name] = probs.argmax(1)
        print(f"  labelling {w}x{h}, {name}: {out[f'{name}_images_per_s']:.2f} images/s", flush=True)
    out["same_label_share"] = float((labels["fp32"] == labels["autocast_fp16"]).float().mean())
    out["autocast_takes_effect"] = device.type == "cuda"  # on the CPU both runs are fp32
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="the small model at tiny sizes (a test of this script)")
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --device cpu --tiny to test the script")
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    setup = TINY if args.tiny else FULL
    torch.backends.cudnn.benchmark = True  # fixed shapes, as in training
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "arch": setup["arch"], "crop": list(setup["crop"]),
        "gpu_memory_gib": (round(torch.cuda.get_device_properties(device).total_memory / 2**30, 2)
                           if device.type == "cuda" else None),
        "unmeasured": "DDP all-reduce (NVLink, between nodes), SyncBatchNorm, Ray Data's actor pool",
    }
    print(f"GPU check on {result['device']} (torch {result['torch']}, {setup['arch']}, crop {setup['crop']})")
    result["peak_memory"] = peak_memory(setup, device)
    result["training"] = training_speed(setup, device)
    result["labelling"] = labelling_speed(setup, device)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
