# Two commands on a fresh Debian machine: `make demo` and `make test`. Each does its own setup.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup system-deps demo lint test bench clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[webhook,test]'
	touch $(STAMP)

# Debian's CNCF Distribution registry and skopeo: the tests and the demo run against them.
system-deps:
	@if [ ! -x /usr/bin/docker-registry ] || ! command -v skopeo >/dev/null || ! command -v curl >/dev/null || ! command -v openssl >/dev/null; then \
	  echo "installing docker-registry, skopeo, curl, openssl (apt-get)"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq docker-registry skopeo curl openssl >/dev/null; \
	fi
	@# Debian's package starts a registry on :5000 as a service; the tests and demo use their own.
	@-$(SUDO) systemctl disable --now docker-registry >/dev/null 2>&1 || true

setup: $(STAMP) system-deps

demo: setup
	$(PY) -m examples.demo

# The static gates, fast first; configured in pyproject.toml ([tool.ruff], [tool.mypy], [tool.importlinter]).
lint: $(STAMP)
	$(PY) -m ruff check webhook loader tests bench examples
	$(PY) -m mypy
	$(VENV)/bin/lint-imports --cache-dir $(VENV)/.import_linter_cache

test: setup lint
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/pull.py

clean:
	rm -rf $(VENV) .pytest_cache .demo .bench
