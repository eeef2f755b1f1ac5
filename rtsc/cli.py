"""`rtsc` command line: run, display, web, bridge, simulate, demo, replay, archive-qc,
report, verify, history."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from rtsc.config import Config, load_config
from rtsc.errors import RtscError
from rtsc.history.commands import add_arguments as add_history_arguments
from rtsc.ranges import ranges_text
from rtsc.redact import LogRedaction

log = logging.getLogger("rtsc")

DEFAULT_CONFIG = Path("config.yaml")


def _load(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    return load_config(path, overrides)


def _wait_for_signal() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(3600):
        pass


def cmd_run(args: argparse.Namespace) -> int:
    from rtsc.service.run import RunService

    config = _load(args)
    service = RunService(config)
    service.start()
    port = service.receiver.port if service.receiver else None
    print(f"rtsc run: AE title {config.receiver.ae_title} on {config.receiver.host}:{port}; "
          f"publishing on {service.publisher.endpoint} "
          f"(snapshots {service.publisher.snapshot_endpoint}); "
          f"sessions in {config.session.dir}. Ctrl-C to stop.", flush=True)
    try:
        _wait_for_signal()
    finally:
        service.stop()
    for header in service.ended_series:
        _print_series(header)
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from simulator.scanner import run_simulation

    config = _load(args)
    sim = config.simulator
    extra = {k: v for k, v in (("n_volumes", args.n_volumes), ("format", args.format),
                               ("speed", args.speed), ("vendor", args.vendor))
             if v is not None}
    extra.update(_anatomy_overrides(args))
    if extra:
        from rtsc.config import merge, config_from_dict, to_dict

        config = config_from_dict(merge(to_dict(config), {"simulator": extra}))
        sim = config.simulator
    if args.send is None and args.out is None:
        raise RtscError("rtsc simulate needs --send HOST:PORT or --out DIR")
    target = None
    if args.send is not None:
        host, _, port = args.send.rpartition(":")
        if not host or not port.isdigit():
            raise RtscError(f"--send {args.send!r}: expected HOST:PORT, e.g. 127.0.0.1:11112")
        target = (host, int(port))
    result = run_simulation(sim, out_dir=args.out, send_to=target,
                            called_ae=args.called_ae or config.receiver.ae_title,
                            truth_dir=args.truth)
    print(result.describe(), flush=True)
    return 0


def _anatomy_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """simulator keys set by --anatomy and --base-image (a base image implies epi_image)."""
    extra: dict[str, Any] = {}
    if args.base_image is not None:
        extra["base_image"] = str(args.base_image)
        extra["anatomy"] = "epi_image"
    if args.anatomy is not None:
        extra["anatomy"] = args.anatomy
    return extra


def _print_series(header: dict[str, Any]) -> None:
    summary = header["summary"]
    print(f"series {header['series']}: {header['n_volumes']} volumes "
          f"(expected {summary.get('n_expected')}), missing "
          f"{ranges_text(summary.get('missing_volumes') or [], summary.get('n_missing_volumes'))}")
    med, p95 = summary.get("latency_ms_median"), summary.get("latency_ms_p95")
    if med is not None:
        print(f"  latency received->published: median {med:.1f} ms, p95 {p95:.1f} ms")
    gs = summary.get("global_signal_mean")
    print(f"  alerts: {summary.get('n_alerts')}; global signal mean "
          f"{'n/a' if gs is None else f'{gs:.1f}'}")
    cord = summary.get("slice_moco")
    if summary.get("fd_mean") is not None and cord:  # spinal cord mode: slice-wise moco
        print(f"  slice-wise motion: FD mean {summary['fd_mean']:.3f} mm, max "
              f"{summary['fd_max']:.3f} mm; slice shift max {cord['trans_max_mm']:.2f} mm, "
              f"RMS {cord['trans_rms_mm']:.2f} mm; slices fell back in "
              f"{len(cord.get('failed_slices') or {})} volumes")
    elif summary.get("fd_mean") is not None:
        print(f"  motion: FD mean {summary['fd_mean']:.3f} mm, max {summary['fd_max']:.3f} mm; "
              f"max |trans| {summary['max_abs_trans_mm']:.2f} mm, max |rot| "
              f"{summary['max_abs_rot_deg']:.2f} deg; registration failed on "
              f"{len(summary.get('registration_failed') or [])} volumes")
    if summary.get("verdict") is not None:
        tsnr, snr = summary.get("tsnr"), summary.get("snr_background")
        minutes = (summary.get("clean_minutes") or {}).get(
            f"{(summary.get('criterion') or {}).get('threshold_mm', 0.2):g}")
        reasons = summary.get("verdict_reasons")
        print(f"  QC: {summary['verdict']}"
              f"{' (' + '; '.join(reasons) + ')' if reasons else ''}"
              f"; tSNR {'n/a' if tsnr is None else f'{tsnr:.1f}'}, SNR "
              f"{'n/a' if snr is None else f'{snr:.1f}'}, spikes in "
              f"{len(summary.get('spike_volumes') or [])} volumes, clean minutes "
              f"{'n/a' if minutes is None else f'{minutes:.2f}'}")
    for name, roi in (summary.get("roi") or {}).items():
        diff = roi.get("psc_task_minus_rest")
        print(f"  ROI {name}: {roi.get('voxels')} voxels, task - rest "
              f"{'n/a' if diff is None else f'{diff:.2f}'} % signal change")
    for name, c in (summary.get("glm_contrasts") or {}).items():
        if c.get("peak_t") is not None:
            print(f"  GLM contrast {name}: peak t {c['peak_t']:.1f}, {c['voxels_above']} voxels "
                  f"above t {c['threshold_t']:.2f} (p < {summary.get('glm_p_value', 0.001):g} "
                  f"uncorrected, {summary.get('glm_dof')} dof)")
    for name, path in header["outputs"].items():
        print(f"  {name:14s} {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    from rtsc.config import config_from_dict, merge, to_dict
    from rtsc.service.run import RunService
    from simulator.output import write_events
    from simulator.scanner import make_plan, run_simulation

    config = _load(args)
    n_volumes = args.n_volumes or config.demo.n_volumes
    speed = config.demo.speed if args.speed is None else args.speed
    # The demo owns both ends: free ports, so it never clashes with a running rtsc.
    config = config_from_dict(merge(to_dict(config), {
        "receiver": {"port": 0, "host": "127.0.0.1"},
        "publish": {"endpoint": "tcp://127.0.0.1:*", "snapshot_endpoint": "tcp://127.0.0.1:*"},
        "simulator": {"n_volumes": n_volumes, "speed": speed, **_anatomy_overrides(args)},
        "watcher": {"dir": None},
    }))
    truth = Path(tempfile.mkdtemp(prefix="rtsc-demo-truth-"))
    plan = make_plan(config.simulator)
    if config.glm.events is None and plan.events:  # a very short run may end before any block
        # Pilot-session style: the GLM gets the paradigm the simulated subject follows,
        # and neurofeedback reads a 6 mm sphere where the phantom's activation is.
        events_path = truth / "paradigm_events.tsv"
        write_events(plan.events, events_path)
        glm: dict[str, Any] = {"events": str(events_path)}
        if config.glm.roi is None:
            centre = [round(float(v), 1) for v in plan.phantom.activation_center_ras]
            glm["roi"] = {"target": {"center_ras_mm": centre, "radius_mm": 6.0}}
        config = config_from_dict(merge(to_dict(config), {"glm": glm}))
    from rtsc.display.app import screen_available

    gui = not args.headless and screen_available()
    if not args.headless and not gui:
        log.info("no screen ($DISPLAY is not set): the dashboard is written as PNG files")
    done = threading.Event()
    t0 = time.time()
    png_dir = args.dashboard_dir
    with RunService(config, on_series_end=lambda _h: done.set()) as service:
        assert service.receiver is not None
        # The dashboard is its own process, fed only by ZeroMQ (as `rtsc display`).
        display = _start_display_process(service.publisher.endpoint,
                                         service.publisher.snapshot_endpoint, gui=gui,
                                         out=png_dir, at=_demo_png_volumes(n_volumes))
        print(f"rtsc demo: simulating {n_volumes} volumes "
              f"{'x'.join(map(str, plan.grid.shape))} ({config.simulator.format}, "
              f"anatomy {config.simulator.anatomy}), "
              f"TR {config.simulator.tr_s} s at {speed:g}x speed, over DICOM to "
              f"127.0.0.1:{service.receiver.port}; publishing on {service.publisher.endpoint}; "
              + ("dashboard window open" if gui else f"dashboard PNGs to {png_dir}"),
              flush=True)
        run_simulation(config.simulator, send_to=("127.0.0.1", service.receiver.port),
                       called_ae=config.receiver.ae_title, truth_dir=truth)
        timeout = 60 + n_volumes * config.simulator.tr_s / max(speed, 1e-9) if speed else 120
        if not done.wait(timeout):
            display.terminate()
            raise RtscError(f"the series did not end within {timeout:.0f} s")
        if gui:
            print("close the dashboard window to end the demo", flush=True)
        try:
            display.wait(timeout=None if gui else 120)
        except subprocess.TimeoutExpired:
            display.terminate()
            log.warning("the headless dashboard did not finish; stopped it")
    print(f"demo finished in {time.time() - t0:.1f} s; ground truth in {truth}")
    for header in service.ended_series:
        _print_series(header)
    if not gui:
        for path in sorted(png_dir.glob("*.png")):
            print(f"  dashboard      {path}")
    return 0


def _demo_png_volumes(n_volumes: int) -> list[int]:
    """Volume counts after which the headless demo writes dashboard PNGs."""
    return sorted({max(1, n_volumes // 4), max(1, n_volumes // 2)})


def _start_display_process(endpoint: str, snapshot_endpoint: str, gui: bool, out: Path,
                           at: Sequence[int]) -> "subprocess.Popen[bytes]":
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
    command = [sys.executable, "-m", "rtsc.cli", "--log-level", str(level), "display",
               "--endpoint", endpoint,
               "--snapshot-endpoint", snapshot_endpoint]
    if not gui:
        command += ["--headless", "--out", str(out), "--at", ",".join(map(str, at)),
                    "--exit-after-end"]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


def cmd_keys(args: argparse.Namespace) -> int:
    from rtsc.curve import create_pair

    public, secret = create_pair(args.dir, args.name)
    print(f"public key (give to the other side): {public}\nsecret key (keep): {secret}")
    return 0


def cmd_display(args: argparse.Namespace) -> int:
    from rtsc.display.app import HeadlessPlan, run_display, screen_available

    config = _load(args)
    endpoint = args.endpoint or config.publish.endpoint
    snapshot = args.snapshot_endpoint or config.publish.snapshot_endpoint
    if not args.headless and not screen_available():
        raise RtscError("rtsc display: no screen ($DISPLAY is not set); use --headless "
                        "--out DIR to write the dashboard as PNG files")
    at = [int(v) for v in args.at.split(",") if v.strip()] if args.at else []
    plan = HeadlessPlan(args.out, at_volumes=at) if args.headless else None
    stop = _stop_flag()
    curve = _curve_client(args, "rtsc display")
    state = run_display(endpoint, snapshot, headless=plan, stop=stop,
                        screenshot=args.screenshot, screenshot_after_volumes=args.screenshot_after,
                        exit_after_end=args.exit_after_end, curve=curve)
    if plan is not None:
        for path in plan.written:
            print(path, flush=True)
    log.info("display ended after %d volumes of series %s", state.n, state.series)
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise RtscError(f"rtsc web needs the 'web' extra ({', '.join(missing)} missing): "
                        "pip install -e '.[web]'")
    from rtsc.web.app import create_app
    from rtsc.web.feed import Feed, resolve_sources
    from rtsc.web.server import bind, serve_forever

    config = _load(args)
    web = config.web
    host = args.host or web.host
    port = web.port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise RtscError(f"--port {port}: a port in 0-65535 (0: any free port)")
    sources = resolve_sources(config)
    sock = bind(host, port)
    if web.token is None and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("rtsc web listens on %s without web.token: anyone who reaches it sees "
                    "the page", host)
    shown = f"[{host}]" if ":" in host else host
    print(f"rtsc web: http://{shown}:{sock.getsockname()[1]}/"
          f"{'?token=...' if web.token else ''} showing "
          + ", ".join(f"{s.name} ({s.endpoint}{', CURVE' if s.curve else ''})" for s in sources)
          + ". Ctrl-C to stop.", flush=True)
    app = create_app(Feed(sources, web.history_volumes), web.token, web.updates_per_s)
    serve_forever(app, sock)
    return 0


def cmd_bridge(args: argparse.Namespace) -> int:
    from rtsc.bridge import Bridge, parse_host_port

    config = _load(args)
    endpoint = args.endpoint or config.publish.endpoint
    udp = parse_host_port(args.udp, "--udp") if args.udp else None
    tcp = None
    if args.tcp is not None:
        if not 0 <= args.tcp < 65536:
            raise RtscError(f"--tcp {args.tcp}: a port in 0-65535 (0: any free port)")
        tcp = (args.tcp_host, args.tcp)
    curve = _curve_client(args, "rtsc bridge")
    with Bridge(endpoint, udp=udp, tcp=tcp, curve=curve) as bridge:
        targets = ([f"UDP {args.udp}"] if udp else []) + (
            [f"TCP clients on {bridge.tcp_address[0]}:{bridge.tcp_address[1]}"]
            if bridge.tcp_address else [])
        print(f"rtsc bridge: feedback from {endpoint} -> {' and '.join(targets)}; one line "
              "per volume, 'INDEX VALUE LATENCY_MS' (Ctrl-C to stop)", flush=True)
        n = bridge.run(stop=_stop_flag())
    print(f"rtsc bridge: {n} feedback values forwarded")
    return 0


def _curve_client(args: argparse.Namespace, command: str) -> Any:
    """The CurveClient of ``--curve-secret`` and ``--curve-server-key``, or None."""
    if not (args.curve_secret or args.curve_server_key):
        return None
    if not (args.curve_secret and args.curve_server_key):
        raise RtscError(f"{command}: give both --curve-secret and --curve-server-key")
    from rtsc.curve import CurveClient

    return CurveClient(str(args.curve_secret), str(args.curve_server_key))


def _stop_flag() -> Any:
    """A callable that turns True after Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop.is_set


def cmd_replay(args: argparse.Namespace) -> int:
    from rtsc.intake.replay import run_replay

    overrides = {"physio": {"file": str(args.physio)}} if args.physio is not None else None
    config = _load(args, overrides)
    path = args.path / "dicom" if (args.path / "dicom").is_dir() else args.path  # a session
    t0 = time.time()
    ended = run_replay(config, path, speed=args.speed, tr_s=args.tr)
    print(f"rtsc replay: {args.path} in {time.time() - t0:.1f} s, {len(ended)} series")
    for header in ended:
        _print_series(header)
    return 0


def cmd_archive_qc(args: argparse.Namespace) -> int:
    from rtsc.archive.run import archive_command

    config = _load(args)
    out = args.out if args.out is not None else Path(config.session.dir) / "archive-qc"
    return archive_command(args.paths, config, out, args.workers, args.scheduler)


def cmd_report(args: argparse.Namespace) -> int:
    from rtsc.output.report import write_report

    path = write_report(args.session_dir, args.out)
    print(path)
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from rtsc.history.commands import run

    return run(args, _load(args))


def cmd_verify(args: argparse.Namespace) -> int:
    from rtsc.verify import dcm2niix
    from rtsc.verify.report import report_lines, to_json

    if (args.folder is None) == (not args.listen):
        raise RtscError("rtsc verify: give a FOLDER, or --listen (not both)")
    if args.series < 1:
        raise RtscError(f"--series {args.series}: at least 1")
    config = _load(args)
    binary = str(args.dcm2niix) if args.dcm2niix is not None else dcm2niix.find_dcm2niix()
    if args.dcm2niix is not None and dcm2niix.dcm2niix_version(binary) is None:
        raise RtscError(f"--dcm2niix {args.dcm2niix}: not a dcm2niix that runs")

    def progress(text: str) -> None:
        print(text, flush=True)

    if args.listen:
        from rtsc.verify.listen import listen

        report = listen(config, binary, n_series=args.series, timeout_s=args.timeout,
                        partial=args.partial, stop=_stop_flag(), progress=progress)
        # Listening is over: a second Ctrl-C during the checks interrupts them.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    else:
        from rtsc.verify.folder import verify_folder

        report = verify_folder(args.folder, config, binary, partial=args.partial,
                               progress=progress)
    print()
    print("\n".join(report_lines(report)), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(to_json(report), indent=2) + "\n", encoding="utf-8")
        print(f"results written to {args.json}")
    return 0 if report.passed else 1


def _add_anatomy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--anatomy", choices=("brain", "epi_image", "mni152", "spinal_cord"),
                   help="the simulated head (simulator.anatomy): brain = analytic phantom; "
                        "epi_image = a measured EPI volume (--base-image); mni152 = nilearn's "
                        "template with EPI contrast; both real ones cut by the field of view")
    p.add_argument("--base-image", type=Path,
                   help="EPI volume for --anatomy epi_image (NIfTI or whole-volume DICOM, "
                        "e.g. heudiconv's axasc35.dcm); implies --anatomy epi_image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtsc", description=__doc__)
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", type=Path, default=None,
                       help="config YAML (default: ./config.yaml if present, else built-ins)")
        return p

    add("run", "receive DICOM, process, publish and write the session").set_defaults(func=cmd_run)

    p = add("simulate", "the scanner simulator: send DICOM over C-STORE or write a folder")
    p.add_argument("--send", metavar="HOST:PORT", help="C-STORE to this receiver")
    p.add_argument("--out", type=Path, help="write DICOM files here (and truth/ beside them)")
    p.add_argument("--speed", type=float,
                   help="1 = real TR pace; 10 = ten times faster; 0 = flat out")
    p.add_argument("--n-volumes", type=int, help="number of volumes")
    p.add_argument("--format", choices=("mosaic", "slices", "multiframe"),
                   help="Siemens mosaic, single slices, or enhanced MR multi-frame")
    p.add_argument("--vendor", choices=("siemens", "philips"),
                   help="philips: classic single slices as Philips writes them (--format slices)")
    _add_anatomy_arguments(p)
    p.add_argument("--called-ae", help="receiver's AE title (default receiver.ae_title)")
    p.add_argument("--truth", type=Path, help="where to save the ground truth when sending")
    p.set_defaults(func=cmd_simulate)

    p = add("display", "the live dashboard (its own process, fed by the publisher)")
    p.add_argument("--endpoint", help="PUB endpoint (default publish.endpoint)")
    p.add_argument("--snapshot-endpoint",
                   help="snapshot endpoint (default publish.snapshot_endpoint)")
    p.add_argument("--headless", action="store_true", help="no window: write PNG files")
    p.add_argument("--out", type=Path, default=Path("dashboard"), help="headless: PNG folder")
    p.add_argument("--at", help="headless: volume counts to write PNGs after, e.g. 10,40 "
                   "(and always at each series end)")
    p.add_argument("--exit-after-end", action="store_true", help="exit after the first series end")
    p.add_argument("--screenshot", type=Path, help="window: save the figure to this PNG ...")
    p.add_argument("--screenshot-after", type=int, help="... once this many volumes are shown")
    p.add_argument("--curve-secret", type=Path, help="CURVE: this client's .key_secret file")
    p.add_argument("--curve-server-key", type=Path, help="CURVE: the server's public .key file")
    p.set_defaults(func=cmd_display)

    p = add("web", "the read-only live web page of every scanner (web.*), JSON at /api/state")
    p.add_argument("--host", help="bind address (default web.host)")
    p.add_argument("--port", type=int, help="port (default web.port)")
    p.set_defaults(func=cmd_web)

    p = add("bridge", "feedback as text lines over UDP and TCP, for MATLAB, E-Prime, "
                      "Presentation: 'INDEX VALUE LATENCY_MS' per volume")
    p.add_argument("--endpoint", help="PUB endpoint (default publish.endpoint)")
    p.add_argument("--udp", metavar="HOST:PORT", help="send each line as a datagram here")
    p.add_argument("--tcp", metavar="PORT", type=int,
                   help="listen here for TCP clients; each gets every line (0: a free port)")
    p.add_argument("--tcp-host", default="127.0.0.1",
                   help="address the TCP listener binds (default 127.0.0.1; 0.0.0.0: every "
                        "interface, for a stimulus PC on the network)")
    p.add_argument("--curve-secret", type=Path, help="CURVE: this client's .key_secret file")
    p.add_argument("--curve-server-key", type=Path, help="CURVE: the server's public .key file")
    p.set_defaults(func=cmd_bridge)

    p = add("keys", "make a CURVE key pair (NAME.key public, NAME.key_secret) in DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("name")
    p.set_defaults(func=cmd_keys)

    p = add("report", "the end-of-run report (report.html) of a series directory")
    p.add_argument("session_dir", type=Path, help="a series directory under session.dir")
    p.add_argument("--out", type=Path, default=None, help="default SESSION_DIR/report.html")
    p.set_defaults(func=cmd_report)

    p = add("demo", "simulator and run together on the defaults, then a summary")
    p.add_argument("--headless", action="store_true",
                   help="no window: dashboard PNGs under session.dir/dashboard (the default "
                   "without a screen)")
    p.add_argument("--dashboard-dir", type=Path, default=Path("dashboard"),
                   help="headless: where the dashboard PNGs go (default ./dashboard)")
    p.add_argument("--n-volumes", type=int, help="override demo.n_volumes")
    p.add_argument("--speed", type=float, help="override demo.speed")
    _add_anatomy_arguments(p)
    p.set_defaults(func=cmd_demo)

    p = add("archive-qc", "the pipeline over an archive (DICOM series folders, BIDS runs), "
                          "series in parallel on Dask; resumable")
    p.add_argument("paths", type=Path, nargs="+",
                   help="BIDS folders, 4D NIfTI runs, or folders of DICOM series folders")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default session.dir/archive-qc)")
    p.add_argument("--workers", type=int, default=2, help="local worker processes (default 2)")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="a Dask distributed scheduler instead of local processes")
    p.set_defaults(func=cmd_archive_qc)

    p = add("replay", "a DICOM folder or a 4D NIfTI through the same pipeline, at TR pace")
    p.add_argument("path", type=Path, help="folder of DICOM files (or a session folder with "
                                           "dicom/), or a 4D .nii/.nii.gz")
    p.add_argument("--speed", type=float, default=1.0,
                   help="1 = TR pace (default); 10 = ten times faster; 0 = as fast as possible")
    p.add_argument("--tr", type=float, default=None,
                   help="repetition time, s (default: from the headers)")
    p.add_argument("--physio", type=Path, default=None,
                   help="physiology recorded with the run (BIDS *_physio.tsv.gz or Siemens "
                        ".puls/.resp): refit the GLM with RETROICOR (sets physio.file)")
    p.set_defaults(func=cmd_replay)

    p = add("verify", "check rtsc on the site's own phantom series (a DICOM folder, or "
            "--listen), against dcm2niix when installed; exit status 0 when every check passes")
    p.description = (
        "Each series found gets a table, one line per check: PASS, FAIL, or SKIP with the "
        "reason. The files go through rtsc's own assembler (what `rtsc run` makes of them): "
        "volumes assembled (unplaced, late, duplicate datasets), matrix, voxel size, "
        "orientation, TR, run length announced vs volumes present, slice times, phase "
        "encoding, transfer syntax; then voxels and affine against dcm2niix's conversion of "
        "the same files (voxels exact in RAS+, affine within 1e-3 mm) and TR, slice times "
        "(1 ms), phase encoding and multiband factor against its BIDS sidecar. Series rtsc's "
        "series filter skips are listed with the reason. Exit status 0 when no check fails, "
        "1 otherwise, 2 on a usage error.")
    p.add_argument("folder", nargs="?", type=Path,
                   help="folder tree of DICOM files (any number of series)")
    p.add_argument("--listen", action="store_true",
                   help="start rtsc's receiver (receiver.* of the config), let the console "
                        "send the series, report their arrival timing (volume interval vs "
                        "TR, receive->publish latency, late or missing volumes), then check "
                        "the files archived under session.dir")
    p.add_argument("--series", type=int, default=1,
                   help="--listen: end once this many BOLD series have ended (default 1)")
    p.add_argument("--timeout", type=float, default=None,
                   help="--listen: end after this many seconds (default: no limit; Ctrl-C "
                        "ends too)")
    p.add_argument("--partial", action="store_true",
                   help="a series holding only the first volumes of its announced run passes "
                        "the run length check")
    p.add_argument("--dcm2niix", type=Path, default=None,
                   help="dcm2niix executable (default: on PATH, else beside this Python; "
                        "without one its checks are SKIP)")
    p.add_argument("--json", type=Path, default=None,
                   help="also write the results to this file as JSON")
    p.set_defaults(func=cmd_verify)

    p = add("history", "the site's QC history: list or export the recorded series by "
            "protocol and date (docs/outputs.md)")
    add_history_arguments(p)
    p.set_defaults(func=cmd_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rtsc`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # No received UID, name or ID in any line: every record (warnings too, through
    # logging) passes the redacting filter on the handlers.
    redaction = LogRedaction(logging.getLogger().handlers).install()
    logging.captureWarnings(True)
    try:
        return int(args.func(args))
    except RtscError as exc:
        print(f"rtsc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        logging.captureWarnings(False)
        redaction.remove()


if __name__ == "__main__":
    sys.exit(main())
