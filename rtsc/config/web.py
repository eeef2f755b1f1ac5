"""Configuration of `rtsc web`: the read-only live page for several scanners."""

from __future__ import annotations

import re
from dataclasses import dataclass

from rtsc.config.fields import _spec
from rtsc.errors import ConfigError

#: A scanner name: it appears in URLs and element ids.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: ZeroMQ endpoints a web view connects to.
ENDPOINT_PATTERN = re.compile(r"^(tcp://[^\s/]+:[0-9]+|ipc://\S+)$")
#: Shortest access token accepted (characters).
MIN_TOKEN = 16


@dataclass(frozen=True)
class WebSourceConfig:
    """One rtsc publisher the web view subscribes to (one card on the page)."""

    name: str = _spec("scanner", doc="the scanner's name on its card and in URLs (letters, "
                                     "digits, '_', '.', '-'; at most 64)")
    endpoint: str = _spec("tcp://127.0.0.1:5556", doc="its PUB endpoint (publish.endpoint "
                                                      "of that rtsc, as reached from here)")
    snapshot_endpoint: str | None = _spec(
        None, doc="its snapshot endpoint, to show the current series so far when the view "
                  "starts late (null: live messages only)")
    session_dir: str | None = _spec(
        None, doc="its session.dir as mounted here: the day's series finished before the "
                  "view started, and report.html links (null: neither)")
    curve_server_key: str | None = _spec(
        None, doc="CURVE: that publisher's public .key certificate (null: no CURVE); needs "
                  "web.curve_secret_key")


@dataclass(frozen=True)
class WebConfig:
    """`rtsc web`: a read-only live page of one card per scanner, and JSON at /api/state.

    With `sources` empty, the view shows this configuration's own publisher
    (`publish.endpoint`, `publish.snapshot_endpoint`, `session.dir`, CURVE from
    `publish.curve_secret_key`), named after the host.
    """

    host: str = _spec("127.0.0.1", doc="address the web server binds (0.0.0.0: every "
                                       "interface; then set a token)")
    port: int = _spec(8080, lo=0, hi=65535, doc="its TCP port (0: any free port)")
    token: str | None = _spec(
        None, doc=f"access token every request must carry (?token= once, then a cookie; or "
                  f"the header Authorization: Bearer TOKEN); at least {MIN_TOKEN} "
                  f"characters; null: no token")
    sources: list[WebSourceConfig] = _spec(
        [], doc="the publishers shown, one card each; empty: the local publisher")
    curve_secret_key: str | None = _spec(
        None, doc="CURVE: this view's .key_secret certificate (its public key in each "
                  "CURVE publisher's curve_clients_dir)")
    history_volumes: int = _spec(600, lo=10, hi=100000,
                                 doc="volumes kept per trace (the newest)")
    updates_per_s: float = _spec(4.0, lo=0.5, hi=50.0,
                                 doc="at most this many updates per second per scanner "
                                     "to each page")

    def __post_init__(self) -> None:
        if self.token is not None and len(self.token) < MIN_TOKEN:
            raise ConfigError(f"web.token: a token of {len(self.token)} characters is too "
                              f"short; allowed: at least {MIN_TOKEN} characters (e.g. python "
                              f"-c 'import secrets; print(secrets.token_urlsafe())'), or null")
        names: set[str] = set()
        for i, source in enumerate(self.sources):
            key = f"web.sources[{i}]"
            if not NAME_PATTERN.match(source.name):
                raise ConfigError(f"{key}.name: {source.name!r} is not allowed; allowed: 1-64 "
                                  "letters, digits, '_', '.', '-', starting with a letter or "
                                  "digit")
            if source.name in names:
                raise ConfigError(f"{key}.name: {source.name!r} is used twice; each source "
                                  "needs its own name")
            names.add(source.name)
            for field_name in ("endpoint", "snapshot_endpoint"):
                value = getattr(source, field_name)
                if value is not None and not ENDPOINT_PATTERN.match(value):
                    raise ConfigError(f"{key}.{field_name}: {value!r} is not an endpoint to "
                                      "connect to; allowed: tcp://HOST:PORT or ipc://PATH")
            if source.curve_server_key is not None and self.curve_secret_key is None:
                raise ConfigError(f"{key}.curve_server_key: {source.curve_server_key!r} is "
                                  "set but web.curve_secret_key is null; give this view's "
                                  ".key_secret certificate too")
