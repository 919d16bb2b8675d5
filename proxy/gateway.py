"""Request handling: every request passes through untouched, except pushes of known foreign layers."""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

from aiohttp import ClientResponse, HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import Settings
from proxy.errors import FOREIGN_LAYER_DENIED, MANIFEST_TOO_LARGE, GatewayError
from proxy.forwarding import Upstream, read_capped, relay_body
from proxy.headers import (
    Origins,
    client_scheme_and_host,
    downstream_response_headers,
    origin,
    upstream_request_headers,
    without_body_headers,
)
from proxy.known import KnownForeign
from proxy.logs import log_event
from proxy.manifests import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    ForeignClassifier,
    ManifestError,
    parse_manifest,
)
from proxy.metrics import Metrics
from proxy.policy import Action, Decision, Policy
from proxy.routes import RouteKind, RouteMatch
from proxy.store import Sighting

logger = logging.getLogger("foreign_layer_proxy.gateway")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", RouteMatch)
DECISION = web.RequestKey("decision", Decision)

# Query parameters through which a push names the blob it writes, per route.
PUSH_DIGEST_PARAMETERS: dict[RouteKind, tuple[str, ...]] = {
    RouteKind.UPLOAD_START: ("digest", "mount"),
    RouteKind.UPLOAD_SESSION: ("digest",),
}
MANIFEST_CONTENT_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
SEEN_MANIFESTS_CAPACITY = 8192


class SeenManifests:
    """Manifest digests already parsed, so that repeated pulls of one manifest are streamed, not parsed."""

    def __init__(self, capacity: int = SEEN_MANIFESTS_CAPACITY):
        self.capacity = capacity
        self._digests: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, digest: object) -> bool:
        return digest in self._digests

    def add(self, digest: str) -> None:
        self._digests[digest] = None
        self._digests.move_to_end(digest)
        if len(self._digests) > self.capacity:
            self._digests.popitem(last=False)


def sha256_digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def expects_continue(request: web.Request) -> bool:
    return request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def send_continue(request: web.Request) -> None:
    """The gateway answers `Expect: 100-continue` itself, and only once it has decided to take the body."""
    if expects_continue(request) and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def no_automatic_continue(request: web.Request) -> None:
    """Route expect-handler: aiohttp must not send 100 Continue before the policy decided."""


async def drain(request: web.Request) -> int:
    """Read and discard a request body the client is already sending; returns its size."""
    if expects_continue(request):
        return 0
    drained = 0
    while chunk := await request.content.readany():
        drained += len(chunk)
    return drained


class Gateway:
    def __init__(self, settings: Settings, upstream: Upstream, known: KnownForeign, metrics: Metrics):
        self.upstream = upstream
        self.known = known
        self.metrics = metrics
        self.seen_manifests = SeenManifests()
        self.settings = settings
        self.policy = settings.policy.policy
        self.classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.policy = settings.policy.policy
        self.classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = request[ROUTE]
        decision = self.decide(request, route, self.policy)
        if decision is not None:
            request[DECISION] = decision
            self.record(request, decision)
            if decision.action.blocks:
                return await self.enforce(request, route, decision)
        if route.kind is RouteKind.MANIFEST and request.method == "PUT":
            return await self.forward_manifest_put(request, route)
        if route.kind is RouteKind.MANIFEST and request.method == "GET":
            return await self.forward_manifest_get(request, route)
        return await self.forward(request)

    # Decisions

    def decide(self, request: web.Request, route: RouteMatch, policy: Policy) -> Decision | None:
        if route.repository is None:
            return None
        if request.method == "HEAD" and route.kind is RouteKind.BLOB and self.settings.policy.pretend_present:
            digests: list[str] = [route.reference] if route.reference else []
        elif request.method in {"POST", "PUT"} and route.kind in PUSH_DIGEST_PARAMETERS:
            digests = [
                value for name in PUSH_DIGEST_PARAMETERS[route.kind] for value in request.query.getall(name, ())
            ]
        else:
            return None
        return policy.decide(route.repository, digests, self.known.layers)

    def record(self, request: web.Request, decision: Decision) -> None:
        log_event(
            logger,
            logging.INFO,
            "decision",
            action=decision.action.value,
            rule=decision.rule,
            repository=decision.repository,
            digest=decision.layer.digest,
            size=decision.layer.size,
            method=request.method,
            client=request.remote,
            user_agent=request.headers.get("User-Agent"),
            request_id=request[REQUEST_ID],
        )
        kept_out = decision.layer.size if decision.action.blocks else 0
        self.known.count(decision.layer.digest, decision.action.outcome, kept_out)
        self.metrics.decisions.labels(decision.action.outcome, decision.rule).inc()
        self.metrics.bytes_kept_out.inc(kept_out)

    async def enforce(self, request: web.Request, route: RouteMatch, decision: Decision) -> web.StreamResponse:
        layer = decision.layer
        if request.method == "HEAD":
            return web.Response(
                status=200,
                headers={
                    "Content-Length": str(layer.size),
                    "Content-Type": "application/octet-stream",
                    "Docker-Content-Digest": layer.digest,
                },
            )
        if route.kind is RouteKind.UPLOAD_SESSION:
            await self.cancel_upload(request)
        if decision.action is Action.REJECT:
            raise GatewayError(
                FOREIGN_LAYER_DENIED,
                f"foreign layer {layer.digest} may not be pushed to {decision.repository} (rule: {decision.rule})",
                {
                    "digest": layer.digest,
                    "mediaType": layer.media_type,
                    "repository": decision.repository,
                    "rule": decision.rule,
                    "urls": list(layer.urls),
                    "hint": "foreign layers are not stored in this registry: push the image keeping the "
                    "layer's foreign media type and urls, without uploading the blob",
                },
            )
        await drain(request)
        return web.Response(
            status=201,
            headers={
                "Location": f"/v2/{decision.repository}/blobs/{layer.digest}",
                "Docker-Content-Digest": layer.digest,
                "Content-Length": "0",
            },
        )

    async def cancel_upload(self, request: web.Request) -> None:
        """Abort the upstream session of a dropped or rejected upload, so the registry never commits it."""
        try:
            headers = without_body_headers(self.upstream_headers(request))
            async with self.upstream.open("DELETE", request.raw_path, headers) as response:
                await response.read()
                status = response.status
        except GatewayError as error:
            status = error.kind.status
        log_event(logger, logging.INFO, "upload_cancelled", status=status, request_id=request[REQUEST_ID])

    # Pass-through

    def origins(self, request: web.Request) -> Origins:
        own_scheme = "https" if request.secure else "http"
        scheme, host = client_scheme_and_host(request.headers, own_scheme, self.upstream.authority)
        return Origins(upstream=origin(self.upstream.origin.scheme, self.upstream.authority), client=origin(scheme, host))

    def upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        return upstream_request_headers(
            request.headers,
            settings=self.settings.forwarded,
            client_address=request.remote,
            own_scheme="https" if request.secure else "http",
            upstream_authority=None if self.settings.upstream.pass_host else self.upstream.authority,
            request_id=request[REQUEST_ID],
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            await send_continue(request)
        body = request.content if request.body_exists else None
        async with self.upstream.open(request.method, request.raw_path, self.upstream_headers(request), body) as upstream:
            return await self.respond(request, upstream, None)

    async def forward_manifest_put(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        await send_continue(request)
        body = await read_capped(request.content, MAX_MANIFEST_BYTES)
        if body is None:
            raise GatewayError(MANIFEST_TOO_LARGE, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        async with self.upstream.open("PUT", request.raw_path, self.upstream_headers(request), body) as upstream:
            if 200 <= upstream.status < 300 and route.repository:
                self.learn_from_manifest(body, request.content_type, route.repository, "manifest-put")
            return await self.respond(request, upstream, None)

    async def forward_manifest_get(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        async with self.upstream.open("GET", request.raw_path, self.upstream_headers(request)) as upstream:
            if not self.worth_learning_from(upstream.status, upstream.headers) or route.repository is None:
                return await self.respond(request, upstream, None)
            body = await read_capped(upstream.content, MAX_MANIFEST_BYTES)
            if body is None:
                raise GatewayError(MANIFEST_TOO_LARGE, "upstream manifest larger than 4 MiB")
            self.learn_from_manifest(body, upstream.content_type, route.repository, "manifest-get")
            return await self.respond(request, upstream, body)

    def worth_learning_from(self, status: int, headers: CIMultiDictProxy[str]) -> bool:
        length = headers.get("Content-Length")
        return (
            status == 200
            and headers.get("Content-Type", "").split(";")[0].strip() in MANIFEST_CONTENT_TYPES
            and not headers.get("Content-Encoding")
            and (length is None or (length.isdigit() and int(length) <= MAX_MANIFEST_BYTES))
            and headers.get("Docker-Content-Digest") not in self.seen_manifests
        )

    async def respond(self, request: web.Request, upstream: ClientResponse, body: bytes | None) -> web.StreamResponse:
        """Send the upstream's answer on: `body` when the gateway already read it, else streamed."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=downstream_response_headers(upstream.headers, self.origins(request)),
        )
        await response.prepare(request)
        if request.method != "HEAD":
            if body is None:
                await relay_body(upstream, response)
            else:
                await response.write(body)
        await response.write_eof()
        return response

    def learn_from_manifest(self, body: bytes, content_type: str | None, repository: str, source: str) -> None:
        manifest_digest = sha256_digest(body)
        self.seen_manifests.add(manifest_digest)
        try:
            manifest = parse_manifest(body, content_type)
        except ManifestError:
            return
        layers = self.classifier.foreign_layers(manifest)
        if not layers:
            return
        new_layers = self.known.learn(layers, Sighting(source, repository, manifest_digest))
        self.metrics.learned.labels(source).inc(len(new_layers))
        for layer in new_layers:
            log_event(
                logger,
                logging.INFO,
                "learned",
                digest=layer.digest,
                media_type=layer.media_type,
                size=layer.size,
                repository=repository,
                manifest=manifest_digest,
                source=source,
            )
