"""Shared services for replica tests: a real redis-server and haproxy, on free local ports, stopped by PID."""

from __future__ import annotations

import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, Self

import redis

from .processes import ManagedProcess, Service, free_port, run_checked

HOST = "127.0.0.1"


class RedisServer:
    """An in-memory redis-server: `stop()` then `start()` gives a fresh, empty server on the same port,
    as a failover to a replica that had nothing would. With `certificate` (chain and key PEM files)
    it speaks only TLS; with `client_ca` too, it admits only clients with a certificate that CA signed."""

    def __init__(
        self, workdir: Path, *, password: str | None = None, certificate: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> None:  # fmt: skip
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.tls = certificate is not None
        command = [
            "redis-server", "--bind", HOST, "--dir", str(workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no",
        ]  # fmt: skip
        if password is not None:
            command += ["--requirepass", password]
        if certificate is None:
            command += ["--port", str(self.port)]
        else:
            chain, key = certificate
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(chain),
                        "--tls-key-file", str(key)]  # fmt: skip
            command += ["--tls-auth-clients", "no"] if client_ca is None else [
                "--tls-auth-clients", "yes", "--tls-ca-cert-file", str(client_ca)
            ]
        self.process = ManagedProcess(command, log_path=workdir / "redis.log")

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    def url(self, db: int = 0) -> str:
        credentials = f":{self.password}@" if self.password is not None else ""
        return f"{'rediss' if self.tls else 'redis'}://{credentials}{self.host_port}/{db}"

    def start(self) -> Self:
        self.process.start()
        self.process.wait_for_port(HOST, self.port)
        return self

    def stop(self) -> None:
        if self.process.running:
            os.kill(self.process.pid, signal.SIGCONT)  # a paused server would not act on SIGTERM
        self.process.stop()

    def pause(self) -> None:
        """Freeze the server: connections are still accepted by the kernel, but nothing answers."""
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self, db: int = 0) -> redis.Redis:
        """A client for setting up tests (it does not check the TLS certificate)."""
        return redis.Redis(
            HOST, self.port, db=db, password=self.password, decode_responses=True, socket_timeout=10,
            ssl=self.tls, ssl_cert_reqs="none",
        )  # fmt: skip

    def flush(self, db: int = 0) -> None:
        with self.client(db) as client:
            client.flushdb()


HAPROXY_CONFIG = """\
global
    maxconn 256

defaults
    mode http
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    # A new server connection per request, so that consecutive requests of one client really are
    # balanced over the replicas (upload sessions included).
    option http-server-close
    http-reuse never

frontend registry
    bind {listen}
    default_backend gateways

backend gateways
    balance roundrobin
{servers}
"""


class ConfiguredHaproxy(Service):
    """haproxy running a whole config written by the test (its own listener on `port`)."""

    def __init__(self, workdir: Path, config: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(config)
        self.process = ManagedProcess(["haproxy", "-db", "-f", self.config_path], log_path=workdir / "haproxy.log")

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def start(self) -> Self:
        run_checked(["haproxy", "-c", "-q", "-f", self.config_path], timeout=30)
        self.process.start()
        self.process.wait_for_port(HOST, self.port)
        return self

    def stop(self) -> None:
        self.process.stop()


class Haproxy(ConfiguredHaproxy):
    """haproxy balancing HTTP requests round-robin over `backends` ("host:port")."""

    def __init__(self, workdir: Path, backends: Sequence[str]) -> None:
        port = free_port()
        servers = "\n".join(f"    server replica{n} {backend}" for n, backend in enumerate(backends))
        super().__init__(workdir, HAPROXY_CONFIG.format(listen=f"{HOST}:{port}", servers=servers), port)


NGINX_MAIN_CONFIG = """\
{user}worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {workdir}/access.log;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    include {site};
}}
"""


class Nginx(Service):
    """nginx with one worker serving `site` (a conf.d-style file: upstream and server blocks) on `port`."""

    def __init__(self, workdir: Path, site: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        site_path = workdir / "site.conf"
        site_path.write_text(site)
        self.config_path = workdir / "nginx.conf"
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.config_path.write_text(NGINX_MAIN_CONFIG.format(user=user, workdir=workdir, site=site_path))
        command: list[str | Path] = ["nginx", "-c", self.config_path, "-p", workdir, "-e", workdir / "nginx-error.log"]
        self.check = [*command, "-t", "-q"]
        self.process = ManagedProcess(command, log_path=workdir / "nginx.log")

    def start(self) -> Self:
        run_checked(self.check, timeout=30)
        self.process.start()
        self.process.wait_for_port(HOST, self.port)
        return self

    def stop(self) -> None:
        self.process.stop()

    def error_log(self) -> str:
        path = self.workdir / "nginx-error.log"
        return path.read_text(errors="replace") if path.exists() else ""


class RedisFactory(Protocol):
    def __call__(
        self, *, password: str | None = None, certificate: tuple[Path, Path] | None = None,
        client_ca: Path | None = None,
    ) -> RedisServer: ...


class HaproxyFactory(Protocol):
    def __call__(self, backends: Sequence[str]) -> Haproxy: ...
