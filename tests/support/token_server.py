"""A tiny real token server for a registry with `auth: token` (docker's token authentication).

Run as `python -m support.token_server` by `TokenServer`: it checks basic-auth credentials, grants the
requested repository actions to known users and signs RS256 JWTs that distribution 2.8 accepts (`kid` is the
libtrust key ID of the signing key, whose certificate is the registry's `rootcertbundle`). Every token request
is appended to a JSON-lines record for tests to inspect.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime
import hashlib
import json
import re
import secrets
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from yarl import URL

from .processes import ManagedProcess, Service, free_port

HOST = "127.0.0.1"
SERVICE = "test-registry"
ISSUER = "test-issuer"
TOKEN_LIFETIME = 300
GRANTABLE = frozenset({"pull", "push", "delete", "*"})
CHALLENGE_PARAMETER = re.compile(r'(\w+)="([^"]*)"')


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def libtrust_key_id(public_key: rsa.RSAPublicKey) -> str:
    """docker/libtrust's key ID: base32 of the first 30 bytes of SHA-256 of the DER SubjectPublicKeyInfo."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[index : index + 4] for index in range(0, len(encoded), 4))


def write_signing_key(key_path: Path, cert_path: Path) -> None:
    """An RSA 2048 key and its self-signed certificate (the registry's `rootcertbundle`)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def parse_scope(scope: str) -> tuple[str, str, list[str]] | None:
    """`repository:NAME:pull,push` as (type, name, actions); NAME may hold ':' (a registry host with a port)."""
    kind, _, rest = scope.partition(":")
    name, separator, actions = rest.rpartition(":")
    if not kind or not separator or not name:
        return None
    return kind, name, [action for action in actions.split(",") if action]


@dataclass(frozen=True)
class Signer:
    key: rsa.RSAPrivateKey
    service: str
    issuer: str

    @property
    def key_id(self) -> str:
        return libtrust_key_id(self.key.public_key())

    def token(self, subject: str, access: Sequence[Mapping[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "kid": self.key_id}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": list(access),
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"


def _basic_user(header: str, users: Mapping[str, str]) -> str | None:
    """The user named by a valid `Authorization: Basic` header, else None."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, separator, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not separator or user not in users or not secrets.compare_digest(users[user], password):
        return None
    return user


def make_app(signer: Signer, users: Mapping[str, str], record: Path) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization")
        user = _basic_user(authorization, users) if authorization else None
        scopes = [scope for value in request.query.getall("scope", []) for scope in value.split(" ") if scope]
        with record.open("a") as file:
            entry = {
                "user": user,
                "authenticated": authorization is not None,
                "service": request.query.get("service"),
                "scopes": scopes,
            }
            file.write(json.dumps(entry) + "\n")
        if authorization is not None and user is None:
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="token"'},
            )
        if request.query.get("service", signer.service) != signer.service:
            return web.json_response({"errors": [{"code": "DENIED", "message": "unknown service"}]}, status=400)
        access = []
        for scope in scopes:
            parsed = parse_scope(scope)
            if parsed is None or user is None:  # anonymous users get a token without access
                continue
            kind, name, actions = parsed
            granted = [action for action in actions if action in GRANTABLE]
            if granted:
                access.append({"type": kind, "name": name, "actions": granted})
        issued = signer.token(user or "", access)
        now = datetime.datetime.now(datetime.UTC).isoformat()
        return web.json_response(
            {"token": issued, "access_token": issued, "expires_in": TOKEN_LIFETIME, "issued_at": now}
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/token", token)
    app.router.add_get("/health", health)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--service", default=SERVICE)
    parser.add_argument("--issuer", default=ISSUER)
    parser.add_argument("--user", action="append", default=[], help="USER:PASSWORD, repeatable")
    options = parser.parse_args(argv)
    key = serialization.load_pem_private_key(options.key.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit("the signing key must be RSA")
    users = dict(pair.split(":", 1) for pair in options.user)
    app = make_app(Signer(key, options.service, options.issuer), users, options.record)
    web.run_app(app, host=HOST, port=options.port, print=None, handle_signals=True)


async def challenged_token(
    session: aiohttp.ClientSession, method: str, url: str, user: str, password: str
) -> str:
    """The token dance of a registry client: the request's 401 Bearer challenge, then GET realm?service&scope."""
    async with session.request(method, url, allow_redirects=False) as response:
        challenge = response.headers.get("WWW-Authenticate", "")
        status = response.status
    scheme, _, rest = challenge.partition(" ")
    if status != 401 or scheme.lower() != "bearer":
        raise AssertionError(f"{method} {url}: expected a 401 Bearer challenge, got {status} {challenge!r}")
    parameters = dict(CHALLENGE_PARAMETER.findall(rest))
    query = {key: parameters[key] for key in ("service", "scope") if key in parameters}
    headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
    async with session.get(URL(parameters["realm"]).with_query(query), headers=headers) as response:
        assert response.status == 200, f"token request: {response.status} {await response.text()}"
        token: str = (await response.json())["token"]
    return token


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except OSError:
        return False


class TokenServer(Service):
    """The token server in a child process; `users` maps user names to passwords."""

    def __init__(
        self, workdir: Path, users: Mapping[str, str], *, service: str = SERVICE, issuer: str = ISSUER
    ) -> None:
        self.workdir = workdir
        self.service = service
        self.issuer = issuer
        self.port = free_port()
        self.key_path = workdir / "token-signer.key"
        self.cert_path = workdir / "token-signer.pem"
        self.record_path = workdir / "token-requests.jsonl"
        write_signing_key(self.key_path, self.cert_path)
        command: list[str | Path] = [
            sys.executable, "-m", "support.token_server", "--port", str(self.port), "--key", self.key_path,
            "--record", self.record_path, "--service", service, "--issuer", issuer,
        ]  # fmt: skip
        for user, password in users.items():
            command += ["--user", f"{user}:{password}"]
        self.process = ManagedProcess(
            command, log_path=workdir / "token-server.log", env={"PYTHONPATH": str(Path(__file__).parent.parent)}
        )

    @property
    def realm(self) -> str:
        return f"http://{HOST}:{self.port}/token"

    def start(self, timeout: float = 30.0) -> TokenServer:
        self.process.start()
        url = f"http://{HOST}:{self.port}/health"
        self.process.wait_until(lambda: _answers(url), timeout=timeout, what="answer on /health")
        return self

    def stop(self) -> None:
        self.process.stop()

    def requests(self) -> list[dict[str, Any]]:
        """Every token request so far: {"user", "authenticated", "service", "scopes"}."""
        if not self.record_path.exists():
            return []
        return [json.loads(line) for line in self.record_path.read_text().splitlines() if line]

    def log_text(self) -> str:
        return self.process.log_text()


if __name__ == "__main__":
    main(sys.argv[1:])
