"""A Responses request's function `tools`, `tool_choice` and `parallel_tool_calls` in their
chat-completions forms, and as the response object echoes them. Sans-IO.

Function tools, and `namespace` tools (function tools grouped under a name, as Codex CLI
sends its sub-agent tools): a namespaced function is offered to the chat model as
`<namespace>__<name>`, and a call of that name goes back to the client as the function's
name with its `namespace` (`call_name`). A hosted tool (web_search, file_search, ...) is a
400 naming it. An `allowed_tools` choice is enforced by offering the upstream only the
allowed functions.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.errors import InvalidRequest
from proxy.ingress.fields import opt_bool, opt_str, req_str
from proxy.json_body import kind_of

__all__ = ["NAMESPACE_JOIN", "call_name", "qualified", "translate_tools"]

_TOOL_CHOICE_MODES: Final = frozenset({"none", "auto", "required"})
_TOOL_FIELDS: Final = frozenset({"tools", "tool_choice", "parallel_tool_calls"})
# Between a namespace and its function's name in the chat function's name: a chat function
# name may hold letters, digits, `_` and `-` (MCP clients join server and tool the same way).
NAMESPACE_JOIN: Final = "__"


def qualified(namespace: str, name: str) -> str:
    """The chat function name of `name` in `namespace`."""
    return f"{namespace}{NAMESPACE_JOIN}{name}"


def call_name(name: str, tools: Any) -> tuple[str, str | None]:
    """A chat tool call's function name as the client knows it: (name, namespace), the
    namespace None unless `name` is a namespaced function of the echoed `tools`. Asked only
    of a response that calls a function."""
    if NAMESPACE_JOIN not in name or not isinstance(tools, list):
        return name, None
    for tool in tools:
        if tool.get("type") == "namespace":
            prefix = tool["name"] + NAMESPACE_JOIN
            if name.startswith(prefix) and any(
                prefix + inner["name"] == name for inner in tool["tools"]
            ):
                return name[len(prefix):], tool["name"]
    return name, None


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
    # Each chat function's name and where it was given, for the check that they are unique.
    offered: list[tuple[str, str]] = []
    for i, tool in enumerate(raw_tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(
                f"Invalid type for '{where}': expected an object, got {kind_of(tool)}.",
                param=where,
            )
        kind = tool.get("type")
        if kind == "function":
            echoed, function = _function(tool, where)
            tools.append(echoed)
            chat_tools.append({"type": "function", "function": function})
            offered.append((function["name"], f"{where}.name"))
        elif kind == "namespace":
            tools.append(_namespace(tool, where, chat_tools, offered))
        else:
            raise _unsupported(kind, where)
    echo["tools"] = tools

    # What tool_choice may name: the functions not in a namespace.
    names = {t["name"] for t in tools if t["type"] == "function"}
    if len({name for name, _ in offered}) < len(offered):
        _duplicate(offered)
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


def _function(tool: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A function tool as the response echoes it, and its chat `function`."""
    name = req_str(tool, "name", where)
    if not name:
        raise InvalidRequest(f"'{where}.name' must be a non-empty string.", param=f"{where}.name")
    description = opt_str(tool, "description", f"{where}.description")
    parameters = tool.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise InvalidRequest(
            f"'{where}.parameters' must be a JSON Schema object.", param=f"{where}.parameters"
        )
    strict = opt_bool(tool, "strict", f"{where}.strict")
    echoed = {"type": "function", "name": name, "description": description,
              "parameters": parameters, "strict": strict}
    function: dict[str, Any] = {"name": name}
    if description is not None:
        function["description"] = description
    function["parameters"] = parameters if parameters is not None else {
        "type": "object", "properties": {}}
    if strict is not None:
        function["strict"] = strict
    return echoed, function


def _namespace(
    tool: dict[str, Any], where: str, chat_tools: list[dict[str, Any]],
    offered: list[tuple[str, str]],
) -> dict[str, Any]:
    """A namespace tool as the response echoes it; its functions go to `chat_tools` under
    their qualified names, with the namespace's description before their own."""
    namespace = req_str(tool, "name", where)
    if not namespace or NAMESPACE_JOIN in namespace:
        raise InvalidRequest(
            f"'{where}.name' must be a non-empty string without '{NAMESPACE_JOIN}'.",
            param=f"{where}.name",
        )
    about = req_str(tool, "description", where)
    inner = tool.get("tools")
    if not isinstance(inner, list) or not inner:
        raise InvalidRequest(
            f"'{where}.tools' must be a non-empty array of function tools.", param=f"{where}.tools"
        )
    echoed_tools: list[dict[str, Any]] = []
    for j, member in enumerate(inner):
        at = f"{where}.tools[{j}]"
        if not isinstance(member, dict):
            raise InvalidRequest(
                f"Invalid type for '{at}': expected an object, got {kind_of(member)}.", param=at
            )
        if member.get("type") != "function":
            raise _unsupported(member.get("type"), at)
        echoed, function = _function(member, at)
        echoed_tools.append(echoed)
        function["name"] = qualified(namespace, function["name"])
        if about:
            own = function.get("description")
            function["description"] = f"{about}\n\n{own}" if own else about
        chat_tools.append({"type": "function", "function": function})
        offered.append((function["name"], f"{at}.name"))
    return {"type": "namespace", "name": namespace, "description": about,
            "tools": echoed_tools}


def _duplicate(offered: list[tuple[str, str]]) -> None:
    # Two functions of one name: the model's call to it would run either, and a named
    # `tool_choice` or `allowed_tools` entry could not say which.
    first: dict[str, str] = {}
    for name, where in offered:
        other = first.setdefault(name, where)
        if other != where:
            raise InvalidRequest(
                f"'{where}' is the name of '{other.removesuffix('.name')}' too: function "
                "names must be unique.",
                param=where,
            )


def _unsupported(kind: Any, where: str) -> InvalidRequest:
    param = f"{where}.type"
    if kind is None:
        return InvalidRequest(f"Missing required parameter: '{param}'.", param=param)
    if not isinstance(kind, str):
        return InvalidRequest(
            f"Invalid type for '{param}': expected a string, got {kind_of(kind)}.", param=param
        )
    hint = (
        " Codex CLI sends it unless its config says web_search = \"disabled\"."
        if kind.startswith("web_search") else ""
    )
    return InvalidRequest(
        f"Tool type '{kind}' ({where}) is not supported: this proxy serves function tools "
        f"only; hosted tools (web_search, file_search, ...) need OpenAI's own servers.{hint}",
        param=param,
    )
