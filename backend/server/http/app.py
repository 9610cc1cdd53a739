"""The HTTP ports: which routes each serves, and what every request passes first.

The HTTP port serves every door: KServe v2 REST and Triton's generate extension under ``/v2``,
the OpenAI API under ``/v1``, and ``/metrics``. A separate metrics port serves ``/metrics`` and
health. Before a route runs: a restricted API group needs its header (403, Triton's
``--http-restricted-api``), the OpenAI routes need the bearer key when one is set (401, vLLM's
``--api-key``), and a body is read within the idle timeout (408) and up to the body limit (413).
Inference requests are tracked while they run, so a shutdown lets them finish within the grace
period and cancels them after it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from pagedserve.server import metrics
from pagedserve.server.http.context import HttpContext
from pagedserve.server.http.errors import HttpError, compact, error_response
from pagedserve.server.http.generate import GenerateRoutes
from pagedserve.server.http.kserve import KServeRoutes
from pagedserve.server.http.kserve_infer import InferRoute
from pagedserve.server.http.listener import HttpListener
from pagedserve.server.http.openai.lora import LoRARoutes
from pagedserve.server.http.openai.serving import OpenAIError, OpenAIRoutes

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPENAI = "/v1/"


def _error(path: str, status: int, message: str) -> web.Response:
    """An error in the wording of the door the path belongs to."""
    if path.startswith(_OPENAI):
        return OpenAIError(status, message).response()
    return error_response(status, message)


def _middleware(context: HttpContext) -> Any:
    settings = context.settings

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except HttpError as e:
            return _error(request.path, e.status, e.message)
        except web.HTTPRequestEntityTooLarge:
            return _error(request.path, 413, f"the request body exceeds --http-max-input-size "
                                             f"({settings.max_body_bytes} bytes)")
        except TimeoutError:
            return _error(request.path, 408, f"the request body did not arrive within "
                                             f"{settings.idle_timeout:g} s")
        except web.HTTPNotFound:
            return _error(request.path, 404, "Not Found")
        except web.HTTPMethodNotAllowed:
            return _error(request.path, 405, "Method Not Allowed")
        except web.HTTPException:
            raise
        except Exception:
            log.exception("HTTP %s %s failed", request.method, request.path[:200])
            return _error(request.path, 500, "internal error")

    return guard


class _Routes:
    """Adds routes, each behind what its group or door requires."""

    def __init__(self, app: web.Application, context: HttpContext) -> None:
        self.app, self.context = app, context

    def add(self, method: str, path: str, handler: Handler, group: str | None = None,
            tracked: bool = False, api_key: bool = False) -> None:
        restriction = self.context.settings.restrictions.get(group or "")
        key = self.context.settings.api_key if api_key else None
        state = self.context.state
        idle_timeout = self.context.settings.idle_timeout

        async def run(request: web.Request) -> web.StreamResponse:
            if restriction is not None and not restriction.allows(
                    request.headers.get(restriction.header)):
                raise HttpError(403, restriction.http_message())
            if key is not None and not hmac.compare_digest(
                    request.headers.get("Authorization", "").encode(),
                    f"Bearer {key}".encode()):
                return web.Response(body=compact({"error": "Unauthorized"}), status=401,
                                    content_type="application/json")
            if request.can_read_body:
                # Read here, under a deadline, so a client trickling its body cannot hold a
                # handler; the route's own read() then returns these bytes.
                async with asyncio.timeout(idle_timeout):
                    await request.read()
            if not tracked:
                return await handler(request)
            task = asyncio.current_task()
            assert task is not None
            state.open_http_request(task)
            try:
                return await handler(request)
            finally:
                state.close_http_request(task)

        self.app.router.add_route(method, path, run)


def build_app(context: HttpContext, doors: bool) -> web.Application:
    """The application of the HTTP port (``doors``) or of a separate metrics port."""
    app = web.Application(client_max_size=context.settings.max_body_bytes,
                          middlewares=[_middleware(context)])
    routes = _Routes(app, context)
    kserve = KServeRoutes(context)
    for method, path, handler, group in kserve.routes():
        if doors or (group == "health" and path.startswith("/v2/health")):
            routes.add(method, path, handler, group)
    if doors:
        infer, generate = InferRoute(context), GenerateRoutes(context)
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version:[0-9]+}"):
            routes.add("POST", base + "/infer", infer.infer, "inference", tracked=True)
            routes.add("POST", base + "/generate", generate.generate, "inference", tracked=True)
            routes.add("POST", base + "/generate_stream", generate.generate_stream,
                       "inference", tracked=True)
        for method, path, handler in OpenAIRoutes(context).routes():
            routes.add(method, path, handler, tracked=method == "POST", api_key=True)
        if context.settings.runtime_lora_updating:  # else not found, as vLLM's without it
            log.warning("LoRA dynamic loading & unloading is enabled in the API server. This "
                        "should ONLY be used for local development!")
            for method, path, handler in LoRARoutes(context).routes():
                routes.add(method, path, handler, api_key=True)

    async def scrape(request: web.Request) -> web.Response:
        # Triton's metrics belong to no restricted group.
        return web.Response(body=metrics.render(context.registry),
                            headers={"Content-Type": metrics.CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", scrape)
    return app


class HttpFront:
    """The server's HTTP port and, when it differs, its metrics port."""

    def __init__(self, context: HttpContext, host: str, http_port: int,
                 metrics_port: int) -> None:
        self.listeners: list[tuple[str, HttpListener]] = []
        if http_port:
            self.listeners.append(("HTTPService", HttpListener(
                build_app(context, doors=True), host, http_port, context.settings)))
        if metrics_port and metrics_port != http_port:
            self.listeners.append(("Metrics Service", HttpListener(
                build_app(context, doors=False), host, metrics_port, context.settings)))

    async def start(self) -> None:
        for _, listener in self.listeners:
            await listener.start()

    async def stop(self) -> None:
        for _, listener in self.listeners:
            await listener.stop()
