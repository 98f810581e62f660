"""How the bench's own asyncio programs run: on uvloop when it is installed, as agentproxy
does, and the servers among them until interrupted.

Imported by the scripts as `runtime`: running `python bench/X.py` puts bench/ on sys.path.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

from aiohttp import web


def new_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    # Alone on a line: with --port 0, how a caller learns the port chosen.
    print(runner.addresses[0][1], flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def serve_forever(app: web.Application, host: str, port: int) -> None:
    """Serves `app` until Ctrl-C, printing its port alone on a line once it listens."""
    try:
        with asyncio.Runner(loop_factory=new_loop_factory()) as runner:
            runner.run(_serve(app, host, port))
    except KeyboardInterrupt:
        sys.exit(130)
