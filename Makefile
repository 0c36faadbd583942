# Deep Pneumonia: set-up, run and test in one place.
#
#   make run    set everything up, then start the DICOM node on the embedded default
#   make test   set everything up, then run the whole test suite
#
# Both create .venv if it is absent and install the Debian tools the tests talk to.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
VIEWER := tests/viewer
VIEWER_STAMP := $(VIEWER)/node_modules/.installed
# Debian packages the tests talk to: dcmtk (storescu, storescp, echoscu, dsrdump),
# dicom3tools (dciodvfy, dcentvfy), orthanc (a real PACS) with its DICOMweb plugin, and
# chromium with nodejs (OHIF, a real web viewer, in a real browser); npm where no npm is
# on the PATH already (a Node.js from elsewhere brings its own).
DEBS   := dcmtk dicom3tools orthanc orthanc-dicomweb chromium nodejs $(if $(shell command -v npm),,npm)
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
RUN_DIR ?= runs/demo

DEMO_BUNDLE := $(RUN_DIR)/bundle/configs/metadata.json

.PHONY: run demo-bundle test venv system-deps viewer-deps benchmark-synth benchmark-node benchmark-netfuzz benchmark-soak benchmark-memory gallery clean

# The main job: the DICOM node on the embedded default, the demonstration bundle (trained
# on synthetic phantoms the first time, about two minutes on two cores). Results of the
# images sent to it appear under runs/node/results/<StudyInstanceUID>/. Ctrl-C stops it.
# system-deps: the README's walkthrough sends with dcmtk's storescu and reads with dsrdump.
run: venv system-deps demo-bundle
	$(VENV)/bin/dp-node --config configs/node.yaml --bundle $(RUN_DIR)/bundle

demo-bundle: venv $(DEMO_BUNDLE)

# Deterministic: rebuilding rewrites the same files.
$(DEMO_BUNDLE): configs/synth_demo.yaml configs/demo.yaml
	rm -rf $(RUN_DIR)/data $(RUN_DIR)/bundle
	$(VENV)/bin/dp-synth --config configs/synth_demo.yaml --out $(RUN_DIR)/data --gallery $(RUN_DIR)/gallery.png
	$(VENV)/bin/dp-train --config configs/demo.yaml --data $(RUN_DIR)/data --out $(RUN_DIR)/bundle

test: venv system-deps viewer-deps
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[test]'
	touch $(STAMP)

# OHIF's prebuilt viewer and puppeteer-core, exactly as tests/viewer/package-lock.json pins
# them, for tests/test_viewer_ohif.py; no browser download (the test drives Debian's chromium).
viewer-deps: $(VIEWER_STAMP)

$(VIEWER_STAMP): $(VIEWER)/package.json $(VIEWER)/package-lock.json | system-deps
	cd $(VIEWER) && PUPPETEER_SKIP_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	touch $@

system-deps:
	@missing=""; for p in $(DEBS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Generation speed of the synthetic phantoms; figures go to docs/benchmarks.md.
benchmark-synth: venv
	$(PY) benchmarks/synth_speed.py

# Latency, throughput and memory of the node against dcmtk's storescp; figures go to docs/benchmarks.md.
benchmark-node: venv system-deps demo-bundle
	$(PY) benchmarks/node_latency.py --bundle $(RUN_DIR)/bundle

# 20,000 mutated PDU streams against the node, legitimate stores between them.
benchmark-netfuzz: venv demo-bundle
	$(PY) benchmarks/node_netfuzz.py --bundle $(RUN_DIR)/bundle --json docs/results/node_netfuzz.json

# 10,000 images, three kill -9, a destination outage and a full disk (a tmpfs: run as root).
benchmark-soak: venv demo-bundle
	$(PY) benchmarks/node_soak.py --bundle $(RUN_DIR)/bundle --json docs/results/node_soak.json

# Data sets of 200 MB arriving at once (the node's memory must not grow with them), one
# 8192 x 8192 image per decode path (the decode budget's edge) and a batch of them: peak memory.
benchmark-memory: venv system-deps demo-bundle
	$(PY) benchmarks/node_memory.py --bundle $(RUN_DIR)/bundle --senders 4 --json docs/results/node_memory.json

# The committed pictures: gallery, real versus synthetic, augmentations (docs/*.png).
gallery: venv demo-bundle
	$(PY) -m dp_model.synth.gallery --out docs/synthetic_gallery.png --compare docs/synthetic_vs_real.png --augment docs/augmentations.png
	$(PY) -m pacs_node.gallery --bundle $(RUN_DIR)/bundle --out docs/node_overlay.png

clean:
	rm -rf $(VENV) runs .pytest_cache $(VIEWER)/node_modules
