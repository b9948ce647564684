# Two commands on a fresh Debian machine: `make demo` and `make test`. Each does its own setup.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup system-deps demo lint test bench clean lock

all: test

# The venv holds requirements/dev.txt (the `webhook`, `agent`, `signing` and `test` extras, locked with hashes)
# and the build requirements; first the locked pip (requirements/build.txt, hash-checked: the venv's own pip is
# whatever the interpreter bundles), then the locks; the project goes in editable, without resolving anything
# (--require-hashes cannot install an editable project, and every dependency is already there).
$(STAMP): pyproject.toml requirements/dev.txt requirements/build.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --require-hashes --no-deps -r requirements/build.txt
	$(PY) -m pip install --quiet --require-hashes -r requirements/dev.txt -r requirements/build.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Refresh the locks (README "Images": reproducible builds). Each file pins every distribution of one install set
# with the hashes of all its files (every platform's wheels, so amd64 and arm64 builds check the same lock):
#   dev.txt      `make`'s venv: .[webhook,agent,signing,test]
#   webhook.txt  Dockerfile.webhook: .[webhook], at dev.txt's versions
#   loader.txt   Dockerfile.loader: .[agent,signing] (the node agent's gRPC, signature verification), at dev.txt's
#                versions
#   build.txt    requirements/build.in: pip (what `make` installs the locks with) and setuptools (what builds
#                the project's wheel, for --no-build-isolation), at dev.txt's versions
# Resolved against the default index alone (no local wheel folders or extra indexes: their files would add hashes
# the index does not serve). `make lock` moves every pin to the newest release the bounds in pyproject.toml
# allow; `make lock LOCK_UPGRADE='--upgrade-package NAME'` moves one; `make lock LOCK_UPGRADE=` only adds what
# changed in pyproject.toml.
LOCK_TOOLS   := $(VENV)/lock-tools
LOCK_UPGRADE ?= --upgrade
PIP_COMPILE   = env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL -u PIP_CONSTRAINT \
                  PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND='make lock' \
                  $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras $(LOCK_UPGRADE)

lock:
	$(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python -m pip install --quiet 'pip-tools==7.6.2'
	$(PIP_COMPILE) --extra webhook --extra agent --extra signing --extra test -o requirements/dev.txt pyproject.toml
	$(PIP_COMPILE) --extra webhook -c requirements/dev.txt -o requirements/webhook.txt pyproject.toml
	$(PIP_COMPILE) --extra agent --extra signing -c requirements/dev.txt -o requirements/loader.txt pyproject.toml
	$(PIP_COMPILE) -c requirements/dev.txt -o requirements/build.txt requirements/build.in

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
