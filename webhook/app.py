"""HTTP transport of the webhook (FastAPI): parse, call the pure core, serialise, map errors. Nothing else.

Error channels (the apiserver treats a non-200 as a failed call, which with ``failurePolicy: Fail`` rejects the
object, so only a broken request may get one):

* the body is not JSON, or the review is malformed (:class:`~webhook.errors.MalformedReview`): HTTP 400 with a
  message, as no apiserver would send it;
* the body is larger than MAX_BODY_BYTES (7 MiB, more than the API server can send): HTTP 413, refused unread;
  the body did not arrive within ``settings.review_read_seconds``: HTTP 408; the bodies being received at once
  exceed MAX_INFLIGHT_BYTES: HTTP 503; all three close the connection; a body with more JSON objects and arrays
  than MAX_CONTAINERS is malformed (400), refused before it is parsed;
* a policy decision, allow or deny: HTTP 200 with the AdmissionReview the core built;
* anything else is a bug: logged with its traceback, HTTP 500.

The review itself is pure CPU over memory (the snapshot is read once per request, never waited for), so it runs
on the event loop: handing it to a worker thread would only add a context switch, as the GIL serialises it
anyway, and there is no I/O in it that could stall other connections. Reviews run in arrival order with the
sockets read every few reviews (webhook/fifo.py), which keeps the latency tail near the median under load.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from webhook import admission
from webhook import annotations as ann
from webhook.errors import MalformedReview
from webhook.fifo import FifoRunner
from webhook.inventory import Inventory
from webhook.metrics import Metrics, kind_label
from webhook.models import ADMISSION_API_VERSION, ADMISSION_KIND, AdmissionReviewResponse
from webhook.snapshot import Snapshot

log = logging.getLogger(__name__)

MUTATE = "mutate"
VALIDATE = "validate"
NOOP = "noop"

_JSON = "application/json"
_CLOSE = {"connection": "close"}

#: A review function of the core: (the parsed body, the inventory snapshot, the settings) -> the answer.
_Core = Callable[[Any, Snapshot, Any], AdmissionReviewResponse]


def _dict(value: object) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _mode(response: Mapping[str, Any]) -> str:
    """The path a mutated pod got, from the core's audit annotation or else from the status annotation the patch
    writes (``<mode>: <reason>``); ``none`` when nothing was injected."""
    audit = response.get("auditAnnotations")
    if isinstance(audit, dict) and audit.get("mode"):
        return str(audit["mode"])
    if not response.get("patch"):
        return "none"
    try:
        ops = json.loads(base64.b64decode(response["patch"]))
    except (ValueError, TypeError):
        return "unknown"
    escaped = "/metadata/annotations/" + ann.STATUS.replace("~", "~0").replace("/", "~1")
    for op in ops if isinstance(ops, list) else ():
        if not isinstance(op, dict):
            continue
        value = op.get("value")
        if op.get("path") == "/metadata/annotations" and isinstance(value, dict):
            value = value.get(ann.STATUS)
        elif op.get("path") != escaped:
            continue
        if isinstance(value, str):
            return value.partition(":")[0].strip() or "unknown"
    return "unknown"


def _labels(body: dict[str, Any], review: Mapping[str, Any]) -> tuple[str, str, str]:
    """(kind, mode, outcome) of an answered review for the metrics."""
    request = _dict(body.get("request"))
    kind_obj = _dict(request.get("kind"))
    kind = kind_label(kind_obj.get("kind"))
    response = review.get("response") or {}
    if not response.get("allowed", False):
        outcome = "denied"
    elif response.get("patch"):
        outcome = "mutated"
    else:
        outcome = "allowed"
    return kind, _mode(response), outcome


# The API server refuses request bodies over 3 MiB (its MaxRequestBodyBytes), so no object it admits is larger; a
# review carries the object and, on UPDATE (the /validate workloads), the oldObject too, plus a small envelope
# (userInfo, options). 2 x 3 MiB + 1 MiB for the envelope and the fields the API server defaults before calling.
# This bounds what one body costs: orjson turns the worst 7 MiB (`[{},{},...]`) into ~250 MB of objects, while
# anything larger is refused from its Content-Length or at the first byte over, never buffered.
MAX_BODY_BYTES = 7 * 1024 * 1024
# Parsed, a JSON object or array costs ~100 bytes however short its text (`{},` is 3), so the worst body under the
# cap would become ~250 MB of dicts. Counting `{` and `[` (strings' included: an overestimate) is a memchr-speed
# pass; one per 8 bytes is far denser than anything the API server sends (its JSON has one per 30-50 bytes, even
# in managedFields), and bounds the parsed objects near 100 MB.
MAX_CONTAINERS = MAX_BODY_BYTES // 8
# Bodies being received at once, all connections together: 20 uploads stalled just under the cap would otherwise
# hold 140 MB until their deadline. Over it a request is answered 503 (the API server's call fails, as it would if
# the process were killed for memory, but only until the deadline, not for a restart). The first SMALL_BODY_BYTES of
# every body are never refused (uvicorn buffers as much per connection anyway), so the API server's reviews, tens
# of KB, are answered whatever large uploads hold the budget.
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024
SMALL_BODY_BYTES = 64 * 1024


class _TooLarge(Exception):
    pass


class _Busy(Exception):
    pass


class _Inflight:
    """Bytes of bodies being received, across all requests of the app."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


LOG_EVERY_SECONDS = 10.0


class Throttled:
    """At most one log line per ``seconds`` for an event that repeats, with the count of those not logged since."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.next, self.dropped = seconds, 0.0, 0

    def due(self) -> int | None:
        """The number dropped since the last line when a line is due now, else None (and this one is dropped)."""
        now = time.monotonic()
        if now < self.next:
            self.dropped += 1
            return None
        dropped, self.dropped, self.next = self.dropped, 0, now + self.seconds
        return dropped


async def _read_body(request: Request, deadline: float, inflight: _Inflight) -> bytearray:
    """The request body; _TooLarge when it exceeds MAX_BODY_BYTES (Content-Length checked first, then counted while
    reading, so at most MAX_BODY_BYTES plus one chunk is ever held); _Busy when the bodies being received would
    exceed MAX_INFLIGHT_BYTES and this one is past its first SMALL_BODY_BYTES; TimeoutError when it has not all arrived within ``deadline`` seconds (a client
    trickling its body would otherwise hold its buffer forever)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _TooLarge
    body = bytearray()
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                if len(body) + len(chunk) > MAX_BODY_BYTES:
                    raise _TooLarge
                if inflight.bytes + len(chunk) > MAX_INFLIGHT_BYTES and len(body) + len(chunk) > SMALL_BODY_BYTES:
                    raise _Busy
                inflight.bytes += len(chunk)
                body += chunk
    finally:
        inflight.bytes -= len(body)
    return body


def _not_json(error: str) -> str:
    """The 400 message for a body orjson refused; two of its messages say something else than they mean."""
    if error.startswith("depth limit exceeded"):  # "[[[[...": a client can send it
        return "request body is nested too deeply to be an AdmissionReview"
    if error.startswith("str is not valid UTF-8"):  # said of any invalid byte, not only of surrogates
        return "request body is not JSON: it is not valid UTF-8"
    return f"request body is not JSON: {error}"


def _log_denial(endpoint: str, kind: str, body: dict[str, Any], answer: Mapping[str, Any]) -> None:
    """One line per denial, so an operator can find why a team's pods are refused without the audit log."""
    request = body.get("request") or {}
    obj = _dict(request.get("object"))
    meta = _dict(obj.get("metadata"))
    name = request.get("name") or meta.get("name") or (f"{meta.get('generateName')}*" if meta.get("generateName") else "")
    message = ((answer.get("response") or {}).get("status") or {}).get("message", "")
    log.info(
        "denied %s %s/%s on /%s (uid %s): %s",
        kind, request.get("namespace") or "", name, endpoint, request.get("uid", ""), message,
    )


def _noop_review(body: Any, snapshot: Snapshot, settings: Any) -> AdmissionReviewResponse:
    """Allowed, unchanged: the benchmark's baseline for the cost of transport alone."""
    request = _dict(body.get("request"))
    uid = request.get("uid")
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": ADMISSION_KIND,
        "response": {"uid": uid if isinstance(uid, str) else "", "allowed": True},
    }


def create_app(
    inventory: Inventory,
    settings: Any,
    *,
    manage_inventory: bool = True,
    readiness: Sequence[Callable[[], str | None]] = (),
) -> FastAPI:
    """The ASGI app. With ``manage_inventory`` the app starts the inventory's feed on start-up and stops it on
    shutdown, so whatever runs the app (uvicorn, a test) owns one lifecycle. ``readiness`` are extra checks for
    ``/readyz`` (each returns None when ready, else the reason), e.g. that the served certificate is trusted."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if manage_inventory:
            inventory.start()
        try:
            yield
        finally:
            if manage_inventory:
                inventory.stop()

    app = FastAPI(title="model-cache webhook", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics(inventory.snapshot)
    app.state.metrics = metrics
    app.state.inventory = inventory

    # One runner per event loop (uvicorn runs one; tests may run the app on several in turn).
    inflight = _Inflight()
    # Under attack these come by the thousand: a line every few seconds says as much.
    busy_log, slow_log = Throttled(LOG_EVERY_SECONDS), Throttled(LOG_EVERY_SECONDS)
    runners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, FifoRunner] = weakref.WeakKeyDictionary()

    def runner() -> FifoRunner:
        loop = asyncio.get_running_loop()
        found = runners.get(loop)
        if found is None:
            found = runners[loop] = FifoRunner(loop)
        return found

    def review(endpoint: str, core: _Core, raw: bytearray, started: float) -> Response:
        body: Any = None
        try:
            containers = raw.count(b"{") + raw.count(b"[")
            if containers > MAX_CONTAINERS:
                raise MalformedReview(
                    f"the body holds {containers} JSON objects and arrays; at most {MAX_CONTAINERS} are accepted (one"
                    " per 8 bytes of the body cap), far more than the API server's JSON ever holds"
                )
            try:
                # orjson: parsing is most of a review's cost once its answer is remembered; twice json's speed.
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise MalformedReview(_not_json(str(exc))) from exc
            if not isinstance(body, dict):
                raise MalformedReview(f"request body must be an AdmissionReview object, got {type(body).__name__}")
            answer = core(body, inventory.snapshot(), settings)
            payload = orjson.dumps(answer)
        except MalformedReview as exc:
            metrics.reviews.labels("unknown", "none", "malformed").inc()
            log.info("malformed review on /%s: %s", endpoint, exc)
            return JSONResponse({"message": f"malformed AdmissionReview: {exc}"}, status_code=400)
        except Exception:
            metrics.reviews.labels("unknown", "none", "error").inc()
            log.exception("unexpected error answering /%s", endpoint)
            return JSONResponse({"message": "internal error; see the webhook's log"}, status_code=500)
        if endpoint != NOOP:
            kind, mode, outcome = _labels(body, answer)
            metrics.reviews.labels(kind, mode, outcome).inc()
            if outcome == "denied":
                _log_denial(endpoint, kind, body, answer)
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return Response(payload, media_type=_JSON)

    async def answer(endpoint: str, core: _Core, request: Request) -> Response:
        try:
            raw = await _read_body(request, settings.review_read_seconds, inflight)
        except _TooLarge:
            # 413, not 400: the body was not read, so nothing is known about it but its size. The connection is
            # closed, as the rest of the body is still on its way.
            metrics.reviews.labels("unknown", "none", "malformed").inc()
            return JSONResponse(
                {"message": f"malformed AdmissionReview: the body is larger than {MAX_BODY_BYTES} bytes"},
                status_code=413,
                headers=_CLOSE,
            )
        except _Busy:
            metrics.reviews.labels("unknown", "none", "error").inc()
            dropped = busy_log.due()
            if dropped is not None:
                log.warning("a review body on /%s was refused: bodies being received exceed %d bytes (%d more refused"
                            " since the last line)", endpoint, MAX_INFLIGHT_BYTES, dropped)
            return JSONResponse(
                {"message": f"the webhook is receiving more than {MAX_INFLIGHT_BYTES} bytes of review bodies; retry"},
                status_code=503,
                headers=_CLOSE,
            )
        except ClientDisconnect:
            # The client went away mid-body (an upload given up, an attacker's abort): nobody to answer, and not an
            # error of ours (uncaught, each one logged a 2 KB "Exception in ASGI application" traceback).
            metrics.reviews.labels("unknown", "none", "malformed").inc()
            return Response(status_code=400, headers=_CLOSE)
        except TimeoutError:
            metrics.reviews.labels("unknown", "none", "malformed").inc()
            dropped = slow_log.due()
            if dropped is not None:
                log.info("a review body on /%s did not arrive within %s s (%d more since the last line)", endpoint,
                         settings.review_read_seconds, dropped)
            return JSONResponse(
                {"message": f"malformed AdmissionReview: the body did not arrive within {settings.review_read_seconds} s"},
                status_code=408,
                headers=_CLOSE,
            )
        started = time.perf_counter()  # the latency metric includes the wait for the reviews ahead
        # In arrival order, the sockets read every few reviews (webhook/fifo.py: why the tail needs it).
        return await runner().run(lambda: review(endpoint, core, raw, started))

    # Plain Starlette routes (app.add_route), not FastAPI path operations: a review needs no dependency injection
    # or response model, and skipping them saves ~25 us of a ~400 us review (bench/admission.py).
    async def mutate(request: Request) -> Response:
        return await answer(MUTATE, admission.mutate_review, request)

    async def validate(request: Request) -> Response:
        return await answer(VALIDATE, admission.validate_review, request)

    async def noop(request: Request) -> Response:
        return await answer(NOOP, _noop_review, request)

    app.add_route("/mutate", mutate, methods=["POST"])
    app.add_route("/validate", validate, methods=["POST"])
    app.add_route("/noop", noop, methods=["POST"])

    @app.get("/healthz")
    async def healthz() -> Response:
        return JSONResponse({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        snap = inventory.snapshot()
        reasons = [] if snap.synced else ["the node and namespace inventory has not completed its first list"]
        reasons += [reason for reason in (check() for check in readiness) if reason]
        if reasons:
            return JSONResponse({"status": "not ready", "reason": "; ".join(reasons)}, status_code=503)
        return JSONResponse({"status": "ready", "nodes": len(snap.nodes), "namespaces": len(snap.namespaces)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        data, content_type = metrics.render()
        return Response(data, media_type=content_type)

    return app
