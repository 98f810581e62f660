"""Parsing a Responses API request and translating it to a chat-completions body. Sans-IO.

`parse_responses_request(raw)` checks the body (a bad type or value is an InvalidRequest that
names the `param`, never a 500) and returns a frozen ResponsesRequest: the chat body every
adapter understands, the stream flag, the state fields a route must honour or refuse
(`refuse_state`), and the fields the response object echoes.

The input items become messages in `responses_input`, function `tools` and `tool_choice` the
chat forms in `responses_tools`, `text` and `reasoning` in `responses_fields`; here
`instructions` becomes the first (system) message, `max_output_tokens` `max_tokens` and
`moderation` chat's own `moderation`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final, NamedTuple

from proxy.errors import InvalidRequest, ProxyError
from proxy.ingress.fields import opt_bool, opt_int, opt_number, opt_str
from proxy.ingress.responses_fields import translate_reasoning, translate_text
from proxy.ingress.responses_input import translate_input
from proxy.ingress.responses_tools import translate_tools
from proxy.json_body import load_object

__all__ = ["ResponsesRequest", "in_client_terms", "parse_responses_request", "refuse_state"]

_RESEND: Final = (
    "resend the whole conversation in `input` (earlier messages, function calls and their "
    "outputs)"
)


class ResponsesRequest(NamedTuple):
    chat: dict[str, Any]
    """The chat-completions body: `messages`, `model` when given, `stream` (and
    `stream_options.include_usage` when streaming: a Responses answer always has usage)."""
    model: str | None
    stream: bool
    previous_response_id: str | None
    conversation: str | None
    background: bool
    store: bool | None
    """As asked; an answer says `store: false` wherever nothing is kept."""
    echo: Mapping[str, Any]
    """The request's fields that the response object repeats (ResponsesWriter's `echo`)."""
    sources: Sequence[str]
    """Where each chat message came from: `instructions`, `input` (a string) or `input[i]`."""
    items: Any = None
    """The client's `input`, where `in_client_terms` finds what a chat message moved."""


def parse_responses_request(raw: bytes) -> ResponsesRequest:
    body = load_object(raw)

    model = opt_str(body, "model")
    if model == "":
        raise InvalidRequest("'model' must be a non-empty string.", param="model")
    stream = opt_bool(body, "stream") or False
    # Most requests set none of the fields below: `in` first spares a call or a lookup each.
    background = ("background" in body and opt_bool(body, "background")) or False
    store = opt_bool(body, "store") if "store" in body else None
    previous = None
    if "previous_response_id" in body:
        previous = opt_str(body, "previous_response_id")
        if previous == "":
            raise InvalidRequest(
                "'previous_response_id' must be a non-empty string.",
                param="previous_response_id",
            )
    conversation = _conversation(body.get("conversation")) if "conversation" in body else None
    rare = not _RARE.isdisjoint(body)
    if rare:
        _check_rare(body)

    instructions = opt_str(body, "instructions") if "instructions" in body else None
    messages: list[dict[str, Any]] = []
    sources: list[str] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
        sources.append("instructions")
    translate_input(body.get("input"), messages, sources)
    if not any(m["role"] != "system" for m in messages):
        raise InvalidRequest(
            "Missing required parameter: 'input' (a string or an array of input items).",
            param="input",
        )

    chat: dict[str, Any] = {"messages": messages}
    echo: dict[str, Any] = {"instructions": instructions, "previous_response_id": previous}
    if model is not None:
        chat["model"] = model
    chat["stream"] = stream
    if stream:
        chat["stream_options"] = {"include_usage": True}

    translate_tools(body, chat, echo)

    # Most of these are absent from most requests: one set check spares a lookup each.
    if not body.keys().isdisjoint(_SAMPLING):
        for name, (low, high) in _SAMPLING.items():
            if name in body:
                value = opt_number(body, name, minimum=low, maximum=high)
                if value is not None:
                    chat[name] = value
                    echo[name] = value
    max_output = None
    if "max_output_tokens" in body:
        max_output = opt_int(body, "max_output_tokens", minimum=1)
        if max_output is not None:
            chat["max_tokens"] = max_output
    echo["max_output_tokens"] = max_output
    echo["max_tool_calls"] = (
        opt_int(body, "max_tool_calls", minimum=0) if "max_tool_calls" in body else None
    )
    if body.keys().isdisjoint(_IDENTIFIERS):
        echo["user"] = echo["safety_identifier"] = echo["prompt_cache_key"] = None
    else:
        for name in _IDENTIFIERS:
            echo[name] = opt_str(body, name) if name in body else None
        if echo["user"]:
            chat["user"] = echo["user"]
    truncation = opt_str(body, "truncation") if "truncation" in body else None
    if truncation is not None:
        if truncation not in ("auto", "disabled"):
            raise InvalidRequest(
                "Invalid value for 'truncation': supported values are 'auto' and 'disabled'.",
                param="truncation",
            )
        echo["truncation"] = truncation
    echo["metadata"] = _metadata(body.get("metadata")) if "metadata" in body else {}
    if rare and "top_logprobs" in body:
        top_logprobs = opt_int(body, "top_logprobs", minimum=0, maximum=20)
        if top_logprobs is not None:
            echo["top_logprobs"] = top_logprobs
    if rare and body.get("moderation") is not None:
        # Chat's field of the same shape: an `openai` upstream runs it, the other kinds refuse
        # it (they moderate nothing). Dropped, unmoderated text would pass for checked.
        chat["moderation"] = body["moderation"]
    if "text" in body:
        translate_text(body["text"], chat, echo)
    if "reasoning" in body:
        translate_reasoning(body["reasoning"], chat, echo)

    return ResponsesRequest(
        chat=chat,
        model=model,
        stream=stream,
        previous_response_id=previous,
        conversation=conversation,
        background=background,
        store=store,
        echo=MappingProxyType(echo),
        sources=sources,
        items=body.get("input"),
    )


def refuse_state(request: ResponsesRequest, *, chains: bool = False) -> None:
    """A 400 for the state a route cannot keep, never a silent drop.

    `chains=True` is for routes that continue `previous_response_id` themselves (Letta);
    `conversation` and `background` need stored responses, which no route has.
    """
    if request.previous_response_id is not None and not chains:
        raise InvalidRequest(
            "This model keeps no conversation state, so `previous_response_id` cannot be "
            f"continued: {_RESEND} and leave `previous_response_id` out.",
            param="previous_response_id",
        )
    if request.conversation is not None:
        raise InvalidRequest(
            "Conversations (`conversation`) are not supported: this proxy stores no "
            f"conversations. Leave `conversation` out and {_RESEND}.",
            param="conversation",
        )
    if request.background:
        raise InvalidRequest(
            "Background responses are not supported: this proxy stores no responses to poll. "
            f"Send the request without `background` (stream it if it takes long) and {_RESEND}.",
            param="background",
        )


def in_client_terms(request: ResponsesRequest, err: ProxyError) -> None:
    """Renames an adapter's `param` from the translated chat body's terms to the client's.

    An adapter checks the chat messages it is given (a Letta agent takes no files, a custom
    upstream needs text) and names them: `messages[2].content[1].image_url.url` becomes
    `input[1].content[1].image_url` (a tool output's image `input[3].output[0].image_url`),
    `messages` (nothing new to send) `input`. Adapters word such messages without either
    API's field names.
    """
    param = err.param
    if param == "response_format":
        # The chat field a JSON `text.format` was translated to (a kind that cannot honour it).
        err.param = "text.format"
        return
    if param is None or not param.startswith("messages"):
        return
    head, bracket, rest = param.partition("]")
    index = head.removeprefix("messages[")
    if not bracket or not index.isdecimal() or int(index) >= len(request.sources):
        err.param = "input"
        return
    source = request.sources[int(index)]
    if not source.startswith("input["):
        # A string `input` or the instructions: nothing inside it has a path of its own.
        err.param = source
        return
    if rest.startswith(".content["):
        source, rest = _from_tool_output(request.items, source, rest)
    if rest.endswith(".image_url.url"):
        # A Responses input_image's `image_url` is the URL itself, a chat part's an object.
        rest = rest.removesuffix(".url")
    err.param = source + rest


def _from_tool_output(items: Any, source: str, rest: str) -> tuple[str, str]:
    """A part of the user message that holds a run of tool outputs' images and files (its
    source is the first output) as the `input[i].output[k]` it came from."""
    index, _, after = rest[len(".content[") :].partition("]")
    if not isinstance(items, list) or not index.isdecimal():
        return source, rest
    first, left = int(source[len("input[") : -1]), int(index)
    # Translated already: items and output parts are objects; a message item ends the loop.
    for i, item in enumerate(items[first:], first):
        kind = item.get("type")
        if kind != "function_call_output" and kind != "reasoning":
            break
        output = item.get("output")
        for k, part in enumerate(output if isinstance(output, list) else ()):
            if part.get("type") in ("input_image", "input_file"):
                if left == 0:
                    return f"input[{i}]", f".output[{k}]{after}"
                left -= 1
    return source, rest


# -- the body -----------------------------------------------------------------------------

# In the order the response object lists them, with the bounds OpenAI holds them to.
_SAMPLING: Final = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0),
                    "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0)}
_IDENTIFIERS: Final = ("user", "safety_identifier", "prompt_cache_key")
# Fields that nearly no request sets, checked (`top_logprobs` is echoed, `moderation` sent on).
_RARE: Final = frozenset({"prompt", "include", "stream_options", "service_tier",
                          "top_logprobs", "moderation"})
_SERVICE_TIERS: Final = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
# OpenAI's bounds on `metadata`, which the response object repeats.
_METADATA_KEYS: Final = 16
_METADATA_KEY_CHARS: Final = 64
_METADATA_VALUE_CHARS: Final = 512


def _check_rare(body: dict[str, Any]) -> None:
    if body.get("prompt") is not None:
        raise InvalidRequest(
            "Stored prompts (`prompt`) are not supported: this proxy stores nothing. Send the "
            "text in `instructions` and `input`.",
            param="prompt",
        )
    include = body.get("include")
    if include is not None and (
        not isinstance(include, list) or not all(isinstance(x, str) for x in include)
    ):
        raise InvalidRequest("'include' must be an array of strings.", param="include")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
        opt_bool(options, "include_obfuscation", "stream_options.include_obfuscation")
    moderation = body.get("moderation")
    if moderation is not None and not isinstance(moderation, dict):
        raise InvalidRequest("'moderation' must be an object.", param="moderation")
    # Checked, and not sent on: a chat server has no tiers, and the answer's `service_tier`
    # says `default`, the tier it was served at.
    tier = opt_str(body, "service_tier") if "service_tier" in body else None
    if tier is not None and tier not in _SERVICE_TIERS:
        raise InvalidRequest(
            "Invalid value for 'service_tier': supported values are "
            + ", ".join(f"'{t}'" for t in _SERVICE_TIERS) + ".",
            param="service_tier",
        )


def _conversation(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str) and value["id"]:
        return str(value["id"])
    raise InvalidRequest(
        "'conversation' must be a conversation id or an object with an 'id'.",
        param="conversation",
    )


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidRequest(
            "'metadata' must be an object whose values are strings.", param="metadata"
        )
    if len(value) > _METADATA_KEYS:
        raise InvalidRequest(
            f"'metadata' has {len(value)} keys; at most {_METADATA_KEYS} are allowed.",
            param="metadata",
        )
    for key, text in value.items():
        if len(key) > _METADATA_KEY_CHARS or len(text) > _METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"'metadata' keys must be at most {_METADATA_KEY_CHARS} characters and its "
                f"values at most {_METADATA_VALUE_CHARS}.",
                param="metadata",
            )
    return value
