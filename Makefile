PYTHON := .venv/bin/python
SYSTEM_PACKAGES := docker-registry skopeo containerd podman buildah docker.io redis-server haproxy nginx apache2-utils wrk
# The binaries that tell whether SYSTEM_PACKAGES are installed.
SYSTEM_BINARIES := docker-registry skopeo containerd ctr podman buildah dockerd redis-server haproxy nginx htpasswd wrk

.PHONY: run test check lint typecheck system-deps run-deps python-deps go-tools bench demo

run: system-deps run-deps
	config/run-local.sh

test: system-deps python-deps go-tools check
	$(PYTHON) -m pytest -p no:cacheprovider

check: lint typecheck

lint:
	$(PYTHON) -m ruff check .

typecheck:
	$(PYTHON) -m mypy

system-deps:
	@missing=""; for binary in $(SYSTEM_BINARIES); do command -v $$binary >/dev/null || missing=yes; done; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); \
	fi

# What `make run` needs: the command, installed once (test tools are `python-deps`).
run-deps:
	@[ -x .venv/bin/foreign-layer-proxy ] || { [ -x $(PYTHON) ] || python3 -m venv .venv; $(PYTHON) -m pip install -q -e .; }

python-deps:
	@[ -x $(PYTHON) ] || python3 -m venv .venv
	$(PYTHON) -m pip install -q -e '.[test]'

# The Go-built peers (versions in tests/tools/go-tools.txt), into a cache outside the checkout;
# one line and no failure when the machine has no Go 1.22+.
go-tools:
	bash tests/tools/build-go-tools.sh

bench: system-deps python-deps
	$(PYTHON) bench/run.py

demo: system-deps python-deps
	$(PYTHON) demo/demo.py
