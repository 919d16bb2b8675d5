"""A small client for the registry HTTP API v2, for the CLI: manifests, configs, catalog, tags, blob deletion.

Every aiohttp and OS error is turned into a RegistryError here, with a one-line message naming the URL.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp
from yarl import URL

from proxy.forwarding import client_ssl_context, read_capped
from proxy.manifests import (
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    MAX_MANIFEST_BYTES,
    OCI_INDEX,
    OCI_MANIFEST,
    is_digest,
    sha256_digest,
)

REGISTRY_AUTH_VARIABLE = "REGISTRY_AUTH"
MANIFEST_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}, {DOCKER_MANIFEST_LIST}, {DOCKER_MANIFEST}"
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=30, sock_read=60)
MAX_SMALL_RESPONSE_BYTES = 4 * 1024 * 1024
MAX_DETAIL_CHARACTERS = 200

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_NAME = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
TAG = re.compile(r"\w[\w.-]{0,127}", re.ASCII)
CHALLENGE_PARAMETER = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


class RegistryError(Exception):
    """A registry request failed; the one-line message names the URL and never carries credentials."""


def is_repository_name(value: str) -> bool:
    return REPOSITORY_NAME.fullmatch(value) is not None


def is_tag(value: str) -> bool:
    return TAG.fullmatch(value) is not None


def matches_digest(data: bytes, digest: str) -> bool:
    algorithm, _, encoded = digest.partition(":")
    return is_digest(digest) and hashlib.new(algorithm, data).hexdigest() == encoded


@dataclass(frozen=True, slots=True)
class RegistryAccess:
    insecure: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    bearer_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str],
        *,
        insecure: bool = False,
        ca_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        bearer_token: str | None = None,
    ) -> RegistryAccess:
        """Explicit credentials win; otherwise REGISTRY_AUTH, docker's config.json `auth` or a plain user:password.

        Raises ValueError (without the value) when REGISTRY_AUTH is neither.
        """
        if username is None and password is None:
            username, password = _credentials(environ.get(REGISTRY_AUTH_VARIABLE, "").strip())
        return cls(insecure, ca_file, username, password, bearer_token)

    def __post_init__(self) -> None:
        if self.username is not None and ":" in self.username:
            raise ValueError("a registry username cannot contain ':'")

    @property
    def basic_authorization(self) -> str | None:
        """The `Authorization` value for HTTP basic authentication, if there are credentials."""
        return (
            None if self.username is None else aiohttp.encode_basic_auth(self.username, self.password or "")
        )

    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.ca_file, self.insecure)


def _credentials(value: str) -> tuple[str | None, str | None]:
    if not value:
        return None, None
    if ":" not in value:
        try:
            value = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            value = ""
    username, separator, password = value.partition(":")
    if not separator or not username:
        raise ValueError(
            f"{REGISTRY_AUTH_VARIABLE} must be base64 of user:password (docker's config.json `auth`) or user:password"
        )
    return username, password


@dataclass(frozen=True, slots=True)
class FetchedManifest:
    body: bytes
    content_type: str
    digest: str


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    parameters: Mapping[str, str]


def parse_challenges(headers: Sequence[str]) -> list[Challenge]:
    """`WWW-Authenticate` values, one challenge per header (as registries send them)."""
    challenges = []
    for header in headers:
        scheme, _, rest = header.strip().partition(" ")
        parameters = {
            match[1].lower(): match[2] if match[2] is not None else match[3]
            for match in CHALLENGE_PARAMETER.finditer(rest)
        }
        challenges.append(Challenge(scheme.lower(), parameters))
    return challenges


def _shown(url: URL) -> str:
    # Queries are left out: a redirected blob URL may carry a signature.
    return str(url.with_user(None).with_query(None).with_fragment(None))


def _one_line(text: str) -> str:
    return " ".join(text.split())[:MAX_DETAIL_CHARACTERS]


def _describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError) and not str(error):
        return "timed out"
    return _one_line(str(error)) or error.__class__.__name__


@contextmanager
def _translated_errors(method: str, url: URL) -> Iterator[None]:
    try:
        yield
    except (aiohttp.ClientError, OSError) as error:
        raise RegistryError(f"{method} {_shown(url)}: {_describe(error)}") from error


async def _unexpected_status(response: aiohttp.ClientResponse) -> RegistryError:
    body = await read_capped(response.content, MAX_SMALL_RESPONSE_BYTES) or b""
    detail = ""
    try:
        first_error = json.loads(body)["errors"][0]
        code, message = first_error["code"], first_error["message"]
        detail = f" ({_one_line(f'{code}: {message}')})"
    except (ValueError, LookupError, TypeError):
        pass
    return RegistryError(
        f"{response.method} {_shown(response.url)}: {response.status} {response.reason}{detail}"
    )


async def _read_small(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    if response.status != 200:
        raise await _unexpected_status(response)
    body = await read_capped(response.content, limit)
    if body is None:
        raise RegistryError(f"{response.method} {_shown(response.url)}: {what} larger than {limit} bytes")
    return body


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class RegistryClient:
    """One registry's API v2 through one session. Bearer tokens are fetched on demand and cached per scope."""

    def __init__(self, base_url: URL, access: RegistryAccess) -> None:
        self.base_url = base_url
        self._access = access
        self._session: aiohttp.ClientSession | None = None
        self._tokens: dict[str, str] = {}
        self._basic_challenged = False

    async def __aenter__(self) -> Self:
        try:
            ssl_context = self._access.ssl_context()
        except OSError as error:
            raise RegistryError(f"CA file {self._access.ca_file}: {_describe(error)}") from error
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ssl_context),
            timeout=REQUEST_TIMEOUT,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def ping(self) -> int:
        """The status of `GET /v2/`, unauthenticated: any status shows the registry answers on this scheme."""
        url = self.base_url / "v2/"
        with _translated_errors("GET", url):
            async with self._require_session().get(url, allow_redirects=False) as response:
                return response.status

    async def get_manifest(self, repository: str, reference: str) -> FetchedManifest:
        """A manifest by tag or digest; a body that does not match a requested digest is an error."""
        if not (is_tag(reference) or is_digest(reference)):
            raise ValueError(f"invalid manifest reference {reference!r}")
        url = self._repository_url(repository, "manifests", reference)
        headers = {"Accept": MANIFEST_ACCEPT}
        async with self._open("GET", url, _pull_scope(repository), headers=headers) as response:
            body = await _read_small(response, MAX_MANIFEST_BYTES, "manifest")
            content_type = response.content_type
        if is_digest(reference) and not matches_digest(body, reference):
            raise RegistryError(f"GET {_shown(url)}: the manifest does not match its digest")
        return FetchedManifest(body, content_type, sha256_digest(body))

    async def get_blob(self, repository: str, digest: str, limit: int) -> bytes:
        """A small blob (an image config), following the registry's redirects; checked against its digest."""
        url = self._blob_url(repository, digest)
        async with self._open("GET", url, _pull_scope(repository), follow_redirects=True) as response:
            body = await _read_small(response, limit, "blob")
        if not matches_digest(body, digest):
            raise RegistryError(f"GET {_shown(url)}: the blob does not match its digest")
        return body

    async def delete_blob(self, repository: str, digest: str) -> int:
        url = self._blob_url(repository, digest)
        async with self._open("DELETE", url, f"repository:{repository}:delete") as response:
            return response.status

    def catalog(self, page_size: int) -> AsyncIterator[str]:
        url = (self.base_url / "v2/_catalog").with_query(n=page_size)
        return self._listing(url, "registry:catalog:*", "repositories")

    def tags(self, repository: str) -> AsyncIterator[str]:
        return self._listing(
            self._repository_url(repository, "tags", "list"), _pull_scope(repository), "tags"
        )

    async def _listing(self, url: URL, scope: str, key: str) -> AsyncIterator[str]:
        """The names of every page, following `Link: <...>; rel="next"` within this registry."""
        page_url: URL | None = url
        while page_url is not None:
            async with self._open("GET", page_url, scope) as response:
                body = await _read_small(response, MAX_SMALL_RESPONSE_BYTES, "listing")
                next_link = response.links.get("next")
            try:
                names = json.loads(body)[key] or []
            except (ValueError, LookupError, TypeError):
                names = None
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise RegistryError(f"GET {_shown(page_url)}: no list of {key} in the answer")
            for name in names:
                yield name
            page_url = self._next_page(page_url, next_link)

    def _next_page(self, page_url: URL, next_link: Mapping[str, str | URL] | None) -> URL | None:
        if next_link is None:
            return None
        next_url = URL(next_link["url"])
        if next_url.origin() != self.base_url.origin():
            raise RegistryError(f"GET {_shown(page_url)}: the next page is on another server")
        return None if next_url == page_url else next_url

    def _repository_url(self, repository: str, *rest: str) -> URL:
        if not is_repository_name(repository):
            raise ValueError(f"invalid repository name {repository!r}")
        return self.base_url.joinpath("v2", repository, *rest)

    def _blob_url(self, repository: str, digest: str) -> URL:
        if not is_digest(digest):
            raise ValueError(f"invalid digest {digest!r}")
        return self._repository_url(repository, "blobs", digest)

    def _require_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("RegistryClient is used outside `async with`")
        return self._session

    @asynccontextmanager
    async def _open(
        self,
        method: str,
        url: URL,
        scope: str,
        *,
        headers: Mapping[str, str] | None = None,
        follow_redirects: bool = False,
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """A response, authenticated if the registry asks for it (one retry after a 401)."""
        session = self._require_session()

        async def send() -> aiohttp.ClientResponse:
            return await session.request(
                method,
                url,
                headers={**(headers or {}), **self._authorization(scope)},
                allow_redirects=follow_redirects,
            )

        with _translated_errors(method, url):
            response = await send()
            try:
                if response.status == 401 and await self._answer_challenge(response, scope):
                    response.release()
                    response = await send()
                yield response
            finally:
                response.release()

    def _authorization(self, scope: str) -> dict[str, str]:
        token = self._tokens.get(scope, self._access.bearer_token)
        if token:
            return {"Authorization": f"Bearer {token}"}
        basic_authorization = self._access.basic_authorization
        if self._basic_challenged and basic_authorization is not None:
            return {"Authorization": basic_authorization}
        return {}

    async def _answer_challenge(self, response: aiohttp.ClientResponse, scope: str) -> bool:
        """Whether a retry may succeed: basic credentials not yet sent, or a fresh bearer token."""
        challenges = {
            challenge.scheme: challenge
            for challenge in parse_challenges(response.headers.getall("WWW-Authenticate", []))
        }
        if "bearer" in challenges and "realm" in challenges["bearer"].parameters:
            self._tokens[scope] = await self._fetch_token(challenges["bearer"].parameters, scope)
            return True
        if (
            "basic" in challenges
            and self._access.basic_authorization is not None
            and not self._basic_challenged
        ):
            self._basic_challenged = True
            return True
        return False

    async def _fetch_token(self, challenge: Mapping[str, str], scope: str) -> str:
        realm = URL(challenge["realm"])
        if realm.scheme not in ("https", "http") or not realm.host:
            raise RegistryError(f"{_shown(self.base_url)}: the bearer realm is not an http(s) URL")
        query = {"scope": challenge.get("scope", scope)} | (
            {"service": challenge["service"]} if "service" in challenge else {}
        )
        token_url = realm.update_query(query)
        basic_authorization = self._access.basic_authorization
        headers = {"Authorization": basic_authorization} if basic_authorization else {}
        with _translated_errors("GET", token_url):
            async with self._require_session().get(token_url, headers=headers) as response:
                body = await _read_small(response, MAX_SMALL_RESPONSE_BYTES, "token answer")
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"GET {_shown(token_url)}: no token in the answer")
        return token


def _pull_scope(repository: str) -> str:
    return f"repository:{repository}:pull"


async def registry_url(authority: str, access: RegistryAccess) -> URL:
    """`https://AUTHORITY`, or `http://AUTHORITY` when https cannot connect and plain http is allowed.

    Plain http is allowed with `access.insecure` or for a loopback host (as docker does for localhost), and is
    not tried after a certificate error, which would only hide the real cause.
    """
    https_url = URL(f"https://{authority}")
    if not (access.insecure or _is_loopback(https_url.host)):
        return https_url
    async with RegistryClient(https_url, access) as client:
        try:
            await client.ping()
        except RegistryError as error:
            if not isinstance(error.__cause__, aiohttp.ClientConnectorCertificateError):
                return URL(f"http://{authority}")
    return https_url
