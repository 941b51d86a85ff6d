// The dashboard page: draws the state the server sends (server-sent events, polling as a fallback).
// Every string from the fleet (device ids, details) goes in through textContent, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
const dash = (v) => (v === null || v === undefined ? "-" : v);

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? String(n) : n.toFixed(n < 10 ? 2 : n < 100 ? 1 : 0)) + " " + units[i];
}
const pct = (a) => (a === null || a === undefined ? "-" : (100 * a).toFixed(1) + "%");
function ago(s) {
  if (s === null || s === undefined) return "before start";
  if (s < 60) return s.toFixed(0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(0) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}
function duration(s) {
  if (s === null || s === undefined) return "-";
  const whole = Math.round(s);
  if (whole < 120) return whole + " s";
  return Math.floor(whole / 60) + " min " + (whole % 60) + " s";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, build) {
  const body = document.querySelector("#" + id + " tbody");
  const fresh = document.createElement("tbody");
  rows.forEach((r) => fresh.appendChild(build(r)));
  body.replaceWith(fresh);
}

function renderDevices(devices) {
  $("device-count").textContent = String(devices.length);
  fillTable("devices", devices, (d) => {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device;
    tr.dataset.online = String(d.online);
    cell(tr, d.device);
    cell(tr, d.online ? "online" : "offline", d.online ? "on" : "off");
    cell(tr, d.trains ? "training" : "inference-only");
    cell(tr, d.state);
    cell(tr, dash(d.round), "num");
    cell(tr, ago(d.last_seen_s));
    cell(tr, bytes(d.bytes_up), "num");
    cell(tr, bytes(d.bytes_down), "num");
    cell(tr, d.model_id ? d.model_id.slice(0, 8) : "-").title = d.model_id || "";
    cell(tr, dash(d.uploaded), "num");
    cell(tr, dash(d.skipped), "num");
    cell(tr, dash(d.failed), "num");
    cell(tr, dash(d.patch_refusals), "num").title = Object.entries(d.refusal_reasons || {})
      .map(([k, v]) => `${k}: ${v}`).join(", ");
    cell(tr, d.detail || "", "detail");
    return tr;
  });
}

function renderRound(round, done) {
  const p = $("round-progress");
  if (!round) {
    $("round-number").textContent = "-";
    $("round-state").textContent = done ? "training done" : "no round yet";
    return;
  }
  $("round-number").textContent = String(round.round);
  const all = round.asked > 0 && round.answered === round.asked;
  const state = done ? "training done" : !round.open ? "closed" : all ? "all answered: aggregating" : "in progress";
  $("round-state").textContent = state;
  $("round-state").className = "tag" + (round.open && !done ? " open" : "");
  $("round-answered").textContent = String(round.answered);
  $("round-asked").textContent = String(round.asked);
  $("round-left").textContent = duration(round.time_left_s);
  $("round-model").textContent = round.model_id.slice(0, 8);
  $("round-waiting").textContent = round.waiting_devices.length ? round.waiting_devices.join(", ") : "nobody";
  p.dataset.round = String(round.round);
  p.dataset.asked = String(round.asked);
  p.dataset.answered = String(round.answered);
  p.dataset.open = String(round.open);
  $("round-bar").style.width = (round.asked ? (100 * round.answered) / round.asked : 0) + "%";
}

function el(parent, name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  parent.appendChild(e);
  return e;
}

const BOX = { w: 480, h: 240, left: 56, right: 12, top: 12, bottom: 36 };

function roundAxis(svg, last, x) {
  // integer round ticks only, at most about ten of them
  const step = Math.max(1, Math.ceil(last / 10));
  for (let r = 0; r <= last; r += step) {
    el(svg, "line", { class: "axis", x1: x(r), x2: x(r), y1: BOX.h - BOX.bottom, y2: BOX.h - BOX.bottom + 4 });
    el(svg, "text", { x: x(r), y: BOX.h - BOX.bottom + 16, "text-anchor": "middle" }, String(r));
  }
  el(svg, "text", { x: (BOX.left + BOX.w - BOX.right) / 2, y: BOX.h - 4, "text-anchor": "middle" }, "round");
  el(svg, "line", { class: "axis", x1: BOX.left, x2: BOX.w - BOX.right, y1: BOX.h - BOX.bottom, y2: BOX.h - BOX.bottom });
}

function renderAccuracy(rounds) {
  const svg = $("accuracy-chart");
  svg.replaceChildren();
  const pts = rounds.filter((r) => r.accuracy !== null && r.accuracy !== undefined);
  const last = Math.max(1, ...rounds.map((r) => r.round));
  const accs = pts.map((r) => 100 * r.accuracy);
  const lo = accs.length ? Math.max(0, Math.floor(Math.min(...accs) / 10) * 10) : 0;
  const hi = accs.length ? Math.min(100, Math.ceil((Math.max(...accs) + 0.01) / 10) * 10) : 100;
  const x = (r) => BOX.left + ((BOX.w - BOX.left - BOX.right) * r) / (last + 0.5);
  const y = (a) => BOX.h - BOX.bottom - ((BOX.h - BOX.top - BOX.bottom) * (a - lo)) / (hi - lo);
  for (let a = lo; a <= hi; a += 10) {
    el(svg, "line", { class: "grid", x1: BOX.left, x2: BOX.w - BOX.right, y1: y(a), y2: y(a) });
    el(svg, "text", { x: BOX.left - 6, y: y(a) + 4, "text-anchor": "end" }, a + "%");
  }
  roundAxis(svg, last, x);
  if (pts.length) {
    el(svg, "polyline", { class: "line", points: pts.map((r) => x(r.round) + "," + y(100 * r.accuracy)).join(" ") });
  }
  pts.forEach((r) => {
    const c = el(svg, "circle", { class: "point", cx: x(r.round), cy: y(100 * r.accuracy), r: 3.5, "data-round": r.round });
    el(c, "title", {}, "round " + r.round + ": " + pct(r.accuracy));
  });
}

function renderBytes(rounds) {
  const svg = $("bytes-chart");
  svg.replaceChildren();
  const values = rounds.flatMap((r) => [r.bytes_up, r.bytes_down]).filter((v) => v > 0);
  const last = Math.max(1, ...rounds.map((r) => r.round));
  const lo = values.length ? Math.floor(Math.log10(Math.min(...values))) : 2;
  const hi = values.length ? Math.max(lo + 1, Math.ceil(Math.log10(Math.max(...values)))) : 6;
  const x = (r) => BOX.left + ((BOX.w - BOX.left - BOX.right) * r) / (last + 0.5);
  const y = (v) => BOX.h - BOX.bottom - ((BOX.h - BOX.top - BOX.bottom) * (Math.log10(v) - lo)) / (hi - lo);
  for (let e = lo; e <= hi; e++) {  // one labelled line per power of ten: a log axis that reads
    el(svg, "line", { class: "grid", x1: BOX.left, x2: BOX.w - BOX.right, y1: y(10 ** e), y2: y(10 ** e) });
    el(svg, "text", { x: BOX.left - 6, y: y(10 ** e) + 4, "text-anchor": "end" }, bytes(10 ** e));
  }
  roundAxis(svg, last, x);
  const w = Math.min(14, (BOX.w - BOX.left - BOX.right) / (3 * (last + 0.5)));
  rounds.forEach((r) => {
    [["bytes_up", "bar-up", -w], ["bytes_down", "bar-down", 0]].forEach(([key, cls, dx]) => {
      const v = r[key];
      if (!(v > 0)) return;
      const b = el(svg, "rect", { class: cls, x: x(r.round) + dx, y: y(v), width: w, height: BOX.h - BOX.bottom - y(v), "data-round": r.round });
      el(b, "title", {}, "round " + r.round + " " + (key === "bytes_up" ? "up" : "down") + ": " + bytes(v));
    });
  });
}

function renderRounds(rounds) {
  fillTable("rounds", rounds.slice().reverse(), (r) => {
    const tr = document.createElement("tr");
    const dl = r.downloads && typeof r.downloads === "object" ? dash(r.downloads.patch) + " / " + dash(r.downloads.full) : "-";
    [[r.round, "num"], [pct(r.accuracy), "num"], [dash(r.uploads), "num"], [dash(r.selected), "num"],
      [dash(r.skipped), "num"], [dash(r.missing), "num"], [bytes(r.bytes_up), "num"], [bytes(r.bytes_down), "num"],
      [dl, "num"], [r.seconds === null || r.seconds === undefined ? "-" : r.seconds.toFixed(1), "num"]]
      .forEach(([t, c]) => cell(tr, String(t), c));
    return tr;
  });
}

function renderRefusals(refusals, bad) {
  const reasons = Object.keys(refusals).sort((a, b) => refusals[b] - refusals[a]);
  fillTable("refusals", reasons.length ? reasons : [null], (k) => {
    const tr = document.createElement("tr");
    if (k === null) { cell(tr, "none"); cell(tr, "0", "num"); return tr; }
    tr.dataset.reason = k;
    cell(tr, k);
    cell(tr, String(refusals[k]), "num");
    return tr;
  });
  $("bad-messages").textContent = String(bad);
}

function render(s) {
  $("fleet").textContent = s.fleet;
  $("job").textContent = dash(s.job);
  $("coordinator").textContent = s.coordinator || "none holds the fleet";
  $("coordinator").title = s.coordinator_detail || "";
  $("link").textContent = s.connected ? "broker connected" : "broker unreachable";
  $("link").className = "link " + (s.connected ? "up" : "down");
  renderDevices(s.devices);
  renderRound(s.round, s.done);
  renderAccuracy(s.rounds);
  renderBytes(s.rounds);
  renderRounds(s.rounds);
  renderRefusals(s.refusals, s.bad_messages);
  document.body.dataset.version = String(s.version);
}

function poll() {
  fetch("/api/state", { cache: "no-store" }).then((r) => r.json()).then(render)
    .catch(() => { $("link").textContent = "dashboard unreachable"; $("link").className = "link down"; })
    .finally(() => setTimeout(poll, 2000));
}

if (window.EventSource) {
  const events = new EventSource("/api/events");
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => { $("link").textContent = "dashboard unreachable, retrying"; $("link").className = "link down"; };
} else {
  poll();
}
