#!/usr/bin/env bash
# Builds the Go peers pinned in go-tools.txt into a cache outside the checkout:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/foreign-layer-proxy/go-tools/<key>/bin
# (<key> is a hash of go-tools.txt, so a version change builds a new folder). Prints that folder.
# Without Go 1.22+ it prints one line saying so and exits 0: the tests that need the peers skip.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
versions="$here/go-tools.txt"

# GO names the toolchain to use; else `go` on PATH, else where the official archive puts it.
go_binary="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
minor=""
if [ -x "$go_binary" ]; then
    minor="$(GOTOOLCHAIN=local "$go_binary" env GOVERSION 2>/dev/null | sed -n 's/^go1\.\([0-9]*\).*/\1/p')"
fi
if [ -z "$minor" ] || [ "$minor" -lt 22 ]; then
    echo "go-tools: skipped, no Go 1.22+ found (the conformance and Go client tests will skip)"
    exit 0
fi

cache="${XDG_CACHE_HOME:-$HOME/.cache}/foreign-layer-proxy/go-tools"
key="$(grep -v '^#' "$versions" | sha256sum | cut -c1-12)"
bin="$cache/$key/bin"
if [ -f "$bin/.complete" ]; then
    echo "go-tools: up to date in $bin"
    exit 0
fi

export GOTOOLCHAIN=local GOFLAGS=-modcacherw CGO_ENABLED=0
export GOPATH="$cache/gopath" GOMODCACHE="$cache/gomodcache" GOCACHE="$cache/gocache"
export GOBIN="$bin"
mkdir -p "$bin"
start=$SECONDS
while read -r name how package version; do
    case "$name" in ''|'#'*) continue ;; esac
    echo "go-tools: $name $package@$version"
    case "$how" in
    install)
        "$go_binary" install -trimpath "$package@$version"
        ;;
    test)
        # A throwaway module outside the checkout that requires the test package.
        module="$cache/$key/src/$name"
        rm -rf "$module" && mkdir -p "$module"
        (
            cd "$module"
            "$go_binary" mod init go-tools.invalid/"${name%%.*}" >/dev/null 2>&1
            "$go_binary" get -t "$package@$version" >get.log 2>&1 || { cat get.log >&2; exit 1; }
            "$go_binary" test -c -trimpath -o "$bin/$name" "$package"
        )
        ;;
    *)
        echo "go-tools: unknown way '$how' for $name in $versions" >&2
        exit 1
        ;;
    esac
done < "$versions"
grep -v '^#' "$versions" > "$bin/.complete"
echo "go-tools: built in $((SECONDS - start)) s into $bin"
