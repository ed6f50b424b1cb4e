// The dashboard page: renders the server's snapshots, live through server-sent events.
"use strict";

const STATES = ["pending", "running", "done", "failed", "killed"];
const PAGE_SIZE = 25;
let latest = null;
let tablePage = 0;

function $(id) { return document.getElementById(id); }

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function ms(x) { return x === null || x === undefined ? "-" : x.toFixed(2) + " ms"; }

function showPage() {
  const name = (location.hash.replace("#", "").split("/")[0]) || "cluster";
  for (const s of document.querySelectorAll(".page")) s.classList.toggle("active", s.id === "page-" + name);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  const m = location.hash.match(/^#task\/(\d+)$/);
  if (m) {
    for (const s of document.querySelectorAll(".page")) s.classList.toggle("active", s.id === "page-tasks");
    showTask(Number(m[1]));
  }
}

function renderSummary(snap) {
  const t = snap.tasks || {};
  $("run-state").textContent = snap.state || "no coordinator";
  $("leader").textContent = snap.leader === null ? "none" : "replica " + snap.leader;
  for (const s of ["done", "running", "pending", "failed"]) $(s).textContent = t[s] === undefined ? "-" : t[s];
  $("clients").textContent = (snap.clients || []).length + " live, " + snap.dead_clients + " dead";
  const total = t.total || 0;
  $("progress-bar").style.width = total ? (100 * (t.done || 0) / total).toFixed(1) + "%" : "0";
}

function renderReplicas(snap) {
  const body = $("replicas").tBodies[0];
  body.replaceChildren();
  snap.replicas.forEach((r, i) => {
    const tr = document.createElement("tr");
    tr.dataset.replica = r.rid === null ? String(i) : String(r.rid);
    tr.className = r.up ? (r.role === "leader" ? "leader" : "") : "down";
    cell(tr, r.rid === null ? i : r.rid);
    cell(tr, r.address);
    cell(tr, r.up ? "up" : "down", r.up ? "up status" : "down status");
    cell(tr, r.up ? r.role : "", "role");
    cell(tr, r.up ? r.ballot : "");
    cell(tr, r.up ? r.commit : "");
    cell(tr, r.up ? r.applied : "");
    cell(tr, r.up ? r.lag : "");
    cell(tr, r.up ? ms(r.commit_p50_ms) : "");
    cell(tr, r.up ? ms(r.commit_p99_ms) : "");
    body.appendChild(tr);
  });
}

function renderWorkers(snap) {
  const body = $("workers").tBodies[0];
  body.replaceChildren();
  for (const c of snap.clients || []) {
    const tr = document.createElement("tr");
    cell(tr, c.cid); cell(tr, c.name); cell(tr, c.addr); cell(tr, c.slots); cell(tr, c.running); cell(tr, c.prefetching);
    body.appendChild(tr);
  }
  $("dead-clients").textContent = snap.dead_clients + " client(s) declared dead";
}

function renderCounts(snap) {
  const body = $("task-counts").tBodies[0];
  body.replaceChildren();
  for (const s of [...STATES, "total"]) {
    const tr = document.createElement("tr");
    tr.dataset.state = s;
    cell(tr, s); cell(tr, (snap.tasks || {})[s] || 0, "count");
    body.appendChild(tr);
  }
}

function chart(svg, series, classes) {
  svg.replaceChildren();
  const n = Math.max(...series.map(s => s.length));
  if (n < 2) return;
  const top = Math.max(1, ...series.flat());
  series.forEach((s, k) => {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", s.map((y, i) => `${(600 * i) / (n - 1)},${155 - (150 * y) / top}`).join(" "));
    if (classes && classes[k]) line.setAttribute("class", classes[k]);
    svg.appendChild(line);
  });
}

function renderHistory(history) {
  const pts = history.points;
  chart($("chart-progress"), [pts.map(p => p.done), pts.map(p => p.total)], ["", "total"]);
  chart($("chart-throughput"), [pts.map(p => p.throughput)]);
  chart($("chart-commit"), [pts.map(p => p.commit)]);
  chart($("chart-up"), [pts.map(p => p.replicas_up)]);
  const list = $("leader-changes");
  list.replaceChildren();
  for (const c of history.leader_changes.slice(-20)) {
    const li = document.createElement("li");
    li.textContent = new Date(c.at * 1000).toLocaleTimeString() + ": replica " + c.leader;
    list.appendChild(li);
  }
}

async function renderTable() {
  const total = latest && latest.snapshot ? (latest.snapshot.tasks.total || 0) : 0;
  const first = tablePage * PAGE_SIZE + 1;
  const body = $("tasks").tBodies[0];
  if (total < first) { body.replaceChildren(); return; }
  const resp = await fetch(`/api/tasks?first=${first}&count=${PAGE_SIZE}`);
  if (!resp.ok) return;
  const rows = await resp.json();
  body.replaceChildren();
  for (const t of rows) {
    const tr = document.createElement("tr");
    tr.dataset.tid = t.tid;
    cell(tr, t.tid); cell(tr, t.name); cell(tr, t.state, "state"); cell(tr, t.attempt);
    cell(tr, (t.clients || []).join(", ")); cell(tr, t.holder); cell(tr, t.error);
    tr.addEventListener("click", () => { location.hash = "#task/" + t.tid; });
    body.appendChild(tr);
  }
}

async function showTask(tid) {
  const box = $("task-detail");
  const resp = await fetch("/api/task/" + tid);
  const fields = $("task-detail-fields");
  fields.replaceChildren();
  box.hidden = false;
  $("task-detail-title").textContent = "Task " + tid;
  const info = await resp.json();
  for (const [k, v] of Object.entries(info)) {
    const dt = document.createElement("dt"); dt.textContent = k;
    const dd = document.createElement("dd"); dd.textContent = typeof v === "string" ? v : JSON.stringify(v);
    dd.dataset.field = k;
    fields.append(dt, dd);
  }
}

let tableBusy = false;
function render(state) {
  latest = state;
  const snap = state.snapshot;
  if (!snap) return;
  renderSummary(snap);
  renderReplicas(snap);
  renderWorkers(snap);
  renderCounts(snap);
  renderHistory(state.history);
  document.body.dataset.polls = state.polls;
  if (!tableBusy && document.querySelector("#page-tasks.active")) {
    tableBusy = true;
    renderTable().finally(() => { tableBusy = false; });
  }
}

function connect() {
  const events = new EventSource("/events");
  events.addEventListener("snapshot", e => {
    $("live").textContent = "live"; $("live").className = "badge live";
    render(JSON.parse(e.data));
  });
  events.onerror = () => { $("live").textContent = "reconnecting"; $("live").className = "badge"; };
}

window.addEventListener("hashchange", showPage);
$("task-search").addEventListener("submit", e => {
  e.preventDefault();
  const tid = $("task-id").value;
  if (tid) location.hash = "#task/" + tid;
});
$("page-prev").addEventListener("click", () => { tablePage = Math.max(0, tablePage - 1); renderTable(); });
$("page-next").addEventListener("click", () => { tablePage += 1; renderTable(); });
showPage();
connect();
