"""Settings from defaults, the YAML file, the environment and flags (proxy/config.py)."""

from __future__ import annotations

import os
from ipaddress import ip_network
from pathlib import Path

import pytest
import yaml
from yarl import URL

from proxy.config import (
    Address,
    ConfigError,
    Settings,
    load_settings,
    parse_address,
    parse_bool,
    parse_positive_float,
    parse_positive_int,
    parse_rules,
    parse_string_list,
    parse_upstream_url,
    parse_workers,
    require_upstream,
)
from proxy.manifests import FOREIGN_MEDIA_TYPES
from proxy.policy import Action, Rule

PREFIX = "FOREIGN_LAYER_PROXY_"


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(
    tmp_path: Path,
    text: str | None = None,
    environ: dict[str, str] | None = None,
    overrides: dict[str, object] | None = None,
) -> Settings:
    config_file = write(tmp_path, text) if text is not None else None
    return load_settings(config_file, overrides, environ if environ is not None else {})


# Defaults ------------------------------------------------------------------------------------------------


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))

    settings = load_settings(environ={})

    assert settings.server.listen == Address("0.0.0.0", 5000)
    assert (settings.server.tls_cert, settings.server.tls_key) == (None, None)
    assert (settings.server.shutdown_timeout, settings.server.idle_timeout) == (30.0, 75.0)
    assert settings.upstream.url is None
    assert (settings.upstream.ca_file, settings.upstream.insecure, settings.upstream.pass_host) == (None, False, True)
    assert (settings.upstream.connect_timeout, settings.upstream.read_timeout) == (10.0, 300.0)
    assert (settings.upstream.max_connections, settings.upstream.max_connections_per_client) == (0, 0)
    assert settings.server.max_connections == 1024
    assert ip_network("10.0.0.0/8") in settings.forwarded.trusted_proxies
    assert (settings.admin.listen, settings.admin.ready_requires_upstream) == (Address("127.0.0.1", 9090), False)
    assert (settings.forwarded.x_forwarded, settings.forwarded.forwarded) == (True, True)
    assert settings.foreign.media_types == ()
    assert settings.foreign.all_media_types == FOREIGN_MEDIA_TYPES
    assert (settings.foreign.urls_mark_foreign, settings.foreign.digest_files) == (False, ())
    assert (settings.policy.default, settings.policy.rules) == (Action.DROP, ())
    assert (settings.policy.pretend_present, settings.policy.manifest_check) == (False, True)
    assert settings.policy.policy.rule_for("any/repo") == ("default", Action.DROP)
    assert settings.store.url == f"sqlite://{tmp_path}/state/foreign-layer-proxy/foreign-layers.db"
    assert settings.store.sync_interval == 0.5
    assert (settings.store.tls_ca_file, settings.store.tls_cert_file, settings.store.tls_key_file) == (None, None, None)
    assert (settings.log.level, settings.log.format, settings.log.access) == ("INFO", "json", True)


def test_empty_file_and_empty_sections_give_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "") == load(tmp_path, "server:\nupstream: ~\n") == load_settings(environ={})


def test_upstream_is_required_only_when_asked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.url is required"):
        require_upstream(load(tmp_path))
    assert require_upstream(load(tmp_path, "upstream: {url: 'http://registry:5000'}")) == URL("http://registry:5000")


# The file ------------------------------------------------------------------------------------------------

FULL_FILE = """
server:
  listen: "[::]:8443"
  tls_cert: {cert}
  tls_key: {key}
  shutdown_timeout: 5
  idle_timeout: 2.5
upstream:
  url: https://Registry.Example:5000/
  ca_file: {cert}
  insecure: yes
  pass_host: false
  connect_timeout: 1
  read_timeout: 60
  max_connections: 8
admin:
  listen: 127.0.0.1:9999
forwarded:
  x_forwarded: off
  forwarded: "false"
foreign:
  media_types: [application/vnd.example.foreign]
  urls_mark_foreign: true
  digest_files: [~/digests.txt, /etc/flp/more.txt]
policy:
  default: Reject
  rules:
    - {{repository: "team/secret", action: reject}}
    - {{repository: "team/**", action: allow}}
    - {{repository: "**/windows-*", action: audit}}
  pretend_present: true
  manifest_check: false
store:
  url: memory://
  sync_interval: 2
log:
  level: debug
  format: text
"""


def test_every_setting_from_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cert, key = write(tmp_path, "cert", "cert.pem"), write(tmp_path, "key", "key.pem")

    settings = load(tmp_path, FULL_FILE.format(cert=cert, key=key))

    assert settings.server.listen == Address("::", 8443)
    assert (settings.server.tls_cert, settings.server.tls_key) == (cert, key)
    assert (settings.server.shutdown_timeout, settings.server.idle_timeout) == (5.0, 2.5)
    assert settings.upstream.url == URL("https://registry.example:5000")
    assert (settings.upstream.ca_file, settings.upstream.insecure, settings.upstream.pass_host) == (cert, True, False)
    assert (settings.upstream.connect_timeout, settings.upstream.read_timeout) == (1.0, 60.0)
    assert settings.upstream.max_connections == 8
    assert settings.admin.listen == Address("127.0.0.1", 9999)
    assert (settings.forwarded.x_forwarded, settings.forwarded.forwarded) == (False, False)
    assert settings.foreign.media_types == ("application/vnd.example.foreign",)
    assert settings.foreign.all_media_types == FOREIGN_MEDIA_TYPES | {"application/vnd.example.foreign"}
    assert settings.foreign.urls_mark_foreign is True
    assert settings.foreign.digest_files == (tmp_path / "home" / "digests.txt", Path("/etc/flp/more.txt"))
    assert settings.policy.default is Action.REJECT
    assert settings.policy.rules == (
        Rule("team/secret", Action.REJECT),
        Rule("team/**", Action.ALLOW),
        Rule("**/windows-*", Action.AUDIT),
    )
    assert (settings.policy.pretend_present, settings.policy.manifest_check) == (True, False)
    assert settings.store.url == "memory://"
    assert settings.store.sync_interval == 2.0
    assert (settings.log.level, settings.log.format) == ("DEBUG", "text")


def test_rules_keep_their_order_and_drive_the_policy(tmp_path: Path) -> None:
    settings = load(tmp_path, FULL_FILE.format(cert="", key=""))

    assert [rule.repository for rule in settings.policy.rules] == ["team/secret", "team/**", "**/windows-*"]
    assert settings.policy.policy.rule_for("team/secret") == ("team/secret", Action.REJECT)
    assert settings.policy.policy.rule_for("team/app") == ("team/**", Action.ALLOW)
    assert settings.policy.policy.rule_for("x/windows-base") == ("**/windows-*", Action.AUDIT)
    assert settings.policy.policy.rule_for("x/linux") == ("default", Action.REJECT)


# Layering ------------------------------------------------------------------------------------------------

FILE_URL = "upstream:\n  url: http://from-file:5000\n  insecure: true\n"
ENV_URL = {f"{PREFIX}UPSTREAM_URL": "http://from-env:5000"}
FLAG_URL = {"upstream.url": "http://from-flag:5000"}


@pytest.mark.parametrize(
    ("text", "environ", "overrides", "expected"),
    [
        pytest.param(FILE_URL, {}, {}, "http://from-file:5000", id="file"),
        pytest.param(None, ENV_URL, {}, "http://from-env:5000", id="env"),
        pytest.param(None, {}, FLAG_URL, "http://from-flag:5000", id="flag"),
        pytest.param(FILE_URL, ENV_URL, {}, "http://from-env:5000", id="env-over-file"),
        pytest.param(FILE_URL, {}, FLAG_URL, "http://from-flag:5000", id="flag-over-file"),
        pytest.param(None, ENV_URL, FLAG_URL, "http://from-flag:5000", id="flag-over-env"),
        pytest.param(FILE_URL, ENV_URL, FLAG_URL, "http://from-flag:5000", id="flag-over-env-over-file"),
        pytest.param(FILE_URL, ENV_URL, {"upstream.url": None}, "http://from-env:5000", id="none-flag-not-given"),
    ],
)
def test_later_sources_win(
    tmp_path: Path, text: str | None, environ: dict[str, str], overrides: dict[str, object], expected: str
) -> None:
    assert load(tmp_path, text, environ, overrides).upstream.url == URL(expected)


def test_sources_merge_key_by_key(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        FILE_URL + "log:\n  level: warning\n",
        {**ENV_URL, f"{PREFIX}LOG_FORMAT": "text"},
        {"upstream.max_connections": 3, "log.level": None},
    )

    assert settings.upstream.url == URL("http://from-env:5000")
    assert settings.upstream.insecure is True
    assert settings.upstream.max_connections == 3
    assert (settings.log.level, settings.log.format) == ("WARNING", "text")


def test_real_environment_is_used_only_when_none_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"{PREFIX}LOG_LEVEL", "error")

    assert load_settings(environ={}).log.level == "INFO"
    assert load_settings().log.level == "ERROR"


@pytest.mark.parametrize(
    ("name", "value", "section", "key", "expected"),
    [
        pytest.param("SERVER_LISTEN", "127.0.0.1:8000", "server", "listen", Address("127.0.0.1", 8000), id="address"),
        pytest.param("SERVER_SHUTDOWN_TIMEOUT", "1.5", "server", "shutdown_timeout", 1.5, id="float"),
        pytest.param("UPSTREAM_MAX_CONNECTIONS", "12", "upstream", "max_connections", 12, id="int"),
        pytest.param("UPSTREAM_PASS_HOST", "0", "upstream", "pass_host", False, id="bool"),
        pytest.param("FORWARDED_X_FORWARDED", "no", "forwarded", "x_forwarded", False, id="key-with-underscore"),
        pytest.param("FOREIGN_URLS_MARK_FOREIGN", "on", "foreign", "urls_mark_foreign", True, id="section-in-key"),
        pytest.param("FOREIGN_MEDIA_TYPES", " a/b , c/d,,", "foreign", "media_types", ("a/b", "c/d"),
                     id="comma-separated-list"),
        pytest.param("FOREIGN_DIGEST_FILES", "/a.txt,/b.txt", "foreign", "digest_files", (Path("/a.txt"), Path("/b.txt")),
                     id="list-of-paths"),
        pytest.param("POLICY_DEFAULT", "AUDIT", "policy", "default", Action.AUDIT, id="action"),
        pytest.param("POLICY_RULES", "- {repository: 'team/**', action: allow}\n- {repository: '**', action: REJECT}",
                     "policy", "rules", (Rule("team/**", Action.ALLOW), Rule("**", Action.REJECT)), id="rules-yaml"),
        pytest.param("POLICY_RULES", '[{"repository": "a", "action": "drop"}]', "policy", "rules",
                     (Rule("a", Action.DROP),), id="rules-json"),
        pytest.param("POLICY_RULES", "", "policy", "rules", (), id="rules-empty"),
        pytest.param("STORE_URL", "redis://cache:6379/0", "store", "url", "redis://cache:6379/0", id="store"),
        pytest.param("LOG_LEVEL", "Warning", "log", "level", "WARNING", id="log-level"),
    ],
)
def test_environment_values(
    tmp_path: Path, name: str, value: str, section: str, key: str, expected: object
) -> None:
    settings = load(tmp_path, environ={f"{PREFIX}{name}": value, "HOME": "/elsewhere", "FOREIGN_LAYER": "x"})

    assert getattr(getattr(settings, section), key) == expected


def test_environment_rules_replace_the_files(tmp_path: Path) -> None:
    text = "policy:\n  rules:\n    - {repository: a, action: allow}\n    - {repository: b, action: allow}\n"
    environ = {f"{PREFIX}POLICY_RULES": "[{repository: c, action: reject}]"}

    assert load(tmp_path, text).policy.rules == (Rule("a", Action.ALLOW), Rule("b", Action.ALLOW))
    assert load(tmp_path, text, environ).policy.rules == (Rule("c", Action.REJECT),)


def test_tls_cert_and_key_together(tmp_path: Path) -> None:
    cert, key = write(tmp_path, "c", "cert.pem"), write(tmp_path, "k", "key.pem")

    settings = load(tmp_path, environ={f"{PREFIX}SERVER_TLS_CERT": str(cert), f"{PREFIX}SERVER_TLS_KEY": str(key)})

    assert (settings.server.tls_cert, settings.server.tls_key) == (cert, key)


# Errors ----------------------------------------------------------------------------------------------------

DIRECTORY = "{tmp}"
MISSING = "{tmp}/missing.pem"
CERT = "{tmp}/cert.pem"


@pytest.mark.parametrize(
    ("text", "environ", "overrides", "message"),
    [
        pytest.param("bogus:\n  a: 1\n", {}, {}, "unknown section 'bogus'", id="file-unknown-section"),
        pytest.param("server:\n  bogus: 1\n", {}, {}, "unknown key server.bogus", id="file-unknown-key"),
        pytest.param("upstream:\n  listen: 1\n", {}, {}, "unknown key upstream.listen", id="file-key-of-other-section"),
        pytest.param("- server\n", {}, {}, "expected a mapping of sections", id="file-not-a-mapping"),
        pytest.param("server: 5000\n", {}, {}, "section 'server' must be a mapping", id="file-section-not-mapping"),
        pytest.param("server:\n  listen: [\n", {}, {}, "line 3", id="file-invalid-yaml"),
        pytest.param(None, {f"{PREFIX}SERVER_BOGUS": "1"}, {}, f"{PREFIX}SERVER_BOGUS", id="env-unknown-key"),
        pytest.param(None, {f"{PREFIX}BOGUS_LISTEN": "1"}, {}, f"{PREFIX}BOGUS_LISTEN", id="env-unknown-section"),
        pytest.param(None, {f"{PREFIX}UPSTREAM": "x"}, {}, f"{PREFIX}UPSTREAM", id="env-section-only"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "ftp://registry"}, {}, "upstream.url", id="url-ftp"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "registry:5000"}, {}, "upstream.url", id="url-no-scheme"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://"}, {}, "upstream.url", id="url-no-host"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://registry:5000/v2"}, {}, "upstream.url", id="url-path"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://registry?x=1"}, {}, "upstream.url", id="url-query"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://registry#x"}, {}, "upstream.url", id="url-fragment"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://u:p@registry"}, {}, "upstream.url", id="url-credentials"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://u@registry"}, {}, "upstream.url", id="url-user"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_URL": "http://registry:99999"}, {}, "upstream.url", id="url-bad-port"),
        pytest.param(None, {}, {"upstream.url": "ftp://registry"}, "upstream.url", id="flag-url"),
        pytest.param("server:\n  listen: localhost\n", {}, {}, "server.listen", id="address-no-port"),
        pytest.param("server:\n  listen: ':5000'\n", {}, {}, "server.listen", id="address-no-host"),
        pytest.param("server:\n  listen: 'h:65536'\n", {}, {}, "server.listen", id="address-port-too-big"),
        pytest.param("admin:\n  listen: 'h:http'\n", {}, {}, "admin.listen", id="address-port-name"),
        pytest.param(None, {f"{PREFIX}SERVER_TLS_CERT": MISSING, f"{PREFIX}SERVER_TLS_KEY": CERT}, {},
                     "server.tls_cert", id="tls-cert-missing"),
        pytest.param(None, {f"{PREFIX}SERVER_TLS_CERT": DIRECTORY, f"{PREFIX}SERVER_TLS_KEY": CERT}, {},
                     "server.tls_cert", id="tls-cert-directory"),
        pytest.param(None, {f"{PREFIX}SERVER_TLS_CERT": CERT, f"{PREFIX}SERVER_TLS_KEY": MISSING}, {},
                     "server.tls_key", id="tls-key-missing"),
        pytest.param(None, {f"{PREFIX}SERVER_TLS_CERT": CERT}, {}, "server.tls_cert and server.tls_key",
                     id="tls-cert-without-key"),
        pytest.param(None, {f"{PREFIX}SERVER_TLS_KEY": CERT}, {}, "server.tls_cert and server.tls_key",
                     id="tls-key-without-cert"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_CA_FILE": MISSING}, {}, "upstream.ca_file", id="ca-file-missing"),
        pytest.param("policy:\n  default: explode\n", {}, {}, "policy.default", id="bad-default-action"),
        pytest.param("policy:\n  rules: {repository: a, action: drop}\n", {}, {}, "policy.rules",
                     id="rules-not-a-list"),
        pytest.param("policy:\n  rules:\n    - {repository: a, action: drop}\n    - {repository: b}\n", {}, {},
                     "policy.rules: rule 2", id="rule-without-action"),
        pytest.param("policy:\n  rules:\n    - {repository: a, action: drop, extra: 1}\n", {}, {},
                     "policy.rules: rule 1", id="rule-extra-key"),
        pytest.param("policy:\n  rules:\n    - {repository: 5, action: drop}\n", {}, {}, "policy.rules: rule 1",
                     id="rule-repository-not-string"),
        pytest.param("policy:\n  rules:\n    - team/**\n", {}, {}, "policy.rules: rule 1", id="rule-not-mapping"),
        pytest.param("policy:\n  rules:\n    - {repository: a, action: explode}\n", {}, {}, "policy.rules: rule 1",
                     id="rule-bad-action"),
        pytest.param(None, {f"{PREFIX}POLICY_RULES": "repository: a"}, {}, "policy.rules", id="env-rules-mapping"),
        pytest.param(None, {f"{PREFIX}UPSTREAM_INSECURE": "maybe"}, {}, "upstream.insecure", id="bad-bool"),
        pytest.param("server:\n  shutdown_timeout: 0\n", {}, {}, "server.shutdown_timeout", id="zero-timeout"),
        pytest.param("server:\n  idle_timeout: -1\n", {}, {}, "server.idle_timeout", id="negative-timeout"),
        pytest.param("upstream:\n  read_timeout: soon\n", {}, {}, "upstream.read_timeout", id="word-timeout"),
        pytest.param("upstream:\n  read_timeout: true\n", {}, {}, "upstream.read_timeout", id="bool-timeout"),
        pytest.param("server:\n  max_connections: 0\n", {}, {}, "server.max_connections", id="zero-int"),
        pytest.param("upstream:\n  max_connections: -1\n", {}, {}, "upstream.max_connections", id="negative-count"),
        pytest.param("forwarded:\n  trusted_proxies: [10.0.0.0/33]\n", {}, {}, "forwarded.trusted_proxies",
                     id="bad-cidr"),
        pytest.param("upstream:\n  max_connections: 1.5\n", {}, {}, "upstream.max_connections", id="float-int"),
        pytest.param("upstream:\n  max_connections: true\n", {}, {}, "upstream.max_connections", id="bool-int"),
        pytest.param("foreign:\n  media_types: [1, 2]\n", {}, {}, "foreign.media_types", id="list-of-numbers"),
        pytest.param("foreign:\n  media_types: {a: b}\n", {}, {}, "foreign.media_types", id="list-as-mapping"),
        pytest.param("log:\n  format: xml\n", {}, {}, "log.format", id="bad-log-format"),
        pytest.param("log:\n  format: [json]\n", {}, {}, "log.format", id="log-format-list"),
        pytest.param("log:\n  format: {json: 1}\n", {}, {}, "log.format", id="log-format-mapping"),
        pytest.param("server:\n  listen: [a, 1]\n", {}, {}, "server.listen", id="address-list"),
        pytest.param("policy:\n  default: [drop]\n", {}, {}, "policy.default", id="action-list"),
        pytest.param("upstream:\n  url: {http: x}\n", {}, {}, "upstream.url", id="url-mapping"),
        pytest.param("upstream:\n  connect_timeout: [1]\n", {}, {}, "upstream.connect_timeout", id="timeout-list"),
        pytest.param("upstream:\n  insecure: [true]\n", {}, {}, "upstream.insecure", id="bool-list"),
        pytest.param("log:\n  level: verbose\n", {}, {}, "log.level", id="bad-log-level"),
        pytest.param("store:\n  url: /var/lib/db\n", {}, {}, "store.url", id="store-url-without-scheme"),
    ],
)
def test_configuration_errors_name_the_key_on_one_line(
    tmp_path: Path, text: str | None, environ: dict[str, str], overrides: dict[str, object], message: str
) -> None:
    write(tmp_path, "cert", "cert.pem")
    environ = {name: value.format(tmp=tmp_path) for name, value in environ.items()}

    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, environ, overrides)

    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    invalid = write(tmp_path, "server: [\n", "invalid.yaml")

    with pytest.raises(ConfigError, match=f"^{missing}: cannot read config file"):
        load_settings(missing, environ={})
    with pytest.raises(ConfigError, match=f"^{invalid}: line 2 invalid YAML$"):
        load_settings(invalid, environ={})
    with pytest.raises(ConfigError, match=f"^{tmp_path}: cannot read config file"):
        load_settings(tmp_path, environ={})


def test_url_with_password_only_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.url"):
        load(tmp_path, environ={f"{PREFIX}UPSTREAM_URL": "http://:secret@registry:5000"})


def test_nan_timeout_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstream\.read_timeout"):
        load(tmp_path, environ={f"{PREFIX}UPSTREAM_READ_TIMEOUT": "nan"})


def test_invalid_yaml_rules_in_the_environment_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"policy\.rules"):
        load(tmp_path, environ={f"{PREFIX}POLICY_RULES": "[{repository: a"})


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"log:\n  level: \xff\xfe\n")

    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path, environ={})


# Helpers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "text"),
    [
        pytest.param("0.0.0.0:5000", Address("0.0.0.0", 5000), "0.0.0.0:5000", id="ipv4"),
        pytest.param(" localhost:0 ", Address("localhost", 0), "localhost:0", id="name-port-zero"),
        pytest.param("[::1]:5000", Address("::1", 5000), "[::1]:5000", id="ipv6"),
        pytest.param("[::]:65535", Address("::", 65535), "[::]:65535", id="ipv6-any-max-port"),
    ],
)
def test_parse_address(value: str, expected: Address, text: str) -> None:
    assert parse_address(value) == expected
    assert str(parse_address(value)) == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[pytest.param(v, True, id=f"true-{v!r}") for v in (True, "1", "true", "YES", " On ")],
        *[pytest.param(v, False, id=f"false-{v!r}") for v in (False, "0", "False", "no", "OFF")],
    ],
)
def test_parse_bool(value: object, expected: bool) -> None:
    assert parse_bool(value) is expected


@pytest.mark.parametrize("value", ["", "2", "y", "enabled", None], ids=repr)
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_bool(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(3, 3.0, id="int"),
        pytest.param("0.25", 0.25, id="string"),
        pytest.param(1e-9, 1e-9, id="tiny"),
    ],
)
def test_parse_positive_float(value: object, expected: float) -> None:
    assert parse_positive_float(value) == expected


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("42", 42), (" 7 ", 7)], ids=["int", "string", "spaces"])
def test_parse_positive_int(value: object, expected: int) -> None:
    assert parse_positive_int(value) == expected


@pytest.mark.parametrize(("value", "expected"), [(1, 1), ("4", 4), ("auto", len(os.sched_getaffinity(0))),
                                               (" Auto ", len(os.sched_getaffinity(0)))],
                         ids=["one", "string", "auto", "auto-spelled-loosely"])  # fmt: skip
def test_parse_workers(value: object, expected: int) -> None:
    assert parse_workers(value) == expected


@pytest.mark.parametrize("value", [0, "-1", "many", "", True], ids=repr)
def test_parse_workers_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_workers(value)


def test_workers_from_the_environment() -> None:
    settings = load_settings(None, {}, {f"{PREFIX}SERVER_WORKERS": "auto"})
    assert settings.server.workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("a, b ,,c", ("a", "b", "c"), id="comma-separated"),
        pytest.param("", (), id="empty-string"),
        pytest.param(["a", "b, c"], ("a", "b, c"), id="list-kept-verbatim"),
        pytest.param(("x",), ("x",), id="tuple"),
    ],
)
def test_parse_string_list(value: object, expected: tuple[str, ...]) -> None:
    assert parse_string_list(value) == expected


def test_parse_rules_accepts_a_list_or_yaml_and_keeps_order() -> None:
    raw = [{"repository": f"r{n}", "action": action} for n, action in enumerate(["drop", "ALLOW", "audit", "reject"])]
    expected = tuple(Rule(f"r{n}", a) for n, a in enumerate([Action.DROP, Action.ALLOW, Action.AUDIT, Action.REJECT]))

    assert parse_rules(raw) == expected
    assert parse_rules(yaml.safe_dump(raw)) == expected
    assert parse_rules(None) == ()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("http://registry:5000", "http://registry:5000", id="http"),
        pytest.param(" HTTPS://Registry.Example:8443/ ", "https://registry.example:8443", id="normalised"),
        pytest.param("http://[::1]:5000", "http://[::1]:5000", id="ipv6"),
    ],
)
def test_parse_upstream_url(value: str, expected: str) -> None:
    assert parse_upstream_url(value) == URL(expected)
