# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench clean system-packages

$(VENV)/.ready: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

system-packages:
	bash .ci/system-packages

demo: system-packages $(VENV)/.ready
	$(PY) demo/run_demo.py

test: system-packages $(VENV)/.ready
	$(PY) -m pytest

clean:
	rm -rf $(VENV) .pytest_cache
