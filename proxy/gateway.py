"""Request handling: every request passes through untouched, except pushes of known foreign layers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from aiohttp import ClientResponse, HttpVersion11, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import splice
from proxy.cleanup import Cleaner
from proxy.config import Settings, policy_of
from proxy.errors import (
    AMBIGUOUS_PUSH,
    FOREIGN_LAYER_DENIED,
    FOREIGN_LAYER_MISUSED,
    FORM_ENCODED_PUSH,
    INSPECTION_BUSY,
    MANIFEST_TOO_LARGE,
    UNVERIFIABLE_DIGEST,
    UNVERIFIABLE_UPLOAD,
    GatewayError,
    add_foreign_layer_hint,
)
from proxy.forwarding import (
    STREAM_BUFFER_BYTES,
    SplicedBody,
    Splicing,
    StreamAborted,
    Upstream,
    client_body,
    discard_body,
    known_length,
    read_capped,
    relay_body,
    request_body,
    splice_download,
)
from proxy.headers import (
    ClientView,
    Origins,
    TrustedProxies,
    client_view,
    downstream_response_headers,
    origin,
    registry_origin,
    upstream_request_headers,
    without_body_headers,
)
from proxy.inspection import (
    InspectedUpload,
    TentativeFeed,
    UploadInspections,
    UploadKey,
    matches_range,
)
from proxy.known import KnownForeign
from proxy.limits import DeadlineResponse, MemoryBudget, at_least
from proxy.logs import log_event
from proxy.lru import Lru
from proxy.manifests import (
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MAX_MANIFEST_BYTES,
    Descriptor,
    ForeignClassifier,
    ForeignLayer,
    ManifestError,
    parse_diff_ids,
    parse_manifest,
    sha256_digest,
)
from proxy.metrics import Metrics
from proxy.policy import Action, Decision, ManifestReview, review_manifest
from proxy.pushes import (
    Field,
    form_body_refusal,
    names_blobs,
    read_push,
    registry_parses_digest,
    split_field,
)
from proxy.routes import RouteKind, RouteMatch, match_route, with_query_items
from proxy.store import Sighting
from proxy.trust import LearningBudget

logger = logging.getLogger("foreign_layer_proxy.gateway")
T = TypeVar("T")

REQUEST_ID = web.RequestKey("request_id", str)
ROUTE = web.RequestKey("route", RouteMatch)
DECISION = web.RequestKey("decision", Decision)
BODY_BYTES_OUT = web.RequestKey("body_bytes_out", int)
CONTINUE_SENT = web.RequestKey("continue_sent", bool)
UPLOADED_BYTES = web.RequestKey("uploaded_bytes", int)
CLIENT = web.RequestKey("client", ClientView)

MANIFEST_CONTENT_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
UPLOAD_KINDS = frozenset({RouteKind.UPLOAD_START, RouteKind.UPLOAD_SESSION})
SEEN_MANIFESTS_CAPACITY = 8192
# The most of a refused or dropped body read before answering: more than any layer seen in the field (Windows
# base layers are 1 to 3 GiB); past it, the answer goes out and the connection is closed.
MAX_DISCARDED_BYTES = 8 * 1024**3
CONFIG_CACHE_CAPACITY = 4096
# The decision outcome of a pretend_present HEAD: said to be present, no push happened.
PRESENTED = "presented"
# Manifests and configs larger than this are parsed in a worker thread, not on the event loop.
PARSE_OFF_LOOP_BYTES = 64 * 1024


def blob_committed(location: str, digest: str) -> web.Response:
    """The registry's answer to a completed blob upload or mount (distribution's 201 for it): the same headers."""
    return web.Response(
        status=201,
        headers={
            "Docker-Distribution-Api-Version": "registry/2.0",
            "Location": location,
            "Docker-Content-Digest": digest,
            "Content-Length": "0",
        },
    )


def expects_continue(request: web.Request) -> bool:
    return request.version == HttpVersion11 and request.headers.get("Expect", "").lower() == "100-continue"


async def send_continue(request: web.Request) -> None:
    """The gateway answers `Expect: 100-continue` itself, and only once it has decided to take the body."""
    if expects_continue(request) and request.writer is not None:
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request[CONTINUE_SENT] = True


async def no_automatic_continue(request: web.Request) -> None:
    """Route expect-handler: aiohttp must not send 100 Continue before the policy decided."""


async def settle_body(request: web.Request, idle_timeout: float) -> bool:
    """Before the gateway answers a request it did not forward (a refusal, a drop): read what is left of its
    body, since many clients (python's requests among them) send all of it before they read any answer, and
    take a reset while sending for a network error, which they retry. False when only closing the connection
    after the answer is left: a client waiting for a 100 Continue it will not get (it sends nothing more), a
    body past MAX_DISCARDED_BYTES, or a client that stalls or leaves."""
    content = request_body(request)
    if content is None or content.at_eof():
        return True
    if expects_continue(request) and not request.get(CONTINUE_SENT, False):
        return False
    if (request.content_length or 0) > MAX_DISCARDED_BYTES:
        return False
    return await discard_body(content, MAX_DISCARDED_BYTES, idle_timeout)


def pushed_size(request: web.Request) -> int:
    """The size of the blob a push carried: what its upload session held, else its Content-Length, or the bytes
    read of it."""
    if request.method not in {"POST", "PUT"}:
        return 0
    return request.get(UPLOADED_BYTES) or max(request.content_length or 0, request.content.total_bytes)


def range_size(value: str | None) -> int:
    """The bytes an upload session holds, from the registry's `Range: 0-N` (0 when it says nothing usable)."""
    last = (value or "").rpartition("-")[2]
    return int(last) + 1 if last.isdigit() else 0


def upload_session(status: int, location: str | None) -> UploadKey | None:
    """The (repository, session id) of an upload the registry just opened."""
    if status != 202 or location is None:
        return None
    session = match_route(URL(location, encoded=True).path)
    if session.kind is not RouteKind.UPLOAD_SESSION or session.repository is None or session.reference is None:
        return None
    return session.repository, session.reference


class Gateway:
    def __init__(
        self, settings: Settings, upstream: Upstream, known: KnownForeign, metrics: Metrics, cleaner: Cleaner
    ):
        self.upstream = upstream
        self.upstream_origin = origin(upstream.origin.scheme, upstream.authority)
        self.known = known
        self.metrics = metrics
        self.cleaner = cleaner
        self.inspections = UploadInspections(settings.policy.inspect_max_uploads)
        # Manifests already parsed, so that repeated pulls of one manifest are streamed, not parsed.
        self.seen_manifests: Lru[str, None] = Lru(SEEN_MANIFESTS_CAPACITY)
        self.budget = LearningBudget()
        self.config_diff_ids: Lru[str, tuple[str, ...]] = Lru(CONFIG_CACHE_CAPACITY)
        self.config_fetches: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        # One large parse at a time: each worker thread competes with the event loop for the GIL.
        self.parsing = asyncio.Semaphore(1)
        self.manifest_memory = MemoryBudget(settings.server.manifest_memory)
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.inspections.capacity = settings.policy.inspect_max_uploads
        self.policy = policy_of(settings)
        self.trusted_proxies = TrustedProxies(settings.forwarded.trusted_proxies)
        self.classifier = ForeignClassifier(settings.foreign.all_media_types, settings.foreign.urls_mark_foreign)
        self.budget.per_manifest = settings.foreign.max_learned_per_manifest
        self.budget.per_repository_hour = settings.foreign.max_learned_per_repository_hour
        server = settings.server
        self.splicing = Splicing(
            server.splice_min_bytes, server.idle_timeout, server.write_timeout, settings.upstream.read_timeout,
            server.min_body_rate, server.body_rate_window,
        ) if server.splice and splice.SUPPORTED else None  # fmt: skip

    async def handle(self, request: web.Request) -> web.StreamResponse:
        route = request[ROUTE]
        if names_blobs(route.kind, request.method):
            self.refuse_unverifiable_push(request, route)
        decision = self.decide(request, route)
        if decision is None and self.inspects(route):
            return await self.forward_inspected(request, route)
        if decision is not None:
            if route.kind is RouteKind.UPLOAD_SESSION:  # decided by name: its session is cancelled
                self.inspections.finish((route.repository or "", route.reference or ""))
            return await self.apply(request, route, decision)
        if route.kind is RouteKind.MANIFEST and request.method == "PUT":
            return await self.forward_manifest_put(request, route)
        if route.kind is RouteKind.MANIFEST and request.method == "GET":
            return await self.forward_manifest_get(request, route)
        return self.remember_upload(request, route, await self.forward(request))

    def refuse_unverifiable_push(self, request: web.Request, route: RouteMatch) -> None:
        """Pushes whose blob the gateway could not recognise: with a body the registry could read as a form (decided
        as Go decides), named ambiguously, or by a digest of another algorithm than the sha256 foreign layers are
        known by."""
        content_types = [value for name, value in request.raw_headers if name.lower() == b"content-type"]
        if (reason := form_body_refusal(request.method, content_types)) is not None:
            raise GatewayError(FORM_ENCODED_PUSH, f"{FORM_ENCODED_PUSH.message} (got {reason})")
        if route.repository is None or not self.policy.rule_for(route.repository)[1].blocks:
            return
        reading = read_push(route.kind, request.method, request.raw_path)
        if reading.ambiguous is not None:
            raise GatewayError(AMBIGUOUS_PUSH, f"{AMBIGUOUS_PUSH.message} (got {reading.ambiguous})")
        # An inspected upload's bytes tell, whatever it is named by; a mount has no bytes.
        inspected = self.inspects(route) and request.method in {"PUT", "POST"}
        other = [blob.digest for blob in reading.named
                 if registry_parses_digest(blob.digest) and not blob.digest.startswith("sha256:")
                 and not (inspected and blob.row.field is Field.DIGEST)]  # fmt: skip
        if other:
            raise GatewayError(UNVERIFIABLE_DIGEST, f"{UNVERIFIABLE_DIGEST.message} (got {other[0][:20]}...)")

    async def apply(self, request: web.Request, route: RouteMatch, decision: Decision) -> web.StreamResponse:
        request[DECISION] = decision
        if request.method == "HEAD":
            # pretend_present: the client is told the blob is there and skips it. Nothing was pushed, so nothing
            # is counted as dropped or kept out, and the store is not written per HEAD.
            self.record(request, decision, outcome=PRESENTED)
            return await self.enforce(request, route, decision)
        if not decision.action.blocks:
            self.record(request, decision)
            return await self.forward(request)
        try:
            return await self.enforce(request, route, decision)
        finally:
            self.record(request, decision, pushed_size(request))

    def remember_upload(self, request: web.Request, route: RouteMatch, response: web.StreamResponse) -> web.StreamResponse:
        """Completed uploads are remembered for a while, for leak detection at manifest time; not those the
        gateway decided on (allowed or audited): it knew they were foreign, so they are no leak."""
        if (
            response.status == 201 and route.repository and names_blobs(route.kind, request.method)
            and DECISION not in request
        ):  # fmt: skip
            for digest in self.pushed_digests(request, route):
                self.known.record_upload(route.repository, digest, self.settings.policy.leak_window)
        return response

    def inspects(self, route: RouteMatch) -> bool:
        """Uploads are inspected, with `policy.inspect_content`, in repositories whose rule keeps foreign layers out."""
        return (
            self.settings.policy.inspect_content
            and route.kind in UPLOAD_KINDS
            and route.repository is not None
            and self.policy.rule_for(route.repository)[1].blocks
        )

    async def forward_inspected(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        """An upload with its content inspected: the inspector opens with the session, follows what the registry
        accepts, and decides the closing PUT on the blob's digest and diff_id before the registry may commit it."""
        key = (route.repository or "", route.reference or "")
        if request.method == "POST":
            return await self.start_inspected(request, route)
        if request.method == "PATCH" and request.body_exists:
            return await self.patch_inspected(request, key)
        if request.method == "PUT":
            return await self.complete_inspected(request, route, key)
        if request.method == "DELETE":
            self.inspections.finish(key)
        return await self.forward(request)

    async def start_inspected(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        if not self.inspections.reserve():
            raise GatewayError(INSPECTION_BUSY)
        reserved = True
        target, headers, body = request.raw_path, self.upstream_headers(request), None
        try:
            if request.body_exists and self.pushed_digests(request, route):
                # A monolithic POST would let the registry commit a body nobody inspected: the registry is asked
                # for a session instead (the spec's answer of a registry without monolithic uploads, and always
                # distribution's), so the client sends the blob again in requests the inspector follows.
                target, headers = split_field(request.raw_path, "digest")[0], without_body_headers(headers)
                await settle_body(request, self.settings.server.idle_timeout)
            elif request.body_exists:
                await send_continue(request)
                body = self.client_body(request)
            async with self.upstream.open("POST", target, headers, body) as upstream:
                opened = upload_session(upstream.status, upstream.headers.get("Location"))
                if opened is not None:
                    # Before the client has the answer: its next request may come on another connection.
                    self.inspections.open(opened)
                    reserved = False
                return self.remember_upload(request, route, await self.respond(request, upstream, None))
        finally:
            if reserved:
                self.inspections.release()

    async def patch_inspected(self, request: web.Request, key: UploadKey) -> web.StreamResponse:
        upload = self.inspections.get(key)
        if upload is None:
            return await self.forward(request)
        if upload.busy:
            upload.out_of_step = "two requests of the upload were under way at once"
            return await self.forward(request)
        await send_continue(request)
        feed = TentativeFeed(upload.inspector)
        upload.busy = True
        answered = False
        try:
            body = feed.body(self.client_body(request))
            async with self.upstream.open("PATCH", request.raw_path, self.upstream_headers(request), body) as upstream:
                await self.follow(upload, feed, upstream)
                # Before the client has the answer: its next chunk may come at once, on another connection.
                answered, upload.busy = True, False
                return await self.respond(request, upstream, None)
        finally:
            upload.busy = False
            if not answered:
                upload.out_of_step = upload.out_of_step or "a chunk broke off on its way to the registry"

    @staticmethod
    async def follow(upload: InspectedUpload, feed: TentativeFeed, upstream: ClientResponse) -> None:
        """Keep what the registry accepted: the inspected copy, if its size is the registry's."""
        fed = await feed.settled()
        if upstream.status != 202:
            return
        if matches_range(fed, upstream.headers.get("Range")):
            upload.inspector = fed
        else:
            upload.out_of_step = f"the registry holds {upstream.headers.get('Range')!r}, not {fed.size} bytes"

    async def complete_inspected(self, request: web.Request, route: RouteMatch, key: UploadKey) -> web.StreamResponse:
        digests = self.pushed_digests(request, route)
        if not digests or route.repository is None:
            return await self.forward(request)
        upload = self.inspections.get(key)
        target = request.raw_path
        problem = "the gateway did not see this upload start" if upload is None else upload.unverifiable()
        if upload is not None and problem is None and request.body_exists:
            # The closing PUT's body goes up as a PATCH of the session, so that the decision comes before
            # the commit; the session is then closed (or cancelled) by a bodiless PUT.
            await send_continue(request)
            session_target, digest_items = split_field(request.raw_path, "digest")
            feed = TentativeFeed(upload.inspector)
            upload.busy = True
            try:
                body = feed.body(self.client_body(request))
                async with self.upstream.open("PATCH", session_target, self.upstream_headers(request), body) as patched:
                    await self.follow(upload, feed, patched)
                    location = patched.headers.get("Location")
                    if patched.status != 202 or location is None:
                        return await self.respond(request, patched, None)
                    await patched.read()
            except BaseException:
                upload.out_of_step = upload.out_of_step or "the closing chunk broke off on its way to the registry"
                raise
            finally:
                upload.busy = False
            target = with_query_items(URL(location, encoded=True).raw_path_qs, digest_items)
            problem = upload.unverifiable()
        self.inspections.finish(key)
        if upload is None or problem is not None:
            await self.cancel_upload(request, target)
            log_event(logger, logging.WARNING, "unverifiable_upload", repository=route.repository, reason=problem,
                      request_id=request[REQUEST_ID])  # fmt: skip
            raise GatewayError(UNVERIFIABLE_UPLOAD, f"{UNVERIFIABLE_UPLOAD.message} ({problem})")
        inspector = upload.inspector
        found = [digest for digest in (inspector.digest(), inspector.diff_id()) if digest]
        decision = self.policy.decide(
            route.repository, found, self.known.layers, self.known.diff_ids, self.known.reach
        )
        if decision is not None:
            layer = replace(decision.layer, digest=digests[0], size=inspector.size)
            self.learn_layers([layer], "inspection", route.repository, None)
            decision = request[DECISION] = replace(decision, layer=layer)
            self.record(request, decision)
            if decision.action.blocks:
                return await self.enforce(request, route, decision, session_target=target)
        headers = without_body_headers(self.upstream_headers(request))
        async with self.upstream.open("PUT", target, headers) as upstream:
            return self.remember_upload(request, route, await self.respond(request, upstream, None))

    # Decisions

    def decide(self, request: web.Request, route: RouteMatch) -> Decision | None:
        if route.repository is None:
            return None
        if request.method == "HEAD" and route.kind is RouteKind.BLOB and self.settings.policy.pretend_present:
            digests: list[str] = [route.reference] if route.reference else []
        elif names_blobs(route.kind, request.method):
            digests = self.pushed_digests(request, route)
        else:
            return None
        return self.policy.decide(route.repository, digests, self.known.layers, self.known.diff_ids, self.known.reach)

    @staticmethod
    def pushed_digests(request: web.Request, route: RouteMatch) -> list[str]:
        """The blobs the registry would commit or mount for this request (proxy.pushes' table)."""
        return read_push(route.kind, request.method, request.raw_path).digests

    def record(self, request: web.Request, decision: Decision, pushed_bytes: int = 0, outcome: str | None = None) -> None:
        """Log and count a decision. A layer known without a size (from a digest file) is as large as the
        blob pushed: that is learned, and counted as kept out. `outcome` PRESENTED: a pretend_present HEAD,
        counted in the metrics only."""
        size = decision.layer.size or pushed_bytes
        if not decision.layer.size and pushed_bytes:
            self.known.fill_size(decision.layer.digest, pushed_bytes)
        log_event(
            logger,
            logging.INFO,
            "decision",
            action=decision.action.value if outcome is None else outcome,
            rule=decision.rule,
            candidate=decision.candidate or None,
            repository=decision.repository,
            digest=decision.layer.digest,
            size=size,
            method=request.method,
            client=request.remote,
            user_agent=request.headers.get("User-Agent"),
            request_id=request[REQUEST_ID],
        )
        if outcome is not None:
            self.metrics.decisions.labels(outcome, decision.rule).inc()
            return
        kept_out = size if decision.action.blocks else 0
        self.known.count(decision.layer.digest, decision.action.outcome, kept_out, decision.repository)
        self.metrics.decisions.labels(decision.action.outcome, decision.rule).inc()
        self.metrics.bytes_kept_out.inc(kept_out)

    async def enforce(
        self, request: web.Request, route: RouteMatch, decision: Decision, session_target: str | None = None
    ) -> web.StreamResponse:
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
            session = session_target or request.raw_path
            if not layer.size and not request.body_exists:
                # Known without a size (a digest file) and closed by an empty PUT: the blob came in PATCHes.
                request[UPLOADED_BYTES] = await self.uploaded_bytes(request, session)
            await self.cancel_upload(request, session)
        if decision.action is Action.REJECT:
            # Answered by the request middleware, which settles the body first, as for every refusal.
            raise GatewayError(
                replace(FOREIGN_LAYER_DENIED, status=self.settings.policy.reject_status),
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
        dropped = blob_committed(self.registry_location(request, f"/v2/{decision.repository}/blobs/{layer.digest}"),
                                 layer.digest)  # fmt: skip
        if not await settle_body(request, self.settings.server.idle_timeout):
            dropped.force_close()
        return dropped

    async def uploaded_bytes(self, request: web.Request, session_target: str) -> int:
        """What the registry holds of an upload, from its status (GET of the session)."""
        try:
            headers = without_body_headers(self.upstream_headers(request))
            async with self.upstream.open("GET", session_target, headers) as response:
                await read_capped(response.content, MAX_MANIFEST_BYTES)
                return range_size(response.headers.get("Range")) if response.status == 204 else 0
        except GatewayError:
            return 0

    async def cancel_upload(self, request: web.Request, session_target: str) -> None:
        """Abort the upstream session of a dropped or rejected upload, so the registry never commits it."""
        try:
            headers = without_body_headers(self.upstream_headers(request))
            async with self.upstream.open("DELETE", session_target, headers) as response:
                await read_capped(response.content, MAX_MANIFEST_BYTES)
                status = response.status
        except GatewayError as error:
            status = error.kind.status
        log_event(logger, logging.INFO, "upload_cancelled", status=status, request_id=request[REQUEST_ID])

    # Pass-through

    def see_client(self, request: web.Request) -> ClientView:
        """Who the client is and how it addressed the gateway: worked out once per request, before `handle`."""
        view = request[CLIENT] = client_view(
            request.headers, request.remote, "https" if request.secure else "http", self.upstream.authority,
            self.trusted_proxies,
        )  # fmt: skip
        return view

    @staticmethod
    def client_view(request: web.Request) -> ClientView:
        # Not request.get(): a miss raises and catches a KeyError inside aiohttp's Request mapping.
        return request[CLIENT]

    def origins(self, request: web.Request) -> Origins:
        view = self.client_view(request)
        return Origins(upstream=self.upstream_origin, client=origin(view.scheme, view.host))

    def registry_location(self, request: web.Request, path: str) -> str:
        """An absolute URL as the registry would build it for this request, as the client then sees it."""
        return self.origins(request).rewrite(registry_origin(self.upstream_headers(request)) + path)

    def client_body(self, request: web.Request) -> AsyncIterator[bytes]:
        server = self.settings.server
        return at_least(client_body(request_body(request), server.idle_timeout), server.min_body_rate,
                        server.body_rate_window)  # fmt: skip

    def upstream_headers(self, request: web.Request) -> CIMultiDict[str]:
        return upstream_request_headers(
            request.headers,
            settings=self.settings.forwarded,
            view=self.client_view(request),
            own_scheme="https" if request.secure else "http",
            upstream_authority=None if self.settings.upstream.pass_host else self.upstream.authority,
            request_id=request[REQUEST_ID],
        )

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if request.body_exists:
            await send_continue(request)
        body = self.forwarded_body(request)
        spliced = body if isinstance(body, SplicedBody) else None
        try:
            async with self.upstream.open(request.method, request.raw_path, self.upstream_headers(request), body) as upstream:
                response = await self.respond(request, upstream, None, close=spliced is not None and spliced.bypassed)
        finally:
            if spliced is not None:
                self.metrics.bytes_spliced_up.inc(spliced.spliced)
        if spliced is not None and spliced.finished:
            request.protocol.force_close()  # answered: aiohttp would otherwise wait for the body it never saw end
        return response

    def forwarded_body(self, request: web.Request) -> SplicedBody | AsyncIterator[bytes] | None:
        """A pass-through request's body: spliced when it is an upload the gateway need not read (not inspected)."""
        if not request.body_exists:
            return None
        body = self.client_body(request)
        route = request[ROUTE]
        if (self.splicing is None or route.kind not in {RouteKind.UPLOAD_START, RouteKind.UPLOAD_SESSION}
                or known_length(request.headers, request.content_length, self.splicing) is None
                or self.inspects(route)):  # fmt: skip
            return body
        return SplicedBody(request, body, self.splicing)

    async def forward_manifest_put(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        declared = request.content_length
        if declared is not None and declared > MAX_MANIFEST_BYTES:
            raise GatewayError(MANIFEST_TOO_LARGE, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        with self.manifest_memory.reserve(MAX_MANIFEST_BYTES if declared is None else declared):
            return await self.read_and_forward_manifest_put(request, route)

    async def read_and_forward_manifest_put(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        await send_continue(request)
        try:
            async with asyncio.timeout(self.settings.server.idle_timeout):
                body = await read_capped(request_body(request), MAX_MANIFEST_BYTES)
        except TimeoutError:
            raise StreamAborted("client did not send its manifest in time") from None
        if body is None:
            raise GatewayError(MANIFEST_TOO_LARGE, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        repository = route.repository or ""
        manifest_digest = sha256_digest(body)
        review = await self.review(
            request, repository, body, request.content_type, check=self.settings.policy.manifest_check, pushed=True
        )
        if review is not None and review.misuses:
            # Anyone may send a manifest: of one the registry never saw, only layers whose blobs this
            # repository just received (an uploader the registry let in) are learned.
            leaked = await self.report_leaks(request, review, cleanup=False)
            self.learn(replace(review, foreign=tuple(layer for layer in review.foreign if layer.digest in leaked)),
                       "manifest-put", manifest_digest)  # fmt: skip
            raise self.refusal(request, review)
        async with self.upstream.open("PUT", request.raw_path, self.upstream_headers(request), body) as upstream:
            if review is None or not review.foreign:
                return await self.respond(request, upstream, None)
            if 200 <= upstream.status < 300:
                self.seen_manifests.put(manifest_digest, None)
                self.learn(review, "manifest-put", manifest_digest)
                await self.report_leaks(request, review, cleanup=self.settings.cleanup.delete_leaked)
                return await self.respond(request, upstream, None)
            return await self.respond(request, upstream, await self.explained_refusal(upstream, review))

    async def forward_manifest_get(self, request: web.Request, route: RouteMatch) -> web.StreamResponse:
        if request.body_exists:  # odd, but the registry is told a body comes: it must come
            await send_continue(request)
        body = self.client_body(request) if request.body_exists else None
        async with self.upstream.open("GET", request.raw_path, self.upstream_headers(request), body) as upstream:
            size = upstream.content_length or MAX_MANIFEST_BYTES
            if (not self.worth_learning_from(upstream.status, upstream.headers) or route.repository is None
                    or not self.manifest_memory.fits(size)):  # learning can wait for a pull of another day
                return await self.respond(request, upstream, None)
            with self.manifest_memory.reserve(size):
                manifest = await read_capped(upstream.content, MAX_MANIFEST_BYTES)
                if manifest is None:
                    raise GatewayError(MANIFEST_TOO_LARGE, "upstream manifest larger than 4 MiB")
                manifest_digest = sha256_digest(manifest)
                self.seen_manifests.put(manifest_digest, None)
                review = await self.review(
                    request, route.repository, manifest, upstream.content_type, check=False, pushed=False
                )
                if review is not None:
                    self.learn(review, "manifest-get", manifest_digest)
                return await self.respond(request, upstream, manifest)

    # Manifests

    async def parse(self, parse: Callable[[bytes], T], body: bytes) -> T:
        """`parse(body)`, in a worker thread when the body is large enough to stall other clients."""
        if len(body) <= PARSE_OFF_LOOP_BYTES:
            return parse(body)
        async with self.parsing:
            return await asyncio.to_thread(parse, body)

    async def review(
        self, request: web.Request, repository: str, body: bytes, content_type: str | None, *, check: bool, pushed: bool
    ) -> ManifestReview | None:
        """The policy's view of an image manifest; None for lists, indexes and anything unparsable."""
        try:
            manifest = await self.parse(lambda raw: parse_manifest(raw, content_type), body)
        except ManifestError:
            return None
        if manifest.is_index or manifest.config is None:
            return None
        known = self.known
        # A pushed manifest may list a recompressed foreign layer as an ordinary one: only its config's
        # diff_ids tell. Pulls are not checked for that, so that they cost no extra upstream request.
        wants_diff_ids = any(self.classifier.is_foreign(layer) for layer in manifest.layers) or (
            pushed and known.diff_ids and any(layer.digest not in known.layers for layer in manifest.layers)
        )
        diff_ids = await self.diff_ids(request, repository, manifest.config) if wants_diff_ids else ()
        return review_manifest(
            self.policy, repository, manifest, diff_ids, self.classifier, known.layers, known.diff_ids, check,
            known.reach,
        )  # fmt: skip

    async def diff_ids(self, request: web.Request, repository: str, config: Descriptor) -> tuple[str, ...]:
        """The image config's layer diff_ids, read through the upstream with the client's own credentials."""
        cached = self.config_diff_ids.get(config.digest)
        if cached is not None:
            return cached
        # Pushes of one image arrive together: one of them reads the config, the others wait for it.
        pending = self.config_fetches.get(config.digest)
        if pending is not None and (shared := await asyncio.shield(pending)):
            return shared
        fetch = self.config_fetches[config.digest] = asyncio.get_running_loop().create_future()
        diff_ids: tuple[str, ...] = ()
        try:
            diff_ids = await self.fetch_diff_ids(request, repository, config)
        finally:
            fetch.set_result(diff_ids)
            if self.config_fetches.get(config.digest) is fetch:
                del self.config_fetches[config.digest]
        return diff_ids

    async def fetch_diff_ids(self, request: web.Request, repository: str, config: Descriptor) -> tuple[str, ...]:
        if not 0 <= config.size <= MAX_MANIFEST_BYTES:
            return ()
        headers = without_body_headers(self.upstream_headers(request))
        with self.manifest_memory.reserve(config.size):
            try:
                async with self.upstream.open("GET", f"/v2/{repository}/blobs/{config.digest}", headers) as response:
                    body = await read_capped(response.content, config.size) if response.status == 200 else None
            except GatewayError:
                return ()
            if body is None or sha256_digest(body) != config.digest:
                return ()
            diff_ids = await self.parse(parse_diff_ids, body)
        self.config_diff_ids.put(config.digest, diff_ids)
        return diff_ids

    def refusal(self, request: web.Request, review: ManifestReview) -> GatewayError:
        for misuse in review.misuses:
            log_event(logger, logging.INFO, "decision", action="refused", reason=misuse.reason.value,
                      rule=review.rule, repository=review.repository, digest=misuse.layer.digest,
                      client=request.remote, request_id=request[REQUEST_ID])  # fmt: skip
        self.metrics.decisions.labels("refused", review.rule).inc(len(review.misuses))
        first = review.misuses[0]
        return GatewayError(
            FOREIGN_LAYER_MISUSED,
            first.explain(review.repository, review.rule, review.action),
            {
                "repository": review.repository,
                "rule": review.rule,
                "layers": [
                    {"digest": misuse.layer.digest, "mediaType": misuse.listed_media_type, "reason": misuse.reason.value}
                    for misuse in review.misuses
                ],
            },
        )

    async def report_leaks(self, request: web.Request, review: ManifestReview, cleanup: bool) -> set[str]:
        """Foreign blobs that reached the registry before anything marked them: logged, counted (each upload
        once, however many manifests name it), cleaned up."""
        leaked = await self.known.claim_uploads(review.repository, [layer.digest for layer in review.foreign])
        for layer in review.foreign:
            if layer.digest in leaked:
                log_event(logger, logging.WARNING, "decision", action="leaked", rule=review.rule,
                          repository=review.repository, digest=layer.digest, size=layer.size,
                          client=request.remote, request_id=request[REQUEST_ID])  # fmt: skip
                self.known.count(layer.digest, "leaked", repository=review.repository)
                self.metrics.decisions.labels("leaked", review.rule).inc()
        if leaked and cleanup and review.action.blocks:
            self.cleaner.delete_later(review.repository, sorted(leaked))
        return leaked

    async def explained_refusal(self, upstream: ClientResponse, review: ManifestReview) -> bytes | None:
        """The registry's own error for a manifest with foreign layers, with the likely cause added."""
        if upstream.status not in {400, 500}:
            return None
        body = await read_capped(upstream.content, MAX_MANIFEST_BYTES)
        return add_foreign_layer_hint(body, {layer.digest for layer in review.foreign}) if body is not None else None

    def learn(self, review: ManifestReview, source: str, manifest_digest: str) -> None:
        self.learn_layers(review.foreign, source, review.repository, manifest_digest)

    def learn_layers(
        self, layers: Sequence[ForeignLayer], source: str, repository: str, manifest_digest: str | None
    ) -> None:
        """What a manifest (or an inspected upload) of `repository` teaches: in the scope its rule and
        foreign.learning_scope give it, as candidates where the urls are not trusted, within the caps."""
        scope = self.policy.teaching_scope(repository)
        if scope is None or not layers:
            return
        trust = self.settings.foreign.trusted_urls
        candidates = {layer.digest for layer in layers if not trust.trust(layer.urls)}
        new = [layer.digest for layer in layers if self.known.teaches_more(layer.digest, scope, layer.digest in candidates)]
        admitted, limit = self.budget.admit(repository, len(new))
        capped = set(new[admitted:])
        if limit is not None:
            log_event(logger, logging.WARNING, "learning_capped", limit=limit, repository=repository,
                      manifest=manifest_digest, source=source, learned=admitted, not_learned=len(capped),
                      per_manifest=self.budget.per_manifest, per_repository_hour=self.budget.per_repository_hour)  # fmt: skip
            self.metrics.learning_capped.labels(limit).inc(len(capped))
        sighting = Sighting(source, repository, manifest_digest)
        for candidate in (False, True):
            group = [layer for layer in layers if (layer.digest in candidates) is candidate and layer.digest not in capped]
            if not group:
                continue
            taught = self.known.learn(group, sighting, scope=scope, candidate=candidate)
            (self.metrics.learned_candidates if candidate else self.metrics.learned).labels(source).inc(len(taught))
            for layer in taught:
                log_event(logger, logging.INFO, "learned", digest=layer.digest, media_type=layer.media_type,
                          size=layer.size, diff_id=layer.diff_id, repository=repository, manifest=manifest_digest,
                          source=source, scope=scope, candidate=candidate or None, urls=list(layer.urls) if candidate else None)  # fmt: skip

    def worth_learning_from(self, status: int, headers: CIMultiDictProxy[str]) -> bool:
        length = headers.get("Content-Length")
        return (
            status == 200
            and headers.get("Content-Type", "").split(";")[0].strip() in MANIFEST_CONTENT_TYPES
            and not headers.get("Content-Encoding")
            and (length is None or (length.isdigit() and int(length) <= MAX_MANIFEST_BYTES))
            and headers.get("Docker-Content-Digest") not in self.seen_manifests
        )

    async def respond(
        self, request: web.Request, upstream: ClientResponse, body: bytes | None, close: bool = False
    ) -> web.StreamResponse:
        """Send the upstream's answer on: `body` when the gateway already read it, else streamed (a blob spliced
        where it can be). `close`: the client connection closes after it."""
        length = upstream.content_length
        if request.method == "HEAD":
            body_size: int | None = 0
        elif body is not None:
            body_size = len(body)
        else:
            body_size = length if length is not None and length <= STREAM_BUFFER_BYTES else None
        response = DeadlineResponse(
            write_timeout=self.settings.server.write_timeout,
            body_size=body_size,
            status=upstream.status,
            reason=upstream.reason,
            headers=downstream_response_headers(
                upstream.headers, self.origins(request), None if body is None else len(body)
            ),
        )
        if close:
            response.force_close()
        try:
            await response.prepare(request)
            if request.method != "HEAD":
                if body is None:
                    request[BODY_BYTES_OUT] = await self.relay(request, upstream, response)
                else:
                    await response.write(body)
                    request[BODY_BYTES_OUT] = len(body)
            await response.write_eof()
        except ConnectionError as error:
            # The client left (aiohttp raises ClientConnectionResetError for a write to its closing transport):
            # not the upstream's failure, which Upstream.open would make of any aiohttp error raised here.
            raise StreamAborted("client closed the connection") from error
        return response

    async def relay(self, request: web.Request, upstream: ClientResponse, response: web.StreamResponse) -> int:
        """An upstream body streamed to the client; returns its bytes. Blobs are spliced where they can be."""
        if self.splicing is not None and request[ROUTE].kind is RouteKind.BLOB and request.method == "GET":
            relayed = await splice_download(upstream, request.transport, self.splicing,
                                            self.metrics.bytes_spliced_down.inc)  # fmt: skip
            if relayed is not None:
                return relayed
        return await relay_body(upstream, response)
