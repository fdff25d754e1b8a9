"""What every job entry point does the same way: parse a config, join or start Ray."""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import time
import zlib

# Jobs run as scripts (`python jobs/x.py`, also under `ray job submit`): make the
# repository importable without an install.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline import config  # noqa: E402


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_config(cls, doc: str, argv: list[str] | None, extra=None):
    """``--config FILE`` (repeatable) plus ``key.sub=value`` overrides -> a validated ``cls`` (an
    experiment also checked: data, weights, output); exits 2 with every problem listed and
    no traceback (``--debug`` shows it), before Ray, MLflow or any file is started.
    ``extra(parser)`` adds a job's own options; then (config, args) is returned.

    An experiment's job also takes ``--check``, the dry run: the same check plus the
    running Ray cluster's resources and the services the stages will use (see
    ExperimentConfig.problems), then exits: 0 with a summary, or 2 with every problem."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append",
                        help="YAML file (local path or s3://); several are merged in order, a later one's keys "
                             "over an earlier one's (e.g. a protocol: configs/protocols/clean.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the file")
    if extra:
        extra(parser)
    experiment = hasattr(cls, "check")  # an experiment: data, weights, output, all before any side effect
    if experiment:
        parser.add_argument("--check", action="store_true",
                            help="dry run: check the config, every path, the MLflow server and the Ray cluster's "
                                 "resources, print what was found and exit (0: ok, 2: problems); starts no stage "
                                 "and no MLflow run, and leaves no file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a config error")
    args = parser.parse_args(argv)
    shapes = None
    try:
        cfg = config.load(cls, args.config, args.overrides)
        if experiment and args.check:
            from pipeline import cluster

            init_ray()
            shapes = cluster.node_shapes()
        if experiment:
            cfg.check(shapes)
    except (config.ConfigError, ValueError, OSError) as err:
        if args.debug:
            raise
        parser.exit(2, f"config error: {err}\n(nothing was started or written; --debug shows the traceback)\n")
    if shapes is not None:
        print(f"check ok: {cfg.name}, output {cfg.output}\n{cluster.summary(cfg, shapes)}\n"
              "(nothing was started or written)")
        sys.exit(0)
    return (cfg, args) if extra else cfg


def init_ray() -> None:
    """Join the cluster of `ray job submit` / RAY_ADDRESS, or start a local instance."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        # Ray Train workers otherwise print every line of ours twice (once through their
        # print patch's logger); the local instance's workers inherit this environment.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # A local instance gets at least 4 logical CPUs: on a 2-core machine Ray Data's
        # decode tasks would otherwise wait forever behind the actors (platform notes).
        start_local_ray(num_cpus=max(4, os.cpu_count() or 1))  # its dashboard (127.0.0.1) serves Ray Train's state queries


def start_local_ray(**init_kwargs) -> list[int]:
    """``ray.init(**init_kwargs)`` for a Ray instance of this process's own, stopped with
    ``stop_local_ray`` at exit (normal, or SIGTERM). Returns the pids of its raylets."""
    import ray

    from pipeline import processes

    ray.init(**init_kwargs)
    raylets = [pid for pid, (ppid, name, _) in processes.table().items() if ppid == os.getpid() and name == "raylet"]
    atexit.register(stop_local_ray, raylets)
    return raylets


def stop_local_ray(raylets: list[int], grace_s: float = 5.0) -> list[str]:
    """Shut the local Ray instance down, then end what outlived it: any process still
    carrying one of ``raylets`` as its ``RAY_RAYLET_PID`` after ``grace_s`` gets SIGKILL
    (its raylet is gone, so nothing can reach it). Ray's own shutdown normally leaves
    nothing, but a Train controller has been seen left blocked for hours after a normal
    exit (docs/reliability.md). Returns what was killed, as ``"pid command line"``."""
    import ray

    from pipeline import processes

    ray.shutdown()
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylets}
    deadline = time.monotonic() + grace_s
    while (left := processes.marked(marks)) and time.monotonic() < deadline:
        time.sleep(0.2)
    names, killed = processes.table(), []
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
        killed.append(f"{pid} {names.get(pid, (0, '', '?'))[2][:80]}")
    if killed:
        print(f"note: ended {len(killed)} process(es) that outlived the job's Ray instance: {', '.join(killed)}",
              file=sys.stderr, flush=True)
    return killed


def method_name(cfg) -> str:
    """What the experiment's rounds run, for the parent run's name and ``method`` tag: the
    config's own method name when it has one, else IAST, HIAST (teacher-student consistency
    or hard-class pasting), CBST or a constant threshold by the selector; a diagnostic
    label source (true classes) is named too."""
    st = cfg.self_training
    named = getattr(st, "method", None) or getattr(cfg, "method", None)
    if isinstance(named, str) and named:
        return named
    if cfg.source_free:
        return "STvM"
    if st.consistency is not None or st.hard_classes > 0:
        name = "HIAST"
    else:
        name = {"ias": "IAST", "cbst": "CBST", "constant": f"constant threshold {st.constant_threshold:g}"}[st.selector]
    if st.label_values != "prediction":
        name += f" ({st.label_values.replace('_', ' ')} labels)"
    return name


# Chart colours of the parent runs in MLflow, by method (from MLflow's own palette).
METHOD_COLORS = {"IAST": "#2272b4", "HIAST": "#c83243", "CBST": "#308613", "STvM": "#de7921"}
OTHER_COLORS = ("#8a63bf", "#04867d", "#b45091", "#a6630c", "#434a93", "#5f7281")


def method_color(method: str) -> str:
    """A fixed colour per method, so that two methods' curves differ in every comparison."""
    base = method.split(" (")[0]
    return METHOD_COLORS.get(base) or OTHER_COLORS[zlib.crc32(method.encode()) % len(OTHER_COLORS)]


def experiment_tracker(cfg):
    """The MLflow tracker of an experiment; the resolved config is logged on its parent run,
    named ``<experiment>: <method>, <R> rounds`` and tagged ``method`` and ``rounds``."""
    from pipeline.tracking import ExperimentTracker, ParamsChanged, default_tracking_uri

    uri = cfg.tracking_uri or default_tracking_uri(cfg.output)  # the config check wants one for remote output
    method, rounds = method_name(cfg), len(cfg.self_training.rounds)
    if cfg.source_free:
        run_name = f"{cfg.name}: {method}, {cfg.stvm.iterations} steps, source-free"
    else:
        run_name = f"{cfg.name}: {method}, {rounds} round{'s' if rounds != 1 else ''}"
    # old_run_name: stores from before this naming have their parent named after the experiment
    tracker = ExperimentTracker(uri, cfg.name, run_name=run_name, tags={"method": method, "rounds": rounds,
                                                                    "protocol": cfg.protocol},
                                old_run_name=cfg.name, color=method_color(method))
    try:
        tracker.log_config(tracker.parent_run_id, cfg.tracked())
    except ParamsChanged as err:
        if cfg.finished_stages():  # its finished stages were made with the old settings
            raise SystemExit(f"config error: {err}\n(stages finished under the old settings: "
                             f"{', '.join(cfg.finished_stages())}; write to a new output=...)") from None
        old = tracker.supersede_parent(f"restarted with other settings: {err}")
        print(f"note: the experiment's previous start (MLflow run {old}) finished no stage and had other "
              "settings: it is marked FAILED and kept, and this run starts a new parent run", flush=True)
        tracker.log_config(tracker.parent_run_id, cfg.tracked())
    return tracker
