"""`rtsc display`: the dashboard process, fed only by ZeroMQ.

The loop: take every message that is waiting (the snapshot first when the display
starts late), fold them all into the :class:`~rtsc.display.state.DisplayState`, then
draw once. A slow redraw therefore skips frames instead of falling behind, and the
pipeline never waits for the display (PUB/SUB: the publisher does not block on
subscribers).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from rtsc.client import Subscriber
from rtsc.display.dashboard import Dashboard
from rtsc.display.state import DisplayState
from rtsc.messages import TOPIC_SERIES_END, TOPIC_VOLUME, Message

log = logging.getLogger(__name__)

FIGSIZE_IN = (16.0, 9.0)


def fold_all(state: DisplayState, messages: Iterable[Message]) -> int:
    """Fold ``messages`` into ``state``; returns how many."""
    n = 0
    for message in messages:
        state.fold(message)
        n += 1
    return n


def drain(subscriber: Subscriber, state: DisplayState, first_timeout_s: float,
          max_messages: int = 100000) -> list[Message]:
    """Wait up to ``first_timeout_s`` for a message, then take all that are waiting."""
    taken: list[Message] = []
    message = subscriber.receive(timeout_s=first_timeout_s)
    while message is not None:
        state.fold(message)
        taken.append(message)
        if len(taken) >= max_messages:
            break
        message = subscriber.receive(timeout_s=0)
    return taken


@dataclass
class HeadlessPlan:
    """When headless mode writes PNGs.

    Attributes
    ----------
    out_dir : Path
    at_volumes : volume counts (1-based) after which to write ``dashboard_vol<NNNN>.png``
    at_end : write ``dashboard_<series>.png`` at each series.end
    """

    out_dir: Path
    at_volumes: Sequence[int] = ()
    at_end: bool = True
    written: list[Path] = field(default_factory=list)


def new_agg_figure() -> Any:
    """A figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGSIZE_IN, dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _headless_outputs(dashboard: Dashboard, state: DisplayState, taken: list[Message],
                      plan: HeadlessPlan, seen_counts: set[int]) -> None:
    """Write the PNGs the plan asks for, replaying ``taken`` one message at a time so
    that the image for volume N shows exactly the first N volumes."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    for message in taken:
        if message.topic == TOPIC_VOLUME and state.n in plan.at_volumes \
                and state.n not in seen_counts:
            seen_counts.add(state.n)
            dashboard.update(state, draw=False)
            path = plan.out_dir / f"dashboard_vol{state.n:04d}.png"
            dashboard.save_png(path)
            plan.written.append(path)
        if message.topic == TOPIC_SERIES_END and plan.at_end:
            dashboard.update(state, draw=False)
            path = plan.out_dir / f"dashboard_{state.series}.png"
            dashboard.save_png(path)
            plan.written.append(path)


def run_headless(messages: Iterable[Message], plan: HeadlessPlan) -> DisplayState:
    """Fold a message stream (recorded or live) and write the planned PNGs."""
    state = DisplayState()
    dashboard = Dashboard(new_agg_figure(), blit=False)
    seen: set[int] = set()
    for message in messages:
        if message.topic == "series.start" and message.header.get("series") != state.series:
            seen = set()
        state.fold(message)
        _headless_outputs(dashboard, state, [message], plan, seen)
    return state


def run_display(endpoint: str, snapshot_endpoint: str | None, *, headless: HeadlessPlan | None = None,
                stop: Callable[[], bool] | None = None, max_fps: float = 10.0,
                screenshot: Path | None = None, screenshot_after_volumes: int | None = None,
                exit_after_end: bool = False, curve: Any = None) -> DisplayState:
    """The display loop (a GUI window unless ``headless``).

    Parameters
    ----------
    endpoint, snapshot_endpoint : the publisher's PUB and snapshot endpoints (the snapshot
        is optional: without a publisher answering, the display starts empty)
    headless : write PNGs instead of opening a window
    stop : called once per loop; True ends the display
    max_fps : at most this many redraws per second (messages are folded in between)
    screenshot : with ``screenshot_after_volumes``, save the window's figure there once
        that many volumes are shown (used by the GUI test)
    exit_after_end : return after the first series.end has been drawn
    curve : rtsc.curve.CurveClient or None, keys when the publisher uses CURVE
    """
    state = DisplayState()
    subscriber = _subscribe(endpoint, snapshot_endpoint, curve)
    try:
        if headless is not None:
            dashboard = Dashboard(new_agg_figure(), blit=False)
            seen: set[int] = set()
            while not (stop and stop()):
                taken = drain_one_by_one(subscriber, state, dashboard, headless, seen)
                if exit_after_end and state.end is not None and taken:
                    break
            return state
        return _gui_loop(subscriber, state, stop, max_fps, screenshot, screenshot_after_volumes,
                         exit_after_end)
    finally:
        subscriber.close()


def drain_one_by_one(subscriber: Subscriber, state: DisplayState, dashboard: Dashboard,
                     plan: HeadlessPlan, seen: set[int]) -> list[Message]:
    """Headless: fold messages one at a time so each planned PNG is exact."""
    taken = []
    message = subscriber.receive(timeout_s=0.2)
    while message is not None:
        if message.topic == "series.start" and message.header.get("series") != state.series:
            seen.clear()
        state.fold(message)
        _headless_outputs(dashboard, state, [message], plan, seen)
        taken.append(message)
        message = subscriber.receive(timeout_s=0)
    return taken


def _subscribe(endpoint: str, snapshot_endpoint: str | None, curve: Any = None) -> Subscriber:
    if snapshot_endpoint is not None:
        try:
            return Subscriber(endpoint, snapshot_endpoint=snapshot_endpoint, curve=curve)
        except TimeoutError:
            log.info("no snapshot from %s (rtsc not running yet?): starting empty",
                     snapshot_endpoint)
    return Subscriber(endpoint, curve=curve)


def _gui_loop(subscriber: Subscriber, state: DisplayState, stop: Callable[[], bool] | None,
              max_fps: float, screenshot: Path | None, screenshot_after: int | None,
              exit_after_end: bool) -> DisplayState:
    import matplotlib
    import matplotlib.pyplot as plt

    log.info("display backend %s", matplotlib.get_backend())
    figure = plt.figure(figsize=FIGSIZE_IN, dpi=100)
    try:
        figure.canvas.manager.set_window_title("rtsc display")  # type: ignore[union-attr]
    except AttributeError:
        pass
    dashboard = Dashboard(figure, blit=True)
    closed = {"yes": False}
    figure.canvas.mpl_connect("close_event", lambda _e: closed.update(yes=True))
    figure.canvas.mpl_connect("resize_event", lambda _e: setattr(dashboard, "_needs_full", True))
    plt.show(block=False)
    dashboard.update(state)
    period = 1.0 / max_fps
    shot_taken = False
    while not closed["yes"] and not (stop and stop()):
        t0 = time.monotonic()
        taken = drain(subscriber, state, first_timeout_s=0.0)
        if state.dirty:
            dashboard.update(state)
        if screenshot is not None and not shot_taken and screenshot_after is not None \
                and state.n >= screenshot_after:
            dashboard.save_png(screenshot)
            shot_taken = True
            log.info("screenshot written to %s", screenshot)
        if exit_after_end and state.end is not None and not taken:
            break
        # Handle GUI events while waiting for the next message (at most max_fps draws).
        remaining = period - (time.monotonic() - t0)
        figure.canvas.flush_events()
        if remaining > 0:
            figure.canvas.start_event_loop(remaining)
    plt.close(figure)
    return state


def screen_available() -> bool:
    """Is there an X display (or Wayland) to open a window on?"""
    import os

    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


__all__ = ["HeadlessPlan", "drain", "fold_all", "run_display", "run_headless",
           "screen_available"]
