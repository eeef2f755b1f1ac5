// rtsc web: one card per scanner, redrawn from the card messages of the /ws websocket.
"use strict";

const COLORS = ["#d62728", "#2ca02c", "#1f77b4"];
const cards = new Map();
const shown = new Map();  // scanner -> the card data drawn last
// A card whose width changed (another card came, the window was resized) is drawn again.
const resized = new ResizeObserver(entries => {
  for (const entry of entries) {
    const data = shown.get(entry.target.dataset.scanner);
    if (data) render(data);
  }
});

function fmt(value, digits) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

function el(card, selector) { return card.querySelector(selector); }

function text(card, selector, value) {
  const node = el(card, selector);
  if (node.textContent !== value) node.textContent = value;
}

// A line plot on a canvas: lines = [{values, color}], x = volume indices; null is a gap.
function plot(canvas, x, lines, hline) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
  if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  let lo = Infinity, hi = -Infinity;
  for (const line of lines) for (const v of line.values) if (v !== null) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (hline !== undefined) { lo = Math.min(lo, hline); hi = Math.max(hi, hline); }
  if (!isFinite(lo)) { lo = 0; hi = 1; }
  if (hi - lo < 1e-6) { hi += 0.5; lo -= 0.5; }
  const pad = 0.05 * (hi - lo); lo -= pad; hi += pad;
  const left = 44, right = width - 4, top = 4, bottom = height - 14;
  const x0 = x.length ? x[0] : 0, x1 = x.length > 1 ? x[x.length - 1] : x0 + 1;
  const sx = i => left + (right - left) * (i - x0) / Math.max(1, x1 - x0);
  const sy = v => bottom - (bottom - top) * (v - lo) / (hi - lo);
  ctx.strokeStyle = "#ccc"; ctx.lineWidth = 1;
  ctx.strokeRect(left, top, right - left, bottom - top);
  ctx.fillStyle = "#555"; ctx.font = "10px sans-serif"; ctx.textAlign = "right";
  ctx.fillText(hi.toPrecision(3), left - 3, top + 9);
  ctx.fillText(lo.toPrecision(3), left - 3, bottom);
  ctx.textAlign = "left"; ctx.fillText(String(x0), left, height - 2);
  ctx.textAlign = "right"; ctx.fillText(String(x1), right, height - 2);
  if (hline !== undefined) {
    ctx.strokeStyle = "#999"; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(left, sy(hline)); ctx.lineTo(right, sy(hline)); ctx.stroke();
    ctx.setLineDash([]);
  }
  for (const line of lines) {
    ctx.strokeStyle = line.color; ctx.lineWidth = 1.3; ctx.beginPath();
    let pen = false;
    line.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      if (pen) ctx.lineTo(sx(x[i]), sy(v)); else ctx.moveTo(sx(x[i]), sy(v));
      pen = true;
    });
    ctx.stroke();
  }
}

function cardFor(name) {
  let card = cards.get(name);
  if (!card) {
    card = document.getElementById("card-template").content.firstElementChild.cloneNode(true);
    card.dataset.scanner = name;
    card.id = "scanner-" + name;
    text(card, ".scanner", name);
    document.getElementById("cards").appendChild(card);
    cards.set(name, card);
    resized.observe(card);
  }
  return card;
}

function render(data) {
  const card = cardFor(data.name);
  shown.set(data.name, data);
  const start = data.start || {}, last = data.last || {}, traces = data.traces;
  if (data.series === null) {
    text(card, ".status", "waiting for a series");
  } else {
    text(card, ".status", data.ended ? "ended" : "acquiring");
  }
  text(card, ".series", data.series === null ? "" :
       `series ${start.series_number ?? "?"} ${start.description ?? ""} (${data.series})`);
  text(card, ".volume-number", data.last_index === null ? "-" : String(data.last_index + 1));
  text(card, ".volume-total", data.n_expected === null ? "?" : String(data.n_expected));
  card.dataset.index = data.last_index === null ? "" : String(data.last_index);
  text(card, ".latency", last.latency_ms === null ? "" : `latency ${fmt(last.latency_ms, 0)} ms`);
  text(card, ".values", data.series === null ? "" :
       `FD ${fmt(last.fd, 2)} mm, DVARS ${fmt(last.std_dvars ?? last.dvars, 2)}, tSNR ${fmt(last.tsnr, 1)}`
       + sitePercentiles(last.site_percentiles));
  const verdict = el(card, ".verdict");
  const v = data.end ? data.end.verdict : null;
  verdict.className = "verdict" + (v ? " " + v : "");
  text(card, ".verdict", v ? v.toUpperCase() : "");
  verdict.title = data.end && data.end.verdict_reasons ? JSON.stringify(data.end.verdict_reasons) : "";

  const x = traces.index;
  plot(el(card, ".trans"), x, ["trans_x", "trans_y", "trans_z"].map((k, i) => ({values: traces[k], color: COLORS[i]})));
  plot(el(card, ".rot"), x, ["rot_x", "rot_y", "rot_z"].map((k, i) => ({values: traces[k], color: COLORS[i]})));
  const crit = last.criterion;
  plot(el(card, ".fd"), x, [{values: traces.fd, color: "#1d2330"}], crit ? crit.threshold_mm : undefined);
  const dvars = traces.std_dvars.some(v => v !== null) ? traces.std_dvars : traces.dvars;
  plot(el(card, ".dvars"), x, [{values: dvars, color: "#9467bd"}]);
  plot(el(card, ".tsnr"), x, [{values: traces.tsnr, color: "#2ca02c"}]);

  const bar = el(card, ".criterion-bar");
  if (crit && crit.fraction !== null) {
    bar.value = Math.min(1, crit.fraction);
    const eta = crit.reached ? "reached" : crit.eta_s === null ? "no usable frames yet"
      : `about ${fmt(crit.eta_s / 60, 1)} min of scanning to go`;
    text(card, ".criterion-text", `${fmt(crit.minutes, 2)} of ${fmt(crit.target_minutes, 1)} clean min (FD <= ${crit.threshold_mm} mm): ${eta}`);
  } else {
    bar.value = 0;
    text(card, ".criterion-text", "n/a");
  }
  const usable = last.usable_frames || {};
  text(card, ".usable", Object.keys(usable).sort((a, b) => a - b)
       .map(k => `FD <= ${k} mm: ${usable[k]} of ${data.n_volumes} frames`).join("; "));

  const alerts = el(card, ".alerts");
  alerts.replaceChildren(...data.alerts.slice().reverse().map(a => {
    const li = document.createElement("li");
    li.className = a.level;
    li.textContent = `${a.level} ${a.code}${a.index === null ? "" : " (vol " + a.index + ")"}: ${a.message}`;
    return li;
  }));

  const body = el(card, ".today tbody");
  body.replaceChildren(...data.day_series.slice().reverse().map(s => {
    const tr = document.createElement("tr");
    for (const value of [s.time, s.series, s.description ?? "", `${s.n_volumes ?? "?"} of ${s.n_expected ?? "?"}`, s.verdict ?? ""]) {
      const td = document.createElement("td"); td.textContent = value; tr.appendChild(td);
    }
    const td = document.createElement("td");
    if (s.report_url) {
      const a = document.createElement("a");
      a.href = s.report_url; a.textContent = "report.html"; a.target = "_blank"; a.rel = "noopener";
      td.appendChild(a);
    }
    tr.appendChild(td);
    return tr;
  }));
}

function connect() {
  const url = new URL("ws", window.location.href);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const status = document.getElementById("connection");
  const ws = new WebSocket(url);
  ws.onopen = () => { status.textContent = "live"; status.className = "connection"; };
  ws.onmessage = event => {
    const message = JSON.parse(event.data);
    if (message.type === "card") render(message.card);
  };
  ws.onclose = () => {
    status.textContent = "disconnected; retrying ..."; status.className = "connection down";
    setTimeout(connect, 2000);
  };
}

connect();

// "site percentile: tSNR 42, FD mean 80": the figures known among the site's earlier
// series of this protocol (docs/messages.md, site_percentiles)
function sitePercentiles(p) {
  if (!p) return "";
  const names = {tsnr: "tSNR", snr: "SNR", fd_mean: "FD mean", usable_fraction: "usable",
                 dvars_std: "DVARS"};
  const known = Object.keys(names).filter((k) => p[k] !== null && p[k] !== undefined);
  if (!known.length) return "";
  return "; site percentile: " + known.map((k) => `${names[k]} ${Math.round(p[k])}`).join(", ");
}
