"""A real CNCF distribution registry (`docker-registry`) on a free local port."""

from __future__ import annotations

import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .processes import ManagedProcess, Service, free_port, run_checked

HOST = "127.0.0.1"


@dataclass(frozen=True)
class TokenAuth:
    """`auth: token`: clients get bearer tokens from `realm`, signed by a key whose certificate is `rootcertbundle`."""

    realm: str
    rootcertbundle: Path
    service: str = "test-registry"
    issuer: str = "test-issuer"


@dataclass(frozen=True)
class RegistryConfig:
    allow_foreign_urls: bool = True
    htpasswd: Path | None = None
    token_auth: TokenAuth | None = None

    def __post_init__(self) -> None:
        if self.htpasswd and self.token_auth:
            raise ValueError("a registry has one `auth`: htpasswd or token, not both")
    tls_cert: Path | None = None
    tls_key: Path | None = None


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    result = run_checked(["htpasswd", "-Bbn", user, password], timeout=30)
    path.write_text(result.stdout)
    return path


class Registry(Service):
    """`start()` after `stop()` reuses the same port and storage."""

    def __init__(
        self, workdir: Path, config: RegistryConfig = RegistryConfig()
    ) -> None:
        self.workdir = workdir
        self.config = config
        self.port = free_port()
        self.root = workdir / "storage"
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "config.yml"
        self.config_path.write_text(yaml.safe_dump(self._config_document()))
        self.process = ManagedProcess(
            ["docker-registry", "serve", self.config_path],
            log_path=workdir / "registry.log",
        )

    @property
    def host_port(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def url(self) -> str:
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{self.host_port}"

    def blob_data_path(self, digest: str) -> Path:
        algorithm, hex_digest = digest.split(":", 1)
        return (
            self.root
            / "docker/registry/v2/blobs"
            / algorithm
            / hex_digest[:2]
            / hex_digest
            / "data"
        )

    def layer_link_path(self, repository: str, digest: str) -> Path:
        """The link that makes a blob part of a repository (written by a commit or a mount)."""
        algorithm, hex_digest = digest.split(":", 1)
        return self.root / "docker/registry/v2/repositories" / repository / "_layers" / algorithm / hex_digest / "link"

    def committed(self, repository: str, digest: str) -> bool:
        """Whether the storage holds the blob's data or links it into the repository."""
        return self.blob_data_path(digest).exists() or self.layer_link_path(repository, digest).exists()

    def links(self, repository: str, digest: str) -> bool:
        return self.layer_link_path(repository, digest).exists()

    def start(self, timeout: float = 30.0) -> None:
        self.process.start()
        self.process.wait_until(self._answers, timeout=timeout, what="answer on /v2/")

    def stop(self) -> None:
        self.process.stop()

    def log_text(self) -> str:
        return self.process.log_text()

    def _answers(self) -> bool:
        # Only liveness is probed here, so the certificate is not checked.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(f"{self.url}/v2/", timeout=2, context=context):
                return True
        except urllib.error.HTTPError as error:
            return error.code == 401
        except OSError:
            return False

    def _config_document(self) -> dict[str, Any]:
        http: dict[str, Any] = {"addr": self.host_port}
        if self.config.tls_cert or self.config.tls_key:
            http["tls"] = {
                "certificate": str(self.config.tls_cert),
                "key": str(self.config.tls_key),
            }
        document: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
            },
            "http": http,
        }
        if self.config.allow_foreign_urls:
            document["validation"] = {"manifests": {"urls": {"allow": ["^https?://"]}}}
        if self.config.htpasswd:
            document["auth"] = {
                "htpasswd": {"realm": "registry", "path": str(self.config.htpasswd)}
            }
        if self.config.token_auth:
            token = self.config.token_auth
            document["auth"] = {
                "token": {
                    "realm": token.realm,
                    "service": token.service,
                    "issuer": token.issuer,
                    "rootcertbundle": str(token.rootcertbundle),
                }
            }
        return document


RegistryFactory = Callable[[RegistryConfig], Registry]
