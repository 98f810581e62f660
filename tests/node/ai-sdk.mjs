// The AI SDK (Vercel's `ai` with `@ai-sdk/openai`) as a client of the proxy, for
// tests/test_ai_sdk.py.
//
// Reads a plan from stdin: {"baseURL", "apiKey", "steps": [{"op", "api", "model", "prompt",
// "tool", "headers"}]} and prints one JSON array, a result per step:
//   generate -> {"text", "finishReason", "usage", "steps"} of generateText()
//   stream   -> the same of streamText(), read to its end, and "deltas" (its text parts)
// `api` is "responses" (the provider's default) or "chat". With "tool": true the model gets
// one tool, get_weather({city}), which answers "sunny", and the SDK runs up to two steps:
// the call, then the answer. A step that throws gives {"error": {name, message, status}}.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, streamText, tool } from "ai";
import { z } from "zod";

async function readStdin() {
  const parts = [];
  for await (const part of process.stdin) parts.push(part);
  return JSON.parse(Buffer.concat(parts).toString("utf8"));
}

const weather = tool({
  description: "The weather in a city.",
  inputSchema: z.object({ city: z.string() }),
  execute: async ({ city }) => (city === "Paris" ? "sunny" : "unknown"),
});

function summary(result) {
  return {
    text: result.text,
    finishReason: result.finishReason,
    usage: result.totalUsage ?? result.usage,
    steps: result.steps.map((step) => ({
      finishReason: step.finishReason,
      text: step.text,
      toolCalls: step.toolCalls.map((c) => ({ id: c.toolCallId, name: c.toolName, input: c.input })),
      toolResults: step.toolResults.map((r) => ({ id: r.toolCallId, output: r.output })),
    })),
  };
}

async function run(provider, step) {
  const model = step.api === "chat" ? provider.chat(step.model) : provider.responses(step.model);
  const options = {
    model,
    prompt: step.prompt,
    headers: step.headers,
    maxRetries: 0,
    ...(step.tool ? { tools: { get_weather: weather }, stopWhen: stepCountIs(2) } : {}),
  };
  if (step.op === "generate") return summary(await generateText(options));
  if (step.op === "stream") {
    let failure = null;
    const result = streamText({ ...options, onError: ({ error }) => { failure = error; } });
    const deltas = [];
    for await (const delta of result.textStream) deltas.push(delta);
    if (failure) throw failure;
    const out = summary({
      text: await result.text,
      finishReason: await result.finishReason,
      totalUsage: await result.totalUsage,
      steps: await result.steps,
    });
    return { ...out, deltas };
  }
  throw new Error(`unknown op ${step.op}`);
}

const plan = await readStdin();
const provider = createOpenAI({ baseURL: plan.baseURL, apiKey: plan.apiKey });
const results = [];
for (const step of plan.steps) {
  try {
    results.push(await run(provider, step));
  } catch (err) {
    results.push({
      error: { name: err.name ?? "Error", message: String(err.message ?? err),
               status: err.statusCode ?? null },
    });
  }
}
process.stdout.write(JSON.stringify(results));
