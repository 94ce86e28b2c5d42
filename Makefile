# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean redis browser scaleout-deps lint quality

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[offline,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/recsys evaluate --data data/ml-latest-small --out reports/eval.json --artifacts artifacts --quiet
	$(BIN)/recsys demo

# the model-quality tables of README.md / BENCHMARKS.md: rolling-origin evaluation (5 windows) of
# ml-100k (not shipped: give its folder), the bundled ml-latest-small and an ML-32M-shaped
# synthetic sample -> reports/quality/quality.md (see benchmarks/quality.py)
ML100K ?=
quality: install
	@[ -n "$(ML100K)" ] || { echo "usage: make quality ML100K=/path/to/ml-100k  (CSV layout; recsys data download ml-100k)"; exit 2; }
	$(BIN)/python -m benchmarks.quality --ml-100k $(ML100K) --windows 5 --out reports/quality

# the Redis history store is tested against a real redis-server (Debian's); without one
# (no root, no apt) that test is skipped and says so
redis:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "redis-server not installed: the Redis store test will be skipped"

# the explorer page (`recsys explore`) is tested in Debian's headless Chromium through its
# chromedriver; without them (no root, no apt) those tests are skipped and say so
browser:
	@command -v chromedriver >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } \
		|| echo "chromium/chromedriver not installed: the explorer's browser tests will be skipped"

# `recsys bench scaleout` and its test also need a packaged load balancer: Debian's HAProxy
# (and redis-server, above); without them that test is skipped and says so
scaleout-deps: redis
	@command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; } \
		|| echo "haproxy not installed: the scale-out test will be skipped"

test: install redis browser scaleout-deps lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts reports

# ruff (lint + format check) and mypy (strict for orchestrator/ and clients/), configured in pyproject.toml
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
