"""What an operator runs it by: metrics, health and readiness, logs, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import os
import platform
import re
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families
from support.fixtures import GatewayFactory
from support.gateway import GatewayProcess
from support.images import Image, build_image
from support.processes import free_port
from support.protocol import (
    Answer,
    absolute,
    call,
    digest_of,
    patch_held_open,
    push_single_put,
    teach,
    upstream_has,
    with_digest,
)
from support.registry import Registry, RegistryConfig, RegistryFactory, make_htpasswd
from yarl import URL


async def scrape(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by name and sorted labels."""
    answer = await call(http, "GET", f"{gateway.admin_url}/metrics")
    assert answer.status == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


async def test_metrics_move_with_a_push(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(40, foreign=1, os="windows")
    before = await scrape(http, gateway)
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0]
    assert (await push_single_put(http, gateway.url, "win/app", foreign.data)).status == 201
    after = await scrape(http, gateway)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    prefix = "foreign_layer_proxy"
    assert moved(f"{prefix}_decisions_total", action="dropped", rule="default") == 1
    assert moved(f"{prefix}_kept_out_bytes_total") == foreign.size
    assert moved(f"{prefix}_learned_digests_total", source="manifest-put") == 1
    assert moved(f"{prefix}_requests_total", method="PUT", route="manifest_put", status="201") == 1
    assert moved(f"{prefix}_requests_total", method="PUT", route="blob_upload", status="201") == len(image.blobs)
    assert moved(f"{prefix}_streamed_bytes_total", direction="up") >= sum(len(blob) for blob in image.blobs.values())
    assert after[(f"{prefix}_known_foreign_digests", ())] == 1
    assert not any("win/" in str(labels) for _, labels in after)


async def test_readiness_reports_the_upstream_and_fails_on_it_only_when_required(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    reporting = gateway_factory(registry)
    requiring = gateway_factory(registry, config={"admin": {"ready_requires_upstream": True}})
    for gateway in (reporting, requiring):
        up = await call(http, "GET", f"{gateway.admin_url}/readyz")
        assert (up.status, up.json()["checks"]["upstream"]) == (200, "ok")
    await asyncio.to_thread(registry.stop)
    for gateway, status in ((reporting, 200), (requiring, 503)):
        down = await call(http, "GET", f"{gateway.admin_url}/readyz")
        assert down.status == status
        assert down.json()["checks"]["upstream"] != "ok"
        assert (await call(http, "GET", f"{gateway.admin_url}/healthz")).status == 200
    # A ready gateway tells clients what is wrong, instead of their connections being refused.
    answer = await call(http, "GET", f"{reporting.url}/v2/")
    assert (answer.status, answer.error_codes) == (502, ["UNAVAILABLE"])
    await asyncio.to_thread(registry.start)
    assert (await call(http, "GET", f"{requiring.admin_url}/readyz")).status == 200


async def test_readiness_is_503_while_draining(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()
    upload = await patch_held_open(http, gateway.url, "drain/test", release)
    await gateway.wait_for("request")  # the POST's line: the PATCH is under way after it
    await asyncio.sleep(0.2)
    assert (await call(http, "GET", f"{gateway.admin_url}/readyz")).status == 200
    os.kill(gateway.process.pid, signal.SIGTERM)
    await gateway.wait_for("stopping")
    draining = await call(http, "GET", f"{gateway.admin_url}/readyz")
    release.set()
    assert (draining.status, draining.json()["checks"]["shutdown"]) == (503, "draining")
    assert (await upload).status == 202, "the upload in flight still finishes"
    assert await asyncio.to_thread(gateway.process.wait, 30) == 0


async def test_logs_never_carry_credentials_even_at_debug(
    registry_factory: RegistryFactory, gateway_factory: GatewayFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    registry = registry_factory(RegistryConfig(htpasswd=make_htpasswd(tmp_path / "htpasswd", "bob", "hunter2")))
    gateway = gateway_factory(registry, args=["--log-level", "debug"])
    authorization = aiohttp.encode_basic_auth("bob", "hunter2")
    started = await call(
        http, "POST", f"{gateway.url}/v2/secret/repo/blobs/uploads/", headers={"Authorization": authorization}
    )
    assert started.status == 202
    state = started.headers["Location"].split("_state=")[1]
    requests = await gateway.wait_for("request")
    assert requests[-1]["path"] == "/v2/secret/repo/blobs/uploads/"
    log = gateway.process.log_text()
    for secret in (authorization, authorization.split()[1], "hunter2", state):
        assert secret not in log


async def test_sighup_changes_the_rule_for_the_next_request(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    image: Image = build_image(41, foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"policy": {"default": "drop"}})
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0].data
    assert (await push_single_put(http, gateway.url, "win/a", foreign)).status == 201

    gateway.config_path.write_text(json.dumps({"policy": {"default": "reject"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reloaded")
    assert (await push_single_put(http, gateway.url, "win/b", foreign)).status == 403

    gateway.config_path.write_text(json.dumps({"policy": {"default": "sometimes"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reload_refused")
    assert "policy.default" in gateway.events("reload_refused")[0]["error"]
    assert (await push_single_put(http, gateway.url, "win/c", foreign)).status == 403


# Metrics: names, build and process information, reloads, body bytes only ---------------------------------


async def test_metrics_carry_build_process_and_reload_information(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    gateway = gateway_factory(registry, config={"policy": {"default": "drop"}})
    prefix = "foreign_layer_proxy"
    started = await scrape(http, gateway)
    build = [labels for (name, labels) in started if name == f"{prefix}_build_info"]
    assert [dict(labels)["version"] for labels in build] == [importlib.metadata.version("foreign-layer-proxy")]
    assert started[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in started
    assert started[(f"{prefix}_config_last_reload_success", ())] == 1
    loaded_at = started[(f"{prefix}_config_last_reload_success_timestamp_seconds", ())]
    assert abs(loaded_at - time.time()) < 60

    gateway.config_path.write_text(json.dumps({"policy": {"default": "sometimes"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reload_refused")
    refused = await scrape(http, gateway)
    assert refused[(f"{prefix}_config_last_reload_success", ())] == 0
    assert refused[(f"{prefix}_config_last_reload_success_timestamp_seconds", ())] == loaded_at

    gateway.config_path.write_text(json.dumps({"policy": {"default": "reject"}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reloaded")
    reloaded = await scrape(http, gateway)
    assert reloaded[(f"{prefix}_config_last_reload_success", ())] == 1
    assert reloaded[(f"{prefix}_config_last_reload_success_timestamp_seconds", ())] > loaded_at


def test_metric_names_put_the_unit_last_but_for_total() -> None:
    """Prometheus naming: `_bytes_total`, `_seconds`, never `_bytes_something_total`."""
    from proxy.metrics import Metrics

    names = {metric.name for metric in Metrics().registry.collect() if metric.name.startswith("foreign_layer_proxy")}
    for name in names:  # counters' family names come without `_total`
        words = name.split("_")
        for unit in ("bytes", "seconds"):
            assert unit not in words or words[-1] == unit, name
    assert {"foreign_layer_proxy_kept_out_bytes", "foreign_layer_proxy_streamed_bytes"} <= names


async def test_bytes_down_count_bodies_only(
    gateway: GatewayProcess, registry: Registry, http: aiohttp.ClientSession
) -> None:
    blob = os.urandom(100_000)
    assert (await push_single_put(http, registry.url, "bytes/count", blob)).status == 201
    key = ("foreign_layer_proxy_streamed_bytes_total", (("direction", "down"),))
    before = (await scrape(http, gateway)).get(key, 0.0)
    fetched = await call(http, "GET", f"{gateway.url}/v2/bytes/count/blobs/{digest_of(blob)}")
    headed = await call(http, "HEAD", f"{gateway.url}/v2/bytes/count/blobs/{digest_of(blob)}")
    missing = await call(http, "GET", f"{gateway.url}/v2/bytes/count/blobs/sha256:{'0' * 64}")
    await gateway.wait_for("request", count=3)
    after = (await scrape(http, gateway))[key]

    assert (fetched.status, headed.status, missing.status) == (200, 200, 404)
    assert after - before == len(blob) + len(missing.body)
    logged = {(line["method"], line["status"]): line["bytes_out"] for line in gateway.events("request")}
    assert logged[("GET", 200)] == len(blob) and logged[("HEAD", 200)] == 0


# Logs ------------------------------------------------------------------------------------------------------

RFC3339_UTC_MILLISECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def test_log_times_are_rfc3339_utc_with_milliseconds(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    json_gateway = gateway_factory(registry)
    text_gateway = gateway_factory(registry, args=["--log-format", "text"])
    before = time.time()
    for gateway in (json_gateway, text_gateway):
        assert (await call(http, "GET", f"{gateway.url}/v2/")).status == 200
    [line] = await json_gateway.wait_for("request")
    assert RFC3339_UTC_MILLISECONDS.fullmatch(line["time"]), line
    logged = datetime.datetime.strptime(line["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
    assert before - 1 <= logged.timestamp() <= time.time() + 1
    await asyncio.sleep(0.2)
    text_lines = text_gateway.process.log_text().splitlines()
    assert text_lines and all(RFC3339_UTC_MILLISECONDS.match(line) for line in text_lines), text_lines


async def test_the_access_log_can_be_turned_off_without_losing_decisions(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(42, foreign=1, os="windows")
    gateway = gateway_factory(registry, config={"log": {"access": False}})
    await teach(http, gateway.url, "win/base", image)
    assert (await push_single_put(http, gateway.url, "win/app", image.foreign_layers[0].data)).status == 201

    await gateway.wait_for("decision")
    assert gateway.events("request") == []
    assert gateway.events("learned")


async def test_a_request_aiohttp_cannot_parse_is_a_warning_a_request_line_and_a_400_in_the_metrics(
    gateway: GatewayProcess, http: aiohttp.ClientSession
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    writer.write(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: Basic c2VjcmV0\r\nBad Header\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()

    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")), answer
    assert b"\r\nserver:" not in answer.lower().split(b"\r\n\r\n")[0] + b"\r\n"
    [line] = await gateway.wait_for("request")
    assert (line["status"], line["level"]) == (400, "info")
    warnings = [entry for entry in gateway.log_events() if entry["logger"].startswith("aiohttp")]
    assert [entry["level"] for entry in warnings] == ["warning"], warnings
    assert "c2VjcmV0" not in gateway.process.log_text()
    samples = await scrape(http, gateway)
    assert samples[("foreign_layer_proxy_requests_total", (("method", "OTHER"), ("route", "other"), ("status", "400")))] == 1


# Looks: no Server header of our own, drops answered as commits, 502 bodies --------------------------------


class ServerHeaderUpstream(BaseHTTPRequestHandler):
    """An upstream that names itself (distribution sends no Server header): Python's `BaseHTTP/...`."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def naming_upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), ServerHeaderUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_no_answer_carries_a_server_header_of_the_gateways_own(
    gateway: GatewayProcess, gateway_factory: GatewayFactory, naming_upstream: str, http: aiohttp.ClientSession
) -> None:
    answers = {
        "passed through": await call(http, "GET", f"{gateway.url}/v2/"),
        "gateway error": await call(http, "GET", f"{gateway.url}/v2/x/blobs/uploads/", data=b"",
                                    headers={"Content-Type": "application/x-www-form-urlencoded"}),
        "admin": await call(http, "GET", f"{gateway.admin_url}/metrics"),
    }  # fmt: skip
    for what, answer in answers.items():
        assert "Server" not in answer.headers, (what, answer.headers)
    named = gateway_factory(naming_upstream)
    answer = await call(http, "GET", f"{named.url}/v2/")
    assert answer.headers.getall("Server") == [f"BaseHTTP/0.6 Python/{platform.python_version()}"]


async def test_a_drop_answers_with_the_headers_of_the_registrys_commit(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession
) -> None:
    image = build_image(43, foreign=1, os="windows")
    gateway = gateway_factory(registry, args=["--action", "drop"])
    await teach(http, gateway.url, "win/base", image)
    foreign = image.foreign_layers[0].data
    forwarded_by_a_balancer = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "registry.example:8443"}
    for headers in ({}, forwarded_by_a_balancer, {"Forwarded": 'for="192.0.2.1";proto=https;host="r.example"'}):
        ordinary = os.urandom(2048)
        committed = await push_single_put_with(http, gateway.url, "win/app", ordinary, headers)
        dropped = await push_single_put_with(http, gateway.url, "win/app", foreign, headers)
        assert (committed.status, dropped.status) == (201, 201)
        assert sorted(dropped.headers) == sorted(committed.headers)
        assert dropped.headers["Docker-Distribution-Api-Version"] == committed.headers["Docker-Distribution-Api-Version"]
        assert dropped.headers["Content-Length"] == committed.headers["Content-Length"] == "0"
        origin = committed.headers["Location"].removesuffix(f"/v2/win/app/blobs/{digest_of(ordinary)}")
        assert origin != committed.headers["Location"] and origin.startswith("http")
        assert dropped.headers["Location"] == f"{origin}/v2/win/app/blobs/{digest_of(foreign)}"
        assert dropped.headers["Docker-Content-Digest"] == digest_of(foreign)
        if not headers:
            assert origin == gateway.url
    assert not await upstream_has(http, registry, "win/app", digest_of(foreign))


async def push_single_put_with(
    http: aiohttp.ClientSession, base: str, repository: str, data: bytes, headers: dict[str, str]
) -> Answer:
    started = await call(http, "POST", f"{base}/v2/{repository}/blobs/uploads/", headers=headers)
    assert started.status == 202, started
    location = with_digest(absolute(base, started.headers["Location"]), digest_of(data))
    return await call(http, "PUT", URL(base).join(URL(location.raw_path_qs, encoded=True)), data=data,
                      headers={"Content-Type": "application/octet-stream", **headers})  # fmt: skip


async def test_an_unreachable_upstream_is_a_502_that_names_no_internal_address(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    hidden = f"127.0.0.1:{free_port()}"
    gateway = gateway_factory(f"http://{hidden}")

    answer = await call(http, "GET", f"{gateway.url}/v2/")

    assert (answer.status, answer.error_codes) == (502, ["UNAVAILABLE"])
    assert answer.json()["errors"][0]["message"] == "upstream registry is unreachable: connection refused"
    assert str(hidden.rpartition(":")[2]).encode() not in answer.body
    [logged] = await gateway.wait_for("gateway_error")
    assert hidden.rpartition(":")[2] in logged["cause"]


async def test_sighup_reloads_the_certificate_for_new_connections_and_says_what_needs_a_restart(
    gateway_factory: GatewayFactory, registry: Registry, tmp_path: Path
) -> None:
    authority = trustme.CA()
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def install(common_name: str) -> str:
        issued = authority.issue_cert("127.0.0.1", common_name=common_name)
        issued.cert_chain_pems[0].write_to_path(str(cert))
        issued.private_key_pem.write_to_path(str(key))
        return ssl.DER_cert_to_PEM_cert(ssl.PEM_cert_to_DER_cert(issued.cert_chain_pems[0].bytes().decode()))

    first = install("first")
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    gateway = gateway_factory(registry, config={"server": tls}, tls=True)

    def served() -> str:
        return ssl.get_server_certificate(("127.0.0.1", gateway.port), timeout=10)

    assert await asyncio.to_thread(served) == first
    second = install("second")
    gateway.config_path.write_text(json.dumps({"server": tls, "upstream": {"read_timeout": 60}}))
    os.kill(gateway.process.pid, signal.SIGHUP)
    await gateway.wait_for("reloaded")
    assert await asyncio.to_thread(served) == second
    [partial] = gateway.events("reload_partial")
    assert partial["restart_needed"] == ["upstream.read_timeout"]

    key.write_text("not a key\n")
    os.kill(gateway.process.pid, signal.SIGHUP)
    [refused] = await gateway.wait_for("reload_refused")
    assert "server.tls_key" in refused["error"] and "\n" not in refused["error"]
    assert await asyncio.to_thread(served) == second, "a bad key changes nothing"
