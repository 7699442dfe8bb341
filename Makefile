# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench results ray-local-config cluster-deps clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# Ray's dashboard probes cloud metadata addresses on start unless this file says the cluster is local.
ray-local-config:
	@test -f $(HOME)/ray_bootstrap_config.yaml || printf 'provider:\n  type: local\n' > $(HOME)/ray_bootstrap_config.yaml

demo: setup ray-local-config
	OMP_NUM_THREADS=$$(nproc) $(VENV)/bin/defend run demo --config demo

# Debian's Slurm and munge for the cluster tests (tests/cluster): installed when root, else the
# command to install them is printed (the tests then skip, or fail under CI=true)
cluster-deps:
	-@tests/cluster/install_deps.sh

test: setup ray-local-config cluster-deps
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# regenerates docs/RESULTS.md, docs/results.json and the plot (every attack x defense x family)
results: setup ray-local-config
	OMP_NUM_THREADS=$$(nproc) $(VENV)/bin/defend run defense_results --config defense_results

bench: setup ray-local-config
	OMP_NUM_THREADS=$$(nproc) $(PY) bench/generation_throughput.py
	OMP_NUM_THREADS=1 $(PY) bench/train_throughput.py
	OMP_NUM_THREADS=1 $(PY) bench/pcr_overhead.py
	OMP_NUM_THREADS=1 $(PY) bench/purify_throughput.py
	$(PY) bench/purify_scaling.py

clean:
	rm -rf $(VENV) runs
