"""Whether the Ray cluster can run an experiment's stages: the dry run's resource check
(``jobs/run_experiment.py --check``), before any stage starts.

The cluster is described by its node shapes: the node types the autoscaler may start
(their resources and maximum count), else the nodes alive now. Each stage's demand is
set against them as Ray would place it: a training stage's workers as one placement
group (STRICT_PACK: every bundle on one node), the labelling actors all at once (Ray
Data waits for the whole pool) with a CPU left beside them for its image-decode tasks,
evaluation tasks one at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import yaml


@dataclass(frozen=True)
class NodeShape:
    name: str
    resources: dict[str, float]  # CPU, GPU, custom resources of one node
    count: float  # how many such nodes there are or may be started (math.inf: no limit)


# Where `ray up` leaves the cluster launcher's config on the head (the job's driver runs there).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"


def node_shapes() -> list[NodeShape]:
    """The shapes of the connected cluster's nodes, from the first source that has them:
    the node types the autoscaler reported to Ray's GCS, the cluster launcher's config on
    this head node, or the nodes alive now."""
    import ray
    from ray._private.state import state

    config = state.get_cluster_config()
    groups = list(config.node_group_configs) if config is not None else []
    if groups:
        return [NodeShape(g.name, dict(g.resources), math.inf if g.max_count == -1 else g.max_count)
                for g in groups if g.max_count != 0]
    launcher = os.path.expanduser(LAUNCHER_CONFIG)
    if os.path.exists(launcher):
        return launcher_shapes(yaml.safe_load(open(launcher)))
    alive = [n for n in ray.nodes() if n["Alive"]]
    return [NodeShape(n["NodeManagerAddress"] + (" (head)" if _is_head(n) else ""), dict(n["Resources"]), 1)
            for n in alive]


def launcher_shapes(config: dict) -> list[NodeShape]:
    """The node types of a cluster launcher config (cluster/aws-v100.yaml): the head once,
    each worker type up to its max_workers."""
    head = config["head_node_type"]
    return [NodeShape(name, dict(node.get("resources", {})), 1 if name == head else node.get("max_workers", 0))
            for name, node in config["available_node_types"].items()
            if name == head or node.get("max_workers", 0) > 0]


def _is_head(node: dict) -> bool:
    return any(key.startswith("node:__internal_head__") for key in node["Resources"])


@dataclass(frozen=True)
class Demand:
    what: str  # the stage, for the message
    bundle: dict[str, float]  # one worker's resources
    count: int  # workers
    packed: bool  # all on one node (STRICT_PACK)
    at_once: bool  # all must run together (a placement group, an actor pool); else one at a time
    beside: dict[str, float] | None = None  # must fit on some node while every worker is up


def demands(cfg) -> list[Demand]:
    """What ``cfg`` (an ExperimentConfig) asks of the cluster, stage by stage, with the
    resources its stages request (pipeline.train.scaling_config, the labelling actors'
    and the evaluation tasks' options)."""
    from pipeline.pseudo_label import _ray_actor_args

    c = cfg.compute
    worker = {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}
    found = [Demand(f"training ({c.placement_strategy})", worker, c.num_workers,
                    packed=c.placement_strategy == "STRICT_PACK", at_once=True)]
    if cfg.self_training.rounds:
        label = cfg.round_label_config(1, None)
        args = _ray_actor_args(label)
        actor = {"CPU": args["num_cpus"], **({"GPU": args["num_gpus"]} if "num_gpus" in args else {})}
        # Ray Data's image-decode tasks (1 CPU each, its default) feed the actors: with every
        # CPU held by an actor they never start and labelling waits forever (platform notes).
        found.append(Demand("pseudo-labelling actors", actor, label.num_workers, packed=False, at_once=True,
                            beside={"CPU": 1}))
    found.append(Demand("evaluation tasks", worker, c.eval_workers, packed=False, at_once=False))
    return found


def _fits(bundle: dict[str, float], resources: dict[str, float], times: float = 1) -> bool:
    return all(resources.get(key, 0) >= amount * times for key, amount in bundle.items() if amount > 0)


def _describe(resources: dict[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if k in ("CPU", "GPU")}
    return ", ".join(f"{k} {v:g}" for k, v in sorted(shown.items())) or "no CPU or GPU"


def _nodes(shapes: list[NodeShape]) -> str:
    return "; ".join(f"{s.name}: {_describe(s.resources)}" + ("" if s.count == 1 else f" (x{s.count:g})")
                     for s in shapes)


def problems(cfg, shapes: list[NodeShape]) -> list[str]:
    """Every demand of ``cfg`` the cluster cannot place, each with what it asks and what
    the nodes have."""
    nodes = _nodes(shapes)
    found = []
    for d in demands(cfg):
        asks = f"{d.count} x {{{_describe(d.bundle)}}}"
        if not any(_fits(d.bundle, s.resources) for s in shapes):
            found.append(f"{d.what}: no node can hold one worker of {asks} (the cluster's nodes: {nodes})")
        elif d.packed and not any(_fits(d.bundle, s.resources, d.count) for s in shapes):
            found.append(f"{d.what}: no node can hold all {asks} together (the cluster's nodes: {nodes}); "
                         "lower compute.num_workers, or set compute.placement_strategy=PACK to spread them "
                         "(DDP then all-reduces between nodes)")
        elif d.at_once:
            room = sum(s.count * _per_node(d.bundle, s.resources) for s in shapes)
            if room < d.count:
                found.append(f"{d.what}: the cluster holds {room:g} of the {asks} at once (its nodes: {nodes})")
            elif d.beside and not _room_beside(d, shapes, room):
                found.append(f"{d.what}: with all {asks} up, no node has {{{_describe(d.beside)}}} left for "
                             f"Ray Data's image-decode tasks, so labelling would wait forever (the cluster's nodes: "
                             f"{nodes}); lower compute.cpus_per_label_worker to leave a CPU on a node, or "
                             "compute.label_workers")
    return found


def _per_node(bundle: dict[str, float], resources: dict[str, float]) -> int:
    """Whole workers of ``bundle`` one node holds, as Ray places bundles."""
    return min(math.floor(resources.get(k, 0) / v) for k, v in bundle.items() if v > 0)


def _room_beside(d: Demand, shapes: list[NodeShape], room: float) -> bool:
    """Whether ``d.count`` workers fit with ``d.beside`` free on one node: some node of
    some shape keeps ``beside`` and holds fewer workers, the others hold as many as ever."""
    for s in shapes:
        if s.count < 1:
            continue
        left = {k: s.resources.get(k, 0) - v for k, v in d.beside.items()}
        if any(v < 0 for v in left.values()):
            continue
        fewer = _per_node(d.bundle, {**s.resources, **left})
        if room - _per_node(d.bundle, s.resources) + fewer >= d.count:
            return True
    return False


def summary(cfg, shapes: list[NodeShape]) -> str:
    """The dry run's report when nothing is wrong: the nodes, and where each demand fits."""
    lines = [f"Ray cluster: {_nodes(shapes)}"]
    for d in demands(cfg):
        fits = [s.name for s in shapes if _fits(d.bundle, s.resources, d.count if d.packed else 1)]
        lines.append(f"  {d.what}: {d.count} x {{{_describe(d.bundle)}}} -> {', '.join(fits)}")
    return "\n".join(lines)
