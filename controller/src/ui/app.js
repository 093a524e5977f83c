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

// Per-rule hit counters, when this daemon serves them (`GET /v1/rule-stats`: one row per rule
// that a host counted, `{rule, group, universe, flows, packets}`), else `null`: then the page
// says that rules are not counted and shows no number. Nothing is ever inferred.
let ruleStats = null;
let ruleStatsWhy = "";

// The hits of rule `r`: its own `hits` field when the API gives one, else the rule-stats row.
function hits(r) {
  let h = r.hits;
  if ((h === undefined || h === null) && ruleStats) h = ruleStats.get(r.id) || { flows: 0 };
  if (h === undefined || h === null) return { text: "not counted", never: false, counted: false };
  if (typeof h === "number") return { text: h === 0 ? "never matched" : String(h), never: h === 0, counted: true };
  // Only what the daemon counts: flows always, packets where it reports them.
  const flows = Number(h.flows || 0);
  const hasPackets = typeof h.packets === "number";
  const packets = hasPackets ? h.packets : 0;
  if (flows === 0 && packets === 0) return { text: "never matched", never: true, counted: true };
  return { text: flows + " flows" + (hasPackets ? ", " + packets + " packets" : ""), never: false, counted: true };
}

async function loadRuleStats() {
  try {
    const rows = await json("/v1/rule-stats");
    const m = new Map();
    for (const r of rows) {
      const prev = m.get(r.rule) || { flows: 0 };
      const sum = { flows: prev.flows + Number(r.flows || 0) };
      if (typeof r.packets === "number") sum.packets = (prev.packets || 0) + r.packets;
      m.set(r.rule, sum);
    }
    ruleStats = m;
    ruleStatsWhy = "";
  } catch (e) {
    ruleStats = null;
    ruleStatsWhy = e instanceof ApiError && e.status === 404
      ? "This daemon does not count rule hits (GET /v1/rule-stats: 404): no counts are shown."
      : "Rule hit counters could not be read: " + e.message;
  }
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
    let uncounted = false;
    for (const r of rules) {
      const tr = row([r.id, r.direction, r.protocol, ports(r), r.cidr || r.group || "", "", r.description || ""]);
      const hc = hits(r);
      const td = tr.children[5];
      td.textContent = hc.text;
      td.classList.add(hc.counted ? "hits" : "uncounted");
      if (hc.never) td.classList.add("never");
      if (!hc.counted) uncounted = true;
      body.appendChild(tr);
    }
    if (rules.length === 0) body.appendChild(row(["no rules", "", "", "", "", "", ""]));
    t.appendChild(body);
    out.push(t);
    if (uncounted && ruleStatsWhy) out.push(el("p", ruleStatsWhy, "note hits-note"));
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
      body.appendChild(row([e.id, e.universe, [e.ip, e.ipv6].filter(Boolean).join(", "), e.interface, e.netns, (e.security_groups || []).join(", ")]));
    }
    t.appendChild(body);
    out.push(t);
  }
  if (out.length === 0) out.push(el("p", "No endpoints.", "note"));
  $("endpoints").replaceChildren(...out);
}

// The `verse_drops_total` samples of a Prometheus text: `{labels, value}` with every label
// (reason, and hook where the daemon counts per hook).
function parseDrops(text) {
  const out = [];
  for (const line of text.split("\n")) {
    const m = /^verse_drops_total\{([^}]*)\}\s+([0-9.eE+]+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const kv of m[1].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"/g)) labels[kv[1]] = kv[2];
    out.push({ labels, value: Number(m[2]) });
  }
  return out;
}

function renderDrops(text) {
  const samples = parseDrops(text);
  const note = $("drops-note");
  if (samples.length === 0) {
    fill("drops", []);
    note.hidden = false;
    note.textContent = "This daemon's /metrics has no verse_drops_total: its drops cannot be shown.";
    return;
  }
  const hooked = samples.some((s) => s.labels.hook !== undefined);
  $("drops-hook").hidden = !hooked;
  const rows = samples
    .filter((s) => s.value > 0)
    .sort((a, b) => b.value - a.value)
    .map((s) => {
      const tr = row([s.labels.reason || "?", s.labels.hook || "", s.value]);
      tr.children[1].hidden = !hooked;
      return tr;
    });
  if (rows.length === 0) {
    const none = row(["no drops", "", ""]);
    none.children[1].hidden = !hooked;
    rows.push(none);
  }
  fill("drops", rows);
  note.hidden = true;
}

async function refresh() {
  try {
    const [hosts, universes, groups, endpoints] = await Promise.all([
      json("/v1/hosts"), json("/v1/universes"), json("/v1/security-groups"), json("/v1/endpoints"),
    ]);
    fill("hosts", hosts.map((h) => row([h.name, h.underlay_ip || "—", h.revision, h.healthy ? "yes" : "no"])));
    fill("universes", universes.map((u) => row([u.id, u.name, u.vni, (u.cidrs || []).concat(u.ipv6_cidrs || []).join(", ")])));
    await loadRuleStats();
    renderGroups(groups, universes);
    renderEndpoints(endpoints);
    try {
      renderDrops(await (await api("/metrics", "text/plain")).text());
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

// An event's verdict: "dropped" or "admitted" (GET /v1/events).
function isDrop(ev) {
  return String(ev.verdict || "").toLowerCase() === "dropped";
}

// An address and its port; an IPv6 address in brackets before a port ("[fd00::7]:443").
function addr(ip, port) {
  if (!ip) return "";
  if (port === undefined || port === null) return ip;
  return (ip.includes(":") ? "[" + ip + "]" : ip) + ":" + port;
}

// What decided: the rules that admitted a new flow, or the groups a policy drop searched.
function decidedBy(ev) {
  if (Array.isArray(ev.rules) && ev.rules.length) {
    return {
      rule: ev.rules.map((r) => r.id + (r.direction ? " (" + r.direction + ")" : "")).join(", "),
      group: ev.rules.map((r) => r.group_name ? r.group_name + " " + r.group : r.group).join(", "),
    };
  }
  if (ev.searched && Array.isArray(ev.searched.groups)) {
    return { rule: "no " + (ev.searched.direction || "") + " rule admits", group: ev.searched.groups.join(", ") };
  }
  return { rule: "", group: "" };
}

function renderEvents() {
  const verdict = $("filter-verdict").value;
  const text = $("filter-text").value.trim().toLowerCase();
  const rows = [];
  for (let i = events.length - 1; i >= 0; i--) {
    const ev = events[i];
    const drop = isDrop(ev);
    if (verdict === "dropped" && !drop) continue;
    if (verdict === "admitted" && drop) continue;
    if (text && !eventText(ev).includes(text)) continue;
    const by = decidedBy(ev);
    const proto = ev.protocol || "";
    const service = ev.icmp_type !== undefined && ev.icmp_type !== null
      ? proto + " " + ev.icmp_type + "/" + ev.icmp_code : proto;
    const tr = row([
      ev.time || "", ev.host || "", ev.verdict || "", ev.reason || "", ev.endpoint || "",
      ev.universe || "", addr(ev.src, ev.sport), addr(ev.dst, ev.dport), service, by.rule, by.group,
    ], drop ? "drop" : "admit");
    tr.children[2].classList.add("verdict");
    if (ev.message) tr.title = ev.message;
    rows.push(tr);
  }
  if (rows.length === 0) {
    const empty = row([eventsNote || "No events yet.", "", "", "", "", "", "", "", "", "", ""]);
    empty.children[0].colSpan = 11;
    while (empty.children.length > 1) empty.removeChild(empty.lastChild);
    empty.classList.add("note");
    rows.push(empty);
  }
  fill("events", rows);
}

// What the stream itself says (no stream, refused, notices of hosts).
let eventsNote = "";

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
        state.textContent = "(not served by this daemon)";
        eventsNote = "This daemon serves no event stream (GET /v1/events: 404): no drops or flows can be shown live. The drop counters below are its only record of drops.";
        renderEvents();
        return;
      }
      if (!resp.ok) {
        state.textContent = "(events refused: " + resp.status + ")";
        eventsNote = "The event stream was refused (" + resp.status + ").";
        renderEvents();
        if (resp.status === 401 || resp.status === 403) return;
      } else {
        state.textContent = "(live)";
        eventsNote = "No events yet.";
        renderEvents();
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
            let rec;
            try { rec = JSON.parse(line); } catch (_) { continue; /* not JSON: not an event */ }
            if (rec.kind === "notice") {
              $("events-notice").textContent = (rec.host ? rec.host + ": " : "") + (rec.message || "");
              $("events-notice").hidden = false;
            } else if (rec.kind === "event" || rec.kind === undefined) {
              events.push(rec);
              changed = true;
            }
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
