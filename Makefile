# One entry point. Each target sets up .venv on a fresh machine and reuses it afterwards.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fasttune-installed
TORCH  ?= torch==2.13.0

# Keep the working directory off sys.path: our top-level kernels/ folder must not shadow
# Hugging Face's `kernels` package, which bitsandbytes and transformers import by that name.
export PYTHONSAFEPATH := 1

.PHONY: setup test bench clean

setup: $(STAMP)

$(PY):
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip

# torch first, pinned to the local CPU build, only when the venv has no torch: afterwards
# the "torch>=..." requirement is met and pip fetches nothing else.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest tests

bench: $(STAMP)
	$(VENV)/bin/pytest bench

clean:
	rm -rf $(VENV) build *.egg-info
