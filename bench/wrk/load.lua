-- One wrk script for every keygate benchmark, configured by environment variables:
--   KG_METHOD        GET (default) or POST
--   KG_BODY          request body (POST), sent as application/x-www-form-urlencoded
--   KG_AUTH          a fixed Authorization header value ("Bearer ...", "Basic ...")
--   KG_TOKENS_FILE   a file of bearer tokens, one a line: each request takes the next one
--                    (round robin, each thread starting at its own offset)
--   KG_RATE          if set: total requests/s to pace to (split across threads); each
--                    request waits for the next free time slot of its thread, so the rate
--                    holds whatever the latency (as long as there are enough connections)
--   KG_THREADS       wrk's -t (needed to split KG_RATE)
--   KG_SAVE_PREFIX   if set: write each response's access_token to KG_SAVE_PREFIX<thread>
--   KG_SAVE_COUNT    with KG_SAVE_PREFIX: stop a thread after this many saved tokens
local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } kg_timespec;
  int clock_gettime(int clk, kg_timespec *ts);
]]
local ts = ffi.new("kg_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local thread_count = 0
function setup(thread)
  thread:set("thread_index", thread_count)
  thread_count = thread_count + 1
end

local method = os.getenv("KG_METHOD") or "GET"
local body = os.getenv("KG_BODY")
local auth = os.getenv("KG_AUTH")
local rate = tonumber(os.getenv("KG_RATE") or "")
local threads = tonumber(os.getenv("KG_THREADS") or "1")
local save_prefix = os.getenv("KG_SAVE_PREFIX")
local save_count = tonumber(os.getenv("KG_SAVE_COUNT") or "0")

local tokens, next_token = nil, 1
local interval, next_slot = nil, nil
local saved, save_file = 0, nil
local fixed_request = nil

function init(args)
  local file = os.getenv("KG_TOKENS_FILE")
  if file then
    tokens = {}
    for line in io.lines(file) do
      if #line > 0 then tokens[#tokens + 1] = line end
    end
    assert(#tokens > 0, "no tokens in " .. file)
    next_token = math.floor(#tokens * (thread_index or 0) / threads) + 1
  end
  if rate and rate > 0 then
    interval = 1000 * threads / rate
  end
  if save_prefix then
    save_file = assert(io.open(save_prefix .. tostring(thread_index or 0), "w"))
  end
  local headers = {}
  if auth then headers["Authorization"] = auth end
  if body then headers["Content-Type"] = "application/x-www-form-urlencoded" end
  if not tokens then
    fixed_request = wrk.format(method, nil, headers, body)
  end
  base_headers = headers
end

function request()
  if fixed_request then return fixed_request end
  local token = tokens[next_token]
  next_token = next_token + 1
  if next_token > #tokens then next_token = 1 end
  base_headers["Authorization"] = "Bearer " .. token
  return wrk.format(method, nil, base_headers, body)
end

if rate and rate > 0 then
  function delay()
    local now = now_ms()
    if not next_slot or next_slot < now - 1000 then next_slot = now end
    local slot = next_slot
    next_slot = next_slot + interval
    local wait = slot - now
    if wait < 0 then return 0 end
    return math.floor(wait + 0.5)
  end
end

if save_prefix then
  function response(status, headers, resp_body)
    if status == 200 then
      local token = resp_body:match('"access_token"%s*:%s*"([^"]+)"')
      if token then
        save_file:write(token, "\n")
        saved = saved + 1
        if save_count > 0 and saved >= save_count then
          save_file:flush()
          wrk.thread:stop()
        end
      end
    end
  end
end
