"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.metrics import Exchange, Metrics
from proxy.reload import TableHolder
from proxy.shutdown import Drain

TABLES = web.AppKey("tables", TableHolder)
HTTP = web.AppKey("http", aiohttp.ClientSession)
MAX_BODY = web.AppKey("max_body", int)
METRICS = web.AppKey("metrics", Metrics)
DRAIN = web.AppKey("drain", Drain)

EXCHANGE = web.RequestKey("exchange", Exchange)
