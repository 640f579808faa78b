# The README's commands. `make demo` runs the main job; `make test` runs the tests.
PYTHON ?= python3

.PHONY: setup demo test lint bench

# torch and torchvision are pinned together and installed first, so nothing else pulls a torch.
# PyPI's x86-64 torchvision is linked against the CUDA build of torch and fails to import beside
# the CPU-only torch 2.13.0 wheel ('operator torchvision::nms does not exist'), so x86-64 takes
# the CUDA build (it runs on the CPU too); aarch64 gets PyPI's CPU build. A machine where
# nvidia-smi lists a GPU also gets jax[cuda12].
ifeq ($(shell uname -m),aarch64)
TORCH = "torch==2.9.1" "torchvision==0.24.1"
else
TORCH = "torch==2.14.1" "torchvision==0.29.1"
endif
EXTRAS := torch,demo,dev$(shell nvidia-smi -L >/dev/null 2>&1 && echo ,cuda)

setup:
	$(PYTHON) -m pip install $(TORCH)
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"

demo:
	$(PYTHON) -m bdpo_demo --out demo_out

test:
	$(PYTHON) -m pytest -q -n 2 --durations=15 tests

lint:
	$(PYTHON) -m ruff format --no-cache --check . && $(PYTHON) -m ruff check --no-cache .

bench:
	$(PYTHON) bench/unet.py && $(PYTHON) bench/data.py && $(PYTHON) bench/preprocess.py && $(PYTHON) bench/train_step.py
