# The configs are verbatim copies of the research's YAML, long lines included.
# ruff: noqa: E501
"""The five worked configs of the `custom` kind, exactly as the research gives them (§7).

Each is the whole `routes.yaml` snippet: the tests compile the upstream's block with
`compile_custom` and check it against traffic from that server, so a change to the schema
that breaks one of these configs fails here. Keep them verbatim.
"""

from __future__ import annotations

from typing import Any

import yaml

DIFY = """\
upstreams:
  dify-support:
    kind: custom
    url: http://dify-api:5001/v1
    api_key: ${DIFY_SUPPORT_APP_KEY}          # one Dify app = one key = one upstream
    mode: stream                              # agent apps refuse blocking
    session:
      lookup:                                 # server-issued id, found again by owner
        method: GET
        path: /conversations
        query: {user: "{{ session.key }}", limit: "1"}
        id: data[0].id
      from_response: conversation_id          # refreshes the per-worker cache
      cache: 600
    request:
      path: /chat-messages
      body:
        query: "{{ input }}"
        inputs: {}
        user: "{{ session.key }}"
        conversation_id: "{{ session.id? }}"
        auto_generate_name: false
    sync:
      body: {response_mode: blocking}
      text: answer
      usage: {prompt_tokens: metadata.usage.prompt_tokens, completion_tokens: metadata.usage.completion_tokens, total_tokens: metadata.usage.total_tokens}
    stream:
      body: {response_mode: streaming}
      framing: sse
      rules:
        - when: {event: [message, agent_message]}
          text: answer
          capture: {task_id: task_id}
        - when: {event: agent_thought}
          reasoning: thought
        - when: {event: message_end}
          usage: {prompt_tokens: metadata.usage.prompt_tokens, completion_tokens: metadata.usage.completion_tokens, total_tokens: metadata.usage.total_tokens}
          end: true
        - when: {event: error}
          error: message
    cancel:
      path: "/chat-messages/{{ captured.task_id }}/stop"
      body: {user: "{{ session.key }}"}
models:
  support: {upstream: dify-support}
"""

FLOWISE = """\
upstreams:
  flowise:
    kind: custom
    url: http://flowise:3000/api/v1
    api_key: ${FLOWISE_FLOW_KEY:-}            # only if the flow has an API key
    session:
      without_hint: stateless
      stateless: {body: {history: "{{ history }}"}}   # flows without a memory node
    request:
      path: "/prediction/{{ model }}"          # route `model:` = chatflow id
      body:
        question: "{{ input }}"
        chatId: "{{ session.id? }}"           # memory nodes key on it; no overrideConfig needed
      message_format: {roles: {user: userMessage, assistant: apiMessage, system: null}}
    sync:
      body: {streaming: false}
      text: text
    stream:
      body: {streaming: true}
      framing: sse                            # a JSON answer (unstreamable flow) → sync mapping
      rules:
        - when: {event: token}
          text: data
        - when: {event: thinking}
          reasoning: data
        - when: {event: usageMetadata}
          usage: {prompt_tokens: data.input_tokens, completion_tokens: data.output_tokens, total_tokens: data.total_tokens}
          usage_sum: true
        - when: {event: error}
          error: data
        - when: {event: [end, abort]}
          end: true
    models: {path: /chatflows, items: "[*]", id: id, name: name}   # plain array without page/limit; key needs chatflows:view
models:
  "flows/*": {upstream: flowise}
"""

LANGFLOW = """\
upstreams:
  langflow:
    kind: custom
    url: http://langflow:7860/api/v1
    headers: {x-api-key: "${LANGFLOW_API_KEY}"}
    request:
      path: "/run/{{ model }}"
      body: {input_value: "{{ input }}", input_type: chat, output_type: chat, session_id: "{{ session.id? }}"}
    sync:
      query: {stream: "false"}
      text: outputs[0].outputs[0].results.message.text
      usage: {prompt_tokens: "outputs[0].outputs[0].results.message.properties.usage.input_tokens", completion_tokens: "outputs[0].outputs[0].results.message.properties.usage.output_tokens", total_tokens: "outputs[0].outputs[0].results.message.properties.usage.total_tokens"}
    stream:
      query: {stream: "true"}
      framing: ndjson                         # bare JSON objects + blank line
      rules:
        - when: {event: token}
          text: data.chunk
        - when: {event: add_message, data.sender: Machine}
          text: data.text
          recap: true                         # components that did not stream tokens
        - when: {event: error}
          error: [data.text, data.error]
        - when: {event: end}
          usage: {prompt_tokens: "data.result.outputs[0].outputs[0].results.message.properties.usage.input_tokens", completion_tokens: "data.result.outputs[0].outputs[0].results.message.properties.usage.output_tokens", total_tokens: "data.result.outputs[0].outputs[0].results.message.properties.usage.total_tokens"}
          end: true
"""

N8N = """\
upstreams:
  n8n-agent:
    kind: custom
    url: https://n8n.internal/webhook
    headers: {Authorization: "Basic ${N8N_CHAT_BASIC_B64}"}   # if the trigger uses Basic Auth
    mode: stream            # must match the trigger's Response Mode (`sync` for "When Last Node Finishes")
    request:
      path: "/{{ model }}/chat"                # route `model:` = the trigger's webhook id
      body: {action: sendMessage, sessionId: "{{ session.key }}", chatInput: "{{ input }}"}
    sync:
      text: [output, text, message]           # also used by the ndjson single-document fallback
    stream:
      framing: ndjson
      rules:
        - when: {type: item}
          text: [content.text_chunk, content]
        - when: {type: error}
          error: content
      # no `end` rule: `type: end` closes one node's message, the answer ends at EOF
"""

LANGGRAPH = """\
upstreams:
  langgraph:
    kind: custom
    url: http://langgraph-api:8000
    headers: {x-api-key: "${LANGSMITH_API_KEY:-}"}
    mode: stream                              # /runs/wait commits 200 then writes newlines
    session:
      id: "{{ session.uuid }}"                # thread ids must be UUIDs
      without_hint: stateless
      stateless:
        path: /runs/stream
        body: {input: {messages: "{{ messages }}"}}
    request:
      path: "/threads/{{ session.id }}/runs/stream"
      body:
        assistant_id: "{{ model }}"
        input: {messages: "{{ new_messages }}"}
        stream_mode: [messages-tuple]
        if_not_exists: create
        on_disconnect: cancel                 # the server cancels the run when we hang up
    stream:
      framing: sse
      rules:
        - when: {$event: messages, "[0].type": [AIMessageChunk, ai]}   # add "[1].langgraph_node": agent to hide other nodes
          text: "[0].content"
          usage: {prompt_tokens: "[0].usage_metadata.input_tokens", completion_tokens: "[0].usage_metadata.output_tokens", total_tokens: "[0].usage_metadata.total_tokens"}
          usage_sum: true                     # one usage per LLM call; a tool turn makes several
        - when: {$event: error}
          error: [message, error]
    models: {method: POST, path: /assistants/search, body: {limit: 100}, items: "[*]", id: assistant_id, name: name}
"""

AGENT_PROTOCOL_REQUEST = """\
    request:
      path: /runs/stream
      body:
        agent_id: "{{ model }}"
        thread_id: "{{ session.id? }}"
        if_not_exists: create
        input: {messages: "{{ new_messages }}"}
"""



def upstream_block(text: str) -> dict[str, Any]:
    """The one upstream block of a §7 snippet."""
    upstreams = yaml.safe_load(text)["upstreams"]
    assert len(upstreams) == 1
    block: dict[str, Any] = next(iter(upstreams.values()))
    return block


def agent_protocol_block() -> dict[str, Any]:
    """LangGraph's block with the Agent Protocol request of §7.5 in place of its own."""
    block = upstream_block(LANGGRAPH)
    block["request"] = yaml.safe_load(AGENT_PROTOCOL_REQUEST)["request"]
    return block
