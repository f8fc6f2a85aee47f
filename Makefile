# The README's two commands. Both are idempotent: the venv is created and the project
# installed on first use, and again only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo lint test test-slow install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sslp demo

# Static checks, also run by `make test`: ruff (style and likely bugs, tests/ included) and
# import-linter (the layers of DESIGN.md, [tool.importlinter] in pyproject.toml). PYTHONPATH:
# the contracts are checked on this tree's sources whatever the install.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	PYTHONPATH=platform $(VENV)/bin/lint-imports

# The whole suite on 2 cores without a GPU, in two pytest-xdist processes that take one test module at
# a time, longest first (tests/README.md); the 15 slowest tests are listed at the end.
test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=15

# Checks that train at full size for minutes (tests marked slow; each claim also has a fast test in `make test`).
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info .ruff_cache .import_linter_cache
