# One-command set-up: `make test` and `make demo` each create the venv, install
# the pinned dependencies, fetch Fashion-MNIST from Debian and build the extension.
PY      := .venv/bin/python
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SEED    ?= 0
OUT     ?= runs/demo
PYTEST_ARGS ?=

.PHONY: venv data build cuda-check test test-all demo bench bench-quick clean sanitize

venv: .venv/.stamp
.venv/.stamp: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip >/dev/null
	$(PY) -m pip install -q -r requirements.txt
	touch $@

data: $(FMNIST)
$(FMNIST):
	@if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist

# In-place build + a development install into .venv (a .pth entry and the `lpqld` command),
# so `import lpqld_fast` and `.venv/bin/lpqld` work from anywhere. `pip install .` builds a wheel instead.
build: venv
	scripts/build_ext.sh
	$(PY) -c "import site, sys; open(site.getsitepackages()[0] + '/lpqld_fast_dev.pth', 'w').write(sys.argv[1] + '\n')" "$(CURDIR)"
	printf '#!/bin/sh\nexec "%s" -m lpqld_fast.cli "$$@"\n' "$(CURDIR)/$(PY)" > .venv/bin/lpqld && chmod +x .venv/bin/lpqld

# Compile-only check of the CUDA sources (no GPU needed; skipped without nvcc).
cuda-check: venv
	scripts/cuda_compile_check.sh

test: venv data build cuda-check
	TRITON_INTERPRET=1 $(PY) -m pytest -q --timeout=600 -m "not slow" $(PYTEST_ARGS)

# Everything, including the slow torchrun kill/resume and the 21K-class scale tests.
test-all: venv data build cuda-check
	TRITON_INTERPRET=1 $(PY) -m pytest -q --timeout=1200 $(PYTEST_ARGS)

demo: venv data build
	$(PY) -m lpqld_fast.cli distill --preset fashion-mnist --seed $(SEED) --out $(OUT)

bench: venv build
	$(PY) -m bench.run --out bench/results

bench-quick: venv build
	$(PY) -m bench.run --quick --out bench/results

sanitize: venv
	LPQLD_SANITIZE=1 WITH_CUDA=0 scripts/build_ext.sh
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" ASAN_OPTIONS=detect_leaks=0 \
	  $(PY) -m pytest -q tests -k "moments or kl or bn_loss or augment" -p no:cacheprovider
	scripts/build_ext.sh

clean:
	rm -rf build lpqld_fast/_C*.so
