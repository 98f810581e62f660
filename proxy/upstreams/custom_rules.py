"""The compiled reading of a `custom` answer: the sync mapping and the stream rules.

What custom_mappings.py compiles from `sync:` and `stream:`, and what custom_reader.py and
custom_sync.py read answers with. The rules' `when`/`has` tests are one function generated at
load (`pick_function`), so choosing the rule of a streamed event is one call with the keys,
values and getters bound in, not a loop over rules and conditions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

from proxy.upstreams.custom_framing import Framing
from proxy.upstreams.custom_paths import Getter, Path

__all__ = [
    "Condition",
    "Pick",
    "Rule",
    "StreamMapping",
    "SyncMapping",
    "UsageMapping",
    "pick_function",
]


@dataclass(frozen=True, slots=True)
class UsageMapping:
    prompt_tokens: Getter | None
    completion_tokens: Getter | None
    total_tokens: Getter | None
    # When the three paths share a parent (`metadata.usage.*`), it is read once and the
    # counts are its keys: an event without usage costs one lookup, not three.
    parent: Getter | None = None
    keys: tuple[str | None, str | None, str | None] = (None, None, None)


@dataclass(frozen=True, slots=True)
class SyncMapping:
    text: Getter
    join: str = ""
    reasoning: Getter | None = None
    usage: UsageMapping | None = None
    finish: Getter | None = None
    error: Getter | None = None
    require_text: bool = False


@dataclass(frozen=True, slots=True)
class Condition:
    """`when: {path: value | [values]}`: the value at `path` equals one of `values`.

    `strict` when a value is a number or a boolean: JSON `true` must not equal `1`.
    """

    path: Path
    values: tuple[Any, ...]
    strict: bool


@dataclass(frozen=True, slots=True)
class Rule:
    when: tuple[Condition, ...] = ()
    has: tuple[Path, ...] = ()
    text: Getter | None = None
    cumulative: bool = False
    recap: bool = False
    separator: str = ""
    reasoning: Getter | None = None
    usage: UsageMapping | None = None
    usage_sum: bool = False
    finish: Getter | None = None
    capture: tuple[tuple[str, Getter], ...] = ()
    # `is_error`: the event is a stream error; `error` finds its message (None: a generic one).
    is_error: bool = False
    error: Getter | None = None
    end: bool = False


Pick: TypeAlias = Callable[[Any, str], int]


@dataclass(frozen=True, slots=True)
class StreamMapping:
    framing: Framing
    rules: tuple[Rule, ...]
    # EOF before an `end` event is a truncated stream only when some rule can end it.
    has_end: bool
    captures: frozenset[str]
    # `pick(payload, event_name)`: the index of the first rule that matches, or -1.
    pick: Pick


def same_value(value: Any, expected: tuple[Any, ...]) -> bool:
    """Equality that keeps JSON's booleans apart from its numbers (`true` is not `1`)."""
    is_bool = type(value) is bool
    return any(value == item and (type(item) is bool) == is_bool for item in expected)


def pick_function(rules: Sequence[Rule]) -> Pick:
    """One function that tests every rule's `when` and `has` in order, generated at load.

    The source holds only generated names; every key, value and getter is bound through the
    namespace. A condition on `$event` compares the name, one on a plain key reads the dict
    inline; other paths call their compiled getter.
    """
    namespace: dict[str, Any] = {"_same": same_value}
    lines = ["def pick(p, e):", "    d = p if type(p) is dict else _EMPTY"]
    namespace["_EMPTY"] = {}
    for index, rule in enumerate(rules):
        tests: list[str] = []
        for n, cond in enumerate(rule.when):
            values = f"V{index}_{n}"
            namespace[values] = cond.values
            if cond.path.reads_event:
                subject = "e"
            elif cond.path.key is not None:
                key = f"K{index}_{n}"
                namespace[key] = cond.path.key
                subject = f"d.get({key})"
            else:
                getter = f"G{index}_{n}"
                namespace[getter] = cond.path.get
                subject = f"{getter}(p, e)"
            if cond.strict:
                tests.append(f"_same({subject}, {values})")
            elif len(cond.values) == 1:
                namespace[values] = cond.values[0]
                tests.append(f"{subject} == {values}")
            else:
                tests.append(f"{subject} in {values}")
        for n, has in enumerate(rule.has):
            getter = f"H{index}_{n}"
            namespace[getter] = has.get
            tests.append(f"{getter}(p, e)")
        lines.append(f"    if {' and '.join(tests) or 'True'}: return {index}")
    lines.append("    return -1")
    exec(compile("\n".join(lines), "<custom rules>", "exec"), namespace)
    pick: Pick = namespace["pick"]
    return pick

