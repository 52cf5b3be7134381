"""The ``nimflow`` command.

    nimflow validate CONFIG...        check hosting specs (and a build image on this host); exit 2 listing `CONFIG: field.path: message`
    nimflow plan CONFIG               which stages a run would do and which are hits, with the engine key
    nimflow host SPEC [--revision]    run the host_model flow (SPEC: a spec's name or a .yaml path)
    nimflow cache ls|explain|gc       list, explain and clean the engine store
    nimflow status                    the deployments on this Docker host: endpoint, health, what they serve
    nimflow down NAME                 remove a deployment (front proxy, backends, route); only labelled containers
    nimflow testbed up|down           start/stop the local test bed (Docker, S3, hub, Prefect)
    nimflow demo                      test bed up + host configs/demo.yaml end to end
    nimflow notify SPEC --revision SHA | --uri s3://...   announce a new checkpoint (nimflow.checkpoint.landed)
    nimflow bootstrap [--gpu-host NAME=COUNT[@POOL]]...   work pools, limits, Secret blocks, `prefect deploy --all`, a reconcile per host
    nimflow doctor [--free]           nimflow's concurrency limits, who holds their slots; --free frees those whose holder is gone

User mistakes (bad configs, missing checkpoints, invalid weights) print one clear message and
exit non-zero; tracebacks are kept for bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from nimflow.errors import ConfigError, NimflowError, Problem
from nimflow.testbed import TestbedError

if TYPE_CHECKING:
    from nimflow.engine_store import EngineStore
    from nimflow.spec import HostingSpec

EXIT_FAILED = 1
EXIT_INVALID = 2
DEFAULT_STATE_DIR = Path(".testbed")
DEMO_CONFIG = Path("configs/demo.yaml")


def _validate(args: argparse.Namespace) -> int:
    from nimflow.image_probe import check_build_image_on_host
    from nimflow.spec import load_spec

    status = 0
    for config in args.configs:
        try:
            spec = load_spec(config)
            try:
                # A build image on this Docker host is asked what it has (cached per image id): a build it
                # cannot run (no converter, a flag its scripts lack) is refused here, before any GPU time.
                # An image not on this host is left to `nimflow plan` and the run (logged, not printed).
                if spec.build is not None:
                    check_build_image_on_host(spec.build, _local_model_config(spec))
            except ConfigError as exc:
                raise ConfigError(config, exc.problems) from None
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            status = EXIT_INVALID
        else:
            print(f"{config}: ok")
    return status


def _local_model_config(spec: HostingSpec) -> dict[str, Any] | None:
    """The config.json of a spec's local checkpoint (``source.local_dir``), when readable; else None."""
    if spec.source.local_dir is None:
        return None
    try:
        config = json.loads((Path(spec.source.local_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _host(spec: str, revision: str | None) -> int:
    from nimflow.run_parameters import resolve_run_spec

    try:
        resolve_run_spec(spec, revision=revision)  # fail fast, before Prefect starts
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_INVALID

    from nimflow.flows.host_model import host_model

    try:
        record = host_model(spec=spec, revision=revision or "")
    except NimflowError as exc:
        print(f"nimflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_record(record)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from nimflow.plan import make_plan
    from nimflow.spec import load_spec

    spec = load_spec(args.config)
    print(make_plan(spec).render(f"plan for {args.config} ({spec.name}):"))
    return 0


def _spec_cache_dir(args: argparse.Namespace) -> Path | None:
    """The ``deploy.cache_dir`` of the --config spec (where this host's engines and scratch dirs live), if given."""
    from nimflow.spec import load_spec

    return Path(load_spec(args.config).deploy.cache_dir) if args.config else None


def _store(args: argparse.Namespace) -> EngineStore:
    """The engine store named by --store (with --endpoint-url) or by a spec's `cache` section."""
    from nimflow.engine_store import EngineStore
    from nimflow.spec import CacheSpec, load_spec

    if args.config:
        spec = load_spec(args.config)
        if spec.cache is None:
            raise ConfigError(args.config, [Problem("cache", "this spec has no engine store (`cache` section)")])
        return EngineStore(spec.cache)
    if not args.store:
        raise ConfigError("nimflow cache", [Problem("--store", "give the store as --store s3://bucket/prefix or --config SPEC")])
    try:
        cache = CacheSpec(uri=args.store, endpoint_url=args.endpoint_url)
    except ValidationError as exc:
        raise ConfigError("nimflow cache", [Problem("--store", exc.errors()[0]["msg"].removeprefix("Value error, "))]) from None
    return EngineStore(cache)


def _cache(args: argparse.Namespace) -> int:
    from nimflow import cache_admin
    from nimflow.containers import docker_client
    from nimflow.errors import EngineStoreError, translated_errors

    store = _store(args)
    with translated_errors(f"reading the engine store {store.cache.uri}", domain=EngineStoreError):
        if args.action == "ls":
            print(cache_admin.list_entries(store))
        elif args.action == "explain":
            print(cache_admin.explain(store, args.key, args.other))
        else:
            if (args.keep is None) == (args.older_than is None):
                raise ConfigError("nimflow cache gc", [Problem("--keep/--older-than", "give exactly one of --keep N or --older-than D")])
            if args.keep is not None and args.keep < 1:
                raise ConfigError("nimflow cache gc", [Problem("--keep", "must be at least 1")])
            older = cache_admin.parse_duration(args.older_than, option="--older-than") if args.older_than else None
            abandoned = cache_admin.parse_duration(args.abandoned_after, option="--abandoned-after")
            try:
                in_use = cache_admin.engines_in_use(docker_client())
            except Exception as exc:  # noqa: BLE001 - in-use markers in the store still protect what hosts serve
                print(f"nimflow cache gc: cannot see this host's containers ({type(exc).__name__}); engines are "
                      "protected by the in-use markers hosts write (deploy, reconcile) only", file=sys.stderr)
                in_use = {}
            plan = cache_admin.plan_gc(
                store, keep=args.keep, older_than=older, abandoned_after=abandoned, in_use=in_use,
                lease_seconds=store.cache.build_lease_seconds,
            )
            print(cache_admin.run_gc(store, plan, dry_run=args.dry_run, lease_seconds=store.cache.build_lease_seconds))
            cache_dir = args.cache_dir or _spec_cache_dir(args)
            if cache_dir is not None:
                for line in cache_admin.clean_scratch(Path(cache_dir), abandoned, dry_run=args.dry_run):
                    print(line)
    return 0


def _status(args: argparse.Namespace) -> int:
    from nimflow.containers import docker_client
    from nimflow.deployments_admin import deployment_status, render_status

    print(render_status(deployment_status(docker_client())))
    return 0


def _down(args: argparse.Namespace) -> int:
    from nimflow.containers import docker_client
    from nimflow.deployments_admin import take_down

    result = take_down(docker_client(), args.name)
    print(f"removed deployment {args.name}: {', '.join(result.removed)}"
          + (f"; route {result.route_dir}" if result.route_dir else ""))
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
    moved = [f"{t['stage']} {t['bytes'] / (1 << 20):.0f} MiB at {t['mib_per_s']:.0f} MiB/s" for t in record.get("transfers", [])]
    print(f"transfers:   {', '.join(moved) or 'nothing moved'}")
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


def _notify(args: argparse.Namespace) -> int:
    """Announce a checkpoint of a spec's source, as the watcher would; print the event id."""
    from nimflow.checkpoint_events import emit_checkpoint_event, hf_checkpoint, s3_checkpoint
    from nimflow.spec_registry import load_named_spec

    spec = load_named_spec(args.spec)
    if args.revision is not None:
        if spec.source.repo_id is None:
            raise ConfigError(args.spec, [Problem("--revision", "this spec has no source.repo_id; use --uri s3://...")])
        event = hf_checkpoint(spec.name, spec.source.repo_id, args.revision, ref=args.ref)
    else:
        prefix = spec.watch.s3_prefix if spec.watch is not None else None
        if prefix is None:
            raise ConfigError(args.spec, [Problem("--uri", "this spec has no watch.s3_prefix to announce a directory of")])
        event = s3_checkpoint(spec.name, prefix, args.uri)
    print(emit_checkpoint_event(event))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    """Prepare the Prefect server (pools, limits, Secret blocks) and deploy; print what was created or kept."""
    from nimflow.bootstrap import bootstrap, parse_gpu_hosts

    report = bootstrap(args.project_dir, extra_pools=args.pool, gpu_hosts=parse_gpu_hosts(args.gpu_host),
                       deploy=not args.no_deploy)
    print(report.render())
    changed = len(report.created())
    print(f"bootstrap: {changed} item(s) created or updated" if changed else "bootstrap: nothing to create; everything was in place")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    """List nimflow's limits and their holders; with --free, free slots whose holder is gone.

    Exit 1 when leaked slots were found and not freed (without --free, or ones --free cannot prove safe).
    """
    from prefect.client.orchestration import get_client

    from nimflow.bootstrap import require_api_url
    from nimflow.errors import translated_errors
    from nimflow.redaction import redact_url
    from nimflow.slot_doctor import diagnose
    from nimflow.spec_concurrency import LEASE_SECONDS

    api_url = require_api_url("nimflow doctor")
    with translated_errors(f"reading concurrency limits at {redact_url(api_url)}"), get_client(sync_client=True) as client:
        report = diagnose(client, free=args.free, lease_seconds=LEASE_SECONDS)
    print(report.render())
    return EXIT_FAILED if report.left or (report.leaks and not args.free) else 0


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

    plan = sub.add_parser("plan", help="show which stages a run would do and which are hits, with the engine key")
    plan.add_argument("config", metavar="CONFIG")
    plan.set_defaults(run=_plan)

    cache = sub.add_parser("cache", help="list, explain and clean the engine store")
    cache_sub = cache.add_subparsers(dest="action", required=True)
    for action, text in (("ls", "list engines"), ("explain", "show a key's inputs, or what differs between two keys"),
                         ("gc", "remove old engines and abandoned uploads")):
        command = cache_sub.add_parser(action, help=text)
        command.add_argument("--store", help="engine store s3://bucket/prefix (or take it from --config)")
        command.add_argument("--endpoint-url", help="S3 endpoint (MinIO, a test server); default AWS_ENDPOINT_URL or AWS")
        command.add_argument("--config", help="a hosting spec whose `cache` section names the store")
        command.set_defaults(run=_cache)
        if action == "explain":
            command.add_argument("key", metavar="KEY", help="an engine key or a unique prefix of one")
            command.add_argument("other", metavar="KEY2", nargs="?", help="a second key: show only what differs")
        if action == "gc":
            command.add_argument("--keep", type=int, help="keep the N newest engines of each build (every key input "
                                 "but the weights revision)")
            command.add_argument("--older-than", help="remove engines published longer ago than this (e.g. 30d, 12h)")
            command.add_argument("--abandoned-after", default="24h",
                                 help="remove uploads no manifest names, incomplete multipart uploads and killed runs' "
                                 "scratch dirs once this old (default 24h)")
            command.add_argument("--cache-dir", help="this host's cache dir, to remove killed runs' scratch dirs "
                                 "(default: the --config spec's deploy.cache_dir)")
            command.add_argument("--dry-run", action="store_true", help="only print what would be removed")

    host = sub.add_parser("host", help="run the host_model flow for a hosting spec")
    host.add_argument("config", metavar="SPEC",
                      help="a spec's name in the specs directory (NIMFLOW_SPECS_DIR, default configs/) or a .yaml path")
    host.add_argument("--revision", help="override source.revision (branch, tag or sha)")
    host.set_defaults(run=lambda a: _host(a.config, a.revision))

    status = sub.add_parser("status", help="list the nimflow deployments on this Docker host, with their health")
    status.set_defaults(run=_status)

    down = sub.add_parser("down", help="remove a deployment: its front proxy, backends and route (labelled containers only)")
    down.add_argument("name", metavar="NAME", help="the deployment (spec) name, as `nimflow status` lists it")
    down.set_defaults(run=_down)

    testbed = sub.add_parser("testbed", help="start or stop the local test bed")
    testbed.add_argument("action", choices=["up", "down"])
    testbed.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    testbed.set_defaults(run=_testbed)

    demo = sub.add_parser("demo", help="host a generated tiny model end to end on the local test bed")
    demo.add_argument("--config", type=Path, default=DEMO_CONFIG)
    demo.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    demo.set_defaults(run=_demo)

    notify = sub.add_parser("notify", help="announce a new checkpoint of a spec's source (for training jobs)")
    notify.add_argument("spec", metavar="SPEC", help="the spec's name in the specs directory (NIMFLOW_SPECS_DIR)")
    what = notify.add_mutually_exclusive_group(required=True)
    what.add_argument("--revision", metavar="SHA", help="a commit sha of the spec's source.repo_id")
    what.add_argument("--uri", metavar="S3_URI", help="a checkpoint directory directly under the spec's watch.s3_prefix")
    notify.add_argument("--ref", help="with --revision: the branch or tag it was pushed to (goes into the payload)")
    notify.set_defaults(run=_notify)

    boot = sub.add_parser("bootstrap", help="create work pools, limits and Secret blocks, then deploy prefect.yaml (idempotent)")
    boot.add_argument("--gpu-host", action="append", default=[], metavar="NAME=COUNT[@POOL]",
                      help="a GPU host, its GPU count and its work pool (default: reconcile's): global concurrency limit "
                           "nimflow-gpus-NAME, work queue NAME and deployment reconcile-NAME on it (repeatable)")
    boot.add_argument("--pool", action="append", default=[], metavar="NAME",
                      help="another process work pool to create, e.g. one per GPU type (repeatable)")
    boot.add_argument("--project-dir", type=Path, default=Path("."), help="the checkout holding prefect.yaml (default: .)")
    boot.add_argument("--no-deploy", action="store_true", help="only pools, limits and Secret blocks; skip `prefect deploy`")
    boot.set_defaults(run=_bootstrap)

    doctor = sub.add_parser("doctor", help="list nimflow's concurrency limits and who holds their slots; exit 1 on leaked slots")
    doctor.add_argument("--free", action="store_true",
                        help="free the slots whose holder is gone (its flow run ended, its lease lost in a server restart)")
    doctor.set_defaults(run=_doctor)
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
