# The README's commands. `make demo` runs the main job; `make test` runs the tests.
PYTHON ?= python3

.PHONY: setup demo test lint bench

# torch and torchvision pinned together and installed first, so nothing else pulls a torch:
# a machine with an NVIDIA GPU gets the CUDA build, any other the 190 MB CPU build.
TORCH_CPU = "torch==2.13.0" "torchvision==0.28.0"
TORCH_GPU = "torch==2.14.1" "torchvision==0.29.1"
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

setup:
ifeq ($(HAS_GPU),1)
	$(PYTHON) -m pip install $(TORCH_GPU)
	$(PYTHON) -m pip install -e ".[torch,demo,dev,cuda]"
else
	$(PYTHON) -m pip install $(TORCH_CPU)
	$(PYTHON) -m pip install -e ".[torch,demo,dev]"
endif

demo:
	$(PYTHON) -m bdpo_jax.demo --out demo_out

test:
	$(PYTHON) -m pytest -q -n 2 --durations=15 tests

lint:
	$(PYTHON) -m ruff format --no-cache --check . && $(PYTHON) -m ruff check --no-cache .

bench:
	$(PYTHON) bench/unet.py && $(PYTHON) bench/data.py && $(PYTHON) bench/preprocess.py && $(PYTHON) bench/train_step.py
