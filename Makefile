# One-command entry points. Every target that runs code depends on `setup`, so a fresh
# clone needs nothing but `make demo` or `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup test test-slow lint format demo bench bench-peers export-harmonyos export-android export-ios clean harmonyos-toolchain android-toolchain android-apk-toolchain ios-toolchain

setup: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null 2>&1 || { echo "error: $(PY) not found (Python 3.11 is required)"; exit 2; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,plot,bench,ocr]"
	# timm, the MiniCPM-V 2.0 tower reference of the tests, without its torchvision (no CPU build for
	# torch 2.13; tests/torchvision_standin.py stands in for the names timm reads at import)
	$(BIN)/python -m pip install --quiet --no-deps "timm==1.0.31"
	@touch $(STAMP)

# The Node toolchain of the HarmonyOS app checks (npm ci into ~/.cache/minicpmv-edge, linked from
# apps/harmonyos/tools/node_modules); needs node 20+ and npm.
harmonyos-toolchain: setup
	$(BIN)/python tools/harmonyos_toolchain.py

# The JVM toolchain of the Android app checks (kotlin-compiler + ktlint by npm ci, Debian's junit5
# jars by apt-get download, both unpacked into ~/.cache/minicpmv-edge); needs java 17, node 20+, npm.
android-toolchain: setup
	$(BIN)/python tools/android_toolchain.py

# The offline APK build's tools (bookworm's aapt, zipalign, apksigner, dexdump, proguard-cli,
# apt-get installed when missing; bullseye's android.jar API 23 and dx, unpacked into the cache).
android-apk-toolchain: setup
	$(BIN)/python tools/android_apk_toolchain.py

# The Swift toolchain of the iOS app checks: Swift 6.0.3 from Debian trixie in a debootstrap chroot under
# ~/.cache/minicpmv-edge/swift-trixie (about 1 min and 2.6 GB once); needs root and the Debian mirror.
ios-toolchain: setup
	$(BIN)/python tools/ios_toolchain.py

test: setup harmonyos-toolchain android-toolchain android-apk-toolchain ios-toolchain
	$(BIN)/ruff check edge_runtime export tests tools
	$(BIN)/ruff format --check edge_runtime export tests tools
	# two workers, one test file each (module fixtures are built once): 11.5 min instead of 19.3 here
	$(BIN)/python tools/run_pytest.py -n 2 --dist loadfile

# The quantized ExecuTorch lowerings (~5 min each here) on top of `make test`.
test-slow: setup
	MINICPMV_EDGE_SLOW=1 $(BIN)/python tools/run_pytest.py

lint: setup
	$(BIN)/ruff check edge_runtime export tests tools
	$(BIN)/ruff format --check edge_runtime export tests tools

format: setup
	$(BIN)/ruff format edge_runtime export tests tools
	$(BIN)/ruff check --fix edge_runtime export tests tools

# DEMO_ARGS="--targets all" adds the CoreML and ExecuTorch bundles (their exports take minutes).
demo: setup
	$(BIN)/python tools/demo.py $(DEMO_ARGS)

# Standard benchmark: writes reports/bench-<date>.{md,json,png} (not committed).
bench: setup
	$(BIN)/python tools/bench.py

# Ours against llama.cpp and onnxruntime-genai on the same full-size weights, one interleaved run:
# builds the peers on first use (llama.cpp from the llama-cpp-python sdist, cached outside the repo),
# then writes docs/bench-peers.{md,json,png}. BENCH_PEERS_ARGS="--preset tiny --rounds 1" is a quick look.
bench-peers: setup
	$(BIN)/python tools/bench_peers.py $(BENCH_PEERS_ARGS)

DEMO_CKPT ?= edge_runtime/data/demo-checkpoint
QUANT ?= int4

export-harmonyos: setup
	$(BIN)/minicpmv-edge export --checkpoint $(DEMO_CKPT) --target harmonyos --quant $(QUANT) \
		--out build/bundles/harmonyos-$(QUANT)

export-android: setup
	$(BIN)/minicpmv-edge export --checkpoint $(DEMO_CKPT) --target android --quant $(or $(ANDROID_QUANT),8da4w) \
		--out build/bundles/android-$(or $(ANDROID_QUANT),8da4w)

export-ios: setup
	$(BIN)/minicpmv-edge export --checkpoint $(DEMO_CKPT) --target ios --quant $(QUANT) --out build/bundles/ios-$(QUANT)

clean:
	rm -rf $(VENV) build *.egg-info reports .pytest_cache
