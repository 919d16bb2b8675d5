#!/usr/bin/env bash
# Runs a local CNCF distribution registry on 127.0.0.1:${LOCAL_REGISTRY_PORT:-5001} and the gateway in front
# of it on 127.0.0.1:${LOCAL_GATEWAY_PORT:-5000}, until Ctrl-C. Used by `make run`.
set -euo pipefail
cd "$(dirname "$0")/.."

registry_port=${LOCAL_REGISTRY_PORT:-5001}
gateway_port=${LOCAL_GATEWAY_PORT:-5000}
state=$(realpath -m "${STATE_DIR:-.local-run}")
mkdir -p "$state/registry"

cat > "$state/registry.yml" <<YAML
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage:
  filesystem: {rootdirectory: $state/registry}
  delete: {enabled: true}
http: {addr: 127.0.0.1:$registry_port}
# Accept manifests whose foreign layers are fetched from their urls (Windows base layers).
validation: {manifests: {urls: {allow: ['^https?://']}}}
YAML

docker-registry serve "$state/registry.yml" &
registry_pid=$!
trap 'kill "$registry_pid" 2>/dev/null || true' EXIT

echo "registry: http://127.0.0.1:$registry_port   gateway: http://127.0.0.1:$gateway_port   (Ctrl-C stops both)"
.venv/bin/python -m proxy serve \
    --upstream "http://127.0.0.1:$registry_port" \
    --listen "127.0.0.1:$gateway_port" \
    --store "sqlite:///$state/foreign-layers.db" \
    --log-format text "$@"
