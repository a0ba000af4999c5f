// Offshoot console: live branch table, actions through the JSON API, copy buttons.
// Every write sends the console's header, which the server requires next to the
// session cookie (a cross-site form cannot add it).
"use strict";

const sep = document.body.dataset.sep || ".";

async function api(method, url, body) {
  const init = { method, credentials: "same-origin", headers: { "X-Offshoot-Console": "1", "Accept": "application/json" } };
  if (method !== "GET") {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body || {});
  }
  const res = await fetch(url, init);
  if (res.status === 401 && url !== "/login") {
    location.href = "/login?next=" + encodeURIComponent(location.pathname);
    throw new Error("log in first");
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { /* not JSON */ }
  if (!res.ok) {
    // {"error": {"code": "...", "message": "...", "sqlstate"?: "..."}}: the API's one error shape.
    const err = data && data.error;
    const msg = (err && typeof err.message === "string" && err.message) || res.statusText || `HTTP ${res.status}`;
    const e = new Error(msg);
    e.status = res.status;
    e.code = err && err.code;
    throw e;
  }
  return data;
}

function ago(iso) {
  const t = Date.parse(iso);
  if (isNaN(t)) return { text: "unknown", secs: 0 };
  const s = Math.max(0, Math.floor((Date.now() - t) / 1000));
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  const text = d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${s % 60}s` : `${s}s`;
  return { text, secs: s };
}

// "23.4 MB": decimal units, as the server's pages write them.
function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let v = n, i = 0;
  while (v >= 1000 && i < units.length - 1) { v /= 1000; i++; }
  return i === 0 ? `${n} B` : `${v.toFixed(1)} ${units[i]}`;
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

// ---- Branches table ----
const table = document.getElementById("branches");
if (table) {
  const tbody = table.querySelector("tbody");
  const filter = document.getElementById("filter");
  const stateFilter = document.getElementById("state-filter");
  const updated = document.getElementById("updated");
  const empty = document.getElementById("no-branches");
  const params = new URLSearchParams(location.search);
  if (params.get("source")) filter.value = params.get("source");
  if (params.get("state")) stateFilter.value = params.get("state");
  let rows = [];
  let sortKey = "age", sortDir = 1;

  const value = (b, key) => {
    switch (key) {
      case "idle": return ago(b.last_active).secs;
      case "age": return ago(b.created_at).secs;
      case "connections": return b.connections;
      case "persistent": return b.persistent ? 1 : 0;
      case "protected": return b.protected ? 1 : 0;
      case "size_bytes": return b.size_bytes === null || b.size_bytes === undefined ? -1 : b.size_bytes;
      default: return (b[key] || "").toString();
    }
  };

  function render() {
    const q = filter.value.trim().toLowerCase();
    const st = stateFilter.value;
    const shown = rows
      .filter(b => !q || `${b.source}${sep}${b.branch}`.toLowerCase().includes(q))
      .filter(b => !st || b.state === st)
      .sort((a, b) => {
        const x = value(a, sortKey), y = value(b, sortKey);
        return (x < y ? -1 : x > y ? 1 : 0) * sortDir;
      });
    tbody.replaceChildren(...shown.map(b => {
      const href = `/branches/${encodeURIComponent(b.source)}/${encodeURIComponent(b.branch)}`;
      return el("tr", { "data-branch": `${b.source}${sep}${b.branch}` },
        el("td", {}, b.source),
        el("td", {}, el("a", { href }, b.branch)),
        el("td", {}, el("span", { class: `state s-${b.state}` }, b.state)),
        el("td", { class: "num" }, b.connections),
        el("td", { class: "num" }, b.connections > 0 ? "in use" : ago(b.last_active).text),
        el("td", { class: "num", title: b.created_at }, ago(b.created_at).text),
        el("td", {}, b.persistent ? "yes" : "no"),
        el("td", {}, b.policy || "—"),
        el("td", { title: b.expires_at || "" }, b.expires_at ? new Date(b.expires_at).toLocaleString() : "never"),
        el("td", { title: b.protected_until || "" }, b.protected ? "yes" : "no"),
        el("td", { class: "num", "data-field": "size", title: b.size_exact === false ? "apparent size (blocks shared with the snapshot counted)" : "" }, bytes(b.size_bytes)),
        el("td", {}, b.snapshot || "—"),
        el("td", {}, b.copy_mode || "—"));
    }));
    empty.hidden = rows.length > 0;
    if (rows.length > 0 && shown.length === 0) {
      tbody.replaceChildren(el("tr", {}, el("td", { colspan: 13, class: "muted" }, "No branch matches the filter.")));
    }
  }

  for (const th of table.querySelectorAll("th[data-key]")) {
    th.addEventListener("click", () => {
      sortDir = sortKey === th.dataset.key ? -sortDir : 1;
      sortKey = th.dataset.key;
      table.querySelectorAll("th").forEach(h => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      render();
    });
  }
  filter.addEventListener("input", render);
  stateFilter.addEventListener("change", render);

  async function refresh() {
    try {
      rows = await api("GET", "/api/v1/branches");
      updated.textContent = "updated " + new Date().toLocaleTimeString();
      render();
    } catch (e) {
      updated.textContent = "refresh failed: " + e.message;
    }
  }
  refresh();
  setInterval(refresh, 2000);
}

// ---- A branch's recent events (the audit trail) ----
const recent = document.getElementById("recent-events");
const detailCard = document.getElementById("detail");
if (recent && detailCard) {
  const list = recent.querySelector("ul");
  const q = new URLSearchParams({ source: detailCard.dataset.source, branch: detailCard.dataset.branch, limit: "20" });
  const load = async () => {
    try {
      const events = await api("GET", "/api/v1/events?" + q);
      if (!events.length) {
        list.replaceChildren(el("li", { class: "muted" }, "No events recorded for this branch."));
        return;
      }
      list.replaceChildren(...events.map(e => {
        const who = e.actor ? e.actor.kind + (e.actor.role ? ` ${e.actor.role}` : "") : "";
        const why = e.reason ? ` (${e.reason})` : "";
        const err = e.error ? `: ${e.error}` : "";
        return el("li", { "data-action": e.action, title: e.at },
          el("time", { datetime: e.at }, new Date(e.at).toLocaleString()), " ",
          el("strong", {}, e.action), ` by ${who}${why}${err}`);
      }));
    } catch (err) {
      list.replaceChildren(el("li", { class: "muted" }, "Events unavailable: " + err.message));
    }
  };
  load();
  setInterval(load, 5000);
}

// ---- Create form ----
const create = document.getElementById("create");
if (create) {
  create.addEventListener("submit", async ev => {
    ev.preventDefault();
    const f = new FormData(create);
    const source = f.get("source"), branch = f.get("branch").trim();
    const out = create.querySelector(".error");
    out.textContent = "";
    if (!confirm(`Create branch ${source}${sep}${branch}?`)) return;
    const button = create.querySelector("button");
    button.disabled = true;
    try {
      const body = { source, branch, persistent: f.get("persistent") === "on" };
      const ttl = (f.get("ttl") || "").trim();
      if (ttl) body.ttl = ttl;
      await api("POST", "/api/v1/branches", body);
      location.href = `/branches/${encodeURIComponent(source)}/${encodeURIComponent(branch)}`;
    } catch (e) {
      out.textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
}

// ---- Branch detail ----
const detail = document.getElementById("detail");
if (detail) {
  const { source, branch, name } = detail.dataset;
  const url = `/api/v1/branches/${encodeURIComponent(source)}/${encodeURIComponent(branch)}`;
  const field = k => detail.querySelector(`[data-field="${k}"]`);
  const actions = document.querySelector(".actions");
  const out = actions && actions.querySelector(".error");
  let gone = false;

  function show(b) {
    const st = field("state");
    st.textContent = b.state;
    st.className = `state s-${b.state}`;
    field("connections").textContent = b.connections;
    field("idle").textContent = b.connections > 0 ? "in use" : ago(b.last_active).text;
    field("expires_at").textContent = b.expires_at || "never";
    field("protected").textContent = b.protected ? (b.protected_until ? `yes, until ${b.protected_until}` : "yes") : "no";
    if (actions) {
      const p = actions.querySelector('[data-action="protect"]'), u = actions.querySelector('[data-action="unprotect"]');
      if (p) p.hidden = b.protected;
      if (u) u.hidden = !b.protected;
    }
  }
  function vanished() {
    gone = true;
    const st = field("state");
    st.textContent = "deleted";
    st.className = "state s-expiring";
    if (actions) actions.querySelectorAll("button").forEach(b => { b.disabled = true; });
  }
  async function refresh() {
    if (gone) return;
    try { show(await api("GET", url)); } catch (e) { if (e.status === 404) vanished(); }
  }
  setInterval(refresh, 2000);

  if (actions) {
    actions.addEventListener("click", async ev => {
      const action = ev.target.dataset && ev.target.dataset.action;
      if (!action) return;
      out.textContent = "";
      const questions = {
        delete: `Delete branch ${name}? Its data is removed for good.`,
        "force-delete": `Delete branch ${name} and terminate its open sessions? Its data is removed for good.`,
        suspend: `Suspend branch ${name}? Its server stops; the next connection starts it again.`,
        reset: `Reset branch ${name} to a fresh copy of its source? Its changes are lost.`,
        protect: `Protect branch ${name}? It is then never deleted nor expired until unprotected.`,
        unprotect: `Unprotect branch ${name}? Its expiry and deletion apply again.`,
      };
      let ttl = null;
      if (action === "ttl") {
        ttl = prompt(`New TTL for branch ${name} (e.g. 3d or 12h; empty: the policy's own)`, "1d");
        if (ttl === null) return;
      } else if (!confirm(questions[action])) {
        return;
      }
      ev.target.disabled = true;
      const status = actions.querySelector('[role="status"]');
      if (status) status.textContent = "";
      try {
        if (action === "suspend") {
          show(await api("POST", url + "/suspend"));
        } else if (action === "reset") {
          const b = await api("POST", url + "/reset", { snapshot: null, force: false });
          if (b && b.state) show(b);
          if (status) status.textContent = `${name} was reset.`;
        } else if (action === "protect" || action === "unprotect") {
          show(await api("PATCH", url, { protected: action === "protect" }));
        } else if (action === "ttl") {
          show(await api("PATCH", url, { ttl: ttl.trim() === "" ? null : ttl.trim() }));
        } else {
          await api("DELETE", action === "force-delete" ? url + "?force=true" : url);
          vanished();
        }
      } catch (e) {
        out.textContent = e.message;
        // Open sessions keep a branch; offer to end them, as the API can.
        if (action === "delete" && e.status === 409 && !/protected/.test(e.message) && !actions.querySelector('[data-action="force-delete"]')) {
          const force = el("button", { class: "danger", "data-action": "force-delete" }, "Delete and terminate sessions");
          ev.target.after(" ", force);
        }
      } finally {
        if (!gone) ev.target.disabled = false;
      }
    });
  }
}

// ---- Copy buttons ----
document.addEventListener("click", async ev => {
  const id = ev.target.dataset && ev.target.dataset.copy;
  if (!id) return;
  const code = document.getElementById(id);
  try {
    await navigator.clipboard.writeText(code.textContent);
  } catch (_) {
    // Plain http to a non-local address has no clipboard API: select the text instead.
    const r = document.createRange();
    r.selectNodeContents(code);
    getSelection().removeAllRanges();
    getSelection().addRange(r);
    document.execCommand("copy");
  }
  ev.target.textContent = "Copied";
  setTimeout(() => { ev.target.textContent = "Copy"; }, 1500);
});

// ---- Login and logout ----
const login = document.getElementById("login");
if (login) {
  login.addEventListener("submit", async ev => {
    ev.preventDefault();
    const out = login.querySelector(".error");
    out.textContent = "";
    try {
      await api("POST", "/login", { token: new FormData(login).get("token") });
      location.href = login.dataset.next || "/";
    } catch (e) {
      out.textContent = e.message;
    }
  });
}
document.addEventListener("click", async ev => {
  if (!ev.target.dataset || ev.target.dataset.action !== "logout") return;
  await api("POST", "/logout").catch(() => {});
  location.href = "/login";
});

// ---- Charts ----
const panel = document.getElementById("charts-panel");
if (panel) {
  setInterval(async () => {
    const res = await fetch("/charts/panel", { credentials: "same-origin" });
    if (res.ok) panel.innerHTML = await res.text();
  }, 10000);
}

// ---- Events (the audit trail) ----
const eventsTable = document.getElementById("events");
if (eventsTable) {
  const tbody = eventsTable.querySelector("tbody");
  const form = document.getElementById("event-filters");
  const updated = document.getElementById("updated");
  const out = document.getElementById("events-error");
  const params = new URLSearchParams(location.search);
  for (const k of ["source", "branch", "action"]) {
    if (params.get(k)) form.elements[k].value = params.get(k);
  }
  async function load() {
    const q = new URLSearchParams({ limit: "200" });
    for (const k of ["source", "branch", "action"]) {
      const v = form.elements[k].value.trim();
      if (v) q.set(k, v);
    }
    try {
      const events = await api("GET", "/api/v1/events?" + q);
      out.textContent = "";
      updated.textContent = "updated " + new Date().toLocaleTimeString();
      if (!events.length) {
        tbody.replaceChildren(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No event matches.")));
        return;
      }
      tbody.replaceChildren(...events.map(e => {
        const who = e.actor ? e.actor.kind + (e.actor.role ? ` ${e.actor.role}` : "") : "";
        const branchCell = e.source && e.branch
          ? el("a", { href: `/branches/${encodeURIComponent(e.source)}/${encodeURIComponent(e.branch)}` }, e.branch)
          : (e.branch || "—");
        return el("tr", { "data-action": e.action, "data-branch": e.source && e.branch ? `${e.source}${sep}${e.branch}` : "" },
          el("td", { title: e.at }, el("time", { datetime: e.at }, new Date(e.at).toLocaleString())),
          el("td", {}, el("strong", {}, e.action)),
          el("td", {}, e.source || "—"),
          el("td", {}, branchCell),
          el("td", {}, who),
          el("td", {}, e.reason || ""),
          el("td", {}, e.error ? `${e.outcome}: ${e.error}` : e.outcome));
      }));
    } catch (err) {
      out.textContent = err.message;
    }
  }
  form.addEventListener("submit", ev => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const k of ["source", "branch", "action"]) {
      const v = form.elements[k].value.trim();
      if (v) q.set(k, v);
    }
    history.replaceState(null, "", "/events" + (q.toString() ? "?" + q : ""));
    load();
  });
  load();
  setInterval(load, 5000);
}
