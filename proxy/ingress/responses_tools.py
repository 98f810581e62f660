"""A Responses request's function `tools`, `tool_choice` and `parallel_tool_calls` in their
chat-completions forms, and as the response object echoes them. Sans-IO.

Only function tools: a hosted tool (web_search, file_search, ...) is a 400 naming it. An
`allowed_tools` choice is enforced by offering the upstream only the allowed functions.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.errors import InvalidRequest
from proxy.ingress.fields import opt_bool, opt_str, req_str
from proxy.json_body import kind_of

__all__ = ["translate_tools"]

_TOOL_CHOICE_MODES: Final = frozenset({"none", "auto", "required"})
_TOOL_FIELDS: Final = frozenset({"tools", "tool_choice", "parallel_tool_calls"})


def translate_tools(body: dict[str, Any], chat: dict[str, Any], echo: dict[str, Any]) -> None:
    if _TOOL_FIELDS.isdisjoint(body):
        # What the rest of this function gives a request without them.
        echo["tools"] = []
        echo["tool_choice"] = "auto"
        echo["parallel_tool_calls"] = True
        return
    raw_tools = body.get("tools")
    if raw_tools is None:
        raw_tools = []
    if not isinstance(raw_tools, list):
        raise InvalidRequest(
            f"Invalid type for 'tools': expected an array, got {kind_of(raw_tools)}.",
            param="tools",
        )
    tools: list[dict[str, Any]] = []
    chat_tools: list[dict[str, Any]] = []
    for i, tool in enumerate(raw_tools):
        if not isinstance(tool, dict):
            raise InvalidRequest(
                f"Invalid type for 'tools[{i}]': expected an object, got {kind_of(tool)}.",
                param=f"tools[{i}]",
            )
        if tool.get("type") != "function":
            raise _unsupported(tool.get("type"), f"tools[{i}]")
        name = req_str(tool, "name", f"tools[{i}]")
        if not name:
            raise InvalidRequest(
                f"'tools[{i}].name' must be a non-empty string.", param=f"tools[{i}].name"
            )
        description = opt_str(tool, "description", f"tools[{i}].description")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequest(
                f"'tools[{i}].parameters' must be a JSON Schema object.",
                param=f"tools[{i}].parameters",
            )
        strict = opt_bool(tool, "strict", f"tools[{i}].strict")
        tools.append({"type": "function", "name": name, "description": description,
                      "parameters": parameters, "strict": strict})
        function: dict[str, Any] = {"name": name}
        if description is not None:
            function["description"] = description
        function["parameters"] = parameters if parameters is not None else {
            "type": "object", "properties": {}}
        if strict is not None:
            function["strict"] = strict
        chat_tools.append({"type": "function", "function": function})
    echo["tools"] = tools

    names = {t["name"] for t in tools}
    if len(names) < len(tools):
        _duplicate(tools)
    choice = body.get("tool_choice")
    chat_choice: Any = None
    if choice is None:
        echo["tool_choice"] = "auto"
    elif isinstance(choice, str) and choice in _TOOL_CHOICE_MODES:
        echo["tool_choice"] = chat_choice = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = req_str(choice, "name", "tool_choice")
        _known(name, names, "tool_choice")
        echo["tool_choice"] = {"type": "function", "name": name}
        chat_choice = {"type": "function", "function": {"name": name}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        # Enforced by offering the upstream only the allowed functions: a model cannot call
        # what it was not given, and chat servers rarely know `allowed_tools`.
        mode = choice.get("mode", "auto")
        allowed = choice.get("tools")
        if mode not in ("auto", "required") or not isinstance(allowed, list):
            raise InvalidRequest(
                "'tool_choice' of type allowed_tools needs 'mode' ('auto' or 'required') and "
                "'tools', an array of {\"type\": \"function\", \"name\": ...}.",
                param="tool_choice",
            )
        keep: list[str] = []
        for j, entry in enumerate(allowed):
            if not isinstance(entry, dict) or entry.get("type") != "function":
                raise InvalidRequest(
                    f"'tool_choice.tools[{j}]' must be {{\"type\": \"function\", \"name\": ...}}.",
                    param=f"tool_choice.tools[{j}]",
                )
            keep.append(req_str(entry, "name", f"tool_choice.tools[{j}]"))
            _known(keep[-1], names, "tool_choice")
        # A set: the lists are the client's, of any length (`in` a list is quadratic).
        kept = set(keep)
        echo["tool_choice"] = {
            "type": "allowed_tools",
            "mode": mode,
            "tools": [{"type": "function", "name": n} for n in keep],
        }
        chat_tools = [t for t in chat_tools if t["function"]["name"] in kept]
        chat_choice = mode
    else:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': use 'none', 'auto', 'required', "
            "{\"type\": \"function\", \"name\": ...} or an allowed_tools object.",
            param="tool_choice",
        )

    parallel = opt_bool(body, "parallel_tool_calls")
    echo["parallel_tool_calls"] = True if parallel is None else parallel
    if chat_choice == "required" and not chat_tools:
        # Dropped with the tools below, it would let the model answer in text.
        raise InvalidRequest(
            "'tool_choice' requires a function call, but no function is offered: add the "
            "functions to 'tools' (and to the allowed_tools list).",
            param="tool_choice",
        )
    # Chat servers refuse tool_choice and parallel_tool_calls without tools.
    if chat_tools:
        chat["tools"] = chat_tools
        if chat_choice is not None:
            chat["tool_choice"] = chat_choice
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel


def _known(name: str, names: set[str], param: str) -> None:
    if name not in names:
        raise InvalidRequest(
            f"'{param}' names the function '{name}', which is not among 'tools'.", param=param
        )


def _duplicate(tools: list[dict[str, Any]]) -> None:
    # Two functions of one name: the model's call to it would run either, and a named
    # `tool_choice` or `allowed_tools` entry could not say which.
    first: dict[str, int] = {}
    for i, tool in enumerate(tools):
        j = first.setdefault(tool["name"], i)
        if j != i:
            raise InvalidRequest(
                f"'tools[{i}].name' is the name of 'tools[{j}]' too: function names must be "
                "unique.",
                param=f"tools[{i}].name",
            )


def _unsupported(kind: Any, where: str) -> InvalidRequest:
    param = f"{where}.type"
    if kind is None:
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if not isinstance(kind, str):
        return InvalidRequest(
            f"Invalid type for '{param}': expected a string, got {kind_of(kind)}.", param=param
        )
    return InvalidRequest(
        f"Tool type '{kind}' ({where}) is not supported: this proxy serves function tools "
        "only; hosted tools (web_search, file_search, ...) need OpenAI's own servers.",
        param=param,
    )
