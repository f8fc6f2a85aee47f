# The README's two commands. Both are idempotent: the venv is created and the project
# installed on first use, and again only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-slow install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/sslp demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

# Evaluation protocols trained long enough to beat random init (minutes each on 2 cores).
test-slow: $(STAMP)
	$(VENV)/bin/python -m pytest -m slow

clean:
	rm -rf $(VENV) build *.egg-info platform/*.egg-info
