"""How long a client may take to send its request, and how a connection that overruns is told.

Three waits are bounded (each 0 for no bound; `--keepalive-timeout 0` turns keep-alive off):
- `header_timeout`: a new connection must deliver the head of its first request (request line
  and header section) within this many seconds of being accepted. A silent socket, or one that
  trickles its header section (slowloris), is closed without an answer.
- `body_timeout`: a request whose handler waits for body bytes that do not come for this many
  seconds gets a 408 and the connection is closed. A stall, not a total: a slow upload that
  keeps moving is not cut off.
- `keepalive_timeout`: between requests, a connection may wait this long for the next request
  to arrive whole; aiohttp's own keep-alive timer does it (it also bounds the first request).

The same sweep drops a connection whose write (a sync answer's body, which aiohttp writes after
the handler) has been blocked on a client that does not read for the app's `--send-timeout`
(proxy/sse_writer.py) plus SEND_SLACK.

No timer is set per request: one sweep over the open connections, a few times per shortest
limit (at most every second), finds the ones that overran (see proxy/http_server.py).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
# Longer than the idle timeouts of the usual load balancers and client pools (60 s and less),
# so that they, not the proxy, close an idle connection, and never while sending on it.
DEFAULT_KEEPALIVE_TIMEOUT = 75.0

# Sweeps per shortest limit: a connection is closed at most a quarter of it late.
_SWEEPS_PER_LIMIT = 4
_MAX_SWEEP_INTERVAL = 1.0
# A write blocked for --send-timeout (proxy/sse_writer.py) is cut by the connection sweep this
# much later: a stream's own sweep (once a second) gets to end it first, with its error logged.
SEND_SLACK = 1.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT

    @property
    def sweep_interval(self) -> float:
        """Seconds between two sweeps. The sweep also answers a request whose body the HTTP
        parser gave up on (bad chunked framing), so it runs even with no limit set."""
        limits = [t for t in (self.header_timeout, self.body_timeout) if t > 0]
        if not limits:
            return _MAX_SWEEP_INTERVAL
        return min(min(limits) / _SWEEPS_PER_LIMIT, _MAX_SWEEP_INTERVAL)

    def header_overdue(self, accepted: float, now: float) -> bool:
        """A connection accepted at `accepted` that has not delivered a first request head."""
        return 0 < self.header_timeout <= now - accepted

    def body_stalled(self, since: float, now: float) -> bool:
        """A handler has waited since `since` for a body byte that did not come."""
        return 0 < self.body_timeout <= now - since
