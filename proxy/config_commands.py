"""`config check`, `config show` and `config example`: what an operator runs before and after an edit."""

from __future__ import annotations

import asyncio
import enum
import ssl
from collections.abc import Callable
from dataclasses import fields, is_dataclass
from importlib import resources
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from proxy.app import load_certificate, read_digest_files, server_ssl_context
from proxy.config import Address, ConfigError, Settings
from proxy.errors import GatewayError
from proxy.forwarding import Upstream, client_ssl_context, create_session
from proxy.policy import Rule
from proxy.store import SqliteStore, StoreError, open_store, without_password
from proxy.trust import TrustedUrls

REFERENCE = "foreign-layer-proxy.yaml"
REDACTED = "REDACTED"
SECRET_SETTINGS = frozenset({("cleanup", "password"), ("cleanup", "bearer_token")})
Report = Callable[[str], None]


def reference_text() -> str:
    """The config reference shipped in the package: every setting, its default and what it does."""
    return resources.files("proxy").joinpath(REFERENCE).read_text()


# config show


def plain(value: Any) -> Any:
    """A setting's value as YAML would write it, in the form load_settings reads back."""
    if isinstance(value, Rule):
        rule = {"repository": value.repository, "action": value.action.value}
        return rule if value.teaches is None else rule | {"teaches": value.teaches.value}
    if isinstance(value, TrustedUrls):
        return [pattern.pattern for pattern in value.patterns]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Address | Path | URL | IPv4Network | IPv6Network):
        return str(value)
    if isinstance(value, tuple):
        return [plain(item) for item in value]
    return value


def effective(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every setting after defaults, file, environment and flags, secrets replaced by REDACTED."""
    shown: dict[str, dict[str, Any]] = {}
    for section in fields(settings):
        values = getattr(settings, section.name)
        assert is_dataclass(values)
        shown[section.name] = {}
        for setting in fields(values):
            value = plain(getattr(values, setting.name))
            if (section.name, setting.name) in SECRET_SETTINGS and value is not None:
                value = REDACTED
            shown[section.name][setting.name] = value
    shown["store"]["url"] = without_password(settings.store.url)
    return shown


def show(settings: Settings) -> str:
    return yaml.safe_dump(effective(settings), sort_keys=False)


# config check


async def check(
    load: Callable[[], Settings], problems_of: Callable[[], list[str]], report_ok: Report, report_problem: Report
) -> int:
    """Each check one line; 1 if any failed. A config that does not load: a line per bad value, and no more."""
    parse_problems = problems_of()
    for problem in parse_problems:
        report_problem(problem)
    if parse_problems:
        return 1
    settings = load()
    report_ok("configuration parses")
    problems = 0
    for name, run in (
        ("server TLS", check_server_tls),
        ("digest files", check_digest_files),
        ("store TLS", check_store_tls),
    ):
        try:
            if (done := run(settings)) is not None:
                report_ok(f"{name}: {done}")
        except ConfigError as error:
            report_problem(str(error))
            problems += 1
    for message, ok in await asyncio.gather(check_upstream(settings), check_store(settings)):
        (report_ok if ok else report_problem)(message)
        problems += not ok
    return 1 if problems else 0


def check_server_tls(settings: Settings) -> str | None:
    return None if server_ssl_context(settings) is None else f"{settings.server.tls_cert} and its key form a pair"


def check_digest_files(settings: Settings) -> str | None:
    if not settings.foreign.digest_files:
        return None
    return f"{len(read_digest_files(settings.foreign.digest_files))} digests in {len(settings.foreign.digest_files)} files"


def check_store_tls(settings: Settings) -> str | None:
    tls = settings.store.tls
    if tls == type(tls)():
        return None
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except ssl.SSLError as error:
        raise ConfigError(f"store.tls_ca_file: {tls.ca_file} is not a PEM CA bundle ({error.reason})") from None
    if tls.cert_file is not None:
        load_certificate(context, tls.cert_file, tls.key_file or tls.cert_file, "store.tls_cert_file", "store.tls_key_file")
    return "files load"


async def check_upstream(settings: Settings) -> tuple[str, bool]:
    if settings.upstream.url is None:
        return "upstream.url is not set (--upstream URL, or upstream.url in the config file)", False
    url = settings.upstream.url
    try:
        client_ssl_context(settings.upstream.ca_file, settings.upstream.insecure)
    except ConfigError as error:
        return f"upstream.ca_file: {error}", False
    session = create_session(settings.upstream)
    try:
        async with asyncio.timeout(settings.upstream.connect_timeout), Upstream(url, session).open(
            "GET", "/v2/", {}
        ) as response:
            status = response.status
    except GatewayError as error:
        return f"upstream.url: {url}: {error} ({error.cause})", False
    except TimeoutError:
        return f"upstream.url: {url}: no answer to GET /v2/ within {settings.upstream.connect_timeout:g} s", False
    finally:
        await session.close()
    if status >= 500:
        return f"upstream.url: {url} answered GET /v2/ with {status}", False
    return f"upstream {url} answers GET /v2/ ({status})", True


async def check_store(settings: Settings) -> tuple[str, bool]:
    shown = without_password(settings.store.url)
    try:
        store = open_store(settings.store.url, settings.store.tls)
    except ValueError as error:
        return f"store.url: {error}", False
    try:
        if isinstance(store, SqliteStore) and not store.path.exists():
            folder = next((parent for parent in store.path.parents if parent.exists()), None)
            if folder is None or not folder.is_dir():
                return f"store.url: {shown}: no folder to create it in", False
            return f"store {shown} does not exist yet: serve or learn create it", True
        known = len(await store.known())
    except StoreError as error:
        return f"store.url: {error}", False
    finally:
        await store.close()
    return f"store {shown} answers ({known} foreign digests)", True
