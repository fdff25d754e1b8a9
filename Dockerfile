# The image every Ray node runs (cluster/aws-v100.yaml, cluster/kuberay-rayjob.yaml).
#
#   docker build -t iast-pipeline:0.1.0 .
#
# CUDA 12.6: from PyTorch 2.11 on, the CUDA 12.6 wheels are the only ones that still
# carry kernels for Volta (V100, sm_70); the 12.8+/13.x builds start at Turing. Ray
# publishes its images for CUDA 12.6 as `-cu126`. The pins below must match
# pyproject.toml (tests/test_cluster_configs.py checks that they do).
FROM rayproject/ray:2.60.0-py311-cu126

# The base image's user `ray` (uid 1000, gid 100) owns its Python (~/anaconda3), so
# nothing here needs root. Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 1000:100
RUN mkdir -p /home/ray/iast
WORKDIR /home/ray/iast

# PyTorch first, from its CUDA 12.6 index: the biggest layer, rebuilt only when the pin changes.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0

# The project and its pinned dependencies. constraints.txt holds torch at 2.13.0, so the
# CUDA build installed above (2.13.0+cu126) satisfies it and is kept. boto3 (used by the
# autoscaler's AWS provider) is resolved together with s3fs's botocore, or the image's
# older boto3 would be left with a botocore it does not accept.
COPY --chown=1000:100 pyproject.toml constraints.txt README.md ./
COPY --chown=1000:100 pipeline/ pipeline/
RUN pip install --no-cache-dir -c constraints.txt . boto3==1.43.117 \
    && python -c "import boto3, s3fs, mlflow, ray, torch; assert torch.version.cuda.startswith('12.6')"

# Entry points and configs: `python jobs/iast_round.py --config configs/...` runs from here.
COPY --chown=1000:100 jobs/ jobs/
COPY --chown=1000:100 configs/ configs/
