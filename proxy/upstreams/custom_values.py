"""The placeholder values of one chat request to a custom upstream (sans-IO).

The adapter builds them once per request, renders every call of the request with them
(session lookup or create, the chat call, cancel), and adds the stream's captured values
before rendering `cancel`. Only the placeholders the upstream's templates use are computed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proxy.session_keys import SessionKeys, caller_id
from proxy.upstreams.custom_render import derived_path_value
from proxy.upstreams.custom_spec import CustomSpec
from proxy.upstreams.custom_template import CAPTURED_PREFIX, stringify
from proxy.upstreams.custom_turn import ClientSystem, turn_values

__all__ = ["request_values", "session_id", "with_captured"]


def request_values(
    spec: CustomSpec,
    messages: list[dict[str, Any]],
    *,
    session: SessionKeys,
    key_id: str,
    model: str | None,
    stream: bool,
    request_id: str,
    user: Any = None,
    client_system: ClientSystem = "drop",
) -> dict[str, Any]:
    """Every placeholder's value but `session.id` (None here: see `session_id`).

    Raises InvalidRequest when the chat has no new user text. `model` is the route's
    upstream name for the agent (its `model:`, or a wildcard's suffix); `stream` whether this
    upstream call streams (spec.upstream_streams).
    """
    needed = spec.placeholders
    values = turn_values(messages, needed, client_system=client_system,
                         message_format=spec.message_format)
    values["model"] = model
    values["session.key"] = session.key
    values["session.uuid"] = session.uuid
    values["session.id"] = None
    values["stream"] = stream
    values["request_id"] = request_id
    values["user"] = user if isinstance(user, str) and user else None
    if "caller" in needed:
        values["caller"] = caller_id(key_id)
    return values


def session_id(
    spec: CustomSpec, values: Mapping[str, Any], session: SessionKeys, *, stream: bool
) -> str | None:
    """The upstream session id that `session.id` derives (`{{ session.key }}` by default);
    None for a stateless request. Servers that issue ids (`session.lookup`) get theirs from
    the lookup instead.

    Raises InvalidRequest when the id, made from the client's fields, cannot be the one path
    segment that this request's chat call (`stream`: the upstream call streams), the
    session's `create` or the block's `cancel` puts it in: the client's fault, not the
    upstream's."""
    if session.stateless:
        return None
    template = spec.session.id
    value = template.render(values)
    text = "" if value is None else stringify(value)
    if text in ("", ".", "..") and _in_path(spec, stream):
        refused = derived_path_value(template.names, text)
        if refused is not None:
            raise refused
    return text or None


def _in_path(spec: CustomSpec, stream: bool) -> bool:
    # `cancel` too: it would otherwise fail later, in the background, where the client never
    # sees why. (A `lookup` cannot use `session.id`, and a looked-up id is never derived.)
    create, cancel = spec.session.create, spec.cancel
    return "session.id" in spec.call(stream=stream).path.names or (
        create is not None and "session.id" in create.request.path.names
    ) or (cancel is not None and "session.id" in cancel.path.names)


def with_captured(values: Mapping[str, Any], captured: Mapping[str, Any]) -> dict[str, Any]:
    """`values` plus `captured.NAME` for what the stream's rules captured (for `cancel`)."""
    out = dict(values)
    for name, value in captured.items():
        out[CAPTURED_PREFIX + name] = value
    return out
