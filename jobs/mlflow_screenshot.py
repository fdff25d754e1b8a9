"""MLflow's comparison of experiments' parent runs, as a headless browser sees it: the
metric view that the compare view of the runs links each metric to, which draws each
run's ``rounds/...`` series as a curve over the rounds.

    python jobs/mlflow_screenshot.py --out outputs/benchmark --experiments benchmark benchmark-ablation-cbst \\
        --to docs/mlflow_compare_rounds.png

Starts the UI the documented way (`make mlflow-ui OUT=... PORT=<free port>`), renders the
pages with Debian's headless chromium (/usr/bin/chromium; `make system-packages`) and
stops the UI again. tests/test_mlflow_ui.py drives the UI through the same functions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from pipeline.tracking import PARENT_STAGE, default_tracking_uri  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
WINDOW = (1600, 1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (started with start_new_session=True), SIGKILL to
    whatever is left of it after 10 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@contextlib.contextmanager
def mlflow_ui(out: str, log_path: str, timeout: float = 90) -> Iterator[str]:
    """`make mlflow-ui OUT=out PORT=<free>` in its own process group; yields its URL once
    /health answers, stops it whatever happens."""
    port = free_port()
    # `-o <stamp>`: this runs inside the installed venv already; don't re-install.
    cmd = ["make", "-s", "-o", ".venv/.installed", "mlflow-ui", f"OUT={out}", f"PORT={port}"]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + timeout
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode}:\n{open(log_path).read()}")
                try:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"MLflow UI not up after {timeout:.0f} s:\n{open(log_path).read()}")
                time.sleep(0.5)
            yield url
        finally:
            stop(proc)


def render(url: str, screenshot: str, profile: str, browser: str = CHROMIUM) -> str:
    """Render ``url`` headless (virtual time lets the React app fetch and draw); writes
    the screenshot and returns the DOM."""
    if not os.path.exists(browser):
        raise FileNotFoundError(f"{browser} not found: install Debian's chromium (make system-packages)")
    cmd = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--virtual-time-budget=30000", f"--screenshot={screenshot}", "--dump-dom", url,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        dom, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"chromium did not finish rendering {url} in 120 s") from None
    finally:
        stop(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium failed ({proc.returncode}):\n{err.decode(errors='replace')[-3000:]}")
    return dom.decode()


def parent_runs(tracking_uri: str, experiments: list[str]) -> list[tuple[str, str, str]]:
    """(experiment id, run id, run name) of each experiment's latest parent run."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = []
    for name in experiments:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise ValueError(f"no MLflow experiment {name!r} in {tracking_uri}")
        runs = client.search_runs([experiment.experiment_id], f"tags.stage = '{PARENT_STAGE}'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        if not runs:
            raise ValueError(f"experiment {name!r} has no pipeline run")
        found.append((experiment.experiment_id, runs[0].info.run_id, runs[0].info.run_name))
    return found


def compare_url(base: str, runs: list[tuple[str, str, str]]) -> str:
    """MLflow's compare view of the runs (what the UI opens on "Compare")."""
    query = urllib.parse.urlencode({"runs": json.dumps([r for _, r, _ in runs]),
                                    "experiments": json.dumps(sorted({e for e, _, _ in runs}))})
    return f"{base}/#/compare-runs?{query}"


def metric_url(base: str, runs: list[tuple[str, str, str]], metric: str) -> str:
    """MLflow's metric view of ``metric`` for the runs, by step: the page the compare view
    links each metric to (built here, as the compare view renders only its first rows)."""
    query = urllib.parse.urlencode({
        "runs": json.dumps([r for _, r, _ in runs]), "metric": json.dumps(metric),
        "experiments": json.dumps(sorted({e for e, _, _ in runs})), "plot_metric_keys": json.dumps([metric]),
        "plot_layout": "{}", "x_axis": "step", "y_axis_scale": "linear", "line_smoothness": 1,
        "show_point": "true", "deselected_curves": "[]", "last_linear_y_axis_range": "[]",
    })
    return f"{base}/#/metric?{query}"


def query(url: str) -> dict:
    """The JSON-decoded parameters of an MLflow UI URL (after its ``#/page?``)."""
    params = urllib.parse.parse_qs(url.split("?", 1)[1])
    decoded = {}
    for key, (value,) in params.items():
        try:
            decoded[key] = json.loads(value)
        except ValueError:
            decoded[key] = value
    return decoded


def metric_link(dom: str, metric: str) -> str:
    """The compare view's link to the metric view of ``metric`` (all compared runs, by step)."""
    quoted = urllib.parse.quote(json.dumps(metric), safe="")
    for href in re.findall(r'href="(#/metric\?[^"]*)"', dom):
        href = href.replace("&amp;", "&").replace("&quot;", '"')
        if f"metric={quoted}" in href:
            return href
    raise ValueError(f"the compare view links no metric view of {metric}")


def curves(dom: str) -> list[list[tuple[float, float]]]:
    """The points of each solid line drawn by Plotly in a rendered page (the faint copies
    Plotly draws for hover are left out)."""
    lines = re.findall(r'class="js-line" d="([^"]+)" style="[^"]*stroke-opacity: 1;', dom)
    return [[(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+),(-?[\d.]+)", d)] for d in lines]


def screenshot_comparison(out: str, experiments: list[str], to: str, metric: str = "rounds/val/mIoU-19") -> str:
    """Saves MLflow's metric view of ``metric`` for the experiments' parent runs (what the
    compare view of those runs links to) to ``to``; returns the page's DOM."""
    runs = parent_runs(default_tracking_uri(out), experiments)
    with tempfile.TemporaryDirectory() as tmp, mlflow_ui(out, os.path.join(tmp, "mlflow-ui.log")) as url:
        return render(metric_url(url, runs, metric), to, os.path.join(tmp, "profile"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs/benchmark", help="the output folder holding mlflow.db")
    parser.add_argument("--experiments", nargs="+", required=True, help="MLflow experiment names (two or more)")
    parser.add_argument("--metric", default="rounds/val/mIoU-19", help="the parent runs' series to draw")
    parser.add_argument("--to", default="docs/mlflow_compare_rounds.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        dom = screenshot_comparison(os.path.abspath(args.out), args.experiments, args.to, args.metric)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"{args.to}: {len(curves(dom))} curve(s) of {args.metric}")


if __name__ == "__main__":
    main()
