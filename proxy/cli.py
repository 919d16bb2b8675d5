"""Command line: serve, learn, digests, forget."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from aiohttp import web

from proxy.admin import create_admin_app
from proxy.app import (
    GATEWAY,
    IN_FLIGHT,
    KNOWN,
    SETTINGS,
    create_app,
    read_digest_files,
    runner_for,
    server_ssl_context,
)
from proxy.config import Address, ConfigError, Settings, load_settings
from proxy.logs import configure_logging, log_event
from proxy.manifests import ForeignClassifier, is_digest
from proxy.policy import Action
from proxy.registry_client import RegistryAccess
from proxy.sources import SourceError, collect
from proxy.store import ForeignStore, StoreError, open_store

logger = logging.getLogger("foreign_layer_proxy")
PROGRAM = "foreign-layer-proxy"


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
    learn.add_argument("sources", nargs="+", metavar="SOURCE",
                       help="manifest file, dir:PATH, oci:PATH, or docker://HOST/REPO:TAG|@DIGEST")
    learn.add_argument("--insecure", action="store_true", help="plain HTTP or unverified TLS to the registry")
    learn.add_argument("--ca-file", type=Path, help="CA bundle for the registry's certificate")
    learn.add_argument("--username")
    learn.add_argument("--password")
    learn.add_argument("--json", action="store_true", help="print what was learned as JSON lines")

    digests = commands.add_parser("digests", help="list the known foreign layers")
    _store_options(digests)
    digests.add_argument("--json", action="store_true", help="one JSON object per digest")

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


async def start_site(runner: web.AppRunner, address: Address, setting: str, context: ssl.SSLContext | None = None) -> None:
    await runner.setup()
    try:
        await web.TCPSite(runner, address.host, address.port, ssl_context=context, reuse_address=True).start()
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
    app = create_app(settings)
    runner = runner_for(app, settings)
    await start_site(runner, settings.server.listen, "server.listen", server_ssl_context(settings))
    admin_runner = web.AppRunner(create_admin_app(app), access_log=None, handle_signals=False)
    try:
        await start_site(admin_runner, settings.admin.listen, "admin.listen")
    except ConfigError:
        await runner.cleanup()
        raise
    log_event(logger, logging.INFO, "listening", address=str(settings.server.listen), admin=str(settings.admin.listen),
              upstream=str(settings.upstream.url), tls=settings.server.tls_cert is not None)
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
    classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)
    try:
        access = RegistryAccess.from_environment(
            os.environ, insecure=args.insecure, ca_file=args.ca_file, username=args.username, password=args.password
        )
    except ValueError as error:
        raise ConfigError(f"REGISTRY_AUTH: {error}") from None
    for source in args.sources:
        found = await collect(source, classifier, access)
        new_digests: set[str] = set()
        for item in found:
            new_digests.update(layer.digest for layer in await store.learn([item.layer], item.sighting))
        for item in found:
            layer = item.layer
            status = "new" if layer.digest in new_digests else "known"
            if args.json:
                print(json.dumps({**asdict(layer), "status": status, "source": source}))
            else:
                print(f"{status:<5} {layer.digest} {layer.media_type} {layer.size} {source}")
        if not found:
            print(f"no foreign layers in {source}", file=sys.stderr)


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
            await list_digests(store, args.json)
        else:
            return await forget(store, args.digests)
        return 0
    finally:
        await store.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
        configure_logging(settings.log.level, settings.log.format)
        if args.command == "serve":
            asyncio.run(serve(lambda: settings_from(args)))
            return 0
        return asyncio.run(run_store_command(settings, args))
    except (ConfigError, SourceError, StoreError) as error:
        print(f"{PROGRAM}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
