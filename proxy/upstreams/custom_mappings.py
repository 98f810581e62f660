"""Compiling how a `custom` answer is read: `sync:` (one JSON body), `stream:` (framing and
per-event rules) and `request.message_format`, with every problem named by its key path."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final, cast

from proxy.upstreams.custom_framing import FRAMINGS, Framing
from proxy.upstreams.custom_paths import Getter, Path, PathError, compile_path
from proxy.upstreams.custom_problems import Checker, Where, kind_of, unknown_key
from proxy.upstreams.custom_rules import (
    Condition,
    Rule,
    StreamMapping,
    SyncMapping,
    UsageMapping,
    pick_function,
)
from proxy.upstreams.custom_turn import DEFAULT_ROLES, MessageFormat

__all__ = [
    "OVERRIDE_KEYS",
    "compile_message_format",
    "compile_stream",
    "compile_sync",
]

OVERRIDE_KEYS: Final = ("path", "query", "body")
_SYNC_KEYS: Final = (*OVERRIDE_KEYS, "text", "join", "reasoning", "usage", "finish", "error",
                     "require_text")
_STREAM_KEYS: Final = (*OVERRIDE_KEYS, "framing", "rules")
_RULE_KEYS: Final = ("when", "has", "text", "cumulative", "recap", "separator", "reasoning",
                     "usage", "usage_sum", "finish", "capture", "error", "end")
_USAGE_KEYS: Final = ("prompt_tokens", "completion_tokens", "total_tokens")
_FORMAT_KEYS: Final = ("role_key", "content_key", "roles")
_CAPTURE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")


def compile_usage(c: Checker, value: Any, where: Where) -> UsageMapping | None:
    entries = c.mapping(value, where)
    if entries is None:
        return None
    c.keys(entries, _USAGE_KEYS, where)
    if not any(k in entries for k in _USAGE_KEYS):
        c.error(where, "map at least one of " + ", ".join(_USAGE_KEYS))
        return None
    getters = {k: c.paths(entries[k], (*where, k)) if k in entries else None
               for k in _USAGE_KEYS}
    parent: Getter | None = None
    keys: list[str | None] = [None, None, None]
    leaves = [_leaf(entries.get(k)) if k in entries else None for k in _USAGE_KEYS]
    found = [leaf for leaf in leaves if leaf is not None]
    if len(found) == sum(k in entries for k in _USAGE_KEYS) and len(
            {text for text, _, _ in found}) == 1:
        parent = found[0][1]
        keys = [leaf[2] if leaf is not None else None for leaf in leaves]
    return UsageMapping(getters["prompt_tokens"], getters["completion_tokens"],
                        getters["total_tokens"], parent, (keys[0], keys[1], keys[2]))

def compile_message_format(c: Checker, value: Any, where: Where) -> MessageFormat:
    entries = c.mapping(value, where)
    if not entries:
        return MessageFormat()
    c.keys(entries, _FORMAT_KEYS, where)
    role_key = c.string(entries.get("role_key", "role"), (*where, "role_key"),
                           empty=False) or "role"
    content_key = c.string(entries.get("content_key", "content"),
                              (*where, "content_key"), empty=False) or "content"
    roles: dict[str, str | None] = dict(DEFAULT_ROLES)
    raw_roles = c.mapping(entries.get("roles"), (*where, "roles")) or {}
    for role, name in raw_roles.items():
        spot = (*where, "roles", role)
        if role not in DEFAULT_ROLES:
            c.error(spot, unknown_key(str(role), list(DEFAULT_ROLES)).replace(
                "unknown key", "unknown role"))
        elif name is not None and not isinstance(name, str):
            c.error(spot, f"expected the upstream's name for the role, or null to "
                             f"leave it out; got {kind_of(name)}")
        else:
            roles[role] = name
    return MessageFormat(role_key, content_key, roles)

def compile_sync(c: Checker, value: Any, where: Where) -> SyncMapping | None:
    entries = c.mapping(value, where)
    if entries is None:
        return None
    c.keys(entries, _SYNC_KEYS, where)
    if "text" not in entries:
        c.error(where, "missing required key 'text' (the path of the answer's text in "
                          "the JSON body)")
        return None
    text = c.paths(entries["text"], (*where, "text"))
    join = ""
    if "join" in entries:
        join = c.string(entries["join"], (*where, "join")) or ""
    reasoning = (c.paths(entries["reasoning"], (*where, "reasoning"))
                 if "reasoning" in entries else None)
    usage = compile_usage(c, entries["usage"], (*where, "usage")) if "usage" in entries else None
    finish = (c.paths(entries["finish"], (*where, "finish"))
              if "finish" in entries else None)
    error = c.paths(entries["error"], (*where, "error")) if "error" in entries else None
    require_text = False
    if "require_text" in entries:
        require_text = bool(c.boolean(entries["require_text"],
                                         (*where, "require_text")))
    if text is None:
        return None
    return SyncMapping(text, join, reasoning, usage, finish, error, require_text)

def compile_condition(c: Checker, key: Any, value: Any, where: Where) -> Condition | None:
    spot = (*where, str(key))
    if not isinstance(key, str):
        c.error(where, f"a `when` key is a path, got {kind_of(key)}")
        return None
    try:
        path = compile_path(key)
    except PathError as exc:
        c.error(spot, str(exc))
        return None
    values = tuple(value) if isinstance(value, list | tuple) else (value,)
    if not values:
        c.error(spot, "an empty list matches nothing; give a value or a list of values")
        return None
    for item in values:
        if isinstance(item, Mapping | list | tuple):
            c.error(spot, f"compare with a string, number, boolean or null, not "
                             f"{kind_of(item)}")
            return None
        if isinstance(item, float) and item != item:
            c.error(spot, "NaN equals nothing: this condition could never hold")
            return None
    strict = any(isinstance(v, bool | int | float) for v in values)
    return Condition(path, values, strict)

def compile_rule(c: Checker, value: Any, where: Where) -> Rule | None:
    entries = c.mapping(value, where)
    if entries is None:
        return None
    before = len(c.problems)
    c.keys(entries, _RULE_KEYS, where)
    when: list[Condition] = []
    if "when" in entries:
        raw_when = c.mapping(entries["when"], (*where, "when"))
        for key, expected in (raw_when or {}).items():
            cond = compile_condition(c, key, expected, (*where, "when"))
            if cond is not None:
                when.append(cond)
    has: list[Path] = []
    if "has" in entries:
        raw_has = entries["has"]
        items = raw_has if isinstance(raw_has, list) else [raw_has]
        for i, item in enumerate(items):
            spot = (*where, "has", i) if isinstance(raw_has, list) else (*where, "has")
            try:
                has.append(compile_path(item))
            except PathError as exc:
                c.error(spot, str(exc))

    def opt_paths(key: str) -> Getter | None:
        return c.paths(entries[key], (*where, key)) if key in entries else None

    def opt_bool(key: str) -> bool:
        if key not in entries:
            return False
        return bool(c.boolean(entries[key], (*where, key)))

    text = opt_paths("text")
    reasoning = opt_paths("reasoning")
    finish = opt_paths("finish")
    cumulative, recap, usage_sum, end = (opt_bool("cumulative"), opt_bool("recap"),
                                         opt_bool("usage_sum"), opt_bool("end"))
    separator = ""
    if "separator" in entries:
        separator = c.string(entries["separator"], (*where, "separator")) or ""
    usage = compile_usage(c, entries["usage"], (*where, "usage")) if "usage" in entries else None
    capture: list[tuple[str, Getter]] = []
    if "capture" in entries:
        raw_capture = c.mapping(entries["capture"], (*where, "capture")) or {}
        for name, path in raw_capture.items():
            spot = (*where, "capture", str(name))
            if not isinstance(name, str) or not _CAPTURE_NAME.fullmatch(name):
                c.error(spot, "a capture name is letters, digits, `_` and `-`, "
                                 "starting with a letter or `_`")
                continue
            getter = c.paths(path, spot)
            if getter is not None:
                capture.append((name, getter))
    is_error = "error" in entries
    error: Getter | None = None
    if is_error:
        raw_error = entries["error"]
        if raw_error is True:
            error = None
        elif raw_error is False or raw_error is None:
            c.error((*where, "error"), "give the path of the error's message (or "
                                          "`true` for a generic one)")
        else:
            error = c.paths(raw_error, (*where, "error"))
    # Combinations that cannot mean anything.
    if cumulative and recap:
        c.error((*where, "recap"), "`cumulative` and `recap` exclude each other: "
                                      "`recap` repeats the deltas, `cumulative` is the "
                                      "text so far")
    for key in ("cumulative", "recap", "separator"):
        if key in entries and "text" not in entries:
            c.error((*where, key), f"`{key}` qualifies `text`, which this rule lacks")
    if "usage_sum" in entries and "usage" not in entries:
        c.error((*where, "usage_sum"), "`usage_sum` qualifies `usage`, which this rule "
                                          "lacks")
    if is_error:
        clash = [k for k in ("text", "reasoning", "usage", "finish", "end") if k in entries]
        if clash:
            c.error((*where, "error"), "an `error` rule ends the stream with that "
                       f"error; move {', '.join(f'`{k}`' for k in clash)} to a rule of "
                       "its own")
    if len(c.problems) > before:
        return None
    return Rule(tuple(when), tuple(has), text, cumulative, recap, separator, reasoning,
                usage, usage_sum, finish, tuple(capture), is_error, error, end)

def compile_stream(c: Checker, value: Any, where: Where) -> StreamMapping | None:
    entries = c.mapping(value, where)
    if entries is None:
        return None
    c.keys(entries, _STREAM_KEYS, where)
    if "framing" not in entries:
        c.error(where, "missing required key 'framing' (sse, ndjson or text: it is "
                          "declared, never guessed from Content-Type)")
        framing = None
    else:
        framing = c.choice(entries["framing"], (*where, "framing"), FRAMINGS)
    rules: list[Rule] = []
    ok = True
    if "rules" in entries:
        raw_rules = entries["rules"]
        if not isinstance(raw_rules, list):
            c.error((*where, "rules"), f"expected a list of rules, got "
                                          f"{kind_of(raw_rules)}")
            ok = False
        else:
            for i, raw in enumerate(raw_rules):
                rule = compile_rule(c, raw, (*where, "rules", i))
                if rule is None:
                    ok = False
                else:
                    rules.append(rule)
    if framing is None or not ok:
        return None
    if not rules and framing == "text":
        # Plain text: every chunk is a delta.
        rules.append(Rule(text=compile_path("$").get))
    if not any(rule.text is not None for rule in rules):
        spot = (*where, "rules") if "rules" in entries else where
        c.error(spot, "no rule has `text`: the stream would never carry the answer")
        return None
    captures = frozenset(name for rule in rules for name, _ in rule.capture)
    return StreamMapping(cast(Framing, framing), tuple(rules),
                         any(rule.end for rule in rules), captures, pick_function(rules))



def _leaf(value: Any) -> tuple[str, Getter, str] | None:
    if not isinstance(value, str):
        return None
    try:
        return compile_path(value).split_leaf()
    except PathError:
        return None
