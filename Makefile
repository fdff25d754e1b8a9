# Every target installs what it needs into .venv/ first (one pip install, re-run only when
# pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
OUT    ?= outputs/benchmark          # where the demo writes (and mlflow-ui reads)
DATA   ?= data/benchmark
GTA5       ?= data/GTA5
# reproduce-gta5 / reproduce-synthia follow the released protocol; PROTOCOL=clean lays
# configs/protocols/clean.yaml over it (no checkpoint chosen on the target val set), in its
# own output folder and MLflow experiment.
PROTOCOL   ?= released
SYNTHIA    ?= data/SYNTHIA
CITYSCAPES ?= data/cityscapes
IMAGENET   ?=                        # torchvision's resnet101-*.pth, for the reproductions
PORT   ?= 5000
# Reproduction targets run on the cluster at RAY_ADDRESS when it is set (ray.init reads it).
ifdef RAY_ADDRESS
export RAY_ADDRESS
endif

.PHONY: install torch check-torch system-packages test test-slow demo benchmark-data ablation compare-methods bench mlflow-ui clean \
        prepare-gta5 prepare-synthia prepare-cityscapes reproduce-gta5 reproduce-synthia \
        reproduce-gta5-stvm reproduce-synthia-stvm benchmark-semi reproduce-semi prepare-nthu reproduce-nthu reproduce-nthu-stvm \
        prepare-robotcar reproduce-robotcar rehearsal reproduce-gta5-warmup

$(STAMP): pyproject.toml constraints.txt
	@echo ">> installing into $(VENV)/ (torch CPU, Ray, MLflow, ...; ~2 min on a fresh machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@scripts/install_torch.sh $(PY)
	@$(PY) -m pip install -qq -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# On a GPU machine: the torch build its GPUs need (CUDA 12.6 for V100 to H100), installed
# (torch) or only checked (check-torch: exits with the pip command to run).
torch: $(STAMP)
	scripts/install_torch.sh $(PY)

check-torch: $(STAMP)
	@scripts/install_torch.sh $(PY) --check

# The system packages the tests use: Debian's headless chromium (tests/test_mlflow_ui.py),
# installed when absent if this is a Debian-like machine and we are root.
system-packages:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo ">> installing Debian's chromium and chromium-driver (for tests/test_mlflow_ui.py; ~1 min)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "make test needs Debian's chromium and chromium-driver (tests/test_mlflow_ui.py), and cannot install"; \
	    echo "them here (not root, or no apt-get): run 'sudo apt-get install chromium chromium-driver' first."; \
	    exit 2; \
	  fi; }

test: $(STAMP) system-packages
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

# -- the built-in benchmark ------------------------------------------------------------
$(DATA)/target/lists/cityscapes_val.txt: pipeline/data/benchmark.py | $(STAMP)
	$(PY) jobs/make_benchmark.py --out $(DATA)
	$(PY) jobs/prepare_data.py --dataset gta5 --root $(DATA)/source
	$(PY) jobs/prepare_data.py --dataset gta5 --root $(DATA)/source_val
	$(PY) jobs/prepare_data.py --dataset cityscapes --root $(DATA)/target

benchmark-data: $(DATA)/target/lists/cityscapes_val.txt

demo: $(STAMP) benchmark-data
	$(PY) jobs/run_experiment.py --config configs/benchmark.yaml output=$(strip $(OUT)) \
		data.source.root=$(DATA)/source data.source_val.root=$(DATA)/source_val \
		data.target.root=$(DATA)/target data.val.root=$(DATA)/target

ablation: $(STAMP) benchmark-data
	$(PY) jobs/ablation.py --config configs/benchmark.yaml output=$(strip $(OUT)) \
		data.source.root=$(DATA)/source data.source_val.root=$(DATA)/source_val \
		data.target.root=$(DATA)/target data.val.root=$(DATA)/target

# IAST vs HIAST over all rounds, SEEDS runs each, from the demo's warm-up (~9 min per seed on 2 cores).
SEEDS ?= 3
compare-methods: $(STAMP) benchmark-data
	$(PY) jobs/compare_methods.py --config configs/benchmark.yaml --seeds $(SEEDS) output=$(strip $(OUT)) \
		data.source.root=$(DATA)/source data.source_val.root=$(DATA)/source_val \
		data.target.root=$(DATA)/target data.val.root=$(DATA)/target

bench: $(STAMP) benchmark-data
	$(PY) benchmarks/bench_selectors.py
	$(PY) benchmarks/bench_pseudo_label.py --data $(DATA)
	$(PY) benchmarks/bench_data_wait.py --data $(DATA)
	$(PY) benchmarks/bench_augmentation.py

# The GTA5 -> Cityscapes config end to end on synthetic data at the real image sizes, on
# this machine's CPUs (small model, 4 steps a stage; ~6 min on 2 idle cores, 35 on a loaded machine), with a report per
# stage: time, pseudo-labelling images/s by part, store size, peak memory, loader speed.
REHEARSAL ?= outputs/rehearsal
rehearsal: $(STAMP)
	$(PY) jobs/rehearsal.py --out $(strip $(REHEARSAL))

# The MLflow UI over the pipeline's store (OUT/mlflow.db), on this machine only.
# One worker and no job runner: ~0.5 GiB and a few seconds to start (instead of ~3 GiB).
mlflow-ui: $(STAMP)
	@mkdir -p $(strip $(OUT))
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(PY) -m mlflow server --host 127.0.0.1 --port $(PORT) \
		--workers 1 --backend-store-uri sqlite:///$(abspath $(strip $(OUT)))/mlflow.db \
		--artifacts-destination $(abspath $(strip $(OUT)))/mlartifacts

# -- the real datasets: validate and convert, then the released protocols ----------------
prepare-gta5: $(STAMP)
	$(PY) jobs/prepare_data.py --dataset gta5 --root $(GTA5)

prepare-synthia: $(STAMP)
	$(PY) jobs/prepare_data.py --dataset synthia --root $(SYNTHIA)

prepare-cityscapes: $(STAMP)
	$(PY) jobs/prepare_data.py --dataset cityscapes --root $(CITYSCAPES)

protocol = $(if $(filter clean,$(PROTOCOL)),--config configs/protocols/clean.yaml name=$(1)_clean output=outputs/$(1)_clean,$(if $(filter released,$(PROTOCOL)),,$(error PROTOCOL must be released or clean, got $(PROTOCOL))))

reproduce-gta5: $(STAMP) check-torch
	@test -n "$(strip $(IMAGENET))" || (echo "give the ImageNet ResNet-101 weights: make $@ IMAGENET=/path/resnet101-63fe2227.pth"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/gta5_cityscapes.yaml $(call protocol,gta5_cityscapes) model.imagenet_backbone=$(strip $(IMAGENET)) \
		data.source.root=$(GTA5) data.target.root=$(CITYSCAPES) data.val.root=$(CITYSCAPES)

reproduce-synthia: $(STAMP) check-torch
	@test -n "$(strip $(IMAGENET))" || (echo "give the ImageNet ResNet-101 weights: make $@ IMAGENET=/path/resnet101-63fe2227.pth"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/synthia_cityscapes.yaml $(call protocol,synthia_cityscapes) model.imagenet_backbone=$(strip $(IMAGENET)) \
		data.source.root=$(SYNTHIA) data.target.root=$(CITYSCAPES) data.val.root=$(CITYSCAPES)

# Source-free STvM from a finished source-only checkpoint (e.g. reproduce-gta5's).
reproduce-gta5-stvm: $(STAMP) check-torch
	@test -n "$(strip $(SOURCE_MODEL))" || (echo "give the source-only checkpoint: make $@ SOURCE_MODEL=/path/checkpoint.pt"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/gta5_cityscapes_stvm.yaml model.init=$(strip $(SOURCE_MODEL)) \
		data.target.root=$(CITYSCAPES) data.val.root=$(CITYSCAPES)

reproduce-synthia-stvm: $(STAMP) check-torch
	@test -n "$(strip $(SOURCE_MODEL))" || (echo "give the source-only checkpoint: make $@ SOURCE_MODEL=/path/checkpoint.pt"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/synthia_cityscapes_stvm.yaml model.init=$(strip $(SOURCE_MODEL)) \
		data.target.root=$(CITYSCAPES) data.val.root=$(CITYSCAPES)

# IAST on another project's released GTA5 warm-up (IAST Table 3): WARMUP adaptsegnet
# (GTA2Cityscapes_multi-ed35151c.pth) or advent (gta2cityscapes_advent.pth), INIT its file.
WARMUP ?= adaptsegnet
reproduce-gta5-warmup: $(STAMP) check-torch
	@test -n "$(strip $(INIT))" || (echo "give the released model: make $@ WARMUP=$(strip $(WARMUP)) INIT=/path/model.pth"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/gta5_cityscapes.yaml --config configs/warmups/$(strip $(WARMUP)).yaml \
		model.init=$(strip $(INIT)) data.target.root=$(CITYSCAPES) data.val.root=$(CITYSCAPES)

# Semi-supervised Cityscapes (IAST Table 2): FRACTION (1/8, 1/4, 1/2, or a frame count) of
# train labelled, the rest the unlabelled target. The split is written once by
# prepare_data.py --semi (lists/cityscapes_train_order.txt fixes it); each fraction has its
# own output folder and MLflow experiment.
FRACTION ?= 1/8
semi_tag = $(subst /,-,$(strip $(FRACTION)))
semi_split = test -f $(1)/lists/cityscapes_train_labeled_$(semi_tag).txt || \
	$(PY) jobs/prepare_data.py --dataset cityscapes --root $(1) --semi $(strip $(FRACTION))
semi_args = name=$(1)_$(semi_tag) output=outputs/$(1)_$(semi_tag) data.source.split=train_labeled_$(semi_tag) \
	data.target.split=train_unlabeled_$(semi_tag) data.source.root=$(2) data.target.root=$(2) data.val.root=$(2)

# The same on the built-in benchmark's target, so that the setting runs here (~10 min on 2 cores).
benchmark-semi: $(STAMP) benchmark-data
	$(call semi_split,$(DATA)/target)
	$(PY) jobs/run_experiment.py --config configs/benchmark_semi.yaml $(call semi_args,benchmark_semi,$(DATA)/target)

reproduce-semi: $(STAMP)
	@test -n "$(strip $(IMAGENET))" || (echo "give the ImageNet ResNet-101 weights: make $@ IMAGENET=/path/resnet101-63fe2227.pth"; exit 2)
	$(call semi_split,$(CITYSCAPES))
	$(PY) jobs/run_experiment.py --config configs/cityscapes_semi.yaml model.imagenet_backbone=$(strip $(IMAGENET)) \
		$(call semi_args,cityscapes_semi,$(CITYSCAPES))

# Cityscapes -> NTHU Cross-City, one CITY (Rome, Rio, Tokyo, Taipei) a run, in 13 classes.
NTHU ?= data/NTHU
CITY ?= Rome
city = $(shell echo $(strip $(CITY)) | tr A-Z a-z)
prepare-nthu: $(STAMP)
	$(PY) jobs/prepare_data.py --dataset cityscapes --root $(CITYSCAPES) --label-space nthu13
	$(PY) jobs/prepare_data.py --dataset nthu --root $(NTHU) --city $(strip $(CITY))

reproduce-nthu: $(STAMP)
	@test -n "$(strip $(IMAGENET))" || (echo "give the ImageNet ResNet-101 weights: make $@ IMAGENET=/path/resnet101-63fe2227.pth"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/cityscapes_nthu.yaml model.imagenet_backbone=$(strip $(IMAGENET)) \
		name=cityscapes_nthu_$(city) output=outputs/cityscapes_nthu_$(city) \
		data.source.root=$(CITYSCAPES) data.source.prepared=$(CITYSCAPES)/prepared_nthu13 \
		data.target.root=$(NTHU) data.target.split=$(city)_train data.val.root=$(NTHU) data.val.split=$(city)_test

# Source-free STvM on the same city, from a 13-class source-only model (reproduce-nthu's).
reproduce-nthu-stvm: $(STAMP) check-torch
	@test -n "$(strip $(SOURCE_MODEL))" || (echo "give the 13-class source-only checkpoint: make $@ CITY=Rome SOURCE_MODEL=/path/checkpoint.pt"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/cityscapes_nthu_stvm.yaml model.init=$(strip $(SOURCE_MODEL)) \
		name=cityscapes_nthu_stvm_$(city) output=outputs/cityscapes_nthu_stvm_$(city) \
		data.target.root=$(NTHU) data.target.split=$(city)_train data.val.root=$(NTHU) data.val.split=$(city)_test

# Cityscapes -> Oxford RobotCar (HIAST's setting), in 9 classes.
ROBOTCAR ?= data/RobotCar
prepare-robotcar: $(STAMP)
	$(PY) jobs/prepare_data.py --dataset cityscapes --root $(CITYSCAPES) --label-space robotcar9
	$(PY) jobs/prepare_data.py --dataset robotcar --root $(ROBOTCAR)

reproduce-robotcar: $(STAMP)
	@test -n "$(strip $(IMAGENET))" || (echo "give the ImageNet ResNet-101 weights: make $@ IMAGENET=/path/resnet101-63fe2227.pth"; exit 2)
	$(PY) jobs/run_experiment.py --config configs/cityscapes_robotcar.yaml model.imagenet_backbone=$(strip $(IMAGENET)) \
		data.source.root=$(CITYSCAPES) data.source.prepared=$(CITYSCAPES)/prepared_robotcar9 \
		data.target.root=$(ROBOTCAR) data.val.root=$(ROBOTCAR)

clean:
	rm -rf $(strip $(OUT)) .pytest_cache
