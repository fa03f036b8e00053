# capsnet: `make demo` (a short real training run) and `make test` (the test suite) from a
# fresh clone. Both create .venv and install everything first (`make setup`).
VENV  ?= .venv
PY    := $(VENV)/bin/python
PIP   := $(VENV)/bin/pip
TORCH ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.capsnet-installed

# Demo: two passes over 48,000 real Fashion-MNIST training images (the paper's batch 128,
# Adam 1e-3, random 2-pixel shifts), tested on the full 10,000-image test set after each.
DEMO_FLAGS ?= --train-size 48000 --epochs 2 --log-every 25

.PHONY: setup test demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile apt-packages.txt scripts/apt_install.sh scripts/visdom_assets.sh
	bash scripts/apt_install.sh apt-packages.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(TORCH)
	$(PIP) install -q 'setuptools<81' wheel
	$(PIP) install -q --no-build-isolation visdom==0.2.4
	$(PIP) install -q -e '.[dev]'
	bash scripts/visdom_assets.sh $(PY)
	touch $(STAMP)

# Two pytest-xdist workers, one torch thread each (tests/conftest.py): much of the suite
# waits on process start-up, imports and browsers, which overlap that way. "worksteal" gives
# each worker half of the list (the shared short run's tests first) and balances the ends.
PYTEST_FLAGS ?= -n 2 --dist worksteal

test: setup
	$(PY) -m pytest -q $(PYTEST_FLAGS)

demo: setup
	rm -rf runs/demo
	$(VENV)/bin/capsnet train $(DEMO_FLAGS) --out runs/demo
	$(VENV)/bin/capsnet evaluate runs/demo/last.ckpt

bench: setup
	$(VENV)/bin/capsnet bench

clean:
	rm -rf $(VENV) runs build src/*.egg-info
