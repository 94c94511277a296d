// The trio-collector dashboard: one WebSocket to /stream (docs/STREAM.md), no build step.
//
// The stream is the only source of truth: a snapshot (possibly in parts) replaces everything
// the page knows, then live messages are applied on top. Reconnecting, or changing the
// filters, simply starts over from the next snapshot. Everything that came from the stream is
// put on the page with textContent, never as markup.

const MAX_POINTS = 300; // per series on a chart; also the most history asked for in a snapshot
const HISTORY_BUDGET = 30000; // snapshot points per metric over all devices: big fleets get less each
const MAX_CHART_SERIES = 24; // lines per chart; narrow the device filter to see others
const MAX_COMMANDS_SHOWN = 10; // per device
const MAX_ACTIVITY = 100;
const RENDER_MS = 250; // table and health refresh
const CHART_MS = 1000; // chart redraw
const PING_MS = 15000;
const HANDSHAKE_MS = 10000;
const BACKOFF_FIRST_MS = 500;
const BACKOFF_MAX_MS = 15000;
const TOKEN_KEY = "trio-collector.token";
const FILTER_KEY = "trio-collector.filters";

const CLOSE_CODES = {
  1000: "closed normally",
  1001: "collector shutting down",
  1006: "connection lost",
  1009: "message too big",
  1011: "collector error",
  4000: "no heartbeat from the collector",
  4002: "stalled: this page did not keep up",
  4003: "ping timeout",
};
const OFFLINE_REASONS = {
  timeout: "no datagram within the session timeout",
  closed: "the device said goodbye or closed its connection",
  superseded: "a newer session of the same device replaced this one",
  kicked: "ended by an operator",
  shutdown: "the collector shut down",
};
const FINAL_STATES = new Set(["acked", "failed", "timed_out", "expired"]);
const STATE_RANK = { queued: 0, sent: 1 };

const $ = (id) => document.getElementById(id);
const collator = new Intl.Collator(undefined, { numeric: true });
const numberFormat = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });
const clockFormat = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const dateFormat = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const axisFormats = {
  seconds: new Intl.DateTimeFormat(undefined, {
    hourCycle: "h23",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  }),
  minutes: new Intl.DateTimeFormat(undefined, { hourCycle: "h23", hour: "2-digit", minute: "2-digit" }),
};

// -- state ---------------------------------------------------------------------------------

/** Everything the page knows, rebuilt from each snapshot. */
const model = {
  devices: new Map(), // id -> Device
  order: [], // device ids in natural order (sensor-2 before sensor-10), as the rows are
  loading: false, // applying a snapshot: rows are put in order once, at the end
  previous: null, // while applying a snapshot: the devices before it, whose rows are reused
  commands: new Map(), // command id -> command
  charts: new Map(), // metric -> Chart
  colors: new Map(), // device id -> colour, stable for the life of the page
  newestReading: 0, // collector time of the newest reading received on this connection
};

/** The connection and the stream's health. */
const conn = {
  ws: null,
  status: "connecting", // connecting | connected | reconnecting | token
  attempt: 0,
  retryAt: 0,
  retryTimer: null,
  token: localStorage.getItem(TOKEN_KEY) || "",
  hello: null,
  canCommand: true,
  synced: false, // a complete snapshot has been applied on this connection
  parts: [], // snapshot parts received so far
  pending: [], // live messages that arrived while a snapshot was incomplete
  lastSeq: 0,
  seqGaps: 0,
  missedEarlier: 0, // missed updates on previous connections
  missedNow: 0, // on this connection
  lastMessage: 0, // local ms
  lastHeartbeat: 0, // local ms
  skewSamples: [], // local seconds minus collector seconds, per heartbeat
  skew: 0,
  history: MAX_POINTS, // points per series asked for in the snapshot
  connectId: 0,
  pingSent: new Map(), // ping id -> performance.now() when sent
  lastPing: 0, // local ms
  rtt: null, // ms
  lastClose: null,
  replay: null, // the collector replays a recording: its status ({position, speed, paused, ...})
  replayAt: 0, // local seconds when that status arrived
};

// -- small helpers -------------------------------------------------------------------------

function clone(templateId) {
  return $(templateId).content.firstElementChild.cloneNode(true);
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

function setAttr(el, name, value) {
  if (value === null || value === undefined) el.removeAttribute(name);
  else if (el.getAttribute(name) !== String(value)) el.setAttribute(name, String(value));
}

/** The collector's clock, estimated from heartbeats, so that a skewed local clock does not skew "ago". */
function serverNow() {
  const r = conn.replay;
  if (r) {
    // A replay's clock is the recording's: it runs at the replay speed, or stands still.
    const elapsed = r.paused ? 0 : (Date.now() / 1000 - conn.replayAt) * r.speed;
    return Math.min(r.position + elapsed, r.end ?? Infinity);
  }
  return Date.now() / 1000 - conn.skew;
}

function formatValue(v) {
  if (typeof v === "number") return numberFormat.format(v);
  if (typeof v === "string") return v.length > 40 ? v.slice(0, 39) + "…" : v;
  return JSON.stringify(v);
}

function formatAgo(seconds) {
  if (!Number.isFinite(seconds)) return "never";
  if (seconds < 1) return "<1 s ago";
  if (seconds < 120) return `${Math.floor(seconds)} s ago`;
  if (seconds < 7200) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 172800) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

function formatSeconds(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 10) return `${s.toFixed(s < 1 ? 2 : 1)} s`;
  if (s < 120) return `${Math.round(s)} s`;
  return formatAgo(s).replace(" ago", "");
}

function formatClock(t) {
  return t ? clockFormat.format(t * 1000) : "–";
}

function deviceColor(id) {
  let c = model.colors.get(id);
  if (!c) {
    // Golden-angle hues keep neighbours apart however many devices there are.
    const hue = Math.round((model.colors.size * 137.508 + 200) % 360);
    c = `hsl(${hue} 68% 48%)`;
    model.colors.set(id, c);
  }
  return c;
}

function splitPatterns(text) {
  const parts = text.split(/[\s,]+/).filter(Boolean);
  return parts.length ? parts : ["*"];
}

function authHeaders() {
  return conn.token ? { Authorization: `Bearer ${conn.token}` } : {};
}

// -- activity log --------------------------------------------------------------------------

/** One line in the activity list; `at` is the collector's time of the event, if it has one. */
function activity(text, kind = "info", at = null) {
  const list = $("activity");
  const li = document.createElement("li");
  li.className = kind;
  const time = document.createElement("time");
  time.textContent = clockFormat.format(at ? at * 1000 : Date.now());
  const what = document.createElement("span");
  what.textContent = text;
  li.append(time, what);
  list.prepend(li);
  while (list.children.length > MAX_ACTIVITY) list.lastElementChild.remove();
}

// -- devices -------------------------------------------------------------------------------

function newDevice(id) {
  return {
    id,
    online: false,
    reason: null,
    transport: null,
    address: null,
    since: null,
    lastSeen: null,
    sessionId: null,
    sessions: 0,
    stats: {},
    values: new Map(),
    commands: [], // command ids, oldest first
    row: null,
    detail: null,
    cells: null,
    visible: false, // rows far off screen are not kept up to date until they scroll near
    dirty: true,
  };
}

function getDevice(id) {
  let d = model.devices.get(id);
  if (!d) {
    d = newDevice(id);
    model.devices.set(id, d);
    deviceColor(id);
    const old = model.previous?.get(id);
    if (old) {
      // Same rows as before the snapshot: an open command form survives a reconnect.
      Object.assign(d, { row: old.row, detail: old.detail, cells: old.cells, visible: old.visible });
    } else {
      buildRow(d);
    }
    if (!model.loading) placeRow(d);
  }
  return d;
}

function applyDeviceObject(obj) {
  const d = getDevice(obj.id);
  d.online = !!obj.online;
  d.reason = obj.reason ?? null;
  d.transport = obj.transport ?? null;
  d.address = obj.address ?? null;
  d.since = obj.since ?? null;
  d.lastSeen = obj.last_seen ?? null;
  d.sessionId = obj.session_id ?? null;
  d.sessions = obj.sessions ?? 0;
  d.stats = obj.stats || {};
  d.values = new Map(Object.entries(obj.values || {}));
  for (const [metric, [times, values]] of Object.entries(obj.history || {})) {
    for (let i = 0; i < times.length; i++) addPoint(metric, d.id, times[i], values[i]);
  }
  for (const c of obj.commands || []) mergeCommand(c, false);
  d.dirty = true;
}

function onDeviceMessage(m) {
  const d = getDevice(m.device);
  const was = d.online;
  d.online = !!m.online;
  if (m.online) {
    d.reason = null;
    d.transport = m.transport ?? null;
    d.address = m.address ?? null;
    d.sessions += was ? 0 : 1;
  } else {
    d.reason = m.reason ?? null;
    d.transport = null;
    d.sessionId = null;
  }
  d.since = m.time;
  if (m.online) d.lastSeen = Math.max(d.lastSeen || 0, m.time);
  d.dirty = true;
  if (m.online) activity(`${d.id} online over ${m.transport || "?"}`, "good", m.time);
  else activity(`${d.id} offline (${m.reason}) after ${formatSeconds(m.duration ?? NaN)}`, "bad", m.time);
}

function onStats(m) {
  for (const [id, s] of Object.entries(m.devices || {})) {
    const d = getDevice(id);
    d.stats = s;
    if (s.last_seen) d.lastSeen = Math.max(d.lastSeen || 0, s.last_seen);
    d.dirty = true;
  }
}

function onReadings(m) {
  for (const [id, metric, t, v] of m.readings) {
    const d = getDevice(id);
    d.values.set(metric, [t, v]);
    d.lastSeen = Math.max(d.lastSeen || 0, t);
    d.dirty = true;
    if (t > model.newestReading) model.newestReading = t;
    addPoint(metric, id, t, v);
  }
}

// -- commands ------------------------------------------------------------------------------

/** Record a command state; stream messages and the POST answer may arrive in either order. */
function mergeCommand(c, live) {
  const time = c.time ?? c.updated ?? c.created ?? 0;
  const prev = model.commands.get(c.id);
  if (prev) {
    prev.args ??= c.args; // stream messages carry no args; the POST answer and snapshots do
    prev.created = c.created ?? prev.created;
    const rank = (s) => STATE_RANK[s] ?? 2;
    if (rank(prev.state) > rank(c.state) || (rank(prev.state) === rank(c.state) && prev.time > time)) {
      getDevice(prev.device).dirty = true;
      return;
    }
  }
  const cmd = {
    id: c.id,
    device: c.device,
    name: c.name,
    args: c.args ?? prev?.args,
    state: c.state,
    result: c.result ?? null,
    error: c.error ?? null,
    time,
    created: prev?.created ?? c.created ?? time,
  };
  model.commands.set(c.id, cmd);
  const d = getDevice(c.device);
  if (!d.commands.includes(c.id)) {
    d.commands.push(c.id);
    while (d.commands.length > MAX_COMMANDS_SHOWN) model.commands.delete(d.commands.shift());
  }
  d.dirty = true;
  rememberCommandName(c.name);
  if (live && FINAL_STATES.has(c.state) && c.state !== prev?.state) {
    const detail = c.state === "acked" ? JSON.stringify(c.result) : c.error || "";
    activity(
      `${c.device}: ${c.name} ${c.state.replace("_", " ")} ${detail}`,
      c.state === "acked" ? "good" : "bad",
      time,
    );
  }
}

function rememberCommandName(name) {
  const list = $("command-names");
  if (list.options.length >= 50) return;
  for (const opt of list.options) if (opt.value === name) return;
  const opt = document.createElement("option");
  opt.value = name;
  list.append(opt);
}

async function sendCommand(deviceId, form) {
  const name = form.elements.name.value.trim();
  const error = form.querySelector(".cmd-error");
  setText(error, "");
  let args;
  try {
    args = JSON.parse(form.elements.args.value.trim() || "{}");
  } catch (e) {
    setText(error, `arguments are not JSON: ${e.message}`);
    return;
  }
  if (!args || typeof args !== "object" || Array.isArray(args)) {
    setText(error, "arguments must be a JSON object, e.g. {}");
    return;
  }
  const button = form.querySelector(".cmd-send");
  button.disabled = true;
  try {
    const response = await fetch(`/api/devices/${encodeURIComponent(deviceId)}/commands`, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({ name, args }),
      cache: "no-store",
    });
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const e = body?.error;
      setText(error, e ? `${e.code}: ${e.message}` : `HTTP ${response.status}`);
      if (response.status === 401 || response.status === 403) showTokenForm(e?.message);
      return;
    }
    mergeCommand(body, false);
    render();
  } catch (e) {
    setText(error, `not sent: ${e.message}`);
  } finally {
    button.disabled = !conn.canCommand;
  }
}

// -- the device table ----------------------------------------------------------------------

const rowObserver = new IntersectionObserver(
  (entries) => {
    for (const e of entries) {
      const d = model.devices.get(e.target.dataset.device);
      if (d?.row !== e.target) continue;
      d.visible = e.isIntersecting;
      d.dirty ||= d.visible;
    }
    render();
  },
  { rootMargin: "100% 0px" },
);

function buildRow(d) {
  const row = clone("row-template");
  const detail = clone("detail-template");
  row.dataset.device = d.id;
  detail.dataset.detailFor = d.id;
  const q = (sel) => row.querySelector(sel);
  d.cells = {
    state: q(".state"),
    name: q(".name"),
    transport: q(".transport"),
    values: q(".values"),
    loss: q(".loss"),
    rate: q(".rate"),
    seen: q(".seen"),
    summary: q(".cmd-summary"),
    send: q(".open-commands"),
    toggle: q(".toggle"),
  };
  d.cells.name.textContent = d.id;
  q(".swatch").style.background = deviceColor(d.id);
  // The rows outlive snapshots (see getDevice): handlers look the device up by id.
  const id = d.id;
  const toggle = () => {
    detail.hidden = !detail.hidden;
    row.classList.toggle("open", !detail.hidden);
    d.cells.toggle.setAttribute("aria-expanded", String(!detail.hidden));
    const current = model.devices.get(id);
    if (current) current.dirty = true;
    render();
  };
  d.cells.toggle.addEventListener("click", toggle);
  d.cells.send.addEventListener("click", () => {
    if (detail.hidden) toggle();
    detail.querySelector(".cmd-name").focus();
  });
  row.addEventListener("mouseenter", () => focusDevice(id));
  row.addEventListener("mouseleave", () => focusDevice(null));
  detail.querySelector(".cmd-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendCommand(id, ev.currentTarget);
  });
  d.row = row;
  d.detail = detail;
  rowObserver.observe(row);
}

/** Put one new device's rows in their place (a device that registered after the snapshot). */
function placeRow(d) {
  const order = model.order;
  let lo = 0;
  let hi = order.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (collator.compare(order[mid], d.id) < 0) lo = mid + 1;
    else hi = mid;
  }
  order.splice(lo, 0, d.id);
  const next = lo + 1 < order.length ? model.devices.get(order[lo + 1]).row : null;
  $("device-rows").insertBefore(d.row, next);
  $("device-rows").insertBefore(d.detail, next);
}

/** All rows at once, in order: a snapshot may hold thousands of devices. */
function placeAllRows() {
  model.order = [...model.devices.keys()].sort(collator.compare);
  const rows = document.createDocumentFragment();
  for (const id of model.order) {
    const d = model.devices.get(id);
    rows.append(d.row, d.detail);
  }
  $("device-rows").replaceChildren(rows);
}

function renderRow(d, now) {
  const row = d.row;
  const c = d.cells;
  const state = c.state;
  const label = d.online ? "online" : d.reason ? `offline (${d.reason})` : "offline";
  setText(state, label);
  setAttr(state, "data-online", d.online);
  setAttr(state, "data-reason", d.reason);
  setAttr(
    state,
    "title",
    d.online
      ? `online since ${formatClock(d.since)}`
      : d.reason
        ? `${OFFLINE_REASONS[d.reason] || d.reason}, at ${formatClock(d.since)}`
        : "not seen since the collector started",
  );
  row.classList.toggle("offline", !d.online);
  setAttr(c.name, "title", d.address ? `address ${d.address}` : null);
  setText(c.transport, d.transport || "–");

  // Values: one chip per metric, sorted by name; chips are reused so they do not flicker.
  const cell = c.values;
  const names = [...d.values.keys()].sort(collator.compare);
  const chips = cell.children;
  if (chips.length !== names.length || names.some((n, i) => chips[i].dataset.metric !== n)) {
    cell.replaceChildren(
      ...names.map((n) => {
        const chip = document.createElement("span");
        chip.className = "value";
        chip.dataset.metric = n;
        const k = document.createElement("span");
        k.className = "k";
        k.textContent = n;
        const v = document.createElement("span");
        v.className = "v";
        chip.append(k, v);
        return chip;
      }),
    );
  }
  names.forEach((n, i) => {
    const [t, v] = d.values.get(n);
    setText(chips[i].lastElementChild, formatValue(v));
    setAttr(chips[i], "data-time", t);
    setAttr(chips[i], "title", `${n} = ${JSON.stringify(v)} at ${formatClock(t)}`);
  });

  const s = d.stats || {};
  const loss = Number.isFinite(s.loss) ? `${(s.loss * 100).toFixed(s.loss < 0.1 ? 2 : 1)} %` : "–";
  setText(c.loss, loss);
  setAttr(c.loss, "title", `${s.lost ?? 0} lost of ${(s.datagrams ?? 0) + (s.lost ?? 0)} datagrams`);
  c.loss.classList.toggle("warn", (s.loss || 0) >= 0.05);
  setText(c.rate, Number.isFinite(s.rate) ? `${s.rate.toFixed(1)} /s` : "–");
  renderSeen(d, now);

  // The newest command, in the row; all recent ones in the detail row.
  const summary = c.summary;
  const last = model.commands.get(d.commands[d.commands.length - 1]);
  const text = last ? `${last.name}: ${last.state.replace("_", " ")}` : "";
  setText(summary, text);
  setAttr(summary, "title", text || null);
  setAttr(summary, "data-state", last?.state);
  c.send.disabled = !conn.canCommand;
  setAttr(c.send, "title", conn.canCommand ? "send a command" : noCommandsWhy());

  if (!d.detail.hidden) renderDetail(d);
}

function renderSeen(d, now) {
  const seen = d.cells.seen;
  setText(seen, d.lastSeen ? formatAgo(now - d.lastSeen) : "never");
  setAttr(seen, "title", d.lastSeen ? dateFormat.format(d.lastSeen * 1000) : null);
  seen.classList.toggle("stale", d.online && d.lastSeen && now - d.lastSeen > 10);
}

function renderDetail(d) {
  const el = d.detail;
  const s = d.stats || {};
  const facts = {
    ".f-address": d.address || "–",
    ".f-session": d.sessionId ?? "–",
    ".f-sessions": d.sessions ?? "–",
    ".f-since": d.since ? dateFormat.format(d.since * 1000) : "–",
    ".f-datagrams": s.datagrams ?? "–",
    ".f-lost": s.lost ?? "–",
    ".f-duplicates": s.duplicates ?? "–",
    ".f-ooo": s.out_of_order ?? "–",
    ".f-readings": s.readings ?? "–",
  };
  for (const [sel, text] of Object.entries(facts)) setText(el.querySelector(sel), String(text));

  const send = el.querySelector(".cmd-send");
  send.disabled = !conn.canCommand;
  setAttr(send, "title", conn.canCommand ? null : noCommandsWhy());

  const list = el.querySelector(".cmd-list");
  const ids = d.commands.slice().reverse();
  const items = new Map([...list.children].map((li) => [li.dataset.commandId, li]));
  const wanted = ids.map((id) => {
    let li = items.get(id);
    if (!li) {
      li = clone("command-template");
      li.dataset.commandId = id;
    }
    const c = model.commands.get(id);
    li.dataset.state = c.state;
    li.dataset.device = d.id;
    setText(li.querySelector(".cmd-time"), formatClock(c.created));
    setText(li.querySelector(".cmd-title"), `${c.name} ${c.args ? JSON.stringify(c.args) : ""}`);
    setText(li.querySelector(".cmd-state"), c.state.replace("_", " "));
    const result =
      c.state === "acked"
        ? JSON.stringify(c.result)
        : c.error
          ? c.error
          : FINAL_STATES.has(c.state)
            ? ""
            : "…";
    setText(li.querySelector(".cmd-result"), result);
    setAttr(li, "title", `command ${c.id}, ${c.state} at ${formatClock(c.time)}`);
    return li;
  });
  if (wanted.length !== list.children.length || wanted.some((li, i) => list.children[i] !== li))
    list.replaceChildren(...wanted);
}

// -- charts --------------------------------------------------------------------------------

function getChart(metric) {
  let chart = model.charts.get(metric);
  if (!chart) {
    const el = clone("chart-template");
    el.dataset.metric = metric;
    el.querySelector(".chart-title").textContent = metric;
    chart = {
      metric,
      el,
      body: el.querySelector(".chart-body"),
      series: new Map(), // device id -> {t, v}, for the first MAX_CHART_SERIES ids only
      devices: new Set(), // every device with numbers for this metric
      lastId: null, // the largest id in series, once it is full
      left: new Set(), // ids that sort after lastId: never charted
      plot: null,
      ids: [],
      focused: null,
      width: 0,
      dirty: true,
    };
    model.charts.set(metric, chart);
    const container = $("charts");
    let before = null;
    for (const other of container.children) {
      if (collator.compare(other.dataset.metric, metric) > 0) {
        before = other;
        break;
      }
    }
    container.insertBefore(el, before);
    // The observer tells the width without forcing a layout (the device table can be long).
    new ResizeObserver((entries) => {
      chart.width = Math.floor(entries[entries.length - 1].contentRect.width);
      if (chart.plot) chart.plot.setSize(chartSize(chart));
      else requestAnimationFrame(drawCharts);
    }).observe(chart.body);
    $("charts-empty").hidden = true;
  }
  return chart;
}

function addPoint(metric, deviceId, t, v) {
  if (typeof v === "boolean") v = v ? 1 : 0;
  if (typeof v !== "number" || !Number.isFinite(v)) return;
  const chart = getChart(metric);
  let s = chart.series.get(deviceId);
  if (!s) {
    if (chart.left.has(deviceId)) return;
    chart.devices.add(deviceId);
    chart.dirty = true;
    if (chart.series.size >= MAX_CHART_SERIES) {
      // Memory stays bounded however large the fleet: chart the first ids only.
      if (collator.compare(deviceId, chart.lastId) > 0) {
        chart.left.add(deviceId);
        return;
      }
      chart.series.delete(chart.lastId);
      chart.left.add(chart.lastId);
    }
    s = { t: [], v: [] };
    chart.series.set(deviceId, s);
    if (chart.series.size >= MAX_CHART_SERIES) {
      chart.lastId = [...chart.series.keys()].reduce((a, b) => (collator.compare(a, b) > 0 ? a : b));
    }
  }
  const n = s.t.length;
  if (n === 0 || t > s.t[n - 1]) {
    s.t.push(t);
    s.v.push(v);
  } else if (t !== s.t[n - 1]) {
    // Out of order (a wall-clock step): keep the series sorted for the merge below.
    let i = n - 1;
    while (i > 0 && s.t[i - 1] > t) i--;
    if (s.t[i - 1] === t) return;
    s.t.splice(i, 0, t);
    s.v.splice(i, 0, v);
  }
  if (s.t.length > MAX_POINTS + 50) {
    s.t.splice(0, s.t.length - MAX_POINTS);
    s.v.splice(0, s.v.length - MAX_POINTS);
  }
  chart.dirty = true;
}

function chartSize(chart) {
  const width = Math.max(240, chart.width);
  return { width, height: width < 500 ? 180 : 220 };
}

/** One x array for all series (uPlot's data model), with nulls where a device has no point. */
function chartData(chart) {
  const cols = chart.ids.map((id) => chart.series.get(id));
  let total = 0;
  for (const s of cols) total += Math.min(s.t.length, MAX_POINTS);
  const all = new Float64Array(total);
  let k = 0;
  for (const s of cols)
    for (let i = Math.max(0, s.t.length - MAX_POINTS); i < s.t.length; i++) all[k++] = s.t[i];
  all.sort();
  const xs = [];
  for (let i = 0; i < all.length; i++) if (i === 0 || all[i] !== all[i - 1]) xs.push(all[i]);
  const data = [xs];
  for (const s of cols) {
    const ys = new Array(xs.length).fill(null);
    let j = 0;
    for (let i = Math.max(0, s.t.length - MAX_POINTS); i < s.t.length; i++) {
      while (xs[j] < s.t[i]) j++;
      ys[j] = s.v[i];
    }
    data.push(ys);
  }
  return data;
}

function drawCharts() {
  if (document.hidden) return;
  for (const chart of model.charts.values()) {
    if (!chart.dirty || !chart.width) continue; // no width before its first layout
    chart.dirty = false;
    const ids = [...chart.series.keys()].sort(collator.compare);
    const all = chart.devices.size;
    setText(
      chart.el.querySelector(".chart-note"),
      all > ids.length
        ? `${ids.length} of ${all} devices: narrow the device filter to see others`
        : `${all} device${all === 1 ? "" : "s"}`,
    );
    if (!chart.plot || ids.join("\n") !== chart.ids.join("\n")) {
      chart.ids = ids;
      chart.plot?.destroy();
      chart.plot = new uPlot(chartOptions(chart), chartData(chart), chart.body);
    } else {
      chart.plot.setData(chartData(chart));
    }
  }
}

function chartOptions(chart) {
  const axis = {
    stroke: "#7d8590",
    grid: { stroke: "rgba(125,133,144,0.18)", width: 1 },
    ticks: { show: false },
  };
  return {
    ...chartSize(chart),
    // At least a minute wide, so a fresh chart fills from the right instead of zooming in.
    scales: { x: { time: true, range: (u, min, max) => [Math.min(min, max - 60), max] } },
    cursor: { focus: { prox: 24 }, dataIdx: nearestPoint },
    focus: { alpha: 0.25 },
    // A key for a few lines (click one to hide it); with many, the hover tip says which is which.
    legend: { show: chart.ids.length <= 12, live: false },
    series: [
      {},
      ...chart.ids.map((id) => ({
        label: id,
        stroke: deviceColor(id),
        width: 1.5,
        spanGaps: true,
        points: { show: false },
      })),
    ],
    axes: [
      { ...axis, space: 80, size: 32, values: timeLabels },
      { ...axis, size: 56 },
    ],
    hooks: {
      init: [
        (u) =>
          u.over.append(
            Object.assign(document.createElement("div"), { className: "chart-tip", hidden: true }),
          ),
      ],
      setSeries: [
        (u, i) => {
          chart.focused = i;
          showTip(chart, u);
        },
      ],
      setCursor: [(u) => showTip(chart, u)],
    },
  };
}

/** Clock times on the x axis, one line (uPlot's default adds a date line that crowds). */
function timeLabels(u, splits) {
  const format = u.scales.x.max - u.scales.x.min < 600 ? axisFormats.seconds : axisFormats.minutes;
  return splits.map((t) => format.format(t * 1000));
}

/** Series share one x array, so most of a series is null: hover the nearest real point. */
function nearestPoint(u, seriesIdx, idx) {
  const ys = u.data[seriesIdx];
  if (seriesIdx === 0 || ys[idx] != null) return idx;
  for (let step = 1; step < ys.length; step++) {
    if (idx - step >= 0 && ys[idx - step] != null) return idx - step;
    if (idx + step < ys.length && ys[idx + step] != null) return idx + step;
    if (idx - step < 0 && idx + step >= ys.length) break;
  }
  return idx;
}

function showTip(chart, u) {
  const tip = u.over.querySelector(".chart-tip");
  const i = chart.focused;
  const idx = i ? u.cursor.idxs?.[i] : null;
  const v = idx != null ? u.data[i][idx] : null;
  if (!i || v == null || u.cursor.left < 0) {
    tip.hidden = true;
    return;
  }
  setText(tip, `${chart.ids[i - 1]}  ${numberFormat.format(v)}  ${formatClock(u.data[0][idx])}`);
  tip.style.borderColor = deviceColor(chart.ids[i - 1]);
  tip.hidden = false;
  const left = Math.min(u.cursor.left + 12, u.over.clientWidth - tip.offsetWidth - 4);
  tip.style.transform = `translate(${Math.max(0, left)}px, ${Math.max(0, u.cursor.top - 34)}px)`;
}

/** Hovering a device's row brings its line forward on every chart. */
function focusDevice(id) {
  for (const chart of model.charts.values()) {
    if (!chart.plot) continue;
    const i = id == null ? -1 : chart.ids.indexOf(id);
    chart.plot.setSeries(i < 0 ? null : i + 1, { focus: true });
  }
}

/** Before a snapshot: forget every point, keep the charts (no flash on a resync). */
function resetCharts() {
  for (const chart of model.charts.values()) {
    Object.assign(chart, {
      series: new Map(),
      devices: new Set(),
      left: new Set(),
      lastId: null,
      dirty: true,
    });
  }
}

/** After a snapshot: drop the charts of metrics that no longer come. */
function pruneCharts() {
  for (const [metric, chart] of model.charts) {
    if (chart.devices.size) continue;
    chart.plot?.destroy();
    chart.el.remove();
    model.charts.delete(metric);
  }
  $("charts-empty").hidden = model.charts.size > 0;
}

// -- rendering -----------------------------------------------------------------------------

function render() {
  const now = serverNow();
  let online = 0;
  for (const d of model.devices.values()) {
    if (d.online) online++;
    if (d.dirty && d.visible) {
      d.dirty = false;
      renderRow(d, now);
    }
  }
  const total = model.devices.size;
  $("devices-empty").hidden = total > 0;
  setText($("devices-count"), total ? `${online} of ${total} online` : "");
  setText($("h-online"), conn.synced ? `${online} / ${total}` : "–");
  const title = conn.synced ? `${online}/${total} online · trio-collector` : "trio-collector";
  if (document.title !== title) document.title = title;
  renderHealth(now);
}

function renderHealth(now) {
  const live = conn.status === "connected";
  setText(
    $("h-lag"),
    live && model.newestReading ? formatSeconds(Math.max(0, now - model.newestReading)) : "–",
  );
  const hb = conn.lastHeartbeat ? (Date.now() - conn.lastHeartbeat) / 1000 : NaN;
  setText($("h-heartbeat"), live && Number.isFinite(hb) ? `${formatSeconds(hb)} ago` : "–");
  const interval = conn.hello?.heartbeat_interval ?? 1;
  $("h-heartbeat").classList.toggle("warn", live && hb > 3 * interval);
  const missed = conn.missedEarlier + conn.missedNow;
  setText($("h-missed"), String(missed));
  $("h-missed").classList.toggle("warn", missed > 0);
  setText($("h-gaps"), String(conn.seqGaps));
  $("h-gaps").classList.toggle("warn", conn.seqGaps > 0);
  setText($("h-rtt"), live && conn.rtt != null ? `${Math.round(conn.rtt)} ms` : "–");

  let text = conn.status;
  if (conn.status === "connected" && !conn.synced) text = "syncing";
  if (conn.status === "reconnecting") {
    const wait = Math.max(0, Math.ceil((conn.retryAt - Date.now()) / 1000));
    text = wait > 0 ? `reconnecting in ${wait} s` : "reconnecting";
  }
  if (conn.status === "token") text = "token needed";
  setText($("conn-text"), text);
  $("conn").dataset.state = conn.status;
}

/** Ages ("3 s ago") change without any message: refresh them every second. */
function tick() {
  const now = serverNow();
  renderReplay();
  for (const d of model.devices.values()) if (d.visible) renderSeen(d, now);
  watchdog();
}

function showBanner(text, kind = "warn") {
  const banner = $("banner");
  banner.hidden = !text;
  banner.dataset.kind = kind;
  setText($("banner-text"), text || "");
}

function noCommandsWhy() {
  return conn.replay ? "a replay: no devices to command" : "this token may not send commands";
}

// -- replay: the collector serves a recording instead of live devices ------------------------

function onReplayStatus(status) {
  conn.replay = status || null;
  conn.replayAt = Date.now() / 1000;
  $("replay-bar").hidden = !status;
  if (!status) return;
  const seek = $("replay-seek");
  if (document.activeElement !== seek) {
    seek.min = String(Math.floor(status.start));
    seek.max = String(Math.ceil(status.end));
    seek.value = String(status.position);
  }
  setText($("replay-pause"), status.paused ? "Resume" : "Pause");
  const speed = $("replay-speed");
  if (document.activeElement !== speed) {
    if (![...speed.options].some((o) => Number(o.value) === status.speed)) {
      speed.append(new Option(`×${status.speed}`, String(status.speed)));
    }
    speed.value = [...speed.options].find((o) => Number(o.value) === status.speed).value;
  }
  renderReplay();
}

function renderReplay() {
  const r = conn.replay;
  if (!r) return;
  const now = serverNow();
  setText($("replay-position"), dateFormat.format(now * 1000));
  const offset = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
  setText(
    $("replay-offset"),
    `${offset(now - r.start)} of ${offset(r.end - r.start)}${r.paused ? " · paused" : ""}`,
  );
}

async function controlReplay(body) {
  setText($("replay-error"), "");
  try {
    const response = await fetch("/api/replay", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(body),
      cache: "no-store",
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) {
      const e = answer?.error;
      setText($("replay-error"), e ? `${e.code}: ${e.message}` : `HTTP ${response.status}`);
      if (response.status === 401 || response.status === 403) showTokenForm(e?.message);
      return;
    }
    onReplayStatus(answer);
  } catch (e) {
    setText($("replay-error"), `not sent: ${e.message}`);
  }
}

// -- the connection ------------------------------------------------------------------------

function streamUrl() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const query = conn.token ? `?token=${encodeURIComponent(conn.token)}` : "";
  return `${proto}//${location.host}/stream${query}`;
}

/** History for the snapshot: the full 300 points for up to 100 devices, less for more. */
async function historyFor() {
  try {
    const health = await (
      await fetch("/healthz", { cache: "no-store", signal: AbortSignal.timeout(3000) })
    ).json();
    const known = Math.max(1, health.devices_known || 1);
    return Math.max(10, Math.min(MAX_POINTS, Math.floor(HISTORY_BUDGET / known)));
  } catch {
    return MAX_POINTS;
  }
}

async function connect() {
  clearTimeout(conn.retryTimer);
  conn.retryTimer = null;
  conn.status = conn.attempt ? "reconnecting" : "connecting";
  conn.retryAt = 0;
  const id = ++conn.connectId;
  conn.history = await historyFor();
  if (id !== conn.connectId) return; // a newer connect() started meanwhile
  let opened = false;
  const ws = new WebSocket(streamUrl());
  conn.ws = ws;
  ws.onopen = () => {
    opened = true;
    Object.assign(conn, {
      status: "connected",
      synced: false,
      parts: [],
      pending: [],
      lastSeq: 0,
      missedNow: 0,
      lastMessage: Date.now(),
      lastHeartbeat: 0,
      skewSamples: [],
      rtt: null,
    });
    conn.pingSent.clear();
    model.newestReading = 0;
    subscribe();
    render();
  };
  ws.onmessage = (ev) => onMessage(ev.data);
  ws.onclose = (ev) => onClose(ws, ev.code, ev.reason, opened);
  // A handshake that never completes (a hung collector, a dead path) would wait for TCP.
  setTimeout(() => {
    if (opened || conn.ws !== ws) return;
    ws.onopen = ws.onclose = ws.onmessage = null;
    ws.close();
    onClose(ws, 1006, "no answer to the handshake", false);
  }, HANDSHAKE_MS);
}

function subscribe() {
  if (conn.ws?.readyState !== WebSocket.OPEN) return;
  const filters = readFilters();
  conn.ws.send(
    JSON.stringify({
      type: "subscribe",
      devices: filters.devices,
      metrics: filters.metrics,
      history: conn.history,
    }),
  );
  setText($("filter-status"), "subscribing…");
}

async function onClose(ws, code, reason, opened) {
  if (conn.ws !== ws) return; // an old socket we already gave up on
  conn.ws = null;
  document.body.classList.add("disconnected");
  if (conn.status === "connected") {
    conn.missedEarlier += conn.missedNow;
    conn.missedNow = 0;
  }
  conn.synced = false;
  if (!opened) {
    // The browser hides the HTTP status of a refused handshake: ask the same route over HTTP.
    let status = 0;
    let code = "";
    try {
      const query = conn.token ? `?token=${encodeURIComponent(conn.token)}` : "";
      const answer = await fetch(`/stream${query}`, { cache: "no-store", signal: AbortSignal.timeout(5000) });
      status = answer.status;
      code = (await answer.json().catch(() => null))?.error?.code ?? "";
    } catch {
      status = 0;
    }
    if (status === 401 || status === 403) {
      conn.status = "token";
      showBanner("");
      showTokenForm(
        conn.token
          ? "The collector refused this token: enter another."
          : "This collector needs an access token.",
      );
      render();
      return;
    }
    // A plain GET of /stream is answered 426 when the token is fine and the collector would
    // take an upgrade: then the handshake itself failed on the way (a proxy that does not pass
    // WebSockets, a handshake that timed out), and the collector is not the one refusing.
    let why;
    if (!status) why = "the collector is unreachable";
    else if (status === 426)
      why = "the WebSocket handshake did not complete, although the collector answers (a proxy that does not pass WebSockets, or a slow network)";
    else why = `the collector refused the stream (HTTP ${status}${code ? ` ${code}` : ""})`;
    scheduleReconnect(why);
    return;
  }
  const meaning = CLOSE_CODES[code] || "closed";
  conn.lastClose = `stream closed: ${code} ${meaning}${reason ? ` (${reason})` : ""}`;
  activity(conn.lastClose, code === 1000 ? "info" : "bad");
  scheduleReconnect(null);
}

/** Try again after a growing, jittered delay; the banner keeps why the stream closed. */
function scheduleReconnect(why) {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** conn.attempt);
  const delay = Math.round(base * (0.8 + Math.random() * 0.4));
  conn.attempt += 1;
  conn.status = "reconnecting";
  conn.retryAt = Date.now() + delay;
  conn.retryTimer = setTimeout(connect, delay);
  const reasons = [conn.lastClose, why].filter(Boolean).join("; then ");
  showBanner(
    `${reasons}. Reconnecting by itself (attempt ${conn.attempt}); the page shows the last known state.`,
  );
  render();
}

/** A socket that stops delivering heartbeats is dead even if TCP has not noticed yet. */
function watchdog() {
  if (conn.status !== "connected" || !conn.ws) return;
  const interval = (conn.hello?.heartbeat_interval ?? 1) * 1000;
  const limit = Math.max(10000, 5 * interval);
  const silent = Date.now() - conn.lastMessage;
  if (silent > limit) {
    const ws = conn.ws;
    ws.onopen = ws.onclose = ws.onmessage = null;
    ws.close(4000, "no heartbeat");
    onClose(ws, 4000, `nothing for ${Math.round(silent / 1000)} s`, true);
    return;
  }
  if (conn.synced && Date.now() - (conn.lastPing || 0) > PING_MS) {
    conn.lastPing = Date.now();
    const id = conn.lastPing;
    conn.pingSent.set(id, performance.now());
    conn.ws.send(JSON.stringify({ type: "ping", id }));
  }
}

function onMessage(text) {
  let m;
  try {
    m = JSON.parse(text);
  } catch {
    activity("the collector sent a message that is not JSON", "bad");
    return;
  }
  conn.lastMessage = Date.now();
  if (typeof m.seq === "number") {
    if (conn.lastSeq && m.seq !== conn.lastSeq + 1) {
      conn.seqGaps += Math.max(1, m.seq - conn.lastSeq - 1);
      activity(`stream sequence gap: ${conn.lastSeq} then ${m.seq}`, "bad");
    }
    conn.lastSeq = m.seq;
  }
  if (m.type === "snapshot") return onSnapshotPart(m);
  if (!conn.synced && ["readings", "device", "command", "stats"].includes(m.type)) {
    // Between the parts of a snapshot (or before it): apply after it.
    conn.pending.push(m);
    return;
  }
  apply(m);
}

function apply(m) {
  switch (m.type) {
    case "hello":
      conn.hello = m;
      conn.canCommand = !!m.can_command;
      onReplayStatus(m.mode === "replay" ? m.replay : null);
      setText($("server-version"), m.version ? `v${m.version}` : "");
      noteClock(m.time);
      for (const d of model.devices.values()) d.dirty = true;
      break;
    case "readings":
      onReadings(m);
      break;
    case "device":
      onDeviceMessage(m);
      break;
    case "command":
      mergeCommand(m, true);
      break;
    case "stats":
      onStats(m);
      break;
    case "heartbeat":
      conn.lastHeartbeat = Date.now();
      if (m.replay) onReplayStatus(m.replay);
      noteClock(m.time);
      conn.missedNow = Math.max(conn.missedNow, m.missed || 0);
      break;
    case "missed":
      conn.missedNow = Math.max(conn.missedNow, m.total || 0);
      activity(`the collector dropped ${m.count} updates for this page (backpressure)`, "bad");
      break;
    case "error":
      activity(`collector: ${m.code}: ${m.message}`, "bad");
      if (m.code === "no_match") setText($("filter-status"), m.message);
      break;
    case "pong": {
      const sent = conn.pingSent.get(m.id);
      if (sent !== undefined) {
        conn.rtt = performance.now() - sent;
        conn.pingSent.delete(m.id);
      }
      break;
    }
    default:
      break; // newer collectors may send more; ignore what we do not know
  }
}

function noteClock(serverTime) {
  if (typeof serverTime !== "number") return;
  // The smallest (local - collector) difference seen recently is the skew plus the fastest delivery.
  conn.skewSamples.push(Date.now() / 1000 - serverTime);
  if (conn.skewSamples.length > 60) conn.skewSamples.shift();
  conn.skew = Math.min(...conn.skewSamples);
}

function onSnapshotPart(m) {
  if (m.part === 1) conn.parts = [];
  conn.parts.push(m);
  conn.synced = false;
  if (m.part < m.parts) return;
  const parts = conn.parts;
  conn.parts = [];
  const pending = conn.pending;
  conn.pending = [];

  model.previous = model.devices;
  model.devices = new Map();
  model.commands.clear();
  model.newestReading = 0;
  resetCharts();
  model.loading = true;
  try {
    for (const part of parts) for (const d of part.devices) applyDeviceObject(d);
  } finally {
    for (const [id, old] of model.previous) if (!model.devices.has(id)) rowObserver.unobserve(old.row);
    model.previous = null;
    model.loading = false;
    placeAllRows();
    pruneCharts();
  }
  for (const d of model.devices.values()) {
    for (const [t] of d.values.values()) if (t > model.newestReading) model.newestReading = t;
  }
  for (const msg of pending) apply(msg);
  noteClock(m.time);

  conn.synced = true;
  conn.attempt = 0;
  conn.lastClose = null;
  document.body.classList.remove("disconnected");
  showBanner("");
  const sub = m.subscription || {};
  setText(
    $("filter-status"),
    `showing devices ${(sub.devices || ["*"]).join(", ")} · metrics ${(sub.metrics || ["*"]).join(", ")}`,
  );
  render();
  drawCharts();
}

// -- filters and token ---------------------------------------------------------------------

function readFilters() {
  return {
    devices: splitPatterns($("filter-devices").value),
    metrics: splitPatterns($("filter-metrics").value),
  };
}

function loadFilters() {
  try {
    const saved = JSON.parse(localStorage.getItem(FILTER_KEY) || "{}");
    const params = new URLSearchParams(location.search);
    $("filter-devices").value = params.get("devices") ?? saved.devices ?? "";
    $("filter-metrics").value = params.get("metrics") ?? saved.metrics ?? "";
  } catch {
    // a corrupt saved filter is not worth a broken page
  }
}

function showTokenForm(message) {
  const form = $("token-form");
  form.hidden = false;
  setText($("token-label"), message || "Access token for this collector:");
  $("token-input").value = "";
  $("token-input").focus();
}

function setup() {
  loadFilters();
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(
      FILTER_KEY,
      JSON.stringify({
        devices: $("filter-devices").value.trim(),
        metrics: $("filter-metrics").value.trim(),
      }),
    );
    if (conn.ws?.readyState === WebSocket.OPEN) subscribe();
    else setText($("filter-status"), "applies when connected");
  });
  $("token-button").addEventListener("click", () =>
    showTokenForm(
      conn.token ? "A token is set. Enter another, or forget it:" : "Access token for this collector:",
    ),
  );
  $("token-cancel").addEventListener("click", () => ($("token-form").hidden = true));
  $("token-forget").addEventListener("click", () => {
    conn.token = "";
    localStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = true;
    reconnectNow();
  });
  $("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    conn.token = $("token-input").value.trim();
    if (conn.token) localStorage.setItem(TOKEN_KEY, conn.token);
    else localStorage.removeItem(TOKEN_KEY);
    $("token-form").hidden = true;
    reconnectNow();
  });
  $("replay-pause").addEventListener("click", () =>
    controlReplay({ action: conn.replay?.paused ? "resume" : "pause" }),
  );
  $("replay-speed").addEventListener("change", (ev) => {
    controlReplay({ action: "speed", speed: Number(ev.currentTarget.value) });
    ev.currentTarget.blur();
  });
  $("replay-seek").addEventListener("change", (ev) => {
    controlReplay({ action: "seek", position: Number(ev.currentTarget.value) });
    ev.currentTarget.blur();
  });
  // Back on the network, or back to a hidden tab: do not wait out the backoff.
  window.addEventListener("online", () => conn.status === "reconnecting" && reconnectNow());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      for (const chart of model.charts.values()) chart.dirty = true;
      drawCharts();
    }
  });
  setInterval(render, RENDER_MS);
  setInterval(drawCharts, CHART_MS);
  setInterval(tick, 1000);
  connect();
}

function reconnectNow() {
  const ws = conn.ws;
  if (ws) {
    conn.ws = null;
    ws.onopen = ws.onclose = ws.onmessage = null;
    ws.close(1000, "reconnecting");
  }
  conn.attempt = 0;
  showBanner("");
  connect();
}

setup();
