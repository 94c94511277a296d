-- Wireshark dissector for the trio-collector UDP datagram protocol, version 2
-- (docs/PROTOCOL.md, section 3).
--
-- Use it for one run:
--     wireshark -X lua_script:tools/wireshark/collector.lua capture.pcapng
--     tshark -X lua_script:tools/wireshark/collector.lua -r capture.pcapng -Y collector
-- or for good: copy this file into the personal Lua plugins folder (Help > About Wireshark >
-- Folders > "Personal Lua Plugins", e.g. ~/.local/lib/wireshark/plugins/) and restart.
--
-- It dissects UDP port 8081 (the collector's default). For another port set the preference
-- Edit > Preferences > Protocols > COLLECTOR > UDP port, or on the command line
-- `-o collector.udp_port:9000`, or use Decode As (`-d udp.port==9000,collector`).
-- The `collector.heuristic` preference (off by default) claims matching datagrams on any port.
--
-- Payloads are sealed (ChaCha20-Poly1305) with keys that never cross the wire, so this shows
-- what travels in the clear: the 20-byte header (the flags and the type decoded, the time as
-- an absolute time), the clear parts of HELLO, COOKIE and WELCOME, the ciphertext length and
-- the tag. Datagrams the collector would refuse as `malformed` (wrong version, too short,
-- unknown type, flags or layout) get expert info and the `collector.malformed` field:
--     collector.malformed          every datagram the dissector finds malformed
--     collector.hello_nonce == 48:49:20:4e:4f:4e:43:45:2d:31:3a:29
--                                  one registration: the HELLO, its COOKIE and its WELCOME
--     collector.session_id == 0x5eed0001 && collector.flags.ack_requested
--
-- Tested with tshark 4.0 (Debian 12, Lua 5.2); written for Lua 5.2 to 5.4 (no bit operators).

local DEFAULT_PORT = 8081
local HEADER_LEN = 20
local TAG_LEN = 16
local NONCE_LEN = 12         -- AEAD nonces (HELLO, COOKIE)
local REG_NONCE_LEN = 16     -- client and server nonces
local MIN_SESSION_LEN = HEADER_LEN + TAG_LEN                   -- 36: an empty payload
local HELLO_SEALED = REG_NONCE_LEN + 16 + TAG_LEN              -- client nonce, cookie, tag
local MIN_HELLO_LEN = HEADER_LEN + 1 + 1 + NONCE_LEN + HELLO_SEALED   -- 82
local COOKIE_LEN = HEADER_LEN + 2 * NONCE_LEN + 16 + TAG_LEN   -- 76
local WELCOME_HEAD = HEADER_LEN + NONCE_LEN + REG_NONCE_LEN    -- 48
local MIN_WELCOME_LEN = WELCOME_HEAD + 12 + TAG_LEN            -- 76
local MAX_DATAGRAM = 1200

local HEARTBEAT, TELEMETRY, ACK, COMMAND, HELLO, WELCOME, GOODBYE, COOKIE = 1, 2, 3, 4, 5, 6, 7, 8

local TYPE_NAMES = {
    [HEARTBEAT] = "HEARTBEAT", [TELEMETRY] = "TELEMETRY", [ACK] = "ACK", [COMMAND] = "COMMAND",
    [HELLO] = "HELLO", [WELCOME] = "WELCOME", [GOODBYE] = "GOODBYE", [COOKIE] = "COOKIE",
}
local DEVICE_SENDS = {
    [HEARTBEAT] = true, [TELEMETRY] = true, [ACK] = true, [HELLO] = true, [GOODBYE] = true,
}
local COLLECTOR_SENDS = {
    [ACK] = true, [COMMAND] = true, [WELCOME] = true, [GOODBYE] = true, [COOKIE] = true,
}
local MAY_REQUEST_ACK = { [HEARTBEAT] = true, [TELEMETRY] = true, [COMMAND] = true }
-- The smallest payload (= ciphertext) that can decode as each session type (section 3.2).
local MIN_PAYLOAD = { [HEARTBEAT] = 4, [TELEMETRY] = 5, [ACK] = 4, [COMMAND] = 2, [GOODBYE] = 0 }

local D2C = "device to collector"
local C2D = "collector to device"

local proto = Proto("collector", "Trio Collector datagram protocol v2")

local pf = {
    version = ProtoField.uint8("collector.version", "Version", base.DEC),
    type = ProtoField.uint8("collector.type", "Type", base.DEC, TYPE_NAMES),
    flags = ProtoField.uint8("collector.flags", "Flags", base.HEX),
    ack_requested = ProtoField.bool("collector.flags.ack_requested", "ACK_REQUESTED", 8,
        { "set", "not set" }, 0x01),
    unknown_flags = ProtoField.uint8("collector.flags.unknown", "Unknown flags", base.HEX, nil,
        0xfe),
    reserved = ProtoField.uint8("collector.reserved", "Reserved", base.HEX),
    session_id = ProtoField.uint32("collector.session_id", "Session id", base.HEX),
    seq = ProtoField.uint32("collector.seq", "Sequence number", base.DEC),
    time = ProtoField.absolute_time("collector.time", "Time (sender's clock)", base.UTC),
    time_us = ProtoField.uint64("collector.time_us", "Time (us since the Unix epoch)", base.DEC),
    direction = ProtoField.string("collector.direction", "Direction"),
    device_id_len = ProtoField.uint8("collector.device_id_len", "Device id length", base.DEC),
    device_id = ProtoField.string("collector.device_id", "Device id"),
    hello_nonce = ProtoField.bytes("collector.hello_nonce", "HELLO nonce"),
    cookie_nonce = ProtoField.bytes("collector.cookie_nonce", "COOKIE nonce"),
    server_nonce = ProtoField.bytes("collector.server_nonce", "Server nonce"),
    ciphertext = ProtoField.bytes("collector.ciphertext", "Ciphertext"),
    ciphertext_len = ProtoField.uint32("collector.ciphertext_len", "Ciphertext length",
        base.DEC),
    tag = ProtoField.bytes("collector.tag", "Tag (Poly1305)"),
    data = ProtoField.bytes("collector.data", "Undecoded bytes"),
    hello_frame = ProtoField.framenum("collector.hello_frame", "Answers the HELLO in frame",
        base.NONE, frametype and frametype.RESPONSE or nil),
    malformed = ProtoField.bool("collector.malformed", "Malformed"),
}
proto.fields = {
    pf.version, pf.type, pf.flags, pf.ack_requested, pf.unknown_flags, pf.reserved,
    pf.session_id, pf.seq, pf.time, pf.time_us, pf.direction, pf.device_id_len, pf.device_id,
    pf.hello_nonce, pf.cookie_nonce, pf.server_nonce, pf.ciphertext, pf.ciphertext_len, pf.tag,
    pf.data, pf.hello_frame, pf.malformed,
}

local MALFORMED, ERROR, WARN = expert.group.MALFORMED, expert.severity.ERROR, expert.severity.WARN
local ex = {
    short = ProtoExpert.new("collector.malformed.short", "Datagram too short", MALFORMED, ERROR),
    version = ProtoExpert.new("collector.malformed.version", "Unsupported protocol version",
        MALFORMED, ERROR),
    type = ProtoExpert.new("collector.malformed.type", "Unknown datagram type", MALFORMED, ERROR),
    flags = ProtoExpert.new("collector.malformed.flags",
        "Unknown flags, or ACK_REQUESTED where it does not belong", MALFORMED, ERROR),
    reserved = ProtoExpert.new("collector.malformed.reserved", "Reserved byte is not 0",
        MALFORMED, ERROR),
    field = ProtoExpert.new("collector.malformed.field", "Header field not allowed for this type",
        MALFORMED, ERROR),
    length = ProtoExpert.new("collector.malformed.length", "Wrong length for this type",
        MALFORMED, ERROR),
    device_id = ProtoExpert.new("collector.malformed.device_id", "Bad device id", MALFORMED,
        ERROR),
    direction = ProtoExpert.new("collector.malformed.direction",
        "A type that this side does not send", MALFORMED, ERROR),
    too_large = ProtoExpert.new("collector.too_large",
        "Larger than the collector's default maximum datagram (refused as too_large)",
        expert.group.PROTOCOL, WARN),
    seq_zero = ProtoExpert.new("collector.seq_zero",
        "Sequence number 0 is never valid in a session (refused as replay)",
        expert.group.SEQUENCE, WARN),
}
proto.experts = {
    ex.short, ex.version, ex.type, ex.flags, ex.reserved, ex.field, ex.length, ex.device_id,
    ex.direction, ex.too_large, ex.seq_zero,
}

proto.prefs.udp_port = Pref.uint("UDP port", DEFAULT_PORT,
    "The collector's UDP port (its [server] udp_port; 8081 by default)")
proto.prefs.heuristic = Pref.bool("Try on any UDP port", false,
    "Also claim datagrams on other ports that look like protocol version 2 (heuristic)")

-- HELLO nonce (hex) -> the frame of the first HELLO that carried it, to link COOKIE and WELCOME
-- to the HELLO they answer. Filled on the first pass, emptied for each new capture.
local hello_frames = {}
function proto.init()
    hello_frames = {}
end

-- Which way a datagram goes: the collector's end is the configured port (or the one that
-- Decode As matched).
local function direction_of(pinfo)
    for _, port in ipairs({ proto.prefs.udp_port, pinfo.match_uint }) do
        if port and port ~= 0 and pinfo.src_port ~= pinfo.dst_port then
            if pinfo.dst_port == port then return D2C end
            if pinfo.src_port == port then return C2D end
        end
    end
    return nil
end

local function device_time(tvb)
    local us = tvb:range(12, 8):uint64()
    local secs = (us / 1000000):tonumber()
    local nsecs = (us % 1000000):tonumber() * 1000
    return NSTime.new(secs, nsecs)
end

local function hex(range)
    return range:bytes():tohex(true)
end

local function sealed(tree, tvb, from)
    -- ciphertext | tag, the tag being the last 16 bytes
    local n = tvb:len() - from - TAG_LEN
    tree:add(pf.ciphertext_len, n):set_generated()
    if n > 0 then
        tree:add(pf.ciphertext, tvb:range(from, n))
    end
    tree:add(pf.tag, tvb:range(tvb:len() - TAG_LEN, TAG_LEN))
    return n
end

local function dissect(tvb, pinfo, tree)
    local n = tvb:len()
    pinfo.cols.protocol = "COLLECTOR"
    local root = tree:add(proto, tvb:range(0, n))
    local bad = {} -- short descriptions of what is malformed, for the Info column

    local function malformed(item, expert_field, text)
        item:add_proto_expert_info(expert_field, text)
        bad[#bad + 1] = text
    end

    local function finish(info)
        if #bad > 0 then
            root:add(pf.malformed, true):set_generated()
            info = "[Malformed: " .. table.concat(bad, "; ") .. "] " .. info
        end
        pinfo.cols.info = info
        root:append_text(", " .. info)
        return n
    end

    local direction = direction_of(pinfo)
    if direction then
        root:add(pf.direction, direction):set_generated()
    end
    if n > MAX_DATAGRAM then
        root:add_proto_expert_info(ex.too_large,
            string.format("%d bytes > %d (the default [limits] max_datagram)", n, MAX_DATAGRAM))
    end

    if n < 1 then
        malformed(root, ex.short, "empty datagram")
        return finish("empty")
    end
    local version = tvb:range(0, 1):uint()
    local vitem = root:add(pf.version, tvb:range(0, 1))
    if version ~= 2 then
        malformed(vitem, ex.version, string.format("version %d, not 2", version))
        if n > 1 then root:add(pf.data, tvb:range(1, n - 1)) end
        return finish(string.format("version %d (%d bytes)", version, n))
    end
    if n < HEADER_LEN then
        malformed(root, ex.short, string.format("%d bytes, shorter than the %d-byte header",
            n, HEADER_LEN))
        if n > 1 then root:add(pf.data, tvb:range(1, n - 1)) end
        return finish(string.format("%d bytes", n))
    end

    -- The header (the same 20 bytes for every type of version 2).
    local typ = tvb:range(1, 1):uint()
    local flags = tvb:range(2, 1):uint()
    local reserved = tvb:range(3, 1):uint()
    local sid = tvb:range(4, 4):uint()
    local seq = tvb:range(8, 4):uint()
    local name = TYPE_NAMES[typ]
    local titem = root:add(pf.type, tvb:range(1, 1))
    local fitem = root:add(pf.flags, tvb:range(2, 1))
    fitem:add(pf.ack_requested, tvb:range(2, 1))
    if flags == 1 then fitem:append_text(" (ACK_REQUESTED)") end
    local ritem = root:add(pf.reserved, tvb:range(3, 1))
    local sitem = root:add(pf.session_id, tvb:range(4, 4))
    local qitem = root:add(pf.seq, tvb:range(8, 4))
    root:add(pf.time, tvb:range(12, 8), device_time(tvb))
    root:add(pf.time_us, tvb:range(12, 8))

    if flags > 1 then
        fitem:add(pf.unknown_flags, tvb:range(2, 1))
        malformed(fitem, ex.flags, string.format("unknown flags 0x%02x", flags))
    end
    if reserved ~= 0 then
        malformed(ritem, ex.reserved, string.format("reserved byte 0x%02x", reserved))
    end
    if not name then
        malformed(titem, ex.type, string.format("unknown type %d", typ))
        if n > HEADER_LEN then root:add(pf.data, tvb:range(HEADER_LEN, n - HEADER_LEN)) end
        return finish(string.format("type %d sid=0x%08x seq=%d (%d bytes)", typ, sid, seq, n))
    end
    if flags == 1 and not MAY_REQUEST_ACK[typ] then
        malformed(fitem, ex.flags, "ACK_REQUESTED on a " .. name)
    end
    if direction == D2C and not DEVICE_SENDS[typ] or direction == C2D and not COLLECTOR_SENDS[typ]
        or flags == 1 and (direction == D2C and typ == COMMAND
            or direction == C2D and typ ~= COMMAND) then
        malformed(titem, ex.direction, string.format("%s %s", name, direction))
    end
    local ack_text = flags == 1 and " ACK_REQUESTED" or ""

    if typ == HELLO then
        -- u8 id length | device id | nonce (12) | ciphertext (32) | tag (16)
        if sid ~= 0 then malformed(sitem, ex.field, "HELLO with a session id") end
        if seq ~= 0 then malformed(qitem, ex.field, "HELLO with a sequence number") end
        if n < MIN_HELLO_LEN then
            malformed(root, ex.short, string.format("HELLO of %d bytes, at least %d",
                n, MIN_HELLO_LEN))
            root:add(pf.data, tvb:range(HEADER_LEN, n - HEADER_LEN))
            return finish(string.format("HELLO (%d bytes)", n))
        end
        local idlen = tvb:range(HEADER_LEN, 1):uint()
        local litem = root:add(pf.device_id_len, tvb:range(HEADER_LEN, 1))
        local expected = HEADER_LEN + 1 + idlen + NONCE_LEN + HELLO_SEALED
        if idlen < 1 or idlen > 64 or expected ~= n then
            malformed(litem, ex.length, string.format(
                "HELLO of %d bytes with a device id of %d: expected %d", n, idlen, expected))
            root:add(pf.data, tvb:range(HEADER_LEN + 1, n - HEADER_LEN - 1))
            return finish(string.format("HELLO (%d bytes)", n))
        end
        local idrange = tvb:range(HEADER_LEN + 1, idlen)
        local device_id = idrange:string()
        local iditem = root:add(pf.device_id, idrange)
        if not device_id:match("^[A-Za-z0-9_.:%-]+$") then
            malformed(iditem, ex.device_id, "device id with characters outside A-Z a-z 0-9 _ . : -")
        end
        local nrange = tvb:range(HEADER_LEN + 1 + idlen, NONCE_LEN)
        root:add(pf.hello_nonce, nrange)
        local nonce = hex(nrange)
        if not pinfo.visited and not hello_frames[nonce] then
            hello_frames[nonce] = pinfo.number
        end
        sealed(root, tvb, HEADER_LEN + 1 + idlen + NONCE_LEN)
        local info = string.format("HELLO device=%s nonce=%s", device_id, nonce)
        local first = hello_frames[nonce]
        if first and first ~= pinfo.number then
            info = info .. string.format(" (again, as in frame %d)", first)
        end
        return finish(info)
    end

    if typ == COOKIE or typ == WELCOME then
        -- COOKIE:  hello nonce (12) | nonce (12)        | ciphertext (16)  | tag
        -- WELCOME: hello nonce (12) | server nonce (16) | ciphertext (12+) | tag
        local minimum = typ == COOKIE and COOKIE_LEN or MIN_WELCOME_LEN
        if seq ~= 0 then malformed(qitem, ex.field, name .. " with a sequence number") end
        if typ == COOKIE and sid ~= 0 then
            malformed(sitem, ex.field, "COOKIE with a session id")
        elseif typ == WELCOME and sid == 0 then
            malformed(sitem, ex.field, "WELCOME without a session id")
        end
        if n < minimum then
            malformed(root, ex.short, string.format("%s of %d bytes, at least %d",
                name, n, minimum))
            root:add(pf.data, tvb:range(HEADER_LEN, n - HEADER_LEN))
            return finish(string.format("%s (%d bytes)", name, n))
        end
        if typ == COOKIE and n ~= COOKIE_LEN then
            malformed(root, ex.length, string.format("COOKIE of %d bytes, not %d", n, COOKIE_LEN))
        end
        local nrange = tvb:range(HEADER_LEN, NONCE_LEN)
        root:add(pf.hello_nonce, nrange)
        local nonce = hex(nrange)
        local hello_frame = hello_frames[nonce]
        if hello_frame then
            root:add(pf.hello_frame, hello_frame):set_generated()
        end
        local info
        if typ == COOKIE then
            root:add(pf.cookie_nonce, tvb:range(HEADER_LEN + NONCE_LEN, NONCE_LEN))
            sealed(root, tvb, HEADER_LEN + 2 * NONCE_LEN)
            info = string.format("COOKIE for HELLO nonce=%s", nonce)
        else
            root:add(pf.server_nonce, tvb:range(HEADER_LEN + NONCE_LEN, REG_NONCE_LEN))
            local clen = sealed(root, tvb, WELCOME_HEAD)
            info = string.format("WELCOME sid=0x%08x for HELLO nonce=%s (%d bytes sealed)",
                sid, nonce, clen)
        end
        if hello_frame then
            info = info .. string.format(" (HELLO in frame %d)", hello_frame)
        end
        return finish(info)
    end

    -- A datagram of a session: ciphertext | tag
    if n < MIN_SESSION_LEN then
        malformed(root, ex.short, string.format("%d bytes, shorter than header and tag (%d)",
            n, MIN_SESSION_LEN))
        if n > HEADER_LEN then root:add(pf.data, tvb:range(HEADER_LEN, n - HEADER_LEN)) end
        return finish(string.format("%s sid=0x%08x seq=%d%s (%d bytes)", name, sid, seq,
            ack_text, n))
    end
    if seq == 0 then
        qitem:add_proto_expert_info(ex.seq_zero)
    end
    local clen = sealed(root, tvb, HEADER_LEN)
    if typ == HEARTBEAT and clen ~= 4 then
        malformed(root, ex.length, string.format("HEARTBEAT payload of %d bytes, not 4", clen))
    elseif clen < MIN_PAYLOAD[typ] then
        malformed(root, ex.length, string.format("%s payload of %d bytes, at least %d", name,
            clen, MIN_PAYLOAD[typ]))
    end
    return finish(string.format("%s sid=0x%08x seq=%d%s (%d bytes sealed)", name, sid, seq,
        ack_text, clen))
end

function proto.dissector(tvb, pinfo, tree)
    return dissect(tvb, pinfo, tree)
end

-- Heuristic (with the preference on): version 2, a known type, reserved 0, known flags, and a
-- length that fits the type.
local function heuristic(tvb, pinfo, tree)
    if not proto.prefs.heuristic then return false end
    local n = tvb:len()
    if n < MIN_SESSION_LEN or n > MAX_DATAGRAM then return false end
    local typ = tvb:range(1, 1):uint()
    if tvb:range(0, 1):uint() ~= 2 or not TYPE_NAMES[typ] or tvb:range(2, 1):uint() > 1
        or tvb:range(3, 1):uint() ~= 0 then
        return false
    end
    if typ == COOKIE and n ~= COOKIE_LEN or typ == HELLO and n < MIN_HELLO_LEN
        or typ == WELCOME and n < MIN_WELCOME_LEN then
        return false
    end
    dissect(tvb, pinfo, tree)
    return true
end
proto:register_heuristic("udp", heuristic)

local udp_table = DissectorTable.get("udp.port")
local registered_port = nil

local function register_port()
    if registered_port then
        udp_table:remove(registered_port, proto)
    end
    registered_port = proto.prefs.udp_port
    if registered_port ~= 0 then
        udp_table:add(registered_port, proto)
    end
end

function proto.prefs_changed()
    if proto.prefs.udp_port ~= registered_port then
        register_port()
    end
end

register_port()
