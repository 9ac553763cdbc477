# virtplane: `make up` runs the all-in-one cluster with a demo VM; `make test` runs every test.
SHELL := /bin/bash
PY := .venv/bin/python
PIP := .venv/bin/pip
APT_STAMP := .setup-stamp-apt
VENV_STAMP := .setup-stamp-venv
# the web console (virtplane/web): rebuilt only when its sources change, since npm ci + vite build take a minute
WEB_STAMP := virtplane/web/.build-stamp
WEB_INPUTS := $(shell find virtplane/web/src -type f 2>/dev/null) \
  $(addprefix virtplane/web/,package.json package-lock.json vite.config.js index.html)

.PHONY: setup up test unit e2e lint bench images clean

setup: $(APT_STAMP) $(VENV_STAMP) $(WEB_STAMP) images

# Installs only what is missing, so a second run is fast.
$(APT_STAMP): deps/apt.txt
	@missing=$$(grep -v '^\s*#' deps/apt.txt | grep -v '^\s*$$' | while read -r p; do \
	  dpkg-query -W -f='$${Status}\n' "$$p" 2>/dev/null | grep -q 'install ok installed' || echo "$$p"; done); \
	if [ -n "$$missing" ]; then \
	  echo "apt: installing $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi; \
	command -v kubectl >/dev/null || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null)
	@touch $@

$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv .venv
	@$(PIP) install -q --disable-pip-version-check -e '.[test]'
	@touch $@

$(WEB_STAMP): $(WEB_INPUTS) | $(APT_STAMP)
	@cd virtplane/web && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent >/dev/null
	@touch $@

images: $(VENV_STAMP) $(APT_STAMP)
	@$(PY) images/build.py

up: setup
	$(PY) -m virtplane.cli.main up --demo

lint: $(VENV_STAMP)
	.venv/bin/ruff check .
	.venv/bin/lint-imports

test: setup
	.venv/bin/ruff check .
	.venv/bin/lint-imports
	$(PY) -m pytest -q -x --durations=15 tests

unit: $(VENV_STAMP)
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) bench/apiserver.py

clean:
	rm -rf .venv $(APT_STAMP) $(VENV_STAMP) $(WEB_STAMP) images/out virtplane/web/dist virtplane/web/node_modules
