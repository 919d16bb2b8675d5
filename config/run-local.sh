#!/usr/bin/env bash
# `make run`: a local CNCF distribution registry and the gateway in front of it, until Ctrl-C.
# Ports: LOCAL_GATEWAY_PORT (5000), LOCAL_REGISTRY_PORT (5001), LOCAL_ADMIN_PORT (9090), all on 127.0.0.1.
# State: the gateway keeps its store where every foreign-layer-proxy command looks by default
# ($XDG_STATE_HOME/foreign-layer-proxy, XDG_STATE_HOME defaulting to ~/.local/state), so that
# `foreign-layer-proxy learn` in another terminal teaches this gateway; the registry's storage and
# its log go to local-registry/ in that folder.
set -euo pipefail
cd "$(dirname "$0")/.."

registry_port=${LOCAL_REGISTRY_PORT:-5001}
gateway_port=${LOCAL_GATEWAY_PORT:-5000}
admin_port=${LOCAL_ADMIN_PORT:-9090}
state="${XDG_STATE_HOME:-$HOME/.local/state}/foreign-layer-proxy"
registry_dir="$state/local-registry"
mkdir -p "$registry_dir/storage"

# REGISTRY_* variables would override this config (docker-registry reads them as its own).
cat > "$registry_dir/config.yml" <<YAML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $registry_dir/storage}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$registry_port}
# Accept manifests whose foreign layers are fetched from their urls (Windows base layers).
validation: {manifests: {urls: {allow: ['^https?://']}}}
YAML

# Its own lines (a `blob unknown` error for every normal 404 HEAD) go to a file, not among the gateway's.
docker-registry serve "$registry_dir/config.yml" >>"$registry_dir/registry.log" 2>&1 &
registry_pid=$!
trap 'kill "$registry_pid" 2>/dev/null || true' EXIT

cat <<TEXT
gateway   http://127.0.0.1:$gateway_port   push and pull here
registry  http://127.0.0.1:$registry_port   docker-registry; its log: $registry_dir/registry.log
admin     http://127.0.0.1:$admin_port   /metrics /healthz /readyz
store     sqlite://$state/foreign-layers.db   (what foreign-layer-proxy learn, digests and forget use by default)
command   .venv/bin/foreign-layer-proxy, or \`source .venv/bin/activate\` to put foreign-layer-proxy on PATH
Ctrl-C stops both. The gateway's log follows.
TEXT
.venv/bin/foreign-layer-proxy serve \
    --upstream "http://127.0.0.1:$registry_port" \
    --listen "127.0.0.1:$gateway_port" \
    --admin-listen "127.0.0.1:$admin_port" \
    --log-format text "$@"
