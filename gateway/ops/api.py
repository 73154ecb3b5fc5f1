"""The management API: HTTP + JSON on ``[listen] http`` (loopback by default).

Every route is a line of :data:`~gateway.ops.routes.ROUTES`: method, path,
handler, the query and path parameters it takes (:mod:`gateway.ops.query`),
its body and its answers.  The dispatcher follows that table, and the OpenAPI document
(``GET /openapi.json``, :mod:`gateway.ops.openapi`) is made from it, so
the two cannot part.  Every list answers ``{"items", "total", "limit",
"offset"}``.

Every answer but ``/metrics`` is JSON; errors are ``{"error": "..."}`` with the
HTTP status that fits (400 bad parameter or body, 401 no/wrong token, 404,
405 with ``Allow``, 409 conflict, 413, 422 unknown destination, 503 provider
absent or unhealthy).  When ``[http] token_file`` is set every request needs
``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import json
import os
import time

from twisted.application.service import IServiceCollection, Service
from twisted.internet.defer import inlineCallbacks, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from gateway import IMPLEMENTATION_CLASS_UID, __version__
from gateway.interfaces import IHealthCheck, IReconfigurable, JobNotFailed
from gateway.net.listener import Listener
from gateway.ops.query import MAX_LIMIT, QueryError, parse_query
from gateway.ops.routes import ROUTES, STUDY_FILTERS

MAX_BODY = 1 << 20


class ApiError(Exception):
    def __init__(self, code: int, message: str, headers=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers or {}


def _walk(service):
    yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from _walk(child)


@inlineCallbacks
def _found(d, missing: str):
    """(200, what ``d`` fires with), or a 404 saying ``missing`` when it fires with None."""
    found = yield d
    if found is None:
        raise ApiError(404, missing)
    return 200, found


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@implementer(IReconfigurable)
class ApiService(Service):
    """What the API reads (the service "api"): the running gateway and the
    optional providers."""

    log = Logger()
    name = "api"

    def __init__(self, config, root, reactor, pool, *, scp, storage, metrics, recent,
                 exports=None, destinations=None, payloads=None, studies=None, pipelines=None,
                 reports=(), degradations=()):
        self.config = config
        self.root = root
        self.reactor = reactor
        self.pool = pool
        self.scp = scp
        self.storage = storage
        self.metrics = metrics
        self.recent = recent
        self.exports = exports
        self.destinations = destinations
        self.payloads = payloads
        self.studies = studies  # IStudyQuery
        self.pipelines = pipelines  # IPipelineJobs
        self.reports = tuple(reports)  # IStatusReport: sections of /status, gauges of /metrics
        self.degradations = tuple(degradations)  # IDegradation: why /health says "degraded"
        self.started = reactor.seconds()

    def reconfigure(self, config):
        self.config = config  # the token may have changed

    def site(self) -> Site:
        site = Site(ApiResource(self))
        site.noisy = False
        return site

    # ---- facts ---------------------------------------------------------------

    def listeners(self) -> dict:
        out = {}
        for svc in _walk(self.root):
            if isinstance(svc, Listener):
                state, detail = svc.state()
                out[svc.name] = {"state": state, ("address" if state == "up" else "detail"): detail}
        return out

    def _statvfs(self):
        root = self.storage.root
        st = os.statvfs(root)
        total = st.f_blocks * st.f_frsize
        free = st.f_bavail * st.f_frsize
        return {"root": root, "total_bytes": total, "free_bytes": free,
                "used_percent": round(100.0 * (total - st.f_bfree * st.f_frsize) / total, 2) if total else 0.0}

    def storage_usage(self):
        return deferToThreadPool(self.reactor, self.pool, self._statvfs)

    @inlineCallbacks
    def health(self):
        reasons = []
        if not self.running:
            reasons.append("the gateway is stopping")
        for name, info in self.listeners().items():
            if name != "http" and info["state"] != "up":
                reasons.append(f"listener {name} is {info['state']}"
                               + (f": {info.get('detail')}" if info.get("detail") else ""))
        try:
            yield self.storage_usage()
        except OSError as e:
            reasons.append(f"storage root {self.storage.root} is not usable: {e.strerror}")
        for svc in _walk(self.root):
            if IHealthCheck.providedBy(svc):
                reasons.extend(svc.health_problems())
        return reasons

    def degraded(self) -> list:
        """Why the gateway works, but not fully."""
        return [r for svc in self.degradations for r in svc.degraded_reasons()]

    def active_associations(self) -> list:
        out = []
        for a in sorted(self.scp.active, key=lambda a: a.started):
            out.append({"association": a.id, "peer": a.info.peer,
                        "calling_ae": a.calling_ae, "called_ae": a.called_ae,
                        "started": _iso(a.started), "instances": a.instances, "bytes": a.bytes,
                        "failures": a.failures})
        return out


class ApiResource(Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, api: ApiService):
        super().__init__()
        self.api = api

    # ---- dispatch ---------------------------------------------------------

    def render(self, request):
        gone = []  # a client that goes away before the answer gets none
        request.notifyFinish().addErrback(gone.append)
        d = maybeDeferred(self._dispatch, request)
        d.addCallbacks(self._write, self._error, callbackArgs=(request, gone), errbackArgs=(request, gone))
        d.addErrback(lambda f: self.log.failure("writing an API response", f))
        return NOT_DONE_YET

    def _dispatch(self, request):
        self._authorize(request)
        segments = [s.decode("utf-8", "replace") for s in request.postpath]
        if segments and segments[-1] == "":
            segments.pop()
        method = request.method.decode("ascii", "replace")
        allowed = []
        for route in ROUTES:
            pattern = route.segments
            if len(pattern) != len(segments):
                continue
            args = {}
            for p, s in zip(pattern, segments):
                if p.startswith("{"):
                    args[p[1:-1]] = s
                elif p != s:
                    break
            else:
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    try:
                        query = parse_query(request.args, route.params)
                    except QueryError as e:
                        raise ApiError(400, str(e)) from None
                    values = []
                    for name, param in route.path_params.items():
                        try:
                            values.append(param.check(args[name]))
                        except ValueError as e:
                            raise ApiError(400, f"path parameter {name!r}: {args[name]!r} {e}") from None
                    return getattr(self, route.handler)(request, query, *values)
                allowed.append(route.method)
        if allowed:
            allowed += ["HEAD"] if "GET" in allowed else []
            raise ApiError(405, f"{method} is not allowed on /{'/'.join(segments)}",
                           {"Allow": ", ".join(sorted(set(allowed)))})
        raise ApiError(404, f"no such resource: /{'/'.join(segments)}")

    def _authorize(self, request):
        token = self.api.config.http.token
        if not token:
            return
        header = (request.getHeader("authorization") or "").strip()
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(401, "a valid bearer token is required (Authorization: Bearer <token>)",
                           {"WWW-Authenticate": 'Bearer realm="dicomgw"'})

    def _write(self, result, request, gone=()):
        code, body = result[0], result[1]
        if isinstance(body, str):  # /metrics, whose content type comes with it
            data = body.encode("utf-8")
            ctype = "text/plain; charset=utf-8"
        else:
            data = (json.dumps(body, indent=1, default=str) + "\n").encode("utf-8")
            ctype = "application/json; charset=utf-8"
        if request.finished or gone:
            return
        request.setResponseCode(code)
        request.setHeader("content-type", ctype)
        request.setHeader("cache-control", "no-store")
        for k, v in (result[2] if len(result) > 2 else {}).items():
            request.setHeader(k, v)
        request.setHeader("content-length", str(len(data)))
        if request.method != b"HEAD":
            request.write(data)
        request.finish()

    def _error(self, failure, request, gone=()):
        if failure.check(ApiError):
            e = failure.value
            return self._write((e.code, {"error": e.message}, e.headers), request, gone)
        self.log.failure("management API: {method} {path} failed", failure,
                         method=request.method, path=request.path)
        return self._write((500, {"error": "internal error; see the gateway log"}), request, gone)

    # ---- helpers ---------------------------------------------------------------

    def _provider(self, name, what):
        provider = getattr(self.api, name)
        if provider is None:
            raise ApiError(503, f"{what} is not available in this gateway (no {name} service configured)")
        return provider

    def _json_body(self, request) -> dict:
        length = request.getHeader("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        request.content.seek(0)
        raw = request.content.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(raw or b"null")
        except ValueError as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    # ---- handlers --------------------------------------------------------------

    @inlineCallbacks
    def get_health(self, request, query):
        reasons = yield self.api.health()
        if reasons:
            return 503, {"status": "unhealthy", "reasons": reasons}
        degraded = self.api.degraded()
        if degraded:
            return 200, {"status": "degraded", "reasons": degraded}
        return 200, {"status": "ok"}

    @inlineCallbacks
    def get_status(self, request, query):
        api = self.api
        try:
            storage = yield api.storage_usage()
        except OSError as e:
            storage = {"root": api.storage.root, "error": e.strerror}
        active = api.active_associations()
        queues = {"disk_jobs": api.pool.queued(),
                  "disk_pending_bytes": sum(w.pending for a in api.scp.active for w in a.writers)}
        if api.exports is not None:
            queued = yield api.exports.jobs(limit=MAX_LIMIT, offset=0, state="queued")
            queues["export_jobs_queued"] = len(queued)
        sections = {}
        for report in api.reports:
            name, section = yield report.status_report()
            sections[name] = section
        return 200, {
            **sections,
            "version": __version__,
            "implementation_class_uid": IMPLEMENTATION_CLASS_UID,
            "config": api.config.path,
            "uptime_seconds": round(api.reactor.seconds() - api.started, 3),
            "listeners": api.listeners(),
            "associations": {"active": len(active), "list": active},
            "storage": storage,
            "queues": queues,
        }

    @inlineCallbacks
    def get_metrics(self, request, query):
        api = self.api
        gauges = [("dicomgw_active_associations", "Associations in progress.",
                   [({}, len(api.scp.active))])]
        try:
            usage = yield api.storage_usage()
        except OSError:
            pass
        else:
            gauges.append(("dicomgw_storage_free_bytes", "Bytes available to the gateway under the storage root.",
                           [({}, usage["free_bytes"])]))
            gauges.append(("dicomgw_storage_total_bytes", "Size of the file system of the storage root.",
                           [({}, usage["total_bytes"])]))
        for report in api.reports:
            gauges.extend((yield report.metric_gauges()))
        accept = request.getHeader("accept")
        content_type, text = api.metrics.render(gauges, accept)
        return 200, text, {"content-type": content_type}

    def get_openapi(self, request, query):
        from gateway.ops.openapi import document

        return 200, document()

    @staticmethod
    def _page(query, total, items):
        return 200, {"items": items, "total": total, "limit": query["limit"], "offset": query["offset"]}

    @inlineCallbacks
    def get_associations(self, request, query):
        # The recent ones of this process, or (nodes sharing an index) the index's, of every node.
        total, items = yield maybeDeferred(self.api.recent.page, query["limit"], query["offset"])
        return self._page(query, total, items)

    @inlineCallbacks
    def _page_of(self, query, fetch, count):
        """One page of a provider's list (``limit``, ``offset``, ``state``) and its total."""
        items = yield fetch(limit=query["limit"], offset=query["offset"], state=query["state"])
        total = yield count(state=query["state"])
        return self._page(query, total, items)

    def get_exports(self, request, query):
        exports = self._provider("exports", "export")
        return self._page_of(query, exports.jobs, exports.count)

    def get_export(self, request, query, job_id):
        return _found(self._provider("exports", "export").job(job_id), f"no export job {job_id!r}")

    def _names(self, body, name):
        value = body.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
            raise ApiError(400, f"{name!r} must be a non-empty list of strings")
        return value

    def _only(self, body, fields):
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")

    @inlineCallbacks
    def _submit(self, exports, destinations, paths, origin):
        try:
            ids = yield exports.submit(destinations, paths, origin)
        except KeyError as e:
            raise ApiError(422, f"unknown destination {e.args[0] if e.args else ''!r}") from None
        return list(ids)

    @inlineCallbacks
    def post_exports(self, request, query):
        exports = self._provider("exports", "export")
        body = self._json_body(request)
        self._only(body, ("destinations", "paths"))
        destinations, paths = self._names(body, "destinations"), self._names(body, "paths")
        problems = yield deferToThreadPool(self.api.reactor, self.api.pool, self._check_paths, paths)
        if problems:
            raise ApiError(400, "; ".join(problems))
        ids = yield self._submit(exports, destinations, [os.path.realpath(p) for p in paths], "api")
        return 202, {"jobs": ids}

    def _check_paths(self, paths):
        root = os.path.realpath(self.api.storage.root)
        problems = []
        for p in paths:
            try:
                real = os.path.realpath(p)
                os.fsencode(real)
            except ValueError:  # a NUL byte, a lone surrogate: no file has that name
                problems.append(f"{p!r} is not a valid path")
                continue
            if os.path.commonpath([root, real]) != root:
                problems.append(f"{p!r} is outside the storage root {root}")
            elif not os.path.isfile(real):
                problems.append(f"{p!r} is not a file")
        return problems

    def get_destinations(self, request, query):
        destinations = self._provider("destinations", "destinations")
        names = sorted(destinations.names())
        items = []
        for name in names[query["offset"]:query["offset"] + query["limit"]]:
            d = self.api.config.destination_named(name)
            items.append({"name": name, "kind": None if d is None else "dicomweb" if d.dicomweb else "dimse",
                          "ae_title": getattr(d, "ae_title", None), "host": getattr(d, "host", None),
                          "port": getattr(d, "port", None), "tls": bool(d and (d.tls or d.https)),
                          "url": getattr(d, "dicomweb", None)})
        return self._page(query, len(names), items)

    @inlineCallbacks
    def post_echo(self, request, query, name):
        destinations = self._provider("destinations", "destinations")
        if name not in set(destinations.names()):
            raise ApiError(404, f"no destination named {name!r}")
        try:
            result = yield destinations.echo(name)
        except KeyError:
            raise ApiError(404, f"no destination named {name!r}") from None
        return (200 if result.get("ok") else 502), result

    def get_payloads(self, request, query):
        payloads = self._provider("payloads", "payload query")
        return self._page_of(query, payloads.payloads, payloads.count)

    @inlineCallbacks
    def post_retry(self, request, query, payload_id, pipeline):
        pipelines = self._provider("pipelines", "pipeline jobs")
        try:
            job = yield pipelines.retry(payload_id, pipeline)
        except JobNotFailed as e:
            raise ApiError(409, f"payload {payload_id!r}, pipeline {pipeline!r}: {e}; only a failed job "
                                "runs again") from None
        if job is None:
            raise ApiError(404, f"payload {payload_id!r} has no job of pipeline {pipeline!r}")
        return 202, job

    @inlineCallbacks
    def get_studies(self, request, query):
        studies = self._provider("studies", "the instance index")
        filters = {name: query[name] for name in STUDY_FILTERS}
        page = yield studies.studies(limit=query["limit"], offset=query["offset"], **filters)
        return self._page(query, page["total"], page["items"])

    def get_study(self, request, query, uid):
        return _found(self._provider("studies", "the instance index").study(uid),
                      f"no instance of study {uid!r} is held")

    @inlineCallbacks
    def post_study_export(self, request, query, uid):
        studies = self._provider("studies", "the instance index")
        exports = self._provider("exports", "export")
        body = self._json_body(request)
        self._only(body, ("destinations",))
        destinations = self._names(body, "destinations")
        paths = yield studies.files(uid)
        if not paths:
            raise ApiError(404, f"no instance of study {uid!r} is held")
        ids = yield self._submit(exports, destinations, paths, f"api study:{uid}")
        jobs = []
        for job_id in ids:
            job = yield exports.job(job_id)
            if job is not None:
                job.pop("file_statuses", None)
                jobs.append(job)
        return 202, {"StudyInstanceUID": uid, "files": len(paths), "jobs": jobs}
