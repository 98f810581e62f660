"""HTTP/1.1 over a bare socket, for what no HTTP client library would send."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson

# Bounds a failing test only: every wait below ends as soon as its condition holds.
DEADLINE = 10.0


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the final answer

    def error(self) -> dict[str, object]:
        """The OpenAI-shaped error of a JSON answer, checked for its exact shape."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        err = orjson.loads(self.body)["error"]
        assert set(err) == {"message", "type", "param", "code"}, err
        assert isinstance(err["message"], str) and err["message"], err
        return dict(err)


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return await asyncio.open_connection(parts.hostname, parts.port)


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> RawAnswer:
    """One response: its interim 1xx answers, then the final one and its body (by
    Content-Length, chunks, or up to the end of the connection)."""
    interim: list[int] = []
    while True:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE)
        lines = head[:-4].split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().decode("latin-1").lower()] = value.strip().decode("latin-1")
        if 100 <= status < 200:
            interim.append(status)
            continue
        break
    if head_only:
        body = b""
    elif "content-length" in headers:
        body = await asyncio.wait_for(
            reader.readexactly(int(headers["content-length"])), DEADLINE
        )
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await asyncio.wait_for(reader.readexactly(size + 2), DEADLINE)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await asyncio.wait_for(reader.read(), DEADLINE)
    return RawAnswer(status, headers, body, interim)


async def closed_by_peer(reader: asyncio.StreamReader) -> bytes:
    """Waits for the server to close the connection; returns whatever it sent first."""
    return await asyncio.wait_for(reader.read(), DEADLINE)


async def exchange(url: str, data: bytes) -> RawAnswer:
    """Sends `data` on a new connection and reads one answer."""
    reader, writer = await connect(url)
    try:
        writer.write(data)
        await writer.drain()
        return await read_answer(reader)
    finally:
        writer.close()
