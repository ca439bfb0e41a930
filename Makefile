# One command each: `make demo` and `make test` do all set-up on a fresh machine.
# Installs come from uv.lock (every package of every extra, exact versions and hashes),
# so a fresh machine gets exactly what CI tested. Refresh the lock with `make lock`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
UV_VERSION := 0.13.9
TOOLS  := .tools
UV     := $(TOOLS)/bin/uv
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml uv.lock | sha1sum | cut -c1-12)
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install sysdeps demo test lint lock lock-check bench clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install -q "uv==$(UV_VERSION)"

# Fails (with the fix) when pyproject.toml changed and uv.lock was not refreshed.
lock-check: $(UV)
	@$(UV) lock --check --python $(PYTHON) -q || { echo "error: uv.lock is out of sync with pyproject.toml; refresh it with 'make lock' and commit uv.lock" >&2; exit 1; }

lock: $(UV)
	$(UV) lock --python $(PYTHON)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(MAKE) --no-print-directory lock-check
	$(UV) sync --locked --all-extras --python $(PYTHON) -q
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# eSpeak NG voices make the multi-speaker test conversations (Debian package; needs root)
sysdeps:
	@command -v espeak-ng >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null) \
	  || echo "warning: espeak-ng missing; multi-speaker tests will be skipped"; }

# The demo's synthesized dialogues: DEMO_DIALOGUES of the bundled set, voices from
# runs/demo, in-process (a second Ray start would cost more than these few clips). SNAC
# codes (answer_snac, Mini-Omni shards) only when SNAC 24 kHz weights are in
# $SPEECHMILL_MODELS/snac/hubertsiuzdak/snac_24khz; otherwise that part is switched off.
DEMO_DIALOGUES ?= 5
DEMO_SNAC := $(if $(wildcard $(SPEECHMILL_MODELS)/snac/hubertsiuzdak/snac_24khz/pytorch_model.bin),,--set tokenize.audio=null --set shards.layout=plain)

demo: $(STAMP)
	test -f runs/demo-input/.done || ($(BIN)/speechmill demo-data runs/demo-input && touch runs/demo-input/.done)
	$(BIN)/speechmill run dags/demo.yaml
	SPEECHMILL_VOICES_FROM=runs/demo DIALOGUES=dags/data/dialogues/ultrachat.jsonl \
	  $(BIN)/speechmill run dags/voice_assistant.yaml --run-dir runs/demo-dialogues --offline \
	  --executor local \
	  --set import.max_rows=$(DEMO_DIALOGUES) --set tts.max_share=1 $(DEMO_SNAC)
	@echo "demo outputs: runs/demo (speechmill status runs/demo); dialogues: runs/demo-dialogues"

lint: $(STAMP)
	$(BIN)/ruff check .

test: lock-check $(STAMP) sysdeps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/standardize.py

clean:
	rm -rf runs .pytest_cache
