"""The event output of a ResponsesWriter and its `function_call` items. Sans-IO.

`ResponseEvents` is the base of ResponsesWriter (proxy/ingress/responses_writer.py), which
holds the state: the events written so far and their sequence numbers, and the chat tool
calls turned into `function_call` items (`fc_`, `call_id` = the chat call's id) whose
arguments stream as `function_call_arguments.delta` (at least one) and end with `.done`
carrying exactly what was streamed (`{}` when the upstream sent none).
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from proxy.errors import UpstreamFailed
from proxy.ingress.responses_items import END, SEQ, OpenCall, OpenItem, encode_event, frame
from proxy.openai_types import ToolCallDelta

__all__ = ["DELTA", "UNREADABLE", "ResponseEvents"]

# A delta event from its prefix (proxy/responses_items.py), its JSON text and its sequence
# number: one bytes format instead of four concatenations.
DELTA: Final = b"%b%b" + SEQ + b"%d" + END
UNREADABLE: Final = "The upstream sent a chat completion chunk with a delta of the wrong types."
_NAMELESS: Final = "The upstream sent a tool call without a function name."


class ResponseEvents:
    """Events out, and the `function_call` items, of a ResponsesWriter (which sets every
    attribute named here in its `__init__`)."""

    __slots__ = ("_call", "_calls", "_events", "_ids", "_out", "_output", "_seq", "_tools")

    _events: bool
    _seq: int
    _out: list[bytes]
    _ids: str
    _output: list[OpenItem | OpenCall | dict[str, Any]]
    _call: OpenCall | None
    _calls: dict[int, OpenCall]
    # The tools the response echoes: a call's item names a namespaced function as they do.
    _tools: Any

    def _close_open(self, status: str) -> None:
        raise NotImplementedError

    def _flush(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def _emit(self, payload: dict[str, Any]) -> None:
        if self._events:
            payload["sequence_number"] = self._seq
            self._out.append(encode_event(frame(payload["type"]), payload))
        self._seq += 1

    def _close_call(self, status: str) -> None:
        call = self._call
        if call is not None:
            if not call.name:
                # No client can run it (the name may come in a later delta, so only now).
                raise UpstreamFailed(_NAMELESS)
            self._call = None
            arguments = "".join(call.args)
            if not arguments:
                # Clients json-parse the arguments: a call with none takes an empty object,
                # and every call streams at least one delta.
                arguments = "{}"
                call.args.append(arguments)
                self._args_delta(call, arguments)
            self._emit({"type": "response.function_call_arguments.done", "item_id": call.id,
                        "output_index": call.index, "arguments": arguments})
            final = call.snapshot(status, arguments)
            self._output[call.index] = final
            self._emit({"type": "response.output_item.done", "output_index": call.index,
                        "item": final})

    def _tool_calls(self, calls: list[ToolCallDelta]) -> None:
        for delta in calls:
            chat_index = delta.get("index", 0)
            function = delta.get("function") or {}
            args = function.get("arguments") or ""
            name = function.get("name") or ""
            if type(args) is not str or type(name) is not str:
                raise UpstreamFailed(UNREADABLE)
            call = self._calls.get(chat_index)
            if call is None:
                self._close_open("completed")
                index = len(self._output)
                call_id = delta.get("id") or f"call_{self._ids}_{chat_index}"
                if type(call_id) is not str:
                    raise UpstreamFailed(UNREADABLE)
                call = OpenCall(
                    f"fc_{self._ids}_{index}", index, chat_index, call_id, name, self._tools)
                self._calls[chat_index] = call
                self._call = call
                self._output.append(call)
                self._emit({"type": "response.output_item.added", "output_index": index,
                            "item": call.snapshot("in_progress")})
            elif call is not self._call:
                if args or (name and name != call.name):
                    # Its `.done` already went out with the arguments final: a client would
                    # run a call whose arguments the upstream then changed.
                    raise UpstreamFailed(
                        "The upstream interleaved the arguments of parallel tool calls, which "
                        "the Responses stream cannot represent after a call was completed."
                    )
                continue
            elif name and name != call.name:
                call.name += name
            if args:
                call.args.append(args)
                self._args_delta(call, args)

    def _args_delta(self, call: OpenCall, args: str) -> None:
        if self._events:
            self._out.append(DELTA % (call.prefix, orjson.dumps(args), self._seq))
        self._seq += 1
