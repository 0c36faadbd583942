# Deep Pneumonia: set-up, run and test in one place.
#
#   make run    set up what the node needs, then start the DICOM node on the embedded default
#   make test   set up everything the tests talk to, then run the whole test suite
#
# Both create .venv if it is absent. `make run` installs only the Python stack and dcmtk;
# `make test` adds the tools, the PACS and the web viewer the tests check the results in.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VIEWER := tests/viewer
VIEWER_STAMP := $(VIEWER)/node_modules/.installed
# Debian packages. Running the node: dcmtk only, for the README's walkthrough beside the
# running node (storescu sends, dsrdump and dsr2html read the SR, dcml2pnm draws the overlay).
# The tests also talk to dicom3tools (dciodvfy, dcentvfy), orthanc (a real PACS) with its
# DICOMweb plugin, and chromium with nodejs (OHIF, a real web viewer, in a real browser);
# npm where no npm is on the PATH already (a Node.js from elsewhere brings its own).
# libpixelmed-java: PixelMed's DicomSRValidator checks the SR's content against the PS3.16
# templates (tests/validators.py); default-jdk-headless runs it, through the JDK's source
# launcher (a JRE alone has no compiler), over every SR in one JVM.
# prometheus: promtool tests the shipped alert rules on recorded series, and a real Prometheus
# scrapes a node whose population drifted (deploy/prometheus, tests/test_node_drift.py).
RUN_DEBS := dcmtk
DEBS     := $(RUN_DEBS) dicom3tools orthanc orthanc-dicomweb chromium nodejs $(if $(shell command -v npm),,npm) \
            libpixelmed-java default-jdk-headless prometheus postgresql haproxy
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUN_DIR ?= runs/demo
# PyTorch from another index, before the rest: on a machine without an NVIDIA GPU,
# `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu` installs the CPU-only wheels
# (2.14.1+cpu satisfies the ==2.14.1 pin; the Dockerfile does the same) instead of the
# 4 GB of CUDA libraries that PyPI's torch brings. Empty: PyPI's.
TORCH_INDEX ?=
TORCH_PINS  := $(shell grep -E '^torch(vision)?==' requirements/constraints.txt)

# The demonstration bundle's stamp is named by the content of its two configs: it is
# trained again when they change, not when a checkout or a copy merely touches them.
DEMO_CONFIGS := configs/synth_demo.yaml configs/demo.yaml
DEMO_BUNDLE  := $(RUN_DIR)/bundle/.built-$(shell cat $(DEMO_CONFIGS) | sha256sum | cut -c1-12)

.PHONY: run demo-bundle test test-fast venv run-deps system-deps viewer-deps benchmark-synth benchmark-node benchmark-burst benchmark-scale benchmark-netfuzz benchmark-soak benchmark-memory benchmark-profile gallery clean

# The main job: the DICOM node on the embedded default, the demonstration bundle (trained
# on synthetic phantoms the first time only; `make run` again starts the node at once).
# Results of the images sent to it appear under runs/node/results/<StudyInstanceUID>/.
# Ctrl-C stops it.
# NODE_ARGS: more options, e.g. `make run NODE_ARGS="--port 11113 --metrics-port 8090"`.
run: venv run-deps demo-bundle
	$(VENV)/bin/dp-node --config configs/node.yaml --bundle $(RUN_DIR)/bundle $(NODE_ARGS)

demo-bundle: $(DEMO_BUNDLE)

# Deterministic: rebuilding rewrites the same files. Built once per content of its configs
# (the venv is order-only: reinstalling packages does not retrain); the stamp is written
# last, so an interrupted training is started again, never served.
$(DEMO_BUNDLE): | $(STAMP)
	@echo "==> building the demonstration model (once): synthetic images into $(RUN_DIR)/data, then training into $(RUN_DIR)/bundle"
	rm -rf $(RUN_DIR)/data $(RUN_DIR)/bundle
	$(VENV)/bin/dp-synth --config configs/synth_demo.yaml --out $(RUN_DIR)/data --gallery $(RUN_DIR)/gallery.png
	$(VENV)/bin/dp-train --config configs/demo.yaml --data $(RUN_DIR)/data --out $(RUN_DIR)/bundle
	touch $@

# Three pytest-xdist workers on two cores, one test file each at a time (a file's module
# fixtures are built once): many tests wait on peers, browsers and timeouts, and two workers
# left a third of the cores idle (128 % CPU of 200); the demo bundle is trained once into .pytest_cache for every worker and every run of
# the same code (tests/conftest.py). Files are handed out longest first, in the conftest's
# order (xdist would otherwise reorder them by their number of tests). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3
test: venv system-deps viewer-deps
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The inner loop: the tests that need neither the trained demo bundle, nor the command-line
# tools, nor a slow run (no system packages, no viewer); `make test` before a commit.
test-fast: venv
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not slow and not tools and not bundle" $(PYTEST_ARGS)

venv: $(STAMP)

# pydicom-data (the [test] extra) is also the walkthrough's: it holds RG1, the real
# radiograph the README sends to the running node; pytest comes with it (a few MB).
$(STAMP): pyproject.toml requirements/constraints.txt
	@echo "==> Python stack into $(VENV) (PyTorch, MONAI, pydicom, pynetdicom ...; several GB with CUDA, minutes the first time)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH_INDEX),$(PIP) install --index-url $(TORCH_INDEX) $(TORCH_PINS))
	$(PIP) install -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

# OHIF's prebuilt viewer and puppeteer-core, exactly as tests/viewer/package-lock.json pins
# them, for tests/test_viewer_ohif.py; no browser download (the test drives Debian's chromium).
viewer-deps: $(VIEWER_STAMP)

$(VIEWER_STAMP): $(VIEWER)/package.json $(VIEWER)/package-lock.json | system-deps
	@echo "==> OHIF viewer and puppeteer-core into $(VIEWER)/node_modules (npm ci)"
	cd $(VIEWER) && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

# The Debian packages `make run` needs, and those `make test` needs (sudo when not root).
run-deps:
	@$(call apt_install,$(RUN_DEBS))

system-deps:
	@$(call apt_install,$(DEBS))

# Installs the packages of $(1) that are not installed yet, saying what it does at each step.
define apt_install
missing=""; for p in $(1); do \
  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
done; \
if [ -n "$$missing" ]; then \
  echo "==> Debian packages to install:$$missing"; \
  echo "==> apt-get update"; \
  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
  echo "==> apt-get install$$missing" && \
  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
fi
endef

# Generation speed of the synthetic phantoms; figures go to docs/benchmarks.md.
benchmark-synth: venv
	$(PY) benchmarks/synth_speed.py

# Latency, throughput and memory of the node against dcmtk's storescp; figures go to docs/benchmarks.md.
benchmark-node: venv run-deps demo-bundle
	$(PY) benchmarks/node_latency.py --bundle $(RUN_DIR)/bundle

# The outbox after 2,000 images sent as fast as 4 storescu go (14 GB of copies on disk meanwhile).
benchmark-burst: venv run-deps demo-bundle
	$(PY) benchmarks/node_burst.py --bundle $(RUN_DIR)/bundle --json docs/results/node_burst_one_association.json
	$(PY) benchmarks/node_burst.py --bundle $(RUN_DIR)/bundle --associations 2 --json docs/results/node_burst.json

# 20,000 mutated PDU streams against the node, legitimate stores between them.
benchmark-netfuzz: venv demo-bundle
	$(PY) benchmarks/node_netfuzz.py --bundle $(RUN_DIR)/bundle --json docs/results/node_netfuzz.json

# Images/s against the number of node processes in the scale-out mode (a throwaway PostgreSQL;
# the single node of the embedded default measured first, in the same run). On a larger
# machine: benchmarks/node_scale.py --workers 1 2 4 8 --images 800.
benchmark-scale: venv system-deps demo-bundle
	$(PY) benchmarks/node_scale.py --bundle $(RUN_DIR)/bundle --workers 1 2 3 --json docs/results/node_scale.json

# 10,000 images, three kill -9, a destination outage and a full disk (a tmpfs: run as root).
benchmark-soak: venv demo-bundle
	$(PY) benchmarks/node_soak.py --bundle $(RUN_DIR)/bundle --json docs/results/node_soak.json

# Data sets of 200 MB arriving at once (the node's memory must not grow with them), one
# 8192 x 8192 image per decode path (the decode budget's edge) and a batch of them: peak memory.
# Where an image's time and the idle node's memory go: a flame graph (docs/node_profile.svg)
# and the memory of each import; py-spy is installed for it alone.
benchmark-profile: venv run-deps demo-bundle
	$(PY) -m pip install -q py-spy==0.4.3
	$(PY) benchmarks/node_profile.py --bundle $(RUN_DIR)/bundle --json docs/results/node_profile.json

benchmark-memory: venv run-deps demo-bundle
	$(PY) benchmarks/node_memory.py --bundle $(RUN_DIR)/bundle --senders 4 --json docs/results/node_memory.json

# The committed pictures: gallery, real versus synthetic, augmentations (docs/*.png).
gallery: venv demo-bundle
	$(PY) -m dp_model.synth.gallery --out docs/synthetic_gallery.png --compare docs/synthetic_vs_real.png --augment docs/augmentations.png
	$(PY) -m pacs_node.results.gallery --bundle $(RUN_DIR)/bundle --out docs/node_overlay.png

clean:
	rm -rf $(VENV) runs .pytest_cache $(VIEWER)/node_modules
