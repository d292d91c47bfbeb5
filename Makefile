# Two commands on a fresh machine: `make demo` and `make test` (each installs what it needs).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install demo test lint data

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev,teacher,detection-data,slurm]"
	$(BIN)/pip install -q --no-deps deepforest==2.1.0 stardist==0.9.2  # only their bundled real images are read
	touch $(STAMP)

install: $(STAMP) data

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
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
