# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
# `make install` is what an operator runs on a host (the scripts' requirements only, in .venv; the package
# compiled, so a script started by cron or a timer under PYTHONDONTWRITEBYTECODE does not compile it each time);
# The demo and the suite run on Debian's own /usr/bin/python3 (3.11.2 on Debian 12), the python users' hosts
# and cron run (and about a quarter less CPU for the suite than an unoptimised build of a newer one);
# `make test-newer` runs the tests that build releases, adopt, rehearse and drill again on NEWER_PYTHON
# (the python3 first on PATH: 3.11.7 on the CI machine): what a change of python breaks shows there first.
# `make docs` writes docs/cli.md from the scripts' --help and docs/config.md from safedeploy/config_keys.py
# (tests/test_docs.py fails when either is stale).
# `make lint`: ruff, mypy on safedeploy/ (settings in pyproject.toml's [tool.mypy]) and vermin (python 3.10).
PYTHON ?= python3
SUITE_PYTHON ?= /usr/bin/python3
NEWER_PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NEWER_VENV ?= .venv-newer
# the tests that unpack and build releases, adopt, rehearse and drill: what a change of python broke
NEWER_TESTS ?= tests/test_pythons.py tests/test_releases.py tests/test_adopt.py tests/test_rehearse.py tests/test_rollback.py

.PHONY: demo test test-newer lint install bench clean system-packages docs

# --clear: a .venv made earlier from another python is made again from SUITE_PYTHON
$(VENV)/.ready: requirements.txt requirements-dev.txt
	$(SUITE_PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(NEWER_VENV)/.ready: requirements.txt requirements-dev.txt
	$(NEWER_PYTHON) -m venv --clear $(NEWER_VENV)
	$(NEWER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m compileall -q safedeploy

system-packages:
	bash .ci/system-packages

demo: system-packages $(VENV)/.ready
	$(PY) demo/run_demo.py

test: system-packages $(VENV)/.ready
	$(PY) -m pytest

test-newer: system-packages $(NEWER_VENV)/.ready
	$(NEWER_VENV)/bin/python -m pytest $(NEWER_TESTS)

docs: $(VENV)/.ready
	$(PY) docs/generate_cli.py
	$(PY) docs/generate_config.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/vermin --quiet --no-tips --violations -t=3.10- --exclude-regex '(^|/)(\.venv[^/]*|tests)/' .

clean:
	rm -rf $(VENV) $(NEWER_VENV) .venv-debian .pytest_cache
