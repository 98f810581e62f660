"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.reload import TableHolder

TABLES = web.AppKey("tables", TableHolder)
HTTP = web.AppKey("http", aiohttp.ClientSession)
MAX_BODY = web.AppKey("max_body", int)

REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
UPSTREAM_MS = web.RequestKey("upstream_ms", float)
