// The panel's pages. Each page fetches /api/state, draws itself from it, and follows /api/events
// (server-sent events fed from MQTT) to stay live. Plain JS, no build step, no outside requests.
"use strict";

const PAGE = document.body.dataset.page;
const PALETTE = ["#2f7de1", "#e8772e", "#2aa876", "#c9448f", "#8a63d2", "#c7a21c", "#1aa5b8", "#d64545"];
const SVG_NS = "http://www.w3.org/2000/svg";

// ---------------------------------------------------------------- little helpers
const $ = selector => document.querySelector(selector);

function h(tag, attrs = {}, ...children) {
  const el = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "style" && typeof value === "object") {
      for (const [name, v] of Object.entries(value)) el.style.setProperty(name.replace(/[A-Z]/g, c => "-" + c.toLowerCase()), v);
    }
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) el.append(child instanceof Node ? child : String(child));
  }
  return el;
}
const svg = (tag, attrs, ...children) => h("svg:" + tag, attrs, ...children);

function fmtBytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${units[i]}`;
}
const fmtParams = n => n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : `${Math.round(n / 1e6)}M`;
const fmtSeconds = s => s === null || s === undefined ? "—" : s < 0.01 ? `${(s * 1000).toFixed(1)} ms`
  : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
const fmtRate = r => r === null || r === undefined ? "—" : r.toFixed(1);
const shortId = id => String(id).slice(0, 8);
const layerRange = s => s.end - s.start === 1 ? `layer ${s.start}` : `layers ${s.start}–${s.end - 1}`;

function flash(message, kind = "error") {
  const el = $("#flash");
  el.textContent = message;
  el.className = `flash ${kind}`;
  el.hidden = !message;
}

function errorMessage(body, response) {
  const e = body && body.error;
  return (e && (e.message || (typeof e === "string" && e))) || (body && body.message)
    || `${response.status} ${response.statusText}`;
}

function meter(fraction, label) {
  const pct = Math.max(0, Math.min(1, fraction || 0)) * 100;
  return h("div", { class: "meter", role: "meter", "aria-valuenow": pct.toFixed(0), "aria-valuemin": 0,
                    "aria-valuemax": 100, title: label || `${pct.toFixed(0)}%` },
    h("span", { style: { width: `${pct}%` }, class: pct > 90 ? "hot" : "" }));
}

// ---------------------------------------------------------------- the live state
const S = { state: null, pending: null, frame: 0, events: null };

// With API keys set, the cluster's data needs one. It is kept in this browser and sent as a bearer
// token, and as a cookie for the event stream (an EventSource cannot send a header).
const KEY = "exo.apiKey";
const apiKey = () => localStorage.getItem(KEY) || "";
const withKey = (headers = {}) => apiKey() ? { ...headers, Authorization: `Bearer ${apiKey()}` } : headers;

function useKey(key) {
  localStorage.setItem(KEY, key);
  document.cookie = `exo_api_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
}

function askForKey(wrong) {
  const form = $("#key-form");
  form.hidden = false;
  flash(wrong ? "That API key was refused: the cluster's data needs one of its API keys." :
        "This cluster has API keys: enter one to see its state.");
  $("#key").focus();
}

function setupKey() {
  if (apiKey()) useKey(apiKey());   // a session cookie may be gone while the stored key is not
  $("#key-form").addEventListener("submit", e => {
    e.preventDefault();
    const key = $("#key").value.trim();
    if (!key) return;
    useKey(key);
    $("#key").value = "";
    $("#key-form").hidden = true;
    flash("");
    start();
  });
}

function connect() {
  if (S.events) return;
  S.events = new EventSource("/api/events");
  S.events.addEventListener("hello", () => { setLive("live"); loadState(); });
  for (const kind of ["node", "status", "plan", "download", "requests", "admission", "throughput"]) {
    S.events.addEventListener(kind, e => onEvent(kind, JSON.parse(e.data)));
  }
  S.events.onerror = () => setLive("reconnecting…");   // EventSource retries by itself; "hello" resyncs
}

// Each open stream holds one of the server's threads: a tab out of sight gives its stream back.
function disconnect() {
  if (S.events) S.events.close();
  S.events = null;
  setLive("paused");
}

function setLive(text) {
  const el = $("#live");
  el.textContent = text;
  el.classList.toggle("on", text === "live");
}

// The first snapshot says whether a key is needed; then the stream keeps the page live.
async function start() {
  if (await loadState()) connect();
}

// Events that arrive while the snapshot is on its way are kept and applied after it, in order.
async function loadState() {
  S.pending = S.pending || [];
  let allowed = true;
  try {
    const response = await fetch("/api/state", { headers: withKey() });
    if (response.status === 401) {
      allowed = false;
      disconnect();
      askForKey(!!apiKey());
    } else if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    else S.state = await response.json();
  } catch (e) {
    flash(`Cannot read the cluster's state: ${e.message}`);
  }
  const pending = S.pending || [];   // two loads may overlap: the first one to finish applies them
  S.pending = null;
  if (S.state) {
    for (const [kind, data] of pending) apply(S.state, kind, data);
    render();
  }
  return allowed;
}

function onEvent(kind, data) {
  if (S.pending) S.pending.push([kind, data]);
  else if (S.state) { apply(S.state, kind, data); render(); }
}

function apply(st, kind, data) {
  if (kind === "node") {
    const old = st.nodes.find(n => n.id === data.id);
    const node = { ...(old || {}), ...data, status: old ? old.status : null };
    st.nodes = [...st.nodes.filter(n => n.id !== data.id), node].sort((a, b) => a.id < b.id ? -1 : 1);
    if (PAGE === "models") setTimeout(loadState, 0);   // what fits depends on who is online
  } else if (kind === "status") {
    const node = st.nodes.find(n => n.id === data.id);
    if (node && node.online) node.status = data;
  } else if (kind === "plan") {
    const modelChanged = data.model !== (st.model && st.model.id);
    st.plan = data.plan;
    st.plan_error = data.plan_error;
    if (modelChanged) setTimeout(loadState, 0);
  } else if (kind === "download") {
    if (data.state) st.downloads[data.node] = data;
    else delete st.downloads[data.node];
  } else if (kind === "requests") {
    st.requests = data;
  } else if (kind === "admission") {
    st.admission = data;
  } else if (kind === "throughput") {
    st.throughput = data;
  }
}

function render() {
  cancelAnimationFrame(S.frame);
  S.frame = requestAnimationFrame(() => {
    const draw = { cluster: drawCluster, split: drawSplit, models: drawModels, chat: drawChat, requests: drawRequests }[PAGE];
    if (draw && S.state) draw(S.state);
    document.querySelectorAll("table.table").forEach(labelCells);
  });
}

// On a phone the tables stack each row into a card; each cell then shows its column's name.
function labelCells(table) {
  const labels = [...table.querySelectorAll("thead th")].map(th => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.cells].forEach((cell, i) => { cell.dataset.label = cell.colSpan > 1 ? "" : labels[i] || ""; });
  }
}

// Derived facts shared by the pages.
function colorOf(st, id) {
  const ids = st.nodes.map(n => n.id).sort();
  return PALETTE[Math.max(0, ids.indexOf(id)) % PALETTE.length];
}
const nodeName = (st, id) => { const n = st.nodes.find(x => x.id === id); return (n && (n.name || n.hostname)) || shortId(id); };
const usable = (st, node) => node.usable || 0;
const isReady = st => !!st.plan && st.plan.shards.every(s => {
  const node = st.nodes.find(n => n.id === s.node);
  return node && node.online && node.shard && node.shard.plan_id === st.plan.plan_id;
});

function modelLabel(st) {
  if (!st.model) return "no model loaded";
  const parts = st.model.id.split("/").filter(Boolean);
  return parts.length > 2 ? parts.slice(-2).join("/") : st.model.id;
}

function planSummary(st, withModel = true) {
  if (!st.model) return "No model is loaded.";
  if (!st.plan) return `No plan for ${modelLabel(st)}: ${st.plan_error || "waiting for nodes"}.`;
  const plan = `plan ${st.plan.plan_id} over ${st.plan.shards.length} node(s) · ${isReady(st) ? "ready" : "loading…"}`;
  return withModel ? `${modelLabel(st)} · ${plan}` : plan;
}

// ---------------------------------------------------------------- Cluster
// Nodes in the plan's order (the way activations travel), then the others by name.
function planOrder(st) {
  const order = st.plan ? st.plan.shards.map(s => s.node) : [];
  const rank = n => order.includes(n.id) ? order.indexOf(n.id) : order.length;
  return [...st.nodes].sort((a, b) => rank(a) - rank(b) || nodeName(st, a.id).localeCompare(nodeName(st, b.id)));
}

function drawCluster(st) {
  const online = st.nodes.filter(n => n.online).length;
  $("#summary").textContent = `${online} of ${st.nodes.length} node(s) online · broker ${st.broker} · ${planSummary(st)}`;
  drawThroughput(st);
  $("#nodes").replaceChildren(...planOrder(st).map(n => nodeCard(st, n)));
  if (!st.nodes.length) $("#nodes").append(h("p", { class: "muted" }, "No node has announced itself yet."));
  $("#topology").replaceChildren(topology(st));
}

function drawThroughput(st) {
  const t = st.throughput, a = st.admission;
  if (!t) return;
  $("#tps").textContent = fmtRate(t.tokens_per_s);
  $("#step").textContent = fmtSeconds(t.step_s);
  $("#hop").textContent = fmtSeconds(t.hop_s);
  $("#running").textContent = a ? `${a.running} of ${a.capacity}, ${a.waiting} waiting` : "—";
  $("#chart").replaceChildren(chart(t));
}

// The cluster's tokens/s over the last minutes: one point per bucket, newest on the right. Drawn
// at the width it is shown at, so its text keeps its size on a phone.
function chart(t) {
  const W = Math.max(280, Math.round($("#chart").clientWidth || 900)), H = 120, PAD = 40;
  const series = t.series, n = series.length;
  const top = Math.max(1, ...series);
  const x = i => PAD + ((W - PAD - 4) * i) / Math.max(1, n - 1);
  const y = v => H - 16 - ((H - 24) * v) / top;
  const line = series.map((v, i) => `${i ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
  const minutes = Math.round((n * t.bucket_s) / 60);
  return svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "data-points": n,
                      "aria-label": `tokens per second over the last ${minutes} minutes` },
    svg("line", { x1: PAD, y1: y(0), x2: W - 4, y2: y(0), class: "axis" }),
    svg("line", { x1: PAD, y1: y(top), x2: W - 4, y2: y(top), class: "grid" }),
    svg("text", { x: PAD - 4, y: y(top) + 4, "text-anchor": "end" }, top >= 10 ? Math.round(top) : fmtRate(top)),
    svg("text", { x: PAD - 4, y: y(0) + 4, "text-anchor": "end" }, "0"),
    svg("text", { x: PAD, y: H - 2 }, `${minutes} min ago`),
    svg("text", { x: W - 4, y: H - 2, "text-anchor": "end" }, "now"),
    svg("path", { d: `${line} L${x(n - 1)},${y(0)} L${x(0)},${y(0)} Z`, class: "area" }),
    svg("path", { d: line, class: "line" }));
}

function nodeCard(st, n) {
  const s = (n.online && n.status) || {};
  const total = s.memory_total || n.memory_total;
  const free = s.memory_available !== undefined ? s.memory_available : n.memory_available;
  const shard = st.plan && st.plan.shards.find(x => x.node === n.id);
  const download = st.downloads[n.id];
  const row = (label, value) => [h("dt", {}, label), h("dd", {}, value)];
  return h("article", { class: `card node ${n.online ? "online" : "offline"}`, "data-node-id": n.id,
                        "data-online": n.online ? "true" : "false", style: { "--node": colorOf(st, n.id) } },
    h("header", {},
      h("span", { class: "swatch" }),
      h("h3", {}, nodeName(st, n.id)),
      h("span", { class: `badge ${n.online ? "ok" : "off"}` }, n.online ? "online" : "offline")),
    h("p", { class: "device" }, n.device_model || "unknown device", n.hostname ? ` · ${n.hostname}` : ""),
    h("dl", {},
      row("Layers", shard ? `${layerRange(shard).replace("layers ", "").replace("layer ", "")} (${shard.end - shard.start} of ${st.plan.num_layers})` : "none"),
      row("Tokens/s", h("span", { class: "rate" }, n.online ? fmtRate(s.tokens_per_s) : "—")),
      row("Per step", n.online && s.ms_per_frame ? `${s.ms_per_frame.toFixed(1)} ms compute` : "—"),
      row("Queue", n.online && s.queue_depth !== undefined ? `${s.queue_depth} waiting · ${s.requests ?? 0} held` : "—"),
      row("Memory", [n.online && total ? `${fmtBytes(total - free)} / ${fmtBytes(total)}` : "—",
                     n.online && total ? meter((total - free) / total) : null]),
      row("CPU", n.online && s.cpu_percent !== undefined ? `${s.cpu_percent.toFixed(0)} %` : "—"),
      row("SoC temp.", s.temperature !== null && s.temperature !== undefined ? `${s.temperature.toFixed(1)} °C` : "—"),
      row("Throttled", s.throttled === true ? h("span", { class: "warn" }, "yes") : s.throttled === false ? "no" : "—"),
      row("Engine", [(n.shard && n.shard.engine) || n.engine || "—", n.quant ? ` · ${n.quant}` : ""])),
    download && download.state === "downloading" ? h("div", { class: "download" }, downloadLine(download)) : null,
    n.load_error ? h("p", { class: "error" }, `Load error: ${n.load_error.error}`) : null,
    h("footer", { class: "muted" }, `id ${shortId(n.id)}`));
}

// Nodes (and the coordinator) on a circle around the broker; the activation ring as arrows
// along an outer circle, in the plan's order, back to the coordinator. Labels sit outside the
// ring, anchored away from the centre, so they never cross an arrow or each other's circle.
function topology(st) {
  const W = 560, H = 420, cx = W / 2, cy = H / 2, R = 105, RING = 133, LABEL = 152;
  const ringIds = st.plan ? st.plan.shards.map(s => s.node) : [];
  const others = st.nodes.map(n => n.id).filter(id => !ringIds.includes(id));
  const members = ["coordinator", ...ringIds, ...others];
  const angle = i => -Math.PI / 2 + (2 * Math.PI * i) / members.length;
  const at = (i, r) => [cx + r * Math.cos(angle(i)), cy + r * Math.sin(angle(i))];

  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "topology-svg", role: "img",
                            "aria-label": "cluster topology" },
    svg("defs", {}, svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 7,
                                    markerHeight: 7, orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "currentColor" }))));

  members.forEach((id, i) => {
    const [x, y] = at(i, R);
    const node = st.nodes.find(n => n.id === id);
    root.append(svg("line", { x1: cx, y1: cy, x2: x, y2: y, class: `link ${node && !node.online ? "down" : ""}` }));
  });

  const ring = ["coordinator", ...ringIds];
  if (ringIds.length) {
    ring.forEach((id, i) => {
      const a = members.indexOf(id), b = i + 1 < ring.length ? members.indexOf(ring[i + 1]) : members.length;
      root.append(svg("path", { d: arc(cx, cy, RING, angle(a) + 0.16, angle(b) - 0.16), class: "ring",
                                "marker-end": "url(#arrow)" }));
    });
  }

  root.append(svg("g", { class: "broker" },
    svg("rect", { x: cx - 44, y: cy - 20, width: 88, height: 40, rx: 10 }),
    svg("text", { x: cx, y: cy - 2, "text-anchor": "middle" }, "MQTT broker"),
    svg("text", { x: cx, y: cy + 13, "text-anchor": "middle", class: "small" }, st.broker || "")));

  members.forEach((id, i) => {
    const [x, y] = at(i, R), [lx, ly] = at(i, LABEL);
    const node = st.nodes.find(n => n.id === id);
    const shard = st.plan && st.plan.shards.find(s => s.node === id);
    const label = id === "coordinator" ? "coordinator" : nodeName(st, id);
    const sub = id === "coordinator" ? "API · panel" : shard ? layerRange(shard) : node && !node.online ? "offline" : "no layers";
    const cos = Math.cos(angle(i)), sin = Math.sin(angle(i));
    const anchor = cos > 0.35 ? "start" : cos < -0.35 ? "end" : "middle";
    const top = sin > 0.35 ? ly + 6 : sin < -0.35 ? ly - 16 : ly - 4;   // below the ring at the bottom, above it at the top
    root.append(svg("g", { class: `member ${node && !node.online ? "down" : ""}`, "data-node-id": id },
      svg("circle", { cx: x, cy: y, r: 17, fill: id === "coordinator" ? "#444" : colorOf(st, id) }),
      svg("text", { x: lx, y: top, "text-anchor": anchor, class: "label" }, label),
      svg("text", { x: lx, y: top + 13, "text-anchor": anchor, class: "small" }, sub)));
  });
  return root;
}

function arc(cx, cy, r, a1, a2) {
  const p = a => `${(cx + r * Math.cos(a)).toFixed(1)},${(cy + r * Math.sin(a)).toFixed(1)}`;
  const large = a2 - a1 > Math.PI ? 1 : 0;
  return `M${p(a1)} A${r},${r} 0 ${large} 1 ${p(a2)}`;
}

// ---------------------------------------------------------------- Model split
function drawSplit(st) {
  $("#summary").textContent = planSummary(st);
  const bar = $("#bar"), body = $("#shares tbody");
  if (!st.plan) {
    bar.replaceChildren(h("div", { class: "seg empty" }, st.plan_error || "no plan"));
    body.replaceChildren();
    $("#bar-scale").replaceChildren();
    return;
  }
  const L = st.plan.num_layers, layerBytes = st.model ? st.model.layer_bytes : 0;
  bar.dataset.planId = st.plan.plan_id;
  bar.replaceChildren(...st.plan.shards.map(s => {
    const n = s.end - s.start;
    return h("div", { class: "seg", "data-node": s.node, "data-start": s.start, "data-end": s.end, "data-layers": n,
                      title: `${nodeName(st, s.node)}: ${layerRange(s)}`,
                      style: { flexGrow: n, background: colorOf(st, s.node) } },
      h("span", {}, `${nodeName(st, s.node)} · ${n}`));
  }));
  $("#bar-scale").replaceChildren(h("span", {}, "layer 0"), h("span", {}, `layer ${L - 1}`));
  body.replaceChildren(...st.plan.shards.map(s => {
    const node = st.nodes.find(n => n.id === s.node) || {};
    const n = s.end - s.start, weights = n * layerBytes, room = usable(st, node);
    return h("tr", { "data-node": s.node },
      h("td", {}, h("span", { class: "swatch", style: { background: colorOf(st, s.node) } }), nodeName(st, s.node)),
      h("td", {}, `${layerRange(s)} (${n})`),
      h("td", {}, `${((100 * n) / L).toFixed(0)} %`),
      h("td", {}, fmtBytes(weights)),
      h("td", {}, `${fmtBytes(weights)} of ${fmtBytes(room)}`, meter(room ? weights / room : 1)));
  }));
}

// ---------------------------------------------------------------- Models
const TOKEN_KEY = "exo.adminToken";

function drawModels(st) {
  $("#current").textContent = st.model
    ? `Loaded: ${st.model.id} · ${st.model.num_layers} layers · ${fmtBytes(st.model.total_bytes)} · ${planSummary(st, false)}`
    : "No model is loaded.";
  const online = st.nodes.filter(n => n.online), hosts = st.hosts || [];
  const room = online.reduce((sum, n) => sum + usable(st, n), 0);
  $("#fit-summary").textContent = `${online.length} node(s) online on ${hosts.length} machine(s), ` +
    `${fmtBytes(room)} usable for weights (nodes of one machine share its memory).`;
  $("#hosts").replaceChildren(...hosts.map(host => h("li", { "data-host": host.host_id },
    h("strong", {}, host.hostname || shortId(host.host_id)), `: ${fmtBytes(host.usable)} usable of `,
    `${fmtBytes(host.memory_total)} · `, host.nodes.map(id => h("span", { class: "chip", style: { "--node": colorOf(st, id) } },
      nodeName(st, id))))));
  $("#token-state").textContent = localStorage.getItem(TOKEN_KEY) ? "saved in this browser" : "not set";
  $("#catalog tbody").replaceChildren(...st.catalog.map(m => catalogRow(st, m)));
  settleLoading(st);
}

function catalogRow(st, m) {
  const loaded = st.model && st.model.id === m.id;
  const sizes = m.sizes || {};
  return h("tr", { "data-model": m.id, class: loaded ? "loaded" : "" },
    h("td", {}, h("strong", {}, m.name), h("br"), h("small", { class: "muted" }, m.id)),
    h("td", {}, fmtParams(m.params), m.active_params ? [h("br"), h("small", { class: "muted" },
      `${fmtParams(m.active_params)} active`)] : null),
    h("td", {}, m.layers),
    h("td", { class: "sizes" }, ["q4", "q8", "f16"].map(q => h("span", { "data-quant": q },
      h("small", { class: "muted" }, q), ` ${fmtBytes(sizes[q])}`)).flatMap((el, i) => i ? [h("br"), el] : [el])),
    h("td", {}, m.fits ? h("span", { class: "ok" }, "✓ fits") : h("span", { class: "warn" }, "✗ too big"),
      h("br"), h("small", { class: "muted" }, `${fmtBytes(m.needs_bytes)} of ${fmtBytes(m.usable_bytes)}`)),
    h("td", {}, downloads(st, m)),
    h("td", { class: "row-actions" },
      loaded ? h("span", { class: "badge ok" }, "loaded")
             : h("button", { type: "button", onclick: () => loadModel(m.id, m.name) }, "Load"),
      m.cached && !loaded ? h("button", { type: "button", class: "danger",
                    onclick: () => confirm(`Delete ${m.name}'s files from the coordinator's model cache?`)
                      && admin("/api/models/delete", { model: m.id }, `Deleted ${m.name}.`) }, "Delete") : null));
}

// One node's download: bytes so far of the total, rate and time left.
function downloadLine(d) {
  if (d.state === "downloading") {
    return [h("progress", { max: d.total || 1, value: d.bytes || 0 }),
      ` ${d.total ? ((100 * d.bytes) / d.total).toFixed(0) : "?"} % · ${fmtBytes(d.bytes || 0)} of ${fmtBytes(d.total)}`,
      d.speed ? ` · ${fmtBytes(d.speed)}/s` : "", d.eta ? ` · ${Math.round(d.eta)} s left` : ""];
  }
  return d.state === "error" ? h("span", { class: "warn" }, `error: ${d.error || "unknown"}`) : d.state;
}

function downloads(st, m) {
  const rows = Object.values(st.downloads).filter(d => d.model === m.id);
  if (!rows.length) return m.cached ? h("span", { class: "muted" }, "cached here") : h("span", { class: "muted" }, "—");
  return h("ul", { class: "downloads" },
    rows.map(d => h("li", { "data-node": d.node, "data-state": d.state },
      h("span", { class: "swatch", style: { background: colorOf(st, d.node) } }), `${nodeName(st, d.node)}: `, downloadLine(d))));
}

// A load answers at once (202); the nodes then download and load their layers. The banner says
// so until the plan for that model is ready, then says it is loaded and goes.
const loading = { model: null };

function loadModel(id, label) {
  loading.model = id;
  admin("/api/models/load", { model: id }, `Loading ${label}: each node fetches and loads its layers…`)
    .then(ok => { if (!ok) loading.model = null; });
}

function settleLoading(st) {
  if (!loading.model || !st.model || st.model.id !== loading.model) return;
  const failed = st.nodes.find(n => n.online && n.load_error);
  if (failed) {
    flash(`${nodeName(st, failed.id)} could not load ${loading.model}: ${failed.load_error.error}`);
    loading.model = null;
  } else if (isReady(st)) {
    flash(`Loaded ${loading.model}: ready to chat.`, "ok");
    loading.model = null;
    setTimeout(() => { if ($("#flash").classList.contains("ok")) flash(""); }, 4000);
  }
}

async function admin(path, body, success) {
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) {
    flash("Enter the admin token first (it is kept in this browser).");
    $("#token").focus();
    return false;
  }
  flash("");
  let response, data = null;
  try {
    response = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json",
                                                               Authorization: `Bearer ${token}` },
                                   body: JSON.stringify(body || {}) });
    data = await response.json().catch(() => null);
  } catch (e) {
    flash(`The request failed: ${e.message}`);
    return false;
  }
  if (!response.ok) {
    flash(errorMessage(data, response));
    return false;
  }
  flash(success, "ok");
  loadState();
  return true;
}

function setupModels() {
  $("#token-form").addEventListener("submit", e => {
    e.preventDefault();
    const value = $("#token").value.trim();
    if (value) localStorage.setItem(TOKEN_KEY, value);
    $("#token").value = "";
    render();
  });
  $("#token-forget").addEventListener("click", () => { localStorage.removeItem(TOKEN_KEY); render(); });
  $("#folder-form").addEventListener("submit", e => {
    e.preventDefault();
    const folder = $("#folder").value.trim();
    if (!folder) return flash("Type the path of a model folder on the coordinator's machine.");
    loadModel(folder, folder);
  });
  $("#unload").addEventListener("click", () => admin("/api/models/unload", {}, "Model unloaded."));
  $("#replan").addEventListener("click", () => admin("/api/replan", {}, "Re-planned."));
}

// ---------------------------------------------------------------- Chat
// The conversation is kept here; each answer streams in as Markdown (marked), sanitized (DOMPurify).
const chat = { messages: [], controller: null };
window.renderMarkdown = text => DOMPurify.sanitize(marked.parse(text, { gfm: true }));

function drawChat(st) {
  $("#summary").textContent = st.model ? planSummary(st) : "No model is loaded: load one on the Models page.";
  const busy = !!chat.controller;
  $("#send").disabled = !st.model || busy;
  $("#regenerate").disabled = !st.model || busy || !chat.messages.some(m => m.role === "user");
}

function bubble(role, text = "") {
  const body = h("div", { class: "body" });
  const el = h("article", { class: `msg ${role}` }, h("header", {}, role), body);
  if (role === "user") body.textContent = text;
  $("#messages").append(el);
  el.scrollIntoView({ block: "end" });
  return body;
}

// Copy the answer's text (its Markdown source), and say when the answer was cut at max tokens.
function finishBubble(out, text, finish) {
  const article = out.parentElement;
  if (finish === "length") {
    article.append(h("p", { class: "cut", title: "finish_reason: length" },
      "✂ cut at max tokens: raise max tokens in the settings, or Regenerate"));
  }
  if (text) {
    const copy = h("button", { type: "button", class: "copy", title: "copy the answer's text" }, "Copy");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(text);
        copy.textContent = "Copied";
      } catch (e) {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => { copy.textContent = "Copy"; }, 1500);
    });
    article.append(h("div", { class: "msg-actions" }, copy));
  }
  article.dataset.finish = finish || "";
}

async function ask() {
  const out = bubble("assistant");
  out.classList.add("streaming");
  chat.controller = new AbortController();
  $("#stop").disabled = false;
  render();
  let answer = "", finish = null;
  try {
    const figures = await streamChat(out, text => { answer = text; });
    finish = figures.finish;
    showFigures(figures);
  } catch (err) {
    if (err.name === "AbortError") finish = "stopped";
    else out.append(h("p", { class: "error" }, err.message));
  } finally {
    out.classList.remove("streaming");
    if (answer) chat.messages.push({ role: "assistant", content: answer });
    finishBubble(out, answer, finish);
    chat.controller = null;
    $("#stop").disabled = true;
    render();
  }
}

function sendChat(e) {
  e.preventDefault();
  const prompt = $("#prompt").value.trim();
  if (!prompt || !S.state || !S.state.model || chat.controller) return;
  $("#prompt").value = "";
  chat.messages.push({ role: "user", content: prompt });
  bubble("user", prompt);
  ask();
}

// Ask again for the last answer: drop it (and its bubble), keep the question.
function regenerate() {
  if (chat.controller) return;
  while (chat.messages.length && chat.messages[chat.messages.length - 1].role === "assistant") chat.messages.pop();
  const bubbles = [...document.querySelectorAll("#messages .msg")];
  while (bubbles.length && !bubbles[bubbles.length - 1].classList.contains("user")) bubbles.pop().remove();
  if (chat.messages.length) ask();
}

function requestBody() {
  const system = $("#system").value.trim();
  const number = (id, parse) => { const v = $(id).value.trim(); return v === "" ? undefined : parse(v); };
  return {
    model: S.state.model.id, stream: true, stream_options: { include_usage: true },
    messages: [...(system ? [{ role: "system", content: system }] : []), ...chat.messages],
    max_tokens: number("#max-tokens", Number) || 256, temperature: number("#temperature", Number),
    top_p: number("#top-p", Number), seed: number("#seed", v => parseInt(v, 10)),
  };
}

// POST with stream:true and read the server-sent chunks as they come; returns the figures.
async function streamChat(out, onText) {
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", { method: "POST", body: JSON.stringify(requestBody()),
                                                         headers: withKey({ "Content-Type": "application/json" }),
                                                         signal: chat.controller.signal });
  if (!response.ok) throw new Error(errorMessage(await response.json().catch(() => null), response));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", first = null, usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trim()).join("");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the cluster failed mid-answer");
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (choice && choice.delta && choice.delta.content) {
        if (first === null) first = performance.now();
        text += choice.delta.content;
        out.dataset.chunks = (Number(out.dataset.chunks) || 0) + 1;
        onText(text);
        out.innerHTML = window.renderMarkdown(text);   // sanitized: a model's output cannot run code here
        out.scrollIntoView({ block: "end" });
      }
    }
  }
  const end = performance.now(), tokens = usage ? usage.completion_tokens : null;
  return { ttft: first === null ? null : (first - started) / 1000, tokens, finish,
           rate: tokens > 1 && first !== null && end > first ? (tokens - 1) / ((end - first) / 1000) : null };
}

function showFigures(f) {
  const el = $("#figures");
  el.dataset.ttft = f.ttft === null ? "" : f.ttft.toFixed(3);
  el.dataset.tokensPerS = f.rate === null ? "" : f.rate.toFixed(2);
  el.dataset.tokens = f.tokens === null ? "" : f.tokens;
  el.dataset.finish = f.finish || "";
  el.textContent = `time to first token ${fmtSeconds(f.ttft)} · ${fmtRate(f.rate)} tokens/s · ${f.tokens ?? "?"} tokens`;
}

const CHAT_SETTINGS = ["system", "max-tokens", "temperature", "top-p", "seed"];

function setupChat() {
  $("#chat-form").addEventListener("submit", sendChat);
  $("#prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#regenerate").addEventListener("click", regenerate);
  $("#clear").addEventListener("click", () => { chat.messages = []; $("#messages").replaceChildren(); $("#figures").textContent = ""; render(); });
  for (const id of CHAT_SETTINGS) {   // the settings stay from one visit to the next
    const saved = localStorage.getItem(`exo.chat.${id}`);
    if (saved !== null) $(`#${id}`).value = saved;
    $(`#${id}`).addEventListener("change", () => localStorage.setItem(`exo.chat.${id}`, $(`#${id}`).value));
  }
}

// ---------------------------------------------------------------- Requests
function drawRequests(st) {
  const a = st.admission;
  $("#admission").textContent = a ? `${a.running} running of ${a.capacity} places · ${a.waiting} waiting ` +
    `(the queue holds ${a.queue_limit}; past it a request gets 429)` : "";
  const body = $("#requests tbody");
  if (!st.requests.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "No requests yet.")));
    return;
  }
  body.replaceChildren(...st.requests.map(r => h("tr", { "data-request-id": r.id, class: `${r.status} clickable`,
                                                       tabindex: 0, title: "details", onclick: () => showRequest(r.id),
                                                       onkeydown: e => e.key === "Enter" && showRequest(r.id) },
    h("td", {}, new Date(r.created * 1000).toLocaleTimeString()),
    h("td", {}, r.endpoint ? r.endpoint.replace("/v1/", "") : "—"),
    h("td", { title: r.error || "" }, h("span", { class: `badge ${r.status === "error" ? "off" : r.status === "running" ? "run" : "ok"}` }, r.status),
      r.error ? h("small", { class: "error" }, ` ${r.error}`) : null),
    h("td", {}, r.finish_reason === "length" ? h("span", { class: "warn", title: "cut at max_tokens" }, "length") : r.finish_reason || "—"),
    h("td", {}, fmtSeconds(r.duration_s)),
    h("td", {}, r.prompt_tokens),
    h("td", {}, r.completion_tokens),
    h("td", {}, fmtSeconds(r.ttft_s)),
    h("td", {}, fmtRate(r.tokens_per_s)),
    h("td", {}, r.nodes.map(id => h("span", { class: "chip", style: { "--node": colorOf(st, id) } }, nodeName(st, id)))))));
  if ($("#detail").open) showRequest($("#detail").dataset.requestId);
}

function showRequest(id) {
  const st = S.state, r = st && st.requests.find(x => x.id === id);
  if (!r) return;
  const dialog = $("#detail");
  dialog.dataset.requestId = id;
  $("#detail-id").textContent = shortId(id);
  const sampling = r.sampling || {};
  const rows = [
    ["id", r.id], ["model", r.model], ["endpoint", r.endpoint || "—"], ["arrived", new Date(r.created * 1000).toLocaleString()],
    ["status", r.status], ["finish reason", r.finish_reason || "—"], ["error", r.error || "—"],
    ["duration", fmtSeconds(r.duration_s)], ["time to first token", fmtSeconds(r.ttft_s)],
    ["tokens/s", fmtRate(r.tokens_per_s)], ["prompt tokens", r.prompt_tokens],
    ["completion tokens", `${r.completion_tokens} of at most ${r.max_tokens || "?"}`],
    ["sampling", `temperature ${sampling.temperature ?? "—"} · top_p ${sampling.top_p ?? "—"} · top_k ${sampling.top_k ?? "—"} · seed ${sampling.seed ?? "—"}`],
    ["resumed", `${r.resumes} time(s)`], ["nodes", r.nodes.map(n => nodeName(st, n)).join(" → ") || "—"],
  ];
  $("#detail-fields").replaceChildren(...rows.flatMap(([k, v]) => [h("dt", {}, k), h("dd", { "data-field": k }, String(v))]));
  if (!dialog.open) dialog.showModal();
}

function setupRequests() {
  $("#detail").addEventListener("click", e => { if (e.target === $("#detail")) $("#detail").close(); });   // a click outside
}

// ---------------------------------------------------------------- start
setupKey();
({ models: setupModels, chat: setupChat, requests: setupRequests }[PAGE] || (() => {}))();
document.addEventListener("visibilitychange", () => (document.hidden ? disconnect() : $("#key-form").hidden && connect()));
start();
