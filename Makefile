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

WHIP_DIR := build/whip

.PHONY: demo test install chromium janus clean

demo: $(STAMP)
	$(BIN)/sonomaly demo --host $(HOST) --port $(PORT)

test: $(STAMP) chromium janus
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

# Debian's janus and simple-whip-server (unpacked, its Node dependencies from npm: the package itself cannot be
# installed beside this Node.js) for the WHIP end-to-end test. Best effort: without them that one test skips.
janus:
	@command -v janus >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq janus >/dev/null; } || \
	  echo "janus could not be installed: the WHIP/Janus test will skip"
	@[ -d $(WHIP_DIR)/app/node_modules/express ] || { command -v npm >/dev/null 2>&1 && mkdir -p $(WHIP_DIR) && \
	  cd $(WHIP_DIR) && apt-get download simple-whip-server >/dev/null 2>&1 && \
	  dpkg-deb -x simple-whip-server_*.deb root && mkdir -p app && cp -r root/usr/share/simple-whip-server/src app/ && \
	  rm -f app/src/config.js && cd app && \
	  npm install --no-audit --no-fund --silent async express cors colors debug websocket body-parser >/dev/null; } || \
	  echo "simple-whip-server could not be set up: the WHIP/Janus test will skip"

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
