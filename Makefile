# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
# `make install` is what an operator runs on a host (the scripts' requirements only, in .venv; the package
# compiled, so a script started by cron or a timer under PYTHONDONTWRITEBYTECODE does not compile it each time);
# `make test-debian` runs the tests that build releases under Debian's own /usr/bin/python3.
# `make docs` writes docs/cli.md from the scripts' --help and docs/config.md from safedeploy/config_keys.py
# (tests/test_docs.py fails when either is stale).
# `make lint`: ruff, mypy on safedeploy/ (settings in pyproject.toml's [tool.mypy]) and vermin (python 3.10).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_VENV ?= .venv-debian
# the tests that unpack and build releases, adopt, rehearse and drill: what an older python broke
DEBIAN_TESTS ?= tests/test_pythons.py tests/test_releases.py tests/test_adopt.py tests/test_rehearse.py tests/test_rollback.py

.PHONY: demo test test-debian lint install bench clean system-packages docs

$(VENV)/.ready: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(DEBIAN_VENV)/.ready: requirements.txt requirements-dev.txt
	/usr/bin/python3 -m venv $(DEBIAN_VENV)
	$(DEBIAN_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
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

test-debian: system-packages $(DEBIAN_VENV)/.ready
	$(DEBIAN_VENV)/bin/python -m pytest $(DEBIAN_TESTS)

docs: $(VENV)/.ready
	$(PY) docs/generate_cli.py
	$(PY) docs/generate_config.py

lint: $(VENV)/.ready
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/vermin --quiet --no-tips --violations -t=3.10- --exclude-regex '(^|/)(\.venv[^/]*|tests)/' .

clean:
	rm -rf $(VENV) $(DEBIAN_VENV) .pytest_cache
