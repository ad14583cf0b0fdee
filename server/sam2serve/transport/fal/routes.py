"""fal's HTTP protocol as a thin adapter over the job layer (Starlette).

Routes, under this server's base URL (what fal serves at queue.fal.run, fal.run and rest.fal.ai):

    POST /queue/fal-ai/sam2/auto-segment[?fal_webhook=URL]  submit             (queue.fal.run/<app>)
    GET  /queue/fal-ai/sam2/requests/<id>/status[?logs=1]   status
    GET  /queue/fal-ai/sam2/requests/<id>/status/stream     status changes as server-sent events
    GET  /queue/fal-ai/sam2/requests/<id>                   result
    PUT  /queue/fal-ai/sam2/requests/<id>/cancel            cancel
    POST /fal-ai/sam2/auto-segment                          run and wait       (fal.run/<app>)
    POST /fal-ai/sam2/image                                 prompted segmentation on the prompt data plane, run
                                                            and wait (fal.run only: the queue runs auto-segment)
    POST /storage/upload/initiate, PUT|GET /fal/uploads/<token>   the JavaScript client's uploads
    GET  /fal/uploads/<token>/<file name>                   fal-ai/sam2/image's output (without sync_mode)
    GET  /files/<id>/<file name>                            result files (the output's URLs without sync_mode)
    any  /fal/proxy with x-fal-target-url: <fal URL>        @fal-ai/client's proxyUrl: served as that URL

Requests are checked by sam2serve.request_fields and errors mapped by sam2serve.error_table, as for gRPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import mimetypes
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ...domain import SegmentRequest
from ...error_table import error_code
from ...errors import ImageTooLarge, InvalidInput, JobNotFound, Unauthenticated
from ...jobs import CancelOutcome, JobResult, JobService, JobSnapshot
from ...limits import describe_bytes
from ...metrics import Metrics
from ...prompts import PromptWorkers
from ...request_fields import RequestLimits
from ...tenants import ApiKeys
from ..auth import MISSING_KEY
from . import image_schema, schema
from .uploads import UPLOAD_PATH, Uploads, keep, token_of

log = logging.getLogger(__name__)
PROTOCOL = "http"  # the protocol label of this adapter's metrics
PROXY_PATH = "/fal/proxy"
TARGET_HEADER = "x-fal-target-url"
# fal host → where its paths live here
_FAL_HOSTS = {"queue.fal.run": "/queue", "fal.run": "", "rest.fal.ai": ""}
PING_S = 15.0  # SSE keep-alive comments, for proxies that close idle connections
T = TypeVar("T")
_NO_UPLOAD_EXPECTED = "no upload is expected at this URL (unknown or expired token, or already uploaded)"


@dataclass(frozen=True)
class FalSettings:
    limits: RequestLimits
    max_image_bytes: int
    result_ttl_s: float
    keys: ApiKeys = field(default_factory=ApiKeys)  # the API keys and their tenants; none: no authentication
    public_url: str = ""  # the base of every URL handed out (behind a load balancer); "" = the request's own
    warning: str = ""  # said in a header of every response and first in every log list (untrained weights)

    @property
    def max_body_bytes(self) -> int:  # a data URI is 4/3 of the image, plus the other fields
        return self.max_image_bytes * 4 // 3 + 1024 * 1024


Handler = Callable[["FalApi", Request], Awaitable[Response]]


def endpoint(rpc: str, public: bool = False) -> Callable[[Handler], Handler]:
    """Name the call for the metrics, check the API key (unless `public`), turn domain errors into fal's."""

    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def run(self: FalApi, request: Request) -> Response:
            request.state.rpc = rpc
            try:
                if not public:
                    request.state.tenant = self.authorise(request)
                return await handler(self, request)
            except Exception as e:
                return self.failure(e)

        return run

    return wrap


class FalApi:
    def __init__(self, jobs: JobService, prompts: PromptWorkers, uploads: Uploads, settings: FalSettings,
                 metrics: Metrics) -> None:
        self.jobs, self.prompts, self.uploads, self.settings, self.metrics = jobs, prompts, uploads, settings, metrics

    def asgi(self) -> ASGIApp:
        routes = [
            Route("/queue/{app:path}/requests/{request_id}/status/stream", self.stream, methods=["GET"]),
            Route("/queue/{app:path}/requests/{request_id}/status", self.status, methods=["GET"]),
            Route("/queue/{app:path}/requests/{request_id}/cancel", self.cancel, methods=["PUT"]),
            Route("/queue/{app:path}/requests/{request_id}", self.result, methods=["GET"]),
            Route(f"/queue/{image_schema.IMAGE_APP}", self.submit_image, methods=["POST"]),
            Route("/queue/{app:path}", self.submit, methods=["POST"]),
            Route("/storage/upload/initiate", self.initiate_upload, methods=["POST"]),
            Route(UPLOAD_PATH + "{token}", self.put_upload, methods=["PUT"]),
            Route(UPLOAD_PATH + "{token}", self.get_upload, methods=["GET"]),
            Route(UPLOAD_PATH + "{token}/{file_name}", self.get_upload, methods=["GET"]),
            Route("/files/{request_id}/{file_name}", self.file, methods=["GET"]),
            Route(f"/{image_schema.IMAGE_APP}", self.segment_image, methods=["POST"]),
            Route("/{app:path}", self.run, methods=["POST"]),
        ]
        app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})
        return Observed(ProxyRoutes(app), self.metrics, self.settings.warning)

    # -- the queue ---------------------------------------------------------------------------------------
    @endpoint("Submit")
    async def submit(self, request: Request) -> Response:
        _app(request, exact=True)
        snapshot = await self.jobs.submit(await self._segment_request(request))
        body = {**self._status(request, snapshot), "gateway_request_id": snapshot.id}
        return JSONResponse(body, headers=_request_id(snapshot.id))

    @endpoint("GetStatus")
    async def status(self, request: Request) -> Response:
        _app(request)
        return JSONResponse(self._status(request, await self.jobs.status(request.path_params["request_id"],
                                                                         _tenant(request))))

    @endpoint("WatchStatus")
    async def stream(self, request: Request) -> Response:
        _app(request)
        job_id = request.path_params["request_id"]
        snapshots = self.jobs.watch(job_id, _tenant(request))
        # The first step's errors (an unknown id, the bound on open streams, an unreachable queue) are fal's
        # 404/429/503 here, before EventSourceResponse has sent its 200.
        try:
            first = await anext(snapshots)
        except BaseException:
            await snapshots.aclose()
            raise

        async def events() -> AsyncIterator[dict[str, str]]:
            sent = 0  # as fal's stream: each event carries the log entries added since the previous one
            snapshot: JobSnapshot | None = first
            async with contextlib.aclosing(snapshots):
                try:
                    while snapshot is not None:
                        body = self._status(request, snapshot)
                        if body["logs"] is not None:
                            body["logs"], sent = body["logs"][sent:], len(body["logs"])
                        yield {"data": json.dumps(body)}
                        snapshot = await anext(snapshots, None)
                except Exception as e:  # after the 200: the stream ends with an event carrying fal's error
                    status, error, _ = self.error_response(e)
                    yield {"event": "error", "data": json.dumps({**error, "status_code": status})}

        return EventSourceResponse(events(), ping=PING_S, headers=_request_id(job_id))

    @endpoint("GetResult")
    async def result(self, request: Request) -> Response:
        _app(request)
        job_id = request.path_params["request_id"]
        result = await _job_result(self.jobs, job_id, _tenant(request))
        return await _json_off_loop(lambda: schema.output(result.outcome, result.request, self._urls(request, job_id)),
                                    _request_id(job_id))

    @endpoint("Cancel")
    async def cancel(self, request: Request) -> Response:
        _app(request)
        job_id = request.path_params["request_id"]
        try:
            outcome, snapshot = await self.jobs.cancel(job_id, _tenant(request))
        except JobNotFound as e:
            return JSONResponse({"status": "NOT_FOUND", "detail": str(e)}, 404)
        if outcome in (CancelOutcome.CANCELLED_IN_QUEUE, CancelOutcome.CANCELLING_IN_PROGRESS):
            return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)
        return JSONResponse({"status": "ALREADY_COMPLETED",
                             "detail": f"request {job_id} already ended ({snapshot.state.name.lower()})"}, 400)

    # -- run and wait ------------------------------------------------------------------------------------
    @endpoint("AutoSegment")
    async def run(self, request: Request) -> Response:
        _app(request, exact=True)
        try:
            async with self.jobs.attached(await self._segment_request(request)) as job:
                await _unless_gone(request, self.jobs.wait(job.id))  # the data plane cancels a left caller's job
                result = await _job_result(self.jobs, job.id)
        except _CallerLeft:
            return Response(status_code=499)  # nobody reads it: the caller has gone
        urls = self._urls(request, job.id)
        return await _json_off_loop(lambda: schema.output(result.outcome, result.request, urls),
                                    _request_id(job.id))

    # -- fal-ai/sam2/image: prompts on the prompt data plane (gRPC's Segment), run and wait -----------------
    @endpoint("Segment")
    async def segment_image(self, request: Request) -> Response:
        document = await self._document(request)
        prompt, options = image_schema.to_prompt_request(document, await self._uploaded_image(document))
        try:  # a caller that leaves before its turn takes its call out of the prompt workers' line
            outcome = await _unless_gone(request, self.prompts.segment(prompt))
        except _CallerLeft:
            return Response(status_code=499)
        loop = asyncio.get_running_loop()
        picture = await loop.run_in_executor(None, image_schema.output_image, outcome, options)
        if options.sync_mode:
            return await _json_off_loop(lambda: {"image": schema.file_object(picture, schema.data_uri(picture))}, {})
        url = f"{self._base(request)}{UPLOAD_PATH}{await keep(self.uploads, picture.data)}/{picture.file_name}"
        return JSONResponse({"image": schema.file_object(picture, url)})

    @endpoint("Submit")
    async def submit_image(self, request: Request) -> Response:
        raise JobNotFound(
            f"{image_schema.IMAGE_APP} is served synchronously only: POST {self._base(request)}/"
            f"{image_schema.IMAGE_APP} (fal.run; fal_client.run, or fal.run in @fal-ai/client). This server's queue "
            f"runs {schema.APP_ID} jobs only")

    # -- files -------------------------------------------------------------------------------------------
    @endpoint("GetFile")
    async def file(self, request: Request) -> Response:
        job_id, name = request.path_params["request_id"], request.path_params["file_name"]
        image = schema.file_named((await self.jobs.result(job_id, _tenant(request))).outcome, name)
        if image is None:
            raise JobNotFound(f"request {job_id} has no file {name!r}")
        left = schema.seconds_left((await self.jobs.status(job_id, _tenant(request))).finished_at,
                                   self.settings.result_ttl_s)
        return Response(image.data, media_type=image.content_type,
                        headers={"cache-control": f"private, max-age={left}", **_request_id(job_id)})

    @endpoint("InitiateUpload")
    async def initiate_upload(self, request: Request) -> Response:
        url = f"{self._base(request)}{UPLOAD_PATH}{await self.uploads.issue()}"
        return JSONResponse({"upload_url": url, "file_url": url})

    @endpoint("PutUpload", public=True)  # the client PUTs without its key: the issued token is the permission
    async def put_upload(self, request: Request) -> Response:
        token = request.path_params["token"]
        # Unauthenticated: a made-up token is refused before its body is read (up to the image cap)
        if not await self.uploads.expects(token):
            raise JobNotFound(_NO_UPLOAD_EXPECTED)
        data = await _body(request, self.settings.max_image_bytes, "the upload")
        if not await self.uploads.put(token, data):  # filled by a concurrent PUT, or expired meanwhile
            raise JobNotFound(_NO_UPLOAD_EXPECTED)
        return JSONResponse({})

    @endpoint("GetUpload")
    async def get_upload(self, request: Request) -> Response:
        data = await self.uploads.get(request.path_params["token"])
        if data is None:
            raise JobNotFound("no upload at this URL (unknown or expired token)")
        content_type = mimetypes.guess_type(request.path_params.get("file_name", ""))[0]
        return Response(data, media_type=content_type or "application/octet-stream")

    # -- helpers -----------------------------------------------------------------------------------------
    def authorise(self, request: Request) -> str:
        """The caller's tenant; Unauthenticated when keys are required and it sent none of them."""
        tenant = self.settings.keys.tenant_of(request.headers.get("authorization", ""))
        if tenant is None:
            raise Unauthenticated(MISSING_KEY)
        return tenant

    def failure(self, exc: Exception) -> Response:
        status, body, headers = self.error_response(exc)
        return JSONResponse(body, status, headers=headers)

    def error_response(self, exc: Exception) -> tuple[int, dict[str, Any], dict[str, str]]:
        """fal's (status, body, headers) for `exc`, counted as a rejection and logged when it is internal."""
        code, _ = error_code(exc)
        if code.rejected:
            self.metrics.rejected.labels(code.rejected, PROTOCOL).inc()
        if code.http == 500:
            log.error("internal error in %s", type(exc).__name__, exc_info=exc)
        return schema.error(exc)

    async def _segment_request(self, request: Request) -> SegmentRequest:
        document = await self._document(request)
        segment = schema.to_segment_request(document, await self._uploaded_image(document), self.settings.limits,
                                            request.query_params.get("fal_webhook", ""), self._base(request))
        return replace(segment, tenant=_tenant(request))

    async def _document(self, request: Request) -> object:
        """The request's JSON body, parsed off the event loop."""
        body = await _body(request, self.settings.max_body_bytes, "the request body")
        try:
            return await asyncio.get_running_loop().run_in_executor(None, json.loads, body)
        except ValueError as e:
            raise InvalidInput(f"the request body is not valid JSON ({e})") from None

    async def _uploaded_image(self, document: object) -> tuple[str, str | bytes] | None:
        """("bytes", data) when image_url names a file this server holds (an upload, an earlier output)."""
        url = document.get("image_url") if isinstance(document, dict) else None
        if not isinstance(url, str) or (token := token_of(url)) is None:
            return None
        data = await self.uploads.get(token)
        if data is None:
            raise InvalidInput("image_url names an upload to this server that is unknown or expired",
                               field="image_url")
        return "bytes", data

    def _status(self, request: Request, snapshot: JobSnapshot) -> dict[str, Any]:
        logs = request.query_params.get("logs", "0").lower() in ("1", "true")
        return schema.status(snapshot, self._urls(request, snapshot.id), logs, self.settings.warning)

    def _base(self, request: Request) -> str:
        return self.settings.public_url.rstrip("/") or str(request.base_url).rstrip("/")

    def _urls(self, request: Request, job_id: str) -> schema.RequestUrls:
        return schema.RequestUrls(self._base(request), job_id)


def _app(request: Request, exact: bool = False) -> None:
    """fal-ai/sam2/auto-segment's routes (fal-ai/sam2/image has its own); a request is addressed by the app's
    owner/alias as well."""
    app = request.path_params["app"]
    if app != schema.APP_ID and (exact or app != schema.QUEUE_APP):
        raise JobNotFound(f"this server serves {schema.APP_ID} (queue and run) and {image_schema.IMAGE_APP} "
                          f"(run), not {app!r}")


def _tenant(request: Request) -> str:
    """The caller's tenant, as `endpoint` found it."""
    tenant: str = request.state.tenant
    return tenant


def _request_id(job_id: str) -> dict[str, str]:
    return {"x-fal-request-id": job_id}


class _CallerLeft(asyncio.CancelledError):
    """The client of a synchronous call disconnected: the call is cancelled, and its job with it."""


async def _job_result(jobs: JobService, job_id: str, tenant: str | None = None) -> JobResult:
    try:
        return await jobs.result(job_id, tenant)
    except Exception as e:
        raise schema.job_error(e) from None


async def _body(request: Request, limit: int, what: str) -> bytes:
    declared = request.headers.get("content-length", "")
    too_large = f"{what} is over the limit of {describe_bytes(limit)}"
    if declared.isdigit() and int(declared) > limit:
        raise ImageTooLarge(too_large, field="image_url")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ImageTooLarge(too_large, field="image_url")
    return bytes(body)


async def _json_off_loop(make: Callable[[], object], headers: dict[str, str]) -> Response:
    """A JSON response whose body (data URIs of every mask, with sync_mode) is built on a worker thread."""
    body = await asyncio.get_running_loop().run_in_executor(None, lambda: json.dumps(make()).encode())
    return Response(body, media_type="application/json", headers=headers)


async def _unless_gone(request: Request, waiting: Awaitable[T]) -> T:
    """`waiting`'s value, or _CallerLeft when the client disconnects first (`waiting` is then cancelled)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    job, gone = asyncio.ensure_future(waiting), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((job, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (job, gone):
            task.cancel()
    if job.done() and not job.cancelled():
        return job.result()  # or its error
    raise _CallerLeft


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


class ProxyRoutes:
    """@fal-ai/client's `proxyUrl`: every call arrives at one URL, the fal URL it meant in x-fal-target-url,
    and is served as if it had been made to that URL's path here (fal's hosts map as in the module doc)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == PROXY_PATH:
            target = _local_target(Headers(scope=scope).get(TARGET_HEADER, ""))
            if target is None:
                response = JSONResponse({"detail": f"{PROXY_PATH} needs a {TARGET_HEADER} header naming a URL of "
                                                   f"{', '.join(_FAL_HOSTS)}", "error_type": "bad_request"}, 400)
                await response(scope, receive, send)
                return
            path, query = target
            scope = {**scope, "path": path, "raw_path": path.encode(), "query_string": query.encode()}
        await self.app(scope, receive, send)


def _local_target(url: str) -> tuple[str, str] | None:
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    prefix = _FAL_HOSTS.get(parts.hostname or "")
    if parts.scheme != "https" or prefix is None or not parts.path.startswith("/"):
        return None
    return prefix + unquote(parts.path), parts.query


class Observed:
    """sam2serve_requests_total and sam2serve_request_duration_seconds with protocol="http" (rpc: the route's
    name, code: the HTTP status), and the server's warning (untrained weights) as a header of every response."""

    def __init__(self, app: ASGIApp, metrics: Metrics, warning: str) -> None:
        self.app, self.metrics = app, metrics
        self._warning = [(b"x-sam2serve-warning", warning.encode("latin-1"))] if warning else []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        start, status = time.perf_counter(), 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *self._warning]}
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            rpc = state.get("rpc", "unknown")
            self.metrics.requests.labels(rpc, str(status), PROTOCOL).inc()
            self.metrics.request_seconds.labels(rpc, PROTOCOL).observe(time.perf_counter() - start)
