"""The ``nimflow`` command.

    nimflow validate CONFIG...        check hosting specs; exit 2 listing `CONFIG: field.path: message`
    nimflow host CONFIG [--revision]  run the host_model flow against the configured Prefect API
    nimflow testbed up|down           start/stop the local test bed (Docker, S3, hub, Prefect)
    nimflow demo                      test bed up + host configs/demo.yaml end to end

User mistakes (bad configs, missing checkpoints, invalid weights) print one clear message and
exit non-zero; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nimflow.errors import ConfigError, NimflowError
from nimflow.testbed import TestbedError

EXIT_FAILED = 1
EXIT_INVALID = 2
DEFAULT_STATE_DIR = Path(".testbed")
DEMO_CONFIG = Path("configs/demo.yaml")


def _validate(args: argparse.Namespace) -> int:
    from nimflow.spec import load_spec

    status = 0
    for config in args.configs:
        try:
            load_spec(config)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            status = EXIT_INVALID
        else:
            print(f"{config}: ok")
    return status


def _host(config: str, revision: str | None) -> int:
    from nimflow.spec import load_spec

    try:
        load_spec(config)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID

    from flows.host_model import host_model

    try:
        record = host_model(config_path=config, revision=revision)
    except NimflowError as exc:
        print(f"nimflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_record(record)
    return 0


def _print_record(record: dict) -> None:
    def count(n: int, verb: str) -> str:
        return f"{n} files {verb}" if n else f"nothing {verb}"

    print(f"endpoint:    {record['endpoint']}  (model {record['served_model_name']!r})")
    print(f"revision:    {record['revision_sha'] or '(local checkpoint)'}")
    print(f"download:    {count(record['downloaded_files'], 'downloaded')}")
    if record["engine_key"]:
        origin = record["engine_origin"]
        built = "built by this run" if origin == "built" else f"nothing built (found in {origin})"
        print(f"engine:      {record['engine_key']}: {built}")
        print(f"upload:      {count(record['uploaded_files'], 'uploaded')} ({record['engine_uri']})")
    print(f"timings (s): {', '.join(f'{k} {v:.1f}' for k, v in record['timings'].items())}")
    print(f"completion:  {record['completion']}")


def _testbed(args: argparse.Namespace) -> int:
    from nimflow.testbed import local

    if args.action == "up":
        env = local.up(args.state_dir)
        print(f"test bed up; `source {args.state_dir / 'env.sh'}` to use it:")
        for key in ("HF_ENDPOINT", "AWS_ENDPOINT_URL", "PREFECT_API_URL"):
            print(f"  {key}={env[key]}")
    else:
        print(f"stopped {local.down(args.state_dir)} test-bed servers")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from nimflow.testbed import local

    print("Starting the local test bed (Docker engine, NIM stand-in image, S3, hub, Prefect API)...", flush=True)
    local.activate(local.up(args.state_dir))
    print(f"Hosting {args.config} through the host_model flow...", flush=True)
    return _host(str(args.config), None)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``nimflow`` command."""
    parser = argparse.ArgumentParser(prog="nimflow", description="Host models on NVIDIA NIM, repeatably.")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check hosting specs")
    validate.add_argument("configs", nargs="+", metavar="CONFIG")
    validate.set_defaults(run=_validate)

    host = sub.add_parser("host", help="run the host_model flow for a hosting spec")
    host.add_argument("config", metavar="CONFIG")
    host.add_argument("--revision", help="override source.revision (branch, tag or sha)")
    host.set_defaults(run=lambda a: _host(a.config, a.revision))

    testbed = sub.add_parser("testbed", help="start or stop the local test bed")
    testbed.add_argument("action", choices=["up", "down"])
    testbed.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    testbed.set_defaults(run=_testbed)

    demo = sub.add_parser("demo", help="host a generated tiny model end to end on the local test bed")
    demo.add_argument("--config", type=Path, default=DEMO_CONFIG)
    demo.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``nimflow`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID
    except NimflowError as exc:
        print(f"nimflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except TestbedError as exc:
        print(f"nimflow testbed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
