# xraybatch: two commands on a fresh machine.
#   make demo   create .venv, install xraybatch, run `xraybatch run-folder` on sample radiographs, print the summary
#   make test   create .venv if needed and run the test suite
# Deployment (deploy/, docs/scaling.md), none needs a registry:
#   make offline-bundle  dist/xraybatch-VERSION-offline-ARCH.tar: every wheel, torch included, and install.sh
#   make offline-test    install that archive with no network (pip --no-index) and run run-folder with it
#   make image           xraybatch:VERSION with docker or podman, from a debootstrap base (cached)
#   make image-test      run-folder and watch in the image with --network none, outputs and DB checked
#   make stack-test      deploy/compose.yaml up (PostgreSQL, migration, 2 workers, Orthanc), a radiograph
#                        C-STOREd in, its SR awaited in Orthanc, down (builds the image only if absent)
VENV    ?= .venv
PYTHON  ?= python3.11
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DEMO_IN := demo-input
DEMO_WD := xraybatch-data

.PHONY: demo test install clean-demo wheels offline-layout offline-bundle offline-test base-image image \
        image-test image-present stack-images stack-test clean-deploy

install: $(STAMP)

# torch/torchvision are pinned exactly so pip takes the builds that lie on this machine's disk.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[train,test,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) scripts/demo_data.py $(DEMO_IN)
	$(VENV)/bin/xraybatch run-folder $(DEMO_IN) --workdir $(DEMO_WD)
	$(VENV)/bin/xraybatch results export --workdir $(DEMO_WD) --what predictions --format csv --out $(DEMO_WD)/predictions.csv
	@echo "DICOM outputs: $(DEMO_WD)/outbox/  results DB: $(DEMO_WD)/xraybatch.sqlite  CSV: $(DEMO_WD)/predictions.csv"

test: $(STAMP)
	$(PY) -m pytest

clean-demo:
	rm -rf $(DEMO_IN) $(DEMO_WD)

# -- deployment ------------------------------------------------------------------------------------------
VERSION    := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
GIT_REV    := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
ARCH       := $(shell uname -m)
ENGINE     ?= $(shell command -v docker 2>/dev/null || command -v podman 2>/dev/null)
COMPOSE    ?= $(shell command -v docker-compose 2>/dev/null || command -v podman-compose 2>/dev/null || echo "$(ENGINE) compose")
BASE_IMAGE ?= xraybatch-base:bookworm
BASE_CACHE ?= $(HOME)/.cache/xraybatch
IMAGE      ?= xraybatch:$(VERSION)
WHEELS     := build/wheels
OFFLINE    := build/offline
BUNDLE     := dist/xraybatch-$(VERSION)-offline-$(ARCH).tar
export DOCKER_BUILDKIT ?= 0

# Every wheel, built or fetched on this host (torch/torchvision pinned: the builds on this machine's disk).
wheels:
	$(PYTHON) -m pip wheel --quiet --wheel-dir $(WHEELS) . torch==2.14.1 torchvision==0.29.1 "setuptools>=77" wheel

offline-layout: wheels
	bash deploy/offline/make-bundle.sh $(WHEELS) $(OFFLINE) "" $(VERSION)

offline-bundle: wheels
	bash deploy/offline/make-bundle.sh $(WHEELS) $(OFFLINE) $(BUNDLE) $(VERSION)

offline-test: offline-bundle
	bash deploy/offline-test.sh $(BUNDLE) $(PY)

base-image:
	@test -n "$(ENGINE)" || { echo "no container engine (docker or podman)"; exit 2; }
	mkdir -p $(BASE_CACHE)
	bash deploy/base/make-base.sh $(ENGINE) $(BASE_IMAGE) $(BASE_CACHE)

# The build itself needs no network: everything comes from the offline folder.
image: base-image offline-layout
	$(ENGINE) build --network none --build-arg BASE=$(BASE_IMAGE) --build-arg VERSION=$(VERSION) \
	  --build-arg GIT_REV=$(GIT_REV) -f deploy/Dockerfile -t $(IMAGE) $(OFFLINE)
	-$(ENGINE) image prune -f >/dev/null
	@$(ENGINE) image inspect $(IMAGE) --format 'image $(IMAGE): {{.Size}} bytes'

image-test: image
	bash deploy/image-test.sh $(ENGINE) $(IMAGE) $(PY)

# The image as it is (`make image` rebuilds it): built only when absent, so that CI builds it once.
image-present:
	@$(ENGINE) image inspect $(IMAGE) >/dev/null 2>&1 || $(MAKE) image

# PostgreSQL and Orthanc from Debian's packages on the same base (apt reaches Debian through the host network).
stack-images: base-image
	$(ENGINE) build --network host --build-arg BASE=$(BASE_IMAGE) -t xraybatch-postgres:$(VERSION) deploy/postgres
	$(ENGINE) build --network host --build-arg BASE=$(BASE_IMAGE) -t xraybatch-pacs:$(VERSION) deploy/pacs

stack-test: image-present stack-images
	ENGINE=$(ENGINE) XRAYBATCH_VERSION=$(VERSION) bash deploy/stack-test.sh "$(COMPOSE)" $(PY)

clean-deploy:
	rm -rf build/offline build/wheels dist/xraybatch-*-offline-*.tar
