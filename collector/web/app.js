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
const PAGE_SIZE = 50; // device rows in the table at once: the DOM stays small at any fleet size
const RESORT_MS = 2000; // a table sorted by loss, rate or last seen is re-sorted at most this often
const AGG_BUCKET = 1; // seconds: live aggregate bands (min/mean/max over devices) per bucket
const HISTORY_BUCKETS = 300;
const HISTORY_REFRESH_MS = 30000; // a relative range ("last hour") is fetched again this often
const STATUS_MS = 2000; // the collector health panel
const MAX_ALARMS_SHOWN = 200;
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
// One time format everywhere (table, tooltips, axes, alarms): the local clock, with the date
// when the time is not today; the zone is shown once, next to the range picker.
const CLOCK = { hourCycle: "h23", hour: "2-digit", minute: "2-digit", second: "2-digit" };
const clockFormat = new Intl.DateTimeFormat(undefined, CLOCK);
const dateFormat = new Intl.DateTimeFormat(undefined, { ...CLOCK, year: "numeric", month: "short", day: "numeric" });
const TIME_ZONE = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
const axisFormats = {
  seconds: new Intl.DateTimeFormat(undefined, {
    hourCycle: "h23",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
  }),
  minutes: new Intl.DateTimeFormat(undefined, { hourCycle: "h23", hour: "2-digit", minute: "2-digit" }),
  days: new Intl.DateTimeFormat(undefined, {
    hourCycle: "h23",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
  }),
};

// -- state ---------------------------------------------------------------------------------

/** Everything the page knows, rebuilt from each snapshot. */
const model = {
  devices: new Map(), // id -> Device
  order: [], // device ids in natural order (sensor-2 before sensor-10), as the rows are
  loading: false, // applying a snapshot: rows are put in order once, at the end
  previous: null, // while applying a snapshot: the devices before it, whose rows are reused
  nameOrder: [], // every device in natural name order (see byName)
  declared: [], // commands declared in [device_commands.NAME] (GET /api/meta)
  commands: new Map(), // command id -> command
  charts: new Map(), // metric -> Chart
  colors: new Map(), // device id -> colour, stable for the life of the page
  newestReading: 0, // collector time of the newest reading received on this connection
  alarms: new Map(), // alarm id -> alarm (as /api/alarms lists them)
  units: [], // [{re, unit, description}] from the hello's metrics
  range: null, // null: live; else {from, to, span} (span: seconds for "last N", null for custom)
  status: null, // the last /api/status answer, and the one before (for rates)
  statusPrev: null,
};

/** The device table's view: which devices, in which order, which page. */
const view = {
  sort: "name",
  dir: 1,
  find: "",
  state: "all", // all | online | offline | never | offline:REASON
  page: 0,
  list: [], // devices that pass the filters, in order
  shown: [], // the devices with rows in the table now
  dirty: true, // membership or order changed: lay the table out again
  stale: false, // a sort key (loss, rate, seen) changed: re-sort at the next RESORT_MS
  sortedAt: 0,
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
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toDateString() === new Date().toDateString() ? clockFormat.format(d) : dateFormat.format(d);
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

/** GET a read-only API route with the page's token, no cache, and a deadline. */
function apiGet(url, ms) {
  return fetch(url, { cache: "no-store", headers: authHeaders(), signal: AbortSignal.timeout(ms) });
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
    visible: false, // on the table's current page: only those rows are kept up to date
    dirty: true,
    // natural order without a collator (sensor-2 before sensor-10): digit runs padded
    sortName: id.toLowerCase().replace(/\d+/g, (n) => n.padStart(12, "0")),
    findName: id.toLowerCase(),
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
    }
    view.dirty = true;
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
  if (was !== d.online || view.state !== "all" || view.sort === "state") view.dirty = true;
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
  if (view.sort !== "name" && view.sort !== "state") view.stale = true;
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
  if (view.sort === "seen") view.stale = true;
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

/** The commands declared in [device_commands.NAME] that a device accepts. */
function declaredFor(deviceId) {
  return model.declared.filter((c) => c.devices.some((g) => globToRegExp(g).test(deviceId)));
}

/** A declared command's arguments from its fields, typed as declared; null after an error. */
function declaredArgs(decl, form, error) {
  const args = {};
  for (const [key, kind] of Object.entries(decl.args)) {
    const input = form.querySelector(`.cmd-fields [data-arg="${CSS.escape(key)}"]`);
    if (!input) continue;
    if (kind === "boolean") {
      args[key] = input.checked;
      continue;
    }
    const raw = input.value.trim();
    if (raw === "") continue;
    if (kind === "string") args[key] = raw;
    else {
      const n = Number(raw);
      if (!Number.isFinite(n) || (kind === "integer" && !Number.isInteger(n))) {
        setText(error, `${key} must be ${kind === "integer" ? "a whole number" : "a number"}`);
        return null;
      }
      args[key] = n;
    }
  }
  return args;
}

/** The command form of a device's detail: a choice of its declared commands (a field per
 * argument), or free text (any name, arguments as JSON) for operators. */
function renderCommandForm(d, form) {
  const pick = form.querySelector(".cmd-pick");
  const decls = declaredFor(d.id);
  const key = decls.map((c) => c.name).join("\n");
  if (pick.dataset.key !== key) {
    pick.dataset.key = key;
    const current = pick.value;
    pick.replaceChildren(
      ...decls.map((c) => new Option(c.name, c.name)),
      new Option("other (free text)…", ""),
    );
    pick.value = decls.some((c) => c.name === current) ? current : decls.length ? decls[0].name : "";
    pick.hidden = !decls.length;
    pickCommand(d, form);
  }
}

function pickCommand(d, form) {
  const decl = declaredFor(d.id).find((c) => c.name === form.querySelector(".cmd-pick").value);
  const fields = form.querySelector(".cmd-fields");
  form.elements.name.hidden = !!decl;
  form.elements.args.hidden = !!decl;
  form.elements.name.required = !decl;
  setAttr(form, "data-declared", decl?.name);
  setAttr(form.querySelector(".cmd-pick"), "title", decl?.description || null);
  fields.replaceChildren(
    ...(decl
      ? Object.entries(decl.args).map(([key, kind]) => {
          const label = document.createElement("label");
          label.textContent = `${key} `;
          const input = document.createElement("input");
          input.dataset.arg = key;
          input.type = kind === "boolean" ? "checkbox" : kind === "string" ? "text" : "number";
          if (kind === "number") input.step = "any";
          input.required = decl.required.includes(key) && kind !== "boolean";
          input.placeholder = kind;
          label.append(input);
          return label;
        })
      : []),
  );
}

async function sendCommand(deviceId, form) {
  const decl = declaredFor(deviceId).find((c) => c.name === form.dataset.declared);
  const name = decl ? decl.name : form.elements.name.value.trim();
  const error = form.querySelector(".cmd-error");
  setText(error, "");
  let args;
  if (decl) {
    args = declaredArgs(decl, form, error);
    if (!args) return;
  } else
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

function buildRow(d) {
  const row = clone("row-template");
  row.dataset.device = d.id;
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
    const current = model.devices.get(id) || d;
    const detail = current.detail || buildDetail(current);
    detail.hidden = !detail.hidden;
    if (!detail.hidden) {
      row.after(detail);
      loadSessions(id, detail);
    } else detail.remove();
    row.classList.toggle("open", !detail.hidden);
    d.cells.toggle.setAttribute("aria-expanded", String(!detail.hidden));
    current.dirty = true;
    render();
  };
  d.cells.toggle.addEventListener("click", toggle);
  d.cells.send.addEventListener("click", () => {
    const current = model.devices.get(id) || d;
    if (!current.detail || current.detail.hidden) toggle();
    current.detail.querySelector(".cmd-name").focus();
  });
  row.addEventListener("mouseenter", () => focusDevice(id));
  row.addEventListener("mouseleave", () => focusDevice(null));
  d.row = row;
}

/** The detail row (facts, commands, sessions), made the first time it is opened: a page of
 * the table holds only the rows that are seen. */
function buildDetail(d) {
  const detail = clone("detail-template");
  detail.dataset.detailFor = d.id;
  const id = d.id;
  const form = detail.querySelector(".cmd-form");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sendCommand(id, ev.currentTarget);
  });
  form.querySelector(".cmd-pick").addEventListener("change", () => pickCommand(d, form));
  detail.querySelector(".d-only").addEventListener("click", () => {
    $("filter-devices").value = id;
    $("filters").requestSubmit();
  });
  renderCommandForm(d, form);
  d.detail = detail;
  return detail;
}

function stateKey(d) {
  return d.online ? "online" : d.reason ? `offline:${d.reason}` : "never";
}

function passes(d, find) {
  const st = view.state;
  if (st !== "all") {
    if (st === "offline") {
      if (d.online || !d.reason) return false;
    } else if (stateKey(d) !== st) return false;
  }
  return !find || d.findName.includes(find);
}

// Sort keys as numbers (or plain strings), computed once per device per sort: comparing
// them is cheap enough to sort 10,000 devices well within a frame.
const SORT_KEYS = {
  state: (d) => (d.online ? 0 : d.reason ? 1 + reasonIndex(d.reason) : 1e6),
  loss: (d) => d.stats.loss ?? -1,
  rate: (d) => d.stats.rate ?? -1,
  seen: (d) => d.lastSeen ?? 0,
};
const reasons = new Map();

function reasonIndex(reason) {
  let i = reasons.get(reason);
  if (i === undefined) {
    // the reasons in alphabetical order, whatever order they were first seen in
    const all = [...reasons.keys(), reason].sort();
    reasons.clear();
    all.forEach((r, k) => reasons.set(r, k));
    i = reasons.get(reason);
  }
  return i;
}

/** Every device in natural name order; each device's place in it is its `nameRank`. */
function byName() {
  if (model.nameOrder.length !== model.devices.size) {
    model.nameOrder = [...model.devices.values()].sort((a, b) =>
      a.sortName < b.sortName ? -1 : a.sortName > b.sortName ? 1 : 0,
    );
    model.nameOrder.forEach((d, i) => (d.nameRank = i));
  }
  return model.nameOrder;
}

/** Filter and sort every device, then show the current page. */
function layoutTable() {
  view.dirty = false;
  view.stale = false;
  view.sortedAt = performance.now();
  const find = view.find.trim().toLowerCase();
  const dir = view.dir;
  const named = byName();
  let list = [];
  for (const d of named) if (passes(d, find)) list.push(d);
  const keyOf = SORT_KEYS[view.sort];
  if (keyOf) {
    // names break ties, always A to Z
    const keyed = list.map((d) => ({ k: keyOf(d), r: d.nameRank, d }));
    keyed.sort((a, b) => (a.k < b.k ? -dir : a.k > b.k ? dir : a.r - b.r));
    list = keyed.map((e) => e.d);
  } else if (dir < 0) {
    list.reverse();
  }
  view.list = list;
  for (const th of document.querySelectorAll("#device-table th[data-sort]")) {
    if (th.dataset.sort === view.sort) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
    else th.removeAttribute("aria-sort");
  }
  showPage();
}

/** Put the current page's rows (and only those) in the table: a few hundred elements
 * whatever the size of the fleet. */
function showPage() {
  const list = view.list;
  const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
  view.page = Math.min(Math.max(0, view.page), pages - 1);
  const first = view.page * PAGE_SIZE;
  const shown = list.slice(first, first + PAGE_SIZE);
  for (const d of view.shown) d.visible = false;
  const rows = document.createDocumentFragment();
  const now = serverNow();
  for (const d of shown) {
    if (!d.row) buildRow(d);
    d.visible = true;
    if (d.dirty) {
      d.dirty = false;
      renderRow(d, now);
    }
    rows.append(d.row);
    if (d.detail && !d.detail.hidden) rows.append(d.detail);
  }
  view.shown = shown;
  $("device-rows").replaceChildren(rows);
  setText(
    $("page-info"),
    list.length
      ? `${first + 1}–${first + shown.length} of ${list.length}${list.length < model.devices.size ? ` (of ${model.devices.size})` : ""}`
      : model.devices.size
        ? "no device matches"
        : "",
  );
  $("page-prev").disabled = view.page === 0;
  $("page-next").disabled = view.page >= pages - 1;
}

/** Devices by state, as buttons that filter the table. */
function renderSummary(counts, total) {
  const box = $("state-summary");
  const entries = [["all", `all ${total}`]];
  entries.push(["online", `online ${counts.get("online") || 0}`]);
  let offline = 0;
  const reasons = [];
  for (const [k, n] of counts) {
    if (k.startsWith("offline:")) {
      offline += n;
      reasons.push([k, `${k.slice(8)} ${n}`]);
    }
  }
  entries.push(["offline", `offline ${offline}`]);
  reasons.sort((a, b) => (a[0] < b[0] ? -1 : 1));
  entries.push(...reasons);
  if (counts.get("never")) entries.push(["never", `never seen ${counts.get("never")}`]);
  const key = entries.map((e) => e.join("=")).join("|") + view.state;
  if (box.dataset.key === key) return;
  box.dataset.key = key;
  box.replaceChildren(
    ...entries.map(([k, text]) => {
      const b = document.createElement("button");
      b.type = "button";
      b.className = `chip${k.startsWith("offline:") ? " reason" : ""}`;
      b.dataset.state = k;
      b.textContent = text;
      b.title = k.startsWith("offline:") ? OFFLINE_REASONS[k.slice(8)] || k.slice(8) : `show ${k} devices`;
      b.setAttribute("aria-pressed", String(view.state === k));
      return b;
    }),
  );
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
    setText(chips[i].lastElementChild, typeof v === "number" ? withUnit(formatValue(v), n) : formatValue(v));
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

  if (d.detail && !d.detail.hidden) renderDetail(d);
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

function unitOf(metric) {
  for (const u of model.units) if (u.re.test(metric)) return u;
  return null;
}

function withUnit(v, metric) {
  const u = unitOf(metric);
  return u?.unit ? `${v} ${u.unit}` : v;
}

function globToRegExp(glob) {
  const body = glob.replace(/[.+^${}()|\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  try {
    return new RegExp(`^${body.replace(/\[!/g, "[^")}$`);
  } catch {
    // an unbalanced "[" (fnmatch takes it literally): match the glob's text as it is
    return new RegExp(`^${glob.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`);
  }
}

function getChart(metric) {
  let chart = model.charts.get(metric);
  if (!chart) {
    const el = clone("chart-template");
    el.dataset.metric = metric;
    const u = unitOf(metric);
    el.querySelector(".chart-title").textContent = u?.unit ? `${metric} (${u.unit})` : metric;
    if (u?.description) el.querySelector(".chart-title").title = u.description;
    chart = {
      metric,
      el,
      body: el.querySelector(".chart-body"),
      series: new Map(), // device id -> {t, v}, for the first MAX_CHART_SERIES ids only
      devices: new Set(), // every device with numbers for this metric
      lastId: null, // the largest id in series, once it is full
      left: new Set(), // ids that sort after lastId: never charted
      agg: new Map(), // bucket start -> [min, max, sum, count] over every device
      hist: null, // a time range's answer from /api/history, while one is shown
      plot: null,
      plotKey: "",
      ids: [],
      labels: [],
      colors: [],
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
    if (model.range) loadHistory(chart);
  }
  return chart;
}

function addPoint(metric, deviceId, t, v) {
  if (typeof v === "boolean") v = v ? 1 : 0;
  if (typeof v !== "number" || !Number.isFinite(v)) return;
  const chart = getChart(metric);
  // The aggregate sees every device, however many there are.
  const b = Math.floor(t / AGG_BUCKET) * AGG_BUCKET;
  const a = chart.agg.get(b);
  if (a) {
    if (v < a[0]) a[0] = v;
    if (v > a[1]) a[1] = v;
    a[2] += v;
    a[3] += 1;
  } else {
    chart.agg.set(b, [v, v, v, 1]);
    if (chart.agg.size > MAX_POINTS + 50) {
      const keys = [...chart.agg.keys()].sort((x, y) => x - y);
      for (const k of keys.slice(0, keys.length - MAX_POINTS)) chart.agg.delete(k);
    }
  }
  chart.dirty = true;
  let s = chart.series.get(deviceId);
  if (!s) {
    if (chart.left.has(deviceId)) return;
    chart.devices.add(deviceId);
    if (chart.series.size >= MAX_CHART_SERIES) {
      // Memory stays bounded however large the fleet: lines for the first ids only.
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
}

function chartSize(chart) {
  const width = Math.max(240, chart.width);
  return { width, height: width < 500 ? 180 : 220 };
}

/** One x array for all series (uPlot's data model), with nulls where a series has no point. */
function mergeSeries(cols) {
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

/** The live aggregate as [xs, min, mean, max]. */
function aggData(chart) {
  const keys = [...chart.agg.keys()].sort((x, y) => x - y).slice(-MAX_POINTS);
  const lo = [];
  const mean = [];
  const hi = [];
  for (const k of keys) {
    const a = chart.agg.get(k);
    lo.push(a[0]);
    hi.push(a[1]);
    mean.push(a[2] / a[3]);
  }
  return [keys, lo, mean, hi];
}

const BAND = { labels: ["min", "mean", "max"], colors: ["#6e9fd8", "#58a6ff", "#6e9fd8"] };

/** What a chart shows now: lines per device for a few devices, else a min/mean/max band;
 * from the live stream, or from a time range's history. */
function chartView(chart) {
  if (model.range) {
    const h = chart.hist;
    if (!h || h.error) return { mode: "band", key: "band", data: [[], [], [], []], note: h?.error || "loading…" };
    const ids = h.series ? Object.keys(h.series).sort(collator.compare) : [];
    const source = h.source === "recording" ? "from the recording" : "from memory";
    const bucket = formatSeconds(h.bucket);
    const extra = h.truncated ? ` · cut short at ${formatClock(h.reached)} (too much to read)` : "";
    if (ids.length && ids.length <= MAX_CHART_SERIES) {
      const cols = ids.map((id) => ({ t: h.series[id].t, v: h.series[id].mean }));
      return {
        mode: "lines",
        key: `lines\n${ids.join("\n")}`,
        ids,
        data: mergeSeries(cols),
        note: `${ids.length} device${ids.length === 1 ? "" : "s"} · mean per ${bucket} · ${source}${extra}`,
      };
    }
    const g = h.aggregate;
    return {
      mode: "band",
      key: "band",
      data: [g.t, g.min, g.mean, g.max],
      note: `${h.matched_devices} devices · min, mean, max per ${bucket} · ${source}${extra}`,
    };
  }
  const all = chart.devices.size;
  if (all <= MAX_CHART_SERIES) {
    const ids = [...chart.series.keys()].sort(collator.compare);
    return {
      mode: "lines",
      key: `lines\n${ids.join("\n")}`,
      ids,
      data: mergeSeries(ids.map((id) => chart.series.get(id))),
      note: `${all} device${all === 1 ? "" : "s"}`,
    };
  }
  return {
    mode: "band",
    key: "band",
    data: aggData(chart),
    note: `${all} devices: min, mean and max per second (narrow the device filter to ${MAX_CHART_SERIES} or fewer to see each)`,
  };
}

function drawCharts() {
  if (document.hidden) return;
  for (const chart of model.charts.values()) {
    if (!chart.dirty || !chart.width) continue; // no width before its first layout
    chart.dirty = false;
    const v = chartView(chart);
    setText(chart.el.querySelector(".chart-note"), v.note);
    chart.el.dataset.mode = v.mode;
    if (!chart.plot || v.key !== chart.plotKey) {
      chart.plotKey = v.key;
      if (v.mode === "lines") {
        chart.ids = v.ids;
        chart.labels = v.ids;
        chart.colors = v.ids.map(deviceColor);
      } else {
        chart.ids = [];
        chart.labels = BAND.labels;
        chart.colors = BAND.colors;
      }
      chart.plot?.destroy();
      chart.plot = new uPlot(chartOptions(chart, v.mode), v.data, chart.body);
    } else {
      chart.plot.setData(v.data);
    }
  }
}

function chartOptions(chart, mode) {
  const axis = {
    stroke: "#7d8590",
    grid: { stroke: "rgba(125,133,144,0.18)", width: 1 },
    ticks: { show: false },
  };
  const range = model.range;
  const series =
    mode === "lines"
      ? chart.ids.map((id) => ({
          label: id,
          stroke: deviceColor(id),
          width: 1.5,
          spanGaps: true,
          points: { show: false },
        }))
      : BAND.labels.map((label, i) => ({
          label,
          stroke: BAND.colors[i],
          width: i === 1 ? 1.75 : 0.75,
          spanGaps: true,
          points: { show: false },
        }));
  return {
    ...chartSize(chart),
    scales: {
      x: {
        time: true,
        // A range shows all of it; live, at least a minute wide, so a fresh chart fills from
        // the right instead of zooming in.
        range: range ? () => [range.from, range.to] : (u, min, max) => [Math.min(min, max - 60), max],
      },
    },
    cursor: { focus: { prox: 24 }, dataIdx: nearestPoint },
    focus: { alpha: 0.25 },
    // A key whenever there are lines to tell apart (click one to hide it).
    legend: { show: true, live: false },
    bands: mode === "band" ? [{ series: [3, 1], fill: "rgba(88,166,255,0.16)" }] : [],
    series: [{}, ...series],
    axes: [
      { ...axis, space: 80, size: 32, values: timeLabels },
      { ...axis, size: 56, values: (u, splits) => splits.map((v) => numberFormat.format(v)) },
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

/** Axis labels in the page's one time format: the clock, with the date on ranges over a day. */
function timeLabels(u, splits) {
  const span = u.scales.x.max - u.scales.x.min;
  const format = span > 86400 ? axisFormats.days : span < 600 ? axisFormats.seconds : axisFormats.minutes;
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
  const value = withUnit(numberFormat.format(v), chart.metric);
  setText(tip, `${chart.labels[i - 1]}  ${value}  ${formatClock(u.data[0][idx])}`);
  tip.style.borderColor = chart.colors[i - 1];
  tip.hidden = false;
  const left = Math.min(u.cursor.left + 12, u.over.clientWidth - tip.offsetWidth - 4);
  tip.style.transform = `translate(${Math.max(0, left)}px, ${Math.max(0, u.cursor.top - 34)}px)`;
}

/** Hovering a device's row brings its line forward on every chart. */
function focusDevice(id) {
  for (const chart of model.charts.values()) {
    if (!chart.plot || !chart.ids.length) continue;
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
      agg: new Map(),
      lastId: null,
      dirty: true,
    });
  }
}

/** After a snapshot: drop the charts of metrics that no longer come. */
function pruneCharts() {
  for (const [metric, chart] of model.charts) {
    if (chart.devices.size || chart.hist?.matched_devices) continue;
    chart.plot?.destroy();
    chart.el.remove();
    model.charts.delete(metric);
  }
  $("charts-empty").hidden = model.charts.size > 0;
}

// -- time ranges: history from the collector (memory, then the recording) ------------------

function rangeDevices() {
  const globs = readFilters().devices;
  return globs.length ? globs.join(",") : "*";
}

// One history query at a time from this page (the collector computes at most two at once).
let historyQueue = Promise.resolve();

let historyPending = 0; // queries queued or running: a refresh waits until none is

function loadHistory(chart) {
  if (chart.histQueued) return; // already waiting for its turn: it will ask for the range then
  chart.histQueued = true;
  historyPending += 1;
  historyQueue = historyQueue
    .then(() => {
      chart.histQueued = false;
      return fetchHistory(chart);
    })
    .catch((err) => {
      chart.hist = { error: `history: ${err?.message || err}` };
      chart.dirty = true;
    })
    .finally(() => {
      historyPending -= 1;
    });
}

async function fetchHistory(chart) {
  const r = model.range;
  if (!r || model.charts.get(chart.metric) !== chart) return;
  const perDevice = chart.devices.size <= MAX_CHART_SERIES ? 1 : 0;
  const q = new URLSearchParams({
    metric: chart.metric,
    devices: rangeDevices(),
    from: String(r.from),
    to: String(r.to),
    buckets: String(HISTORY_BUCKETS),
    per_device: String(perDevice),
  });
  const asked = r;
  try {
    let answer;
    let body;
    for (let attempt = 0; ; attempt++) {
      answer = await apiGet(`/api/history?${q}`, 60000);
      body = await answer.json();
      // other pages' queries hold the collector's two history workers: wait a little
      if (answer.status !== 503 || body?.error?.code !== "busy" || attempt >= 5) break;
      await new Promise((done) => setTimeout(done, 500 * (attempt + 1)));
    }
    if (!sameSpan(model.range, asked)) return; // another range was picked meanwhile
    chart.hist = answer.ok ? body : { error: body?.error?.message || `HTTP ${answer.status}` };
  } catch (err) {
    if (!sameSpan(model.range, asked)) return;
    chart.hist = { error: `history: ${err.message || err}` };
  }
  chart.dirty = true;
  chart.plotKey = ""; // the x range changed: a new plot
  drawCharts();
  renderRange();
}

/** The same range, or a refresh of the same "last N" span: its answers are still wanted. */
function sameSpan(a, b) {
  return a === b || (a && b && a.span && a.span === b.span);
}

/** Show a time range (null: live). The same range again (a new subscription) or a refresh
 * of the same span keeps what the charts show until the new answers come. */
function setRange(range) {
  const keep = model.range === range || sameSpan(model.range, range);
  model.range = range;
  for (const chart of model.charts.values()) {
    if (!keep) {
      chart.hist = null;
      chart.plotKey = "";
      chart.dirty = true;
    }
    if (range) loadHistory(chart);
  }
  renderRange();
  drawCharts();
}

function renderRange() {
  const r = model.range;
  setText($("charts-title"), r ? "Metrics" : "Live metrics");
  const note = $("charts-range");
  note.hidden = !r;
  if (r) {
    const loading = [...model.charts.values()].some((c) => !c.hist);
    setText(note, `${formatClock(r.from)} – ${formatClock(r.to)} (${TIME_ZONE})${loading ? " · loading…" : ""}`);
  }
}

function localInput(t) {
  const d = new Date(t * 1000 - new Date(t * 1000).getTimezoneOffset() * 60000);
  return d.toISOString().slice(0, 19);
}

function pickRange() {
  const value = $("range").value;
  $("range-custom").hidden = value !== "custom";
  if (value === "live") return setRange(null);
  if (value === "custom") {
    const now = serverNow();
    if (!$("range-from").value) $("range-from").value = localInput(now - 3600);
    if (!$("range-to").value) $("range-to").value = localInput(now);
    return;
  }
  const span = Number(value);
  const now = serverNow();
  setRange({ from: now - span, to: now, span });
}

function setupRange() {
  setText($("tz"), `times in ${TIME_ZONE}`);
  $("range").addEventListener("change", pickRange);
  $("range-go").addEventListener("click", () => {
    const from = new Date($("range-from").value).getTime() / 1000;
    const to = new Date($("range-to").value).getTime() / 1000;
    if (!(from < to)) {
      setText($("filter-status"), "the range needs a start before its end");
      return;
    }
    setRange({ from, to, span: null });
  });
  setInterval(() => {
    const r = model.range;
    if (r?.span && !document.hidden && historyPending === 0) {
      const now = serverNow();
      setRange({ from: now - r.span, to: now, span: r.span });
    }
  }, HISTORY_REFRESH_MS);
}

// -- alarms --------------------------------------------------------------------------------

const SEVERITY_RANK = { critical: 0, warning: 1, info: 2 };
const CONDITION_TEXT = { above: "above", below: "below", no_data: "no data for" };

/** An alarm stays listed while active, or until someone acknowledges it once cleared. */
function changedAt(a) {
  return Math.max(a.raised || 0, a.cleared || 0, a.acknowledged_at || 0);
}

function onAlarm(change, a, replay = false) {
  if (model.alarmsLoading && !replay) {
    if (model.alarmsLoading.length < 10000) model.alarmsLoading.push([change, a]);
  }
  if (replay) {
    const known = model.alarms.get(a.id);
    if (known && changedAt(known) > changedAt(a)) return; // the list is newer
  }
  const listed = change !== "removed" && (a.state === "active" || !a.acknowledged);
  if (listed) model.alarms.set(a.id, a);
  else model.alarms.delete(a.id);
  if (replay) {
    model.alarmsDirty = true;
    return;
  }
  if (change === "raised")
    activity(`alarm ${a.rule}: ${a.device} ${a.metric} ${CONDITION_TEXT[a.condition]} ${a.threshold}`, "bad", a.raised);
  else if (change === "cleared") activity(`alarm ${a.rule} cleared: ${a.device} ${a.metric}`, "good", a.cleared);
  model.alarmsDirty = true; // drawn with the next render (a storm of alarms is one redraw)
}

async function loadMeta() {
  try {
    const answer = await apiGet("/api/meta", 10000);
    if (!answer.ok) return;
    const body = await answer.json();
    model.declared = body.commands || [];
    for (const d of model.devices.values()) {
      if (d.detail) renderCommandForm(d, d.detail.querySelector(".cmd-form"));
    }
  } catch {
    // the next connection tries again
  }
}

async function loadAlarms() {
  model.alarmsLoading = []; // alarm messages that come while the list is on its way
  try {
    const answer = await apiGet("/api/alarms", 10000);
    if (!answer.ok) {
      model.alarmsLoading = null;
      return;
    }
    const body = await answer.json();
    // the stream keeps only the subscribed devices' alarms up to date: list only those
    const globs = readFilters().devices.map(globToRegExp);
    const shown = (a) => !globs.length || globs.some((re) => re.test(a.device));
    model.alarms = new Map(body.alarms.filter(shown).map((a) => [a.id, a]));
    const later = model.alarmsLoading || [];
    model.alarmsLoading = null;
    for (const [change, a] of later) onAlarm(change, a, true); // what is newer than the list
    renderAlarms();
  } catch {
    model.alarmsLoading = null;
    // the next connection tries again
  }
}

async function acknowledge(id, button) {
  button.disabled = true;
  try {
    const answer = await fetch(`/api/alarms/${encodeURIComponent(id)}/ack`, {
      method: "POST",
      headers: { "content-type": "application/json", ...authHeaders() },
      body: JSON.stringify({ by: "dashboard" }),
      signal: AbortSignal.timeout(10000),
    });
    const body = await answer.json().catch(() => null);
    if (answer.ok) onAlarm("acknowledged", body);
    else activity(`acknowledging ${id}: ${body?.error?.message || `HTTP ${answer.status}`}`, "bad");
  } catch (err) {
    activity(`acknowledging ${id}: ${err.message || err}`, "bad");
  } finally {
    button.disabled = !conn.canCommand;
  }
}

function renderAlarms() {
  const panel = $("alarms-panel");
  const enabled = !!conn.hello?.alarms;
  panel.hidden = !enabled;
  $("h-alarms-box").hidden = !enabled;
  if (!enabled) return;
  const alarms = [...model.alarms.values()].sort(
    (a, b) =>
      (a.state === "active" ? 0 : 1) - (b.state === "active" ? 0 : 1) ||
      (SEVERITY_RANK[a.severity] ?? 3) - (SEVERITY_RANK[b.severity] ?? 3) ||
      b.raised - a.raised,
  );
  const active = alarms.filter((a) => a.state === "active").length;
  const unacked = alarms.filter((a) => !a.acknowledged).length;
  setText($("h-alarms"), unacked ? `${active} (${unacked})` : String(active));
  $("h-alarms").classList.toggle("warn", unacked > 0);
  setText($("alarms-count"), alarms.length ? `${active} active · ${unacked} to acknowledge` : "");
  $("alarms-empty").hidden = alarms.length > 0;
  const rows = alarms.slice(0, MAX_ALARMS_SHOWN).map((a) => {
    const tr = clone("alarm-template");
    tr.dataset.alarm = a.id;
    tr.dataset.state = a.state;
    tr.dataset.acknowledged = String(a.acknowledged);
    const sev = tr.querySelector(".sev");
    sev.textContent = a.severity;
    sev.dataset.severity = a.severity;
    tr.querySelector(".a-device").textContent = a.device;
    tr.querySelector(".a-metric").textContent = a.metric;
    const threshold = a.condition === "no_data" ? `${a.threshold} s` : withUnit(numberFormat.format(a.threshold), a.metric);
    tr.querySelector(".a-condition").textContent = `${CONDITION_TEXT[a.condition]} ${threshold}`;
    tr.querySelector(".a-condition").title = `rule ${a.rule}${a.description ? `: ${a.description}` : ""}`;
    const v = a.last_value ?? a.value;
    tr.querySelector(".a-value").textContent = v == null ? "–" : withUnit(numberFormat.format(v), a.metric);
    tr.querySelector(".a-raised").textContent = formatClock(a.raised) + (a.count > 1 ? ` (×${a.count})` : "");
    const state = tr.querySelector(".a-state");
    state.textContent = a.acknowledged
      ? `${a.state}, acknowledged`
      : a.state === "active"
        ? "active"
        : "cleared, not acknowledged";
    state.title = a.acknowledged ? `by ${a.acknowledged_by || "?"} at ${formatClock(a.acknowledged_at)}` : "";
    const ack = tr.querySelector(".a-ack");
    ack.hidden = a.acknowledged;
    ack.disabled = !conn.canCommand;
    ack.title = conn.canCommand ? "acknowledge this alarm" : noCommandsWhy();
    ack.addEventListener("click", () => acknowledge(a.id, ack));
    return tr;
  });
  $("alarm-rows").replaceChildren(...rows);
}

function setupAlarms() {
  // the rows are rebuilt on every change: nothing to wire up front
}

// -- the collector's own health (GET /api/status) ------------------------------------------

async function pollStatus() {
  if (document.hidden || conn.status !== "connected") return;
  try {
    const answer = await apiGet("/api/status", 5000);
    if (!answer.ok) return;
    const status = await answer.json();
    model.statusPrev = model.status;
    model.status = status;
    renderStatus();
  } catch {
    // shown as stale by its time
  }
}

function rateOf(get) {
  const a = model.statusPrev;
  const b = model.status;
  if (!a || !b || b.time <= a.time) return null;
  const x = get(a);
  const y = get(b);
  if (x == null || y == null) return null;
  return Math.max(0, (y - x) / (b.time - a.time));
}

function sum(obj) {
  return Object.values(obj || {}).reduce((x, y) => x + y, 0);
}

function kvList(el, entries, empty) {
  const items = entries.map(([k, v, warn]) => {
    const li = document.createElement("li");
    const key = document.createElement("span");
    key.textContent = k;
    const val = document.createElement("strong");
    val.textContent = v;
    if (warn) li.className = "warn";
    li.append(key, val);
    return li;
  });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = empty;
    items.push(li);
  }
  el.replaceChildren(...items);
}

function renderStatus() {
  const s = model.status;
  if (!s) return;
  const fmtRate = (r) => (r == null ? "–" : `${numberFormat.format(r)} /s`);
  const rejected = sum(s.ingest.rejected);
  const stats = [
    ["datagrams in", fmtRate(rateOf((x) => x.ingest.datagrams_received)), "datagrams received per second"],
    ["accepted", fmtRate(rateOf((x) => x.ingest.datagrams_accepted)), `${s.ingest.datagrams_accepted} since start`],
    ["readings", fmtRate(rateOf((x) => x.ingest.readings)), `${s.ingest.readings} since start`],
    ["rejected", fmtRate(rateOf((x) => sum(x.ingest.rejected))), `${rejected} since start`, rejected > 0],
    [
      "kernel drops",
      s.ingest.kernel_drops == null ? "n/a" : String(s.ingest.kernel_drops),
      "datagrams the kernel dropped before the collector read them (receive buffer full)",
      s.ingest.kernel_drops > 0,
    ],
    ["sessions", `${s.sessions.online} / ${s.sessions.known}`, "online / known devices"],
    ["dashboards", String(s.dashboards.subscribers), `${s.dashboards.missed} updates dropped for slow ones`],
    [
      "recording",
      s.recording ? `${(s.recording.bytes / 2 ** 20).toFixed(1)} MiB` : "off",
      s.recording
        ? `${s.recording.directory}: ${s.recording.records} records, segment ${s.recording.segment}, ${s.recording.dropped} dropped, ${s.recording.write_errors} write errors`
        : "this collector does not record",
      s.recording && (s.recording.dropped > 0 || s.recording.write_errors > 0),
    ],
    ["internal errors", String(sum(s.internal_errors)), "bugs caught at an error boundary", sum(s.internal_errors) > 0],
  ];
  const dl = $("collector-stats");
  dl.replaceChildren(
    ...stats.map(([k, v, title, warn]) => {
      const div = document.createElement("div");
      div.title = title;
      const dt = document.createElement("dt");
      dt.textContent = k;
      const dd = document.createElement("dd");
      dd.textContent = v;
      if (warn) dd.className = "warn";
      div.append(dt, dd);
      return div;
    }),
  );
  const byCount = (obj) => Object.entries(obj || {}).sort((a, b) => b[1] - a[1]);
  const nonZero = (obj) => byCount(obj).filter(([, v]) => v > 0);
  kvList($("rejections"), nonZero(s.ingest.rejected).map(([k, v]) => [k, String(v), true]), "none");
  kvList($("ended"), nonZero(s.sessions.ended).map(([k, v]) => [k, String(v)]), "none");
  $("outputs-box").hidden = !s.outputs.length;
  kvList(
    $("outputs-list"),
    s.outputs.map((o) => [
      `${o.name} (${o.type})`,
      o.state ? `${o.state}${o.lag_seconds != null ? `, ${formatSeconds(o.lag_seconds)} behind` : ""}` : `${o.series ?? 0} series`,
      o.state && o.state !== "sending",
    ]),
    "none",
  );
  $("cluster-box").hidden = !s.cluster;
  if (s.cluster) {
    kvList(
      $("cluster-list"),
      [
        ["node", s.cluster.node],
        ["redis", s.cluster.redis, s.cluster.redis !== "up"],
        ["nodes", (s.cluster.nodes || []).join(", ") || "–"],
        ["nodes lost", (s.cluster.nodes_lost || []).join(", ") || "none", (s.cluster.nodes_lost || []).length > 0],
      ],
      "",
    );
  }
  setText($("health-note"), `${s.mode}, up ${formatSeconds(s.uptime)}${s.accepting ? "" : ", shutting down"}`);
}

// -- a device's sessions, on demand --------------------------------------------------------

async function loadSessions(id, detail) {
  const list = detail.querySelector(".session-list");
  try {
    const answer = await apiGet(`/api/devices/${encodeURIComponent(id)}`, 10000);
    const body = await answer.json();
    if (!answer.ok) throw new Error(body?.error?.message || `HTTP ${answer.status}`);
    const items = (body.session_history || []).slice(-20).reverse().map((h) => {
      const li = document.createElement("li");
      li.textContent = `#${h.session_id} ${h.transport} ${formatClock(h.opened)} – ${formatClock(h.closed)} (${formatSeconds(h.closed - h.opened)}) · ${h.reason}`;
      li.title = OFFLINE_REASONS[h.reason] || h.reason;
      return li;
    });
    if (!items.length) items.push(Object.assign(document.createElement("li"), { className: "muted", textContent: "none yet" }));
    list.replaceChildren(...items);
  } catch (err) {
    list.replaceChildren(Object.assign(document.createElement("li"), { className: "bad-text", textContent: String(err.message || err) }));
  }
}

// -- rendering -----------------------------------------------------------------------------

function render() {
  const now = serverNow();
  const counts = new Map();
  for (const d of model.devices.values()) {
    const k = stateKey(d);
    counts.set(k, (counts.get(k) || 0) + 1);
  }
  if (view.dirty || (view.stale && performance.now() - view.sortedAt > RESORT_MS)) layoutTable();
  for (const d of view.shown) {
    if (d.dirty) {
      d.dirty = false;
      renderRow(d, now);
    }
  }
  const online = counts.get("online") || 0;
  const total = model.devices.size;
  renderSummary(counts, total);
  if (model.alarmsDirty) {
    model.alarmsDirty = false;
    renderAlarms();
  }
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
  for (const d of view.shown) if (d.visible) renderSeen(d, now);
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
      model.units = (m.metrics || []).map((u) => ({ ...u, re: globToRegExp(u.match) }));
      loadMeta();
      if (!m.alarms) model.alarms.clear(); // with alarms: loaded with each snapshot
      renderAlarms();
      pollStatus();
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
    case "alarm":
      onAlarm(m.change, m.alarm);
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
  model.nameOrder = [];
  model.commands.clear();
  model.newestReading = 0;
  resetCharts();
  model.loading = true;
  try {
    for (const part of parts) for (const d of part.devices) applyDeviceObject(d);
  } finally {
    model.previous = null;
    model.loading = false;
    layoutTable();
    pruneCharts();
    if (model.range) setRange(model.range); // the devices may have changed: ask again
  }
  // A snapshot follows a (re)subscription or a resync after this page fell behind, when alarm
  // messages may have been dropped with the rest: the list is taken again.
  if (conn.hello?.alarms) loadAlarms();
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
  // For the fleet test (and anyone profiling): when the first complete snapshot was painted.
  if (!performance.getEntriesByName("snapshot-painted").length)
    requestAnimationFrame(() => setTimeout(() => performance.mark("snapshot-painted"), 0));
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

function setupTable() {
  for (const th of document.querySelectorAll("#device-table th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.sort;
      // names ascending first; numbers (loss, rate, last seen) and problems first
      if (view.sort === key) view.dir = -view.dir;
      else view.dir = key === "name" || key === "state" ? 1 : -1;
      view.sort = key;
      view.page = 0;
      layoutTable();
    });
  }
  $("table-find").addEventListener("input", (ev) => {
    view.find = ev.currentTarget.value;
    view.page = 0;
    layoutTable();
  });
  $("page-prev").addEventListener("click", () => {
    view.page -= 1;
    showPage();
  });
  $("page-next").addEventListener("click", () => {
    view.page += 1;
    showPage();
  });
  $("state-summary").addEventListener("click", (ev) => {
    const b = ev.target.closest("button[data-state]");
    if (!b) return;
    view.state = view.state === b.dataset.state ? "all" : b.dataset.state;
    view.page = 0;
    layoutTable();
    render();
  });
}

function setup() {
  loadFilters();
  setupTable();
  setupRange();
  setupAlarms();
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
  setInterval(pollStatus, STATUS_MS);
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
