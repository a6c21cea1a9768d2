# The two front-door commands: `make demo` and `make test`. Each is self-contained on a fresh Debian machine:
# it creates .venv if missing, installs what is missing (idempotent), then runs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sonomaly-installed
# The CPU build of torch (a bare `torch` pulls gigabytes of CUDA). Override on machines with another wheel at hand.
TORCH_SPEC ?= torch==2.13.0
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
HOST   ?= 127.0.0.1
PORT   ?= 8080

.PHONY: demo test install chromium clean

demo: $(STAMP)
	$(BIN)/sonomaly demo --host $(HOST) --port $(PORT)

test: $(STAMP) chromium
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Debian's Chromium for the browser tests (never a browser download by a test tool).
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium could not be installed"; exit 1; }

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
