// The dashboard page: renders the server's snapshots, live through server-sent events.
// Everything here is served by the dashboard itself: no library, no CDN.
"use strict";

const STATES = ["pending", "running", "done", "failed", "killed"];
const PAGE_SIZE = 50;
const SVG = "http://www.w3.org/2000/svg";
let latest = null;
let tablePage = 0;
let graph = null;      // the last /api/graph answer
let graphBusy = false;
let shownTask = null;  // the task whose detail is open

function $(id) { return document.getElementById(id); }

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "-" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function ms(x) { return x === null || x === undefined ? "-" : x.toFixed(2) + " ms"; }
function mib(x) { return x === null || x === undefined ? "-" : (x / 1048576).toFixed(0) + " MiB"; }
function secs(x) { return x === null || x === undefined ? "-" : x.toFixed(1) + " s ago"; }
function pct(x) { return x === null || x === undefined ? "-" : x.toFixed(0) + "%"; }
function when(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "-"; }

function pageName() { return (location.hash.replace("#", "").split("/")[0]) || "cluster"; }

function showPage() {
  let name = pageName();
  const m = location.hash.match(/^#task\/(\d+)$/);
  if (m) name = "tasks";
  for (const s of document.querySelectorAll(".page")) s.classList.toggle("active", s.id === "page-" + name);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === name);
  if (m) showTask(Number(m[1]));
  if (name === "tasks" || name === "dag") refreshGraph();
  if (name === "batch") renderBatch();
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
    cell(tr, r.up ? r.lag : "", "lag");
    cell(tr, r.up ? ms(r.commit_p50_ms) : "");
    cell(tr, r.up ? ms(r.commit_p99_ms) : "");
    cell(tr, r.up ? ms(r.fsync_p50_ms) : "", "fsync");
    cell(tr, r.up ? ms(r.fsync_p99_ms) : "");
    body.appendChild(tr);
  });
}

function renderWorkers(snap) {
  const body = $("workers").tBodies[0];
  body.replaceChildren();
  for (const c of snap.clients || []) {
    const tr = document.createElement("tr");
    tr.dataset.client = c.cid;
    cell(tr, c.cid); cell(tr, c.name); cell(tr, c.addr); cell(tr, c.slots); cell(tr, (c.tags || []).join(", "), "tags");
    cell(tr, c.running); cell(tr, c.prefetching);
    cell(tr, pct(c.cpu_percent), "cpu"); cell(tr, mib(c.rss_bytes), "rss"); cell(tr, secs(c.heard_s), "heard");
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

function chart(svg, series, classes, step) {
  svg.replaceChildren();
  const n = Math.max(...series.map(s => s.length));
  if (n < 2) return;
  const top = Math.max(1, ...series.flat().filter(y => y !== null));
  series.forEach((s, k) => {
    const line = document.createElementNS(SVG, "polyline");
    const pts = [];
    s.forEach((y, i) => {
      if (y === null) return;
      const x = (600 * i) / (n - 1), v = 155 - (150 * y) / top;
      if (step && pts.length) pts.push(`${x},${pts[pts.length - 1].split(",")[1]}`);
      pts.push(`${x},${v}`);
    });
    line.setAttribute("points", pts.join(" "));
    if (classes && classes[k]) line.setAttribute("class", classes[k]);
    svg.appendChild(line);
  });
}

function renderHistory(history) {
  const pts = history.points;
  chart($("chart-progress"), [pts.map(p => p.done), pts.map(p => p.total)], ["", "total"]);
  chart($("chart-throughput"), [pts.map(p => p.throughput)]);
  chart($("chart-latency"), [pts.map(p => p.commit_p50_ms)]);
  chart($("chart-fsync"), [pts.map(p => p.fsync_p50_ms)]);
  chart($("chart-commit"), [pts.map(p => p.commit)]);
  chart($("chart-up"), [pts.map(p => p.replicas_up)]);
  chart($("chart-leader"), [pts.map(p => p.leader === null ? null : p.leader + 1)], [], true);
  const list = $("leader-changes");
  list.replaceChildren();
  for (const c of history.leader_changes.slice(-20)) {
    const li = document.createElement("li");
    li.textContent = when(c.at) + ": replica " + c.leader;
    list.appendChild(li);
  }
}

// ---- the task graph: table, search and DAG -------------------------------------------------

async function refreshGraph() {
  if (graphBusy) return;
  graphBusy = true;
  try {
    const resp = await fetch("/api/graph");
    if (!resp.ok) return;
    graph = await resp.json();
    if (document.querySelector("#page-tasks.active")) renderTable();
    if (document.querySelector("#page-dag.active")) renderDag();
  } finally {
    graphBusy = false;
  }
}

function matches(filter, tid, name, state) {
  if (!filter) return true;
  return filter.split(/\s+/).every(word => {
    const m = word.match(/^state:(\w+)$/);
    if (m) return state === m[1];
    if (/^\d+$/.test(word)) return String(tid) === word;
    return name.includes(word) || state === word;
  });
}

function renderTable() {
  const body = $("tasks").tBodies[0];
  if (!graph) { body.replaceChildren(); return; }
  const filter = $("task-filter").value.trim();
  const rows = [];
  for (let i = 0; i < graph.tids.length; i++) {
    if (matches(filter, graph.tids[i], graph.names[i], graph.states[i])) rows.push(i);
  }
  const pages = Math.max(1, Math.ceil(rows.length / PAGE_SIZE));
  tablePage = Math.min(tablePage, pages - 1);
  $("page-info").textContent = `${rows.length} task(s), page ${tablePage + 1} of ${pages}` +
    (graph.truncated ? ` (first ${graph.tids.length} of ${graph.total})` : "");
  body.replaceChildren();
  for (const i of rows.slice(tablePage * PAGE_SIZE, (tablePage + 1) * PAGE_SIZE)) {
    const tid = graph.tids[i];
    const tr = document.createElement("tr");
    tr.dataset.tid = tid;
    tr.className = "state-" + graph.states[i];
    cell(tr, tid); cell(tr, graph.names[i]); cell(tr, graph.states[i], "state"); cell(tr, graph.pretasks[i].length);
    tr.addEventListener("click", () => { location.hash = "#task/" + tid; });
    body.appendChild(tr);
  }
}

// Layered drawing: a task's column is one more than the deepest task it reads; tasks only read
// earlier tasks, so one pass in id order places them all.  Plain SVG, a few thousand nodes.
function renderDag() {
  const svg = $("dag-svg");
  if (!graph) return;
  const n = graph.tids.length;
  $("dag-info").textContent = n === 0 ? "no tasks yet" :
    `${n} task(s)` + (graph.truncated ? ` drawn of ${graph.total}` : "") + "; click a task for its detail";
  const depth = new Map(), column = [], row = [], perColumn = [];
  for (let i = 0; i < n; i++) {
    let d = 0;
    for (const p of graph.pretasks[i]) if (depth.has(p)) d = Math.max(d, depth.get(p) + 1);
    depth.set(graph.tids[i], d);
    column.push(d);
    perColumn[d] = (perColumn[d] || 0) + 1;
    row.push(perColumn[d] - 1);
  }
  const tallest = Math.max(1, ...perColumn.map(x => x || 0));
  const gapX = 120, gapY = tallest > 200 ? 6 : tallest > 50 ? 14 : 30, r = Math.min(9, gapY / 2.5);
  const width = Math.max(1, perColumn.length) * gapX, height = tallest * gapY + 20;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("width", Math.min(width, 1200));
  svg.setAttribute("height", Math.min(height, 900));
  const at = new Map();
  for (let i = 0; i < n; i++) {
    const offset = (tallest - perColumn[column[i]]) * gapY / 2;
    at.set(graph.tids[i], [column[i] * gapX + gapX / 2, 10 + offset + row[i] * gapY + gapY / 2]);
  }
  let d = "";
  for (let i = 0; i < n; i++) {
    const [x2, y2] = at.get(graph.tids[i]);
    for (const p of graph.pretasks[i]) {
      const from = at.get(p);
      if (from) d += `M${from[0]},${from[1]}L${x2},${y2}`;
    }
  }
  const edges = document.createElementNS(SVG, "path");
  edges.setAttribute("d", d);
  edges.setAttribute("class", "edges");
  const nodes = document.createElementNS(SVG, "g");
  for (let i = 0; i < n; i++) {
    const [x, y] = at.get(graph.tids[i]);
    const c = document.createElementNS(SVG, "circle");
    c.setAttribute("cx", x); c.setAttribute("cy", y); c.setAttribute("r", r);
    c.setAttribute("class", "node " + graph.states[i]);
    c.dataset.tid = graph.tids[i];
    c.dataset.state = graph.states[i];
    const title = document.createElementNS(SVG, "title");
    title.textContent = `task ${graph.tids[i]} ${graph.names[i]}: ${graph.states[i]}`;
    c.appendChild(title);
    c.addEventListener("click", () => { location.hash = "#task/" + graph.tids[i]; });
    nodes.appendChild(c);
  }
  svg.replaceChildren(edges, nodes);
}

// ---- one task's detail -------------------------------------------------------------------------

function defRow(dl, label, value, field) {
  const dt = document.createElement("dt"); dt.textContent = label;
  const dd = document.createElement("dd");
  dd.textContent = value === null || value === undefined || value === "" ? "-" : String(value);
  if (field) dd.dataset.field = field;
  dl.append(dt, dd);
}

function limitsText(limits) {
  if (!limits || typeof limits !== "object") return "";
  return Object.entries(limits).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => `${k}=${v}`).join(", ");
}

async function showTask(tid) {
  shownTask = tid;
  const box = $("task-detail");
  const resp = await fetch("/api/task/" + tid);
  const info = await resp.json();
  if (shownTask !== tid) return;  // another task was asked for meanwhile
  box.hidden = false;
  $("task-detail-title").textContent = "Task " + tid;
  const run = $("task-detail-run"), fields = $("task-detail-fields");
  run.replaceChildren(); fields.replaceChildren();
  if (!resp.ok) { defRow(run, "error", info.error, "error"); return; }
  // A command task's values are its run record: times, exit, usage, output; a node task has its values only.
  const v = info.values || {};
  const kwargs = info.kwargs || {};
  const limits = (kwargs.command || kwargs).limits;
  defRow(run, "state", info.state + (info.attempt > 1 ? ` (attempt ${info.attempt})` : ""), "run-state");
  defRow(run, "started", v.started ? when(v.started) : "", "started");
  defRow(run, "finished", v.finished ? when(v.finished) : "", "finished");
  defRow(run, "elapsed", v.elapsed_s !== undefined ? v.elapsed_s.toFixed(3) + " s" : "", "elapsed");
  defRow(run, "verdict", v.verdict, "verdict");
  defRow(run, "exit code", v.exit_code, "exit_code");
  defRow(run, "signal", v.signal, "signal");
  defRow(run, "limits", limitsText(limits) || (info.timeout ? `timeout=${info.timeout}` : ""), "limits");
  defRow(run, "limits hit", (v.limits_hit || []).join(", "), "limits_hit");
  defRow(run, "peak memory", v.peak_memory_bytes !== undefined ? mib(v.peak_memory_bytes) : "", "peak_memory");
  defRow(run, "CPU user/system",
    v.user_cpu_s !== undefined ? `${v.user_cpu_s.toFixed(3)} s / ${v.system_cpu_s.toFixed(3)} s` : "", "cpu");
  defRow(run, "host", v.host, "host");
  defRow(run, "error", info.error, "error");
  // The runner keeps an output's head and, when it was longer, its tail.
  const tail = out => (out && typeof out === "object") ?
    (out.cut ? `${out.head || ""}\n… (${out.size_bytes} bytes in all) …\n${out.tail || ""}` : (out.head || "") + (out.tail || "")) : "";
  $("task-detail-stdout").textContent = tail(v.stdout) ? "stdout:\n" + tail(v.stdout) : "(no standard output recorded)";
  $("task-detail-stderr").textContent = tail(v.stderr) ? "stderr:\n" + tail(v.stderr) : "";
  for (const [k, val] of Object.entries(info)) {
    defRow(fields, k, typeof val === "string" ? val : JSON.stringify(val), k);
  }
}

// ---- a batch run's status file -----------------------------------------------------------------

let batch = null;
async function renderBatch() {
  const resp = await fetch("/api/status-file");
  const answer = await resp.json();
  if (!resp.ok) { $("batch-info").textContent = answer.error; return; }
  batch = answer;
  renderBatchTable();
}

function renderBatchTable() {
  if (!batch) return;
  const c = batch.counts;
  $("batch-info").textContent = `${batch.path}: ${c.records} line(s), ${c.failed} with a non-zero exit, ` +
    `${c.rejected} unreadable` + (batch.cut ? " (the file's end only)" : "");
  const filter = $("batch-filter").value.trim();
  const body = $("batch-records").tBodies[0];
  body.replaceChildren();
  for (const r of batch.records) {
    const m = filter.match(/^exit:(-?\d+)$/);
    if (m ? r.exit_code !== Number(m[1]) :
      filter && !(String(r.task_id) === filter || r.node.includes(filter) || r.command.includes(filter))) continue;
    const tr = document.createElement("tr");
    tr.dataset.task = r.task_id;
    if (r.exit_code !== 0) tr.className = "failed";
    cell(tr, r.flags.replace(/ /g, "\u00b7"), "flags"); cell(tr, r.task_id); cell(tr, r.line); cell(tr, r.repeat_index);
    cell(tr, r.node); cell(tr, r.pid); cell(tr, r.exit_code, "exit"); cell(tr, r.elapsed.toFixed(3));
    cell(tr, when(r.start)); cell(tr, r.out_snippet); cell(tr, r.err_snippet); cell(tr, r.command, "command");
    body.appendChild(tr);
  }
  const rejected = $("batch-rejected");
  rejected.replaceChildren();
  for (const r of batch.rejected) {
    const li = document.createElement("li");
    li.textContent = `line ${r.line}: ${r.why}`;
    rejected.appendChild(li);
  }
}

// ---- live updates ------------------------------------------------------------------------------

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
  const page = pageName();
  if (page === "tasks" || page === "task" || page === "dag") refreshGraph();
  if (page === "batch") renderBatch();
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
$("task-filter").addEventListener("input", () => { tablePage = 0; renderTable(); });
$("batch-filter").addEventListener("input", renderBatchTable);
$("batch-search").addEventListener("submit", e => e.preventDefault());
$("page-prev").addEventListener("click", () => { tablePage = Math.max(0, tablePage - 1); renderTable(); });
$("page-next").addEventListener("click", () => { tablePage += 1; renderTable(); });
showPage();
connect();
