-- request_guard.lua: the client-facing proxy's request guard (issue 15), HAProxy 2.6 / Lua 5.3.
--
-- Loaded by the haproxy.cfg that control/adapters/haproxy_config.py renders; the limits come from
-- the typed config (haproxy.limits in control/config.py) through `setenv TRITON_HYBRID_GUARD_*`
-- lines in its global section. Two actions, one per frontend, both after `option http-buffer-request`:
--
--   http-request lua.guard_http   KServe v2 HTTP: an allowlist of paths (health, server metadata,
--                                 and infer/ready/metadata/config/stats of the served models);
--                                 every infer body (JSON, or JSON header + binary tensors) checked.
--   http-request lua.guard_grpc   gRPC: an allowlist of methods; the model name read from the
--                                 protobuf body; ModelInfer's declared shapes and sizes checked.
--
-- Why: one HTTP/JSON request that declares a huge shape with little data makes Triton 2.51 allocate
-- for the shape and abort (std::bad_alloc). A request is refused here, with a 400 that names the
-- input and the limit, when its declared shape exceeds a limit or disagrees with its data. Anything
-- the guard cannot read is refused too (fail closed), never passed on unchecked.

local function env_int(name, default)
    local v = os.getenv("TRITON_HYBRID_GUARD_" .. name)
    if v == nil or v == "" then return default end
    return math.tointeger(tonumber(v)) or error("TRITON_HYBRID_GUARD_" .. name .. " is not an integer: " .. v)
end

local function env_set(name, default)
    local out = {}
    for item in string.gmatch(os.getenv("TRITON_HYBRID_GUARD_" .. name) or default, "[^,%s]+") do
        out[item] = true
    end
    return out
end

local LIMITS = {
    max_body_bytes = env_int("MAX_BODY_BYTES", 262144),
    max_elements = env_int("MAX_ELEMENTS", 8000),
    max_batch = env_int("MAX_BATCH", 8),
    max_candidates = env_int("MAX_CANDIDATES", 1000),
}
local MODELS = env_set("MODELS", "search_ranking")
-- Read-only models: config, metadata, readiness and statistics, never inference. Triton's own
-- clients need them: perf_analyzer reads the config of every step of an ensemble it measures.
local READABLE = env_set("READABLE_MODELS", "")
-- Statistics of every loaded model at once (an empty model name): perf_analyzer asks for them.
local ALL_STATS = os.getenv("TRITON_HYBRID_GUARD_ALL_MODEL_STATS") == "1"
local CANDIDATE_INPUTS = env_set("CANDIDATE_INPUTS", "CANDIDATE_IDS")
local SERVED = (function()
    local t = {}
    for m in pairs(MODELS) do t[#t + 1] = m end
    table.sort(t)
    return table.concat(t, ", ")
end)()

local DTYPE_SIZE = {
    BOOL = 1, UINT8 = 1, INT8 = 1, UINT16 = 2, INT16 = 2, FP16 = 2, BF16 = 2,
    UINT32 = 4, INT32 = 4, FP32 = 4, UINT64 = 8, INT64 = 8, FP64 = 8, BYTES = 0,
}

-- A refusal travels as a Lua error carrying {status, message}; anything else is a bug or a body
-- the guard could not read, answered 400 as well (fail closed).
local Refusal = {}
local function refuse(status, msg) error(setmetatable({status = status, msg = msg}, Refusal), 0) end
local function bad(msg) refuse(400, msg) end

-- JSON ------------------------------------------------------------------------------------------
-- A small decoder (HAProxy has none for Lua): objects -> tables, arrays -> tables with n, numbers
-- -> Lua numbers. Depth is bounded so that a deeply nested body cannot exhaust the stack.

local MAX_DEPTH = 32
local decode_value

local function skip_ws(s, i)
    return string.find(s, "[^ \t\r\n]", i) or (#s + 1)
end

local ESCAPES = {['"'] = '"', ["\\"] = "\\", ["/"] = "/", b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}

local function decode_string(s, i)
    -- s:sub(i, i) == '"'
    local j = i + 1
    local parts = nil
    while true do
        local k = string.find(s, '["\\]', j)
        if not k then bad("request body is not valid JSON: unterminated string") end
        if string.sub(s, k, k) == '"' then
            local tail = string.sub(s, j, k - 1)
            if parts then parts[#parts + 1] = tail; return table.concat(parts), k + 1 end
            return tail, k + 1
        end
        parts = parts or {}
        parts[#parts + 1] = string.sub(s, j, k - 1)
        local c = string.sub(s, k + 1, k + 1)
        if c == "u" then
            local hex = string.sub(s, k + 2, k + 5)
            if not string.match(hex, "^%x%x%x%x$") then bad("request body is not valid JSON: bad \\u escape") end
            parts[#parts + 1] = utf8.char(tonumber(hex, 16))
            j = k + 6
        elseif ESCAPES[c] then
            parts[#parts + 1] = ESCAPES[c]
            j = k + 2
        else
            bad("request body is not valid JSON: bad escape")
        end
    end
end

local function decode_array(s, i, depth)
    local arr, n = {}, 0
    i = skip_ws(s, i + 1)
    if string.sub(s, i, i) == "]" then arr.n = 0; return arr, i + 1 end
    while true do
        local v
        v, i = decode_value(s, i, depth + 1)
        n = n + 1
        arr[n] = v
        i = skip_ws(s, i)
        local c = string.sub(s, i, i)
        if c == "]" then arr.n = n; return arr, i + 1 end
        if c ~= "," then bad("request body is not valid JSON: expected , or ] in an array") end
        i = skip_ws(s, i + 1)
    end
end

local function decode_object(s, i, depth)
    local obj = {}
    i = skip_ws(s, i + 1)
    if string.sub(s, i, i) == "}" then return obj, i + 1 end
    while true do
        if string.sub(s, i, i) ~= '"' then bad("request body is not valid JSON: expected a key") end
        local key
        key, i = decode_string(s, i)
        i = skip_ws(s, i)
        if string.sub(s, i, i) ~= ":" then bad("request body is not valid JSON: expected :") end
        local v
        v, i = decode_value(s, skip_ws(s, i + 1), depth + 1)
        obj[key] = v
        i = skip_ws(s, i)
        local c = string.sub(s, i, i)
        if c == "}" then return obj, i + 1 end
        if c ~= "," then bad("request body is not valid JSON: expected , or } in an object") end
        i = skip_ws(s, i + 1)
    end
end

local NULL = setmetatable({}, {__tostring = function() return "null" end})

decode_value = function(s, i, depth)
    if depth > MAX_DEPTH then bad("request body is nested deeper than " .. MAX_DEPTH .. " levels") end
    i = skip_ws(s, i)
    local c = string.sub(s, i, i)
    if c == "{" then return decode_object(s, i, depth) end
    if c == "[" then return decode_array(s, i, depth) end
    if c == '"' then return decode_string(s, i) end
    local num = string.match(s, "^-?%d+%.?%d*[eE]?[-+]?%d*", i)
    if num and num ~= "-" then
        local v = tonumber(num)
        if v == nil then bad("request body is not valid JSON: bad number " .. num) end
        return v, i + #num
    end
    if string.sub(s, i, i + 3) == "true" then return true, i + 4 end
    if string.sub(s, i, i + 4) == "false" then return false, i + 5 end
    if string.sub(s, i, i + 3) == "null" then return NULL, i + 4 end
    bad("request body is not valid JSON at byte " .. i)
end

local function decode_json(s)
    local v, i = decode_value(s, 1, 0)
    if skip_ws(s, i) <= #s then bad("request body is not valid JSON: trailing data after the value") end
    return v
end

local function json_quote(s)
    return '"' .. string.gsub(s, '[%c"\\]', function(c)
        return string.format("\\u%04x", string.byte(c))
    end) .. '"'
end

-- Checks shared by HTTP and gRPC ---------------------------------------------------------------------

local function fmt_num(v)
    if math.type(v) == "integer" then return tostring(v) end
    if v == math.floor(v) and math.abs(v) < 2 ^ 63 then return string.format("%d", v) end
    return string.format("%.17g", v)
end

local function fmt_shape(shape)
    local out = {}
    for k = 1, shape.n or #shape do out[k] = fmt_num(shape[k]) end
    return "[" .. table.concat(out, ",") .. "]"
end

-- Element count of a declared shape, checked against the limits; returns the count.
local function check_shape(name, shape)
    if type(shape) ~= "table" or shape.n == nil then
        bad("input " .. name .. ": shape must be a list of non-negative integers")
    end
    local rank = shape.n or #shape
    if rank == 0 then bad("input " .. name .. ": shape is empty; the served models take a batch dimension") end
    local count = 1
    for k = 1, rank do
        local d = shape[k]
        if type(d) ~= "number" or d < 0 or d ~= math.floor(d) then
            bad("input " .. name .. ": declared shape " .. fmt_shape(shape) .. " has a dimension that is not a "
                .. "non-negative integer")
        end
        -- Products stop growing past the limit: no overflow whatever the declared dims.
        if count <= LIMITS.max_elements then count = count * d end
    end
    if count > LIMITS.max_elements then
        local total = 1.0
        for k = 1, rank do total = total * shape[k] end
        bad(string.format("input %s: declared shape %s has %s elements, limit %d (haproxy.limits.max_elements)",
            name, fmt_shape(shape), fmt_num(total), LIMITS.max_elements))
    end
    if shape[1] > LIMITS.max_batch then
        bad(string.format("input %s: declared shape %s has batch size %s, limit %d (haproxy.limits.max_batch)",
            name, fmt_shape(shape), fmt_num(shape[1]), LIMITS.max_batch))
    end
    if CANDIDATE_INPUTS[name] and shape[1] > 0 then
        local per_row = count // math.tointeger(shape[1])
        if per_row > LIMITS.max_candidates then
            bad(string.format("input %s: declared shape %s has %d candidates per query, limit %d "
                .. "(haproxy.limits.max_candidates)", name, fmt_shape(shape), per_row, LIMITS.max_candidates))
        end
    end
    return math.tointeger(count)
end

local function check_datatype(name, datatype)
    if type(datatype) ~= "string" or DTYPE_SIZE[datatype] == nil then
        bad("input " .. name .. ": unknown datatype " .. tostring(datatype))
    end
    return DTYPE_SIZE[datatype]
end

local function check_binary_size(name, datatype, count, size, what)
    local width = DTYPE_SIZE[datatype]
    if width > 0 and size ~= count * width then
        bad(string.format("input %s: %s is %d bytes, but the declared shape holds %d %s elements = %d bytes",
            name, what, size, count, datatype, count * width))
    end
    if width == 0 and size < 4 * count then
        -- BYTES: every element carries a 4-byte length prefix
        bad(string.format("input %s: %s is %d bytes, too small for %d BYTES elements (4-byte length each)",
            name, what, size, count))
    end
end

-- HTTP -------------------------------------------------------------------------------------------

local function count_leaves(v, depth)
    if type(v) ~= "table" or v == NULL then return 1 end
    if v.n == nil then bad("input data must be a (nested) list of values") end
    local n = 0
    for k = 1, v.n do n = n + count_leaves(v[k], depth + 1) end
    return n
end

local function check_http_infer(txn)
    local body = txn.f:req_body() or ""
    local declared = txn.f:req_body_size() or #body
    if declared > LIMITS.max_body_bytes or #body < declared then
        refuse(413, string.format("request body is %d bytes, limit %d (haproxy.limits.max_body_bytes)",
            declared, LIMITS.max_body_bytes))
    end
    local hdr_len = txn.http:req_get_headers()["inference-header-content-length"]
    local json_len = #body
    if hdr_len then
        json_len = math.tointeger(tonumber(hdr_len[0] or ""))
        if json_len == nil or json_len < 0 or json_len > #body then
            bad("Inference-Header-Content-Length is " .. tostring(hdr_len[0]) .. ", body is " .. #body .. " bytes")
        end
    end
    local req = decode_json(string.sub(body, 1, json_len))
    if type(req) ~= "table" or type(req.inputs) ~= "table" or req.inputs.n == nil then
        bad("request body must be a JSON object with an \"inputs\" list")
    end
    local binary_total = 0
    for k = 1, req.inputs.n do
        local inp = req.inputs[k]
        if type(inp) ~= "table" or type(inp.name) ~= "string" then bad("inputs[" .. (k - 1) .. "] has no name") end
        local name = inp.name
        check_datatype(name, inp.datatype)
        local count = check_shape(name, inp.shape)
        local params = type(inp.parameters) == "table" and inp.parameters or {}
        if params.shared_memory_region ~= nil then
            bad("input " .. name .. ": shared memory inputs are not accepted through the proxy")
        end
        local bsize = params.binary_data_size
        if bsize ~= nil then
            if math.type(bsize) ~= "integer" or bsize < 0 then
                bad("input " .. name .. ": binary_data_size must be a non-negative integer")
            end
            if inp.data ~= nil then bad("input " .. name .. ": has both data and binary_data_size") end
            check_binary_size(name, inp.datatype, count, bsize, "binary_data_size")
            binary_total = binary_total + bsize
        else
            if inp.data == nil then bad("input " .. name .. ": has neither data nor binary_data_size") end
            local n = count_leaves(inp.data, 0)
            if n ~= count then
                bad(string.format("input %s: declared shape %s has %d elements, data has %d", name,
                    fmt_shape(inp.shape), count, n))
            end
        end
    end
    if binary_total ~= #body - json_len then
        bad(string.format("binary tensors declare %d bytes (sum of binary_data_size), the body carries %d after "
            .. "the JSON header", binary_total, #body - json_len))
    end
end

local HEALTH = {["/v2/health/ready"] = true, ["/v2/health/live"] = true}
local MODEL_GET = {[""] = true, ["/ready"] = true, ["/config"] = true, ["/stats"] = true}

-- Returns the model name and what is asked of it, or nil when the path is not a model endpoint.
local function model_path(path)
    local name, rest = string.match(path, "^/v2/models/([^/]+)(.*)$")
    if not name then return nil end
    local vrest = string.match(rest, "^/versions/%d+(.*)$")
    return name, vrest or rest
end

local function http_allowed(txn)
    local method, path = txn.f:method(), txn.f:path() or ""
    if HEALTH[path] or path == "/v2" then
        if method ~= "GET" and method ~= "HEAD" then
            refuse(403, method .. " " .. path .. " is not served through this proxy; use GET")
        end
        return false
    end
    local name, what = model_path(path)
    if name and MODELS[name] then
        if what == "/infer" then
            if method ~= "POST" then refuse(403, method .. " " .. path .. " is not served through this proxy; use POST") end
            return true
        end
        if MODEL_GET[what] and (method == "GET" or method == "HEAD") then return false end
    end
    if name and READABLE[name] and MODEL_GET[what] and (method == "GET" or method == "HEAD") then return false end
    if name == "stats" and what == "" and ALL_STATS and (method == "GET" or method == "HEAD") then return false end
    if name == "stats" and what == "" then
        refuse(403, "statistics of all models are not served through this proxy; ask for one served model's "
            .. "(/v2/models/NAME/stats; served: " .. SERVED .. ")")
    end
    if name and READABLE[name] then
        refuse(403, method .. " " .. path .. ": model " .. name .. " is an internal step, not served through this "
            .. "proxy (served: " .. SERVED .. "); only its config, metadata, readiness and statistics can be read")
    end
    if name and not MODELS[name] then
        refuse(403, "model " .. name .. " is not served through this proxy (served: " .. SERVED .. ")")
    end
    refuse(403, method .. " " .. path .. " is not served through this proxy (health, server metadata and "
        .. "infer/ready/metadata/config/stats of the served models only)")
end

-- gRPC -------------------------------------------------------------------------------------------
-- Just enough protobuf to read a request: varints, and fields by number at one level.

local function varint(s, i, stop)
    local v, shift = 0, 0
    while true do
        if i > stop then bad("gRPC message is truncated") end
        local b = string.byte(s, i)
        v = v | ((b & 0x7f) << shift)
        i = i + 1
        if b < 0x80 then return v, i end
        shift = shift + 7
        if shift > 63 then bad("gRPC message has a malformed varint") end
    end
end

-- Calls fn(field, wire_type, value, first, last) for every field of the message in s[i..stop];
-- value is the varint for wire type 0, else nil (first..last is the payload of wire type 2).
local function fields(s, i, stop, fn)
    while i <= stop do
        local key
        key, i = varint(s, i, stop)
        local field, wt = key >> 3, key & 7
        if wt == 0 then
            local v
            v, i = varint(s, i, stop)
            fn(field, wt, v)
        elseif wt == 2 then
            local len
            len, i = varint(s, i, stop)
            if len < 0 or i + len - 1 > stop then bad("gRPC message is truncated") end
            fn(field, wt, nil, i, i + len - 1)
            i = i + len
        elseif wt == 1 then
            i = i + 8
        elseif wt == 5 then
            i = i + 4
        else
            bad("gRPC message has an unsupported wire type " .. wt)
        end
    end
    if i ~= stop + 1 then bad("gRPC message is truncated") end
end

local function packed_varint_count(s, first, last)
    local n = 0
    for k = first, last do if string.byte(s, k) < 0x80 then n = n + 1 end end
    return n
end

-- InferTensorContents: the number of elements it carries (one repeated field is set).
local function contents_count(s, first, last)
    local n = 0
    fields(s, first, last, function(field, wt, v, a, b)
        if wt == 0 then n = n + 1
        elseif field == 6 then n = n + (b - a + 1) // 4        -- fp32, packed fixed32
        elseif field == 7 then n = n + (b - a + 1) // 8        -- fp64, packed fixed64
        elseif field == 8 then n = n + 1                       -- one bytes element
        else n = n + packed_varint_count(s, a, b) end          -- bool/int/int64/uint/uint64, packed varints
    end)
    return n
end

local function grpc_input(s, first, last)
    local inp = {name = "", shape = {n = 0}}
    fields(s, first, last, function(field, wt, v, a, b)
        if field == 1 and wt == 2 then inp.name = string.sub(s, a, b)
        elseif field == 2 and wt == 2 then inp.datatype = string.sub(s, a, b)
        elseif field == 3 and wt == 2 then
            local i = a
            while i <= b do
                local d
                d, i = varint(s, i, b)
                inp.shape.n = inp.shape.n + 1
                inp.shape[inp.shape.n] = d
            end
        elseif field == 3 and wt == 0 then
            inp.shape.n = inp.shape.n + 1
            inp.shape[inp.shape.n] = v
        elseif field == 4 and wt == 2 then
            fields(s, a, b, function(f2, w2, _, a2, b2)
                if f2 == 1 and w2 == 2 and string.sub(s, a2, b2) == "shared_memory_region" then
                    inp.shm = true
                end
            end)
        elseif field == 5 and wt == 2 then
            inp.contents = contents_count(s, a, b)
        end
    end)
    return inp
end

local GRPC_SERVICE = "/inference.GRPCInferenceService/"
local GRPC_SERVER = {ServerLive = true, ServerReady = true, ServerMetadata = true}
local GRPC_MODEL = {ModelReady = true, ModelMetadata = true, ModelConfig = true, ModelStatistics = true,
                    ModelInfer = true}

local function check_grpc(txn)
    local path = txn.f:path() or ""
    local method = string.sub(path, 1, #GRPC_SERVICE) == GRPC_SERVICE and string.sub(path, #GRPC_SERVICE + 1) or nil
    if method and GRPC_SERVER[method] then return end
    if not (method and GRPC_MODEL[method]) then
        refuse(403, "gRPC method " .. path .. " is not served through this proxy (ServerLive, ServerReady, "
            .. "ServerMetadata, and ModelInfer/ModelReady/ModelMetadata/ModelConfig/ModelStatistics of the "
            .. "served models only)")
    end
    local body = txn.f:req_body() or ""
    if #body > LIMITS.max_body_bytes + 5 then
        refuse(413, string.format("gRPC message is %d bytes, limit %d (haproxy.limits.max_body_bytes)",
            #body, LIMITS.max_body_bytes))
    end
    if #body < 5 then bad("gRPC request has no message") end
    if string.byte(body, 1) ~= 0 then bad("compressed gRPC messages are not accepted through the proxy") end
    local len = string.unpack(">I4", body, 2)
    if len > LIMITS.max_body_bytes then
        refuse(413, string.format("gRPC message is %d bytes, limit %d (haproxy.limits.max_body_bytes)",
            len, LIMITS.max_body_bytes))
    end
    if 5 + len ~= #body then bad("gRPC request must carry exactly one complete message") end
    local name, inputs, raw = "", {}, {}
    fields(body, 6, 5 + len, function(field, wt, v, a, b)
        if field == 1 and wt == 2 then name = string.sub(body, a, b)
        elseif method == "ModelInfer" and field == 5 and wt == 2 then inputs[#inputs + 1] = grpc_input(body, a, b)
        elseif method == "ModelInfer" and field == 7 and wt == 2 then raw[#raw + 1] = b - a + 1
        end
    end)
    if READABLE[name] and method ~= "ModelInfer" then return end
    if name == "" and method == "ModelStatistics" and ALL_STATS then return end
    if not MODELS[name] then
        refuse(403, "model \"" .. name .. "\" is not served through this proxy (" .. method .. "; served: "
            .. SERVED .. ")")
    end
    if method ~= "ModelInfer" then return end
    if #raw > 0 and #raw ~= #inputs then
        bad(string.format("%d inputs but %d raw_input_contents", #inputs, #raw))
    end
    for k, inp in ipairs(inputs) do
        check_datatype(inp.name, inp.datatype)
        local count = check_shape(inp.name, inp.shape)
        if inp.shm then bad("input " .. inp.name .. ": shared memory inputs are not accepted through the proxy") end
        if #raw > 0 then
            check_binary_size(inp.name, inp.datatype, count, raw[k], "raw_input_contents")
        elseif inp.contents ~= count then
            bad(string.format("input %s: declared shape %s has %d elements, contents has %d", inp.name,
                fmt_shape(inp.shape), count, inp.contents or 0))
        end
    end
end

-- Replies ----------------------------------------------------------------------------------------

local REASON = {[400] = "Bad Request", [403] = "Forbidden", [413] = "Payload Too Large"}

local function reply_http(txn, status, msg)
    local reply = txn:reply({status = status, reason = REASON[status],
                             headers = {["content-type"] = {"application/json"}},
                             body = '{"error": ' .. json_quote(msg) .. '}'})
    txn:done(reply)
end

-- gRPC clients read the status from grpc-status/grpc-message (a "trailers-only" answer); the
-- HTTP status stays 200 as gRPC requires.
local GRPC_CODE = {[400] = 3, [403] = 7, [413] = 8}  -- INVALID_ARGUMENT, PERMISSION_DENIED, RESOURCE_EXHAUSTED

local function pct_encode(s)
    return (string.gsub(s, "[^ -$&-~]", function(c) return string.format("%%%02X", string.byte(c)) end))
end

local function reply_grpc(txn, status, msg)
    local reply = txn:reply({status = 200,
                             headers = {["content-type"] = {"application/grpc"},
                                        ["grpc-status"] = {tostring(GRPC_CODE[status] or 13)},
                                        ["grpc-message"] = {pct_encode(msg)}}})
    txn:done(reply)
end

local function guarded(check, reply)
    return function(txn)
        local ok, err = pcall(check, txn)
        if ok then return end
        if getmetatable(err) == Refusal then
            txn:set_var("txn.guard_refused", err.msg)
            reply(txn, err.status, err.msg)
        else
            -- A bug, or a body the guard could not read: refuse rather than pass it on unchecked.
            core.Warning("request_guard: " .. tostring(err))
            reply(txn, 400, "request could not be validated by the proxy: " .. tostring(err))
        end
    end
end

core.register_action("guard_http", {"http-req"}, guarded(function(txn)
    if http_allowed(txn) then check_http_infer(txn) end
end, reply_http), 0)

core.register_action("guard_grpc", {"http-req"}, guarded(check_grpc, reply_grpc), 0)
