"""System test: a simulated run streams through a real `rtsc run` service, the web view
serves it with uvicorn, and Debian's headless Chromium (driven by Selenium through
Debian's chromedriver) shows the newest volume index within 1 s of its message, while a
second viewer (a websocket client) follows the same run."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from websockets.sync.client import connect

from rtsc.web.app import COOKIE, create_app
from rtsc.web.feed import Feed, Source
from rtsc.web.server import WebServer
from simulator.scanner import run_simulation

N = 16
TOKEN = "system-test-token-0123456789"


def chromium(tmp_path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--disable-background-networking", "--disable-sync",
                 "--disable-component-update", "--window-size=1280,1000",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))


SHOWN = """
const card = document.querySelector('.card[data-scanner="scanner1"]');
return [card ? card.querySelector('.volume-number').textContent : null, Date.now() / 1000];
"""


@pytest.mark.system
@pytest.mark.slow
def test_chromium_sees_the_live_volume_index(service_factory, tmp_path) -> None:
    # 16 volumes, TR 2 s at 5x: one volume every 0.4 s, about 6.5 s of streaming.
    service, collector = service_factory(
        simulator={"n_volumes": N, "speed": 5.0, "tr_s": 2.0, "shape": [32, 32, 16]},
        session={"report": True})  # the page links the report.html
    source = Source("scanner1", service.publisher.endpoint, service.publisher.snapshot_endpoint,
                    str(service.config.session.dir))
    feed = Feed([source])
    with WebServer(create_app(feed, token=TOKEN)) as server:
        driver = chromium(tmp_path)
        try:
            driver.get(f"{server.url}/?token={TOKEN}")  # -> cookie, redirected to /
            assert driver.current_url == server.url + "/"
            deadline = time.monotonic() + 20
            while driver.execute_script(SHOWN)[0] is None:  # the card (waiting) is drawn
                assert time.monotonic() < deadline, driver.page_source[:2000]
                time.sleep(0.05)
            # A second viewer at the same time: a websocket client with the cookie.
            other: list[int] = []

            def second_viewer() -> None:
                with connect(server.url.replace("http", "ws") + "/ws", open_timeout=5,
                             additional_headers={"Cookie": f"{COOKIE}={TOKEN}"}) as ws:
                    while not other or other[-1] != N - 1:
                        card = json.loads(ws.recv(30))["card"]
                        if card["last_index"] is not None:
                            other.append(card["last_index"])

            viewer = threading.Thread(target=second_viewer)
            viewer.start()
            result: dict = {}
            sim = threading.Thread(target=lambda: result.update(r=run_simulation(
                service.config.simulator, send_to=("127.0.0.1", service.receiver.port))))
            sim.start()
            seen: dict[int, float] = {}  # displayed volume number -> when first seen
            deadline = time.monotonic() + 40
            while N not in seen and time.monotonic() < deadline:
                text, t = driver.execute_script(SHOWN)
                if text.isdigit() and int(text) not in seen:
                    seen[int(text)] = t
                time.sleep(0.02)
            sim.join(30)
            viewer.join(10)
            assert result["r"].failures == 0
            assert collector.ended.wait(30)
            # Wait for the series' end to reach the page too (the verdict, the day's list).
            deadline = time.monotonic() + 10
            while driver.execute_script(
                    "return document.querySelectorAll('.today tbody tr').length") < 1:
                assert time.monotonic() < deadline
                time.sleep(0.1)
            row = driver.execute_script("return document.querySelector('.today tbody tr')"
                                        ".textContent")
            # report.html is written by its own process after the series end: the link
            # appears when it is there, and Chromium opens it from the view.
            deadline = time.monotonic() + 60
            while (link := driver.execute_script(
                    "const a = document.querySelector('.today tbody a');"
                    "return a ? a.href : null;")) is None:
                assert time.monotonic() < deadline, "no report link"
                time.sleep(0.2)
            driver.get(link)
            report_text = driver.find_element("tag name", "body").text
        finally:
            driver.quit()
    published = {m.header["index"]: m.header["t_published"] for m in collector.topic("volume")}
    assert sorted(published) == list(range(N))
    numbers = sorted(seen)
    # The page showed the run as it streamed: many distinct values, in order, to the last.
    assert numbers[-1] == N and len(numbers) >= N // 2, seen
    assert [seen[n] for n in numbers] == sorted(seen[n] for n in numbers), seen
    delays = {n: seen[n] - published[n - 1] for n in numbers}
    print(f"\nvolume message -> Chromium DOM, ms (n={len(delays)}): median "
          f"{1000 * statistics.median(delays.values()):.0f}, max {1000 * max(delays.values()):.0f}"
          f"; per volume {[round(1000 * d) for d in delays.values()]}")
    assert all(0 <= d < 1.0 for d in delays.values()), delays
    # The second viewer followed the same run to its last volume.
    assert other[-1] == N - 1 and other == sorted(other)
    series = collector.topic("series.start")[0].header["series"]
    assert series in row and str(N) in row
    assert link == f"{server.url}/report/scanner1/{series}"
    assert series in report_text, report_text[:500]
