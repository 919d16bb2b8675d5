"""The command line as users run it: `python -m proxy ...` and the `foreign-layer-proxy` script, in subprocesses."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from support.fixtures import GatewayFactory
from support.images import (
    Image,
    Layer,
    build_image,
    build_index,
    write_dir,
    write_oci_layout,
)
from support.processes import describe, free_port, run
from support.protocol import (
    push_chunked,
    push_image_blobs,
    push_single_put,
    put_manifest,
    teach,
)
from support.registry import Registry

SUBCOMMANDS = ("serve", "learn", "digests", "forget")
CONSOLE_SCRIPT = Path(sys.executable).with_name("foreign-layer-proxy")


def cli(
    *args: str | Path, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "proxy", *args], timeout=timeout, env=env)


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, describe(result)
    return result


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'foreign-layers.db'}"


@pytest.fixture
def windows_image() -> Image:
    return build_image(60, foreign=2, os="windows")


def expected_rows(status: str, layers: Sequence[Layer]) -> list[tuple[str, str, str, int]]:
    return sorted((status, layer.digest, layer.media_type, layer.size) for layer in layers)


def learned_rows(result: subprocess.CompletedProcess[str], source: str) -> list[tuple[str, str, str, int]]:
    """`learn`'s text output: one `STATUS DIGEST MEDIA-TYPE SIZE SOURCE` line per layer."""
    rows = []
    for line in succeeded(result).stdout.splitlines():
        status, digest, media_type, size, shown_source = line.split(maxsplit=4)
        assert shown_source == source, line
        rows.append((status, digest, media_type, int(size)))
    return sorted(rows)


def json_lines(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in succeeded(result).stdout.splitlines()]


def stored(store: str) -> dict[str, dict[str, Any]]:
    """What `digests --json` shows, by digest."""
    return {record["layer"]["digest"]: record for record in json_lines(cli("digests", "--store", store, "--json"))}


# learn


def dir_source(tmp_path: Path) -> tuple[str, tuple[Layer, ...]]:
    image = build_image(61, foreign=2, os="windows")
    return f"dir:{write_dir(image, tmp_path / 'image')}", image.foreign_layers


def oci_index_source(tmp_path: Path) -> tuple[str, tuple[Layer, ...]]:
    """An OCI layout whose index points at two Windows-like platforms, with different foreign layers."""
    amd64 = build_image(62, flavour="oci", foreign=1, os="windows")
    arm64 = build_image(63, flavour="oci", foreign=2, os="windows", architecture="arm64")
    layout = write_oci_layout(build_index([amd64, arm64], flavour="oci"), tmp_path / "layout")
    return f"oci:{layout}", amd64.foreign_layers + arm64.foreign_layers


def manifest_file_source(tmp_path: Path) -> tuple[str, tuple[Layer, ...]]:
    image = build_image(64, foreign=2, os="windows")
    path = tmp_path / "manifest.json"
    path.write_bytes(image.manifest)
    return str(path), image.foreign_layers


SOURCES: dict[str, Callable[[Path], tuple[str, tuple[Layer, ...]]]] = {
    "skopeo-dir": dir_source,
    "oci-layout-index-of-two-platforms": oci_index_source,
    "manifest-file": manifest_file_source,
}


@pytest.mark.parametrize("kind", SOURCES)
def test_learn_lists_each_foreign_layer_and_a_second_run_finds_them_known(
    store: str, tmp_path: Path, kind: str
) -> None:
    source, layers = SOURCES[kind](tmp_path)

    first = learned_rows(cli("learn", "--store", store, source), source)
    second = learned_rows(cli("learn", "--store", store, source), source)
    as_json = json_lines(cli("learn", "--store", store, "--json", source))

    assert first == expected_rows("new", layers)
    assert second == expected_rows("known", layers)
    assert sorted((line["status"], line["digest"], line["media_type"], line["size"]) for line in as_json) == (
        expected_rows("known", layers)
    )
    assert {line["source"] for line in as_json} == {source}
    assert sorted(stored(store)) == sorted(layer.digest for layer in layers)


async def test_learn_from_a_registry(
    registry: Registry, http: aiohttp.ClientSession, windows_image: Image, store: str
) -> None:
    foreign = {layer.digest for layer in windows_image.foreign_layers}
    await push_image_blobs(
        http, registry.url, "win/base", [data for digest, data in windows_image.blobs.items() if digest not in foreign]
    )
    manifest, media_type = windows_image.manifest, windows_image.media_type
    answer = await put_manifest(http, registry.url, "win/base", "ltsc", manifest, media_type)
    assert answer.status == 201, answer
    source = f"docker://{registry.host_port}/win/base:ltsc"

    first = await asyncio.to_thread(cli, "learn", "--store", store, source)
    second = await asyncio.to_thread(cli, "learn", "--store", store, source)

    assert learned_rows(first, source) == expected_rows("new", windows_image.foreign_layers)
    assert learned_rows(second, source) == expected_rows("known", windows_image.foreign_layers)
    records = await asyncio.to_thread(stored, store)
    assert sorted(records) == sorted(foreign)
    for record in records.values():
        assert record["first_sighting"] == {
            "source": "learn", "repository": "win/base", "manifest_digest": windows_image.manifest_digest
        }  # fmt: skip


# digests and forget


async def test_digests_show_what_was_learned_and_where(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, store: str, tmp_path: Path
) -> None:
    by_cli = build_image(65, foreign=1, os="windows")
    by_gateway = build_image(66, foreign=1, os="windows")
    source = f"dir:{write_dir(by_cli, tmp_path / 'image')}"
    await asyncio.to_thread(lambda: succeeded(cli("learn", "--store", store, source)))
    gateway = gateway_factory(registry, store=store)
    await teach(http, gateway.url, "win/pushed", by_gateway)
    await asyncio.to_thread(gateway.stop)  # it saves what it learns in the background, and all of it when stopped

    table = (await asyncio.to_thread(cli, "digests", "--store", store)).stdout.splitlines()
    records = await asyncio.to_thread(stored, store)

    header, *rows = table
    assert header.split()[:3] == ["DIGEST", "SIZE", "BLOCKED"]
    expected = {
        by_cli.foreign_layers[0]: ("learn", None),
        by_gateway.foreign_layers[0]: ("manifest-put", "win/pushed"),
    }
    assert len(rows) == len(expected), table
    for layer, (how, repository) in expected.items():
        [row] = [row for row in rows if row.startswith(layer.digest)]
        assert row.split()[:3] == [layer.digest, str(layer.size), "0"], row
        assert layer.media_type in row and (repository or how) in row, row
        record = records[layer.digest]
        assert (record["layer"]["media_type"], record["layer"]["size"]) == (layer.media_type, layer.size)
        assert (record["first_sighting"]["source"], record["first_sighting"]["repository"]) == (how, repository)


async def test_digests_stats_show_what_the_gateway_kept_out_of_each_repository(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, store: str
) -> None:
    image = build_image(68, foreign=2, os="windows")
    first, second = image.foreign_layers
    gateway = gateway_factory(registry, store=store, args=["--action", "drop"])
    await teach(http, gateway.url, "win/base", image)
    for push, repository, layer in [
        (push_single_put, "win/app", first),
        (push_single_put, "win/app", second),
        (push_chunked, "win/other", first),
    ]:
        answer = await push(http, gateway.url, repository, layer.data)
        assert answer.status == 201, answer
    expected = [
        {"repository": "win/app", "outcomes": {"dropped": 2}, "bytes_kept_out": first.size + second.size},
        {"repository": "win/other", "outcomes": {"dropped": 1}, "bytes_kept_out": first.size},
    ]

    for _ in range(50):  # the gateway writes counts to the store in the background, every half second
        shown = await asyncio.to_thread(lambda: json_lines(cli("digests", "--stats", "--json", "--store", store)))
        if shown == expected:
            break
        await asyncio.sleep(0.1)
    table = succeeded(await asyncio.to_thread(cli, "digests", "--stats", "--store", store)).stdout.splitlines()

    assert shown == expected
    header, *rows = table
    assert header.split() == ["REPOSITORY", "DROPPED", "REJECTED", "LEAKED", "AUDITED", "BYTES", "KEPT", "OUT"]
    assert [row.split()[:5] for row in rows] == [
        ["win/app", "2", "0", "0", "0"],
        ["win/other", "1", "0", "0", "0"],
        ["TOTAL", "3", "0", "0", "0"],
    ], table
    for row, kept_out in zip(rows, [first.size + second.size, first.size, 2 * first.size + second.size], strict=True):
        assert row.split()[5:] == [f"{kept_out / 1024:.1f}", "KiB", f"({kept_out})"], row


def test_forget_removes_a_digest_and_tells_about_unknown_and_malformed_ones(store: str, tmp_path: Path) -> None:
    image = build_image(67, foreign=2, os="windows")
    succeeded(cli("learn", "--store", store, f"dir:{write_dir(image, tmp_path / 'image')}"))
    kept, forgotten = image.foreign_layers

    removed = cli("forget", "--store", store, forgotten.digest)
    again = cli("forget", "--store", store, forgotten.digest)
    malformed = cli("forget", "--store", store, "sha256:not-hex")

    assert succeeded(removed).stdout.split() == ["forgotten", forgotten.digest]
    assert (again.returncode, again.stdout.split()) == (1, ["unknown", forgotten.digest]), describe(again)
    assert malformed.returncode == 2, describe(malformed)
    assert len(malformed.stderr.splitlines()) == 1 and "sha256:not-hex" in malformed.stderr, describe(malformed)
    assert "Traceback" not in malformed.stderr
    assert list(stored(store)) == [kept.digest]


# serve: configuration errors


@pytest.fixture
def port_in_use() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port: int = sock.getsockname()[1]
        yield port


ServeCase = Callable[[Path, int], tuple[list[str], dict[str, str], list[str]]]
"""(tmp_path, a port in use) -> (extra serve arguments, environment, what the one error line must name)."""


def unknown_key_in_file(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    config = tmp_path / "gateway.yaml"
    config.write_text("policy:\n  default: drop\n  nope: 1\n")
    return ["--upstream", "http://127.0.0.1:5001", "--config", str(config)], {}, ["policy.nope", str(config)]


def bad_upstream_url(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    return ["--upstream", "ftp://registry.example:21"], {}, ["upstream.url", "ftp://registry.example:21"]


def unreadable_tls_cert(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    key = tmp_path / "key.pem"
    key.write_text("not checked before the certificate\n")
    cert = tmp_path / "missing-cert.pem"
    return (
        ["--upstream", "http://127.0.0.1:5001", "--tls-cert", str(cert), "--tls-key", str(key)],
        {},
        ["tls_cert", str(cert)],
    )


def listen_port_in_use(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    return ["--upstream", "http://127.0.0.1:5001", "--listen", f"127.0.0.1:{busy}"], {}, ["listen", str(busy)]


def missing_upstream(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    return [], {}, ["upstream"]


def unknown_environment_variable(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    return (
        ["--upstream", "http://127.0.0.1:5001"],
        {"FOREIGN_LAYER_PROXY_POLICY_NOPE": "1"},
        ["FOREIGN_LAYER_PROXY_POLICY_NOPE"],
    )


def certificate_files(tmp_path: Path) -> tuple[Path, Path]:
    issued = trustme.CA().issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    return cert, key


def tls_key_not_pem(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    cert, key = certificate_files(tmp_path)
    key.write_text("not a key\n")
    return ["--upstream", "http://127.0.0.1:5001", "--tls-cert", str(cert), "--tls-key", str(key)], {}, [
        "server.tls_key", str(key), "not a PEM private key"
    ]


def tls_cert_not_pem(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    cert, key = certificate_files(tmp_path)
    cert.write_bytes(b"\x30\x82 DER bytes, not PEM")
    return ["--upstream", "http://127.0.0.1:5001", "--tls-cert", str(cert), "--tls-key", str(key)], {}, [
        "server.tls_cert", str(cert), "not a PEM certificate"
    ]


def tls_key_of_another_certificate(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    cert, _ = certificate_files(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = certificate_files(tmp_path / "other")
    return ["--upstream", "http://127.0.0.1:5001", "--tls-cert", str(cert), "--tls-key", str(other_key)], {}, [
        "server.tls_key", str(other_key), str(cert)
    ]


SERVE_ERRORS: dict[str, ServeCase] = {
    "unknown-key-in-config-file": unknown_key_in_file,
    "bad-upstream-url": bad_upstream_url,
    "unreadable-tls-cert": unreadable_tls_cert,
    "tls-key-not-pem": tls_key_not_pem,
    "tls-cert-not-pem": tls_cert_not_pem,
    "tls-key-of-another-certificate": tls_key_of_another_certificate,
    "listen-port-in-use": listen_port_in_use,
    "missing-upstream": missing_upstream,
    "unknown-environment-variable": unknown_environment_variable,
}
# Failures of the machine rather than of the command line or configuration.
RUNTIME_FAILURES = frozenset({"listen-port-in-use"})


@pytest.mark.parametrize("case", SERVE_ERRORS)
def test_serve_with_a_bad_configuration_exits_with_one_line_naming_it(
    store: str, tmp_path: Path, port_in_use: int, case: str
) -> None:
    """Exit status 2 for a configuration error, 1 for a runtime failure; never a traceback."""
    args, env, named = SERVE_ERRORS[case](tmp_path, port_in_use)
    listen = [] if "--listen" in args else ["--listen", f"127.0.0.1:{free_port()}"]
    # A gateway that starts despite the error would run until this timeout, which then fails the test.
    result = cli(
        "serve", "--store", store, *listen, "--admin-listen", f"127.0.0.1:{free_port()}", *args, env=env, timeout=30
    )

    assert result.returncode == (1 if case in RUNTIME_FAILURES else 2), describe(result)
    assert "Traceback" not in result.stderr, describe(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, describe(result)
    assert all(name in lines[0] for name in named), describe(result)


@pytest.mark.parametrize(("flags", "action"), [([], "reject"), (["--action", "drop"], "drop")])
async def test_environment_sets_the_policy_and_flags_win_over_it(
    gateway_factory: GatewayFactory,
    registry: Registry,
    http: aiohttp.ClientSession,
    windows_image: Image,
    flags: list[str],
    action: str,
) -> None:
    gateway = gateway_factory(registry, args=flags, env={"FOREIGN_LAYER_PROXY_POLICY_DEFAULT": "reject"})
    await teach(http, gateway.url, "win/base", windows_image)

    answer = await push_single_put(http, gateway.url, "win/app", windows_image.foreign_layers[0].data)

    assert answer.status == {"reject": 403, "drop": 201}[action], answer
    assert [(entry["action"], entry["rule"]) for entry in gateway.events("decision")] == [(action, "default")]


# entry points


@pytest.mark.parametrize(
    "command", [[sys.executable, "-m", "proxy"], [str(CONSOLE_SCRIPT)]], ids=["python-m-proxy", "console-script"]
)
def test_help_and_a_command_through_each_entry_point(command: list[str], store: str) -> None:
    shown = run([*command, "--help"], timeout=60)
    listed = run([*command, "digests", "--store", store], timeout=60)

    assert shown.returncode == 0, describe(shown)
    assert shown.stdout.startswith("usage: foreign-layer-proxy"), shown.stdout
    assert all(subcommand in shown.stdout for subcommand in SUBCOMMANDS), shown.stdout
    assert listed.returncode == 0, describe(listed)
    assert listed.stdout.split()[:3] == ["DIGEST", "SIZE", "BLOCKED"], listed.stdout
