"""The `agentproxy` command: `serve` and `check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from proxy import __version__
from proxy.auth import env_keys, generate_key
from proxy.config import ConfigError, load_config

log = logging.getLogger("agentproxy")


def _env(name: str, default: str) -> str:
    return os.environ.get(f"AGENTPROXY_{name}", default)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    routes: str
    host: str
    port: int
    workers: int
    log_level: str
    log_format: str
    max_body: int
    extra_keys: tuple[str, ...]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentproxy",
        description="An OpenAI-compatible reverse proxy for agent servers and model servers.",
    )
    parser.add_argument("--version", action="version", version=f"agentproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--routes", default=_env("ROUTES", "routes.yaml"),
                       help="route table file (env AGENTPROXY_ROUTES; default ./routes.yaml)")
    serve.add_argument("--host", default=_env("HOST", "127.0.0.1"),
                       help="address to listen on (env AGENTPROXY_HOST; default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=int(_env("PORT", "8080")),
                       help="port to listen on (env AGENTPROXY_PORT; default 8080)")
    serve.add_argument("--workers", type=int, default=int(_env("WORKERS", "1")),
                       help="processes sharing the port (env AGENTPROXY_WORKERS; default 1)")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                       choices=["debug", "info", "warning", "error"],
                       help="env AGENTPROXY_LOG_LEVEL; default info")
    serve.add_argument("--log-format", default=_env("LOG_FORMAT", "text"),
                       choices=["text", "json"], help="env AGENTPROXY_LOG_FORMAT; default text")
    serve.add_argument("--max-body", type=int, default=int(_env("MAX_BODY", str(16 << 20))),
                       help="largest request body in bytes (env AGENTPROXY_MAX_BODY; 16 MiB)")

    check = sub.add_parser("check", help="validate a route table and exit")
    check.add_argument("routes", nargs="?", default=_env("ROUTES", "routes.yaml"))
    check.add_argument("--probe", action="store_true",
                       help="also contact the upstreams: reachable, Letta agents resolve")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return check(args.routes, probe=args.probe)
    return serve(args)


def check(path: str, *, probe: bool = False) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    except OSError as exc:
        print(f"{path}: cannot read the file: {exc.strerror}")
        return 1
    for warning in config.warnings:
        print(f"{warning} (warning)")
    if probe:
        from proxy.probe import probe as run_probe

        problems = asyncio.run(run_probe(config))
        for problem in problems:
            print(problem)
        if problems:
            return 1
    print(
        f"{path}: ok ({len(config.upstreams)} upstreams, {len(config.models)} models, "
        f"version {config.version})"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    from proxy.logs import setup_logging

    setup_logging(args.log_level, args.log_format)
    try:
        config = load_config(args.routes)
    except ConfigError as exc:
        print(f"agentproxy: {args.routes} is not valid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"agentproxy: cannot read {args.routes}: {exc.strerror}", file=sys.stderr)
        return 1
    for warning in config.warnings:
        log.warning("%s", warning)

    keys = env_keys(os.environ.get("AGENTPROXY_API_KEYS"))
    if not keys and not config.auth.keys and not config.auth.allow_unauthenticated:
        # Never open by accident: with no key configured, make one and require it.
        generated = generate_key()
        keys.append(generated)
        print(
            "agentproxy: no API key is configured, so this one was generated for this run:\n"
            f"\n    {generated}\n\n"
            "Send it as 'Authorization: Bearer <key>'. Set AGENTPROXY_API_KEYS or auth.keys in "
            "the route table to choose your own.",
            flush=True,
        )
    options = ServeOptions(
        routes=args.routes,
        host=args.host,
        port=args.port,
        workers=max(1, args.workers),
        log_level=args.log_level,
        log_format=args.log_format,
        max_body=args.max_body,
        extra_keys=tuple(keys),
    )
    if options.workers == 1:
        return run_worker(options)
    return _run_workers(options)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_worker(options: ServeOptions) -> int:
    from aiohttp import web

    from proxy.app import create_app
    from proxy.logs import setup_logging
    from proxy.reload import TableHolder

    setup_logging(options.log_level, options.log_format)
    holder = TableHolder(options.routes, options.extra_keys)
    app = create_app(holder, max_body=options.max_body)
    table = holder.current
    log.info(
        "listening on http://%s:%d (routes %s, version %s, %d models, pid %d)",
        options.host, options.port, options.routes, table.version,
        len(table.routes), os.getpid(),
    )
    web.run_app(
        app,
        host=options.host,
        port=options.port,
        access_log=None,
        print=None,
        handler_cancellation=True,
        reuse_port=options.workers > 1 or None,
        shutdown_timeout=30.0,
        loop=_new_loop(),
    )
    return 0


def _run_workers(options: ServeOptions) -> int:
    """N processes with their own event loops, sharing the port through SO_REUSEPORT."""
    ctx = multiprocessing.get_context("spawn")
    children = [ctx.Process(target=run_worker, args=(options,)) for _ in range(options.workers)]
    for child in children:
        child.start()

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for child in children:
        child.join()
    return 0 if all(child.exitcode == 0 for child in children) else 1
