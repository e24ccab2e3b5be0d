# make demo  - set everything up, migrate a sample VMware disk, boot it, show what the guest said
# make test  - set everything up, run the whole test suite
# make test-fast - the fast tier, -m "not slow": no guest boot, no PVE simulator, no v2p process (the
#                  command's checks run cli.main in-process); tiers come from fixtures (tests/conftest.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SAMPLES := sample_images/out
DEMO_DIR := $(CURDIR)/.demo
DEMO_VMID := 100
# pytest-xdist workers. The whole suite mostly waits (guests under TCG, boot checks, timeouts): twice
# CI's 2 cores keeps both busy. The fast tier is CPU-bound: one worker per core.
TEST_JOBS ?= 4
FAST_JOBS ?= auto

.PHONY: setup system venv samples demo test test-fast lint bench clean

setup: system venv

system:
	@bash scripts/setup-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

samples: setup
	$(BIN)/python sample_images/build.py $(SAMPLES)

demo: samples
	@rm -rf $(DEMO_DIR)
	$(BIN)/v2p --target-dir $(DEMO_DIR) inspect $(SAMPLES)/esxi/esxi.vmdk
	$(BIN)/v2p --target-dir $(DEMO_DIR) migrate $(SAMPLES)/esxi/esxi.vmdk --vmid $(DEMO_VMID) --os win7
	$(BIN)/v2p --target-dir $(DEMO_DIR) vm show $(DEMO_VMID)
	@echo "--- what the migrated guest reported on its serial port ---"
	@grep -a 'v2p-guest' $(DEMO_DIR)/run/$(DEMO_VMID)/serial.log | tr -d '\r'

test: samples lint
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist worksteal --durations=15 tests

test-fast: samples
	$(BIN)/python -m pytest -q -n $(FAST_JOBS) --dist worksteal -m 'not slow' --durations=10 tests

lint: setup
	$(BIN)/ruff check v2p tests bench sample_images
	$(BIN)/mypy v2p

bench: samples
	$(BIN)/python bench/convert_bench.py
	$(BIN)/python bench/storage_bench.py
	@# The boot bench builds a real Linux guest: syslinux + mtools make its disk (Debian's kernel and
	@# busybox-static are fetched by apt-get download, not installed).
	@dpkg -s syslinux syslinux-common mtools >/dev/null 2>&1 || apt-get install -y -q syslinux syslinux-common mtools
	$(BIN)/python bench/boot_bench.py

clean:
	rm -rf $(SAMPLES) $(DEMO_DIR) .pytest_cache
