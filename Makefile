# `make test` is the one command that checks everything; CI runs it via .ci/run.
# It creates (or reuses) a virtualenv in .venv, installs the project into it in
# strict editable mode, then runs ruff, mypy --strict and pytest.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PKG_DIRS := crdt protocol daemon cli simulations
# Strict editable mode links each module into build/; mypy reads that tree
# (it cannot follow an editable install's import hook). A new module needs a
# reinstall, so the install depends on the list of modules.
MODULES := $(sort $(shell find $(PKG_DIRS) -name '*.py' -o -name 'py.typed' -o -name '*.toml'))

.PHONY: test lint typecheck pytest demo clean FORCE

test: lint typecheck pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.installed
	MYPYPATH="$$(echo build/__editable__.archipel-*)" $(BIN)/mypy -p archipel

pytest: $(VENV)/.installed
	$(BIN)/pytest

# Three cells, three real daemons on loopback: decide, delegate, share, split, heal, agree.
demo: $(VENV)/.installed
	$(BIN)/archipel demo

$(VENV)/.installed: pyproject.toml $(VENV)/.modules
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Archipel needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)."; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,sim]' --config-settings editable_mode=strict
	touch $@

# Rewritten only when the set of modules changes, so that adding a module
# (and nothing else) triggers a reinstall.
$(VENV)/.modules: FORCE
	@mkdir -p $(VENV)
	@printf '%s\n' $(MODULES) > $@.tmp
	@if cmp -s $@.tmp $@; then rm $@.tmp; else mv $@.tmp $@; fi

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .hypothesis
