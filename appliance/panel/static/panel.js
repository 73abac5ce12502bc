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
const fmtSeconds = s => s === null || s === undefined ? "—" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(2)} s`;
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

function connect() {
  if (S.events) return;
  S.events = new EventSource("/api/events");
  S.events.addEventListener("hello", () => { setLive("live"); loadState(); });
  for (const kind of ["node", "status", "plan", "download", "requests", "admission"]) {
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

// Events that arrive while the snapshot is on its way are kept and applied after it, in order.
async function loadState() {
  S.pending = S.pending || [];
  try {
    const response = await fetch("/api/state");
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    S.state = await response.json();
  } catch (e) {
    flash(`Cannot read the cluster's state: ${e.message}`);
  }
  const pending = S.pending;
  S.pending = null;
  if (S.state) {
    for (const [kind, data] of pending) apply(S.state, kind, data);
    render();
  }
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
function drawCluster(st) {
  const online = st.nodes.filter(n => n.online).length;
  $("#summary").textContent = `${online} of ${st.nodes.length} node(s) online · broker ${st.broker} · ${planSummary(st)}`;
  $("#nodes").replaceChildren(...st.nodes.map(n => nodeCard(st, n)));
  if (!st.nodes.length) $("#nodes").append(h("p", { class: "muted" }, "No node has announced itself yet."));
  $("#topology").replaceChildren(topology(st));
}

function nodeCard(st, n) {
  const s = (n.online && n.status) || {};
  const total = s.memory_total || n.memory_total;
  const free = s.memory_available !== undefined ? s.memory_available : n.memory_available;
  const shard = st.plan && st.plan.shards.find(x => x.node === n.id);
  const row = (label, value) => [h("dt", {}, label), h("dd", {}, value)];
  return h("article", { class: `card node ${n.online ? "online" : "offline"}`, "data-node-id": n.id,
                        "data-online": n.online ? "true" : "false", style: { "--node": colorOf(st, n.id) } },
    h("header", {},
      h("span", { class: "swatch" }),
      h("h3", {}, n.name || n.hostname || shortId(n.id)),
      h("span", { class: `badge ${n.online ? "ok" : "off"}` }, n.online ? "online" : "offline")),
    h("p", { class: "device" }, n.device_model || "unknown device", n.hostname ? ` · ${n.hostname}` : ""),
    h("dl", {},
      row("Memory", [n.online && total ? `${fmtBytes(total - free)} / ${fmtBytes(total)}` : "—",
                     n.online && total ? meter((total - free) / total) : null]),
      row("CPU", n.online && s.cpu_percent !== undefined ? `${s.cpu_percent.toFixed(0)} %` : "—"),
      row("SoC temp.", s.temperature !== null && s.temperature !== undefined ? `${s.temperature.toFixed(1)} °C` : "—"),
      row("Throttled", s.throttled === true ? h("span", { class: "warn" }, "yes") : s.throttled === false ? "no" : "—"),
      row("Engine", (n.shard && n.shard.engine) || n.engine || "—"),
      row("Layers", shard ? `${layerRange(shard).replace("layers ", "").replace("layer ", "")} (${shard.end - shard.start} of ${st.plan.num_layers})` : "none")),
    n.load_error ? h("p", { class: "error" }, `Load error: ${n.load_error.error}`) : null,
    h("footer", { class: "muted" }, `id ${shortId(n.id)}`));
}

// Nodes (and the coordinator) on a circle around the broker; the activation ring as arrows
// along an outer circle, in the plan's order, back to the coordinator.
function topology(st) {
  const W = 420, H = 340, cx = W / 2, cy = H / 2, R = 112, RING = 142;
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
      root.append(svg("path", { d: arc(cx, cy, RING, angle(a) + 0.14, angle(b) - 0.14), class: "ring",
                                "marker-end": "url(#arrow)" }));
    });
  }

  root.append(svg("g", { class: "broker" },
    svg("rect", { x: cx - 44, y: cy - 20, width: 88, height: 40, rx: 10 }),
    svg("text", { x: cx, y: cy - 2, "text-anchor": "middle" }, "MQTT broker"),
    svg("text", { x: cx, y: cy + 13, "text-anchor": "middle", class: "small" }, st.broker || "")));

  members.forEach((id, i) => {
    const [x, y] = at(i, R);
    const node = st.nodes.find(n => n.id === id);
    const shard = st.plan && st.plan.shards.find(s => s.node === id);
    const label = id === "coordinator" ? "coordinator" : nodeName(st, id);
    const sub = id === "coordinator" ? "API · panel" : shard ? layerRange(shard) : node && !node.online ? "offline" : "no layers";
    root.append(svg("g", { class: `member ${node && !node.online ? "down" : ""}`, "data-node-id": id },
      svg("circle", { cx: x, cy: y, r: 17, fill: id === "coordinator" ? "#444" : colorOf(st, id) }),
      svg("text", { x, y: y + 31, "text-anchor": "middle" }, label),
      svg("text", { x, y: y + 44, "text-anchor": "middle", class: "small" }, sub)));
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
  const online = st.nodes.filter(n => n.online);
  const room = online.reduce((sum, n) => sum + usable(st, n), 0);
  $("#fit-summary").textContent = `${online.length} node(s) online with ${fmtBytes(room)} usable for weights.`;
  $("#token-state").textContent = localStorage.getItem(TOKEN_KEY) ? "saved in this browser" : "not set";
  $("#catalog tbody").replaceChildren(...st.catalog.map(m => catalogRow(st, m)));
}

function catalogRow(st, m) {
  const loaded = st.model && st.model.id === m.id;
  return h("tr", { "data-model": m.id, class: loaded ? "loaded" : "" },
    h("td", {}, h("strong", {}, m.name), h("br"), h("small", { class: "muted" }, m.id)),
    h("td", {}, fmtParams(m.params)),
    h("td", {}, m.layers),
    h("td", {}, fmtBytes(m.bytes)),
    h("td", {}, m.fits ? h("span", { class: "ok" }, "✓ fits") : h("span", { class: "warn" }, "✗ too big"),
      h("br"), h("small", { class: "muted" }, `${fmtBytes(m.bytes)} of ${fmtBytes(m.usable_bytes)}`)),
    h("td", {}, downloads(st, m.id)),
    h("td", { class: "row-actions" },
      loaded ? h("span", { class: "badge ok" }, "loaded")
             : h("button", { type: "button", onclick: () => admin("/api/models/load", { model: m.id }, `Loading ${m.name}…`) }, "Load"),
      h("button", { type: "button", class: "danger",
                    onclick: () => confirm(`Delete ${m.name}'s files from every node?`)
                      && admin("/api/models/delete", { model: m.id }, `Deleted ${m.name}.`) }, "Delete")));
}

function downloads(st, modelId) {
  const rows = Object.values(st.downloads).filter(d => d.model === modelId);
  const cached = st.nodes.filter(n => (n.cached_models || []).includes(modelId));
  if (!rows.length && !cached.length) return h("span", { class: "muted" }, "—");
  return h("ul", { class: "downloads" },
    rows.map(d => h("li", { "data-node": d.node, "data-state": d.state },
      h("span", { class: "swatch", style: { background: colorOf(st, d.node) } }), `${nodeName(st, d.node)}: `,
      d.state === "downloading" ? [h("progress", { max: d.total || 1, value: d.bytes || 0 }),
        ` ${d.total ? ((100 * d.bytes) / d.total).toFixed(0) : "?"} %`,
        d.speed ? ` · ${fmtBytes(d.speed)}/s` : "", d.eta ? ` · ${Math.round(d.eta)} s left` : ""]
      : d.state === "error" ? h("span", { class: "warn" }, `error: ${d.error || "unknown"}`)
      : d.state)),
    cached.filter(n => !rows.some(d => d.node === n.id)).map(n => h("li", {}, `${nodeName(st, n.id)}: cached`)));
}

async function admin(path, body, success) {
  const token = localStorage.getItem(TOKEN_KEY);
  if (!token) {
    flash("Enter the admin token first (it is kept in this browser).");
    $("#token").focus();
    return;
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
    return;
  }
  if (!response.ok) {
    flash(errorMessage(data, response));
    return;
  }
  flash(success, "ok");
  loadState();
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
    admin("/api/models/load", { model: folder }, `Loading ${folder}…`);
  });
  $("#unload").addEventListener("click", () => admin("/api/models/unload", {}, "Model unloaded."));
  $("#replan").addEventListener("click", () => admin("/api/replan", {}, "Re-planned."));
}

// ---------------------------------------------------------------- Chat
const chat = { messages: [], controller: null };

function drawChat(st) {
  $("#summary").textContent = st.model ? planSummary(st) : "No model is loaded: load one on the Models page.";
  $("#send").disabled = !st.model || !!chat.controller;
}

function bubble(role, text = "") {
  const body = h("div", { class: "body" });
  const el = h("article", { class: `msg ${role}` }, h("header", {}, role), body);
  if (role === "user") body.textContent = text;
  $("#messages").append(el);
  el.scrollIntoView({ block: "end" });
  return body;
}

async function sendChat(e) {
  e.preventDefault();
  const prompt = $("#prompt").value.trim();
  if (!prompt || !S.state || !S.state.model || chat.controller) return;
  $("#prompt").value = "";
  chat.messages.push({ role: "user", content: prompt });
  bubble("user", prompt);
  const out = bubble("assistant");
  out.classList.add("streaming");
  chat.controller = new AbortController();
  $("#stop").disabled = false;
  render();
  let answer = "";
  try {
    const figures = await streamChat(out, text => { answer = text; });
    showFigures(figures);
  } catch (err) {
    if (err.name !== "AbortError") out.append(h("p", { class: "error" }, err.message));
  } finally {
    out.classList.remove("streaming");
    if (answer) chat.messages.push({ role: "assistant", content: answer });
    chat.controller = null;
    $("#stop").disabled = true;
    render();
  }
}

// POST with stream:true and read the server-sent chunks as they come; returns the figures.
async function streamChat(out, onText) {
  const headers = { "Content-Type": "application/json" };
  const key = $("#api-key").value.trim() || localStorage.getItem("exo.apiKey");
  if (key) { headers.Authorization = `Bearer ${key}`; localStorage.setItem("exo.apiKey", key); }
  const body = { model: S.state.model.id, messages: chat.messages, stream: true, stream_options: { include_usage: true },
                 max_tokens: Number($("#max-tokens").value) || 128, temperature: Number($("#temperature").value) };
  const started = performance.now();
  const response = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body),
                                                         signal: chat.controller.signal });
  if (!response.ok) throw new Error(errorMessage(await response.json().catch(() => null), response));
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", text = "", first = null, usage = null;
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
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        text += delta.content;
        out.dataset.chunks = (Number(out.dataset.chunks) || 0) + 1;
        onText(text);
        out.innerHTML = window.renderMarkdown(text);   // the renderer escapes everything first
        out.scrollIntoView({ block: "end" });
      }
    }
  }
  const end = performance.now(), tokens = usage ? usage.completion_tokens : null;
  return { ttft: first === null ? null : (first - started) / 1000, tokens,
           rate: tokens > 1 && first !== null && end > first ? (tokens - 1) / ((end - first) / 1000) : null };
}

function showFigures(f) {
  const el = $("#figures");
  el.dataset.ttft = f.ttft === null ? "" : f.ttft.toFixed(3);
  el.dataset.tokensPerS = f.rate === null ? "" : f.rate.toFixed(2);
  el.dataset.tokens = f.tokens === null ? "" : f.tokens;
  el.textContent = `time to first token ${fmtSeconds(f.ttft)} · ${fmtRate(f.rate)} tokens/s · ${f.tokens ?? "?"} tokens`;
}

function setupChat() {
  $("#chat-form").addEventListener("submit", sendChat);
  $("#prompt").addEventListener("keydown", e => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("#chat-form").requestSubmit(); }
  });
  $("#stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  $("#clear").addEventListener("click", () => { chat.messages = []; $("#messages").replaceChildren(); $("#figures").textContent = ""; });
  $("#api-key").value = localStorage.getItem("exo.apiKey") || "";
}

// ---------------------------------------------------------------- Requests
function drawRequests(st) {
  const a = st.admission;
  $("#admission").textContent = a ? `${a.running} running of ${a.capacity} places · ${a.waiting} waiting ` +
    `(the queue holds ${a.queue_limit}; past it a request gets 429)` : "";
  const body = $("#requests tbody");
  if (!st.requests.length) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No requests yet.")));
    return;
  }
  body.replaceChildren(...st.requests.map(r => h("tr", { "data-request-id": r.id, class: r.status },
    h("td", {}, new Date(r.created * 1000).toLocaleTimeString()),
    h("td", { title: r.id }, shortId(r.id)),
    h("td", { title: r.error || "" }, h("span", { class: `badge ${r.status === "error" ? "off" : r.status === "running" ? "run" : "ok"}` }, r.status),
      r.error ? h("small", { class: "error" }, ` ${r.error}`) : null),
    h("td", {}, r.prompt_tokens),
    h("td", {}, r.completion_tokens),
    h("td", {}, fmtSeconds(r.ttft_s)),
    h("td", {}, fmtRate(r.tokens_per_s)),
    h("td", {}, r.nodes.map(id => h("span", { class: "chip", style: { "--node": colorOf(st, id) } }, nodeName(st, id)))))));
}

// ---------------------------------------------------------------- start
({ models: setupModels, chat: setupChat }[PAGE] || (() => {}))();
document.addEventListener("visibilitychange", () => (document.hidden ? disconnect() : connect()));
connect();
