# Two dependency worlds (see README): .venv = latest transformers 5 / sentence-transformers 6,
# .venv-optimum = transformers 4.57 / sentence-transformers 5.7 / optimum-onnx.
PYTHON ?= python3
VENV := .venv
VENV_OPT := .venv-optimum
PIP_FLAGS := -q --disable-pip-version-check
PYTEST_FLAGS ?= -q

.PHONY: demo test test-latest test-optimum bench clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements/latest.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install $(PIP_FLAGS) -r requirements/latest.txt
	$(VENV)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

$(VENV_OPT)/.installed: setup.cfg pyproject.toml requirements/optimum.txt
	$(PYTHON) -m venv $(VENV_OPT)
	$(VENV_OPT)/bin/pip install $(PIP_FLAGS) -r requirements/optimum.txt
	$(VENV_OPT)/bin/pip install $(PIP_FLAGS) --no-deps -e .
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/nomic-moe demo $(SRC)

test: test-latest test-optimum

test-latest: $(VENV)/.installed
	cd tests && ../$(VENV)/bin/python -m pytest $(PYTEST_FLAGS)

test-optimum: $(VENV_OPT)/.installed
	cd tests && ../$(VENV_OPT)/bin/python -m pytest $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) $(VENV_OPT) .demo build *.egg-info
