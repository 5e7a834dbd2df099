# spread_dials: install, demo and tests on Debian 12 (as root or with sudo).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch by default (small, quick); GPU users: make install TORCH_SPEC="torch" (see INSTALL.md)
TORCH_SPEC ?= torch==2.13.0
# the linter that `make test` runs first (rules: [tool.ruff.lint] in pyproject.toml)
RUFF_SPEC := ruff==0.17.5
SYSPY := /usr/bin/python3
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := dials python3-dials python3-venv python3-h5py python3-mpi4py openmpi-bin
STAMP := $(VENV)/.spread_dials_installed
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1

.PHONY: install demo lint test test-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@if [ ! -x /usr/bin/dials.stills_process ] || ! $(SYSPY) -c "import h5py, mpi4py, dials" 2>/dev/null; then \
	  $(SUDO) apt-get update && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y --no-install-recommends $(APT_PACKAGES); fi
	$(SYSPY) -m venv --system-site-packages $(VENV)
	@# zuko: the normalizing flow of correct.noise_flow (a maintained spline transform and its inverse)
	$(VENV)/bin/pip install -q "$(TORCH_SPEC)" isal zuko pytest "$(RUFF_SPEC)"
	@# libtbx looks for its build dir under the venv prefix: link Debian's
	@v=$$($(SYSPY) -c 'import sys; print("python%d.%d" % sys.version_info[:2])'); \
	  mkdir -p $(VENV)/lib/cctbx && ln -sfn /usr/lib/cctbx/$$v $(VENV)/lib/cctbx/$$v
	$(VENV)/bin/pip install -q --no-deps --no-build-isolation -e .
	touch $@

# simulate 10 rubredoxin stills -> dials.stills_process (2 MPI ranks) -> validation -> pictures
# (README "The demo"); NIMAGES=20 make demo for more stills
demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash scripts/demo.sh demo_output

lint: install
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -ra tests

# On a machine with torch + CUDA but no DIALS/cctbx (only the pure-torch physics tests).
test-gpu:
	PYTHONPATH=$(CURDIR) python3 -m pytest -q -ra -m gpu tests/physics

clean:
	rm -rf $(VENV) demo_output .pytest_cache
