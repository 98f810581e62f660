"""Ingress APIs over the internal chunk language: each parses its own request into a chat body
and turns the chunks an adapter yields into its own stream and sync answer (sans-IO)."""
