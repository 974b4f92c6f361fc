-- wrk script of bench/ingest.py: every request POSTs one event with a unique event_id
-- (run prefix, wrk thread number, per-thread counter) to the URL's path, and every answer
-- is counted by status so the caller can compare them with the rows stored.
-- Environment: BENCH_AUTH (Authorization header value, may be empty), BENCH_RUN (event_id
-- prefix, unique per run), BENCH_CUSTOMERS (customer ids are drawn from c-0 .. c-(N-1)).

local threads = {}
local next_thread = 1

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

local auth = os.getenv("BENCH_AUTH") or ""
local run = os.getenv("BENCH_RUN") or "run"
local customers = tonumber(os.getenv("BENCH_CUSTOMERS") or "100000")
local names = { "Purchase", "Page Viewed", "Added To Cart", "Email Opened" }
local sent = 0

-- Globals, so done() can read them from each thread with thread:get().
created = 0
duplicate = 0
other = 0

function init(args)
  math.randomseed(tid * 7919 + os.time())
end

function request()
  sent = sent + 1
  local name = names[(sent % 4) + 1]
  local properties = "{}"
  if name == "Purchase" then
    properties = string.format('{"total_price":%.2f}', math.random(100, 50000) / 100)
  end
  local body = string.format(
    '{"event_id":"%s-%d-%d","customer_id":"c-%d","name":"%s",' ..
    '"occurred_at":"2026-11-20T10:00:00Z","properties":%s}',
    run, tid, sent, math.random(0, customers - 1), name, properties)
  local headers = { ["Content-Type"] = "application/json" }
  if auth ~= "" then
    headers["Authorization"] = auth
  end
  return wrk.format("POST", wrk.path, headers, body)
end

function response(status, headers, body)
  if status == 201 then
    created = created + 1
  elseif status == 200 then
    duplicate = duplicate + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local c, d, o = 0, 0, 0
  for _, thread in ipairs(threads) do
    c = c + thread:get("created")
    d = d + thread:get("duplicate")
    o = o + thread:get("other")
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"created":%d,"duplicate":%d,"other":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"status_errors":%d}\n',
    summary.requests, summary.duration, c, d, o,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.timeout, errors.status))
end
