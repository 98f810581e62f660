"""Typed access to request fields: a wrong type or value is an InvalidRequest naming the field."""

from __future__ import annotations

from typing import Any

from proxy.errors import InvalidRequest
from proxy.json_body import kind_of


def opt_str(obj: dict[str, Any], key: str, param: str | None = None) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    where = param or key
    raise InvalidRequest(
        f"Invalid type for '{where}': expected a string, got {kind_of(value)}.", param=where
    )


def req_str(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if isinstance(value, str):
        return value
    where = f"{param}.{key}"
    if value is None:
        raise InvalidRequest(f"Missing required parameter: '{where}'.", param=where)
    raise InvalidRequest(
        f"Invalid type for '{where}': expected a string, got {kind_of(value)}.", param=where
    )


def opt_bool(obj: dict[str, Any], key: str, param: str | None = None) -> bool | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    where = param or key
    raise InvalidRequest(
        f"Invalid type for '{where}': expected a boolean, got {kind_of(value)}.", param=where
    )


def opt_number(
    obj: dict[str, Any], key: str, *, minimum: float, maximum: float
) -> float | int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid type for '{key}': expected a number, got {kind_of(value)}.", param=key
        )
    # orjson reads neither NaN nor an infinity, and an integer past 64 bits as a float: a
    # bound check is all a number needs.
    if not minimum <= value <= maximum:
        raise InvalidRequest(
            f"Invalid value for '{key}': must be between {minimum:g} and {maximum:g}.",
            param=key,
        )
    return value


def opt_int(
    obj: dict[str, Any], key: str, *, minimum: int, maximum: int | None = None
) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidRequest(
            f"Invalid type for '{key}': expected an integer, got {kind_of(value)}.", param=key
        )
    if value < minimum:
        raise InvalidRequest(
            f"Invalid value for '{key}': must be at least {minimum}.", param=key
        )
    if maximum is not None and value > maximum:
        raise InvalidRequest(
            f"Invalid value for '{key}': must be at most {maximum}.", param=key
        )
    return value
