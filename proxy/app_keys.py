"""Typed keys for what the application and each request carry."""

from __future__ import annotations

import aiohttp
from aiohttp import web

from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.reload import TableHolder
from proxy.shutdown import Drain
from proxy.state import AppState

TABLES = web.AppKey("tables", TableHolder)
HTTP = web.AppKey("http", aiohttp.ClientSession)
MAX_BODY = web.AppKey("max_body", int)
METRICS = web.AppKey("metrics", Metrics)
DRAIN = web.AppKey("drain", Drain)
STATE = web.AppKey("state", AppState)

EXCHANGE = web.RequestKey("exchange", Exchange)
