# The two commands of the README: `make demo` and `make test`. Each installs the Debian packages it needs
# (.ci/system-packages), then sets up .venv.
# Every venv here is made from PYTHON, Debian's own /usr/bin/python3 unless told (3.11.2 on Debian 12): the
# python users' hosts and cron run. The demo and the suite run on it (the suite takes about a tenth less
# CPU and a sixth less wall time there than on the unoptimised 3.11.7 first on the CI machine's PATH).
# `make test-newer` runs the tests that build releases, adopt, rehearse and drill again on NEWER_PYTHON (the
# python3 first on PATH: 3.11.7 on the CI machine), and fails when that is PYTHON itself.
# `make install` is what an operator runs on a host (the scripts' requirements only, in .venv; the package
# compiled, so a script started by cron or a timer under PYTHONDONTWRITEBYTECODE does not compile it each time).
# `make docs` writes docs/cli.md from the scripts' --help and docs/config.md from safedeploy/config_keys.py
# (tests/test_docs.py fails when either is stale).
# `make lint`: ruff, mypy on safedeploy/ (settings in pyproject.toml's [tool.mypy]) and vermin (python 3.10).
PYTHON ?= /usr/bin/python3
NEWER_PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NEWER_VENV ?= .venv-newer
# the tests that unpack and build releases, adopt, rehearse and drill: what a change of python broke
NEWER_TESTS ?= tests/test_pythons.py tests/test_releases.py tests/test_adopt.py tests/test_rehearse.py tests/test_rollback.py
# each stamp names its python: a venv another python made (an older checkout's) is set up again
READY := $(VENV)/.ready-$(subst /,_,$(PYTHON))
NEWER_READY := $(NEWER_VENV)/.ready-$(subst /,_,$(NEWER_PYTHON))
# $(call runs,FOLDER,PYTHON): a shell test, true when the venv FOLDER runs PYTHON's interpreter
runs = test "$$(readlink -f $(1)/bin/python)" = "$$(readlink -f "$$(command -v $(2))")"
# $(call make_venv,FOLDER,PYTHON): FOLDER made a venv of PYTHON, emptied first (--clear) only where it runs
# another interpreter; a working one (an operator's .venv, which cron's scripts run) keeps what it has
make_venv = $(2) -m venv $$($(call runs,$(1),$(2)) || echo --clear) $(1)

.PHONY: demo test test-newer lint install bench clean system-packages docs

$(READY): requirements.txt requirements-dev.txt
	$(call make_venv,$(VENV),$(PYTHON))
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(NEWER_READY): requirements.txt requirements-dev.txt
	$(call make_venv,$(NEWER_VENV),$(NEWER_PYTHON))
	$(NEWER_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

install:
	rm -f $(VENV)/.ready*
	$(call make_venv,$(VENV),$(PYTHON))
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m compileall -q safedeploy

system-packages:
	bash .ci/system-packages

demo: system-packages $(READY)
	$(PY) demo/run_demo.py

test: system-packages $(READY)
	$(PY) -m pytest

test-newer: system-packages $(NEWER_READY)
	@if $(call runs,$(NEWER_VENV),$(PYTHON)); then \
	    echo "make test-newer: NEWER_PYTHON ($(NEWER_PYTHON)) is PYTHON ($(PYTHON)) itself; name a newer one, e.g. make test-newer NEWER_PYTHON=python3.12" >&2; \
	    exit 1; fi
	$(NEWER_VENV)/bin/python -m pytest $(NEWER_TESTS)

docs: system-packages $(READY)
	$(PY) docs/generate_cli.py
	$(PY) docs/generate_config.py

lint: system-packages $(READY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/vermin --quiet --no-tips --violations -t=3.10- --exclude-regex '(^|/)(\.venv[^/]*|tests)/' .

clean:
	rm -rf $(VENV) $(NEWER_VENV) .venv-debian .pytest_cache
