# The two commands: `make demo` and `make test`. Both create .venv on first use (a stamp
# file records the installed requirements, so later runs skip the install) and build the
# extension in release mode.

SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
# Tests must not reach for a model hub; real models come from installed packages.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-long build rust-test lint python-test wheel-test bench valgrind clean

$(STAMP): requirements/dev.txt pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -r requirements/dev.txt
	touch $@

# pip, run by maturin, says "Ignoring X: markers '... extra == ...' don't match" once per
# optional dependency (uvloop's marker names the platform first); those lines are dropped
# (errors still show and still fail).
build: $(STAMP)
	set -o pipefail; maturin develop --release --quiet 2>&1 | { grep -v "^Ignoring .*: markers '.*extra ==" || true; }

demo: build
	mkdir -p build
	hiddenpool compare
	hiddenpool encode --input python/hiddenpool/data/demo_texts.txt --output build/demo-embeddings.npz --strategy mean@last cls@last mean@last4:sum --normalize
	$(PYTHON) -c "import numpy as np; data = np.load('build/demo-embeddings.npz'); [print(key, data[key].shape, data[key][0, :4].round(4)) for key in data]"
	# The fast CPU path: export to ONNX with int8 weights, then run without torch.
	rm -rf build/demo-onnx-int8
	hiddenpool export --output build/demo-onnx-int8 --quantize int8
	hiddenpool compare --model build/demo-onnx-int8 --strategies mean@last cls@last mean@last4:sum mean@first_last:mean

# The declared minimum Rust (Cargo.toml's rust-version) is checked with that toolchain
# where rustup has it installed (`rustup toolchain install 1.86.0`); skipped elsewhere.
MSRV := $(shell sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)

rust-test: $(STAMP)
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	cargo clippy --all-targets -- -D warnings
	cargo test --release --lib
	@toolchain=$$(rustup toolchain list 2>/dev/null | grep -o "^$(MSRV)\(\.[0-9]*\)\?-[^ ]*" | head -1); \
	if [ -n "$$toolchain" ]; then \
		echo "cargo +$$toolchain check (the declared rust-version $(MSRV))"; \
		cargo +$$toolchain check --quiet --lib --features python --target-dir target/msrv; \
	else echo "rust $(MSRV) not installed: rust-version not checked"; fi

lint: build
	ruff check python tests benches scripts
	ruff format --check python tests benches scripts
	mypy
	python -m mypy.stubtest hiddenpool._native
	# The layers and the torch-free paths (pyproject.toml's [tool.importlinter]).
	lint-imports

# The tests, then every docstring example in the package (`--doctest-modules`).
python-test: build
	pytest -q -m "not long"
	pytest -q --doctest-modules python/hiddenpool

# The load-driven Ray Serve runs (pyproject.toml's `long` marker): about 90 s more.
test-long: build
	pytest -q -m long

# The wheel as users get it: built, installed into a fresh environment with only its
# declared dependencies, imported and called there.
wheel-test: $(STAMP)
	rm -rf dist build/wheel-venv
	maturin build --release --quiet --out dist
	python3 -m venv build/wheel-venv
	build/wheel-venv/bin/python -m pip install --quiet dist/hiddenpool-*.whl
	cd /tmp && $(abspath build/wheel-venv)/bin/python $(abspath scripts/wheel_smoke.py)
	# Then the `onnx` extra (versions as pinned for development) and an exported folder,
	# encoded there without torch or transformers installed.
	$(PYTHON) scripts/onnx_export_reference.py build/onnx-smoke
	build/wheel-venv/bin/python -m pip install --quiet "$$(ls dist/hiddenpool-*.whl)[onnx]" -c requirements/dev.txt
	cd /tmp && $(abspath build/wheel-venv)/bin/python $(abspath scripts/onnx_smoke.py) $(abspath build/onnx-smoke)
	# And the server on the same folder with the `serve` extra added, still without torch.
	build/wheel-venv/bin/python -m pip install --quiet "$$(ls dist/hiddenpool-*.whl)[onnx,serve]" -c requirements/dev.txt
	cd /tmp && $(abspath build/wheel-venv)/bin/python $(abspath scripts/serve_smoke.py) $(abspath build/onnx-smoke)
	# The `openvino` extra alone, in a second fresh environment: no torch, no onnxruntime.
	rm -rf build/openvino-venv
	python3 -m venv build/openvino-venv
	build/openvino-venv/bin/python -m pip install --quiet "$$(ls dist/hiddenpool-*.whl)[openvino]" -c requirements/dev.txt
	cd /tmp && $(abspath build/openvino-venv)/bin/python $(abspath scripts/openvino_smoke.py) $(abspath build/onnx-smoke)

test: rust-test lint python-test wheel-test

# The Rust timing bench fails when max costs more than 1.5x mean (a ratio, not a time).
bench: build
	cargo bench --bench kernel_timing
	$(PYTHON) benches/run.py

# Memory checking (not part of `make test`: minutes, and valgrind must be installed):
# the Rust unit and property tests, then the Python smoke run with the system allocator.
valgrind: build
	mkdir -p build
	cargo test --release --lib --no-run 2>&1 | tee build/cargo-test-build.log
	valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
		$$(grep -o 'target/release/deps/hiddenpool-[0-9a-f]*' build/cargo-test-build.log | head -1) --test-threads=1
	PYTHONMALLOC=malloc valgrind --leak-check=no --num-callers=30 \
		--log-file=build/valgrind-python.log $(PYTHON) scripts/valgrind_smoke.py
	$(PYTHON) scripts/valgrind_report.py build/valgrind-python.log

clean:
	rm -rf $(VENV) target dist build
