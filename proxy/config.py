"""Settings: one typed, validated object from defaults, the YAML file, the environment and flags.

Later sources win: defaults < config file < FOREIGN_LAYER_PROXY_<SECTION>_<KEY> < command-line flags.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

import yaml
from yarl import URL

from proxy.manifests import FOREIGN_MEDIA_TYPES
from proxy.policy import Action, Policy, Rule
from proxy.store import TlsFiles
from proxy.trust import LearningScope, Teaches, TrustedUrls

ENV_PREFIX = "FOREIGN_LAYER_PROXY_"
# Load balancers usually reach the gateway over loopback or a private network (RFC 1918, RFC 4193).
PRIVATE_NETWORKS = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7"
USERINFO = re.compile(r"(//)[^/@]*@")


class ConfigError(Exception):
    """A user error in the configuration; its message is one line naming the key or file."""


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: object) -> Address:
    text = str(value).strip()
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return Address(host, int(port))


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def parse_positive_float(value: object) -> float:
    if isinstance(value, bool):
        raise TypeError("expected a number of seconds")
    number = float(str(value))
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"expected a positive number, got {value!r}")
    return number


def parse_positive_int(value: object) -> int:
    if isinstance(value, bool) or not str(value).strip().isdigit() or int(str(value)) <= 0:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return int(str(value))


def cores_available() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), at least 1."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def parse_workers(value: object) -> int:
    """A positive number of worker processes, or `auto`: one per available core."""
    if str(value).strip().lower() == "auto":
        return cores_available()
    return parse_positive_int(value)


def parse_count(value: object) -> int:
    """A non-negative integer, where 0 means no limit."""
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError(f"expected 0 (no limit) or a positive integer, got {value!r}")
    return int(str(value))


def parse_networks(value: object) -> tuple[IPv4Network | IPv6Network, ...]:
    networks = []
    for item in parse_string_list(value):
        try:
            networks.append(ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"expected CIDR networks such as 10.0.0.0/8, got {item!r}") from None
    return tuple(networks)


def parse_optional_file(value: object) -> Path | None:
    if value is None or value == "":
        return None
    path = Path(str(value)).expanduser()
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def without_credentials(url: str) -> str:
    """A URL for messages: whatever stands between `//` and `@` (user and password) replaced."""
    return USERINFO.sub(r"\1***@", url)


def parse_upstream_url(value: object) -> URL:
    text = str(value).strip()
    try:
        url = URL(text)
    except ValueError:
        raise ValueError(f"not a URL: {without_credentials(text)!r}") from None
    if url.scheme not in {"http", "https"} or not url.host:
        raise ValueError(f"expected an http:// or https:// URL, got {without_credentials(text)!r}")
    if url.path not in {"", "/"} or url.query_string or url.fragment or url.user or url.password:
        raise ValueError(
            f"expected an origin like https://registry:5000 with no path or credentials, got {without_credentials(text)!r}"
        )
    return url.origin()


def parse_string_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple) and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise ValueError("expected a list of strings")


def parse_optional_text(value: object) -> str | None:
    return None if value is None or value == "" else str(value)


def parse_digest_files(value: object) -> tuple[Path, ...]:
    return tuple(Path(item).expanduser() for item in parse_string_list(value))


def parse_action(value: object) -> Action:
    try:
        return Action(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"expected one of {', '.join(a.value for a in Action)}, got {value!r}") from None


def parse_reject_status(value: object) -> int:
    if isinstance(value, bool) or str(value).strip() not in {"400", "403"}:
        raise ValueError(f"expected 403 (distribution's status for DENIED) or 400, got {value!r}")
    return int(str(value).strip())
def parse_choice(choices: type[LearningScope | Teaches]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        try:
            return choices(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"expected one of {', '.join(choice.value for choice in choices)}, got {value!r}") from None

    return parse


parse_learning_scope = parse_choice(LearningScope)
parse_teaches = parse_choice(Teaches)


def parse_trusted_urls(value: object) -> TrustedUrls:
    """A list of regular expressions; in the environment comma-separated, or a YAML list (for
    patterns with commas, like `{1,3}`)."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError("invalid YAML") from None
    patterns = []
    for pattern in parse_string_list(value):
        try:
            patterns.append(re.compile(pattern))
        except re.error as error:
            raise ValueError(f"not a regular expression: {pattern!r} ({error})") from None
    return TrustedUrls(tuple(patterns))


RULE_KEYS = {"repository", "action"}
OPTIONAL_RULE_KEYS = {"teaches"}


def parse_rules(value: object) -> tuple[Rule, ...]:
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError("invalid YAML") from None
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TypeError("expected a list of {repository: GLOB, action: ACTION}")
    rules = []
    for index, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or not RULE_KEYS <= set(item) <= RULE_KEYS | OPTIONAL_RULE_KEYS
            or not isinstance(item["repository"], str)
        ):
            raise ValueError(
                f"rule {index + 1}: expected the keys repository (a glob) and action, and optionally teaches"
            )
        try:
            teaches = parse_teaches(item["teaches"]) if "teaches" in item else None
            rules.append(Rule(item["repository"], parse_action(item["action"]), teaches))
        except ValueError as exc:
            raise ValueError(f"rule {index + 1}: {exc}") from None
    return tuple(rules)


def parse_log_format(value: object) -> str:
    if value not in {"json", "text"}:
        raise ValueError(f"expected json or text, got {value!r}")
    return str(value)


def parse_log_level(value: object) -> str:
    level = str(value).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError(f"expected debug, info, warning or error, got {value!r}")
    return level


def parse_store_url(value: object) -> str:
    text = str(value).strip()
    if not text.partition("://")[1]:
        raise ValueError(
            f"expected a store URL like sqlite:///path/db, memory:// or redis://host, got {without_credentials(text)!r}"
        )
    return text


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "foreign-layer-proxy"


def default_store_url() -> str:
    return f"sqlite://{(state_dir() / 'foreign-layers.db').absolute()}"


def parsed_by(parse: Callable[[object], Any]) -> dict[str, Callable[[object], Any]]:
    return {"parse": parse}


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: Address = field(default=Address("0.0.0.0", 5000), metadata=parsed_by(parse_address))
    workers: int = field(default=1, metadata=parsed_by(parse_workers))
    tls_cert: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))
    tls_key: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))
    shutdown_timeout: float = field(default=30.0, metadata=parsed_by(parse_positive_float))
    idle_timeout: float = field(default=75.0, metadata=parsed_by(parse_positive_float))
    max_loop_lag: float = field(default=10.0, metadata=parsed_by(parse_positive_float))
    max_connections: int = field(default=1024, metadata=parsed_by(parse_positive_int))
    write_timeout: float = field(default=60.0, metadata=parsed_by(parse_positive_float))
    min_body_rate: int = field(default=1024, metadata=parsed_by(parse_count))
    body_rate_window: float = field(default=20.0, metadata=parsed_by(parse_positive_float))
    max_head_size: int = field(default=64 * 1024, metadata=parsed_by(parse_positive_int))
    manifest_memory: int = field(default=64 * 1024 * 1024, metadata=parsed_by(parse_positive_int))
    splice: bool = field(default=True, metadata=parsed_by(parse_bool))
    splice_min_bytes: int = field(default=1024 * 1024, metadata=parsed_by(parse_positive_int))


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    url: URL | None = field(default=None, metadata=parsed_by(parse_upstream_url))
    ca_file: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))
    insecure: bool = field(default=False, metadata=parsed_by(parse_bool))
    pass_host: bool = field(default=True, metadata=parsed_by(parse_bool))
    connect_timeout: float = field(default=10.0, metadata=parsed_by(parse_positive_float))
    read_timeout: float = field(default=300.0, metadata=parsed_by(parse_positive_float))
    max_connections: int = field(default=0, metadata=parsed_by(parse_count))
    max_connections_per_client: int = field(default=0, metadata=parsed_by(parse_count))
    queue_timeout: float = field(default=5.0, metadata=parsed_by(parse_positive_float))


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address = field(default=Address("127.0.0.1", 9090), metadata=parsed_by(parse_address))
    ready_requires_upstream: bool = field(default=False, metadata=parsed_by(parse_bool))


@dataclass(frozen=True, slots=True)
class ForwardedSettings:
    x_forwarded: bool = field(default=True, metadata=parsed_by(parse_bool))
    forwarded: bool = field(default=True, metadata=parsed_by(parse_bool))
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = field(
        default=parse_networks(PRIVATE_NETWORKS), metadata=parsed_by(parse_networks)
    )


@dataclass(frozen=True, slots=True)
class ForeignSettings:
    media_types: tuple[str, ...] = field(default=(), metadata=parsed_by(parse_string_list))
    urls_mark_foreign: bool = field(default=False, metadata=parsed_by(parse_bool))
    digest_files: tuple[Path, ...] = field(default=(), metadata=parsed_by(parse_digest_files))
    learning_scope: LearningScope = field(default=LearningScope.GLOBAL, metadata=parsed_by(parse_learning_scope))
    trusted_urls: TrustedUrls = field(default_factory=TrustedUrls, metadata=parsed_by(parse_trusted_urls))
    max_learned_per_manifest: int = field(default=64, metadata=parsed_by(parse_positive_int))
    max_learned_per_repository_hour: int = field(default=1000, metadata=parsed_by(parse_positive_int))

    @property
    def all_media_types(self) -> frozenset[str]:
        return FOREIGN_MEDIA_TYPES | frozenset(self.media_types)


@dataclass(frozen=True, slots=True)
class PolicySettings:
    default: Action = field(default=Action.DROP, metadata=parsed_by(parse_action))
    rules: tuple[Rule, ...] = field(default=(), metadata=parsed_by(parse_rules))
    reject_status: int = field(default=403, metadata=parsed_by(parse_reject_status))
    pretend_present: bool = field(default=False, metadata=parsed_by(parse_bool))
    manifest_check: bool = field(default=True, metadata=parsed_by(parse_bool))
    inspect_content: bool = field(default=False, metadata=parsed_by(parse_bool))
    inspect_max_uploads: int = field(default=1024, metadata=parsed_by(parse_positive_int))
    leak_window: float = field(default=3600.0, metadata=parsed_by(parse_positive_float))

    @property
    def policy(self) -> Policy:
        return Policy(default=self.default, rules=self.rules)


@dataclass(frozen=True, slots=True)
class CleanupSettings:
    delete_leaked: bool = field(default=False, metadata=parsed_by(parse_bool))
    username: str | None = field(default=None, metadata=parsed_by(parse_optional_text))
    password: str | None = field(default=None, repr=False, metadata=parsed_by(parse_optional_text))
    bearer_token: str | None = field(default=None, repr=False, metadata=parsed_by(parse_optional_text))
    attempts: int = field(default=5, metadata=parsed_by(parse_positive_int))


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str = field(default_factory=default_store_url, metadata=parsed_by(parse_store_url))
    sync_interval: float = field(default=0.5, metadata=parsed_by(parse_positive_float))
    required: bool = field(default=False, metadata=parsed_by(parse_bool))
    tls_ca_file: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))
    tls_cert_file: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))
    tls_key_file: Path | None = field(default=None, metadata=parsed_by(parse_optional_file))

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles(self.tls_ca_file, self.tls_cert_file, self.tls_key_file)


@dataclass(frozen=True, slots=True)
class LogSettings:
    level: str = field(default="INFO", metadata=parsed_by(parse_log_level))
    format: str = field(default="json", metadata=parsed_by(parse_log_format))
    access: bool = field(default=True, metadata=parsed_by(parse_bool))


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    forwarded: ForwardedSettings = field(default_factory=ForwardedSettings)
    foreign: ForeignSettings = field(default_factory=ForeignSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    cleanup: CleanupSettings = field(default_factory=CleanupSettings)
    log: LogSettings = field(default_factory=LogSettings)


SECTIONS: Mapping[str, type[Any]] = {f.name: f.default_factory for f in fields(Settings)}  # type: ignore[misc]

RawSettings = dict[str, dict[str, object]]


def _section_keys(section: str) -> set[str]:
    return {f.name for f in fields(SECTIONS[section])}


def _read_file(path: Path) -> RawSettings:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    raw: RawSettings = {}
    for section, values in document.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r} (known: {', '.join(SECTIONS)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: section {section!r} must be a mapping")
        for key in values:
            if key not in _section_keys(section):
                raise ConfigError(f"{path}: unknown key {section}.{key}")
        raw[section] = dict(values)
    return raw


def _read_environment(environ: Mapping[str, str]) -> RawSettings:
    raw: RawSettings = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        section = next((s for s in SECTIONS if rest.startswith(s + "_")), None)
        key = rest[len(section) + 1:] if section else ""
        if section is None or key not in _section_keys(section):
            raise ConfigError(f"environment variable {name}: no such setting")
        raw.setdefault(section, {})[key] = value
    return raw


def _build_section(section: str, values: Mapping[str, object]) -> Any:
    cls = SECTIONS[section]
    parsed: dict[str, Any] = {}
    for setting in fields(cls):
        if setting.name in values:
            try:
                parsed[setting.name] = setting.metadata["parse"](values[setting.name])
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{section}.{setting.name}: {exc}") from None
    return cls(**parsed)


def _merged(
    config_file: Path | None, overrides: Mapping[str, object] | None, environ: Mapping[str, str] | None
) -> RawSettings:
    layers = [
        _read_file(config_file) if config_file else {},
        _read_environment(os.environ if environ is None else environ),
    ]
    merged: RawSettings = {}
    for layer in layers:
        for section, values in layer.items():
            merged.setdefault(section, {}).update(values)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            section, key = dotted.split(".")
            merged.setdefault(section, {})[key] = value
    return merged


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every source; `overrides` are command-line values keyed "section.key" (None means not given)."""
    merged = _merged(config_file, overrides, environ)
    settings = Settings(**{section: _build_section(section, merged.get(section, {})) for section in SECTIONS})
    if (settings.server.tls_cert is None) != (settings.server.tls_key is None):
        raise ConfigError("server.tls_cert and server.tls_key must be given together")
    if settings.store.tls_key_file is not None and settings.store.tls_cert_file is None:
        raise ConfigError("store.tls_key_file needs store.tls_cert_file")
    return settings


def configuration_problems(
    config_file: Path | None = None,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> list[str]:
    """Every bad value load_settings would stop at, one line each (load_settings reports only the first)."""
    try:
        merged = _merged(config_file, overrides, environ)
    except ConfigError as error:
        return [str(error)]
    problems = []
    for section, values in merged.items():
        for setting in fields(SECTIONS[section]):
            if setting.name in values:
                try:
                    setting.metadata["parse"](values[setting.name])
                except (ValueError, TypeError) as exc:
                    problems.append(f"{section}.{setting.name}: {exc}")
    if not problems:
        try:
            load_settings(config_file, overrides, environ)
        except ConfigError as error:
            problems.append(str(error))
    return problems
def policy_of(settings: Settings) -> Policy:
    """The policy the gateway decides with: the rules, and where what repositories teach applies."""
    return Policy(settings.policy.default, settings.policy.rules, settings.foreign.learning_scope)


def require_upstream(settings: Settings) -> URL:
    if settings.upstream.url is None:
        raise ConfigError("upstream.url is required (--upstream URL, or upstream.url in the config file)")
    return settings.upstream.url
