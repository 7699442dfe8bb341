# `make demo` and `make test` work on a fresh machine: they create .venv and install first.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a GPU machine: make TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

# The known-good versions of every dependency (torch aside: TORCH_SPEC pins it and picks its build)
CONSTRAINTS := .ci/constraints.txt

.PHONY: setup lock demo test bench results ray-local-config cluster-deps clean

setup: $(VENV)/.installed

# torch unconstrained, so a CUDA index in TORCH_SPEC need not hold the pinned sympy etc.; the second
# install moves torch's dependencies to the pinned versions with the rest
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $@

# Refresh $(CONSTRAINTS) from $(VENV) once `make test` passes in it: what pip freeze lists, less the
# project, pip, torch (TORCH_SPEC's) and CUDA's wheels; setuptools stays (tensorboard needs it at run time).
# For newer releases first: $(PY) -m pip install -U -e '.[dev]'
lock:
	@test -x $(PY) || { echo "make lock: no $(PY) to freeze; run make setup first" >&2; exit 1; }
	{ echo "# Known-good versions, frozen by \`make lock\` from a venv where \`make test\` passed; \`make setup\`"; \
	  echo "# and CI install with -c this file. torch is pinned by the Makefile's TORCH_SPEC, not here."; \
	  $(PY) -m pip freeze --all --exclude-editable | grep -v -i -E '^(pip|torch|triton|nvidia-[a-z0-9-]+)=='; \
	} > $(CONSTRAINTS).tmp && mv $(CONSTRAINTS).tmp $(CONSTRAINTS)
	@echo "wrote $(CONSTRAINTS) ($$(grep -c == $(CONSTRAINTS)) pins); commit it with the change that needed it"

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
