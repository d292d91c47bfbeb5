# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
WORKERS ?= auto  # make test: one test process per core (pytest-xdist)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# make install: the lock's versions, those the README's figures were measured with (README: Development);
# make install-latest passes no REQUIREMENTS, so pip takes the newest versions pyproject.toml allows.
LOCK := requirements.lock
EXTRAS := dev,teacher,detection-data,slurm,loggers,export
REQUIREMENTS ?= -r $(LOCK)
UV := uv==0.13.10
comma := ,

.PHONY: install install-latest lock demo test lint data bench bench-gpu

$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(REQUIREMENTS) -e ".[$(EXTRAS)]"
	$(BIN)/pip install -q --no-deps deepforest==2.1.0 stardist==0.9.2  # only their bundled real images are read
	touch $(STAMP)

install: $(STAMP) data

# The newest versions instead of the lock's (`make -B install` goes back to the lock).
install-latest:
	$(MAKE) --always-make install REQUIREMENTS="--upgrade --upgrade-strategy eager"

# Rewrite the lock from pyproject.toml for Linux x86_64 and CPython 3.11 with uv (installed for this command alone),
# keeping each version it pins while pyproject.toml allows it; `make lock UPGRADE=1` takes the newest instead.
lock:
	tool=$$(mktemp -d) && $(PY) -m venv $$tool && $$tool/bin/pip install -q "$(UV)" && \
	$$tool/bin/uv pip compile -q pyproject.toml --extra $(subst $(comma), --extra ,$(EXTRAS)) $(if $(UPGRADE),--upgrade) \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --custom-compile-command "make lock" -o $(LOCK); \
	status=$$?; rm -rf $$tool; exit $$status

# The built-in data: Fashion-MNIST from Debian; without apt, scikit-learn's bundled digits.
data:
	@if [ ! -f $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || echo "apt failed: falling back to scikit-learn digits"; \
	  else echo "no root apt here: falling back to scikit-learn digits (install dataset-fashion-mnist for Fashion-MNIST)"; fi; \
	fi
	@if [ ! -f $(FMNIST) ]; then $(BIN)/pip install -q -e ".[fallback-data]"; fi

demo: install
	$(BIN)/python -m src.pretrain objective=mae encoder=vit_b

test: install
	$(BIN)/lint-imports  # the layers of src/ only point down (pyproject.toml: [tool.importlinter])
	$(BIN)/python -m pytest -q -n $(WORKERS) --dist loadfile tests  # pytest-xdist: a file's tests on one worker

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

# Speed tables (docs/benchmarks.md). `make bench [DEVICE=cuda] [BATCH=8,16] [BENCH_ARGS="--repeats 1"]`: the sections
# below, measured in one run. `make bench-gpu`: the GPU tables, about 5 minutes on an H100: MAE, BEiT, DeiT at batch
# 256 with their MFU and our steps against timm's and a plain MAE's; Pale-T vs Swin-T at 64 and 128 (all bf16 autocast).
DEVICE ?= cpu
BATCH ?= 8
BENCH_ARGS ?=
BENCH_SECTIONS := objectives,peers,pale_vs_swin,mae_token_drop,detection_ratios,data_pipeline
GPU_STEPS := --device cuda --steps 20 --warmup 5

bench: install
	$(BIN)/python -m src.benchmark --device $(DEVICE) --batch-size $(BATCH) --sections $(BENCH_SECTIONS) $(BENCH_ARGS)

bench-gpu: $(STAMP)
	$(BIN)/python -m src.benchmark $(GPU_STEPS) --sections objectives --batch-size 256 --repeats 1
	$(BIN)/python -m src.benchmark $(GPU_STEPS) --sections peers --batch-size 256 --repeats 2
	$(BIN)/python -m src.benchmark $(GPU_STEPS) --sections pale_vs_swin --batch-size 64,128 --repeats 2
	$(BIN)/python -m src.benchmark $(GPU_STEPS) --sections layouts --batch-size 256 --repeats 2
