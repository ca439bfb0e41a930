# One command each: `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install sysdeps demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,ml]"
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# eSpeak NG voices make the multi-speaker test conversations (Debian package; needs root)
sysdeps:
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
	  || echo "warning: espeak-ng missing; multi-speaker tests will be skipped"; }

demo: $(STAMP)
	test -f runs/demo-input/.done || ($(BIN)/speechmill demo-data runs/demo-input && touch runs/demo-input/.done)
	$(BIN)/speechmill run dags/demo.yaml
	@echo "demo outputs: runs/demo (speechmill status runs/demo)"

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/standardize.py

clean:
	rm -rf runs .pytest_cache
