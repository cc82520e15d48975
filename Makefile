# The README's two commands. Each creates .venv when missing and installs the project into it.
PY := .venv/bin/python
VITAS := .venv/bin/vitas
DEMO_OUT ?= $(CURDIR)/runs/demo
DEMO_DATA ?= $(CURDIR)/data/digits

.PHONY: demo test install bench clean

.venv/.installed: setup.py
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: .venv/.installed

demo: install
	$(PY) -m vitas.demo --data $(DEMO_DATA) --output $(DEMO_OUT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=15 tests

bench: install
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf runs data .pytest_cache
