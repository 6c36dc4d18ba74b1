"""The ingress's metrics (names, descriptions and labels: stages/metrics.py, the one table): every HTTP
request by route template, task and status with its end-to-end time (`RequestMetricsMiddleware`),
and around every stage call the calls in flight and their time, the retries and the refused media
fetches (`StageMetrics`, used by pipeline.py).
"""
from __future__ import annotations

import asyncio
import time
from contextlib import contextmanager

from starlette.routing import Match

from stages import metrics as m

NO_TASK = "none"          # routes without a task, and requests refused before they were routed
UNMATCHED_ROUTE = "unmatched"
CLIENT_CLOSED = 499       # the client left before the answer ended (nginx's code for it)
_STATE_TASK = "lance_task"


def note_task(request, task: str) -> None:
    """Label the request's metrics with its routed task (the handler knows it once parsed)."""
    request.scope.setdefault("state", {})[_STATE_TASK] = task


class RequestMetricsMiddleware:
    """ASGI middleware, outermost: counts every HTTP request and times it to its last byte (a stream's
    too). The route label is the template of the app's route table that matches the path (also for
    requests answered before routing: 401, 413), never the raw path."""

    def __init__(self, app, router):
        self.app, self.router = app, router

    def route_label(self, scope) -> str:
        route = scope.get("route")
        if route is None:
            for candidate in self.router.routes:
                match, _ = candidate.matches(scope)
                if match is not Match.NONE:
                    route = candidate
                    break
        return getattr(route, "path", None) or UNMATCHED_ROUTE

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status, ended = None, False

        async def send_and_watch(message):
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True

        outcome = None
        try:
            await self.app(scope, receive, send_and_watch)
        except asyncio.CancelledError:
            outcome = CLIENT_CLOSED
            raise
        except Exception:
            outcome = status or 500
            raise
        finally:
            if outcome is None:
                outcome = status if ended and status is not None else CLIENT_CLOSED
            route = self.route_label(scope)
            task = m.task_label((scope.get("state") or {}).get(_STATE_TASK, NO_TASK))
            task = NO_TASK if task == "other" else task
            m.inc(m.REQUESTS, route=route, task=task, status=str(outcome))
            m.observe(m.REQUEST_DURATION, time.perf_counter() - start, route=route, task=task)


class StageMetrics:
    """Stage calls seen from one ingress replica (or the video job store)."""

    def __init__(self):
        self._in_flight = {"thinker": 0, "dit": 0}
        for stage in self._in_flight:   # 0 before the first event, not "no data"
            m.declare(m.RETRIES, stage=stage)
            m.set_gauge(m.STAGE_IN_FLIGHT, 0, stage=stage)
        for reason in fetch_refusal_reasons():
            m.declare(m.FETCHES_REFUSED, reason=reason)

    @contextmanager
    def stage_call(self, stage: str):
        """The call counts as in flight until it ends."""
        self._in_flight[stage] += 1
        m.set_gauge(m.STAGE_IN_FLIGHT, self._in_flight[stage], stage=stage)
        try:
            yield
        finally:
            self._in_flight[stage] -= 1
            m.set_gauge(m.STAGE_IN_FLIGHT, self._in_flight[stage], stage=stage)

    @contextmanager
    def timed(self, stage: str, task: str):
        """The call's time, recorded when it succeeds (not for a generator's body: see `call_done`)."""
        start = time.perf_counter()
        yield
        self.call_done(stage, task, start)

    def call_done(self, stage: str, task: str, start: float) -> None:
        """A call that started at `start` (perf_counter) has its result. A streaming call records this
        before it yields its result: its consumer closes it right after, so nothing after runs."""
        m.observe(m.STAGE_CALL_DURATION, time.perf_counter() - start, stage=stage, task=m.task_label(task))

    def retry(self, stage: str) -> None:
        m.inc(m.RETRIES, stage=stage)


def fetch_refusal_reasons() -> tuple[str, ...]:
    from .safe_fetch import FAILURE_KINDS, REFUSAL_KINDS

    return ("disabled", *REFUSAL_KINDS, *FAILURE_KINDS)


def fetch_refused(reason: str) -> None:
    """A remote media URL not used: `reason` is "disabled" (remote media off) or a safe_fetch kind."""
    m.inc(m.FETCHES_REFUSED, reason=reason if reason in fetch_refusal_reasons() else "other")
