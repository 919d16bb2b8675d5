"""Command line: serve, learn, digests, forget."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from aiohttp import web

from proxy.admin import create_admin_app
from proxy.app import (
    CONNECTIONS,
    GATEWAY,
    IN_FLIGHT,
    KNOWN,
    SETTINGS,
    create_app,
    read_digest_files,
    runner_for,
    server_ssl_context,
)
from proxy.config import Address, ConfigError, Settings, load_settings, state_dir
from proxy.limits import BudgetedSite, raise_open_file_limit
from proxy.logs import configure_logging, log_event
from proxy.manifests import ForeignClassifier, is_digest
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
from proxy.store import ForeignStore, RepositoryStats, StoreError, open_store

logger = logging.getLogger("foreign_layer_proxy")
SiteFactory = Callable[[web.AppRunner, str, int], web.BaseSite]
PROGRAM = "foreign-layer-proxy"
STATS_OUTCOMES = ("dropped", "rejected", "leaked", "audited")
BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def _store_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="YAML configuration file")
    parser.add_argument("--store", help="store URL: sqlite:///PATH (default), memory://, redis://HOST:PORT/DB")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="Registry gateway that keeps foreign layers out.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway in front of a registry")
    _store_options(serve)
    serve.add_argument("--upstream", help="the registry's URL, e.g. http://127.0.0.1:5001")
    serve.add_argument("--listen", help="HOST:PORT for registry clients (default 0.0.0.0:5000)")
    serve.add_argument("--admin-listen", help="HOST:PORT for metrics and health (default 127.0.0.1:9090)")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="the certificate's private key (PEM)")
    serve.add_argument("--upstream-ca", help="CA bundle that signed the upstream's certificate")
    serve.add_argument("--upstream-insecure", action="store_const", const=True,
                       help="do not verify the upstream's TLS certificate")
    serve.add_argument("--action", choices=[action.value for action in Action],
                       help="policy.default: what to do with a push of a known foreign layer")
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    learn = commands.add_parser("learn", help="record the foreign layers of images")
    _store_options(learn)
    learn.add_argument("sources", nargs="*", metavar="SOURCE",
                       help="manifest file, dir:PATH, oci:PATH, or docker://HOST/REPO:TAG|@DIGEST")
    learn.add_argument("--scan", metavar="docker://HOST[:PORT]/",
                       help="walk a registry's catalog, every tag of every repository (resumable)")
    learn.add_argument("--repository", action="append", default=[], metavar="GLOB",
                       help="with --scan: only repositories matching GLOB (repeatable; ** crosses /)")
    learn.add_argument("--concurrency", type=int, default=4, help="with --scan: repositories scanned at once")
    learn.add_argument("--restart", action="store_true", help="with --scan: ignore the progress of an earlier run")
    learn.add_argument("--insecure", action="store_true", help="plain HTTP or unverified TLS to the registry")
    learn.add_argument("--ca-file", type=Path, help="CA bundle for the registry's certificate")
    learn.add_argument("--username")
    learn.add_argument("--password")
    learn.add_argument("--json", action="store_true", help="print what was learned as JSON lines")

    digests = commands.add_parser("digests", help="list the known foreign layers")
    _store_options(digests)
    digests.add_argument("--stats", action="store_true",
                         help="per repository: how often pushes were dropped, rejected, leaked or audited, "
                              "and the bytes kept out of the registry")
    digests.add_argument("--json", action="store_true", help="one JSON object per digest (per repository with --stats)")

    forget = commands.add_parser("forget", help="remove digests from the store")
    _store_options(forget)
    forget.add_argument("digests", nargs="+", metavar="DIGEST")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    overrides = {"store.url": args.store}
    if args.command == "serve":
        overrides |= {
            "upstream.url": args.upstream,
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
    return load_settings(args.config, overrides)


async def start_site(runner: web.AppRunner, address: Address, setting: str, make_site: SiteFactory = web.TCPSite) -> None:
    await runner.setup()
    try:
        await make_site(runner, address.host, address.port).start()
    except OSError as error:
        await runner.cleanup()
        raise ConfigError(f"{setting}: cannot listen on {address}: {error.strerror}") from None


def reload(app: web.Application, load: Callable[[], Settings]) -> None:
    """SIGHUP: new policy, foreign-layer and log settings for the next request; a bad config changes nothing."""
    try:
        settings = load()
        static = read_digest_files(settings.foreign.digest_files)
    except ConfigError as error:
        log_event(logger, logging.ERROR, "reload_refused", error=str(error))
        return
    running = app[SETTINGS]
    if (settings.server, settings.upstream, settings.admin, settings.store) != (
        running.server, running.upstream, running.admin, running.store
    ):
        log_event(logger, logging.WARNING, "reload_partial", note="server, upstream, admin and store settings apply at restart")
    configure_logging(settings.log.level, settings.log.format)
    app[GATEWAY].reconfigure(settings)
    app[KNOWN].replace_static(static)
    log_event(logger, logging.INFO, "reloaded", rules=len(settings.policy.rules), default=settings.policy.default.value)


async def serve(load: Callable[[], Settings]) -> None:
    settings = load()
    open_files = raise_open_file_limit()
    app = create_app(settings)
    runner = runner_for(app, settings)
    context = server_ssl_context(settings)
    await start_site(runner, settings.server.listen, "server.listen",
                     lambda runner, host, port: BudgetedSite(runner, host, port, app[CONNECTIONS], ssl_context=context))
    admin_runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
    try:
        await start_site(admin_runner, settings.admin.listen, "admin.listen")
    except ConfigError:
        await runner.cleanup()
        raise
    log_event(logger, logging.INFO, "listening", address=str(settings.server.listen), admin=str(settings.admin.listen),
              upstream=str(settings.upstream.url), tls=settings.server.tls_cert is not None, open_files=open_files,
              max_connections=settings.server.max_connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload, app, load)
    await stop.wait()
    in_flight = app[IN_FLIGHT]
    log_event(logger, logging.INFO, "stopping", in_flight=in_flight.count, grace_seconds=settings.server.shutdown_timeout)
    for site in list(runner.sites):
        await site.stop()
    in_flight.draining = True
    if not await in_flight.wait_idle(settings.server.shutdown_timeout):
        log_event(logger, logging.WARNING, "shutdown_timeout", cut_requests=in_flight.count)
    await admin_runner.cleanup()
    await runner.cleanup()


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


async def list_digests(store: ForeignStore, as_json: bool) -> None:
    records = await store.records()
    if as_json:
        for record in records:
            print(json.dumps(asdict(record), default=str))
        return
    print(f"{'DIGEST':<71} {'SIZE':>12} {'BLOCKED':>7}  MEDIA TYPE / FIRST SEEN IN")
    for record in records:
        blocked = sum(record.outcomes.values())
        seen_in = record.first_sighting.repository or record.first_sighting.source
        print(f"{record.layer.digest:<71} {record.layer.size:>12} {blocked:>7}  {record.layer.media_type} / {seen_in}")


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


async def forget(store: ForeignStore, digests: Sequence[str]) -> int:
    malformed = [digest for digest in digests if not is_digest(digest)]
    if malformed:
        raise ConfigError(f"not a digest: {malformed[0]!r}")
    removed = await store.forget(digests)
    for digest in digests:
        print(f"{'forgotten' if digest in removed else 'unknown':<9} {digest}")
    return 0 if len(removed) == len(set(digests)) else 1


async def run_store_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        store = open_store(settings.store.url)
    except ValueError as error:
        raise ConfigError(f"store.url: {error}") from None
    try:
        if args.command == "learn":
            await learn(settings, args, store)
        elif args.command == "digests":
            await (list_repository_stats if args.stats else list_digests)(store, args.json)
        else:
            return await forget(store, args.digests)
        return 0
    finally:
        await store.close()


def fastest_event_loop() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the `speed` extra): the gateway's copy loops spend less time in the event loop."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        configure_logging(settings.log.level, settings.log.format)
        if args.command == "serve":
            with asyncio.Runner(loop_factory=fastest_event_loop()) as runner:
                runner.run(serve(lambda: settings_from(args)))
            return 0
        return asyncio.run(run_store_command(settings, args))
    except (ConfigError, SourceError, StoreError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
