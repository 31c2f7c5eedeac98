# pc-clip: two commands do all set-up on a fresh machine.
#   make reproduce   the full reproduction on the embedded tiny profile
#   make test        notebooks <-> library sync check, layout, ruff, nbdev_test, pytest (slow whole runs included)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.pc-clip-installed
PROFILE ?= tiny
# where torch and torchvision come from: empty = the default index; a CPU-only machine can save ~6 GB of CUDA wheels
# with `make install TORCH_INDEX=https://download.pytorch.org/whl/cpu` (any index that has the pinned releases)
TORCH_INDEX ?=
# the --user kernel's display name carries the checkout, so two checkouts never silently share one `pc-clip` kernel
# (the venv's own kernel, which `make lab` uses, keeps the plain name the notebooks' metadata carries)
KERNEL_DISPLAY := pc-clip ($(subst $(HOME),~,$(CURDIR)))

.PHONY: install reproduce test paper-smoke lab export clean-nbs bench

$(STAMP): settings.ini setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch and torchvision pinned here (the package itself asks only for a floor, so it keeps a user's CUDA build):
	# these exact releases come from the default index, or from TORCH_INDEX (e.g. CPU-only wheels) when it is set
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# the notebooks name the "pc-clip" kernel: registered for this venv's Jupyter and for the user's own Jupyter
	$(BIN)/python tools/set_kernelspec.py --user-kernel-owner  # says so when the --user kernel was another checkout's
	$(BIN)/python -m ipykernel install --sys-prefix --name pc-clip --display-name "pc-clip" >/dev/null
	$(BIN)/python -m ipykernel install --user --name pc-clip --display-name "$(KERNEL_DISPLAY)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/pc-clip reproduce --profile $(PROFILE)

SOURCES_HASH = find nbs pc_clip -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' | sort | xargs sha1sum | sha1sum

test: $(STAMP)
	@echo "== notebooks and library in sync, notebooks clean (nbdev_export and nbdev_clean must change nothing) =="
	@before=$$($(SOURCES_HASH)); $(BIN)/nbdev_export && $(BIN)/nbdev_clean; after=$$($(SOURCES_HASH)); \
	if [ "$$before" != "$$after" ]; then git status --short -- nbs pc_clip; \
	  echo "nbs/ and pc_clip/ were out of sync or notebooks carried outputs; they are fixed in your tree now: review and commit."; exit 1; fi
	@echo "== layout: stages import only the stages below them, no import circles, no shims =="
	$(BIN)/python tools/check_layout.py
	@echo "== ruff: unused imports and variables, redefinitions, lines over 110 characters (pyproject.toml [tool.ruff]) =="
	$(BIN)/ruff check pc_clip nbs tests tools bench
	@echo "== nbdev_test (notebook examples) =="
	$(BIN)/nbdev_test --n_workers 2 --timing
	@echo "== pytest, both layers: the quick unit tests and the slow whole runs (the paper-smoke reproduction included) =="
	$(BIN)/python -m pytest tests -q

# the paper's code path end to end on stand-ins (part of `make test`; this target runs it alone)
paper-smoke: $(STAMP)
	$(BIN)/python -m pytest tests/test_paper_smoke.py -q -s

lab: $(STAMP)
	$(BIN)/jupyter lab --ip 127.0.0.1 --ServerApp.root_dir=. $(if $(filter 0,$(shell id -u)),--allow-root,)

export: $(STAMP)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)
	$(BIN)/nbdev_clean

bench: $(STAMP)
	$(BIN)/python bench/bench_generation.py
	$(BIN)/python bench/bench_finetune.py
	@echo "GPU figures: on a GPU machine run bash bench/gpu_check.sh (see bench/RESULTS.md)"
