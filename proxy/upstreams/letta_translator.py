"""Letta stream events -> OpenAI chat.completion.chunk dicts (sans-IO: events in, chunks out).

A Letta run streams `data: {json}` events, each with a `message_type`: a `ping` first (it
carries the `run_id`), then the agent's messages, then `stop_reason`, then `usage_statistics`,
then `data: [DONE]`. Token-streamed messages arrive as many events that share
(message_type, otid); text and a tool call of one LLM reply share `id` but not `otid`, so the
otid is what tells one message from the next.

Only the agent's assistant text becomes `content`. Its reasoning and its own tool calls are
hidden unless asked for, and then go to `reasoning_content`: never to `tool_calls`, which an
OpenAI client would try to execute itself.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

from proxy.chunks import KEEP_ALIVE, Out
from proxy.errors import UpstreamFailed
from proxy.openai_types import ChatChunk, ChunkFactory, Usage, make_usage, token_count
from proxy.sse import Event
from proxy.upstreams.http_errors import MAX_ANSWER, answer_too_large

# Letta stop_reason -> OpenAI finish_reason. A reason in neither this table nor
# ERROR_STOP_REASONS (one newer than this code) finishes with "stop": the agent did stop, and
# its text was delivered. Those in ERROR_STOP_REASONS end the stream with an error instead.
FINISH_REASONS: Final[dict[str, str]] = {
    "end_turn": "stop",
    # The run hit a budget, so the answer may be cut short: what "length" tells a client.
    "max_steps": "length",
    "max_tokens_exceeded": "length",
    # The agent paused for a human to approve one of its tools. An OpenAI client cannot give
    # that approval, and "tool_calls" would make it run a tool it does not have: for the
    # client the turn is over.
    "requires_approval": "stop",
    # Tool rules ended the agent loop (a terminal tool ran, or the reply called no tool):
    # the agent finished its turn by its own rules, not by a failure.
    "no_tool_call": "stop",
    "tool_rule": "stop",
}

# Stop reasons that are failures. `cancelled` is one too: someone cancelled the run, so the
# text so far is a fragment, and "stop" would let the client keep it as a complete answer.
ERROR_STOP_REASONS: Final[frozenset[str]] = frozenset(
    {
        "error",
        "llm_api_error",
        "invalid_llm_response",
        "invalid_tool_call",
        "insufficient_credits",
        "context_window_overflow_in_system_prompt",
        "cancelled",
    }
)

# OpenAI's own error codes where one exists, so clients that special-case them still can.
_ERROR_CODES: Final[dict[str, str]] = {
    "insufficient_credits": "insufficient_quota",
    "context_window_overflow_in_system_prompt": "context_length_exceeded",
}

SUMMARY_LIMIT: Final = 200
NAME_LIMIT: Final = 100

_TOOL_CALL_TYPES: Final = frozenset({"tool_call_message", "approval_request_message"})

# Letta's run ids are `run-<uuid>`. Anything else (a newline, a megabyte) is not taken: the id
# is logged and sent back in the cancel request, so a hostile server must not choose its text.
RUN_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


def letta_usage(stats: dict[str, Any]) -> Usage:
    """OpenAI usage from a Letta `usage_statistics` (or a sync response's `usage`)."""
    prompt = token_count(stats.get("prompt_tokens")) or 0
    completion = token_count(stats.get("completion_tokens")) or 0
    usage = make_usage(prompt, completion)
    total = token_count(stats.get("total_tokens"))
    if total is not None:
        usage["total_tokens"] = total
    # null means the provider did not report it; 0 is a real zero.
    cached = token_count(stats.get("cached_input_tokens"))
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = token_count(stats.get("reasoning_tokens"))
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _is_usage(data: str) -> bool:
    """Whether `data`, which orjson could not read, is a usage event. Its numbers stay text
    (Python's `int` refuses over 4300 digits): only its shape counts."""
    try:
        msg = json.loads(data, parse_int=str, parse_float=str, parse_constant=str)
    except (ValueError, RecursionError):
        return False
    return isinstance(msg, dict) and msg.get("message_type") == "usage_statistics"


def _json_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested deeper than orjson writes (it reads deeper)
        return "…"


def shorten(text: str, limit: int = SUMMARY_LIMIT) -> str:
    """One line of at most `limit` characters, so a summary never floods the reasoning pane."""
    text = " ".join(text.split())
    if len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def text_of(content: Any) -> str:
    """Assistant `content` is a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


class _ToolCall:
    __slots__ = ("arguments", "name")

    def __init__(self) -> None:
        self.name = ""
        self.arguments: list[str] = []


class LettaTranslator:
    """One Letta stream -> the chunks of one OpenAI stream.

    The caller sends `start()`'s chunks, then `feed()`s every upstream event and sends what it
    returns (chunks, or `Comment`s to write as SSE comments), and at `data: [DONE]` or the end
    of the body calls `finish()`. If `error` is then set, the stream ends with that error event
    instead of a finish chunk. `run_id` is known as soon as the first event carrying it arrived,
    so a client disconnect can cancel the run.
    """

    def __init__(
        self,
        factory: ChunkFactory,
        *,
        show_reasoning: bool = False,
        show_tools: bool = False,
        include_usage: bool = False,
    ) -> None:
        self.factory = factory
        self.show_reasoning = show_reasoning
        self.show_tools = show_tools
        self.include_usage = include_usage
        self.run_id: str | None = None
        self.stop_reason: str | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.error: UpstreamFailed | None = None
        # Letta's `detail` can quote the LLM provider's raw error: for logs, never for clients.
        self.error_detail: str | None = None
        self.finished = False
        self._group: tuple[str, str | None] | None = None
        self._wrote_content = False
        self._content_gap = False
        # Whether the reasoning shown so far ends mid-line, so the next block starts a new one.
        self._reasoning_open = False
        self._calls: dict[str, _ToolCall] = {}
        # What `_calls` holds (names and arguments), bounded like any answer held whole.
        self._held = 0
        self._call_names: dict[str, str] = {}
        self._awaiting_approval = False

    def start(self) -> list[ChatChunk]:
        return [self.factory.role()]

    def feed(self, event: Event) -> list[Out]:
        if self.error is not None or self.finished:
            return []
        data = event.data
        if data == "[DONE]":
            # The caller ends the stream with finish(); nothing to translate here.
            return []
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            if event.event != "error" and _is_usage(data):
                # Numbers past what orjson reads (1e400): usage not reported, as when Letta
                # sends none, rather than a failed run whose text and stop reason came whole.
                return []
            msg = None
        if not isinstance(msg, dict):
            if event.event == "error":
                self._on_error({})
            else:
                self._fail("Letta sent a stream event that is not a JSON object.")
            return []
        if self.run_id is None:
            run_id = msg.get("run_id")
            if isinstance(run_id, str) and RUN_ID.fullmatch(run_id):
                self.run_id = run_id
        kind = msg.get("message_type")
        if not isinstance(kind, str):
            kind = None  # a list or an object would fail the set lookups below
        if event.event == "error" or kind == "error_message":
            self._on_error(msg)
            return []
        if kind == "assistant_message":
            return self._on_assistant(msg)
        if kind == "ping":
            return [KEEP_ALIVE]
        if kind == "reasoning_message":
            return self._on_reasoning(msg)
        if kind in _TOOL_CALL_TYPES:
            return self._on_tool_call(msg, kind)
        if kind == "tool_return_message":
            return self._on_tool_return(msg)
        if kind == "stop_reason":
            out: list[Out] = [*self._close_group()]
            self._on_stop_reason(msg)
            return out
        if kind == "usage_statistics":
            self.usage = letta_usage(msg)
            return []
        # hidden_reasoning_message is hidden by definition; user, system and approval-response
        # messages echo input; unknown kinds are newer Letta features a client cannot use.
        return []

    def finish(self) -> list[ChatChunk]:
        """The chunks still due at the end of the upstream body; [] when `error` is set."""
        if self.finished:
            return []
        self.finished = True
        out = self._close_group()
        if self.error is not None:
            return []
        if self.stop_reason is None:
            self._fail("Letta's stream ended before the agent run finished.")
            return []
        if self.finish_reason is None:
            self._fail(f"Letta stopped the agent run: {self.stop_reason}.", self.stop_reason)
            return []
        out.append(self.factory.finish(self.finish_reason))
        if self.include_usage:
            # The contract promises the usage chunk; zeros say "not reported".
            out.append(self.factory.usage(self.usage or make_usage(0, 0)))
        return out

    # -- message kinds ---------------------------------------------------------------------

    def _on_assistant(self, msg: dict[str, Any]) -> list[Out]:
        key = ("assistant_message", msg.get("otid"))
        out: list[Out] = []
        if key != self._group:
            out.extend(self._close_group())
            self._group = key
            # Separate messages of one run (text before a tool call, then the answer after it)
            # so they do not run together into one sentence.
            self._content_gap = self._wrote_content
        text = text_of(msg.get("content"))
        if text:
            if self._content_gap:
                text = "\n\n" + text
                self._content_gap = False
            self._wrote_content = True
            out.append(self.factory.content(text))
        return out

    def _on_reasoning(self, msg: dict[str, Any]) -> list[Out]:
        if not self.show_reasoning:
            return []
        key = ("reasoning_message", msg.get("otid"))
        out: list[Out] = []
        if key != self._group:
            out.extend(self._close_group())
            self._group = key
            if self._reasoning_open:
                out.append(self._reason("\n"))
        text = msg.get("reasoning")
        if isinstance(text, str) and text:
            out.append(self._reason(text))
        return out

    def _on_tool_call(self, msg: dict[str, Any], kind: str) -> list[Out]:
        if not self.show_tools:
            return []
        key = (kind, msg.get("otid"))
        out: list[Out] = []
        if key != self._group:
            out.extend(self._close_group())
            self._group = key
            self._awaiting_approval = kind == "approval_request_message"
        deltas = msg.get("tool_calls") or msg.get("tool_call")
        # While streaming `tool_calls` is one delta object; in whole messages, a list.
        for delta in deltas if isinstance(deltas, list) else (deltas,):
            if not isinstance(delta, dict):
                continue
            call_id = delta.get("tool_call_id")
            slot_key = call_id if isinstance(call_id, str) else ""
            call = self._calls.get(slot_key)
            if call is None:
                call = self._calls[slot_key] = _ToolCall()
            name = delta.get("name")
            if isinstance(name, str):
                call.name += name
                self._held += len(name)
            arguments = delta.get("arguments")
            if isinstance(arguments, str):
                call.arguments.append(arguments)
                self._held += len(arguments)
        if self._held > MAX_ANSWER:
            self.error = answer_too_large("Letta")
        return out

    def _on_tool_return(self, msg: dict[str, Any]) -> list[Out]:
        out: list[Out] = [*self._close_group()]
        self._group = None
        if not self.show_tools:
            return out
        returns = msg.get("tool_returns")
        if not isinstance(returns, list) or not returns:
            returns = [msg]
        for ret in returns:
            if not isinstance(ret, dict):
                continue
            call_id = ret.get("tool_call_id")
            name = self._call_names.get(call_id) if isinstance(call_id, str) else None
            if not name:
                # Only text: a number or an object here would reach the client as a repr.
                named = msg.get("name")
                name = shorten(named, NAME_LIMIT) if isinstance(named, str) and named else "tool"
            status = "ok" if ret.get("status") != "error" else "error"
            value = ret.get("tool_return")
            text = value if isinstance(value, str) else _json_text(value)
            out.append(self._summary(f"[tool result] {name} {status}: {shorten(text)}"))
        return out

    def _on_stop_reason(self, msg: dict[str, Any]) -> None:
        if self.stop_reason is not None:
            # The run stops once: a second reason must not turn a failed run into a success.
            return
        reason = msg.get("stop_reason")
        if not isinstance(reason, str) or not reason:
            # Unreadable, so the run may as well have failed: never a complete answer.
            self.stop_reason = "malformed"
            self._fail("Letta sent a stop_reason that is not text.")
            return
        self.stop_reason = reason
        if reason in ERROR_STOP_REASONS:
            return
        # A reason newer than this code: the agent did stop and its text was delivered.
        self.finish_reason = FINISH_REASONS.get(reason, "stop")

    def _on_error(self, msg: dict[str, Any]) -> None:
        detail = msg.get("detail")
        self.error_detail = detail if isinstance(detail, str) else None
        # Letta's `message` is its own generic sentence; `detail` may quote provider internals.
        text = msg.get("message")
        text = shorten(text) if isinstance(text, str) and text else "the agent run failed"
        reason = self.stop_reason or msg.get("error_type")
        where = f" ({shorten(reason, 100)})" if isinstance(reason, str) and reason else ""
        self._fail(f"Letta reported an error{where}: {text}", self.stop_reason)

    # -- helpers ---------------------------------------------------------------------------

    def _close_group(self) -> list[ChatChunk]:
        """Ends the current message; a tool call's summary is due once its arguments are whole."""
        if not self._calls:
            return []
        out: list[ChatChunk] = []
        suffix = " (awaiting approval)" if self._awaiting_approval else ""
        for call_id, call in self._calls.items():
            name = shorten(call.name, NAME_LIMIT) if call.name else "tool"
            if call_id:
                self._call_names[call_id] = name
            args = shorten("".join(call.arguments))
            out.append(self._summary(f"[tool] {name}({args}){suffix}"))
        self._calls = {}
        self._held = 0
        return out

    def _summary(self, line: str) -> ChatChunk:
        return self._reason(("\n" if self._reasoning_open else "") + line + "\n")

    def _reason(self, text: str) -> ChatChunk:
        self._reasoning_open = not text.endswith("\n")
        return self.factory.reasoning(text)

    def _fail(self, message: str, stop_reason: str | None = None) -> None:
        code = _ERROR_CODES.get(stop_reason) if stop_reason else None
        self.error = UpstreamFailed(message, code=code)
