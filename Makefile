# One-command set-up: `make test` and `make demo` each create the venv, install
# the pinned dependencies, fetch Fashion-MNIST from Debian and build the extension.
PY      := .venv/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SEED    ?= 0
OUT     ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv venv-dev data build cuda-check lint-imports test test-all demo bench bench-quick clean sanitize bad-input-doc

# Two stamps: `make demo` installs the run-time set only (requirements.txt); tests and benchmarks add
# requirements-dev.txt (pytest, hypothesis, import-linter, DALI).
venv: .venv/.stamp
.venv/.stamp: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -r requirements.txt
	touch $@

venv-dev: .venv/.stamp-dev
.venv/.stamp-dev: requirements-dev.txt .venv/.stamp
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

data: $(FMNIST)
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist

# The extension built by rename (scripts/build_ext.sh: running jobs keep their mapped copy), then the standard
# editable install of this checkout into .venv: `pip install -e .` (setup.py's `lpqld` console script),
# --no-build-isolation so it builds against the venv's torch. A moved or copied checkout imports its own
# code after its own `make build`. Earlier checkouts
# installed a hand-written lpqld_fast_dev.pth and .venv/bin/lpqld pointing at the clone they were made in:
# both are removed first.
build: venv
	scripts/build_ext.sh
	rm -f "$$($(PY) -c 'import site; print(site.getsitepackages()[0])')/lpqld_fast_dev.pth" .venv/bin/lpqld
	LPQLD_PACKAGE_ONLY=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .

# Compile-only check of the CUDA sources (no GPU needed; skipped without nvcc).
cuda-check: venv
	scripts/cuda_compile_check.sh

# The package's layers and import cycles (contracts in pyproject.toml); tests/test_layers.py runs it too.
lint-imports: venv-dev
	.venv/bin/lint-imports --no-cache

test: venv-dev data build cuda-check lint-imports
	TRITON_INTERPRET=1 $(PY) -m pytest -q --timeout=600 -m "not slow" $(PYTEST_ARGS)

# Everything, including the slow torchrun kill/resume and the 21K-class scale tests.
test-all: venv-dev data build cuda-check
	TRITON_INTERPRET=1 $(PY) -m pytest -q --timeout=1200 $(PYTEST_ARGS)

# docs/BAD_INPUT.md's tables, regenerated from the cases in tests/test_bad_input.py (`make test` fails when
# they are out of date; `$(PY) scripts/bad_input_doc.py --check` checks without writing).
bad-input-doc: venv-dev build
	TRITON_INTERPRET=1 $(PY) scripts/bad_input_doc.py

demo: venv data build
	$(PY) -m lpqld_fast.cli distill --preset fashion-mnist-demo --seed $(SEED) --out $(OUT)

bench: venv-dev build
	$(PY) -m bench.run --out bench/results

bench-quick: venv-dev build
	$(PY) -m bench.run --quick --out bench/results

# ASan/UBSan build of the CPU kernels, kept apart from the normal extension: compiled into
# build/sanitize (own build-temp, so the normal build's objects are untouched), then run against a
# copy of the package in build/sanitize/root whose _C is the sanitised one (python -P: the checkout's
# lpqld_fast/ and its normal _C.so are not on sys.path). lpqld_fast/_C*.so is never replaced.
SAN_DIR := build/sanitize
sanitize: venv-dev
	exec 9>/tmp/lpqld-build.lock; flock 9; \
	  LPQLD_SANITIZE=1 WITH_CUDA=0 MAX_JOBS=2 $(PY) setup.py -q build_ext \
	    --build-lib $(SAN_DIR)/lib --build-temp $(SAN_DIR)/temp
	rm -rf $(SAN_DIR)/root && mkdir -p $(SAN_DIR)/root
	cp -a lpqld_fast $(SAN_DIR)/root/
	rm -f $(SAN_DIR)/root/lpqld_fast/_C*.so && find $(SAN_DIR)/root -name __pycache__ -prune -exec rm -rf {} +
	cp $(SAN_DIR)/lib/lpqld_fast/_C*.so $(SAN_DIR)/root/lpqld_fast/
	ln -s $(CURDIR)/kernels $(SAN_DIR)/root/kernels
	cd $(SAN_DIR)/root && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONPATH=$(CURDIR)/$(SAN_DIR)/root OMP_NUM_THREADS=1 $(CURDIR)/$(PY) -P -c "import sys, torch, lpqld_fast._C as c; assert '$(SAN_DIR)' in c.__file__, c.__file__; sys.exit(0)"
	cd $(SAN_DIR)/root && LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  PYTHONPATH=$(CURDIR)/$(SAN_DIR)/root OMP_NUM_THREADS=1 $(CURDIR)/$(PY) -P -m pytest -q -p no:cacheprovider --rootdir $(CURDIR) -c $(CURDIR)/pyproject.toml \
	  $(CURDIR)/tests/test_classwise_moments.py $(CURDIR)/tests/test_soft_label_kl.py \
	  $(CURDIR)/tests/test_segment_bn_loss.py $(CURDIR)/tests/test_crop_resize_flip.py \
	  $(CURDIR)/tests/test_properties.py $(SAN_TESTS)

clean:
	rm -rf build lpqld_fast/_C*.so
