"""`rtsc web`'s ASGI application (Starlette): the page, its websocket, JSON, reports.

Routes (all read-only, all behind the token when ``web.token`` is set):

- ``/``: the page (``static/index.html``; ``/static/`` its script and style);
- ``/ws``: a websocket; each viewer gets every card, then each card again when it
  changes, at most ``updates_per_s`` times per second per scanner (the newest card
  replaces one a slow viewer has not taken yet, so no viewer slows another or the feed);
- ``/api/state``: JSON, every scanner's current series, last volume index and the
  day's series;
- ``/report/{scanner}/{series}``: a finished series' report.html, when the view knows
  that series and its scanner's session folder holds the report.

The :class:`Hub` lives on the server's event loop; the feed thread only pokes it
(``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketClose, WebSocketDisconnect

from rtsc.web.feed import Feed
from rtsc.web.sessions import report_in
from rtsc.web.state import FinishedSeries

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
COOKIE = "rtsc_web_token"


class Viewer:
    """One websocket: the newest card per scanner not sent yet."""

    def __init__(self) -> None:
        self.pending: dict[str, str] = {}
        self.wake = asyncio.Event()

    def put(self, name: str, text: str) -> None:
        self.pending[name] = text
        self.wake.set()

    def take(self) -> list[str]:
        texts = list(self.pending.values())
        self.pending.clear()
        self.wake.clear()
        return texts


class Hub:
    """The viewers and the throttled card updates (on the event loop).

    Parameters
    ----------
    feed : Feed, whose states are shown
    updates_per_s : float, at most this many updates per second per scanner
    """

    def __init__(self, feed: Feed, updates_per_s: float = 4.0) -> None:
        self.feed = feed
        self.interval_s = 1.0 / updates_per_s
        self.viewers: set[Viewer] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._dirty: set[str] = set()
        self._sent: dict[str, float] = {}
        self._links: dict[str, set[str]] = {}
        self._wake: asyncio.Event | None = None

    # -- called on the feed thread --

    def poke(self, name: str) -> None:
        """Scanner ``name`` changed (thread-safe)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._mark, name)

    # -- on the loop --

    def _mark(self, name: str) -> None:
        self._dirty.add(name)
        if self._wake is not None:
            self._wake.set()

    def report_path(self, name: str, entry: FinishedSeries) -> Path | None:
        """The report.html of a finished series here, or None (unknown, not written)."""
        source = self.feed.sources.get(name)
        if source is None or source.session_dir is None or entry.report is None:
            return None
        path = report_in(source.session_dir, entry.report)
        return path if path is not None and path.is_file() else None

    def link(self, name: str) -> Any:
        """callable(FinishedSeries) -> the URL of its report (relative), or None."""
        def link(entry: FinishedSeries) -> str | None:
            return (f"report/{name}/{entry.series}"
                    if self.report_path(name, entry) is not None else None)
        return link

    def card_text(self, name: str) -> str:
        """The ``card`` message of scanner ``name`` as JSON text."""
        with self.feed.lock:
            card = self.feed.states[name].card(self.link(name))
        self._links[name] = {r["series"] for r in card["day_series"] if r["report_url"]}
        return json.dumps({"type": "card", "card": card}, allow_nan=False)

    async def watch_reports(self, period_s: float = 2.0) -> None:
        """Send a card again when a report of its day's series appeared (report.html is
        written by its own process after series.end, so no message announces it)."""
        while True:
            await asyncio.sleep(period_s)
            for name in self.feed.states:
                with self.feed.lock:
                    entries = self.feed.states[name].day_series()
                linked = {e.series for e in entries if self.report_path(name, e) is not None}
                if linked != self._links.get(name, set()):
                    self._mark(name)

    async def run(self) -> None:
        """Send the changed cards to every viewer, each scanner at most once per interval."""
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            now = loop.time()
            later = math.inf
            for name in sorted(self._dirty):
                due = self._sent.get(name, -math.inf) + self.interval_s
                if now < due:
                    later = min(later, due)
                    continue
                self._dirty.discard(name)
                self._sent[name] = now
                text = self.card_text(name)
                for viewer in self.viewers:
                    viewer.put(name, text)
            if later < math.inf:
                loop.call_at(later, self._wake.set)

    async def serve(self, websocket: WebSocket) -> None:
        """One viewer: every card now, then the updates, until it goes away."""
        await websocket.accept()
        viewer = Viewer()
        for name in self.feed.states:
            viewer.put(name, self.card_text(name))
        self.viewers.add(viewer)
        sender = asyncio.create_task(self._send(websocket, viewer))
        try:
            while True:  # viewers send nothing that matters; this notices them leave
                await websocket.receive_text()
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.viewers.discard(viewer)
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sender

    @staticmethod
    async def _send(websocket: WebSocket, viewer: Viewer) -> None:
        while True:
            await viewer.wake.wait()
            for text in viewer.take():
                await websocket.send_text(text)


class TokenGate:
    """Refuse every request without the access token (401; a websocket: closed).

    The token is taken from ``?token=``, the cookie :data:`COOKIE` or the header
    ``Authorization: Bearer TOKEN``. A page request (``GET /``) with the right
    ``?token=`` is redirected to ``/`` with the cookie set, so the token leaves the
    address bar and the page's websocket carries the cookie.
    """

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.token = token

    def _given(self, conn: HTTPConnection) -> tuple[str | None, bool]:
        query = conn.query_params.get("token")
        if query is not None:
            return query, True
        auth = conn.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip(), False
        return conn.cookies.get(COOKIE), False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.token is None or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        given, in_query = self._given(conn)
        ok = given is not None and hmac.compare_digest(given.encode(), self.token.encode())
        if not ok:
            if scope["type"] == "websocket":
                await WebSocketClose(code=1008)(scope, receive, send)
            else:
                await PlainTextResponse("401 Unauthorized: open the page as /?token=TOKEN "
                                        "(web.token)", status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})(
                    scope, receive, send)
            return
        if in_query and scope["type"] == "http" and conn.url.path == "/":
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def create_app(feed: Feed, token: str | None = None, updates_per_s: float = 4.0) -> ASGIApp:
    """The web view of ``feed`` (started and closed with the app's lifespan).

    Parameters
    ----------
    feed : Feed, not started
    token : str or None, the access token every request needs (None: none)
    updates_per_s : float, at most this many card updates per second per scanner
    """
    hub = Hub(feed, updates_per_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub.loop = asyncio.get_running_loop()
        feed.on_change = hub.poke
        await asyncio.to_thread(feed.start)
        tasks = [asyncio.create_task(hub.run()), asyncio.create_task(hub.watch_reports())]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await asyncio.to_thread(feed.close)

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def state(request: Request) -> JSONResponse:
        scanners = []
        with feed.lock:
            for name, scanner in feed.states.items():
                link = hub.link(name)
                scanners.append({**scanner.summary(),
                                 "day_series": [f.row(link(f)) for f in scanner.day_series()]})
        return JSONResponse({"time": time.time(), "scanners": scanners})

    async def report(request: Request) -> Any:
        name, series = request.path_params["scanner"], request.path_params["series"]
        with feed.lock:
            scanner = feed.states.get(name)
            entry = None if scanner is None else scanner.finished.get(series)
        path = None if entry is None else hub.report_path(name, entry)
        if path is None:
            return PlainTextResponse("404 Not Found: no such report", status_code=404)
        return FileResponse(path, media_type="text/html",
                            headers={"X-Content-Type-Options": "nosniff"})

    app = Starlette(routes=[
        Route("/", page),
        Route("/api/state", state),
        Route("/report/{scanner}/{series}", report),
        WebSocketRoute("/ws", hub.serve),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], lifespan=lifespan)
    app.state.hub = hub
    return TokenGate(app, token)
