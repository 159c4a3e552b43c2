# One entry point. Each target sets up .venv on a fresh machine and reuses it afterwards.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fasttune-installed
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench gpu-wheels clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip

# torch first, pinned to the local CPU build, only when the venv has no torch: afterwards
# the "torch>=..." requirement is met and pip fetches nothing else. The kernels (kernels/, their
# own distribution) and the trainer that depends on them, both editable.
$(STAMP): pyproject.toml kernels/pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./kernels -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/fasttune sft examples/sft.toml

test: $(STAMP)
	$(VENV)/bin/pytest tests

bench: $(STAMP)
	$(VENV)/bin/pytest bench

# Peers for the lent GPU machine (Python 3.12, no network there): fetched here into .whl/,
# carried with the call, installed by bench/gpu_check.sh.
GPU_WHEELS ?= liger-kernel==0.8.5 cut-cross-entropy==25.1.1 bitsandbytes==0.50.2
gpu-wheels:
	mkdir -p .whl
	for w in $(GPU_WHEELS); do python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
	  --platform manylinux_2_17_x86_64 --platform any -d .whl $$w || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
