// The official openai-node SDK as a client of the proxy, for tests/test_openai_node.py.
//
// Reads a plan from stdin: {"baseURL", "apiKey", "steps": [{"op", "params", "headers",
// "previous"}]} and prints one JSON array, a result per step:
//   create  -> {"response": <client.responses.create(params)>}
//   stream  -> {"events": [[type, sequence_number], ...], "final": <finalResponse()>,
//               "text": <the output_text deltas joined>}
//   chat    -> {"completion": <client.chat.completions.create(params)>}
// A step with "previous": i continues from step i's response id (previous_response_id).
// A step that throws gives {"error": {status, name, type, code, param, message}}.
import OpenAI from "openai";

async function readStdin() {
  const parts = [];
  for await (const part of process.stdin) parts.push(part);
  return JSON.parse(Buffer.concat(parts).toString("utf8"));
}

function failure(err) {
  return {
    error: {
      status: err.status ?? null,
      name: err.constructor?.name ?? "Error",
      type: err.type ?? null,
      code: err.code ?? null,
      param: err.param ?? null,
      message: String(err.message ?? err),
    },
  };
}

async function run(client, step, results) {
  const params = { ...step.params };
  if (step.previous !== undefined) {
    params.previous_response_id = results[step.previous].response?.id
      ?? results[step.previous].final?.id;
  }
  const options = step.headers ? { headers: step.headers } : undefined;
  if (step.op === "create") {
    return { response: await client.responses.create(params, options) };
  }
  if (step.op === "stream") {
    const stream = client.responses.stream(params, options);
    const events = [];
    let text = "";
    for await (const event of stream) {
      events.push([event.type, event.sequence_number]);
      if (event.type === "response.output_text.delta") text += event.delta;
    }
    return { events, text, final: await stream.finalResponse() };
  }
  if (step.op === "chat") {
    return { completion: await client.chat.completions.create(params, options) };
  }
  throw new Error(`unknown op ${step.op}`);
}

const plan = await readStdin();
// No retries: a test sees each answer as the proxy gave it.
const client = new OpenAI({ baseURL: plan.baseURL, apiKey: plan.apiKey, maxRetries: 0 });
const results = [];
for (const step of plan.steps) {
  try {
    results.push(await run(client, step, results));
  } catch (err) {
    results.push(failure(err));
  }
}
process.stdout.write(JSON.stringify(results));
