"""The ``camoe`` command line.

camoe stack up|down|status     the local Kafka, Triton and Redis
camoe prepare                  Feast data + apply + materialise, model version 1
camoe score | label | train    run one component until stopped (SIGTERM / Ctrl-C)
camoe score --workers N        N scoring processes in one consumer group
camoe demo [--duration S]      the whole loop for a bounded time, with a summary
camoe top --port P             live view of a scorer's metrics
camoe models list|rollback|pin N|resume
                               the served model's versions; serve an older one until resume
camoe bench NAME --out DIR     quality | scoring | freshness | loop | sampling: print and save
                               figures
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from threading import Event

from pydantic import ValidationError

from camoe.settings import Settings, describe


def _stop_event() -> Event:
    stop = Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="camoe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    stack = commands.add_parser("stack", help="local services")
    stack.add_argument("action", choices=["up", "down", "status"])
    commands.add_parser("prepare", help="Feast apply + materialise, model version 1")
    score = commands.add_parser("score", help="run the scoring consumer")
    score.add_argument(
        "--workers",
        type=int,
        default=1,
        help="scoring processes sharing the partitions of ad-requests",
    )
    for name in ("label", "train"):
        commands.add_parser(name, help=f"run the {name} component")
    top = commands.add_parser("top", help="live view of a scoring process's metrics")
    top.add_argument(
        "--port", type=int, required=True, help="the scorer's scoring.metrics_port on 127.0.0.1"
    )
    top.add_argument("--every", type=float, default=2.0, help="seconds between refreshes")
    models = commands.add_parser(
        "models", help="the served model's versions: list, rollback, pin N, resume"
    )
    models.add_argument("action", choices=["list", "rollback", "pin", "resume"])
    models.add_argument("version", type=int, nargs="?", help="pin: the version to serve")
    models.add_argument("--json", action="store_true", help="list: one JSON document")
    bench = commands.add_parser("bench", help="benchmarks that print and save figures")
    bench.add_argument("name", choices=["quality", "scoring", "freshness", "loop", "sampling"])
    bench.add_argument("--out", type=Path, required=True, help="folder for results and plots")
    bench.add_argument(
        "--seeds", type=int, default=None, help="quality, sampling: default bench.seeds"
    )
    bench.add_argument(
        "--requests", type=int, default=20_000, help="scoring: requests drained at saturation"
    )
    bench.add_argument(
        "--rate", type=float, default=1000.0, help="scoring: offered load, requests/s"
    )
    bench.add_argument(
        "--warmup",
        type=float,
        default=60.0,
        help="scoring: seconds of offered load before the measured ones",
    )
    bench.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="scoring: measured seconds of load (30); freshness, loop: of traffic "
        "(demo.duration_s); sampling: of the stream (100)",
    )
    bench.add_argument(
        "--rates",
        default="500,1000,2000,4000",
        help="loop: requests/s to run the whole loop at, comma-separated",
    )
    bench.add_argument(
        "--click-boost",
        type=float,
        default=1.0,
        help="loop: multiplies every CTR (1: the simulator's own)",
    )
    bench.add_argument(
        "--dataset",
        choices=["simulator", "movielens-100k"],
        default="simulator",
        help="quality: the simulator's world, or MovieLens-100k in three domains by age",
    )
    bench.add_argument(
        "--sim-config",
        type=Path,
        default=None,
        help="YAML of simulator parameters (the `simulator` section's keys)",
    )
    demo = commands.add_parser("demo", help="run the whole loop for a bounded time")
    demo.add_argument("--duration", type=float, default=None, help="seconds of traffic")
    demo.add_argument("--out", type=Path, default=Path("out/demo.json"))
    args = parser.parse_args(argv)
    if args.command == "models" and args.action == "pin" and args.version is None:
        parser.error("`models pin` takes the version to serve: camoe models pin N")

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("feast", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    # Imported here: `camoe stack status` should not pay for torch and Feast.
    from camoe.apps import NotRunningError
    from camoe.stack.exceptions import StackError

    if args.command not in ("score", "label", "train"):
        # Long commands own services and processes: SIGTERM unwinds them like Ctrl-C, so
        # their cleanup runs (the components handle SIGTERM themselves, gracefully).
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        settings = Settings()
    except ValidationError as error:
        print(f"camoe: {describe(error)}", file=sys.stderr)
        return 2
    try:
        return _run(args, settings)
    except (StackError, NotRunningError, FileNotFoundError, ValueError) as error:
        print(f"camoe: {error}", file=sys.stderr)
        if args.command in ("score", "label", "train"):
            # A component that could not start holds native clients and threads (Kafka,
            # Feast, torch) that nothing needs any more; tearing them down in the
            # interpreter's finalisation can crash it after the line is out.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from camoe.stack.stack import Stack

    if args.command == "stack":
        stack = Stack(settings)
        if args.action == "up":
            from camoe.apps import stack_up

            stack_up(settings)
        elif args.action == "down":
            print("stopped: " + (", ".join(stack.down()) or "nothing was running"))
            return 0
        for name, line in stack.status().items():
            print(f"{name:>7}: {line}")
        return 0
    if args.command == "prepare":
        from camoe.sim.loop import prepare

        prepare(settings, Stack(settings).endpoints())
        return 0
    if args.command == "score" and args.workers > 1:
        from camoe.supervisor import supervise

        return supervise(settings, Stack(settings).endpoints(), args.workers, _stop_event())
    if args.command in ("score", "label", "train"):
        from camoe import apps

        run = {"score": apps.run_scoring, "label": apps.run_labeler, "train": apps.run_trainer}[
            args.command
        ]
        run(settings, _stop_event())
        return 0
    if args.command == "models":
        return _models(args, settings, Stack(settings).endpoints().triton)
    if args.command == "top":
        from consumers.top import watch

        # Clear the screen and home the cursor before each view.
        watch(
            f"http://127.0.0.1:{args.port}/metrics",
            args.every,
            lambda view: print("\x1b[2J\x1b[H" + view, flush=True),
        )
        return 0
    if args.command == "bench" and args.name == "scoring":
        from camoe.bench import scoring

        scoring.run(
            settings,
            args.out,
            args.requests,
            args.rate,
            args.seconds if args.seconds is not None else 30.0,
            progress=lambda line: print(line, flush=True),
            warmup_s=args.warmup,
        )
        return 0
    if args.command == "bench" and args.name == "loop":
        from camoe.bench import loop

        try:
            rates = [float(r) for r in args.rates.split(",")]
        except ValueError:
            raise ValueError(
                f"--rates takes numbers separated by commas, not {args.rates!r}"
            ) from None
        loop.run(
            settings,
            args.out,
            rates,
            args.seconds if args.seconds is not None else settings.demo.duration_s,
            click_boost=args.click_boost,
            progress=lambda line: print(line, flush=True),
        )
        return 0
    if args.command == "bench" and args.name == "sampling":
        from camoe.bench import sampling

        sampling.run(
            settings,
            args.out,
            args.seeds or settings.bench.seeds,
            args.seconds if args.seconds is not None else 100.0,
            progress=lambda line: print(line, flush=True),
        )
        return 0
    if args.command == "bench" and args.name == "freshness":
        from camoe.bench import freshness

        freshness.run(
            settings,
            args.out,
            args.seconds if args.seconds is not None else settings.demo.duration_s,
            progress=lambda line: print(line, flush=True),
        )
        return 0
    if args.command == "bench":
        from camoe.bench import quality

        if args.sim_config is not None:
            import yaml

            overrides = yaml.safe_load(args.sim_config.read_text()) or {}
            simulator = type(settings.simulator).model_validate(
                {**settings.simulator.model_dump(), **overrides}
            )
            settings = settings.model_copy(update={"simulator": simulator})
        quality.run(
            settings,
            args.out,
            args.seeds or settings.bench.seeds,
            progress=lambda line: print(line, flush=True),
            dataset=args.dataset,
        )
        return 0
    if args.command == "demo":
        from camoe.bench.freshness import demo_plot, reporter, summary_lines
        from camoe.sim.loop import demo_settings, print_summary, run_loop

        settings = demo_settings(settings)
        duration = args.duration if args.duration is not None else settings.demo.duration_s
        print(
            f"camoe demo: {duration:.0f}s of traffic at "
            f"{settings.simulator.requests_per_second:.0f} requests/s (logs in "
            f"{settings.stack.state_dir / 'logs'})",
            flush=True,
        )
        summary = run_loop(
            settings,
            duration,
            progress=lambda line: print(line, flush=True),
            report=reporter(window_s=30.0),
        )
        report = summary.pop("loop")
        latency = summary.pop("latency_windows")
        print_summary(summary, args.out)
        print("\nthe online loop")
        for line in summary_lines(report):
            print(f"  {line}")
        picture = demo_plot(report, latency, args.out.with_suffix(".png"))
        print(f"  a picture of the run: {picture}")
        return 0 if not summary["component_failures"] else 1
    raise AssertionError(args.command)


def _models(args: argparse.Namespace, settings: Settings, triton_url: str | None) -> int:
    import json

    from camoe.clients.triton import InferenceServerException, TritonClient
    from trainer.versions import ModelVersions, VersionsError, table

    if triton_url is None:
        print(
            "camoe: no Triton to talk to: start the stack (`camoe stack up`) or point TRITON_URL "
            "at the server that serves the model repository",
            file=sys.stderr,
        )
        return 1
    client = TritonClient(triton_url, settings.triton.model_name, settings.triton.timeout_s)
    try:
        versions = ModelVersions(settings.triton.model_repo, settings.triton.model_name, client)
        if args.action == "list":
            states, pin = versions.list(), versions.pin
            if args.json:
                print(
                    json.dumps(
                        {
                            "pin": None if pin is None else pin.__dict__,
                            "versions": [s.__dict__ for s in states],
                        },
                        indent=2,
                    )
                )
            else:
                print("\n".join(table(states, pin)))
        elif args.action == "resume":
            lifted = versions.resume()
            serving = versions.serving()
            print("nothing was pinned" if lifted is None else f"lifted the pin on {lifted.version}")
            print(f"serving version {serving}; the trainer publishes at its next turn")
        else:
            pin = (
                versions.rollback()
                if args.action == "rollback"
                else versions.pin_version(args.version)
            )
            print(
                f"serving version {pin.version} alone; the trainer publishes nothing until "
                "`camoe models resume`"
            )
    except (VersionsError, InferenceServerException) as error:
        print(f"camoe: {error}", file=sys.stderr)
        return 1
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
