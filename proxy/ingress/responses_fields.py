"""A Responses request's `text` and `reasoning` in their chat forms. Sans-IO.

`text.format` becomes `response_format`, `text.verbosity` `verbosity`, `reasoning.effort`
`reasoning_effort`; each is checked against OpenAI's values and what was asked is kept in the
`echo` the response object repeats.
"""

from __future__ import annotations

from typing import Any, Final

from proxy.errors import InvalidRequest
from proxy.ingress.fields import opt_bool, opt_str, req_str
from proxy.json_body import kind_of

__all__ = ["translate_reasoning", "translate_text"]

_EFFORTS: Final = frozenset({"none", "minimal", "low", "medium", "high", "xhigh", "max"})
_SUMMARIES: Final = ("auto", "concise", "detailed")


def translate_text(text: Any, chat: dict[str, Any], echo: dict[str, Any]) -> None:
    if text is None:
        return
    if not isinstance(text, dict):
        raise InvalidRequest("'text' must be an object.", param="text")
    out: dict[str, Any] = {}
    fmt = text.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict):
            raise InvalidRequest(
                f"Invalid type for 'text.format': expected an object, got {kind_of(fmt)}.",
                param="text.format",
            )
        kind = fmt.get("type")
        if kind == "text":
            out["format"] = {"type": "text"}
        elif kind == "json_object":
            out["format"] = {"type": "json_object"}
            chat["response_format"] = {"type": "json_object"}
        elif kind == "json_schema":
            name = req_str(fmt, "name", "text.format")
            if not name:
                raise InvalidRequest(
                    "'text.format.name' must be a non-empty string.", param="text.format.name"
                )
            schema = fmt.get("schema")
            if not isinstance(schema, dict):
                raise InvalidRequest(
                    "'text.format.schema' must be a JSON Schema object.",
                    param="text.format.schema",
                )
            description = opt_str(fmt, "description", "text.format.description")
            strict = opt_bool(fmt, "strict", "text.format.strict")
            out["format"] = {"type": "json_schema", "name": name, "schema": schema,
                             "description": description, "strict": bool(strict)}
            json_schema: dict[str, Any] = {"name": name, "schema": schema}
            if description is not None:
                json_schema["description"] = description
            if strict is not None:
                json_schema["strict"] = strict
            chat["response_format"] = {"type": "json_schema", "json_schema": json_schema}
        else:
            raise InvalidRequest(
                "Invalid value for 'text.format.type': supported values are 'text', "
                "'json_object' and 'json_schema'.",
                param="text.format.type",
            )
    verbosity = opt_str(text, "verbosity", "text.verbosity")
    if verbosity is not None:
        if verbosity not in ("low", "medium", "high"):
            raise InvalidRequest(
                "Invalid value for 'text.verbosity': supported values are 'low', 'medium' "
                "and 'high'.",
                param="text.verbosity",
            )
        out["verbosity"] = verbosity
        # OpenAI's chat API has the same field; a server without it answers for itself, as
        # for `reasoning_effort`.
        chat["verbosity"] = verbosity
    if out:
        out.setdefault("format", {"type": "text"})
        echo["text"] = out


def translate_reasoning(value: Any, chat: dict[str, Any], echo: dict[str, Any]) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise InvalidRequest("'reasoning' must be an object.", param="reasoning")
    effort = opt_str(value, "effort", "reasoning.effort")
    if effort is not None and effort not in _EFFORTS:
        raise InvalidRequest(
            "Invalid value for 'reasoning.effort': supported values are "
            + ", ".join(f"'{e}'" for e in sorted(_EFFORTS)) + ".",
            param="reasoning.effort",
        )
    summary = _summary(value, "summary")
    if summary is None:
        # The deprecated name of `summary`, which older clients still send.
        summary = _summary(value, "generate_summary")
    if effort is not None:
        chat["reasoning_effort"] = effort
    echo["reasoning"] = {"effort": effort, "summary": summary}




def _summary(value: dict[str, Any], key: str) -> str | None:
    summary = opt_str(value, key, f"reasoning.{key}")
    if summary is not None and summary not in _SUMMARIES:
        raise InvalidRequest(
            f"Invalid value for 'reasoning.{key}': supported values are 'auto', 'concise' "
            "and 'detailed'.",
            param=f"reasoning.{key}",
        )
    return summary
