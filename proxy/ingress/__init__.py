"""The APIs clients speak: one module per API for its request parsing and its writer, and the
stream relay they share. Each turns the internal chunks (proxy/chunks.py) into its API's sync
body or SSE stream; adapters know nothing of them."""
