"""On paper: wall time and cost of the full GTA5 -> Cityscapes reproduction on V100 nodes.

    .venv/bin/python benchmarks/estimate_cost.py [--tflops 15 40] [--price 3.06]

What is measured here: the FLOPs of every forward / training step of DeepLab-v2
ResNet-101 at the protocol's sizes (torch's FlopCounterMode on the model code, on the
meta device), and this CPU's effective throughput on a real ResNet-101 DeepLab-v2
forward pass. What is assumed: a V100's *effective* throughput under mixed precision
(a range, --tflops), DDP scaling efficiency (--efficiency), and the on-demand price of a
1-V100 node (p3.2xlarge list price, --price). The training stages keep the released
global batch (8; 4 for the adversarial warm-up), so they use at most 8 (4) GPUs;
pseudo-labelling and evaluation use every GPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import build_model

CITYSCAPES_TRAIN, CITYSCAPES_VAL = 2975, 500
MST = ((1024, 512), (1280, 640), (1536, 768), (1800, 900), (2048, 1024))
# A V100's effective mixed-precision throughput, TFLOPS: assumed, not measured (no GPU has
# run benchmarks/gpu_check.py yet); also the rehearsal's yardstick for the data loaders.
ASSUMED_V100_TFLOPS = (15.0, 40.0)


def flops(model, size, backward=False) -> float:
    w, h = size
    x = torch.empty(1, 3, h, w, device="meta")
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tflops", type=float, nargs="+", default=list(ASSUMED_V100_TFLOPS),
                        help="assumed effective V100 TFLOPS under AMP (default: 15 and 40)")
    parser.add_argument("--efficiency", type=float, default=0.85, help="assumed DDP scaling efficiency beyond 1 GPU")
    parser.add_argument("--price", type=float, default=3.06, help="USD per hour of a 1-V100 node (p3.2xlarge list)")
    args = parser.parse_args()

    with torch.device("meta"):
        model = build_model("deeplabv2_resnet101", 19)
    step = flops(model, (1024, 512), backward=True)  # per image
    fwd = {s: flops(model, s) for s in MST}
    work = {  # stage: (FLOPs, max GPUs it can use)
        "source-only (25k it x 8)": (25_000 * 8 * step, 8),
        "adversarial (25k it x 4, source + target)": (25_000 * 4 * 2 * step, 4),
        "pseudo-labels r1 (1280x640)": (CITYSCAPES_TRAIN * fwd[(1280, 640)], None),
        "self-training r1 (6.2k it x 8)": (6_200 * 8 * step, 8),
        "pseudo-labels r2, r3 (1536x768)": (2 * CITYSCAPES_TRAIN * fwd[(1536, 768)], None),
        "self-training r2, r3": (2 * 6_200 * 8 * step, 8),
        "final MST + flip evaluation": (CITYSCAPES_VAL * 2 * sum(fwd.values()), None),
    }

    cpu_model = build_model("deeplabv2_resnet101", 19).eval()
    x = torch.randn(1, 3, 256, 512)
    with torch.no_grad():
        cpu_model(x)
        start = time.perf_counter()
        cpu_model(x)
        seconds = time.perf_counter() - start
    cpu_tflops = flops(model, (512, 256)) / seconds / 1e12

    print("measured: FLOPs per image (DeepLab-v2 ResNet-101, 19 classes)")
    print(f"  training step at 1024x512 (forward + backward): {step / 1e9:8.0f} GFLOP")
    for s, f in fwd.items():
        print(f"  forward at {s[0]}x{s[1]}: {f / 1e9:27.0f} GFLOP")
    print(f"measured: this CPU ({torch.get_num_threads()} threads) runs a 512x256 forward in {seconds:.1f} s "
          f"= {cpu_tflops:.3f} effective TFLOPS")
    total = sum(f for f, _ in work.values())
    print(f"\nwork of the full reproduction: {total / 1e15:.0f} PFLOP")
    for name, (f, _) in work.items():
        print(f"  {name:44s} {f / 1e15:7.1f} PFLOP")
    print(f"  on this CPU that would take {total / (cpu_tflops * 1e12) / 86400 / 365:.1f} years")

    print(f"\nestimate on 1-V100 nodes (assumed: {args.efficiency:.0%} DDP efficiency, ${args.price}/node-hour):")
    print("| nodes | " + " | ".join(f"wall time at {t:g} TFLOPS" for t in args.tflops)
          + " | " + " | ".join(f"cost at {t:g} TFLOPS" for t in args.tflops) + " |")
    print("|---:|" + "---:|" * (2 * len(args.tflops)))
    for nodes in (1, 4, 16):
        hours = []
        for t in args.tflops:
            seconds = 0.0
            for f, cap in work.values():
                gpus = min(nodes, cap or nodes)
                speed = t * 1e12 * (1 if gpus == 1 else gpus * args.efficiency)
                seconds += f / speed
            hours.append(seconds / 3600)
        print(f"| {nodes} | " + " | ".join(f"{h:.1f} h" for h in hours) + " | "
              + " | ".join(f"${h * nodes * args.price:,.0f}" for h in hours) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
