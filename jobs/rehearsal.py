"""The GTA5 -> Cityscapes reproduction rehearsed at the real image sizes, on CPU (make rehearsal).

    python jobs/rehearsal.py [--out outputs/rehearsal] [--source 8] [--target-train 16] [--target-val 2]
                             [--scale 1] [key.sub=value ...]

1. writes synthetic GTA5 (1914x1052) and Cityscapes (2048x1024, train and val) in their
   real layouts under <out>/data (pipeline.data.synthetic; kept for the next run when
   the counts and sizes are the same) and prepares them as jobs/prepare_data.py does;
2. runs configs/gta5_cityscapes.yaml end to end through jobs/run_experiment.py, with
   configs/protocols/rehearsal.yaml laid over it (the small model, 4 steps a stage, CPU
   workers), into <out>/run (made anew each time): source-only, the adversarial warm-up,
   three rounds (pseudo-labels at 1280x640, then 1536x768, with Ray Data; IAS selection;
   self-training on 1024x512 crops of the full-size images with the labels enlarged), the
   multi-scale evaluation at five sizes and with flip;
3. measures the round's DataLoader and one image of the final evaluation apart, and
   prints the report (pipeline.rehearsal), also written to <out>/rehearsal_report.json.

``--scale`` multiplies every image, crop and inference size (the tests run at 1/16);
``key.sub=value`` settings go to the experiment after the overlay's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from common import positive_int

import run_experiment

from pipeline import config as config_lib
from pipeline import rehearsal
from pipeline.data import synthetic
from pipeline.data.prepare import prepare
from pipeline.experiment import ExperimentConfig
from pipeline.tracking import default_tracking_uri

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = [os.path.join(ROOT, "configs", "gta5_cityscapes.yaml"), os.path.join(ROOT, "configs", "protocols", "rehearsal.yaml")]


def _scaled(value, scale: float):
    if isinstance(value, (list, tuple)):
        return [_scaled(v, scale) for v in value]
    return max(8, round(value * scale))


def scale_overrides(scale: float) -> list[str]:
    """Every size of the configs, times ``scale``, as key=value settings."""
    if scale == 1:
        return []
    cfg = config_lib.load(ExperimentConfig, CONFIGS)
    sizes = {"crop_size": cfg.crop_size, "source_crop_heights": cfg.source_crop_heights,
             "target_crop_heights": cfg.target_crop_heights, "final_eval.sizes": cfg.final_eval.sizes}
    for section in ("source_only", "adversarial", "self_training"):
        if getattr(cfg, section).val_size:
            sizes[f"{section}.val_size"] = getattr(cfg, section).val_size
    rounds = [{**config_lib.to_dict(r), "pseudo_label_size": _scaled(r.pseudo_label_size, scale)}
              for r in cfg.self_training.rounds]
    return [f"{k}={json.dumps(_scaled(v, scale))}" for k, v in sizes.items()] + \
        [f"self_training.rounds={json.dumps(rounds)}"]


def make_data(args, data: str) -> dict:
    """Writes the datasets (unless the same are there) and prepares them; seconds per part."""
    wanted = {"frames": [args.source, args.target_train, args.target_val], "scale": args.scale,
              "seed": args.seed}
    marker = os.path.join(data, "synthetic.json")
    parts = {}
    if not (os.path.exists(marker) and json.load(open(marker)) == wanted):
        shutil.rmtree(data, ignore_errors=True)
        start = time.perf_counter()
        synthetic.write(data, args.source, args.target_train, args.target_val, seed=args.seed,
                        source_size=_scaled(synthetic.GTA5_SIZE, args.scale),
                        target_size=_scaled(synthetic.CITYSCAPES_SIZE, args.scale))
        parts["render and write the PNGs"] = time.perf_counter() - start
        with open(marker, "w") as f:
            json.dump(wanted, f)
    for dataset, folder in (("gta5", "GTA5"), ("cityscapes", "cityscapes")):
        start = time.perf_counter()
        prepare(dataset, os.path.join(data, folder))
        parts[f"prepare {dataset}"] = time.perf_counter() - start
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/rehearsal")
    parser.add_argument("--source", type=positive_int, default=8, help="GTA5 frames")
    parser.add_argument("--target-train", type=positive_int, default=16, help="Cityscapes train images (the target)")
    parser.add_argument("--target-val", type=positive_int, default=2, help="Cityscapes val images")
    parser.add_argument("--scale", type=float, default=1.0, help="of every image and inference size (default 1: real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-only", action="store_true",
                        help="only build the report again from the last run under --out (same options)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings of the experiment")
    args = parser.parse_args(argv)

    out = os.path.abspath(args.out)
    data, output = os.path.join(out, "data"), os.path.join(out, "run")
    overrides = [f"output={output}", f"data.source.root={data}/GTA5", f"data.target.root={data}/cityscapes",
                 f"data.val.root={data}/cityscapes", *scale_overrides(args.scale), *args.overrides]
    measured = os.path.join(out, "rehearsal_run.json")  # what only the run itself can measure
    if not args.report_only:
        start, load = time.time(), os.getloadavg()
        prep = make_data(args, data)
        prep_wall = time.time() - start
        shutil.rmtree(output, ignore_errors=True)  # every stage runs, and is timed, again
        experiment = [arg for path in CONFIGS for arg in ("--config", path)] + overrides
        with rehearsal.MemoryMonitor() as memory:
            code = run_experiment.main(experiment)
        if code:
            return code
        with open(measured, "w") as f:
            json.dump({"command": "python jobs/rehearsal.py " + " ".join(sys.argv[1:] if argv is None else argv),
                       "start": start, "load_average": load, "preparation": prep, "preparation_s": prep_wall,
                       "memory": memory.peaks()}, f, indent=2)
    cfg = config_lib.load(ExperimentConfig, CONFIGS, overrides)
    report = build_report(cfg, json.load(open(measured)))
    path = os.path.join(out, "rehearsal_report.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("\n" + rehearsal.format_report(report) + f"\n\nreport: {path}")
    return 0


def build_report(cfg: ExperimentConfig, run: dict) -> dict:
    """The report of the run under cfg.output; ``run``: what the run measured itself."""
    sys.path.insert(0, ROOT)
    from benchmarks.estimate_cost import ASSUMED_V100_TFLOPS, flops

    from pipeline.models import build_model
    from pipeline.rounds import read_record

    import torch

    runs = rehearsal.stage_runs(cfg.tracking_uri or default_tracking_uri(cfg.output), cfg.name)
    rounds = range(1, len(cfg.self_training.rounds) + 1)
    stores = {f"round_{r}": rehearsal.label_store_report(cfg.label_store(r)) for r in rounds}
    prep = run["preparation"]
    stages = {"preparation": {"wall_s": round(run["preparation_s"], 2), "slowest_part": rehearsal._slowest(prep),
                              "parts_s": {k: round(v, 2) for k, v in prep.items()}}}
    experiment = runs.pop("experiment")  # the parent run: every stage, and the stages figure after them
    between = experiment["wall_s"] - sum(child["wall_s"] for child in runs.values())
    for stage, child in runs.items():
        section = cfg.self_training if stage.startswith("round_") else getattr(cfg, stage, None)
        stages[stage] = rehearsal.stage_report(stage, child, getattr(section, "iterations", 0), stores.get(stage))

    last = len(cfg.self_training.rounds)
    train_cfg = cfg.round_train_config(last, None)  # the largest labels (1536x768)
    with torch.device("meta"):
        step_flops = flops(build_model("deeplabv2_resnet101", cfg.num_classes), tuple(cfg.crop_size), backward=True)
    loader = rehearsal.loader_report(train_cfg, (1, 2), batches=3, tflops=ASSUMED_V100_TFLOPS,
                                     step_flops=step_flops)
    final = read_record(cfg, "final_eval")
    evaluation = rehearsal.evaluation_costs(cfg.model.arch, cfg.num_classes, final.checkpoint,
                                            cfg.data.val.samples()[0].image, cfg.final_eval.sizes,
                                            flip=cfg.final_eval.flip or cfg.final_eval.report_flip)
    return {
        "command": run["command"], "cores": os.cpu_count(), "load_average": run["load_average"],
        "load_average_end": os.getloadavg(), "total_s": round(time.time() - run["start"], 1), "experiment_s": round(experiment["wall_s"], 1),
        "between_stages_s": round(between, 1),  # Ray start, config checks, the stages figure
        "finished": cfg.finished_stages(),
        "stages": stages, "pseudo_labels": stores, "loader": loader,
        "evaluation_one_image": evaluation, "memory": run["memory"],
        "v100_step_gflop_per_image": round(step_flops / 1e9),
    }


if __name__ == "__main__":
    sys.exit(main())
