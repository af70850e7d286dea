# Every target sets up .venv itself; a second run with nothing changed skips the installs.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export SPARK_LOCAL_IP ?= 127.0.0.1
export PYSPARK_PYTHON := $(abspath $(PY))
export PYSPARK_DRIVER_PYTHON := $(abspath $(PY))
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions
export OMP_NUM_THREADS ?= 1

.PHONY: venv demo test test-fast test-multinode bench movielens clean

venv: $(STAMP)

# torch first, from its own pin, so nothing later can pull a CUDA build; TorchRec and FBGEMM's CPU
# build without their metadata's dependencies (the CUDA fbgemm-gpu); then everything else under the
# same constraints; then DeepSpeed's CPU shared-memory op, built once into the venv.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3.11 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$$(grep '^torch==' constraints.txt)"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps $$(grep -E '^(torchrec|fbgemm-gpu-cpu)==' constraints.txt)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	$(PY) -m sirenfeed.warmup
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sirenfeed demo --config conf/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

test-multinode: $(STAMP)
	$(PY) -m pytest -m multinode

test-fast: $(STAMP)
	$(PY) -m pytest -m 'not slow'

bench: $(STAMP)
	$(PY) bench/feature_job.py
	$(PY) bench/train.py
	$(PY) bench/ingest_stream.py
	$(PY) bench/overhead.py
	$(PY) bench/scaling.py
	$(PY) bench/embeddings.py
	$(PY) bench/delta_publish.py
	$(PY) bench/retrain.py
	$(PY) bench/movielens.py

# The worked example of docs/your-logs.md (MovieLens-100K, three variants over three seeds).
movielens: $(STAMP)
	$(PY) bench/movielens.py

clean:
	rm -rf $(VENV) build *.egg-info
