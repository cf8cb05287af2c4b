# Thin targets; `make check` is the one gate for developers and CI (.ci/run calls it).
PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
PYTEST_ARGS ?=

.PHONY: check format lint types test test-min bench bench-full run lock outdated fresh-check man deb

check: lint types test

format:
	$(PYTHON) -m ruff format policyd tests bench

lint:
	$(PYTHON) -m ruff format --check policyd tests bench
	$(PYTHON) -m ruff check policyd tests bench

types:
	$(PYTHON) -m mypy

test:
	$(PYTHON) -m pytest $(PYTEST_ARGS)

# The unit and contract tests, run by .ci/run in .venv-min (the lowest runtime versions).
test-min:
	$(PYTHON) -m pytest tests/unit tests/contract $(PYTEST_ARGS)

# Regenerate requirements/*.txt from pyproject.toml with uv (itself locked in
# requirements/lock-tools.txt); commit the result with a green CI (requirements/README.md).
lock: .venv-lock/.ok
	bash requirements/lock.sh

.venv-lock/.ok: requirements/lock-tools.txt
	rm -rf .venv-lock && /usr/bin/python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --require-hashes -r requirements/lock-tools.txt
	touch $@

# What newer releases exist for the locked packages (nothing changes until `make lock`).
outdated:
	$(PYTHON) -m pip list --outdated

# What CI does, as a new machine would: a clone of the committed HEAD in a temporary
# directory with ../shared beside it, Debian's python3 for the venvs, no pip cache, CI=true.
fresh-check:
	@git diff --quiet HEAD || echo "fresh-check: uncommitted changes are not part of the run"
	d=$$(mktemp -d) && trap 'rm -rf "$$d"' EXIT && git clone -q . "$$d/main" \
	  && ln -s "$$(realpath ../shared)" "$$d/shared" && cd "$$d/main" \
	  && env -u VIRTUAL_ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	     PIP_NO_CACHE_DIR=1 CI=true bash .ci/run </dev/null

run:
	$(PYTHON) -m policyd

# policyd(8), policyctl(8), policyd.toml(5) from the parsers and the config schema; commit
# the result (tests/unit/test_manpages.py fails when man/ differs from what this writes).
man:
	$(PYTHON) -m policyd.manpages man

# The Debian package (debian/, docs/decisions.md): policyd_<version>_<arch>.deb in the
# repository root. dpkg-buildpackage writes into the parent directory; the .deb is moved
# here and the upload files (.buildinfo, .changes) it wrote beside it are removed.
DEB_NAME = policyd_$(shell dpkg-parsechangelog -SVersion)_$(shell dpkg-architecture -qDEB_HOST_ARCH)
deb:
	dpkg-buildpackage --build=binary --no-sign
	mv ../$(DEB_NAME).deb .
	rm -f ../$(DEB_NAME).buildinfo ../$(DEB_NAME).changes
	debian/rules clean

# bench: per question (floor, policyd, policyd-redis, greylistd) then per message through
# Exim; ~4.5 minutes. Both overwrite bench/results/{run,exim}-quick.{json,md} (bench/README.md).
bench:
	$(PYTHON) bench/run.py --quick
	$(PYTHON) bench/exim_msg.py --quick

bench-full:
	$(PYTHON) bench/run.py
	$(PYTHON) bench/exim_msg.py
	$(PYTHON) bench/variants.py --spf
	$(PYTHON) bench/memory.py
