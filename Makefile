# fleetmate's everyday verbs. `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

.DEFAULT_GOAL := help
.PHONY: help run test lint typecheck pytest bench bench-quick install clean test-deps

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@if ! $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then \
		echo "fleetmate needs Python 3.11 or newer as $(PYTHON)"; exit 1; fi
	@if [ ! -x $(PY) ]; then \
		$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
			echo "python3-venv is missing; installing it (Debian/Ubuntu)"; \
			apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && $(PYTHON) -m venv $(VENV); }; fi
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) ## create .venv and install fleetmate with its test tools

run: $(STAMP) ## run a replica in the foreground on the embedded default (Ctrl-C stops it)
	$(VENV)/bin/fleetmate serve

lint: $(STAMP) ## ruff (lint and format check)
	$(VENV)/bin/ruff check --output-format concise app tests bench
	$(VENV)/bin/ruff format --check app tests bench

typecheck: $(STAMP) ## mypy --strict on app/
	$(VENV)/bin/mypy app

# The tests start their own MariaDB and PostgreSQL 15 on free ports (never the system services)
# and drive Debian's zkCli.sh: install the Debian packages once if their binaries are missing.
test-deps: ## install mariadb-server, postgresql, zookeeper, iproute2, a JDK and Curator (Debian/Ubuntu) if the tests' binaries are missing
	@export PATH="$$PATH:/usr/sbin:/sbin"; \
	if ! command -v mariadbd >/dev/null || ! command -v mariadb-install-db >/dev/null \
		|| [ ! -x /usr/lib/postgresql/15/bin/postgres ] || [ ! -f /usr/share/zookeeper/bin/zkCli.sh ] \
		|| ! command -v ip >/dev/null || ! command -v javac >/dev/null \
		|| [ ! -f /usr/share/java/curator-framework.jar ] || [ ! -f /usr/share/java/curator-recipes.jar ]; then \
		echo "mariadb-server, postgresql, zookeeper, iproute2, a JDK or Curator is missing; installing them (Debian/Ubuntu)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			mariadb-server postgresql zookeeper iproute2 default-jdk-headless \
			libcurator-framework-java libcurator-recipes-java >/dev/null; fi
	@export PATH="$$PATH:/usr/sbin:/sbin"; \
	if ! command -v systemd-analyze >/dev/null; then \
		echo "systemd-analyze (checks deploy/*.service) is missing; installing systemd (Debian/Ubuntu)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null; fi

pytest: $(STAMP) test-deps ## the test suite alone
	$(PY) -m pytest -ra -q --durations=40

test: lint typecheck pytest ## everything CI runs: lint, types, tests

BENCHES := startup registry zk failover metrics agent ha hostile rpo scheduler kv

bench: $(STAMP) test-deps ## run every benchmark in bench/ against its peers (etcd, ZooKeeper, node_exporter, Patroni); JSON under bench/results/
	@set -e; for b in $(BENCHES); do echo "== bench/$$b.py"; $(PY) bench/$$b.py $$([ $$b = ha ] && echo --install); done

bench-quick: $(STAMP) test-deps ## the same as smoke runs (--quick), a few minutes in all
	@set -e; for b in $(filter-out startup,$(BENCHES)); do echo "== bench/$$b.py --quick"; $(PY) bench/$$b.py --quick $$([ $$b = ha ] && echo --install); done

clean: ## remove the virtualenv, caches and the local data dir
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache data
