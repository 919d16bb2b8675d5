PYTHON ?= .venv/bin/python
REGISTRY_PORT ?= 5001
GATEWAY_PORT ?= 5000

.PHONY: install run test lint typecheck bench demo

.venv/bin/python:
	python3 -m venv .venv

install: .venv/bin/python
	@command -v docker-registry >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-registry)
	$(PYTHON) -m pip install -q -e '.[test]'

run: install
	$(PYTHON) -m proxy.devrun --registry-port $(REGISTRY_PORT) --gateway-port $(GATEWAY_PORT)

lint:
	$(PYTHON) -m ruff check proxy tests bench

typecheck:
	$(PYTHON) -m mypy

test: lint typecheck
	$(PYTHON) -m pytest -q -p no:cacheprovider

bench: install
	$(PYTHON) bench/run.py
