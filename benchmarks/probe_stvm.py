"""STvM's settings probed on the built-in benchmark: one source-free stage from a finished
source-only model, in this process (no Ray: pipeline.train.fit_local), then its val
mIoU-19 and its teacher's label precision, plain and weighted by reliability.

    make demo    # once: the source-only model this starts from
    python benchmarks/probe_stvm.py [--steps 900] [--from outputs/benchmark] stvm.teacher_momentum=0.999 ...

Settings are the stvm stage's keys (STvMConfig's, pipeline/methods/stvm.py, and lr,
backbone_lr_mult), as ``<key>=<value>``, and ``compute.<key>=<value>`` (e.g.
compute.cpus_per_worker=1 for two probes side by side); the rest is configs/benchmark.yaml's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config  # noqa: E402
from pipeline.experiment import ExperimentConfig  # noqa: E402
from pipeline.train import fit_local  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", default="outputs/benchmark",
                        help="a finished demo output: its source-only checkpoint is the start (default outputs/benchmark)")
    parser.add_argument("--data", default="data/benchmark")
    parser.add_argument("--steps", type=int, default=900, help="STvM steps (default 900: the demo's three rounds)")
    parser.add_argument("--out", default="/tmp/probe_stvm", help="checkpoints of the probe (default /tmp/probe_stvm)")
    parser.add_argument("settings", nargs="*", help="<stvm key>=<value>, compute.<key>=<value>")
    args = parser.parse_args(argv)
    record = os.path.join(args.source, "stages", "source_only.json")
    if not os.path.exists(record):
        parser.exit(2, f"{record} not found: run `make demo` first (or give --from)\n")
    start = json.load(open(record))["checkpoint"]
    overrides = [s if s.startswith(("stvm.", "compute.")) else f"stvm.{s}" for s in args.settings]
    d = args.data
    cfg = config.load(ExperimentConfig, "configs/benchmark.yaml", [
        f"output={args.out}", f"data.source.root={d}/source", f"data.source_val=null",
        f"data.target.root={d}/target", f"data.val.root={d}/target", f"model.init={start}",
        "source_only.iterations=0", "self_training.rounds=[]", f"stvm.iterations={args.steps}", "oracle.iterations=0",
        f"stvm.checkpoint_every={args.steps}", *overrides])
    train = dataclasses.replace(cfg.stvm_train_config(start), name=f"stvm-{time.strftime('%Y%m%d-%H%M%S')}",
                                log_every=max(1, args.steps // 3))
    t = time.perf_counter()
    m = fit_local(train).metrics
    print(f"\nSTvM {' '.join(args.settings) or '(the config)'}, {args.steps} steps from {start}:")
    print(f"  val mIoU-19 {100 * m['val/mIoU-19']:.2f}; teacher labels' precision {100 * m['stvm/teacher_precision']:.1f}%, "
          f"weighted by reliability {100 * m['stvm/teacher_precision_weighted']:.1f}%; mean reliability "
          f"{m['stvm/reliability']:.3f}; {time.perf_counter() - t:.0f} s")
    print(yaml.safe_dump({"stvm": config.to_dict(train.stvm)}, sort_keys=False).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
