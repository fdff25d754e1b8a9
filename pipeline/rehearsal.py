"""What the full-size rehearsal measures (``jobs/rehearsal.py``, ``make rehearsal``).

The GTA5 -> Cityscapes config runs end to end on synthetic datasets at the real image
sizes (``pipeline.data.synthetic``) with a small model and a few steps per stage; this
module turns what that run leaves behind into a report:

- per stage, its wall time (the MLflow child run's start and end) and its slowest part;
- pseudo-labelling images/s split into decode, forward, selection and write (the label
  store manifests' ``timings``);
- label-store bytes per image, extrapolated to a full round of 2,975 Cityscapes images;
- the peak memory of every process of the run (the driver, the Ray workers: train
  workers and their DataLoader processes, labelling actors, decode and evaluation tasks),
  read from Linux's /proc (VmHWM, the kernel's own peak RSS of each process);
- the DataLoader images/s of the round's real crop pipeline against what one V100
  consumes at batch 8, and each part of a sample's cost (image decode, label-store read,
  augmentation).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np

from pipeline import processes, storage
from pipeline.data import streams
from pipeline.data.datasets import load_image
from pipeline.data.transforms import normalize, train_transform
from pipeline.evaluation import predict_probs
from pipeline.label_store import LabelStore, decode_label
from pipeline.models import build_model, load_checkpoint

CITYSCAPES_TRAIN = 2975  # the images a full round labels
V100_BATCH = 8


# -- peak memory of every process ---------------------------------------------------------------


_RAY_SERVICES = ("gcs_server", "raylet", "dashboard.py", "log_monitor.py", "monitor.py", "agent.py")


def _role(title: str, parent_role: str | None) -> str:
    """What a process of the run is, from its title (Ray workers name their task or actor)."""
    if parent_role in ("train worker", "train data loader"):
        return "train data loader"  # forked by a train worker: same title as its parent
    for key, role in (("RayTrainWorker", "train worker"), ("_Predictor", "label actor"),
                      ("_load_images", "decode task"), ("_evaluate_shard", "eval task"),
                      ("_predict_stages", "stages figure task"), ("TrainController", "train controller")):
        if key in title:
            return role
    if title.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "ray service"
    if title.startswith("ray::"):
        return "other ray worker"
    # A worker that has not named itself yet runs default_worker.py (or setup_worker.py)
    # with arguments such as --raylet-name: only the program, not its arguments, says service.
    program = [part.rsplit("/", 1)[-1] for part in title.split()[:3] if not part.startswith("-")]
    if any(p in ("default_worker.py", "setup_worker.py") for p in program):
        return "other ray worker"
    return "ray service" if any(p in _RAY_SERVICES for p in program) else "other"


class MemoryMonitor:
    """Polls /proc every ``interval`` s for this process and its descendants; keeps each
    one's peak RSS (VmHWM: exact, not sampled) and what it was (``_role``). Linux only:
    elsewhere it records the driver alone (``resource``)."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.pids = interval, {}  # pid -> {"role", "peak_kb"}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        if not os.path.isdir("/proc/self"):
            return
        found = processes.table()
        parents = {pid: ppid for pid, (ppid, _, _) in found.items()}
        titles = {pid: cmdline for pid, (_, _, cmdline) in found.items()}
        me = os.getpid()
        tree, frontier = {me}, [me]
        while frontier:
            frontier = [p for p, parent in parents.items() if parent in frontier and p not in tree]
            tree.update(frontier)
        for pid in sorted(tree):  # parents have lower pids than their children here, mostly
            try:
                status = processes.status(pid)
            except OSError:
                continue
            peak = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
            known = self.pids.setdefault(pid, {"role": None, "title": "", "peak_kb": 0})
            known["peak_kb"] = max(known["peak_kb"], peak)
            parent_role = self.pids.get(parents.get(pid), {}).get("role")
            role = "driver" if pid == me else _role(titles.get(pid, ""), parent_role)
            # An idle or starting worker shows its task later; a train worker's child seen
            # before its parent was named is its data loader.
            if known["role"] in (None, "other ray worker", "other") or role == "train data loader":
                known["role"], known["title"] = role, titles.get(pid, "")[:120]

    def peaks(self) -> dict[str, dict]:
        """Per role: the largest peak RSS of its processes (MiB), how many there were, and
        the title of the largest."""
        out: dict[str, dict] = {}
        for info in sorted(self.pids.values(), key=lambda i: -i["peak_kb"]):
            role = out.setdefault(info["role"], {"peak_mib": round(info["peak_kb"] / 1024, 1), "processes": 0,
                                                 "largest": info["title"]})
            role["processes"] += 1
        if "driver" not in out:  # no /proc: the driver's own peak
            import resource

            out["driver"] = {"peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                             "processes": 1}
        return dict(sorted(out.items(), key=lambda kv: -kv[1]["peak_mib"]))


# -- the stages, from MLflow and the label stores -----------------------------------------------


def stage_runs(tracking_uri: str, experiment: str) -> dict[str, dict]:
    """Each stage's child run: wall seconds and its last metrics, in the order they ran."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], "tags.stage != ''", max_results=1000) if found else []
    stages = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):  # the parent's stage tag is "experiment"

        end = run.info.end_time or int(time.time() * 1000)
        stages[run.data.tags["stage"]] = {"wall_s": (end - run.info.start_time) / 1000, "metrics": run.data.metrics}
    return stages


def _folder_bytes(uri: str) -> int:
    return sum(p.stat().st_size for p in Path(uri).rglob("*") if p.is_file()) if os.path.isdir(uri) else 0


def _full_coverage_label_bytes(store_uri: str) -> tuple[float, float]:
    """Bytes per image of labels/ had every pixel been selected: the predictions' argmax
    written as the store writes label parts, and held as a training worker holds a label
    (``streams.held_label``). The rehearsal's few-step model selects few
    pixels or none, and an all-ignore label compresses to nothing."""
    import io

    import pyarrow.parquet as pq

    total = held = images = 0
    for part in sorted(Path(store_uri, "predictions").glob("part-*.parquet")):
        table = pq.read_table(part, columns=["prediction"]).rename_columns(["label"])
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=16)
        total, images = total + buf.tell(), images + table.num_rows
        held += sum(len(streams.held_label(label)) for label in table.column("label").to_pylist())
    return total / max(1, images), held / max(1, images)


def _held_label_bytes(store_uri: str) -> float:
    """Bytes per image a training worker holds of this store's labels (``streams.held_label``)."""
    store, total = LabelStore(store_uri), 0
    for group in store.iter_labels(columns=["label"]):
        total += sum(len(streams.held_label(label)) for label in group.column("label").to_pylist())
    return total / max(1, store.manifest()["num_images"])


def label_store_report(store_uri: str) -> dict:
    """A label store's timings (images/s per part of the work) and its bytes per image."""
    manifest = LabelStore(store_uri).manifest()
    n = manifest["num_images"]
    predict, select = manifest["timings"]["predict"], manifest["timings"]["select"]
    width, height = manifest["prediction_settings"]["size"]

    def rate(seconds: float) -> float | None:
        return round(n / seconds, 2) if seconds else None

    parts = {"decode": predict.get("decode_s", 0.0), "forward": predict.get("forward_s", 0.0),
             "selection": select["wall_s"] - select["write_s"],
             "write": predict.get("write_s", 0.0) + select["write_s"]}
    sizes = {kind: _folder_bytes(storage.join(store_uri, kind)) / n for kind in ("predictions", "labels")}
    sizes["labels at full coverage"], held_full = _full_coverage_label_bytes(store_uri)
    held = _held_label_bytes(store_uri)
    return {
        "images": n, "size": [width, height], "coverage": manifest["statistics"]["coverage_all"],
        "wall_s": round(predict.get("wall_s", 0.0) + select["wall_s"], 2),
        "images_per_s": rate(predict.get("wall_s", 0.0) + select["wall_s"]),
        "images_per_s_by_part": {k: rate(v) for k, v in parts.items()},
        "seconds_by_part": {k: round(v, 2) for k, v in parts.items()},
        "bytes_per_image": {k: round(v) for k, v in sizes.items()},
        f"bytes_per_{CITYSCAPES_TRAIN}_images": {k: round(v * CITYSCAPES_TRAIN) for k, v in sizes.items()},
        # what training workers hold in memory, all their shards together: every label row,
        # zlib-compressed (streams.pseudo_labelled); raw, as before that was done
        f"labels_in_memory_{CITYSCAPES_TRAIN}_images": {
            "held": round(held * CITYSCAPES_TRAIN), "held at full coverage": round(held_full * CITYSCAPES_TRAIN),
            "raw": width * height * CITYSCAPES_TRAIN},
    }


def _slowest(parts: dict[str, float]) -> list:
    name = max(parts, key=parts.get)
    return [name, round(parts[name], 2)]


def stage_report(stage: str, run: dict, iterations: int, store: dict | None) -> dict:
    """Wall time and the parts of a stage: training steps (of which data wait), the
    pseudo-labels of a round, and the rest (start-up, validation, checkpoints)."""
    m, parts = run["metrics"], {}
    if store is not None:
        parts.update({f"pseudo-labels: {k}": v for k, v in store["seconds_by_part"].items()})
    if "train/steps_per_s" in m and iterations:
        steps = iterations / m["train/steps_per_s"]
        wait = m.get("train/data_wait_fraction", 0.0)
        parts["training steps: compute"] = steps * (1 - wait)
        parts["training steps: data wait"] = steps * wait
    parts["rest (start-up, validation, checkpoints, tracking)"] = max(0.0, run["wall_s"] - sum(parts.values()))
    out = {"wall_s": round(run["wall_s"], 2), "slowest_part": _slowest(parts),
           "parts_s": {k: round(v, 2) for k, v in parts.items()}}
    if "train/data_wait_fraction" in m:
        out["data_wait_fraction"] = round(m["train/data_wait_fraction"], 4)
    return out


# -- the parts measured apart: the crop pipeline, one multi-scale evaluation -------------------


def loader_report(train_cfg, loader_workers: tuple[int, ...], batches: int, tflops: tuple[float, ...],
                  step_flops: float) -> dict:
    """The round's DataLoader (label store, full-size images, the real crops) in images/s
    with each number of loader processes, against a V100's consumption at batch 8 with a
    step of ``step_flops`` per image at each assumed throughput; and a sample's cost by part."""
    import dataclasses

    source = streams.pseudo_labelled(train_cfg.label_store)
    measured = {}
    for workers in loader_workers:
        cfg = dataclasses.replace(train_cfg, loader_workers=workers, batch_size=V100_BATCH, decoded_cache_mb=0)
        it = streams.batches(source, cfg.target_crop_heights, cfg, start=0, salt=0)
        next(it)  # the processes start and fill their queues
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        measured[workers] = round(batches * V100_BATCH / (time.perf_counter() - start), 2)
        del it
    # A step of V100_BATCH images takes V100_BATCH * step_flops / throughput seconds.
    need = {f"{t:g} TFLOPS": round(t * 1e12 / step_flops, 2) for t in tflops}
    step_s = {f"{t:g} TFLOPS": round(V100_BATCH * step_flops / (t * 1e12), 3) for t in tflops}
    return {"images_per_s_by_loader_processes": measured, "v100_consumes_images_per_s": need, "v100_step_s": step_s,
            "sample_seconds_by_part": sample_costs(train_cfg, n=4)}


def sample_costs(train_cfg, n: int) -> dict:
    """Seconds per sample of the round's pipeline, by part, on its first ``n`` images."""
    rows = LabelStore(train_cfg.label_store).read_labels(columns=["image", "label", "height", "width"]).to_pylist()
    transform = train_transform(tuple(train_cfg.target_crop_heights), (train_cfg.crop_size[1], train_cfg.crop_size[0]))
    from PIL import Image

    times = {"image decode": 0.0, "label-store read (decode, enlarge)": 0.0, "augment and crop": 0.0}
    for i, row in enumerate(rows[:n]):
        t0 = time.perf_counter()
        image = load_image(row["image"])
        t1 = time.perf_counter()
        label = decode_label(row)
        label = np.asarray(Image.fromarray(label).resize(image.shape[1::-1], Image.NEAREST))
        t2 = time.perf_counter()
        transform(image, label, np.random.default_rng(i))
        t3 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key] += seconds
    count = min(n, len(rows))
    out = {k: round(v / count, 4) for k, v in times.items()}
    out["label-store read share"] = round(times["label-store read (decode, enlarge)"] / sum(times.values()), 4)
    return out


def evaluation_costs(arch: str, num_classes: int, checkpoint: str, image_uri: str, sizes, flip: bool) -> dict:
    """One val image of the final evaluation, part by part: decode, then each size's
    forward pass (with the flipped one) up to the label size."""
    import torch

    model = build_model(arch, num_classes)
    load_checkpoint(model, checkpoint)
    model.eval()
    start = time.perf_counter()
    x = normalize(torch.from_numpy(load_image(image_uri))[None])
    parts = {"decode": time.perf_counter() - start}
    for w, h in sizes:
        start = time.perf_counter()
        predict_probs(model, x, sizes=[(w, h)], flip=flip, output_size=tuple(x.shape[-1:-3:-1]))
        parts[f"{w}x{h}{' + flip' if flip else ''}"] = time.perf_counter() - start
    return {"seconds_by_part": {k: round(v, 3) for k, v in parts.items()}, "slowest_part": _slowest(parts)}


# -- the report in words ---------------------------------------------------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def format_report(report: dict) -> str:
    lines = [f"rehearsal: {report['command']}",
             f"  {report['cores']} cores, load average {report['load_average'][0]:.2f} at the start, "
             f"{report['load_average_end'][0]:.2f} at the end; total {report['total_s']:.0f} s, the experiment "
             f"{report['experiment_s']:.0f} s ({report['between_stages_s']:.0f} s of it between the stages: "
             "Ray's start, the checks, the stages figure)",
             "", "stage                 wall s   slowest part"]
    for stage, s in report["stages"].items():
        name, seconds = s["slowest_part"]
        extra = f"  (data wait {100 * s['data_wait_fraction']:.1f}% of step time)" if "data_wait_fraction" in s else ""
        lines.append(f"  {stage:18s} {s['wall_s']:8.1f}   {name} {seconds:.1f} s{extra}")
    lines.append("\npseudo-labelling (images/s: in all, and each part alone)")
    for stage, p in report["pseudo_labels"].items():
        by = ", ".join(f"{k} {v}" for k, v in p["images_per_s_by_part"].items())
        lines.append(f"  {stage} at {p['size'][0]}x{p['size'][1]}, {p['images']} images: {p['images_per_s']} "
                     f"images/s ({by})")
        b, full = p["bytes_per_image"], p[f"bytes_per_{CITYSCAPES_TRAIN}_images"]
        held = p[f"labels_in_memory_{CITYSCAPES_TRAIN}_images"]
        lines.append(f"    store per image: predictions/ {_mib(b['predictions'])}, labels/ {_mib(b['labels'])} at "
                     f"coverage {100 * p['coverage']:.1f}% ({_mib(b['labels at full coverage'])} at 100%); for "
                     f"{CITYSCAPES_TRAIN:,} images: {_mib(full['predictions'])} + {_mib(full['labels'])} "
                     f"({_mib(full['labels at full coverage'])}); labels the training workers hold, compressed: "
                     f"{_mib(held['held'])} ({_mib(held['held at full coverage'])} at 100%; raw {_mib(held['raw'])})")
    loader = report["loader"]
    lines.append("\nDataLoader of the round (full-size images, label store, 1024x512 crops, batch 8)")
    for workers, rate in loader["images_per_s_by_loader_processes"].items():
        lines.append(f"  {workers} loader process(es): {rate} images/s")
    lines.append("  one V100 consumes at batch 8: " + ", ".join(
        f"{v} images/s at {k}" for k, v in loader["v100_consumes_images_per_s"].items()))
    costs = loader["sample_seconds_by_part"]
    lines.append("  per sample: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in costs.items() if "share" not in k)
                 + f"; label-store read share {100 * costs['label-store read share']:.1f}%")
    e = report["evaluation_one_image"]
    lines.append("\nfinal evaluation, one val image part by part: "
                 + ", ".join(f"{k} {v:.2f} s" for k, v in e["seconds_by_part"].items()))
    lines.append("\npeak memory (RSS) per process")
    for role, m in report["memory"].items():
        lines.append(f"  {role:22s} {m['peak_mib']:9.1f} MiB  ({m['processes']} process{'es' if m['processes'] > 1 else ''})")
    return "\n".join(lines)
