-- wrk script of bench/personalize.py: every request GETs the URL's path with a random
-- customer_id (c-0 .. c-(N-1)), and every answer is counted by status.
-- Environment: BENCH_AUTH (Authorization header value, may be empty), BENCH_CUSTOMERS.

local threads = {}
local next_thread = 1

function setup(thread)
  thread:set("tid", next_thread)
  next_thread = next_thread + 1
  table.insert(threads, thread)
end

local auth = os.getenv("BENCH_AUTH") or ""
local customers = tonumber(os.getenv("BENCH_CUSTOMERS") or "100000")
local headers = {}
if auth ~= "" then
  headers["Authorization"] = auth
end

ok = 0
other = 0

function init(args)
  math.randomseed(tid * 7919 + os.time())
end

function request()
  local path = string.format("%s?customer_id=c-%d", wrk.path, math.random(0, customers - 1))
  return wrk.format("GET", path, headers)
end

function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
  else
    other = other + 1
  end
end

function done(summary, latency, requests)
  local o, x = 0, 0
  for _, thread in ipairs(threads) do
    o = o + thread:get("ok")
    x = x + thread:get("other")
  end
  local errors = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"ok":%d,"other":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,"status_errors":%d}\n',
    summary.requests, summary.duration, o, x,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.timeout, errors.status))
end
