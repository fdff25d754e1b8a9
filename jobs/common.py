"""What every job entry point does the same way: parse a config, join or start Ray."""

from __future__ import annotations

import argparse
import os
import sys

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
    """``--config FILE`` plus ``key.sub=value`` overrides -> a validated ``cls``; exits 2 on
    errors. ``extra(parser)`` adds a job's own options; then (config, args) is returned."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file (local path or s3://)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied on top of the file")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.load(cls, args.config, args.overrides)
    except (config.ConfigError, ValueError) as err:
        parser.exit(2, f"config error: {err}\n")
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
        ray.init(num_cpus=max(4, os.cpu_count() or 1))  # its dashboard (127.0.0.1) serves Ray Train's state queries


def experiment_tracker(cfg):
    """The MLflow tracker of an experiment; the resolved config is logged on its parent run."""
    from pipeline import storage
    from pipeline.tracking import ExperimentTracker, default_tracking_uri

    uri = cfg.tracking_uri
    if uri is None:
        if storage.scheme(cfg.output) != "file":
            raise SystemExit("config error: set tracking_uri (an MLflow server or sqlite:///local/path.db) "
                             "when output is not a local folder")
        uri = default_tracking_uri(cfg.output)
    tracker = ExperimentTracker(uri, cfg.name)
    tracker.log_config(tracker.parent_run_id, config.to_dict(cfg))
    return tracker
