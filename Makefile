# make demo  - set everything up, migrate a sample VMware disk, boot it, show what the guest said
# make test  - set everything up, run the whole test suite
# make install - the man page (v2p.1) and bash completion, generated from v2p's parser, into PREFIX
#                (default: the venv, so nothing outside the checkout; e.g. make install PREFIX=/usr/local)
# make test-fast - the fast tier, -m "not slow": no guest boot, no PVE simulator, no v2p process (the
#                  command's checks run cli.main in-process); tiers come from fixtures (tests/conftest.py)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SAMPLES := sample_images/out
DEMO_DIR := $(CURDIR)/.demo
DEMO_VMID := 100
# pytest-xdist workers. The whole suite mostly waits (guests under TCG, boot checks, timeouts): more
# workers than CI's 2 cores keep both busy (measured on a clean clone: 4 workers 10 min 44 s, about 1.4
# cores busy; 5 workers 9 min 28 s). The fast tier is CPU-bound: one worker per core.
TEST_JOBS ?= 5
FAST_JOBS ?= auto
PREFIX ?= $(CURDIR)/$(VENV)
CLI_DOCS ?= build/cli
CLI_SOURCES := $(wildcard v2p/*.py v2p/targets/*.py)

.PHONY: setup system venv samples demo test test-fast lint bench clean install

setup: system venv install

system:
	@bash scripts/setup-system.sh

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml | system
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

# The man page and completion come from the parser (argparse-manpage, shtab: the cli-docs extra); the
# completion goes where bash-completion looks for it under PREFIX, the page where man does.
$(CLI_DOCS)/v2p.1: $(CLI_SOURCES) | venv
	@mkdir -p $(@D)
	$(BIN)/argparse-manpage --module v2p.cli_args --function build_parser --prog v2p --project-name v2p \
	  --version "$$($(BIN)/python -c 'import v2p; print(v2p.__version__)')" --manual-title "v2p manual" \
	  --description "move VMware virtual machines onto KVM (Proxmox VE, plain QEMU), resumably" --output $@.tmp
	@# left-aligned, as most pages are: a target URL's usage is one long word that justification cannot fit
	sed '/^\.TH /a .ad l' $@.tmp > $@ && rm $@.tmp

$(CLI_DOCS)/v2p.bash: $(CLI_SOURCES) | venv
	@mkdir -p $(@D)
	$(BIN)/shtab --shell=bash --prog v2p v2p.cli_args.build_parser > $@.tmp && mv $@.tmp $@

install: $(CLI_DOCS)/v2p.1 $(CLI_DOCS)/v2p.bash
	install -D -m 644 $(CLI_DOCS)/v2p.1 $(PREFIX)/share/man/man1/v2p.1
	install -D -m 644 $(CLI_DOCS)/v2p.bash $(PREFIX)/share/bash-completion/completions/v2p

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
	rm -rf $(SAMPLES) $(DEMO_DIR) $(CLI_DOCS) .pytest_cache
