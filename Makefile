# sem: two commands do everything on a fresh machine.
#   make run    install what is missing, build the demo models, start supervisor and gateway
#   make test   install what is missing, then lint, type-check and run the whole test suite
#   (installing includes compiling the gateway's hot path: gateway/native.py)
PYTHON ?= python3
VENV := .venv
ENGINE_VENV := .venv-engine
DEMO_MODELS := tiny-llama-base tiny-llama-chat
NATIVE := build/native/manifest.json
PYTEST_ARGS ?=

.PHONY: run test check pytest install models clean gpu-check

run: install models
	$(VENV)/bin/sem run --config models.yaml --engine-python $(ENGINE_VENV)/bin/python

test: check pytest

check: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

pytest: install models
	SEM_ENGINE_PYTHON=$(CURDIR)/$(ENGINE_VENV)/bin/python $(VENV)/bin/pytest $(PYTEST_ARGS)

# The reference scenarios on this box's GPUs (real vLLM if .venv-engine has it, else a torch
# stand-in); prints figures and fails on a failed check. See docs/gpu-accounting.md.
gpu-check: $(VENV)/.installed
	PYTHONPATH=$(CURDIR) $(VENV)/bin/python scripts/gpu_check.py

install: $(VENV)/.installed $(ENGINE_VENV)/.installed $(NATIVE)

# The gateway's hot path compiled with mypyc (gateway/native.py): again whenever its sources
# change; the gateway runs them only when built from exactly these sources.
$(NATIVE): $(VENV)/.installed scripts/build_native.py $(wildcard gateway/*.py)
	$(VENV)/bin/python scripts/build_native.py

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "sem needs Python 3.11 or newer ($(PYTHON) is older)"; exit 1; }
	@echo "==> sem env: creating $(VENV) and installing sem with its test tools"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(VENV)/bin/python -m pip install --disable-pip-version-check --progress-bar on -e '.[dev]'
	touch $@

$(ENGINE_VENV)/.installed: scripts/install-engine.sh
	bash scripts/install-engine.sh $(ENGINE_VENV)
	touch $@

models: $(foreach m,$(DEMO_MODELS),models/$(m)/config.json)

models/%/config.json: scripts/build_demo_models.py | $(ENGINE_VENV)/.installed
	@echo "==> building demo model $* (offline, fixed seed)"
	$(ENGINE_VENV)/bin/python scripts/build_demo_models.py --out models --force $*

clean:
	rm -rf .sem .pytest_cache .mypy_cache .ruff_cache build/native build/native-c
