"""One compiled upstream call of the `custom` kind: method, path + query, body (sans-IO).

The chat call in its variants, the session lookup and create, cancel and the model listing
are each a RequestSpec, compiled once from the block's templates (custom_template.py).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Final

from proxy.upstreams.custom_template import (
    PathTemplate,
    QueryTemplate,
    Template,
    compile_body,
    compile_path_template,
    compile_query,
)

__all__ = ["METHODS", "RequestSpec", "build_request"]

METHODS: Final[tuple[str, ...]] = ("GET", "POST", "PUT", "PATCH", "DELETE")


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One upstream HTTP call: method, path + query, body; every part compiled."""

    method: str
    path: PathTemplate
    query: QueryTemplate | None
    body: Template | None
    names: frozenset[str]

    def target(self, values: Mapping[str, Any]) -> str:
        """The encoded path and query to append to the upstream's `url`."""
        path = self.path.render(values)
        if self.query is None:
            return path
        query = self.query.render(values)
        if not query:
            return path
        return f"{path}{'&' if '?' in path else '?'}{query}"

    def render_body(self, values: Mapping[str, Any]) -> Any:
        """The JSON body to send; None when the call has none (GET)."""
        return None if self.body is None else self.body.render(values)



def build_request(method: str, entries: Mapping[str, Any], allowed: Collection[str],
                  captured: Collection[str] | None) -> RequestSpec:
    """The call from its raw `path`, `query` and `body` (compiled here; a problem raises
    TemplateError). A GET sends no body."""
    path = compile_path_template(entries.get("path") or "", allowed, captured)
    query = (compile_query(entries["query"], allowed, captured)
             if entries.get("query") else None)
    body = None
    if method != "GET" and entries.get("body") is not None:
        body = compile_body(entries["body"], allowed, captured)
    names = path.names | (query.names if query else frozenset()) | (
        body.names if body else frozenset())
    return RequestSpec(method, path, query, body, names)
