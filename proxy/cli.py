"""The `agentproxy` command: `serve` and `check`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from proxy import __version__
from proxy.auth import env_keys, generate_key
from proxy.config import Config, ConfigError, load_config, parse_config, read_source
from proxy.config.source import decode_source
from proxy.connection_limits import (
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEPALIVE_TIMEOUT,
)
from proxy.memory import return_large_buffers
from proxy.process_setup import (
    handle_signals_while_starting,
    hup_while_starting,
    new_loop,
    raise_open_files_limit,
    tune_gc,
)
from proxy.workers import SESSION_LOCKS_ENV, run_workers

if TYPE_CHECKING:
    from aiohttp import web

    from proxy.reload import TableHolder

log = logging.getLogger("agentproxy")


def _env(name: str, default: str) -> str:
    # Set but empty counts as unset: `AGENTPROXY_HOST=` must not listen on every address.
    return os.environ.get(f"AGENTPROXY_{name}") or default


def _number(
    kind: type[int] | type[float], name: str, low: float, high: float | None = None
) -> Callable[[str], float]:
    """An argparse type for a flag that AGENTPROXY_<name> may set: a finite number within
    [low, high], else an error that names both (defaults are strings, so argparse converts
    the variable's value only for the subcommand that uses it, and reports it like a flag's)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < low or (
            high is not None and value > high
        ):
            bound = f"at least {low:g}" if high is None else f"from {low:g} to {high:g}"
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{text!r} (the flag or AGENTPROXY_{name}) must be {what} {bound}"
            )
        return value

    return parse


def _choice(name: str, *choices: str) -> Callable[[str], str]:
    """Like `choices=`, which argparse does not check on a default, an environment value."""

    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"{text!r} (the flag or AGENTPROXY_{name}) must be one of {', '.join(choices)}"
            )
        return text

    return parse


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
    drain_timeout: float = 30.0
    reload_interval: float = 1.0
    max_connections: int = 1000
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    send_timeout: float = 60.0
    # The routes file as read at start: read once, so that a pipe (`--routes <(...)`) works.
    routes_source: bytes | None = None
    # Whether to poll it, decided where the path was opened: a `--workers` child, another
    # process, cannot see the parent's `/dev/fd/N` and would take it for a missing file.
    routes_polled: bool | None = None


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
    serve.add_argument("--port", type=_number(int, "PORT", 0, 65535),
                       default=_env("PORT", "8080"),
                       help="port to listen on (env AGENTPROXY_PORT; default 8080)")
    serve.add_argument("--workers", type=_number(int, "WORKERS", 1),
                       default=_env("WORKERS", "1"),
                       help="processes sharing the port (env AGENTPROXY_WORKERS; default 1)")
    serve.add_argument("--log-level", default=_env("LOG_LEVEL", "info"),
                       type=_choice("LOG_LEVEL", "debug", "info", "warning", "error"),
                       help="env AGENTPROXY_LOG_LEVEL; default info")
    serve.add_argument("--log-format", default=_env("LOG_FORMAT", "text"),
                       type=_choice("LOG_FORMAT", "text", "json"),
                       help="env AGENTPROXY_LOG_FORMAT; default text")
    serve.add_argument("--max-body", type=_number(int, "MAX_BODY", 1),
                       default=_env("MAX_BODY", str(16 << 20)),
                       help="largest request body in bytes (env AGENTPROXY_MAX_BODY; 16 MiB)")
    serve.add_argument("--max-connections", type=_number(int, "MAX_CONNECTIONS", 0),
                       default=_env("MAX_CONNECTIONS", "1000"),
                       help="requests each worker serves at once; more get a 503 with "
                            "Retry-After (env AGENTPROXY_MAX_CONNECTIONS; default 1000; 0: no "
                            "limit)")
    serve.add_argument("--header-timeout", type=_number(float, "HEADER_TIMEOUT", 0),
                       default=_env("HEADER_TIMEOUT", str(DEFAULT_HEADER_TIMEOUT)),
                       help="seconds a new connection gets to send its first request's line "
                            "and headers (env AGENTPROXY_HEADER_TIMEOUT; default "
                            f"{DEFAULT_HEADER_TIMEOUT:g}; 0: no limit)")
    serve.add_argument("--body-timeout", type=_number(float, "BODY_TIMEOUT", 0),
                       default=_env("BODY_TIMEOUT", str(DEFAULT_BODY_TIMEOUT)),
                       help="seconds a request body may stall, with no byte arriving, before "
                            "a 408 (env AGENTPROXY_BODY_TIMEOUT; default "
                            f"{DEFAULT_BODY_TIMEOUT:g}; 0: no limit)")
    serve.add_argument("--keepalive-timeout", type=_number(float, "KEEPALIVE_TIMEOUT", 0),
                       default=_env("KEEPALIVE_TIMEOUT", str(DEFAULT_KEEPALIVE_TIMEOUT)),
                       help="seconds an idle connection waits for its next request (env "
                            "AGENTPROXY_KEEPALIVE_TIMEOUT; default "
                            f"{DEFAULT_KEEPALIVE_TIMEOUT:g}; 0: no keep-alive)")
    serve.add_argument("--drain-timeout", type=_number(float, "DRAIN_TIMEOUT", 0),
                       default=_env("DRAIN_TIMEOUT", "30"),
                       help="on SIGTERM, seconds running requests get to finish before streams "
                            "are ended (env AGENTPROXY_DRAIN_TIMEOUT; default 30)")
    serve.add_argument("--reload-interval", type=_number(float, "RELOAD_INTERVAL", 0),
                       default=_env("RELOAD_INTERVAL", "1"),
                       help="seconds between looks at the routes file; 0 reloads on SIGHUP only "
                            "(env AGENTPROXY_RELOAD_INTERVAL; default 1)")
    serve.add_argument("--send-timeout", type=_number(float, "SEND_TIMEOUT", 0.1),
                       default=_env("SEND_TIMEOUT", "60"),
                       help="seconds one write to a streaming client may stay blocked before the "
                            "stream is ended (env AGENTPROXY_SEND_TIMEOUT; default 60)")

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
    from proxy.reload import pollable

    handle_signals_while_starting()
    setup_logging(args.log_level, args.log_format)
    try:
        source = read_source(args.routes)
        config = parse_config(decode_source(source, args.routes), args.routes)
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
        drain_timeout=max(0.0, args.drain_timeout),
        reload_interval=max(0.0, args.reload_interval),
        max_connections=max(0, args.max_connections),
        header_timeout=max(0.0, args.header_timeout),
        body_timeout=max(0.0, args.body_timeout),
        keepalive_timeout=max(0.0, args.keepalive_timeout),
        send_timeout=max(0.1, args.send_timeout),
        routes_source=source,
        routes_polled=pollable(Path(args.routes)),
    )
    if not _check_id_secret(options.workers):
        return 1
    if options.workers == 1:
        return run_worker(options, config)
    return run_workers(options, _worker_process)


def _worker_process(options: ServeOptions) -> None:
    """A `--workers` child: its exit status is run_worker's, which the parent reports."""
    handle_signals_while_starting()
    sys.exit(run_worker(options))


def _check_id_secret(workers: int) -> bool:
    """A set AGENTPROXY_ID_SECRET must be usable; without one, `--workers N` get ONE random
    secret made here and inherited, so a response id one worker signs verifies on any."""
    from proxy.response_ids import ENV_SECRET, IdSecretError, parse_secret

    value = os.environ.get(ENV_SECRET)
    if value is not None:
        try:
            parse_secret(value)
        except IdSecretError as exc:
            print(f"agentproxy: {exc}", file=sys.stderr)
            return False
    elif workers > 1:
        os.environ[ENV_SECRET] = secrets.token_urlsafe(32)
        log.warning(
            "%s is not set: the workers share a random secret for response ids, which stop "
            "working when the proxy restarts; set the same secret everywhere to keep them.",
            ENV_SECRET,
        )
    return True


def run_worker(options: ServeOptions, parsed: Config | None = None) -> int:
    """One worker's server; `parsed`: the routes file's Config as `serve` parsed it (the
    workers of `--workers` parse it again, each in its own process)."""
    from proxy.app import create_app
    from proxy.logs import setup_logging
    from proxy.reload import TableHolder

    setup_logging(options.log_level, options.log_format)
    limits = raise_open_files_limit()
    if limits is not None and limits[0] != -1 and limits[0] < 4096:
        log.warning(
            "the limit on open files is %d: about %d streams at once; raise the hard limit "
            "(ulimit -Hn, LimitNOFILE, the container's nofile) for more",
            limits[0], limits[0] // 2,
        )
    holder = TableHolder(
        options.routes, options.extra_keys, source=options.routes_source, parsed=parsed,
        polled=options.routes_polled,
    )
    shared_locks = os.environ.get(SESSION_LOCKS_ENV)
    if shared_locks:
        # One session, one turn, across the workers of this host (proxy/session_locks.py).
        holder.state.session_locks.share(shared_locks)
    app = create_app(
        holder,
        max_body=options.max_body,
        reload_interval=options.reload_interval,
        drain_timeout=options.drain_timeout,
        max_connections=options.max_connections,
        header_timeout=options.header_timeout,
        body_timeout=options.body_timeout,
        keepalive_timeout=options.keepalive_timeout,
        send_timeout=options.send_timeout,
    )
    tune_gc()
    return_large_buffers()
    with asyncio.Runner(loop_factory=new_loop) as runner:
        problem = runner.run(_serve(app, holder, options))
    if problem is not None:
        print(f"agentproxy: {problem}", file=sys.stderr)
        return 1
    return 0


async def _serve(
    app: web.Application, holder: TableHolder, options: ServeOptions
) -> str | None:
    """Serves until SIGTERM or SIGINT, then drains (see proxy/shutdown.py); SIGHUP reloads.
    Returns why it could not listen, if it could not."""
    from aiohttp import web

    from proxy.access_log import flush as flush_access_log
    from proxy.app_keys import DRAIN

    # The app's own drain (on_shutdown) has ended every request by the time aiohttp's shutdown
    # runs, so its timeout is only a backstop.
    runner = web.AppRunner(
        app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(
            runner, options.host, options.port, reuse_port=options.workers > 1 or None
        )
        try:
            await site.start()
        except OSError as exc:
            # In use, not an address of this host, a name that does not resolve, a port below
            # 1024 without the right: asyncio's text repeats the address, strerror does not.
            why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror
            return f"cannot listen on {options.host}:{options.port}: {why or exc}"
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, holder.request_reload)
        if hup_while_starting():
            holder.request_reload()
        table = holder.current
        host, port = runner.addresses[0][:2]
        log.info(
            "listening on http://%s:%d (routes %s, version %s, %d models, pid %d)",
            host, port, options.routes, table.version, len(table.routes), os.getpid(),
        )
        await stop.wait()
        # Not ready from this instant; the runner then stops listening and drains.
        app[DRAIN].begin()
        log.info(
            "shutting down: no new connections; requests in flight get %g s",
            options.drain_timeout,
        )
    finally:
        await runner.cleanup()
        # The last access lines now: a write they wait for would not outlive the loop.
        flush_access_log()
    return None
