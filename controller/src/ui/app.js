// The Verse web page: reads the REST API of the daemon that serves it, as the holder of the
// token entered above. The token lives in sessionStorage (this tab only, gone when it closes)
// and travels only in the Authorization header, never in a URL. Every value is put in the page
// as text (textContent), never as markup.
"use strict";

const TOKEN_KEY = "verse.token";
const REFRESH_MS = 5000;
const MAX_EVENTS = 500;

const $ = (id) => document.getElementById(id);
let events = [];
let eventsAbort = null;
let refreshTimer = null;

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function setStatus(text, error) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("error", !!error);
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, accept) {
  const resp = await fetch(path, {
    headers: { Authorization: "Bearer " + token(), Accept: accept || "application/json" },
    cache: "no-store",
    credentials: "omit",
  });
  if (!resp.ok) {
    let code = "", message = resp.status + " " + resp.statusText;
    try {
      const body = await resp.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) { /* not a JSON error */ }
    throw new ApiError(resp.status, code, message);
  }
  return resp;
}

async function json(path) {
  return (await api(path)).json();
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const c of cells) {
    if (c instanceof Node) {
      const td = el("td");
      td.appendChild(c);
      tr.appendChild(td);
    } else {
      tr.appendChild(el("td", c));
    }
  }
  return tr;
}

function fill(tableId, rows) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren(...rows);
}

function ports(r) {
  if (r.from_port !== undefined && r.from_port !== null) {
    return r.from_port === r.to_port ? String(r.from_port) : r.from_port + "-" + r.to_port;
  }
  if (r.icmp_type !== undefined && r.icmp_type !== null) {
    return "type " + r.icmp_type + " code " + r.icmp_code;
  }
  return "all";
}

// `hits` of a rule (per-rule counters): a number, or an object of counts. Absent when the
// daemon does not count.
function hits(r) {
  const h = r.hits;
  if (h === undefined || h === null) return { text: "—", never: false };
  if (typeof h === "number") return { text: h === 0 ? "never matched" : String(h), never: h === 0 };
  const parts = Object.entries(h).map(([k, v]) => k + " " + v);
  const total = Object.values(h).reduce((a, v) => a + (typeof v === "number" ? v : 0), 0);
  return { text: total === 0 ? "never matched" : parts.join(", "), never: total === 0 };
}

function renderGroups(groups, universes) {
  const names = new Map(universes.map((u) => [u.id, u.name]));
  const out = [];
  for (const g of groups) {
    const h = el("h3", g.name + " ");
    h.appendChild(el("small", g.id + " · universe " + (names.get(g.universe) || g.universe)));
    out.push(h);
    const t = el("table", null, "rules");
    t.dataset.group = g.id;
    const head = el("thead");
    head.appendChild(row(["Rule", "Direction", "Protocol", "Ports", "Peer", "Hits", "Description"]));
    t.appendChild(head);
    const body = el("tbody");
    const rules = [...(g.ingress || []), ...(g.egress || [])];
    for (const r of rules) {
      const tr = row([r.id, r.direction, r.protocol, ports(r), r.cidr || r.group || "", "", r.description || ""]);
      const hc = hits(r);
      const td = tr.children[5];
      td.textContent = hc.text;
      if (hc.never) td.classList.add("never");
      body.appendChild(tr);
    }
    if (rules.length === 0) body.appendChild(row(["no rules", "", "", "", "", "", ""]));
    t.appendChild(body);
    out.push(t);
  }
  $("groups").replaceChildren(...out);
}

function renderEndpoints(endpoints) {
  const byHost = new Map();
  for (const e of endpoints) {
    if (!byHost.has(e.host)) byHost.set(e.host, []);
    byHost.get(e.host).push(e);
  }
  const out = [];
  for (const [host, eps] of [...byHost.entries()].sort()) {
    out.push(el("h3", host));
    const t = el("table", null, "endpoints");
    t.dataset.host = host;
    const head = el("thead");
    head.appendChild(row(["Endpoint", "Universe", "Address", "Interface", "Namespace", "Groups"]));
    t.appendChild(head);
    const body = el("tbody");
    for (const e of eps) {
      body.appendChild(row([e.id, e.universe, e.ip, e.interface, e.netns, (e.security_groups || []).join(", ")]));
    }
    t.appendChild(body);
    out.push(t);
  }
  if (out.length === 0) out.push(el("p", "No endpoints.", "note"));
  $("endpoints").replaceChildren(...out);
}

// `verse_drops_total{reason="..."} N` lines of /metrics.
function parseDrops(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^verse_drops_total\{reason="([a-z_0-9]+)"\} (\d+)/.exec(line);
    if (m) out.push([m[1], Number(m[2])]);
  }
  return out;
}

async function refresh() {
  try {
    const [hosts, universes, groups, endpoints] = await Promise.all([
      json("/v1/hosts"), json("/v1/universes"), json("/v1/security-groups"), json("/v1/endpoints"),
    ]);
    fill("hosts", hosts.map((h) => row([h.name, h.underlay_ip || "—", h.revision, h.healthy ? "yes" : "no"])));
    fill("universes", universes.map((u) => row([u.id, u.name, u.vni, (u.cidrs || []).join(", ")])));
    renderGroups(groups, universes);
    renderEndpoints(endpoints);
    try {
      const text = await (await api("/metrics", "text/plain")).text();
      const drops = parseDrops(text).filter(([, n]) => n > 0);
      fill("drops", drops.length ? drops.map(([r, n]) => row([r, n])) : [row(["no drops", ""])]);
      $("drops-note").hidden = true;
    } catch (e) {
      fill("drops", []);
      $("drops-note").hidden = false;
      $("drops-note").textContent = "Counters are not readable with this token: " + e.message;
    }
    $("updated").textContent = "Updated " + new Date().toLocaleTimeString();
    setStatus("Connected.");
    $("main").hidden = false;
    $("logout").hidden = false;
    $("refresh").hidden = false;
    return true;
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      setStatus("The token was refused: " + e.message, true);
      stop();
    } else {
      setStatus("Cannot read the API: " + e.message, true);
    }
    return false;
  }
}

// ---- Live events: JSON lines from GET /v1/events, read as a stream (fetch, so that the
// token goes in a header: EventSource cannot send one). ----

function eventText(ev) {
  return Object.values(ev).map((v) => (typeof v === "object" && v !== null ? JSON.stringify(v) : String(v))).join(" ").toLowerCase();
}

function isDrop(ev) {
  const v = String(ev.verdict || ev.action || "").toLowerCase();
  return v === "drop" || v === "dropped" || v === "reject" || (!!ev.reason && v === "");
}

function addr(ip, port) {
  if (!ip) return "";
  return port !== undefined && port !== null && port !== 0 ? ip + ":" + port : ip;
}

function renderEvents() {
  const verdict = $("filter-verdict").value;
  const text = $("filter-text").value.trim().toLowerCase();
  const rows = [];
  for (let i = events.length - 1; i >= 0; i--) {
    const ev = events[i];
    const drop = isDrop(ev);
    if (verdict === "drop" && !drop) continue;
    if (verdict === "admit" && drop) continue;
    if (text && !eventText(ev).includes(text)) continue;
    const rule = ev.rule && typeof ev.rule === "object" ? ev.rule.rule || ev.rule.id : ev.rule;
    const group = ev.group || (ev.rule && typeof ev.rule === "object" ? ev.rule.group : "");
    const tr = row([
      ev.time || "", ev.host || "", drop ? "drop" : (ev.verdict || "admit"), ev.reason || "",
      ev.endpoint || "", ev.universe || "", addr(ev.src, ev.sport), addr(ev.dst, ev.dport),
      ev.protocol || ev.proto || "", rule || "", group || "",
    ], drop ? "drop" : "admit");
    tr.children[2].classList.add("verdict");
    rows.push(tr);
  }
  fill("events", rows);
}

async function followEvents() {
  if (eventsAbort) eventsAbort.abort();
  const abort = new AbortController();
  eventsAbort = abort;
  const state = $("events-state");
  while (!abort.signal.aborted) {
    try {
      const resp = await fetch("/v1/events", {
        headers: { Authorization: "Bearer " + token(), Accept: "application/x-ndjson" },
        cache: "no-store",
        credentials: "omit",
        signal: abort.signal,
      });
      if (resp.status === 404) {
        state.textContent = "(this daemon serves no event stream)";
        return;
      }
      if (!resp.ok) {
        state.textContent = "(events refused: " + resp.status + ")";
        if (resp.status === 401 || resp.status === 403) return;
      } else {
        state.textContent = "(live)";
        const reader = resp.body.getReader();
        const decoder = new TextDecoder();
        let pending = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          pending += decoder.decode(value, { stream: true });
          let nl;
          let changed = false;
          while ((nl = pending.indexOf("\n")) >= 0) {
            const line = pending.slice(0, nl).trim();
            pending = pending.slice(nl + 1);
            if (!line) continue;
            try {
              events.push(JSON.parse(line));
              changed = true;
            } catch (_) { /* a line that is not an event */ }
          }
          if (events.length > MAX_EVENTS) events = events.slice(events.length - MAX_EVENTS);
          if (changed) renderEvents();
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
      state.textContent = "(reconnecting: " + e.message + ")";
    }
    await new Promise((r) => setTimeout(r, 2000));
  }
}

function stop() {
  if (refreshTimer) clearInterval(refreshTimer);
  refreshTimer = null;
  if (eventsAbort) eventsAbort.abort();
  eventsAbort = null;
}

async function start() {
  stop();
  if (!token()) return;
  if (await refresh()) {
    refreshTimer = setInterval(refresh, REFRESH_MS);
    followEvents();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const t = $("token").value.trim();
    $("token").value = "";
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    start();
  });
  $("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    stop();
    events = [];
    $("main").hidden = true;
    $("logout").hidden = true;
    $("refresh").hidden = true;
    setStatus("Token forgotten.");
  });
  $("refresh").addEventListener("click", refresh);
  $("filter-verdict").addEventListener("change", renderEvents);
  $("filter-text").addEventListener("input", renderEvents);
  $("events-clear").addEventListener("click", () => { events = []; renderEvents(); });
  start();
});
