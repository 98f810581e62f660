"""Node.js clients of the proxy (tests/node/): the official openai-node SDK and the AI SDK,
each a script that reads a plan of steps on stdin and prints one JSON result per step.

The packages are installed by `npm ci --prefix tests/node` (`.ci/run` does it); without
Node.js or without that install the tests that use them are skipped (`requires_node`),
never reaching for the network themselves.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import orjson
import pytest

NODE_DIR = Path(__file__).parent / "node"
NODE = shutil.which("node")
requires_node = pytest.mark.skipif(
    NODE is None or not (NODE_DIR / "node_modules" / "openai").is_dir()
    or not (NODE_DIR / "node_modules" / "ai").is_dir(),
    reason="the Node.js clients are not installed: npm ci --prefix tests/node",
)


async def run_node(script: str, base_url: str, key: str, steps: list[dict[str, Any]]) -> list[Any]:
    """The results of `steps` run by tests/node/`script` against the proxy at `base_url`."""
    assert NODE is not None
    plan = {"baseURL": base_url, "apiKey": key, "steps": steps}
    proc = await asyncio.create_subprocess_exec(
        NODE, str(NODE_DIR / script), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate(orjson.dumps(plan))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    results: list[Any] = orjson.loads(out)
    return results
