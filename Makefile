# The two commands of the README: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean redis

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[offline,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/recsys evaluate --data data/ml-latest-small --out reports/eval.json --artifacts artifacts --quiet
	$(BIN)/recsys demo

# the Redis history store is tested against a real redis-server (Debian's); without one
# (no root, no apt) that test is skipped and says so
redis:
	@command -v redis-server >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } \
		|| echo "redis-server not installed: the Redis store test will be skipped"

test: install redis
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) artifacts reports
