"""Command line: serve, learn, digests, forget, promote, config and store."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from aiohttp import web

from proxy.admin import create_admin_app, create_supervisor_admin_app
from proxy.app import (
    CONNECTIONS,
    GATEWAY,
    IN_FLIGHT,
    KNOWN,
    METRICS,
    SETTINGS,
    create_app,
    load_certificate,
    read_digest_files,
    runner_for,
    server_ssl_context,
    without_own_server_header,
)
from proxy.config import (
    Address,
    ConfigError,
    Settings,
    configuration_problems,
    default_store_url,
    load_settings,
    state_dir,
)
from proxy.config_commands import check, reference_text, show
from proxy.limits import BudgetedSite, raise_open_file_limit
from proxy.logs import configure_logging, log_event
from proxy.manifests import ForeignClassifier, is_digest
from proxy.metrics import SupervisorMetrics, version
from proxy.policy import Action
from proxy.registry_client import RegistryAccess
from proxy.sources import (
    Found,
    ScannedRepository,
    SourceError,
    collect,
    parse_registry_root,
    scan,
)
from proxy.store import (
    ForeignStore,
    RepositoryStats,
    Sighting,
    SqliteStore,
    StoreError,
    open_store,
)
from proxy.store_transfer import TransferError, export_lines, parse_lines
from proxy.trust import EVERYWHERE, Reach, Teaching
from proxy.workers import (
    EXIT_GRACE_SECONDS,
    Supervisor,
    check_shared_listen,
    watch_parent,
    worker_index,
)

logger = logging.getLogger("foreign_layer_proxy")
SiteFactory = Callable[[web.AppRunner, str, int], web.BaseSite]
PROGRAM = "foreign-layer-proxy"
STATS_OUTCOMES = ("dropped", "rejected", "leaked", "audited")
BLOCKED_OUTCOMES = ("dropped", "rejected")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
PROMOTE_SOURCE = "promote"
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
EXIT_RUNTIME = 1
EXIT_USAGE = 2


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="YAML configuration file (see `foreign-layer-proxy config example`)")
    parser.add_argument("--store", metavar="URL",
                        help="store URL: sqlite:///PATH, redis[s]://[:PASSWORD@]HOST:PORT/DB or memory:// "
                             f"(default: {default_store_url()}, the state folder that serve, learn, digests "
                             "and forget share)")


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str, example: str,
    run: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:  # fmt: skip
    parser = commands.add_parser(
        name, help=summary, description=summary, epilog=f"example:\n{example}\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.set_defaults(run=run)
    return parser


def add_serve(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = _command(commands, "serve", "run the gateway in front of a registry",
                     "  foreign-layer-proxy serve --upstream http://127.0.0.1:5001 --listen 127.0.0.1:5000\n"
                     "SIGHUP reloads the config file, digest files and the TLS certificate; SIGTERM drains "
                     "and stops.", run_serve)  # fmt: skip
    _store_options(serve)
    serve.add_argument("--upstream", metavar="URL", help="upstream.url: the registry's URL, e.g. http://127.0.0.1:5001")
    serve.add_argument("--listen", metavar="HOST:PORT", help="server.listen: for registry clients (default 0.0.0.0:5000)")
    serve.add_argument("--admin-listen", metavar="HOST:PORT",
                       help="admin.listen: metrics, health and readiness (default 127.0.0.1:9090)")
    serve.add_argument("--tls-cert", metavar="FILE", help="server.tls_cert: serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", metavar="FILE", help="server.tls_key: the certificate's private key (PEM)")
    serve.add_argument("--upstream-ca", metavar="FILE", help="upstream.ca_file: CA bundle that signed the upstream's certificate")
    serve.add_argument("--upstream-insecure", action="store_const", const=True,
                       help="upstream.insecure: do not verify the upstream's TLS certificate")
    serve.add_argument("--action", choices=[action.value for action in Action],
                       help="policy.default: what to do with a push of a known foreign layer")
    serve.add_argument("--log-format", choices=["json", "text"], help="log.format: json lines, or text for a terminal")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log.level")


def add_learn(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    learn = _command(commands, "learn", "record the foreign layers of images in the store",
                     "  foreign-layer-proxy learn dir:./windows-image\n"
                     "  REGISTRY_AUTH=user:password foreign-layer-proxy learn --scan docker://registry.example:5000/\n"
                     "Registry credentials: --username/--password, else REGISTRY_AUTH (user:password, or the "
                     "base64 `auth` value of a docker config.json).", run_store_command)  # fmt: skip
    _store_options(learn)
    learn.add_argument("sources", nargs="*", metavar="SOURCE",
                       help="manifest file, dir:PATH, oci:PATH, or docker://HOST/REPO:TAG|@DIGEST")
    learn.add_argument("--scan", metavar="docker://HOST[:PORT]/",
                       help="walk a registry's catalog, every tag of every repository (resumable)")
    learn.add_argument("--repository", action="append", default=[], metavar="GLOB",
                       help="with --scan: only repositories matching GLOB (repeatable; ** crosses /)")
    learn.add_argument("--concurrency", type=int, default=4, metavar="N", help="with --scan: repositories scanned at once")
    learn.add_argument("--restart", action="store_true", help="with --scan: ignore the progress of an earlier run")
    learn.add_argument("--insecure", action="store_true", help="plain HTTP or unverified TLS to the registry")
    learn.add_argument("--ca-file", type=Path, metavar="FILE", help="CA bundle for the registry's certificate")
    learn.add_argument("--username", help="registry user (else REGISTRY_AUTH)")
    learn.add_argument("--password", help="registry password (else REGISTRY_AUTH)")
    learn.add_argument("--json", action="store_true", help="print what was learned as JSON lines")


def add_digests(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    digests = _command(commands, "digests", "list the known foreign layers (reads the store, never creates it)",
                       "  foreign-layer-proxy digests --stats", run_store_command)  # fmt: skip
    _store_options(digests)
    digests.add_argument("--stats", action="store_true",
                         help="per repository: how often pushes were dropped, rejected, leaked or audited, "
                              "and the bytes kept out of the registry")
    digests.add_argument("--candidates", action="store_true",
                         help="only candidates: digests taught with urls that foreign.trusted_urls does not trust, "
                              "audited until promoted")
    digests.add_argument("--json", action="store_true", help="one JSON object per digest (per repository with --stats)")


def add_forget(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    forget = _command(commands, "forget", "remove digests from an existing store",
                      "  foreign-layer-proxy forget sha256:3e7a09e2...\n  foreign-layer-proxy forget --taught-by tenant-a/evil --since 2h",
                      run_store_command)  # fmt: skip
    _store_options(forget)
    forget.add_argument("digests", nargs="*", metavar="DIGEST", help="a digest to forget, e.g. sha256:...")
    forget.add_argument("--taught-by", metavar="REPOSITORY",
                        help="remove what this repository (or operator source, e.g. learn) taught; a digest that "
                             "others taught too stays, in their scopes")
    forget.add_argument("--since", metavar="TIME",
                        help="with --taught-by: only what was taught since TIME (ISO 8601, UTC unless it says, "
                             "or a duration ago: 30m, 2h, 1d)")


def add_promote(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    promote = _command(commands, "promote", "enforce candidates everywhere, as if an operator had learned them",
                       "  foreign-layer-proxy promote sha256:3e7a09e2...", run_store_command)  # fmt: skip
    _store_options(promote)
    promote.add_argument("digests", nargs="+", metavar="DIGEST", help="a digest to promote, e.g. sha256:...")


def add_config(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = _command(commands, "config", "check, show or print the configuration",
                      "  foreign-layer-proxy config check --config /etc/foreign-layer-proxy/config.yaml",
                      run_config_command)  # fmt: skip
    actions = config.add_subparsers(dest="config_command", metavar="ACTION", required=True, help="what to do")
    check = _command(actions, "check", "parse the config, load TLS files, reach the upstream and the store; "
                     "one line per problem, exit 1 if any", "  foreign-layer-proxy config check --config gateway.yaml",
                     run_config_command)  # fmt: skip
    show = _command(actions, "show", "print the effective settings (file, environment, flags), secrets redacted",
                    "  FOREIGN_LAYER_PROXY_POLICY_DEFAULT=reject foreign-layer-proxy config show",
                    run_config_command)  # fmt: skip
    for parser in (check, show):
        _store_options(parser)
        parser.add_argument("--upstream", metavar="URL", help="upstream.url, as serve --upstream")
    _command(actions, "example", "print the config reference: every setting with its default and what it does",
             "  foreign-layer-proxy config example > gateway.yaml", run_config_command)  # fmt: skip


def add_store(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    store = _command(commands, "store", "back up, export or import the store",
                     "  foreign-layer-proxy store export --store sqlite:///var/lib/flp/foreign-layers.db \\\n"
                     "    | foreign-layer-proxy store import --store redis://redis:6379/0",
                     run_store_command)  # fmt: skip
    actions = store.add_subparsers(dest="store_command", metavar="ACTION", required=True, help="what to do")
    backup = _command(actions, "backup", "copy the store to PATH while gateways use it: SQLite through its online "
                      "backup API (a consistent .db file), Redis as an export (JSON lines)",
                      "  foreign-layer-proxy store backup /backups/foreign-layers-$(date +%F).db",
                      run_store_command)  # fmt: skip
    backup.add_argument("path", type=Path, metavar="PATH", help="the file to write (must not exist)")
    export = _command(actions, "export", "print every known layer with its history, and the per-repository counts, "
                      "as JSON lines", "  foreign-layer-proxy store export > store.jsonl", run_store_command)  # fmt: skip
    load = _command(actions, "import", "write what `store export` printed into --store (created if needed), "
                    "replacing records of the same digest or repository",
                    "  foreign-layer-proxy store import --store redis://redis:6379/0 store.jsonl",
                    run_store_command)  # fmt: skip
    load.add_argument("file", nargs="?", type=Path, metavar="FILE", help="the export to read (default: standard input)")
    for parser in (backup, export, load):
        _store_options(parser)


# One function per subcommand: a new command is one function and one entry here.
SUBCOMMANDS = (add_serve, add_learn, add_digests, add_forget, add_promote, add_config, add_store)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Registry gateway that keeps foreign layers out.",
        epilog="example:\n  foreign-layer-proxy serve --upstream http://127.0.0.1:5001\n"
               "exit status: 0 success, 1 runtime failure (store, registry, network), 2 usage or configuration error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {version()}",
                        help="print the version and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None), overrides_from(args))


def overrides_from(args: argparse.Namespace) -> dict[str, object]:
    """The flags' values, keyed by the settings they set."""
    overrides: dict[str, object] = {"store.url": getattr(args, "store", None), "upstream.url": getattr(args, "upstream", None)}
    if args.command == "serve":
        overrides |= {
            "server.listen": args.listen,
            "admin.listen": args.admin_listen,
            "server.tls_cert": args.tls_cert,
            "server.tls_key": args.tls_key,
            "upstream.ca_file": args.upstream_ca,
            "upstream.insecure": args.upstream_insecure,
            "policy.default": args.action,
            "log.format": args.log_format,
            "log.level": args.log_level,
        }
    return overrides


class ServeError(Exception):
    """The gateway cannot run here (a port in use): a runtime failure, not a configuration error."""


async def start_site(runner: web.AppRunner, address: Address, setting: str, make_site: SiteFactory = web.TCPSite) -> None:
    await runner.setup()
    without_own_server_header(runner)
    try:
        await make_site(runner, address.host, address.port).start()
    except OSError as error:
        await runner.cleanup()
        raise ServeError(f"{setting}: cannot listen on {address}: {error.strerror}") from None


RELOADED_SECTIONS = ("server", "upstream", "admin", "store")
RELOADED_TLS = frozenset({"server.tls_cert", "server.tls_key"})


def restart_needed(running: Settings, new: Settings, tls: bool) -> list[str]:
    """Settings that differ but apply only at restart (the certificate is reloaded when TLS is on)."""
    changed = [
        f"{section}.{setting.name}"
        for section in RELOADED_SECTIONS
        for setting in fields(getattr(running, section))
        if getattr(getattr(running, section), setting.name) != getattr(getattr(new, section), setting.name)
    ]
    return [name for name in changed if not (tls and name in RELOADED_TLS)]


def reload(
    app: web.Application, load: Callable[[], Settings], context: ssl.SSLContext | None, worker: int | None = None
) -> None:
    """SIGHUP: new policy, foreign-layer and log settings for the next request, the certificate for the next
    connection; a bad config or certificate changes nothing."""
    metrics = app[METRICS]
    try:
        settings = load()
        static = read_digest_files(settings.foreign.digest_files)
        certificate = settings.server.tls_cert, settings.server.tls_key
        if context is not None and certificate[0] is not None and certificate[1] is not None:
            # Checked on a context of its own first: a key that does not fit would leave the live one half-loaded.
            for target in (ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), context):
                load_certificate(target, certificate[0], certificate[1], "server.tls_cert", "server.tls_key")
    except ConfigError as error:
        metrics.config_loaded(False)
        log_event(logger, logging.ERROR, "reload_refused", error=str(error))
        return
    restart = restart_needed(app[SETTINGS], settings, tls=context is not None)
    if restart:
        log_event(logger, logging.WARNING, "reload_partial", restart_needed=restart,
                  note="these settings apply at the next restart")  # fmt: skip
    configure_logging(settings.log.level, settings.log.format, settings.log.access, worker)
    app[GATEWAY].reconfigure(settings)
    app[KNOWN].replace_static(static)
    metrics.config_loaded(True)
    log_event(logger, logging.INFO, "reloaded", rules=len(settings.policy.rules), default=settings.policy.default.value,
              certificate=str(settings.server.tls_cert) if context is not None else None)  # fmt: skip


async def serve(load: Callable[[], Settings], worker: int | None = None) -> None:
    """The gateway in this process; a `worker` of `server.workers` shares server.listen with the others and
    leaves admin.listen to its supervisor."""
    settings = load()
    open_files = raise_open_file_limit()
    context = server_ssl_context(settings)
    app = create_app(settings, shared_metrics=worker is not None)
    runner = runner_for(app, settings)
    await start_site(runner, settings.server.listen, "server.listen",
                     lambda runner, host, port: BudgetedSite(runner, host, port, app[CONNECTIONS], ssl_context=context,
                                                             reuse_port=worker is not None))  # fmt: skip
    admin_runner = None
    if worker is None:
        admin_runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
        try:
            await start_site(admin_runner, settings.admin.listen, "admin.listen")
        except ServeError:
            await runner.cleanup()
            raise
    log_event(logger, logging.INFO, "listening", address=str(settings.server.listen),
              admin=None if worker is not None else str(settings.admin.listen),
              upstream=str(settings.upstream.url), tls=context is not None, version=version(), open_files=open_files,
              max_connections=settings.server.max_connections)  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, app, load, context, worker)
    if worker is not None:
        watch_parent(loop, stop.set)
    await stop.wait()
    in_flight = app[IN_FLIGHT]
    in_flight.draining = True  # /readyz answers 503 from now on
    log_event(logger, logging.INFO, "stopping", in_flight=in_flight.count, grace_seconds=settings.server.shutdown_timeout)
    for site in list(runner.sites):
        await site.stop()
    if not await in_flight.wait_idle(settings.server.shutdown_timeout):
        log_event(logger, logging.WARNING, "shutdown_timeout", cut_requests=in_flight.count)
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()


async def supervise(settings: Settings, command: Sequence[str]) -> None:
    """`server.workers` above 1: this process runs `command` once per worker and serves admin.listen."""
    server_ssl_context(settings)  # a certificate that does not load stops here, not in a worker restarted forever
    try:
        check_shared_listen(settings.server.listen)
    except OSError as error:
        raise ServeError(f"server.listen: cannot listen on {settings.server.listen}: {error.strerror}") from None
    with tempfile.TemporaryDirectory(prefix="foreign-layer-proxy-metrics-") as metrics_directory:
        metrics = SupervisorMetrics(metrics_directory)
        supervisor = Supervisor(command, settings.server.workers, os.environ, metrics_directory,
                                on_restart=metrics.worker_restarts.inc)  # fmt: skip
        metrics.track_workers(supervisor.alive)
        admin_runner = web.AppRunner(create_supervisor_admin_app(supervisor, metrics), access_log=None,
                                     handle_signals=False)  # fmt: skip
        await start_site(admin_runner, settings.admin.listen, "admin.listen")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, supervisor.send, signal.SIGHUP)
        supervisor.start()
        log_event(logger, logging.INFO, "supervising", workers=settings.server.workers,
                  address=str(settings.server.listen), admin=str(settings.admin.listen), version=version())  # fmt: skip
        if settings.policy.inspect_content:
            log_event(logger, logging.WARNING, "workers_split_inspection",
                      note="policy.inspect_content keeps an upload's digest in the worker that opened it: a request "
                           "of that upload on another connection may reach another worker and be refused")  # fmt: skip
        await stop.wait()
        log_event(logger, logging.INFO, "stopping", workers=supervisor.alive(), grace_seconds=settings.server.shutdown_timeout)
        await supervisor.stop(settings.server.shutdown_timeout + EXIT_GRACE_SECONDS)
        await admin_runner.cleanup()


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    worker = worker_index(os.environ)
    configure_logging(settings.log.level, settings.log.format, settings.log.access, worker)
    with asyncio.Runner(loop_factory=fastest_event_loop()) as runner:
        if worker is None and settings.server.workers > 1:
            runner.run(supervise(settings, [sys.executable, "-m", "proxy", *args.argv]))
        else:
            runner.run(serve(lambda: settings_from(args), worker))
    return 0


def run_config_command(args: argparse.Namespace) -> int:
    if args.config_command == "example":
        sys.stdout.write(reference_text())
        return 0
    if args.config_command == "show":
        sys.stdout.write(show(settings_from(args)))
        return 0
    return asyncio.run(check(
        lambda: settings_from(args),
        lambda: configuration_problems(getattr(args, "config", None), overrides_from(args)),
        lambda line: print(f"ok: {line}"),
        lambda line: print(f"{PROGRAM}: config: {line}", file=sys.stderr),
    ))  # fmt: skip


async def learn(settings: Settings, args: argparse.Namespace, store: ForeignStore) -> None:
    if not args.sources and not args.scan:
        raise ConfigError("learn needs a SOURCE or --scan docker://HOST/")
    classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)
    try:
        access = RegistryAccess.from_environment(
            os.environ, insecure=args.insecure, ca_file=args.ca_file, username=args.username, password=args.password
        )
    except ValueError as error:
        raise ConfigError(f"REGISTRY_AUTH: {error}") from None
    for source in args.sources:
        found = await collect(source, classifier, access)
        await record(store, found, source, args.json)
        if not found:
            print(f"no foreign layers in {source}", file=sys.stderr)
    if args.scan:
        await scan_registry(store, args, classifier, access)


async def record(store: ForeignStore, found: Sequence[Found], source: str, as_json: bool) -> int:
    """Learn and print what a source holds; returns how many digests were new to the store."""
    new_digests: set[str] = set()
    for item in found:
        new_digests.update(layer.digest for layer in await store.learn([item.layer], item.sighting))
    for item in found:
        layer = item.layer
        status = "new" if layer.digest in new_digests else "known"
        if as_json:
            print(json.dumps({**asdict(layer), "status": status, "source": source}))
        else:
            print(f"{status:<5} {layer.digest} {layer.media_type} {layer.size} {source}")
    return len(new_digests)


async def scan_registry(
    store: ForeignStore, args: argparse.Namespace, classifier: ForeignClassifier, access: RegistryAccess
) -> None:
    progress_file = state_dir() / f"scan-{parse_registry_root(args.scan).replace(':', '_')}.json"
    done = set() if args.restart else read_progress(progress_file)
    progress = ScanProgress(sys.stderr, already_done=len(done))
    async for result in scan(
        args.scan, classifier, access, patterns=tuple(args.repository), skip=frozenset(done),
        concurrency=max(1, args.concurrency),
    ):  # fmt: skip
        source = f"{args.scan.rstrip('/')}/{result.repository}"
        new = await record(store, result.found, source, args.json)
        progress.repository_done(result, new)
        if result.error is None:
            done.add(result.repository)
            write_progress(progress_file, done)
    progress.finish()
    if progress.failed:
        raise SourceError(f"{args.scan}: {progress.failed} repositories could not be read; run again to resume")
    progress_file.unlink(missing_ok=True)


def read_progress(path: Path) -> set[str]:
    try:
        return set(json.loads(path.read_text())["done"])
    except (OSError, ValueError, KeyError, TypeError):
        return set()


def write_progress(path: Path, done: set[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"done": sorted(done)}))
    temporary.replace(path)


class ScanProgress:
    """A progress bar on a terminal, one plain line per repository otherwise."""

    def __init__(self, stream: TextIO, already_done: int):
        self.stream = stream
        self.interactive = stream.isatty()
        self.scanned = already_done
        self.failed = 0
        self.learned = 0
        if already_done:
            print(f"resuming: {already_done} repositories already scanned", file=stream)

    def repository_done(self, result: ScannedRepository, new: int) -> None:
        self.scanned += 1
        self.learned += new
        self.failed += result.error is not None
        line = (
            f"{result.repository}: {result.manifests} manifests, {len(result.found)} foreign, {new} new"
            if result.error is None
            else f"{result.repository}: failed: {result.error}"
        )
        if self.interactive:
            self.stream.write(f"\r\033[K[{self.scanned} scanned, {self.learned} new] {line[:100]}")
        else:
            self.stream.write(f"scanned {line}\n")
        self.stream.flush()

    def finish(self) -> None:
        end = "\n" if self.interactive else ""
        self.stream.write(f"{end}scan done: {self.scanned} repositories, {self.learned} new foreign digests, "
                          f"{self.failed} failed\n")


def describe_reach(reach: Reach | None) -> str:
    """`everywhere`, or the namespaces where a digest is enforced, then `candidate:SCOPE` for those where
    it is only audited."""
    if reach is None:
        return "everywhere"
    names = {EVERYWHERE: "everywhere"}
    return ",".join([*(names.get(scope, scope) for scope in sorted(reach.enforced)),
                     *(f"candidate:{names.get(scope, scope)}" for scope in sorted(reach.candidate))])  # fmt: skip


def describe_teachings(teachings: Sequence[Teaching]) -> str:
    """Who taught a digest: `REPOSITORY (SOURCE, MANIFEST...)` or the operator source, e.g. `learn`."""
    shown = []
    for teaching in teachings:
        if teaching.repository is None:
            shown.append(teaching.source)
            continue
        manifest = f", {teaching.manifest_digest[:19]}" if teaching.manifest_digest else ""
        shown.append(f"{teaching.repository} ({teaching.source}{manifest})")
    return "; ".join(shown)


async def list_digests(store: ForeignStore, as_json: bool, candidates_only: bool = False) -> None:
    records = await store.records()
    if candidates_only:
        records = [record for record in records if (reach := record.reach) is not None and reach.candidate]
    if as_json:
        for record in records:
            reach = record.reach
            shown = asdict(record) | {
                "reach": None if reach is None else {"enforced": sorted(reach.enforced), "candidate": sorted(reach.candidate)}
            }
            print(json.dumps(shown, default=str))
        return
    print(f"{'DIGEST':<71} {'SIZE':>12} {'BLOCKED':>7}  {'REACH':<16}  MEDIA TYPE  TAUGHT BY")
    for record in records:
        blocked = sum(record.outcomes.get(outcome, 0) for outcome in BLOCKED_OUTCOMES)
        print(f"{record.layer.digest:<71} {record.layer.size:>12} {blocked:>7}  {describe_reach(record.reach):<16}  "
              f"{record.layer.media_type}  {describe_teachings(record.teachings)}")  # fmt: skip


async def list_repository_stats(store: ForeignStore, as_json: bool) -> None:
    stats = await store.repository_stats()
    if as_json:
        for repository in stats:
            print(json.dumps(asdict(repository)))
        return
    total = RepositoryStats(
        "TOTAL",
        {outcome: sum(repository.outcomes.get(outcome, 0) for repository in stats) for outcome in STATS_OUTCOMES},
        sum(repository.bytes_kept_out for repository in stats),
    )
    width = max([len("REPOSITORY"), *(len(repository.repository) for repository in stats)])
    print(f"{'REPOSITORY':<{width}}  {'  '.join(outcome.upper() for outcome in STATS_OUTCOMES)}  BYTES KEPT OUT")
    for repository in (*stats, total):
        counts = "  ".join(f"{repository.outcomes.get(outcome, 0):>{len(outcome)}}" for outcome in STATS_OUTCOMES)
        nbytes = repository.bytes_kept_out
        print(f"{repository.repository:<{width}}  {counts}  {human_bytes(nbytes):>10} ({nbytes})")


def human_bytes(nbytes: int) -> str:
    """In the largest binary unit that leaves at least 1, e.g. "1.5 KiB"; whole bytes below 1 KiB."""
    exponent = min((max(nbytes, 1).bit_length() - 1) // 10, len(BYTE_UNITS) - 1)
    return f"{nbytes} B" if exponent == 0 else f"{nbytes / 1024**exponent:.1f} {BYTE_UNITS[exponent]}"


def checked_digests(digests: Sequence[str]) -> Sequence[str]:
    malformed = [digest for digest in digests if not is_digest(digest)]
    if malformed:
        raise ConfigError(f"not a digest: {malformed[0]!r}")
    return digests


def parse_since(text: str, now: float) -> float:
    """A point in time: ISO 8601 (UTC unless it names a zone), or a duration ago (`90s`, `30m`, `2h`, `1d`)."""
    unit = DURATION_UNITS.get(text[-1:])
    if unit is not None and text[:-1].isdigit():
        return now - int(text[:-1]) * unit
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"--since: expected ISO 8601 (2024-05-01T12:00:00) or a duration (30m, 2h, 1d), got {text!r}") from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


async def forget(store: ForeignStore, args: argparse.Namespace) -> int:
    if args.taught_by is not None:
        if args.digests:
            raise ConfigError("forget takes DIGEST... or --taught-by REPOSITORY, not both")
        since = parse_since(args.since, time.time()) if args.since else None
        untaught = await store.untaught(args.taught_by, since)
        for digest in untaught.forgotten:
            print(f"{'forgotten':<9} {digest}")
        for digest in untaught.narrowed:
            print(f"{'narrowed':<9} {digest}")
        if not untaught.forgotten and not untaught.narrowed:
            print(f"nothing taught by {args.taught_by}", file=sys.stderr)
            return 1
        return 0
    if args.since:
        raise ConfigError("--since goes with --taught-by")
    if not args.digests:
        raise ConfigError("forget needs DIGEST... or --taught-by REPOSITORY")
    digests = checked_digests(args.digests)
    removed = await store.forget(digests)
    for digest in digests:
        print(f"{'forgotten' if digest in removed else 'unknown':<9} {digest}")
    return 0 if len(removed) == len(set(digests)) else 1


async def promote(store: ForeignStore, digests: Sequence[str]) -> int:
    """Candidates (and digests taught in some namespaces only) become enforced everywhere, taught by the operator."""
    wanted = set(checked_digests(digests))
    layers = [record.layer for record in await store.records() if record.layer.digest in wanted]
    await store.learn(layers, Sighting(PROMOTE_SOURCE))
    promoted = {layer.digest for layer in layers}
    for digest in digests:
        print(f"{'promoted' if digest in promoted else 'unknown':<9} {digest}")
    return 0 if promoted == wanted else 1


# Commands that only read the store: a mistyped path must be an error, not a new empty store.
READ_ONLY = frozenset({"digests", "forget", "promote", "backup", "export"})


def run_store_command(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    configure_logging(settings.log.level, settings.log.format, settings.log.access)
    return asyncio.run(store_command(settings, args))


async def store_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = open_store(settings.store.url, settings.store.tls)
    except ValueError as error:
        raise ConfigError(f"store.url: {error}") from None
    name = getattr(args, "store_command", None) or args.command
    if name in READ_ONLY and isinstance(store, SqliteStore) and not store.path.is_file():
        raise StoreError(f"no store at {store.path} (nothing was learned there yet; check --store or store.url)")
    try:
        if name == "learn":
            await learn(settings, args, store)
        elif name == "digests" and args.stats:
            await list_repository_stats(store, args.json)
        elif name == "digests":
            await list_digests(store, args.json, args.candidates)
        elif name == "forget":
            return await forget(store, args)
        elif name == "promote":
            return await promote(store, args.digests)
        elif name == "backup":
            await backup(store, args.path)
        elif name == "export":
            for line in await export_lines(store):
                print(line)
        else:
            await import_lines(store, args.file)
        return 0
    finally:
        await store.close()


async def backup(store: ForeignStore, path: Path) -> None:
    if path.exists():
        raise ConfigError(f"{path} exists: back up to a new file")
    if isinstance(store, SqliteStore):
        await store.backup(path)
        print(f"backed up {store.path} to {path} (SQLite)")
        return
    lines = await export_lines(store)
    path.write_text("".join(f"{line}\n" for line in lines))
    print(f"backed up {len(lines) - 1} records to {path} (JSON lines; restore with `store import`)")


async def import_lines(store: ForeignStore, source: Path | None) -> None:
    try:
        text = sys.stdin.read() if source is None or str(source) == "-" else source.read_text()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read: {error.strerror}") from None
    records, repositories = parse_lines(text.splitlines())
    await store.restore(records, repositories)
    print(f"imported {len(records)} foreign digests and the counts of {len(repositories)} repositories",
          file=sys.stderr)


def fastest_event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the `speed` extra): the gateway's copy loops spend less time in the event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    """Exit status: 0 done, 1 a runtime failure, 2 a usage or configuration error (argparse's own too)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a worker of `server.workers` runs again
    try:
        run: Callable[[argparse.Namespace], int] = args.run
        return run(args)
    except ConfigError as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (SourceError, StoreError, TransferError, ServeError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
