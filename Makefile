# One-word commands for people and CI. `make help` lists them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
export RECSCALE_DATA ?= $(abspath ../shared/data)

.DEFAULT_GOAL := help
.PHONY: help install browser demo test test-fast lint format bench bench-loader bench-index bench-serve bench-scale bench-quality bench-time clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install recscale with its dev tools

demo: $(STAMP) ## run the whole pipeline on a synthetic viewing log (about 2 minutes)
	$(BIN)/recscale demo --out demo-out

browser: ## headless Chromium and its driver, for the web page's tests (Debian packages)
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium chromium-driver; }

test: $(STAMP) browser ## run the whole test suite (slow tests included, as CI does)
	$(BIN)/python -m pytest -m "not gpu" -q

test-fast: $(STAMP) ## run the tests not marked slow
	$(BIN)/python -m pytest -m "not slow and not gpu" -q

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

bench: $(STAMP) ## ingest benchmark: recscale (DuckDB, Spark local[2]) vs pandas on a generated 10M-row CSV
	$(BIN)/python bench/ingest.py --rows 10000000

bench-loader: $(STAMP) ## streaming loader vs plain DataLoader and the raw Parquet read, 10M rows, 0/1/2 workers
	$(BIN)/python bench/loader.py --rows 10000000

bench-index: $(STAMP) ## ANN recall and latency of FAISS and Milvus Lite settings on Gowalla
	$(BIN)/python bench/index.py --users 2000

bench-serve: $(STAMP) ## load test of recscale serve (wrk) at concurrency 1, 16, 64: FAISS and Milvus Lite
	@command -v wrk >/dev/null || { sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get install -y -qq wrk; }
	$(BIN)/python bench/serve.py --requests 20000

bench-scale: $(STAMP) ## ingest, split, one MF-BPR epoch, evaluation at 1M, 10M and 100M interactions (about 25 min)
	$(BIN)/python bench/scale.py --sizes 1000000 10000000 100000000

bench-quality: $(STAMP) ## every model on every shared data set, 3 seeds; rewrites the README's results (hours)
	$(BIN)/python bench/quality.py --readme

bench-time: $(STAMP) ## LightGCN's Recall@20 against training time on Gowalla, 3 seeds (about an hour)
	$(BIN)/python bench/time_to_quality.py

clean: ## remove the virtualenv, caches and demo output
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-out
