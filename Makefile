# gehirn-ts: `make run` and `make test` work on a fresh Debian 12 machine as root.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.deps-installed

# What the daemon needs from Debian: a Python with venv, and a compiler for any
# dependency that has no wheel for this platform.
RUN_DEBS := python3 python3-venv python3-dev gcc libffi-dev
# What the tests need beyond that: the real peers. postfix brings smtp-sink (a remote
# MX) and smtp-source; it is installed unconfigured (no mail system is set up or started).
# libmail-dkim-perl is the independent DKIM verifier; ngircd the IRC server.
# DEB_DEBS build the Debian package (a test builds, installs and removes it).
DEB_DEBS := dh-virtualenv debhelper dpkg-dev build-essential python3-dev python3-venv libffi-dev
TEST_DEBS := curl rabbitmq-server swaks libnet-ssleay-perl libmail-dkim-perl postfix ngircd \
	$(DEB_DEBS)

.PHONY: run test test-debs lint unit bench sample clean install deb

test-debs:
	@if ! dpkg-query -W -f='$${Status}' postfix 2>/dev/null | grep -q "ok installed"; then \
		echo "postfix postfix/main_mailer_type select No configuration" \
			| debconf-set-selections 2>/dev/null || true; fi
	@scripts/apt-need $(TEST_DEBS)

$(STAMP): setup.py pyproject.toml
	@if ! $(PYTHON) -c 'import venv, ensurepip' 2>/dev/null; then scripts/apt-need $(RUN_DEBS); fi
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '.[test]'
	touch $(STAMP)

# Reinstall the package itself (not its dependencies) so the installed twistd plugin
# always matches the working tree.
install: $(STAMP)
	$(BIN)/pip install -q --no-deps --force-reinstall .

run: install
	$(BIN)/gehirn-tsd --logger gehirn_ts.logs.text_observer --nodaemon --pidfile= gehirn-ts $(if $(CONFIG),--config $(CONFIG))

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The peers run only for the tests: started here, stopped whatever the outcome.
test: install
	@$(MAKE) --no-print-directory test-debs
	$(MAKE) --no-print-directory lint
	scripts/rabbitmq-node start
	status=0; $(BIN)/python -m pytest -q $(PYTEST_ARGS) || status=$$?; \
		scripts/rabbitmq-node stop; exit $$status

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit tests/contract $(PYTEST_ARGS)

# Benchmarks print figures side by side with a peer measured in the same run.
# The peers measured beside gehirn-ts: Postfix (the benchmark runs its own instance) and
# aiosmtpd.
# h2load (nghttp2-client) loads the HTTP API, as smtp-source loads SMTP (bench/h2load.py).
BENCH_DEBS := nghttp2-client

bench: install
	@$(MAKE) --no-print-directory test-debs
	@scripts/apt-need $(BENCH_DEBS)
	$(BIN)/pip install -q aiosmtpd
	scripts/rabbitmq-node start
	status=0; $(BIN)/python bench/events.py || status=$$?; \
		$(BIN)/python bench/smtp.py || status=$$?; \
		$(BIN)/python bench/send.py || status=$$?; \
		scripts/rabbitmq-node stop; exit $$status

# The Debian package, in dist/ (docs/packaging.md).
deb:
	@scripts/apt-need $(DEB_DEBS)
	scripts/build-deb dist

sample: $(STAMP)
	$(BIN)/python -c 'from gehirn_ts.config import render_sample; print(render_sample(), end="")' \
		> etc/gehirn-ts.toml
	$(BIN)/python -c 'import pathlib, gehirn_ts.config as c; p = pathlib.Path("docs/operations.md"); \
		p.write_text(c.replace_options_table(p.read_text()))'

clean:
	rm -rf $(VENV) build *.egg-info dist
