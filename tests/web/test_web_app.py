"""`rtsc web`'s app served by uvicorn on a free port, fed by a real rtsc Publisher: JSON
at /api/state, cards over the websocket, the access token, report links, CURVE."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from rtsc import messages
from rtsc.config import config_from_dict
from rtsc.curve import CurveClient, CurveServer, create_pair
from rtsc.errors import ConfigError, RtscError
from rtsc.output.publish import Publisher
from rtsc.web.app import COOKIE, create_app
from rtsc.web.feed import Feed, Source, resolve_sources
from rtsc.web.server import WebServer

SERIES = "0123456789ab"
TOKEN = "a-long-enough-token-0123456789"


@pytest.fixture
def publisher():
    pub = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
    pub.start()
    yield pub
    pub.close()


def publish_volumes(pub: Publisher, indices: range, series: str = SERIES) -> None:
    for i in indices:
        pub.publish(messages.volume(i, None, time.time(), {"framewise_displacement": 0.1 * i}),
                    series)


def wait_for(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def serve(sources: list[Source], token: str | None = None) -> WebServer:
    return WebServer(create_app(Feed(sources), token))  # started by `with`


def scanner(client: httpx.Client, url: str, name: str = "scan1") -> dict[str, Any]:
    state = client.get(f"{url}/api/state").json()
    return next(s for s in state["scanners"] if s["name"] == name)


def test_late_view_gets_the_run_so_far_then_live_cards(publisher: Publisher) -> None:
    publisher.publish(messages.series_start([8, 8, 4], [3.0] * 3, 2.0, 10, "brain"), SERIES)
    publish_volumes(publisher, range(3))
    source = Source("scan1", publisher.endpoint, publisher.snapshot_endpoint)
    with serve([source, Source("scan2", "tcp://127.0.0.1:9")]) as server, httpx.Client() as http:
        state = scanner(http, server.url)  # the snapshot: before any live message
        assert (state["series"], state["last_index"], state["n_volumes"],
                state["n_expected"]) == (SERIES, 2, 3, 10)
        assert scanner(http, server.url, "scan2")["series"] is None
        page = http.get(server.url + "/")
        assert page.status_code == 200 and 'id="cards"' in page.text
        assert "new WebSocket" in http.get(server.url + "/static/web.js").text
        ws_url = server.url.replace("http", "ws") + "/ws"
        with connect(ws_url, open_timeout=5) as one, connect(ws_url, open_timeout=5) as two:
            for viewer in (one, two):  # every viewer first gets every card
                cards = {c["name"]: c for c in (json.loads(viewer.recv(5))["card"]
                                                for _ in range(2))}
                assert cards["scan1"]["last_index"] == 2 and cards["scan2"]["series"] is None
                assert cards["scan1"]["traces"]["fd"] == pytest.approx([0.0, 0.1, 0.2])
            publish_volumes(publisher, range(3, 6))
            for viewer in (one, two):
                last = -1
                while last < 5:
                    card = json.loads(viewer.recv(3))["card"]
                    assert card["name"] == "scan1" and card["last_index"] >= last
                    last = card["last_index"]
                assert card["traces"]["index"] == list(range(6))
        assert scanner(http, server.url)["last_index"] == 5


def test_updates_are_throttled_per_scanner(publisher: Publisher) -> None:
    source = Source("scan1", publisher.endpoint)
    cards: list[tuple[float, int]] = []
    with WebServer(create_app(Feed([source]), updates_per_s=2.0)) as server:
        with connect(server.url.replace("http", "ws") + "/ws", open_timeout=5) as ws:
            json.loads(ws.recv(5))

            def read() -> None:  # timestamps each card as it arrives
                while not cards or cards[-1][1] < 39:
                    card = json.loads(ws.recv(5))["card"]
                    cards.append((time.monotonic(), card["last_index"]))

            reader = threading.Thread(target=read)
            reader.start()
            time.sleep(0.3)  # the SUB socket joins
            publisher.publish(messages.series_start([8, 8, 4], [3.0] * 3, 2.0, 100, "brain"),
                              SERIES)
            for i in range(40):  # 40 volumes in ~1 s
                publish_volumes(publisher, range(i, i + 1))
                time.sleep(0.025)
            t_last = time.monotonic()
            reader.join(10)
    gaps = [b[0] - a[0] for a, b in zip(cards, cards[1:])]
    assert 2 <= len(cards) <= 5, cards  # 2 per second over ~1.5 s, not 41
    assert min(gaps) >= 0.45, cards
    assert cards[-1][1] == 39 and cards[-1][0] - t_last < 0.6, cards  # the newest comes


def test_token_is_needed_everywhere(publisher: Publisher) -> None:
    source = Source("scan1", publisher.endpoint)
    with serve([source], token=TOKEN) as server, httpx.Client() as http:
        for path in ("/", "/api/state", "/static/web.js", "/report/scan1/" + SERIES):
            assert http.get(server.url + path).status_code == 401, path
            assert http.get(server.url + path, params={"token": TOKEN[:-1] + "x"}
                            ).status_code == 401, path
        assert http.get(server.url + "/api/state", headers={"Authorization": "Bearer nope"}
                        ).status_code == 401
        ok = http.get(server.url + "/api/state", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json()["scanners"][0]["name"] == "scan1"
        assert http.get(server.url + "/api/state", params={"token": TOKEN}).status_code == 200
        # The page: ?token= once, then a cookie (the token leaves the address bar).
        first = http.get(server.url + "/", params={"token": TOKEN})
        assert first.status_code == 303 and first.headers["location"] == "/"
        assert http.cookies.get(COOKIE) == TOKEN
        assert http.get(server.url + "/").status_code == 200
        ws_url = server.url.replace("http", "ws") + "/ws"
        with pytest.raises(InvalidStatus):
            connect(ws_url, open_timeout=5)
        with pytest.raises(InvalidStatus):
            connect(ws_url, open_timeout=5, additional_headers={"Cookie": f"{COOKIE}=wrong"})
        with connect(ws_url, open_timeout=5,
                     additional_headers={"Cookie": f"{COOKIE}={TOKEN}"}) as ws:
            assert json.loads(ws.recv(5))["card"]["name"] == "scan1"


def _series_end(publisher: Publisher, series: str, report: str) -> None:
    publisher.publish(messages.series_start([8, 8, 4], [3.0] * 3, 2.0, 2, "brain",
                                            description="rest"), series)
    publish_volumes(publisher, range(2), series)
    publisher.publish(messages.series_end(2, {"verdict": "pass", "n_expected": 2},
                                          {"report": report}), series)


def test_reports_of_known_series_only(publisher: Publisher, tmp_path: Path) -> None:
    sessions = tmp_path / "sessions"
    folder = sessions / "20261204-101500_aaaaaaaaaaaa"
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html><body>the report</body></html>")
    (sessions / "20261204-101600_bbbbbbbbbbbb").mkdir()
    (sessions / "20261204-101600_bbbbbbbbbbbb" / "report.html").write_text("not announced")
    (tmp_path / "secret.html").write_text("secret")
    source = Source("scan1", publisher.endpoint, session_dir=str(sessions))
    with serve([source]) as server, httpx.Client() as http:
        time.sleep(0.3)  # the SUB socket joins
        # The publisher's own path (another host's mount) maps onto the folder here.
        _series_end(publisher, "aaaaaaaaaaaa", "/srv/rtsc/20261204-101500_aaaaaaaaaaaa/report.html")
        _series_end(publisher, "cccccccccccc", str(tmp_path / "secret.html"))
        rows = wait_for(lambda: len(scanner(http, server.url)["day_series"]) == 2
                        and scanner(http, server.url)["day_series"])
        links = {r["series"]: r["report_url"] for r in rows}
        assert links == {"aaaaaaaaaaaa": "report/scan1/aaaaaaaaaaaa", "cccccccccccc": None}
        got = http.get(f"{server.url}/{links['aaaaaaaaaaaa']}")
        assert got.status_code == 200 and "the report" in got.text
        assert got.headers["content-type"].startswith("text/html")
        for path in ("/report/scan1/cccccccccccc",  # announced, but outside the folder
                     "/report/scan1/bbbbbbbbbbbb",  # on disk, never announced
                     "/report/scan2/aaaaaaaaaaaa", "/report/scan1/..%2F..%2Fsecret.html",
                     "/report/scan1/aaaaaaaaaaaa/../../../secret.html",
                     "/static/../../secret.html"):
            response = http.get(server.url + path)
            assert response.status_code == 404 and "secret" not in response.text, path


def test_curve_publisher_is_read_with_the_configured_keys(tmp_path: Path) -> None:
    _, server_secret = create_pair(tmp_path / "server", "server")
    _, view_secret = create_pair(tmp_path / "clients", "web")
    _, stranger_secret = create_pair(tmp_path / "strangers", "stranger")
    pub = Publisher("tcp://127.0.0.1:*", "tcp://127.0.0.1:*",
                    curve=CurveServer(str(server_secret), str(tmp_path / "clients")))
    pub.start()
    server_public = str(tmp_path / "server" / "server.key")
    try:
        sources = [Source("allowed", pub.endpoint, pub.snapshot_endpoint,
                          curve=CurveClient(str(view_secret), server_public)),
                   Source("stranger", pub.endpoint,
                          curve=CurveClient(str(stranger_secret), server_public)),
                   Source("plain", pub.endpoint)]
        pub.publish(messages.series_start([8, 8, 4], [3.0] * 3, 2.0, 10, "brain"), SERIES)
        publish_volumes(pub, range(2))
        with serve(sources) as server, httpx.Client() as http:
            assert scanner(http, server.url, "allowed")["last_index"] == 1  # its snapshot
            time.sleep(0.5)
            publish_volumes(pub, range(2, 4))
            wait_for(lambda: scanner(http, server.url, "allowed")["last_index"] == 3)
            time.sleep(0.3)
            for name in ("stranger", "plain"):  # no handshake: nothing received
                assert scanner(http, server.url, name)["last_index"] is None
    finally:
        pub.close()


def test_default_source_is_the_local_publisher(tmp_path: Path) -> None:
    config = config_from_dict({"publish": {"endpoint": "tcp://0.0.0.0:6001",
                                           "snapshot_endpoint": "tcp://127.0.0.1:6002"},
                               "session": {"dir": str(tmp_path)}})
    (source,) = resolve_sources(config)
    assert (source.endpoint, source.snapshot_endpoint, source.session_dir, source.curve) == \
        ("tcp://127.0.0.1:6001", "tcp://127.0.0.1:6002", str(tmp_path), None)
    assert source.name
    curved = config_from_dict({"publish": {"curve_secret_key": "s.key_secret",
                                           "curve_clients_dir": "clients"}})
    with pytest.raises(RtscError, match="web.curve_secret_key"):
        resolve_sources(curved)
    listed = config_from_dict({"web": {"curve_secret_key": "web.key_secret", "sources": [
        {"name": "mr1", "endpoint": "tcp://10.0.0.5:5556", "curve_server_key": "mr1.key"},
        {"name": "mr2", "endpoint": "tcp://10.0.0.6:5556"}]}})
    mr1, mr2 = resolve_sources(listed)
    assert mr1.curve == CurveClient("web.key_secret", "mr1.key") and mr2.curve is None


@pytest.mark.parametrize("web, key", [
    ({"sources": [{"name": "a b"}]}, "web.sources[0].name: 'a b'"),
    ({"sources": [{"name": "a"}, {"name": "a"}]}, "web.sources[1].name: 'a' is used twice"),
    ({"sources": [{"endpoint": "http://x"}]}, "web.sources[0].endpoint: 'http://x'"),
    ({"sources": [{"curve_server_key": "k.key"}]}, "web.sources[0].curve_server_key"),
    ({"token": "short"}, "web.token: a token of 5 characters is too short"),
    ({"port": 70000}, "web.port: 70000 is out of range"),
    ({"sources": [{"nme": "x"}]}, "unknown key web.sources[0].nme"),
])
def test_web_config_errors_name_the_key(web: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"web": web})
    assert key in str(info.value)
