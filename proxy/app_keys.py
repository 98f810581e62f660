"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.exchange import Exchange
from proxy.metrics import Metrics
from proxy.reload import TableHolder
from proxy.response_ids import ResponseIds
from proxy.shutdown import Drain
from proxy.state import AppState

TABLES = web.AppKey("tables", TableHolder)
HTTP = web.AppKey("http", aiohttp.ClientSession)
MAX_BODY = web.AppKey("max_body", int)
METRICS = web.AppKey("metrics", Metrics)
DRAIN = web.AppKey("drain", Drain)
STATE = web.AppKey("state", AppState)
# The keyring of signed response ids, made on first use: without AGENTPROXY_ID_SECRET a
# random key (and its warning) only where a response is ever chained.
RESPONSE_IDS: web.AppKey[Callable[[], ResponseIds]] = web.AppKey("response_ids")

EXCHANGE = web.RequestKey("exchange", Exchange)
