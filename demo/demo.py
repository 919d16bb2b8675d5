"""`make demo`: a registry, the gateway in front of it, and a Windows-like image pushed twice.

Everything runs on 127.0.0.1 with free ports and temporary folders; both servers are stopped at the
end, also on Ctrl-C. Each claim printed is checked: the demo exits 1 if one does not hold.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's image builders, registry and protocol helpers

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.protocol import call, push_single_put, put_manifest
from support.registry import Registry, RegistryConfig

CAREFUL_REPOSITORY = "windows/base"
CARELESS_REPOSITORY = "team/app"
SHOWN_METRICS = (
    "foreign_layer_proxy_learned_digests_total",
    "foreign_layer_proxy_decisions_total",
    "foreign_layer_proxy_kept_out_bytes_total",
    "foreign_layer_proxy_known_foreign_digests",
)
Samples = dict[str, float]


class StoryBroken(Exception):
    """Something the demo claims did not happen."""


def expect(condition: bool, claim: str) -> None:
    if not condition:
        raise StoryBroken(claim)


def short(digest: str) -> str:
    return digest[: len("sha256:") + 12]


def windows_image() -> Image:
    """Two foreign base layers with urls, as in every Windows image, then an ordinary one."""
    return build_image(7, foreign=2, os="windows")


def stored_blobs(registry: Registry) -> set[str]:
    """Digests of the blobs in the registry's storage folder: what it would serve to anyone."""
    return {f"sha256:{data.parent.name}" for data in registry.root.glob("docker/registry/v2/blobs/sha256/*/*/data")}


def labels(values: dict[str, str]) -> str:
    return "{" + ",".join(f'{key}="{value}"' for key, value in sorted(values.items())) + "}" if values else ""


async def scrape(http: aiohttp.ClientSession, gateway: GatewayProcess) -> Samples:
    answer = await call(http, "GET", f"{gateway.admin_url}/metrics")
    expect(answer.status == 200, f"/metrics answers 200, not {answer.status}")
    return {
        sample.name + labels(sample.labels): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
        if sample.name in SHOWN_METRICS
    }


def decisions(gateway: GatewayProcess, action: str) -> set[str]:
    return {event["digest"] for event in gateway.events("decision") if event.get("action") == action}


async def careful_push(http: aiohttp.ClientSession, gateway: GatewayProcess, image: Image) -> None:
    print(f"\n1. A careful client (like skopeo) pushes it to {CAREFUL_REPOSITORY} through the gateway.")
    print("   It skips the foreign layers, as their media type tells it to, and uploads the rest.")
    foreign = {layer.digest for layer in image.foreign_layers}
    for digest, data in image.blobs.items():
        if digest not in foreign:
            answer = await push_single_put(http, gateway.url, CAREFUL_REPOSITORY, data)
            expect(answer.status == 201, f"{short(digest)} is stored (201), not {answer.status}")
    answer = await put_manifest(http, gateway.url, CAREFUL_REPOSITORY, "1.0", image.manifest, image.media_type)
    expect(answer.status == 201, f"the manifest is accepted (201), not {answer.status}: {answer.body!r}")
    learned = {event["digest"] for event in gateway.events("learned")}
    expect(learned == foreign, f"the gateway learned {len(foreign)} foreign digests from the manifest")
    print("   manifest -> 201 Created: the registry takes it without the foreign blobs (it allows their urls).")
    print(f"   The gateway read the manifest on its way and learned its {len(learned)} foreign digests.")


async def careless_push(http: aiohttp.ClientSession, gateway: GatewayProcess, image: Image) -> None:
    print(f"\n2. A careless client (like docker 28+, or a script) pushes the same image to {CARELESS_REPOSITORY}")
    print("   and uploads every blob, foreign layers included (POST, then PUT with the body).")
    print(f"   The gateway knows those digests now, and its policy for {CARELESS_REPOSITORY} is drop (the default).")
    for layer in image.layers:
        answer = await push_single_put(http, gateway.url, CARELESS_REPOSITORY, layer.data)
        expect(answer.status == 201, f"the client sees 201 for {short(layer.digest)}, not {answer.status}")
        if layer.foreign:
            expect(layer.digest in decisions(gateway, "drop"), f"the gateway logged dropping {short(layer.digest)}")
            print(f"   foreign layer  {short(layer.digest)} -> 201 Created, but dropped: the registry never saw it")
        else:
            print(f"   layer          {short(layer.digest)} -> 201 Created, passed through to the registry")
    answer = await push_single_put(http, gateway.url, CARELESS_REPOSITORY, image.config)
    expect(answer.status == 201, f"the config is stored (201), not {answer.status}")
    print(f"   config         {short(image.config_digest)} -> 201 Created, passed through")
    answer = await put_manifest(http, gateway.url, CARELESS_REPOSITORY, "1.0", image.manifest, image.media_type)
    expect(answer.status == 201, f"the manifest is accepted (201), not {answer.status}: {answer.body!r}")
    print("   manifest -> 201 Created: the push succeeded, as far as the client can tell.")


def show_storage(registry: Registry, image: Image) -> None:
    stored = stored_blobs(registry)
    foreign = [layer.digest for layer in image.foreign_layers]
    names = {image.manifest_digest: "manifest", image.config_digest: "config"}
    names |= {layer.digest: "foreign layer" if layer.foreign else "layer" for layer in image.layers}
    print(f"\n3. The registry's storage folder holds {len(stored)} blobs:")
    for digest in sorted(stored):
        print(f"   {short(digest)}  {names.get(digest, 'unknown')}")
    expect(not stored & set(foreign), "no foreign blob is in the registry's storage")
    print(f"   and none of the {len(foreign)} foreign blobs ({', '.join(short(digest) for digest in foreign)}).")


def show_metrics(before: Samples, after: Samples, gateway: GatewayProcess, image: Image) -> None:
    print(f"\n4. The gateway's metrics that moved ({gateway.admin_url}/metrics):")
    for name in sorted(after):
        if after[name] != before.get(name, 0.0):
            print(f"   {name:<75} {before.get(name, 0.0):g} -> {after[name]:g}")
    kept_out = sum(layer.size for layer in image.foreign_layers)
    moved = after["foreign_layer_proxy_kept_out_bytes_total"] - before["foreign_layer_proxy_kept_out_bytes_total"]
    expect(moved == kept_out, f"{kept_out} bytes were kept out of the registry, not {moved}")


def run_cli(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30, check=False
    )
    expect(result.returncode == 0, f"foreign-layer-proxy {' '.join(args)} succeeds: {result.stderr}")
    return result.stdout


def show_digests(gateway: GatewayProcess, image: Image) -> None:
    # The gateway saves what it learned and counted in the background, within store.sync_interval.
    expected = {f'"digest": "{layer.digest}"' for layer in image.foreign_layers}
    deadline = time.monotonic() + 10
    while not all(digest in run_cli("digests", "--json", "--store", gateway.store) for digest in expected):
        expect(time.monotonic() < deadline, "the store lists the learned digests within 10 s")
        time.sleep(0.2)
    print("\n5. The store of known foreign layers, as `foreign-layer-proxy digests` shows it:")
    for line in run_cli("digests", "--store", gateway.store).splitlines():
        print(f"   {line}")


async def story(registry: Registry, gateway: GatewayProcess) -> None:
    image = windows_image()
    print(f"registry  {registry.url}  (docker-registry; accepts manifests whose foreign layers have urls)")
    print(f"gateway   {gateway.url}  (admin: {gateway.admin_url}; store: {gateway.store})")
    print(f"\nThe image: Windows-like, a config and {len(image.layers)} layers.")
    for layer in image.layers:
        kind = "foreign layer " if layer.foreign else "layer         "
        source = f", pullers fetch it from {layer.urls[0].rsplit('/', 1)[0]}/..." if layer.urls else ""
        print(f"   {kind} {short(layer.digest)}  {layer.size:>6} bytes{source}")
    async with aiohttp.ClientSession(auto_decompress=False) as http:
        before = await scrape(http, gateway)
        await careful_push(http, gateway, image)
        await careless_push(http, gateway, image)
        show_storage(registry, image)
        show_metrics(before, await scrape(http, gateway), gateway, image)
    show_digests(gateway, image)


def stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print("foreign-layer-proxy demo: keeping Windows base layers out of a registry\n")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="foreign-layer-proxy-demo-")))
        try:
            registry = Registry(workdir / "registry", RegistryConfig(allow_foreign_urls=True))
            stack.callback(registry.stop)
            registry.start()
            (workdir / "gateway").mkdir()
            gateway = GatewayProcess(workdir / "gateway", registry.url, args=["--log-format", "json"])
            stack.callback(gateway.stop)
            gateway.start()
            asyncio.run(story(registry, gateway))
        except StoryBroken as broken:
            print(f"\ndemo failed: expected that {broken}\n\ngateway log:\n{gateway.process.log_text()}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\ninterrupted: stopping the gateway and the registry", file=sys.stderr)
            return 130
    print("\nThe gateway and the registry are stopped, and their temporary folders removed.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
