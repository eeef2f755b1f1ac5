"""A neurofeedback thermometer in PsychoPy, fed by rtsc's ``feedback`` messages.

The participant sees a tube that fills from the bottom with the newest feedback value
(mapped linearly from ``--min`` to ``--max`` onto the tube's height, clipped at both
ends), a target line at ``--target`` and the value as text; "waiting for scanner" until
the first value arrives. The frame loop never waits for a volume: each frame it asks
:class:`rtsc.client.FeedbackReader` for the newest value, draws and flips.

Run it beside ``rtsc run`` (or ``rtsc demo``, with an ROI configured)::

    python examples/thermometer.py                       # publish.endpoint of ./config.yaml
    python examples/thermometer.py --endpoint tcp://rtsc-host:5556 --min -1 --max 3 --fullscr

It stops on Escape, after ``--duration`` seconds, or ``--end-hold`` seconds after the
``series.end`` of the series whose values it showed. ``--log`` writes one line per
frame that showed a new value (index, value, bar height in pixels, flip time, the
value's age on screen), ``--screenshot-dir`` saves each such frame as PNG: what the
system test reads back (``tests/output/test_thermometer_example.py``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Sequence

BAR_RGB = (1.0, -1.0, -1.0)        # PsychoPy's rgb space is -1..1: (255, 0, 0)
TUBE_RGB = (-0.6, -0.6, -0.6)      # (51, 51, 51)
TARGET_RGB = (1.0, 1.0, -1.0)      # (255, 255, 0)
TEXT_RGB = (1.0, 1.0, 1.0)
BACKGROUND_RGB = (-1.0, -1.0, -1.0)


def bar_height_px(value: float, vmin: float, vmax: float, full_px: int) -> int:
    """Pixels of the tube's ``full_px`` that ``value`` fills: linear from ``vmin`` (0) to
    ``vmax`` (``full_px``), clipped to that range, rounded to whole pixels; 0 for NaN."""
    if not vmax > vmin:
        raise ValueError(f"--max ({vmax}) must be above --min ({vmin})")
    if math.isnan(value):
        return 0
    fraction = min(1.0, max(0.0, (value - vmin) / (vmax - vmin)))
    return int(round(fraction * full_px))


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: WIDTHxHEIGHT in pixels") from None
    return width, height


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--endpoint", help="rtsc's PUB endpoint (default: publish.endpoint of "
                   "--config, ./config.yaml if present, else rtsc's built-in default)")
    p.add_argument("--config", type=Path, help="rtsc config YAML, for publish.endpoint")
    p.add_argument("--min", type=float, default=-1.0, help="value at the tube's bottom (-1)")
    p.add_argument("--max", type=float, default=3.0, help="value at the tube's top (3)")
    p.add_argument("--target", type=float, default=2.0, help="value of the target line (2)")
    p.add_argument("--size", type=_size, default=(800, 600), help="window WIDTHxHEIGHT (800x600)")
    p.add_argument("--fullscr", action="store_true", help="full screen (ignores --size)")
    p.add_argument("--screen", type=int, default=0, help="which screen")
    p.add_argument("--tube-px", type=int, default=None,
                   help="tube height in pixels (default: 60%% of the window's height)")
    p.add_argument("--duration", type=float, default=0.0, help="stop after this many s (0, the default: never)")
    p.add_argument("--end-hold", type=float, default=2.0,
                   help="s to keep showing the last value after its series ended (2)")
    p.add_argument("--frame-s", type=float, default=1 / 60,
                   help="shortest frame period, s (a flip without vsync, as under Xvfb, "
                   "returns at once; the loop then sleeps the rest of it; 1/60)")
    p.add_argument("--log", type=Path, help="TSV: one line per frame showing a new value")
    p.add_argument("--screenshot-dir", type=Path,
                   help="save each frame showing a new value as SERIES-INDEX.png")
    args = p.parse_args(argv)
    if not args.max > args.min:
        p.error(f"--max ({args.max}) must be above --min ({args.min})")
    return args


def default_endpoint(config: Path | None) -> str:
    """publish.endpoint as ``rtsc run`` reads it: --config, ./config.yaml, built-ins."""
    from rtsc.config import load_config

    if config is None and Path("config.yaml").exists():
        config = Path("config.yaml")
    return load_config(config).publish.endpoint


class Thermometer:
    """The stimuli of one thermometer in a PsychoPy window (units: pixels, origin at the
    window's centre); the tube's bottom edge and height are whole pixels, so a bar of
    ``h`` pixels covers exactly ``h`` rows."""

    def __init__(self, win, tube_px: int, vmin: float, vmax: float, target: float) -> None:
        from psychopy import visual

        self.win, self.tube_px, self.vmin, self.vmax = win, tube_px, vmin, vmax
        width = 120
        self.bottom = -tube_px // 2 - 30  # room for the value's text above the tube
        centre = self.bottom + tube_px / 2
        self.tube = visual.Rect(win, width=width, height=tube_px, pos=(0, centre),
                                fillColor=TUBE_RGB, lineColor=None, colorSpace="rgb")
        self.bar = visual.Rect(win, width=width, height=1, pos=(0, self.bottom),
                               fillColor=BAR_RGB, lineColor=None, colorSpace="rgb")
        # The target line runs under the bar (the bar covers it once reached) and out to
        # both sides, where it stays visible.
        y_target = self.bottom + bar_height_px(target, vmin, vmax, tube_px)
        self.target = visual.Rect(win, width=width + 60, height=4, pos=(0, y_target),
                                  fillColor=TARGET_RGB, lineColor=None, colorSpace="rgb")
        self.text = visual.TextStim(win, text="", pos=(0, self.bottom + tube_px + 45),
                                    height=36, color=TEXT_RGB, colorSpace="rgb")
        self.waiting = visual.TextStim(win, text="waiting for scanner", pos=(0, 0),
                                       height=36, color=TEXT_RGB, colorSpace="rgb")

    def draw(self, value: float | None) -> int:
        """Draw the value (None: waiting for the first) into the back buffer; returns the
        bar's height in pixels."""
        if value is None:
            self.waiting.draw()
            return 0
        height = bar_height_px(value, self.vmin, self.vmax, self.tube_px)
        self.tube.draw()
        self.target.draw()
        if height > 0:
            self.bar.height = height
            self.bar.pos = (0, self.bottom + height / 2)
            self.bar.draw()
        self.text.text = f"{value:+.2f}"
        self.text.draw()
        return height


def run(args: argparse.Namespace) -> int:
    from psychopy import event, visual

    from rtsc.client import FeedbackReader, Subscriber
    from rtsc.messages import TOPIC_SERIES_END

    endpoint = args.endpoint or default_endpoint(args.config)
    win = visual.Window(size=args.size, fullscr=args.fullscr, screen=args.screen,
                        winType="pyglet", units="pix", color=BACKGROUND_RGB,
                        colorSpace="rgb", allowGUI=False, checkTiming=False)
    tube_px = args.tube_px or int(round(0.6 * win.size[1]))
    thermometer = Thermometer(win, tube_px, args.min, args.max, args.target)
    if args.screenshot_dir is not None:
        args.screenshot_dir.mkdir(parents=True, exist_ok=True)
    log = None
    if args.log is not None:
        log = open(args.log, "w", encoding="utf-8", buffering=1)
        log.write("# series\tindex\tvalue\tbar_px\tt_flip\tage_ms\n")
    print(f"thermometer: feedback from {endpoint}, {args.min:g} .. {args.max:g} on "
          f"{tube_px} px (Escape to stop)", flush=True)
    t_start = time.monotonic()
    shown = None      # the sample on screen
    ended_at = None   # when the shown series' series.end arrived
    with FeedbackReader(endpoint) as reader, Subscriber(endpoint, [TOPIC_SERIES_END]) as ends:
        try:
            while True:
                now = time.monotonic()
                if event.getKeys(keyList=["escape"]):
                    break
                if args.duration and now - t_start >= args.duration:
                    break
                end = ends.receive(timeout_s=0)
                if end is not None and shown is not None and end.header["series"] == shown.series:
                    ended_at = now
                if ended_at is not None and now - ended_at >= args.end_hold:
                    break
                sample = reader.latest()
                t_polled = time.time()
                new = sample is not None and sample is not shown
                height = thermometer.draw(None if sample is None else sample.value)
                if new and args.screenshot_dir is not None:
                    # the back buffer holds exactly the frame the next flip shows
                    frame = win.getMovieFrame(buffer="back")
                    win.movieFrames.clear()
                    frame.save(args.screenshot_dir / f"{sample.series}-{sample.index:05d}.png")
                win.flip()
                t_flip = time.time()
                if new:
                    shown = sample
                    if log is not None:
                        age_ms = 1e3 * (t_flip - (t_polled - sample.age_s))
                        log.write(f"{sample.series}\t{sample.index}\t{sample.value!r}\t{height}"
                                  f"\t{t_flip:.6f}\t{age_ms:.1f}\n")
                rest = args.frame_s - (time.monotonic() - now)
                if rest > 0:
                    time.sleep(rest)
        finally:
            if log is not None:
                log.close()
            win.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
