-- wrk script: POST /v1/responses with a bearer key, then print one JSON summary line.
--
--   KEY=sk-... STREAM=1 wrk -t1 -c64 -d10s --latency -s bench/wrk/responses.lua http://127.0.0.1:8080
--
-- The same question as chat.lua ("hi" to the model), asked through the Responses API: the
-- proxy translates it into a chat completion for the upstream and the answer back.
--
-- Environment:
--   KEY     bearer key (default sk-bench-key); sent on every request
--   MODEL   model name (default bench)
--   STREAM  1 asks for an SSE stream; wrk counts a response only once the whole stream has
--           arrived (it follows chunked encoding), so latency is the full stream time
--   CHECK   1 hands every body to Lua and counts those that are not 200, or not complete:
--           a sync answer without "status":"completed", a stream without a
--           response.completed event followed by "data: [DONE]". Off by default because it
--           makes wrk copy each body into Lua, which lowers the rate it can drive.
--   PATH_   request path (default /v1/responses)
--
-- The summary line is chat.lua's ("WRK_JSON {...}"), so bench/run.py reads both alike.

local key = os.getenv("KEY") or "sk-bench-key"
local model = os.getenv("MODEL") or "bench"
local stream = os.getenv("STREAM") == "1"
local check = os.getenv("CHECK") == "1"

wrk.method = "POST"
wrk.path = os.getenv("PATH_") or "/v1/responses"
wrk.body = '{"model":"' .. model .. '","input":"hi","stream":' .. tostring(stream) .. '}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. key

-- Each wrk thread runs its own Lua state; done() reads the per-thread counters through these.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  checked = 0
  bad = 0
end

-- Defined only when asked: wrk skips body capture entirely when no response() exists.
if check then
  function response(status, headers, resp_body)
    checked = checked + 1
    if status ~= 200 then
      bad = bad + 1
    elseif stream then
      local completed = string.find(resp_body, "event: response.completed", 1, true)
      local done = string.find(resp_body, "data: [DONE]", 1, true)
      if not completed or not done or done < completed then
        bad = bad + 1
      end
    elseif not string.find(resp_body, '"status":"completed"', 1, true) then
      bad = bad + 1
    end
  end
end

function done(summary, latency, requests)
  local n_checked, n_bad = 0, 0
  for _, t in ipairs(threads) do
    n_checked = n_checked + (t:get("checked") or 0)
    n_bad = n_bad + (t:get("bad") or 0)
  end
  local secs = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"rps":%.3f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"stdev":%.1f,"min":%d,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99.9":%d},' ..
    '"stream":%s,"checked":%d,"bad":%d}\n',
    summary.requests, summary.duration, summary.bytes, summary.requests / secs,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.stdev, latency.min, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9),
    tostring(stream), n_checked, n_bad))
end
