// Aftermath dashboard: polls /api/dashboard every second and renders it. No libraries; charts are plain SVG.
"use strict";

const POLL_MS = 1000;
const COLORS = ["#2563eb", "#dc6803", "#079455", "#c11574", "#6941c6", "#0e9384", "#b42318", "#475467"];
// Tiers' validation losses often coincide (on a fresh run they all are ~ln(vocab)): each tier also gets its own
// hollow marker shape and dash pattern, so lines drawn on top of each other stay visible.
const MARKERS = ["circle", "square", "diamond", "triangle"];
const DASHES = ["6 4", "2 3", "10 3 2 3", "1 4"];
const SVG_NS = "http://www.w3.org/2000/svg";
const LEGEND_PX = 22;
let last = null;        // the last snapshot received
let failingSince = null; // when the coordinator stopped answering
const keyIndex = {};    // series key (a tier label) -> index of its colour, marker and dash, stable across updates

function $(id) { return document.getElementById(id); }
function indexOf(key) {
  if (!(key in keyIndex)) keyIndex[key] = Object.keys(keyIndex).length;
  return keyIndex[key];
}
function color(key) { return COLORS[indexOf(key) % COLORS.length]; }
function markerOf(key) { return MARKERS[indexOf(key) % MARKERS.length]; }
function dashOf(key) { return DASHES[indexOf(key) % DASHES.length]; }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function svg(tag, attrs) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}
function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0; n = Number(n);
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}
// Memory in binary units, as the OS and devices count it; "—" until the client has reported it.
function memory(n) {
  if (!n) return "—";
  const mib = n / 2 ** 20;
  return mib < 1024 ? mib.toFixed(1) + " MiB" : (mib / 1024).toFixed(2) + " GiB";
}
function num(n, digits) { return n === null || n === undefined ? "-" : Number(n).toFixed(digits); }
function int(n) { return n === null || n === undefined ? "-" : Number(n).toLocaleString("en-US"); }
function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
function clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }
// A value of an event's detail as text: clock times, seconds to 0.1 s, other fractions (losses) to 4 decimals.
function detailText(key, v) {
  if (typeof v === "number") {
    if (/(^|_)time$|_at$/.test(key) && v > 1e9) return clock(v);
    if (/(^|_)seconds$|_s$/.test(key)) return v.toFixed(1) + " s";
    return Number.isInteger(v) ? String(v) : v.toFixed(4);
  }
  if (Array.isArray(v)) return "[" + v.map(x => detailText(key, x)).join(", ") + "]";
  if (v !== null && typeof v === "object") {
    return "{" + Object.entries(v).map(([k, x]) => `${k}: ${detailText(k, x)}`).join(", ") + "}";
  }
  return String(v);
}
function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

// ------------------------------------------------------------------------------------------ charts
// Axis ticks at 1, 2 or 5 x 10^k covering [lo, hi], and the decimals that step needs, so labels never repeat
// however small the range (a fresh run's losses differ in the third decimal). `integer`: steps of at least 1.
function niceTicks(lo, hi, count, integer) {
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map(f => f * mag).find(s => s >= raw * (1 - 1e-9));
  if (integer) step = Math.max(step, 1);
  const first = Math.floor(lo / step + 1e-9), lastTick = Math.ceil(hi / step - 1e-9);
  const values = [];
  for (let i = first; i <= lastTick; i++) values.push(i * step);
  return {values, decimals: Math.max(0, -Math.floor(Math.log10(step) + 1e-9))};
}

// A hollow marker. Circle, square and diamond nest inside each other, so where tiers coincide every outline
// stays visible.
function marker(shape, x, y, c) {
  const attrs = {class: "marker", "data-shape": shape, fill: "none", stroke: c, "stroke-width": 1.5};
  if (shape === "circle") return svg("circle", {...attrs, cx: x, cy: y, r: 2.5});
  if (shape === "square") return svg("rect", {...attrs, x: x - 4, y: y - 4, width: 8, height: 8});
  const d = shape === "diamond" ? `M${x},${y - 11} L${x + 11},${y} L${x},${y + 11} L${x - 11},${y} Z`
                                : `M${x},${y - 12} L${x + 11},${y + 7} L${x - 11},${y + 7} Z`;
  return svg("path", {...attrs, d});
}

// series: [{label, key, points: [[x, y], ...], dashed, dots, bars}]; key (default label) picks the colour, the
// dash pattern of a dashed series and the marker shape of a series with dots, so a tier looks the same everywhere.
function lineChart(container, series, opts) {
  opts = opts || {};
  // the legend takes LEGEND_PX below the chart; the viewBox has the drawn size, so markers keep their shape
  const w = container.clientWidth || 600, h = (container.clientHeight || 262) - LEGEND_PX;
  const m = {l: opts.marginLeft || 58, r: 12, t: 10, b: 30};
  const root = svg("svg", {viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img",
                           "aria-label": opts.title || "chart", "data-points": 0});
  root.style.height = h + "px";
  const all = series.flatMap(s => s.points);
  if (all.length === 0) {
    const t = svg("text", {x: w / 2, y: h / 2, "text-anchor": "middle", class: "empty"});
    t.textContent = opts.empty || "waiting for data";
    root.appendChild(t);
    container.replaceChildren(root);
    return;
  }
  const bars = series.some(s => s.bars);  // bars need half a step of room on each side
  let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
  let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
  if (opts.zeroBased) y0 = 0;
  if (bars) { x0 -= 0.5; x1 += 0.5; }
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (opts.zeroBased) {
    y1 = Math.max(y1, 1);  // all zero: still an axis
  } else {
    // a near-constant series gets a span of 0.1% of its value: float noise is not blown up into a slope
    const span = 1e-3 * Math.max(1, Math.abs(y1));
    if (y1 - y0 < span) { const mid = (y0 + y1) / 2; y0 = mid - span / 2; y1 = mid + span / 2; }
  }
  const pad = (y1 - y0) * 0.06; if (!opts.zeroBased) y0 -= pad; y1 += pad;
  const yTicks = niceTicks(y0, y1, 4, opts.integer);
  y0 = yTicks.values[0]; y1 = yTicks.values[yTicks.values.length - 1];  // the axis ends on ticks
  const X = x => m.l + (x - x0) / (x1 - x0) * (w - m.l - m.r);
  const Y = y => h - m.b - (y - y0) / (y1 - y0) * (h - m.t - m.b);
  for (const v of yTicks.values) {  // horizontal grid with labels
    const y = Y(v);
    root.appendChild(svg("line", {x1: m.l, x2: w - m.r, y1: y, y2: y, class: "gridline"}));
    const t = svg("text", {x: m.l - 6, y: y + 4, "text-anchor": "end", class: "y-tick"});
    t.textContent = opts.yFormat ? opts.yFormat(v) : v.toFixed(yTicks.decimals);
    root.appendChild(t);
  }
  const xStep = Math.max(1, Math.ceil((x1 - x0) / 8));  // x is a step: whole numbers, at most 9 labels
  for (let v = Math.ceil(x0 / xStep) * xStep; v <= x1; v += xStep) {
    const t = svg("text", {x: X(v), y: h - m.b + 16, "text-anchor": "middle"});
    t.textContent = v;
    root.appendChild(t);
  }
  root.appendChild(svg("line", {x1: m.l, x2: m.l, y1: m.t, y2: h - m.b, class: "axis"}));
  root.appendChild(svg("line", {x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b, class: "axis"}));
  const xl = svg("text", {x: w - m.r, y: h - 4, "text-anchor": "end"}); xl.textContent = opts.xLabel || "step";
  root.appendChild(xl);
  let count = 0;
  const legend = el("div", {class: "legend"});
  for (const s of series) {
    const key = s.key || s.label, c = color(key);
    const dash = s.dashed ? dashOf(key) : "none", shape = s.dots ? markerOf(key) : "";
    const pts = s.points.slice().sort((a, b) => a[0] - b[0]);
    count += pts.length;
    const g = svg("g", {class: "series", "data-label": s.label, "data-points": pts.length});
    if (s.bars) {
      const bw = Math.max(2, (X(1) - X(0)) * 0.7);
      for (const [x, y] of pts) {
        g.appendChild(svg("rect", {x: X(x) - bw / 2, y: Y(y), width: bw, height: Math.max(0, Y(y0) - Y(y)), fill: c}));
      }
    } else {
      if (pts.length > 1) {
        const d = pts.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join(" ");
        g.appendChild(svg("path", {d, fill: "none", stroke: c, "stroke-width": 2, "stroke-dasharray": dash}));
      }
      for (const [x, y] of pts) {
        if (shape) g.appendChild(marker(shape, X(x), Y(y), c));
        else if (pts.length === 1) g.appendChild(svg("circle", {cx: X(x), cy: Y(y), r: 2.5, fill: c}));  // no line
      }
    }
    const title = svg("title"); title.textContent = s.label; g.appendChild(title);
    root.appendChild(g);

    // legend swatch: the series' line, dash and marker
    const item = el("span", {class: "legend-item", "data-label": s.label, "data-marker": shape});
    const sw = svg("svg", {viewBox: "0 0 32 24"});  // drawn at 3/4 size (dashboard.css)
    sw.appendChild(s.bars ? svg("rect", {x: 4, y: 6, width: 24, height: 12, fill: c})
                          : svg("line", {x1: 0, x2: 32, y1: 12, y2: 12, stroke: c, "stroke-width": 2,
                                         "stroke-dasharray": dash}));
    if (shape) sw.appendChild(marker(shape, 16, 12, c));
    item.appendChild(sw); item.appendChild(document.createTextNode(s.label));
    legend.appendChild(item);
  }
  root.setAttribute("data-points", count);
  container.replaceChildren(root, legend);
}

// ------------------------------------------------------------------------------------------ rendering
function render(d) {
  const r = d.round;
  $("run-id").textContent = d.run_id;
  $("phase").textContent = r.finished ? "Finished" : r.phase;
  $("step").textContent = r.step;
  $("total-steps").textContent = r.total_steps;
  $("epoch").textContent = r.epoch;
  $("eta").textContent = r.finished ? "done" : duration(r.eta_s);
  $("paused-badge").classList.toggle("hidden", !r.paused);
  $("r-phase").textContent = r.phase + (r.paused ? " (paused: no new round starts)" : "");
  $("r-deadline").textContent = r.seconds_left === null ? "-" : num(r.seconds_left, 1) + " s";
  $("r-step").textContent = r.round_step === null ? "-" : r.round_step;
  $("r-in").textContent = `${r.results_in.length} / ${r.assigned.length}`;
  $("r-missing").textContent = r.missing.length ? r.missing.join(", ") : "none";
  $("r-tps").textContent = int(r.tokens_per_step);
  $("r-total").textContent = int(r.tokens_total);
  $("r-spr").textContent = num(r.seconds_per_round, 2);

  const train = Object.entries(d.loss.train).map(([label, pts]) => ({label: label + " train", key: label, points: pts}));
  const val = Object.entries(d.loss.val).map(([label, pts]) => ({label: label + " validation", key: label,
                                                                 points: pts, dashed: true, dots: true}));
  lineChart($("chart-loss"), train.concat(val), {title: "loss per tier"});
  // nested validation: x = the step each checkpoint holds, one line per tier width
  const nested = Object.entries(d.loss.val).map(([label, pts]) => ({label, points: pts, dashed: true, dots: true}));
  lineChart($("chart-val"), nested, {title: "validation loss per tier", empty: "no checkpoint evaluated yet"});
  const worse = d.regressions || [];
  $("val-warnings").textContent = worse.map(w => "warning: " + w).join(" ");
  $("val-warnings").classList.toggle("hidden", !worse.length);

  const bw = d.bandwidth.map(b => [b.step, b.payload_bytes]);
  lineChart($("chart-bandwidth"), [{label: "payload bytes", points: bw, bars: true}],
            {title: "bytes per round", zeroBased: true, integer: true, marginLeft: 74, yFormat: v => bytes(v), empty: "no round applied yet"});
  const lastBw = d.bandwidth[d.bandwidth.length - 1];
  $("ratio").textContent = lastBw && lastBw.ratio ? `compression vs dense fp32 updates: ${lastBw.ratio}x ` +
    `(${bytes(lastBw.payload_bytes)} instead of ${bytes(lastBw.dense_bytes)} in step ${lastBw.step})` : "compression ratio: -";

  fillRows($("peers").tBodies[0], d.peers.map(p => {
    const tr = el("tr", {"data-peer-id": p.id, "data-tier": p.tier === null ? "" : p.tier});
    tr.appendChild(el("td", {class: "peer-id"}, p.id));
    tr.appendChild(el("td", {class: "tier"}, p.tier === null ? p.spec : p.tier));
    tr.appendChild(el("td", {}, p.device));
    tr.appendChild(el("td", {class: "num peak-memory"}, memory(p.peak_memory)));
    tr.appendChild(el("td", {class: "state state-" + p.state}, p.state));
    tr.appendChild(el("td", {class: "num"}, num(p.loss, 3)));
    tr.appendChild(el("td", {class: "num"}, num(p.tokens_per_s, 1)));
    tr.appendChild(el("td", {class: "num"}, bytes(p.bytes_up)));
    tr.appendChild(el("td", {class: "num"}, bytes(p.bytes_down)));
    tr.appendChild(el("td", {class: "num rounds"}, p.rounds));
    tr.appendChild(el("td", {class: "num"}, num(p.last_seen_s, 1) + " s ago"));
    return tr;
  }));

  fillRows($("events"), d.events.map(e => {
    const li = el("li");
    li.appendChild(el("span", {class: "dim"}, clock(e.time) + " "));
    li.appendChild(el("span", {class: "kind k-" + e.kind}, e.kind));
    const det = Object.entries(e.detail).map(([k, v]) => `${k}=${detailText(k, v)}`);
    li.appendChild(document.createTextNode(det.join(" ")));
    return li;
  }));

  fillRows($("checkpoints").tBodies[0], d.checkpoints.slice().reverse().map(c => {
    const tr = el("tr", {"data-epoch": c.epoch});
    tr.appendChild(el("td", {}, c.epoch < 0 ? "initial" : c.epoch));
    tr.appendChild(el("td", {}, c.step));
    tr.appendChild(el("td", {}, Object.entries(c.val_loss).map(([k, v]) => `${k} ${num(v, 3)}`).join(" · ")));
    tr.appendChild(el("td", {class: "hash"}, Object.entries(c.weights_sha256).map(([k, v]) => `${k} ${v.slice(0, 10)}`).join(" · ")));
    tr.appendChild(el("td", {class: "num"}, c.seconds === null ? "-" : num(c.seconds, 2) + " s"));
    return tr;
  }));
  const ck = d.checkpoint;
  $("ckpt-title").textContent = ck ? `epoch ${ck.epoch < 0 ? "initial" : ck.epoch}, step ${ck.step}` : "(none yet)";
  fillRows($("ckpt-files").tBodies[0], ck ? ck.tiers.map(t => {
    const tr = el("tr");
    const model = t.files.find(f => f.path.endsWith("model.safetensors"));
    tr.appendChild(el("td", {}, t.name));
    tr.appendChild(el("td", {}, t.files.map(f => f.path).join(", ")));
    tr.appendChild(el("td", {class: "num"}, bytes(t.bytes)));
    tr.appendChild(el("td", {class: "hash"}, model && model.sha256 ? model.sha256.slice(0, 24) + "…" : "-"));
    return tr;
  }) : []);
  fillRows($("samples"), ck && ck.samples ? Object.entries(ck.samples).map(([name, text]) => {
    const div = el("div");
    div.appendChild(el("b", {}, name));
    div.appendChild(el("pre", {class: "sample"}, text));
    return div;
  }) : [el("p", {class: "dim"}, "samples appear once a checkpoint with a tokenizer is written")]);

  $("pause-btn").disabled = !d.admin.enabled;
  $("resume-btn").disabled = !d.admin.enabled;
  $("updated").textContent = new Date().toLocaleTimeString();
}

function showBanner() {
  const b = $("banner");
  if (failingSince === null) { b.classList.add("hidden"); return; }
  const finished = last && last.round.finished;
  b.classList.toggle("finished", !!finished);
  b.textContent = finished
    ? "The run has finished and the coordinator has stopped; this page shows its last state."
    : `Coordinator unreachable since ${failingSince.toLocaleTimeString()}: retrying every second ` +
      "(the numbers below are the last ones received).";
  b.classList.remove("hidden");
}

async function poll() {
  try {
    const resp = await fetch("/api/dashboard", {cache: "no-store"});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    const data = await resp.json();
    last = data;
    failingSince = null;
    render(data);
  } catch (err) {
    if (failingSince === null) failingSince = new Date();
  }
  showBanner();
  setTimeout(poll, POLL_MS);
}

// ------------------------------------------------------------------------------------------ admin
async function admin(action) {
  const token = $("admin-token").value.trim();
  if (!token) { $("admin-msg").textContent = "enter the admin token first"; return; }
  sessionStorage.setItem("aftermath-admin", token);
  try {
    const resp = await fetch("/api/" + action, {method: "POST", headers: {Authorization: "Bearer " + token}});
    const body = await resp.json();
    $("admin-msg").textContent = resp.ok ? (action === "pause" ? "paused" : "resumed") : body.error;
  } catch (err) {
    $("admin-msg").textContent = "the coordinator did not answer";
  }
}

function init() {
  // the testnet prints the address as http://HOST:PORT/#admin=TOKEN; the fragment never leaves the browser
  const m = location.hash.match(/admin=([^&]+)/);
  $("admin-token").value = m ? decodeURIComponent(m[1]) : (sessionStorage.getItem("aftermath-admin") || "");
  $("pause-btn").addEventListener("click", () => admin("pause"));
  $("resume-btn").addEventListener("click", () => admin("resume"));
  poll();
}
init();
