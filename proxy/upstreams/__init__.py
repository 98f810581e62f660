"""Upstream kinds: one module per kind, named as the kind, holding one class of that name.

The registry of kinds is proxy/upstreams/kinds.py; this package imports nothing itself, so
the shared modules (base, http, deadlines) load without the adapters.
"""
