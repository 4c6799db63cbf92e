# xraybatch: two commands on a fresh machine.
#   make demo   create .venv, install xraybatch, run `xraybatch run-folder` on sample radiographs, print the summary
#   make test   create .venv if needed and run the test suite
VENV    ?= .venv
PYTHON  ?= python3.11
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
DEMO_IN := demo-input
DEMO_WD := xraybatch-data

.PHONY: demo test install clean-demo

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
