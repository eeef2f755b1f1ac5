"""Serving the web view with uvicorn: in the foreground (`rtsc web`) or on a thread.

The listening socket is bound before uvicorn starts, so its port is known at once
(``port`` 0: any free port) and a bind error is raised here, naming the address.
"""

from __future__ import annotations

import ipaddress
import signal
import socket
import threading
import time
from typing import Any

import uvicorn

from rtsc.errors import RtscError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``.

    Raises
    ------
    RtscError
        The address cannot be bound (in use, not this host's).
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        family = socket.AF_INET  # a host name
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RtscError(f"web.host/web.port: cannot listen on {host}:{port}: "
                        f"{exc.strerror or exc}") from exc
    sock.listen(128)
    return sock


def _server(app: Any) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                         access_log=False))


def _interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


def serve_forever(app: Any, sock: socket.socket) -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C or SIGTERM, then return.

    uvicorn shuts down gracefully on either and then raises the signal again for the
    handler it found; that handler ends this call instead of the process.
    """
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _server(app).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


class WebServer:
    """uvicorn on its own thread (tests, embedding).

    Parameters
    ----------
    app : the ASGI app (:func:`rtsc.web.app.create_app`)
    host, port : where to listen (port 0: any free port)
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "WebServer":
        """Listen, start serving, return once the app has started (raises if it did not)."""
        sock = bind(self.host, self.port)
        self.port = int(sock.getsockname()[1])
        self._server = _server(self.app)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="rtsc-web-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:  # uvicorn offers no event to wait on
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RtscError(f"rtsc web did not start on {self.url}")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        """Stop serving (closes the feed through the app's lifespan)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)

    def __enter__(self) -> "WebServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
