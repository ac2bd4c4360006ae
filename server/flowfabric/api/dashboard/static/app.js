// FlowFabric dashboard (docs/dashboard.md). Plain JS, no build step.
// Every string from the server is rendered as text (textContent / text nodes), never as HTML:
// execution tags, kinds, reasons and output frames are user input.
"use strict";

const main = document.getElementById("main");
let session = { role: "none", auth_required: false, admin_available: false };
let feeds = []; // EventSources of the current view, closed on navigation
let overview = null; // the lane overview feed, open for the whole page
let lastLanes = null;
const overviewListeners = new Set();

// -- DOM helpers ---------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v;
    else if (k === "onclick") node.addEventListener("click", v);
    else if (k === "onchange") node.addEventListener("change", v);
    else node.setAttribute(k, String(v));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function stateName(value) {
  return String(value || "").replace(/^PUBLIC_STATE_/, "").replace(/^BLOCKING_REASON_/, "").toLowerCase();
}

function stateBadge(value) {
  const name = stateName(value);
  return el("span", { class: "state state-" + name.replace(/[^a-z_]/g, ""), "data-state": name }, name);
}

function when(ms) {
  const n = Number(ms || 0);
  if (!n) return "";
  return new Date(n).toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function duration(ms) {
  const n = Number(ms || 0);
  if (n < 1000) return n + " ms";
  if (n < 120000) return (n / 1000).toFixed(1) + " s";
  if (n < 7200000) return Math.round(n / 60000) + " min";
  return (n / 3600000).toFixed(1) + " h";
}

function table(id, headers, rows) {
  return el("table", { id },
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function execLink(id) {
  return el("a", { href: "#/execution/" + encodeURIComponent(id), class: "mono" }, id);
}

async function api(path, options) {
  const response = await fetch(path, Object.assign({ credentials: "same-origin" }, options || {}));
  const body = await response.json();
  if (!response.ok) {
    const err = new Error(body.message || body.error || response.statusText);
    err.code = body.error;
    err.status = response.status;
    throw err;
  }
  return body;
}

function showError(err) {
  main.replaceChildren(el("p", { class: "error", id: "error" }, String(err.message || err)));
  if (err.status === 401) showLogin();
}

function feed(path, handlers) {
  const source = new EventSource(path);
  const live = document.getElementById("live");
  source.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  for (const [name, fn] of Object.entries(handlers)) {
    source.addEventListener(name, (ev) => fn(JSON.parse(ev.data), ev));
  }
  // the server says when a feed is over; EventSource would otherwise reconnect
  source.addEventListener("end", () => source.close());
  source.addEventListener("failure", (ev) => {
    source.close();
    if (handlers.failure === undefined) console.warn("feed failed", ev.data);
  });
  feeds.push(source);
  return source;
}

// -- session -------------------------------------------------------------------------------

async function loadSession() {
  session = await api("/api/session");
  const role = document.getElementById("role");
  role.textContent = session.role === "admin" ? "admin" : session.role === "read" ? "read-only" : "";
  if (session.auth_required && session.role === "none") showLogin();
}

function showLogin() {
  const form = document.getElementById("login");
  form.hidden = false;
}

document.getElementById("login").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("login-token");
  try {
    await api("/api/session", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-FF-Dashboard": "1" },
      body: JSON.stringify({ token: input.value }),
    });
    input.value = "";
    document.getElementById("login").hidden = true;
    await loadSession();
    route();
  } catch (err) {
    document.getElementById("login-error").textContent = err.message;
  }
});

// -- the overview feed (lane depths), shared by the list views -----------------------------

function openOverview() {
  if (overview) overview.close();
  const live = document.getElementById("live");
  overview = new EventSource("/api/overview/events");
  overview.addEventListener("open", () => { live.textContent = "live"; live.className = "live on"; });
  overview.addEventListener("error", () => { live.textContent = "offline"; live.className = "live off"; });
  overview.addEventListener("lanes", (ev) => {
    lastLanes = JSON.parse(ev.data);
    for (const fn of overviewListeners) fn(lastLanes);
  });
}

function onOverview(fn) {
  overviewListeners.add(fn);
}

// -- views ---------------------------------------------------------------------------------

function viewLanes() {
  const body = el("div", { id: "view-lanes" }, el("h2", {}, "Lanes"), el("p", { class: "muted" }, "waiting for the live feed…"));
  main.replaceChildren(body);
  const render = (data) => {
    const states = data.states;
    const rows = data.lanes.map((lane) => el("tr", { "data-lane": lane.lane },
      el("td", {}, el("a", { href: "#/executions?lane=" + encodeURIComponent(lane.lane) }, lane.lane)),
      states.filter((s) => !s.startsWith("blocked:")).map((s) =>
        el("td", { class: "num", "data-count": s }, LIST_STATES.includes(s)
          ? el("a", { href: "#/executions?" + new URLSearchParams({ lane: lane.lane, state: s }) }, lane.counts[s])
          : lane.counts[s])),
      el("td", { class: "num", "data-count": "blocked" }, lane.blocked),
      el("td", { class: "num", "data-wait": "" }, duration(lane.head_wait_ms))));
    const headers = ["lane", ...states.filter((s) => !s.startsWith("blocked:")), "blocked", "head wait"];
    body.replaceChildren(el("h2", {}, "Lanes"),
      table("lanes-table", headers, rows),
      el("p", { class: "muted" }, "Depth by state; head wait = how long the next execution to be claimed has been eligible. Updated live at " + when(data.now) + "."));
  };
  onOverview(render);
  if (lastLanes) render(lastLanes);
}

const LIST_STATES = ["eligible", "delayed", "active", "suspended", "terminal"];
const PUBLIC_STATES = ["", "waiting", "delayed", "rate_limited", "waiting_children", "active",
  "suspended", "completed", "failed", "cancelled", "expired", "skipped"];

function viewExecutions(params) {
  const lane = params.get("lane") || "default";
  const state = params.get("state") || "eligible";
  const pub = params.get("public_state") || "";
  const go = (l, s, p) => { location.hash = "#/executions?" + new URLSearchParams({ lane: l, state: s, public_state: p }); };
  const lanes = lastLanes ? lastLanes.lanes.map((x) => x.lane) : [];
  if (!lanes.includes(lane)) lanes.push(lane);
  const laneSel = el("select", { id: "filter-lane", onchange: (e) => go(e.target.value, state, pub) },
    lanes.map((l) => el("option", l === lane ? { value: l, selected: "" } : { value: l }, l)));
  const stateTabs = el("span", { id: "state-tabs" }, LIST_STATES.map((s) =>
    el("a", { href: "#/executions?" + new URLSearchParams({ lane, state: s, public_state: pub }),
      class: s === state ? "active" : "", "data-index": s }, s)));
  const pubSel = el("select", { id: "filter-public-state", onchange: (e) => go(lane, state, e.target.value) },
    PUBLIC_STATES.map((s) => el("option", s === pub ? { value: s, selected: "" } : { value: s }, s || "any public state")));
  const list = el("div", { id: "executions-list" });
  main.replaceChildren(el("div", { id: "view-executions" }, el("h2", {}, "Executions"),
    el("div", { class: "filters" }, laneSel, stateTabs, pubSel), list));
  let token = "";
  const load = async () => {
    try {
      const q = new URLSearchParams({ lane, state, public_state: pub });
      if (token) q.set("page", token);
      const data = await api("/api/executions?" + q);
      const rows = data.executions.map((x) => el("tr", { "data-eid": x.execution_id },
        el("td", {}, execLink(x.execution_id)), el("td", {}, x.execution_kind || ""),
        el("td", {}, stateBadge(x.public_state)), el("td", { class: "num" }, x.priority || 0),
        el("td", {}, x.namespace || ""), el("td", {}, when(x.created_at))));
      list.replaceChildren(table("executions-table", ["execution", "kind", "state", "priority", "namespace", "created"], rows),
        data.executions.length ? "" : el("p", { class: "muted" }, "none on this page"),
        data.next_page_token ? el("button", { onclick: () => { token = data.next_page_token; load(); } }, "next page") : "");
    } catch (err) { showError(err); }
  };
  let lastCounts = null;
  onOverview((data) => {
    const row = data.lanes.find((x) => x.lane === lane);
    const counts = JSON.stringify(row ? row.counts : null);
    if (counts !== lastCounts) { lastCounts = counts; load(); }
  });
  load();
}

function whyText(why) {
  const parts = [];
  if (why.summary) parts.push(why.summary);
  else if (why.blocking_reason) parts.push(stateName(why.blocking_reason));
  if (why.blocking_detail) parts.push(why.blocking_detail);
  return parts.join(" — ") || "running or finished";
}

function viewExecution(id) {
  const head = el("div", { id: "execution-head" });
  const why = el("div", { id: "why", class: "why" });
  const attempts = el("div", { id: "attempts" });
  const history = el("div", { id: "history" });
  const output = el("div", { id: "output" });
  const actions = el("div", { class: "actions", id: "actions" });
  main.replaceChildren(el("div", { id: "view-execution" },
    el("h2", {}, "Execution ", el("span", { class: "mono" }, id)),
    head, actions, el("h3", {}, "Why it is not running"), why,
    el("h3", {}, "Live output"), output,
    el("h3", {}, "Attempts"), attempts, el("h3", {}, "History (lease events, newest first)"), history));
  let tailing = -1;
  const tail = (idx) => {
    if (idx === tailing) return;
    tailing = idx;
    if (idx > 0) output.append(el("div", { class: "muted" }, "— attempt " + idx + " —"));
    feed("/api/executions/" + encodeURIComponent(id) + "/attempts/" + idx + "/tail", {
      frames: (data) => {
        for (const f of data.frames) {
          output.append(el("div", { class: "frame", "data-frame-id": f.id },
            el("span", { class: "frame-type" }, f.frame_type), f.text));
        }
        output.scrollTop = output.scrollHeight;
      },
      closed: (data) => output.append(el("div", { class: "closed", id: "output-closed" }, "stream closed: " + data.closed_reason)),
    });
  };
  const render = (data) => {
    const s = data.snapshot;
    const tags = Object.entries(s.tags || {}).map(([k, v]) => k + "=" + v).join(", ");
    head.replaceChildren(el("dl", { class: "kv" },
      el("dt", {}, "state"), el("dd", { id: "state" }, stateBadge(s.public_state)),
      el("dt", {}, "kind"), el("dd", {}, s.execution_kind || ""),
      el("dt", {}, "lane"), el("dd", {}, s.lane_id || ""),
      el("dt", {}, "flow"), el("dd", {}, s.flow_id ? el("a", { href: "#/flow/" + encodeURIComponent(s.flow_id) }, s.flow_id) : ""),
      el("dt", {}, "progress"), el("dd", { id: "progress" }, s.progress_pct !== undefined ? s.progress_pct + "% " + (s.progress_message || "") : ""),
      el("dt", {}, "tags"), el("dd", { id: "tags" }, tags),
      el("dt", {}, "created"), el("dd", {}, when(s.created_at)),
      el("dt", {}, "lease"), el("dd", {}, s.current_lease ? s.current_lease.worker_instance_id + " until " + when(s.current_lease.expires_at) : "")));
    why.replaceChildren(whyText(data.why));
    attempts.replaceChildren(table("attempts-table", ["#", "outcome", "started", "ended", "worker", "failure"],
      (s.attempts || []).map((a) => el("tr", {}, el("td", {}, a.attempt_index || 0), el("td", {}, a.outcome || ""),
        el("td", {}, when(a.started_at)), el("td", {}, when(a.ended_at)), el("td", {}, a.worker_instance_id || ""),
        el("td", {}, [a.failure_reason, a.failure_category].filter(Boolean).join(" / "))))));
    history.replaceChildren(table("history-table", ["id", "event", "detail"],
      data.history.map((h) => el("tr", {}, el("td", { class: "mono" }, h.id), el("td", {}, h.event || ""),
        el("td", {}, Object.entries(h).filter(([k]) => k !== "id" && k !== "event").map(([k, v]) => k + "=" + v).join(" "))))));
    actions.replaceChildren();
    if (session.role === "admin") {
      const act = (name) => async () => {
        try {
          await api("/api/executions/" + encodeURIComponent(id) + "/" + name, { method: "POST", headers: { "X-FF-Dashboard": "1" } });
        } catch (err) { actions.append(el("span", { class: "error" }, err.message)); }
      };
      actions.append(el("button", { id: "cancel", onclick: act("cancel") }, "Cancel"),
        el("button", { id: "replay", onclick: act("replay") }, "Replay"));
    }
    const current = s.current_attempt ? Number(s.current_attempt.attempt_index || 0) : 0;
    tail(Math.max(current, tailing, 0));
  };
  feed("/api/executions/" + encodeURIComponent(id) + "/events", {
    execution: render,
    failure: (data) => why.replaceChildren(el("span", { class: "error" }, data.message || data.error)),
  });
  api("/api/executions/" + encodeURIComponent(id)).then(render, showError);
}

function viewFlows() {
  const body = el("div", { id: "view-flows" }, el("h2", {}, "Flows"));
  main.replaceChildren(body);
  api("/api/flows").then((data) => {
    body.append(table("flows-table", ["flow", "kind", "state", "members", "namespace", "created"],
      data.flows.map((f) => el("tr", { "data-flow": f.flow_id },
        el("td", {}, el("a", { href: "#/flow/" + encodeURIComponent(f.flow_id), class: "mono" }, f.flow_id)),
        el("td", {}, f.flow_kind), el("td", {}, stateBadge(f.public_flow_state)), el("td", { class: "num" }, f.node_count),
        el("td", {}, f.namespace), el("td", {}, when(f.created_at))))));
  }, showError);
}

const STATE_FILL = { completed: "#c8e6c9", failed: "#ffcdd2", active: "#bbdefb", waiting: "#fff3c4",
  cancelled: "#e0e0e0", skipped: "#e0e0e0", expired: "#e0e0e0", suspended: "#ffe0b2",
  delayed: "#ffe0b2", waiting_children: "#ffe0b2", rate_limited: "#ffe0b2" };

function flowGraph(nodes, edges) {
  // layers by longest path from the roots; rows in input order
  const incoming = new Map(nodes.map((n) => [n.id, []]));
  for (const e of edges) if (incoming.has(e.to)) incoming.get(e.to).push(e.from);
  const layer = new Map();
  const depth = (id, seen) => {
    if (layer.has(id)) return layer.get(id);
    if (seen.has(id)) return 0;
    seen.add(id);
    const d = Math.max(-1, ...incoming.get(id).map((u) => depth(u, seen))) + 1;
    layer.set(id, d);
    return d;
  };
  nodes.forEach((n) => depth(n.id, new Set()));
  const rows = new Map();
  const pos = new Map();
  const W = 190, H = 46, GX = 60, GY = 18;
  for (const n of nodes) {
    const l = layer.get(n.id);
    const r = rows.get(l) || 0;
    rows.set(l, r + 1);
    pos.set(n.id, { x: 10 + l * (W + GX), y: 10 + r * (H + GY) });
  }
  const width = 20 + (Math.max(0, ...layer.values()) + 1) * (W + GX);
  const height = 20 + Math.max(1, ...rows.values()) * (H + GY);
  const root = svg("svg", { width, height, viewBox: "0 0 " + width + " " + height });
  for (const e of edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    root.append(svg("line", { x1: a.x + W, y1: a.y + H / 2, x2: b.x, y2: b.y + H / 2, "data-edge": e.kind }));
  }
  for (const n of nodes) {
    const p = pos.get(n.id);
    const g = svg("g", { class: "node", "data-node": n.id, transform: "translate(" + p.x + "," + p.y + ")" });
    const state = n.count > 1 ? Object.entries(n.states).sort((x, y) => y[1] - x[1])[0][0] : n.state;
    g.append(svg("rect", { width: W, height: H, fill: STATE_FILL[state] || "#eceff1" }));
    g.append(svg("text", { x: 8, y: 17 }, (n.count > 1 ? n.count + " × " : "") + (n.kind || "?")));
    const label = n.count > 1
      ? Object.entries(n.states).map(([s, c]) => s + " " + c).join(", ")
      : state + "  " + n.id.slice(-8);
    g.append(svg("text", { x: 8, y: 35, class: "node-state" }, label));
    if (n.count === 1) g.addEventListener("click", () => { location.hash = "#/execution/" + encodeURIComponent(n.id); });
    root.append(g);
  }
  return root;
}

function viewFlow(id) {
  const body = el("div", { id: "view-flow" }, el("h2", {}, "Flow ", el("span", { class: "mono" }, id)));
  main.replaceChildren(body);
  const load = () => api("/api/flows/" + encodeURIComponent(id)).then((data) => {
    const counts = Object.entries(data.members_by_state).map(([s, n]) => s + ": " + n).join(", ");
    body.replaceChildren(el("h2", {}, "Flow ", el("span", { class: "mono" }, id)),
      el("dl", { class: "kv" }, el("dt", {}, "state"), el("dd", { id: "flow-state" }, stateBadge(data.flow.public_flow_state)),
        el("dt", {}, "kind"), el("dd", {}, data.flow.flow_kind || ""),
        el("dt", {}, "members"), el("dd", { id: "flow-counts" }, counts)),
      el("div", { id: "flow-graph" }, flowGraph(data.nodes, data.edges)),
      data.truncated ? el("p", { class: "muted" }, "large flow: the first members only") : "");
  }, showError);
  onOverview(load);
  load();
}

function dims(obj) {
  return Object.entries(obj || {}).map(([k, v]) => k + "=" + v).join(", ");
}

function viewBudgets() {
  const body = el("div", { id: "view-budgets" }, el("h2", {}, "Budgets"));
  main.replaceChildren(body);
  const load = () => api("/api/budgets").then((data) => {
    body.replaceChildren(el("h2", {}, "Budgets"),
      table("budgets-table", ["budget", "scope", "usage", "hard limits", "soft limits", "breaches", "next reset"],
        data.budgets.map((b) => el("tr", { "data-budget": b.budget_id },
          el("td", { class: "mono" }, b.budget_id), el("td", {}, [b.scope_type, b.scope_id].filter(Boolean).join(":")),
          el("td", { "data-usage": "" }, dims(b.usage)), el("td", {}, dims(b.hard_limits)), el("td", {}, dims(b.soft_limits)),
          el("td", { class: "num" }, b.breach_count || 0), el("td", {}, when(b.next_reset_at))))),
      el("h2", {}, "Quota policies"),
      table("quotas-table", ["policy", "window", "per window", "in window", "max concurrent", "running"],
        data.quotas.map((q) => el("tr", { "data-quota": q.quota_policy_id },
          el("td", { class: "mono" }, q.quota_policy_id), el("td", {}, (q.window_seconds || 0) + " s"),
          el("td", { class: "num" }, q.max_requests_per_window || 0), el("td", { class: "num" }, q.current_window_requests || 0),
          el("td", { class: "num" }, q.max_concurrent || 0), el("td", { class: "num" }, q.current_concurrency || 0)))));
  }, showError);
  onOverview(load);
  load();
}

function viewWorkers() {
  const body = el("div", { id: "view-workers" }, el("h2", {}, "Workers"));
  main.replaceChildren(body);
  const load = () => api("/api/workers").then((data) => {
    body.replaceChildren(el("h2", {}, "Workers"),
      table("workers-table", ["instance", "worker", "lanes", "capabilities", "last heartbeat", "leases"],
        data.workers.map((w) => el("tr", { "data-worker": w.worker_instance_id },
          el("td", { class: "mono" }, w.worker_instance_id), el("td", {}, w.worker_id), el("td", {}, w.lanes.join(", ")),
          el("td", {}, w.capabilities.join(", ")), el("td", {}, when(w.last_heartbeat_at)),
          el("td", { "data-leases": w.leases.length }, w.leases.length
            ? el("ul", {}, w.leases.map((l) => el("li", {}, execLink(l.execution_id), " " + l.execution_kind + " (" + l.lane_id + ") until " + when(l.lease_expires_at))))
            : "none")))),
      data.workers.length ? "" : el("p", { class: "muted" }, "no live workers"));
  }, showError);
  onOverview(load);
  load();
}

// -- routing -------------------------------------------------------------------------------

function route() {
  for (const source of feeds) source.close();
  feeds = [];
  overviewListeners.clear();
  const hash = location.hash || "#/lanes";
  const [path, query] = hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  const view = parts[0] || "lanes";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view || (view === "execution" && a.dataset.view === "executions") || (view === "flow" && a.dataset.view === "flows"));
  }
  if (session.auth_required && session.role === "none") { showLogin(); main.replaceChildren(); return; }
  // an execution's page holds its own two feeds; the overview is closed there, so a browser's
  // six connections per host go further across tabs
  if (view === "execution") { if (overview) { overview.close(); overview = null; } }
  else if (!overview) openOverview();
  const id = parts[1] ? decodeURIComponent(parts[1]) : "";
  if (view === "executions") viewExecutions(params);
  else if (view === "execution") viewExecution(id);
  else if (view === "flows") viewFlows();
  else if (view === "flow") viewFlow(id);
  else if (view === "budgets") viewBudgets();
  else if (view === "workers") viewWorkers();
  else viewLanes();
}

window.addEventListener("hashchange", route);
loadSession().then(route, showError);
