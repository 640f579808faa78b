# The README's commands. `make demo` runs the main job; `make test` runs the tests.
PYTHON ?= python3

.PHONY: setup demo test lint bench

setup:
	$(PYTHON) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PYTHON) -m pip install -e ".[torch,demo,dev]"

demo:
	$(PYTHON) -m bdpo_jax.demo --out demo_out

test:
	$(PYTHON) -m pytest -q -n 2 --durations=15 tests

lint:
	$(PYTHON) -m ruff format --no-cache --check . && $(PYTHON) -m ruff check --no-cache .

bench:
	$(PYTHON) bench/unet.py && $(PYTHON) bench/data.py && $(PYTHON) bench/preprocess.py && $(PYTHON) bench/train_step.py
