"""The command line as users run it: `python -m proxy ...` and the `foreign-layer-proxy` script, in subprocesses."""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import logging
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
import yaml
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
from support.services import RedisFactory

from proxy.cli import build_parser, main, settings_from
from proxy.config import load_settings
from proxy.manifests import ForeignLayer
from proxy.store import Sighting, SqliteStore, open_store
from proxy.store_transfer import FORMAT, VERSION, TransferError, parse_lines

SUBCOMMANDS = ("serve", "learn", "digests", "forget", "config", "store")
HEADER = json.dumps({"format": FORMAT, "version": VERSION})
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


def upstream_ca_not_pem(tmp_path: Path, busy: int) -> tuple[list[str], dict[str, str], list[str]]:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("not a certificate\n")
    return ["--upstream", "https://127.0.0.1:5001", "--upstream-ca", str(bundle)], {}, [str(bundle), "not a PEM CA bundle"]


SERVE_ERRORS: dict[str, ServeCase] = {
    "unknown-key-in-config-file": unknown_key_in_file,
    "bad-upstream-url": bad_upstream_url,
    "unreadable-tls-cert": unreadable_tls_cert,
    "tls-key-not-pem": tls_key_not_pem,
    "tls-cert-not-pem": tls_cert_not_pem,
    "tls-key-of-another-certificate": tls_key_of_another_certificate,
    "upstream-ca-not-pem": upstream_ca_not_pem,
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
    asyncio.run(SqliteStore(Path(store.removeprefix("sqlite://"))).generation())  # an empty store
    shown = run([*command, "--help"], timeout=60)
    listed = run([*command, "digests", "--store", store], timeout=60)

    assert shown.returncode == 0, describe(shown)
    assert shown.stdout.startswith("usage: foreign-layer-proxy"), shown.stdout
    assert all(subcommand in shown.stdout for subcommand in SUBCOMMANDS), shown.stdout
    assert listed.returncode == 0, describe(listed)
    assert listed.stdout.split()[:3] == ["DIGEST", "SIZE", "BLOCKED"], listed.stdout


# --version, help, exit statuses -------------------------------------------------------------------------


InProcess = Callable[..., tuple[int, str, str]]


@pytest.fixture
def in_process(capsys: pytest.CaptureFixture[str]) -> Iterator[InProcess]:
    """`main()` called in this process, for commands whose output is all a test looks at (no interpreter to
    start: a second each on a busy machine). Returns (exit status, stdout, stderr); logging is restored."""
    root, access = logging.getLogger(), logging.getLogger("foreign_layer_proxy.access")
    saved = (root.handlers[:], root.level, access.disabled)

    def run_main(*args: str | Path) -> tuple[int, str, str]:
        try:
            status = main([str(arg) for arg in args])
        except SystemExit as exit:
            status = int(exit.code or 0)
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run_main
    root.handlers[:], access.disabled = saved[0], saved[2]
    root.setLevel(saved[1])


def test_version_names_the_installed_package(in_process: InProcess) -> None:
    status, out, _ = in_process("--version")
    assert (status, out.strip()) == (0, f"foreign-layer-proxy {importlib.metadata.version('foreign-layer-proxy')}")


def every_parser(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from every_parser(child, (*path, name))


def test_every_flag_has_help_and_every_subcommand_an_example() -> None:
    parsers = list(every_parser(build_parser()))
    assert {path for path, _ in parsers} >= {
        ("serve",), ("learn",), ("digests",), ("forget",), ("config", "check"), ("config", "show"),
        ("config", "example"), ("store", "backup"), ("store", "export"), ("store", "import"),
    }  # fmt: skip
    for path, parser in parsers:
        undocumented = [action.dest for action in parser._actions if not action.help]
        assert not undocumented, path
        if path:
            assert parser.epilog and re.search(r"^example:\n  .*foreign-layer-proxy", parser.epilog), path


def test_usage_errors_exit_2_and_runtime_failures_exit_1(tmp_path: Path, in_process: InProcess) -> None:
    unknown_flag = in_process("digests", "--no-such-flag")
    no_action = in_process("config")
    bad_setting = in_process("digests", "--store", "ftp://nowhere")
    missing_store = in_process("digests", "--store", f"sqlite://{tmp_path}/missing.db")
    assert [result[0] for result in (unknown_flag, no_action, bad_setting, missing_store)] == [2, 2, 2, 1]


# Read-only commands never create a store ------------------------------------------------------------------


READ_ONLY_COMMANDS = {
    "digests": ["digests"], "digests-stats": ["digests", "--stats"], "forget": ["forget", f"sha256:{'a' * 64}"],
    "store-export": ["store", "export"], "store-backup": ["store", "backup", "BACKUP"],
}  # fmt: skip


def test_read_only_commands_on_a_mistyped_store_create_nothing(
    tmp_path: Path, in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    mistyped = tmp_path / "sate" / "foreign-layers.db"
    for name, command in READ_ONLY_COMMANDS.items():
        args = [str(tmp_path / "backup.db") if word == "BACKUP" else word for word in command]
        for how in (["--store", f"sqlite://{mistyped}"], []):  # without --store: the default, in an empty folder
            status, _, err = in_process(*args, *how)
            assert status == 1 and len(err.splitlines()) == 1 and "no store at" in err, (name, how, err)
    assert sorted(path.name for path in tmp_path.iterdir()) == []


def test_serve_learn_digests_and_forget_share_one_state_folder_by_default(
    tmp_path: Path, in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    source, layers = dir_source(tmp_path)
    learned = in_process("learn", source)
    listed = in_process("digests")
    shown = yaml.safe_load(in_process("config", "show")[1])
    serve_default = build_parser().parse_args(["serve"])

    assert learned[0] == listed[0] == 0
    assert sorted(line.split()[1] for line in learned[1].splitlines()) == sorted(layer.digest for layer in layers)
    assert all(layer.digest in listed[1] for layer in layers)
    assert shown["store"]["url"] == f"sqlite://{tmp_path}/state/foreign-layer-proxy/foreign-layers.db"
    assert settings_from(serve_default).store.url == shown["store"]["url"]
    assert (tmp_path / "state/foreign-layer-proxy/foreign-layers.db").is_file()
    assert in_process("forget", layers[0].digest)[1].split() == ["forgotten", layers[0].digest]


# config check, show (config example: test_deployment) ------------------------------------------------------


def test_config_show_prints_the_effective_settings_with_secrets_redacted(
    tmp_path: Path, in_process: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "upstream": {"url": "http://registry:5000"},
        "policy": {"rules": [{"repository": "ci/**", "action": "reject"}]},
        "cleanup": {"username": "bob", "password": "hunter2"},
    }))  # fmt: skip
    monkeypatch.setenv("FOREIGN_LAYER_PROXY_POLICY_DEFAULT", "audit")
    monkeypatch.setenv("FOREIGN_LAYER_PROXY_CLEANUP_BEARER_TOKEN", "t0ken")
    status, out, _ = in_process("config", "show", "--config", config, "--store", "redis://:s3cret@redis:6379/0")

    assert status == 0
    shown = yaml.safe_load(out)
    for secret in ("hunter2", "t0ken", "s3cret"):
        assert secret not in out
    assert shown["policy"]["default"] == "audit" and shown["policy"]["rules"] == [{"repository": "ci/**", "action": "reject"}]
    assert (shown["cleanup"]["username"], shown["cleanup"]["password"], shown["cleanup"]["bearer_token"]) == (
        "bob", "REDACTED", "REDACTED"
    )
    assert shown["store"]["url"] == "redis://***@redis:6379/0"
    # What it prints is a config file that gives the same settings back (secrets aside).
    del shown["cleanup"]["password"], shown["cleanup"]["bearer_token"], shown["store"]["url"]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(shown))
    expected = load_settings(config, environ={"FOREIGN_LAYER_PROXY_POLICY_DEFAULT": "audit"})
    assert load_settings(again, environ={}) == replace(expected, cleanup=replace(expected.cleanup, password=None),
                                                       store=load_settings(environ={}).store)  # fmt: skip


async def test_config_check_passes_a_good_config_and_names_each_problem_of_a_bad_one(
    registry: Registry, tmp_path: Path, store: str
) -> None:
    good = await asyncio.to_thread(cli, "config", "check", "--upstream", registry.url, "--store", store)
    assert good.returncode == 0, describe(good)
    assert not good.stderr and "ok: upstream" in good.stdout, describe(good)
    assert not Path(store.removeprefix("sqlite://")).exists(), "checking never creates the store"

    cert, _ = certificate_files(tmp_path)
    (tmp_path / "other").mkdir()
    _, wrong_key = certificate_files(tmp_path / "other")
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"tls_cert": str(cert), "tls_key": str(wrong_key)},
        "upstream": {"url": f"http://127.0.0.1:{free_port()}", "connect_timeout": 2},
        "store": {"url": f"redis://127.0.0.1:{free_port()}/0"},
    }))  # fmt: skip
    bad = await asyncio.to_thread(cli, "config", "check", "--config", config)

    assert bad.returncode == 1, describe(bad)
    problems = bad.stderr.splitlines()
    assert len(problems) == 3, describe(bad)
    assert [next(p for p in problems if name in p) for name in ("server.tls_key", "upstream.url", "store.url")]
    assert "Traceback" not in bad.stderr

    unparsable = tmp_path / "typo.yaml"
    unparsable.write_text("polcy: {}\n")
    typo = await asyncio.to_thread(cli, "config", "check", "--config", unparsable)
    assert (typo.returncode, len(typo.stderr.splitlines())) == (1, 1), describe(typo)
    assert "polcy" in typo.stderr

    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"server": {"listen": "nowhere", "idle_timeout": -1}, "policy": {"default": "maybe"}}))
    bad_values = await asyncio.to_thread(cli, "config", "check", "--config", values, "--upstream", registry.url)
    named = sorted(line.split(": ")[2] for line in bad_values.stderr.splitlines())
    assert (bad_values.returncode, named) == (1, ["policy.default", "server.idle_timeout", "server.listen"]), (
        describe(bad_values)
    )


# store backup, export, import ------------------------------------------------------------------------------


async def test_store_backup_of_a_live_sqlite_store_holds_what_the_write_ahead_log_holds(
    store: str, tmp_path: Path
) -> None:
    live = SqliteStore(Path(store.removeprefix("sqlite://")))
    image = build_image(69, foreign=2, os="windows")
    await live.learn([ForeignLayer(layer.digest, layer.media_type, layer.size, layer.urls) for layer in image.foreign_layers],
                     Sighting("learn"))  # fmt: skip
    copied = tmp_path / "copied.db"
    shutil.copy(live.path, copied)  # what `cp` of a running gateway's file gives: the WAL is missing
    backup = tmp_path / "backup.db"

    result = await asyncio.to_thread(cli, "store", "backup", "--store", store, backup)
    again = await asyncio.to_thread(cli, "store", "backup", "--store", store, backup)
    await live.close()

    assert result.returncode == 0, describe(result)
    assert again.returncode == 2 and "exists" in again.stderr, describe(again)
    assert await SqliteStore(copied).known() == {}
    restored = await SqliteStore(backup).known()
    assert sorted(restored) == sorted(layer.digest for layer in image.foreign_layers)


async def test_store_export_and_import_move_a_sqlite_store_to_redis_with_its_history(
    gateway_factory: GatewayFactory, registry: Registry, http: aiohttp.ClientSession, redis_factory: RedisFactory,
    store: str, tmp_path: Path,
) -> None:
    image = build_image(70, foreign=2, os="windows")
    gateway = gateway_factory(registry, store=store, args=["--action", "drop"])
    await teach(http, gateway.url, "win/base", image)
    assert (await push_single_put(http, gateway.url, "win/app", image.foreign_layers[0].data)).status == 201
    await asyncio.to_thread(gateway.stop)
    redis = redis_factory()

    exported = succeeded(await asyncio.to_thread(cli, "store", "export", "--store", store)).stdout
    (tmp_path / "store.jsonl").write_text(exported)
    imported = await asyncio.to_thread(cli, "store", "import", "--store", redis.url(), tmp_path / "store.jsonl")
    assert imported.returncode == 0, describe(imported)

    source, target = open_store(store), open_store(redis.url())
    assert await target.records() == await source.records() and await source.records()
    assert await target.repository_stats() == await source.repository_stats()
    assert [stats.outcomes for stats in await target.repository_stats()] == [{"dropped": 1}]
    await source.close()
    await target.close()


@pytest.mark.parametrize(
    ("text", "named"),
    [("", "no export"), ('{"kind": "layer"}\n', "line 1: expected the header"),
     (f'{HEADER}\n{{"kind": "layer"}}\n', "line 2:"), (f'{HEADER}\n\n{{"kind": "tag"}}\n', "line 3: unknown kind"),
     (f'{HEADER}\nnot json\n', "line 2:")],
    ids=["empty", "no-header", "layer-without-fields", "unknown-kind", "not-json"],
)  # fmt: skip
def test_an_import_that_is_no_export_is_refused_naming_the_line(text: str, named: str) -> None:
    with pytest.raises(TransferError, match=named) as refused:
        parse_lines(text.splitlines())
    assert "\n" not in str(refused.value)


def test_store_tls_settings_reach_a_redis_that_checks_client_certificates(
    redis_factory: RedisFactory, tmp_path: Path, in_process: InProcess
) -> None:
    """rediss:// with a private CA and a client certificate, from store.tls_* in a config file: what
    the system trust store and the URL alone cannot express."""
    authority = trustme.CA()
    server_cert = authority.issue_cert("127.0.0.1")
    client_cert = authority.issue_cert("gateway.example")
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "server", "server-key", "client", "client-key")}
    authority.cert_pem.write_to_path(str(files["ca"]))
    server_cert.cert_chain_pems[0].write_to_path(str(files["server"]))
    server_cert.private_key_pem.write_to_path(str(files["server-key"]))
    client_cert.cert_chain_pems[0].write_to_path(str(files["client"]))
    client_cert.private_key_pem.write_to_path(str(files["client-key"]))
    redis = redis_factory(certificate=(files["server"], files["server-key"]), client_ca=files["ca"])
    store_settings = {"url": redis.url(), "tls_ca_file": str(files["ca"])}
    without_client_cert, with_client_cert = tmp_path / "ca-only.yaml", tmp_path / "full.yaml"
    without_client_cert.write_text(yaml.safe_dump({"store": store_settings}))
    with_client_cert.write_text(yaml.safe_dump({"store": {
        **store_settings, "tls_cert_file": str(files["client"]), "tls_key_file": str(files["client-key"])
    }}))  # fmt: skip
    source, layers = dir_source(tmp_path)

    refused = in_process("learn", "--config", without_client_cert, source)
    learned = in_process("learn", "--config", with_client_cert, source)
    checked = in_process("config", "check", "--config", with_client_cert, "--upstream", "http://127.0.0.1:9")

    assert refused[0] == 1 and f"rediss://{redis.host_port}/0" in refused[2], refused
    assert learned[0] == 0 and sorted(line.split()[1] for line in learned[1].splitlines()) == sorted(
        layer.digest for layer in layers
    ), learned
    assert "ok: store TLS: files load" in checked[1] and f"ok: store rediss://{redis.host_port}/0 answers (2" in (
        checked[1]
    ), checked
