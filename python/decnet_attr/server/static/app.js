// decnet-attr dashboard: vanilla ES modules (this one and chart.js), no
// dependencies, no build step.
//
// Security notes:
// - The access token lives in memory and in sessionStorage (this tab only), and
//   is only ever sent in an Authorization header; never in a URL. The event
//   stream is authorised with a single-use ticket minted for every connect.
// - Everything shown comes from attackers: the DOM is built with textContent
//   and setAttribute only (never innerHTML), so nothing is ever parsed as HTML.

import { rateChart } from "./chart.js";

const API = "/api/v1";
const TOKEN_KEY = "decnet-attr.token";
const MUST_CHANGE_DETAIL = "Password change required before accessing this resource";

const STATES = ["stable", "drifting", "conflicted", "multi_actor", "unknown"];
const LABELS = {
  stable: "STABLE",
  drifting: "DRIFTING",
  conflicted: "CONFLICTED",
  multi_actor: "MULTI-ACTOR",
  unknown: "UNKNOWN",
};
const PAGE_SIZE = 25;
const LIST_REFRESH_MS = 15000;
const TIMELINE_MAX = 16;
const VALUE_COLOURS = 8;
const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 10000;
const EXPLAIN_PREFETCH_MAX = 64;
const EXPLAIN_CONCURRENCY = 4;
const PASSWORD_MIN = 12;
const PASSWORD_MAX = 72;
const MULTI_ACTOR_MIN_PRIMITIVES = 2;
// Every event the relay may send (reference §7 plus our additions).
const STREAM_EVENTS = [
  "snapshot",
  "observation",
  "fingerprint.rotated",
  "attacker.scored",
  "attribution.state_changed",
  "attribution.updated",
  "attribution.multi_actor_suspected",
  "identity.formed",
  "identity.merged",
  "stale",
  "gap",
];

// ---------------------------------------------------------------------------------------
// DOM helpers (text only)
// ---------------------------------------------------------------------------------------
const SVG_NS = "http://www.w3.org/2000/svg";

function applyProps(el, props) {
  if (!props) return;
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "text") el.textContent = String(value);
    else if (key === "on") {
      for (const [name, fn] of Object.entries(value)) el.addEventListener(name, fn);
    } else if (key === "class") el.setAttribute("class", String(value));
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function appendAll(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function h(tag, props, ...children) {
  const el = document.createElement(tag);
  applyProps(el, props);
  appendAll(el, children);
  return el;
}

function svg(tag, props, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  applyProps(el, props);
  appendAll(el, children);
  return el;
}

function mainEl() {
  return document.getElementById("main");
}

function setView(...nodes) {
  const main = mainEl();
  main.replaceChildren(...nodes);
}

// ---------------------------------------------------------------------------------------
// formatting
// ---------------------------------------------------------------------------------------
const relFormat =
  typeof Intl !== "undefined" && Intl.RelativeTimeFormat
    ? new Intl.RelativeTimeFormat(undefined, { numeric: "auto" })
    : null;

function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

// A time as a Date: epoch seconds (attribution rows, observations) or an
// ISO-8601 string (attackers, as DECNET's list and detail give them).
function asDate(ts) {
  if (isNum(ts)) return new Date(ts * 1000);
  if (typeof ts !== "string" || !ts) return null;
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? null : d;
}

function absTime(ts) {
  const d = asDate(ts);
  return d ? d.toLocaleString() : "—";
}

function isoTime(ts) {
  const d = asDate(ts);
  return d ? d.toISOString() : "";
}

function relTime(ts) {
  const d = asDate(ts);
  if (!d) return "—";
  const diff = (d.getTime() - Date.now()) / 1000; // negative: in the past
  const abs = Math.abs(diff);
  const units = [
    [60, "second", 1],
    [3600, "minute", 60],
    [86400, "hour", 3600],
    [86400 * 30, "day", 86400],
    [86400 * 365, "month", 86400 * 30],
    [Infinity, "year", 86400 * 365],
  ];
  for (const [limit, unit, size] of units) {
    if (abs < limit) {
      const n = Math.round(diff / size);
      if (relFormat) return relFormat.format(n, unit);
      return n <= 0 ? `${-n} ${unit}(s) ago` : `in ${n} ${unit}(s)`;
    }
  }
  return absTime(ts);
}

function timeNode(ts) {
  return h("time", { datetime: isoTime(ts) || undefined, title: absTime(ts) }, relTime(ts));
}

function formatNumber(v) {
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(6)));
}

// A value as display text (full) — strings as they are, everything else as JSON.
function valueText(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "string") return v;
  if (typeof v === "number") return formatNumber(v);
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

function shorten(text, max = 64) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

function valueNode(v, max = 64) {
  if (v === null || v === undefined) return h("span", { class: "null" }, "null");
  const full = valueText(v);
  return h("span", { class: "value-main", title: full.length > max ? full : undefined }, shorten(full, max));
}

// A stable key for counting / colouring values (objects by canonical JSON).
function valueKey(v) {
  return canonical(v);
}

function canonical(v) {
  if (v === null || typeof v !== "object") return JSON.stringify(v === undefined ? null : v);
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  const keys = Object.keys(v).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
}

function pct(confidence) {
  return isNum(confidence) ? `${Math.round(confidence * 100)}%` : "—";
}

function stateOf(state) {
  return STATES.includes(state) ? state : "unknown";
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function describeDetail(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => (d && typeof d === "object" ? d.reason || d.msg || JSON.stringify(d) : String(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}

// ---------------------------------------------------------------------------------------
// session and API
// ---------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

const session = {
  token: null,
  user: null,
  // The password typed at a login that requires a change: kept in memory only,
  // to prefill the forced change form, and dropped right after.
  pendingOldPassword: null,
};

function loadToken() {
  try {
    return window.sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

function storeToken(token) {
  session.token = token;
  try {
    if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
    else window.sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: memory only */
  }
}

async function api(path, { method = "GET", body, auth = true } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth && session.token) headers.Authorization = `Bearer ${session.token}`;
  let resp;
  try {
    resp = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "same-origin",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, "The server cannot be reached");
  }
  let data = null;
  const text = await resp.text().catch(() => "");
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!resp.ok) {
    const detail = describeDetail(data && data.detail) || `${resp.status} ${resp.statusText}`;
    const err = new ApiError(resp.status, detail, resp.headers.get("Retry-After"));
    if (auth && resp.status === 401) sessionEnded("Your session has ended. Please sign in again.");
    else if (auth && resp.status === 403 && detail === MUST_CHANGE_DETAIL) mustChangePassword();
    throw err;
  }
  return data;
}

function sessionEnded(message) {
  if (!session.token) return;
  storeToken(null);
  session.user = null;
  flash.loginMessage = message;
  route();
}

function mustChangePassword() {
  if (session.user) session.user.must_change_password = true;
  else session.user = { must_change_password: true };
  route();
}

const flash = { loginMessage: "" };

// ---------------------------------------------------------------------------------------
// views and routing
// ---------------------------------------------------------------------------------------
let currentView = null;

function teardown() {
  if (currentView && currentView.destroy) currentView.destroy();
  currentView = null;
}

function renderSession() {
  const box = document.getElementById("session");
  const who = document.getElementById("session-user");
  if (session.token && session.user && session.user.username) {
    who.textContent = `${session.user.username} (${session.user.role})`;
    box.hidden = false;
  } else if (session.token) {
    who.textContent = "";
    box.hidden = false;
  } else {
    box.hidden = true;
  }
}

function route() {
  teardown();
  renderSession();
  if (!session.token) {
    currentView = loginView();
    return;
  }
  if (session.user && session.user.must_change_password) {
    currentView = changePasswordView();
    return;
  }
  const idm = /^#\/identities\/([^/?#]+)$/.exec(window.location.hash);
  if (idm) {
    let id = "";
    try {
      id = decodeURIComponent(idm[1]);
    } catch {
      id = "";
    }
    currentView = identityView(id);
    const main = mainEl();
    if (document.activeElement === document.body) main.focus({ preventScroll: true });
    return;
  }
  const m = /^#\/attackers\/([^/?#]+)$/.exec(window.location.hash);
  if (m) {
    let uuid;
    try {
      uuid = decodeURIComponent(m[1]);
    } catch {
      uuid = "";
    }
    currentView = attackerView(uuid);
  } else {
    currentView = listView();
  }
  const main = mainEl();
  if (document.activeElement === document.body) main.focus({ preventScroll: true });
}

async function logout() {
  const token = session.token;
  storeToken(null);
  session.user = null;
  flash.loginMessage = "You are signed out.";
  route();
  if (token) {
    // best effort: the token is already forgotten here
    try {
      await fetch(`${API}/auth/logout`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch {
      /* offline: the token expires on its own */
    }
  }
}

// ---- login ---------------------------------------------------------------------------
function field(id, label, input, hint) {
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    input,
    hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null,
  );
}

function loginView() {
  const error = h("p", { class: "form-error", role: "alert", "aria-live": "assertive" });
  const user = h("input", {
    id: "login-username",
    name: "username",
    autocomplete: "username",
    required: true,
    maxlength: "128",
    autocapitalize: "none",
    spellcheck: "false",
  });
  const pass = h("input", {
    id: "login-password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "login-submit" }, "Sign in");
  const note = flash.loginMessage ? h("p", { role: "status" }, flash.loginMessage) : null;
  flash.loginMessage = "";
  const form = h(
    "form",
    { class: "card auth", "data-testid": "login-form", "aria-labelledby": "login-title", novalidate: true },
    h("h1", { id: "login-title" }, "Sign in"),
    note,
    error,
    field("login-username", "Username", user),
    field("login-password", "Password", pass),
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    if (!user.value || !pass.value) {
      error.textContent = "Enter your username and password.";
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("/auth/login", {
        method: "POST",
        body: { username: user.value, password: pass.value },
        auth: false,
      });
      storeToken(res.access_token);
      if (res.must_change_password) {
        session.pendingOldPassword = pass.value;
        session.user = { username: user.value, role: "", must_change_password: true };
      } else {
        session.user = await api("/auth/me");
      }
      route();
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.detail : "Sign-in failed.";
      submit.disabled = false;
      pass.select();
    }
  });
  setView(form);
  user.focus();
  return { destroy() {} };
}

// ---- forced password change ----------------------------------------------------------
function changePasswordView() {
  const error = h("p", { class: "form-error", role: "alert", "aria-live": "assertive" });
  const old = h("input", {
    id: "cp-old",
    name: "old_password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  if (session.pendingOldPassword) old.value = session.pendingOldPassword;
  const next = h("input", {
    id: "cp-new",
    name: "new_password",
    type: "password",
    autocomplete: "new-password",
    required: true,
    minlength: String(PASSWORD_MIN),
    maxlength: String(PASSWORD_MAX),
    "aria-describedby": "cp-new-hint",
  });
  const confirm = h("input", {
    id: "cp-confirm",
    name: "confirm_password",
    type: "password",
    autocomplete: "new-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  const submit = h(
    "button",
    { type: "submit", class: "btn btn-primary", "data-testid": "change-password-submit" },
    "Change password",
  );
  const cancel = h("button", { type: "button", class: "btn", on: { click: logout } }, "Log out");
  const form = h(
    "form",
    {
      class: "card auth",
      "data-testid": "change-password-form",
      "aria-labelledby": "cp-title",
      novalidate: true,
    },
    h("h1", { id: "cp-title" }, "Choose a new password"),
    h("p", null, "This account must change its password before it can be used."),
    error,
    // for password managers: which account this is
    h("input", {
      type: "text",
      name: "username",
      autocomplete: "username",
      value: (session.user && session.user.username) || "",
      readonly: true,
      hidden: true,
    }),
    field("cp-old", "Current password", old),
    field("cp-new", "New password", next, `${PASSWORD_MIN} to ${PASSWORD_MAX} characters.`),
    field("cp-confirm", "Repeat the new password", confirm),
    h("div", { class: "actions" }, cancel, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    if (!old.value) {
      error.textContent = "Enter the current password.";
      return;
    }
    if (next.value.length < PASSWORD_MIN || next.value.length > PASSWORD_MAX) {
      error.textContent = `The new password must be ${PASSWORD_MIN} to ${PASSWORD_MAX} characters long.`;
      return;
    }
    if (next.value !== confirm.value) {
      error.textContent = "The two new passwords differ.";
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("/auth/change-password", {
        method: "POST",
        body: { old_password: old.value, new_password: next.value },
      });
      session.pendingOldPassword = null;
      storeToken(res.access_token);
      session.user = await api("/auth/me");
      route();
    } catch (e) {
      if (!session.token) return; // 401: already back at the login
      error.textContent = e instanceof ApiError ? e.detail : "The password could not be changed.";
      submit.disabled = false;
    }
  });
  setView(form);
  (old.value ? next : old).focus();
  return { destroy() {} };
}

// ---- the front page: fleet overview, alerts feed, attackers list ----------------------
// The list's filters live in the page URL (#/?ip=…&state=…), so a view can be
// shared and survives a reload; the server does the filtering and paging.
const FILTER_KEYS = ["ip", "attacker", "identity", "state", "multi_actor", "seen_within", "sort_by", "order"];
const SORTS = { last_seen: "Last seen", first_seen: "First seen", observations: "Observations" };
const WINDOWS = { "": "any time", "15m": "last 15 minutes", "1h": "last hour", "24h": "last 24 hours", "7d": "last 7 days" };
const OVERVIEW_EVENTS = ["snapshot", "overview", "alert", "attacker.new", "stale", "gap"];
const ALERTS_SHOWN = 50;
const RATE_POINTS = 120;
// The list is read again at most this often while the fleet changes.
const LIST_LIVE_MS = 1000;

function listQuery() {
  const m = /^#\/?\?(.*)$/.exec(window.location.hash);
  const params = new URLSearchParams(m ? m[1] : "");
  const q = {};
  for (const key of FILTER_KEYS) {
    const v = params.get(key);
    if (v) q[key] = v;
  }
  const offset = Number(params.get("offset"));
  q.offset = Number.isInteger(offset) && offset > 0 ? offset : 0;
  return q;
}

function writeListQuery(q) {
  const params = new URLSearchParams();
  for (const key of FILTER_KEYS) if (q[key]) params.set(key, q[key]);
  if (q.offset) params.set("offset", String(q.offset));
  const text = params.toString();
  // replaceState: no hashchange, so the view (and its stream) stays
  window.history.replaceState(null, "", text ? `#/?${text}` : "#/");
}

function statePills(counts) {
  const box = h("div", { class: "pills" });
  let any = false;
  for (const st of STATES) {
    const n = counts && isNum(counts[st]) ? counts[st] : 0;
    if (n > 0) any = true;
    box.append(
      h(
        "span",
        {
          class: `pill state-${st}${n > 0 ? "" : " zero"}`,
          title: `${n} ${LABELS[st]}`,
          "data-state": st,
        },
        `${LABELS[st]} ${n}`,
      ),
    );
  }
  if (!any) box.append(h("span", { class: "muted" }, "no attribution yet"));
  return box;
}

function multiMarker() {
  return h(
    "span",
    { class: "multi-marker", title: "Several operators suspected", "data-testid": "multi-actor-marker" },
    "⚑ MULTI-ACTOR",
  );
}

function attackerLink(uuid, text) {
  return h("a", { href: `#/attackers/${encodeURIComponent(uuid)}` }, text);
}

// "2 primitives flagged multi_actor — a.one: x, y, x, y · a.two: …"
function evidenceLine(p) {
  const parts = [];
  const ev = p && typeof p.evidence === "object" && p.evidence ? p.evidence : {};
  for (const prim of Array.isArray(p.primitives) ? p.primitives : Object.keys(ev)) {
    const e = ev[prim];
    const values = e && Array.isArray(e.values) ? e.values.map((v) => shorten(valueText(v), 24)).join(", ") : "";
    parts.push(values ? `${prim}: ${values}` : String(prim));
  }
  const head = typeof p.evidence_summary === "string" ? p.evidence_summary : "multi-actor suspected";
  return parts.length ? `${head} — ${parts.join(" · ")}` : head;
}

function alertItem(data) {
  const p = (data && data.payload) || {};
  const attackers = Array.isArray(p.attacker_uuids) ? p.attacker_uuids.filter((a) => typeof a === "string") : [];
  const identity = typeof p.identity_uuid === "string" ? p.identity_uuid : "";
  const ts = isNum(p.ts) ? p.ts : data && data.ts;
  const who = attackers.length
    ? attackers.slice(0, 3).flatMap((a, i) => [i ? ", " : "", attackerLink(a, `attacker ${shorten(a, 14)}`)])
    : [h("span", { class: "muted" }, "no attacker known yet")];
  return h(
    "li",
    { class: "alert-item", "data-testid": "alert-item", "data-identity": identity },
    h("span", { class: "pill state-multi_actor" }, "MULTI-ACTOR SUSPECTED"),
    " ",
    timeNode(ts),
    h("div", null, ...who, identity ? h("span", { class: "mono muted", title: identity }, ` · identity ${shorten(identity, 14)}`) : ""),
    h("div", { class: "evidence", "data-testid": "alert-evidence" }, evidenceLine(p)),
  );
}

function listView() {
  let destroyed = false;
  let timer = null;
  let liveTimer = null;
  let lastLoad = 0;
  let loading = false;
  let again = false;
  let stream = null;
  let lastSig = "";
  const q = listQuery();
  const seenAlerts = new Set();
  const rates = [];

  // ---- overview ----
  const ovStatusText = h("span", null, "Connecting…");
  const ovStatus = h(
    "div",
    { class: "stream-status", role: "status", "data-testid": "overview-status", "data-status": "reconnecting", "data-frames": "0" },
    h("span", { class: "dot", "aria-hidden": "true" }),
    ovStatusText,
  );
  const counter = (id, label) => {
    const value = h("dd", { "data-testid": `overview-${id}` }, "—");
    return [h("div", { class: "counter" }, h("dt", null, label), value), value];
  };
  const [attackersBox, attackersVal] = counter("attackers", "Attackers");
  const [identitiesBox, identitiesVal] = counter("identities", "Identities");
  const [rateBox, rateVal] = counter("rate", "Ingest (obs/s)");
  const [lagBox, lagVal] = counter("lag", "Worker lag");
  const [alertsBox, alertsVal] = counter("alerts", "Alerts");
  const stateBox = h("div", { class: "pills", "data-testid": "overview-states" });
  const workersLine = h("p", { class: "muted", "data-testid": "overview-workers" });
  const chart = rateChart(RATE_POINTS);
  const overview = h(
    "section",
    { class: "overview", "aria-labelledby": "overview-title" },
    h("div", { class: "toolbar" }, h("h2", { id: "overview-title" }, "Fleet"), ovStatus),
    h("dl", { class: "counters" }, attackersBox, identitiesBox, rateBox, lagBox, alertsBox),
    stateBox,
    chart.el,
    workersLine,
  );

  // ---- alerts feed ----
  const feed = h("ol", { class: "feed", "data-testid": "alerts-feed", "aria-live": "polite", "aria-relevant": "additions" });
  const feedEmpty = h("p", { class: "muted" }, "No alerts yet.");
  const alerts = h(
    "section",
    { class: "alerts", "aria-labelledby": "alerts-title" },
    h("h2", { id: "alerts-title" }, "Alerts"),
    feedEmpty,
    feed,
  );

  // ---- filters ----
  const input = (key, label, hint) => {
    const el = h("input", { id: `filter-${key}`, name: key, type: "search", autocomplete: "off", spellcheck: "false", "data-testid": `filter-${key}` });
    el.value = q[key] || "";
    return [h("div", { class: "filter" }, h("label", { for: el.id }, label), el, hint ? h("small", { class: "muted" }, hint) : null), el];
  };
  const select = (key, label, options) => {
    const el = h("select", { id: `filter-${key}`, name: key, "data-testid": `filter-${key}` });
    for (const [value, text] of Object.entries(options)) el.append(h("option", { value }, text));
    el.value = q[key] || Object.keys(options)[0];
    return [h("div", { class: "filter" }, h("label", { for: el.id }, label), el), el];
  };
  const [ipBox, ipIn] = input("ip", "IP", "address, start (10.0.) or network (10.0.0.0/16); press / to jump here");
  const [attBox, attIn] = input("attacker", "Attacker uuid", "prefix");
  const [idBox, idIn] = input("identity", "Identity uuid", "prefix");
  const stateOptions = { "": "any" };
  for (const st of STATES) stateOptions[st] = `${LABELS[st]} present`;
  const [stBox, stIn] = select("state", "State", stateOptions);
  const [winBox, winIn] = select("seen_within", "Last seen", WINDOWS);
  const [sortBox, sortIn] = select("sort_by", "Sort by", SORTS);
  const [orderBox, orderIn] = select("order", "Order", { desc: "descending", asc: "ascending" });
  const multiIn = h("input", { id: "filter-multi_actor", type: "checkbox", "data-testid": "filter-multi_actor" });
  multiIn.checked = q.multi_actor === "true";
  const multiBox = h("div", { class: "filter check" }, multiIn, h("label", { for: multiIn.id }, "Multi-actor only"));
  const clear = h("button", { type: "button", class: "btn btn-quiet", "data-testid": "filter-clear" }, "Clear");
  const form = h(
    "form",
    { class: "filters", "data-testid": "filter-form", role: "search", "aria-label": "Filter attackers" },
    ipBox, attBox, idBox, stBox, winBox, multiBox, sortBox, orderBox,
    h("div", { class: "filter actions" }, h("button", { type: "submit", class: "btn", "data-testid": "filter-apply" }, "Apply"), clear),
  );

  // ---- list ----
  const status = h("p", { class: "muted", role: "status", "aria-live": "polite" });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "data", "data-testid": "attackers-table" },
    h("caption", { class: "sr-only" }, "Attackers, with the states of their identity's attribution"),
    h(
      "thead",
      null,
      h(
        "tr",
        null,
        h("th", { scope: "col" }, "IP"),
        h("th", { scope: "col" }, "Attacker"),
        h("th", { scope: "col" }, "First seen"),
        h("th", { scope: "col" }, "Last seen"),
        h("th", { scope: "col", class: "num" }, "Observations"),
        h("th", { scope: "col" }, "Attribution"),
      ),
    ),
    tbody,
  );
  const prev = h("button", { type: "button", class: "btn", "data-testid": "page-prev" }, "← Previous");
  const next = h("button", { type: "button", class: "btn", "data-testid": "page-next" }, "Next →");
  const range = h("span", { class: "range", "aria-live": "polite", "data-testid": "list-range" });
  const tableWrap = h("div", { class: "table-wrap" }, table);
  const pager = h("nav", { class: "pager", "aria-label": "Pages" }, prev, range, next);

  function readForm() {
    const out = {
      ip: ipIn.value.trim(),
      attacker: attIn.value.trim(),
      identity: idIn.value.trim(),
      state: stIn.value,
      seen_within: winIn.value,
      multi_actor: multiIn.checked ? "true" : "",
      sort_by: sortIn.value === "last_seen" ? "" : sortIn.value,
      order: orderIn.value === "desc" ? "" : orderIn.value,
    };
    for (const key of FILTER_KEYS) q[key] = out[key] || undefined;
    q.offset = 0;
    writeListQuery(q);
  }

  async function load() {
    if (loading) {
      again = true;
      return;
    }
    loading = true;
    if (timer) clearTimeout(timer);
    timer = null;
    const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(q.offset) });
    for (const key of FILTER_KEYS) if (q[key]) params.set(key, q[key]);
    if (!q.sort_by) params.set("sort_by", "last_seen");
    let data;
    try {
      data = await api(`/attackers?${params}`);
    } catch (e) {
      loading = false;
      if (destroyed || !session.token) return;
      tableWrap.hidden = e.status === 403;
      pager.hidden = e.status === 403;
      status.textContent =
        e.status === 403
          ? `This account (${(session.user && session.user.role) || "?"}) cannot view attackers.`
          : `Could not load the attackers: ${e.detail}`;
      scheduleRefresh();
      return;
    }
    loading = false;
    lastLoad = Date.now();
    if (destroyed) return;
    const total = isNum(data.total) ? data.total : 0;
    if (q.offset > 0 && q.offset >= total) {
      q.offset = Math.max(0, Math.floor((total - 1) / PAGE_SIZE) * PAGE_SIZE);
      writeListQuery(q);
      load();
      return;
    }
    const filtered = FILTER_KEYS.some((k) => q[k] && k !== "sort_by" && k !== "order");
    status.textContent = "";
    tableWrap.hidden = false;
    pager.hidden = false;
    renderRows(Array.isArray(data.data) ? data.data : [], filtered);
    const first = total ? q.offset + 1 : 0;
    const last = Math.min(q.offset + PAGE_SIZE, total);
    range.textContent = `${first}–${last} of ${total}${filtered ? " matching" : ""}`;
    prev.disabled = q.offset === 0;
    next.disabled = q.offset + PAGE_SIZE >= total;
    scheduleRefresh();
    if (again) {
      again = false;
      liveReload();
    }
  }

  // Rows are kept when nothing changed (focus and selection survive), updated
  // in place otherwise; new attackers are marked for a moment.
  function renderRows(items, filtered) {
    const old = new Map();
    for (const tr of tbody.children) if (tr.dataset.uuid) old.set(tr.dataset.uuid, tr);
    const rows = [];
    for (const item of items) {
      const uuid = typeof item.uuid === "string" ? item.uuid : "";
      const sig = JSON.stringify(item);
      const prior = old.get(uuid);
      if (prior && prior.dataset.sig === sig) rows.push(prior);
      else {
        const tr = attackerRow(item, sig);
        if (!prior && old.size && lastSig) tr.classList.add("fresh");
        rows.push(tr);
      }
    }
    if (!rows.length) {
      rows.push(h("tr", null, h("td", { colspan: "6", class: "empty" }, filtered ? "No attacker matches these filters." : "No attackers yet.")));
    }
    rows.forEach((tr, i) => {
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
    lastSig = "loaded";
  }

  function scheduleRefresh() {
    if (destroyed) return;
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      if (document.visibilityState === "visible") load();
      else scheduleRefresh();
    }, LIST_REFRESH_MS);
  }

  // The fleet changed: read the page again, at most once per LIST_LIVE_MS.
  function liveReload() {
    if (destroyed || liveTimer) return;
    const wait = Math.max(0, LIST_LIVE_MS - (Date.now() - lastLoad));
    liveTimer = setTimeout(() => {
      liveTimer = null;
      load();
    }, wait);
  }

  function attackerRow(item, sig) {
    const uuid = typeof item.uuid === "string" ? item.uuid : "";
    const link = attackerLink(uuid, valueText(item.ip || uuid));
    const pills = statePills(item.state_counts);
    if (item.multi_actor) pills.append(multiMarker());
    const tr = h(
      "tr",
      { class: "clickable", "data-testid": `attacker-row-${uuid}`, "data-uuid": uuid, "data-sig": sig },
      h("td", null, link),
      h("td", { class: "mono", title: uuid }, shorten(uuid, 14)),
      h("td", null, timeNode(item.first_seen)),
      h("td", null, timeNode(item.last_seen)),
      h("td", { class: "num" }, isNum(item.observation_count) ? String(item.observation_count) : "—"),
      h("td", null, pills),
    );
    tr.addEventListener("click", (ev) => {
      if (ev.target instanceof Element && ev.target.closest("a")) return;
      window.location.hash = `#/attackers/${encodeURIComponent(uuid)}`;
    });
    return tr;
  }

  // ---- the overview stream ----
  function renderOverview(o) {
    if (!o || typeof o !== "object") return;
    attackersVal.textContent = isNum(o.attackers) ? String(o.attackers) : "—";
    identitiesVal.textContent = isNum(o.identities) ? String(o.identities) : "—";
    rateVal.textContent = isNum(o.ingest_rate) ? formatNumber(Math.round(o.ingest_rate)) : "—";
    lagVal.textContent = isNum(o.lag_seconds) ? `${formatNumber(Math.round(o.lag_seconds * 100) / 100)} s` : "—";
    alertsVal.textContent = isNum(o.alerts_total) ? String(o.alerts_total) : "—";
    stateBox.replaceChildren(...statePills(o.states).childNodes);
    const workers = Array.isArray(o.workers) ? o.workers : [];
    workersLine.textContent = workers.length
      ? workers
          .map((w) => `worker ${w.worker}: ${w.running === false ? "STOPPED" : "running"}, heartbeat ${isNum(w.age_seconds) ? Math.round(w.age_seconds) : "?"} s ago`)
          .join(" · ")
      : "No worker heartbeat seen yet.";
    if (isNum(o.ingest_rate)) {
      rates.push(o.ingest_rate);
      if (rates.length > RATE_POINTS) rates.shift();
      chart.update(rates);
    }
    const sig = JSON.stringify([o.attackers, o.states, o.observations_total, o.alerts_total]);
    if (sig !== overview.dataset.sig) {
      if (overview.dataset.sig !== undefined) liveReload();
      overview.dataset.sig = sig;
    }
  }

  function addAlert(data, { prepend = true } = {}) {
    const p = (data && data.payload) || {};
    const key = JSON.stringify([p.identity_uuid, p.primitives, p.ts]);
    if (seenAlerts.has(key)) return;
    seenAlerts.add(key);
    const li = alertItem(data);
    if (prepend) feed.prepend(li);
    else feed.append(li);
    while (feed.children.length > ALERTS_SHOWN) feed.lastElementChild.remove();
    feedEmpty.hidden = true;
  }

  function onEvent(name, payload, data) {
    const frames = Number(ovStatus.dataset.frames) + 1;
    ovStatus.dataset.frames = String(frames);
    if (name === "snapshot") {
      renderOverview(payload && payload.overview);
      for (const a of (payload && Array.isArray(payload.alerts) ? payload.alerts : [])) addAlert(a, { prepend: false });
      liveReload();
    } else if (name === "overview") {
      renderOverview(payload);
    } else if (name === "alert") {
      addAlert(data);
      liveReload();
    } else if (name === "attacker.new") {
      liveReload();
    }
  }

  function setOvStatus(state, text) {
    ovStatus.setAttribute("data-status", state);
    ovStatusText.textContent = text;
  }

  // "/" jumps to the search (unless typing somewhere already)
  function onKey(ev) {
    if (ev.key !== "/" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    if (t instanceof Element && t.closest("input, select, textarea, [contenteditable]")) return;
    ev.preventDefault();
    ipIn.focus();
  }
  document.addEventListener("keydown", onKey);

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    readForm();
    load();
  });
  for (const el of [stIn, winIn, sortIn, orderIn, multiIn]) {
    el.addEventListener("change", () => {
      readForm();
      load();
    });
  }
  clear.addEventListener("click", () => {
    for (const el of [ipIn, attIn, idIn]) el.value = "";
    stIn.value = "";
    winIn.value = "";
    sortIn.value = "last_seen";
    orderIn.value = "desc";
    multiIn.checked = false;
    readForm();
    load();
  });
  prev.addEventListener("click", () => {
    q.offset = Math.max(0, q.offset - PAGE_SIZE);
    writeListQuery(q);
    load();
  });
  next.addEventListener("click", () => {
    q.offset += PAGE_SIZE;
    writeListQuery(q);
    load();
  });

  setView(
    h(
      "div",
      { class: "front" },
      h("h1", { class: "sr-only" }, "Attribution dashboard"),
      h("div", { class: "front-top" }, overview, alerts),
      h(
        "section",
        { "aria-labelledby": "list-title" },
        h("div", { class: "toolbar" }, h("h2", { id: "list-title" }, "Attackers")),
        form,
        status,
        tableWrap,
        pager,
      ),
    ),
  );
  load();
  stream = new EventStream("/overview/events", OVERVIEW_EVENTS, onEvent, setOvStatus);
  stream.start();
  return {
    destroy() {
      destroyed = true;
      document.removeEventListener("keydown", onKey);
      if (timer) clearTimeout(timer);
      if (liveTimer) clearTimeout(liveTimer);
      if (stream) stream.close();
    },
  };
}

// ---------------------------------------------------------------------------------------
// the live stream
// ---------------------------------------------------------------------------------------
// One event stream of the relay (`path` under the API, e.g. "/overview/events"),
// with reconnects (fresh ticket each time, resume cursor) and a status callback.
class EventStream {
  constructor(path, events, onEvent, onStatus) {
    this.path = path;
    this.events = events;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.source = null;
    this.timer = null;
    this.closed = false;
    this.lastEventId = "";
    this.backoff = BACKOFF_MIN_MS;
    this.everConnected = false;
    this.onOnline = () => {
      if (this.timer && !this.source) {
        clearTimeout(this.timer);
        this.timer = null;
        this.connect();
      }
    };
    window.addEventListener("online", this.onOnline);
  }

  start() {
    this.connect();
  }

  close() {
    this.closed = true;
    window.removeEventListener("online", this.onOnline);
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.source) this.source.close();
    this.source = null;
  }

  async connect() {
    this.timer = null;
    if (this.closed) return;
    this.onStatus("reconnecting", this.everConnected ? "Reconnecting…" : "Connecting…");
    let ticket;
    try {
      // A fresh single-use ticket for every connect and reconnect.
      const res = await api("/auth/sse-ticket", { method: "POST" });
      ticket = res && res.ticket;
      if (typeof ticket !== "string" || !ticket) throw new ApiError(500, "no ticket");
    } catch (e) {
      if (this.closed) return;
      if (e instanceof ApiError && e.status === 401) {
        this.close(); // api() has sent the page back to the login
        return;
      }
      const wait = e instanceof ApiError && e.retryAfter ? Number(e.retryAfter) * 1000 : 0;
      this.retry(Number.isFinite(wait) ? wait : 0);
      return;
    }
    if (this.closed) return;
    // EventSource cannot send headers on a manual reconnect: the resume cursor
    // travels as ?last_event_id= (the relay accepts both).
    const q = new URLSearchParams({ ticket });
    if (this.lastEventId) q.set("last_event_id", this.lastEventId);
    const url = `${API}${this.path}?${q}`;
    let source;
    try {
      source = new EventSource(url);
    } catch {
      this.retry(0);
      return;
    }
    this.source = source;
    source.onopen = () => {
      if (this.source !== source) return;
      this.everConnected = true;
      this.onStatus("connected", "Live");
    };
    source.onerror = () => {
      // Connection lost, HTTP error, or a server "event: error" frame: never
      // let EventSource retry with the spent ticket.
      if (this.source !== source) return;
      source.close();
      this.source = null;
      this.retry(0);
    };
    for (const name of this.events) {
      source.addEventListener(name, (ev) => this.dispatch(source, name, ev));
    }
  }

  dispatch(source, name, ev) {
    if (this.source !== source || this.closed) return;
    if (ev.lastEventId) this.lastEventId = ev.lastEventId;
    this.backoff = BACKOFF_MIN_MS; // data flows: the next failure retries quickly
    let data = null;
    try {
      data = ev.data ? JSON.parse(ev.data) : null;
    } catch {
      return;
    }
    // Live events are {topic, type, ts, payload}; the snapshot is a bare object.
    const payload =
      data && typeof data === "object" && !Array.isArray(data) && "payload" in data ? data.payload : data;
    try {
      this.onEvent(name, payload, data);
    } catch (err) {
      console.error("decnet-attr: failed to apply", name, err);
    }
  }

  retry(minDelay) {
    if (this.closed) return;
    const base = Math.max(this.backoff, minDelay || 0);
    const delay = Math.min(base, Math.max(BACKOFF_MAX_MS, minDelay || 0)) * (0.85 + Math.random() * 0.3);
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
    this.onStatus("reconnecting", `Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`);
    this.timer = setTimeout(() => this.connect(), delay);
  }
}

// ---------------------------------------------------------------------------------------
// attacker detail
// ---------------------------------------------------------------------------------------
function badgeTitle(row) {
  const st = stateOf(row.state);
  const n = isNum(row.observation_count) ? row.observation_count : 0;
  return `${LABELS[st]} • confidence ${pct(row.confidence)} over ${plural(n, "observation")} — show why`;
}

function colourClass(index) {
  return index < VALUE_COLOURS ? `v${index}` : "v-other";
}

function attackerView(uuid) {
  let destroyed = false;
  const model = {
    attacker: null,
    identity: null,
    rows: new Map(), // primitive -> attribution row
    observations: new Map(), // primitive -> latest observation of THIS attacker
    timelines: new Map(), // primitive -> [{ts, value, key}]
    colours: new Map(), // primitive -> Map(valueKey -> colour index)
    kinds: new Map(), // primitive -> value kind (from explain)
    suspicion: null, // the last attribution.multi_actor_suspected payload
    explained: null, // primitive shown in the explain panel
    rollupCount: null, // attackers of the identity, as the roll-up line shows
  };
  const dom = new Map(); // primitive -> {tr, badge, value, here, conf, count, since, timeline}
  let stream = null;
  let refetchTimer = null;
  let explainTimer = null;
  let explainSeq = 0;
  const tick = setInterval(() => {
    for (const [prim] of dom) renderSince(prim);
  }, 15000);

  // ---- static skeleton ----
  const statusDot = h("span", { class: "dot", "aria-hidden": "true" });
  const statusText = h("span", null, "Connecting…");
  const status = h(
    "div",
    {
      class: "stream-status",
      role: "status",
      "aria-live": "polite",
      "data-testid": "stream-status",
      "data-status": "reconnecting",
      title: "Live updates",
    },
    statusDot,
    statusText,
  );
  const title = h("h1", { id: "attacker-title" }, "Attacker");
  const facts = h("dl", { class: "facts" });
  const banner = h("div", {
    class: "banner",
    role: "alert",
    "data-testid": "multi-actor-banner",
    hidden: true,
  });
  const scope = h("p", { class: "scope" });
  const rollup = h("div", { class: "rollup", "data-testid": "identity-rollup", hidden: true });
  const message = h("p", { class: "muted", role: "status" });
  const tbody = h("tbody");
  const table = h(
    "table",
    { class: "data", "data-testid": "attribution-table" },
    h("caption", { class: "sr-only" }, "Attribution per primitive"),
    h(
      "thead",
      null,
      h(
        "tr",
        null,
        h("th", { scope: "col" }, "Primitive"),
        h("th", { scope: "col" }, "State"),
        h("th", { scope: "col" }, "Current value"),
        h("th", { scope: "col", class: "num" }, "Confidence"),
        h("th", { scope: "col", class: "num" }, "Observations"),
        h("th", { scope: "col" }, "In this state since"),
        h("th", { scope: "col" }, "Recent values"),
      ),
    ),
    tbody,
  );
  const explainPanel = h("section", {
    class: "card explain",
    id: "explain-panel",
    "data-testid": "explain-panel",
    "aria-labelledby": "explain-title",
    hidden: true,
  });

  setView(
    h(
      "section",
      { "aria-labelledby": "attacker-title" },
      h("a", { class: "back", href: "#/" }, "← All attackers"),
      h("div", { class: "detail-head" }, h("div", null, title, facts), status),
      banner,
      rollup,
      scope,
      message,
      h("div", { class: "table-wrap" }, table),
      explainPanel,
    ),
  );

  function setStatus(state, text) {
    status.setAttribute("data-status", state);
    statusText.textContent = text;
    // the first read failed (server down at load): read again once live
    if (state === "connected" && !model.attacker) scheduleRefetch();
  }

  // ---- header ----
  function renderHeader() {
    const a = model.attacker;
    title.textContent = a && a.ip ? `Attacker ${valueText(a.ip)}` : "Attacker";
    const items = [
      ["Attacker", h("span", { class: "mono" }, uuid)],
      ["Identity", model.identity ? h("span", { class: "mono" }, model.identity) : h("span", { class: "muted" }, "none yet")],
    ];
    if (a) {
      items.push(["First seen", timeNode(a.first_seen)], ["Last seen", timeNode(a.last_seen)]);
      if (isNum(a.rotation_count) && a.rotation_count > 0) {
        items.push(["Fingerprint rotations", String(a.rotation_count)]);
      }
    }
    facts.replaceChildren(...items.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v))));
    scope.textContent = model.identity
      ? "Attribution is kept per identity (it may span several attackers); “here” marks this attacker's own latest value."
      : "This attacker has no identity yet: rows appear with its first observation.";
  }

  // ---- banner ----
  function renderBanner() {
    const multi = [...model.rows.values()].filter((r) => r.state === "multi_actor").map((r) => r.primitive);
    let flagged = multi;
    let summary = "";
    if (model.suspicion && Array.isArray(model.suspicion.primitives)) {
      // The suspicion event can overtake the state rows: trust it until the
      // rows it names say otherwise.
      const named = model.suspicion.primitives.filter(
        (p) => typeof p === "string" && (!model.rows.has(p) || model.rows.get(p).state === "multi_actor"),
      );
      if (named.length >= MULTI_ACTOR_MIN_PRIMITIVES) {
        flagged = [...new Set([...multi, ...named])].sort();
        if (typeof model.suspicion.evidence_summary === "string") summary = model.suspicion.evidence_summary;
      } else {
        model.suspicion = null;
      }
    }
    const suspected = flagged.length >= MULTI_ACTOR_MIN_PRIMITIVES;
    banner.hidden = !suspected;
    if (!suspected) {
      banner.replaceChildren();
      return;
    }
    banner.replaceChildren(
      h("span", { "aria-hidden": "true" }, "⚑"),
      h(
        "div",
        null,
        h("strong", null, "More than one operator suspected"),
        h(
          "p",
          null,
          `${plural(flagged.length, "primitive")} alternate between values, as when several people share this identity: `,
          flagged.join(", "),
          ".",
        ),
        summary ? h("p", { class: "muted" }, `Engine: ${summary}.`) : null,
      ),
    );
  }

  // ---- rows ----
  function placeholderRow(prim) {
    return {
      primitive: prim,
      state: "unknown",
      current_value: null,
      confidence: 0,
      observation_count: 0,
      last_change_ts: null,
      last_observation_ts: null,
      placeholder: true,
    };
  }

  function ensureDom(prim) {
    let d = dom.get(prim);
    if (d) return d;
    const badge = h("button", {
      type: "button",
      class: "badge state-unknown",
      "data-testid": `attribution-badge-${prim}`,
      "data-state": "unknown",
      "aria-expanded": "false",
      "aria-controls": "explain-panel",
    });
    badge.addEventListener("click", () => toggleExplain(prim));
    badge.addEventListener("animationend", () => badge.classList.remove("changed"));
    d = {
      tr: h("tr", { "data-testid": `primitive-row-${prim}`, "data-primitive": prim }),
      badge,
      value: h("td", { class: "value" }),
      conf: h("td", { class: "num" }),
      count: h("td", { class: "num" }),
      since: h("td"),
      timeline: h("td"),
    };
    d.tr.append(h("th", { scope: "row", class: "mono" }, prim), h("td", null, badge), d.value, d.conf, d.count, d.since, d.timeline);
    // keep the rows ordered by primitive
    const after = [...dom.keys()].filter((p) => p > prim).sort()[0];
    if (after !== undefined) tbody.insertBefore(d.tr, dom.get(after).tr);
    else tbody.append(d.tr);
    dom.set(prim, d);
    return d;
  }

  function renderSince(prim) {
    const d = dom.get(prim);
    const row = model.rows.get(prim);
    if (!d || !row) return;
    if (!isNum(row.last_change_ts)) {
      d.since.replaceChildren(h("span", { class: "muted" }, "—"));
      return;
    }
    d.since.replaceChildren(timeNode(row.last_change_ts), h("span", { class: "since-abs" }, absTime(row.last_change_ts)));
  }

  function renderRow(prim, { changed = false } = {}) {
    const row = model.rows.get(prim);
    if (!row) return;
    const d = ensureDom(prim);
    const st = stateOf(row.state);
    const before = d.badge.getAttribute("data-state");
    d.badge.setAttribute("data-state", st);
    d.badge.className = `badge state-${st}`;
    d.badge.textContent = LABELS[st];
    d.badge.title = badgeTitle(row);
    d.badge.setAttribute("aria-label", `${prim}: ${badgeTitle(row)}`);
    d.badge.setAttribute("aria-expanded", model.explained === prim ? "true" : "false");
    if (changed && before !== st) {
      d.badge.classList.remove("changed");
      void d.badge.offsetWidth; // restart the animation
      d.badge.classList.add("changed");
    }
    const here = model.observations.get(prim);
    const valueParts = [row.placeholder ? h("span", { class: "muted" }, "not merged yet") : valueNode(row.current_value)];
    if (here && (row.placeholder || valueKey(here.value) !== valueKey(row.current_value))) {
      valueParts.push(h("span", { class: "value-here", title: "this attacker's latest observation" }, `here: ${shorten(valueText(here.value), 40)}`));
    }
    d.value.replaceChildren(...valueParts);
    d.conf.textContent = pct(row.confidence);
    d.count.textContent = isNum(row.observation_count) ? String(row.observation_count) : "—";
    renderSince(prim);
    renderTimeline(prim);
  }

  function renderAllRows() {
    for (const prim of [...model.rows.keys()].sort()) renderRow(prim);
    message.textContent = model.rows.size ? "" : "No observations merged for this attacker yet.";
  }

  // ---- timelines ----
  function colourOf(prim, key) {
    let m = model.colours.get(prim);
    if (!m) {
      m = new Map();
      model.colours.set(prim, m);
    }
    if (!m.has(key)) m.set(key, m.size);
    return m.get(key);
  }

  function addPoints(prim, points) {
    let list = model.timelines.get(prim);
    if (!list) {
      list = [];
      model.timelines.set(prim, list);
    }
    let added = false;
    for (const p of points) {
      if (!p || !isNum(p.ts)) continue;
      const key = valueKey(p.value);
      if (list.some((q) => q.ts === p.ts && q.key === key)) continue;
      list.push({ ts: p.ts, value: p.value, key });
      added = true;
    }
    if (!added) return false;
    list.sort((a, b) => a.ts - b.ts);
    if (list.length > TIMELINE_MAX * 2) list.splice(0, list.length - TIMELINE_MAX * 2);
    for (const p of list) colourOf(prim, p.key);
    return true;
  }

  function timelineSvg(prim, points, { width = 176, height = 24, max = TIMELINE_MAX } = {}) {
    const shown = points.slice(-max);
    const kind = model.kinds.get(prim) || (shown.length && shown.every((p) => isNum(p.value)) ? "numeric" : "categorical");
    const label = shown.length
      ? `Recent values of ${prim}, oldest first: ${shown.map((p) => shorten(valueText(p.value), 24)).join(", ")}`
      : `No recent values of ${prim}`;
    const root = svg("svg", {
      class: "timeline",
      width,
      height,
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      "aria-label": label,
      "data-testid": `timeline-${prim}`,
    });
    root.append(svg("title", null, label));
    root.append(svg("rect", { class: "track", x: 0, y: height - 2, width, height: 2, rx: 1 }));
    if (!shown.length) return root;
    const step = width / max;
    const tickW = Math.max(3, Math.min(7, step - 2));
    let lo = Infinity;
    let hi = -Infinity;
    if (kind === "numeric") {
      for (const p of shown) {
        if (isNum(p.value)) {
          lo = Math.min(lo, p.value);
          hi = Math.max(hi, p.value);
        }
      }
    }
    const offset = max - shown.length; // newest at the right edge
    shown.forEach((p, i) => {
      let tickH = height - 6;
      if (kind === "numeric" && isNum(p.value) && hi > lo) {
        tickH = 5 + ((p.value - lo) / (hi - lo)) * (height - 11);
      }
      const latest = i === shown.length - 1;
      const rect = svg("rect", {
        class: `tick ${colourClass(colourOf(prim, p.key))}${latest ? " latest" : " old"}`,
        x: ((offset + i) * step + (step - tickW) / 2).toFixed(1),
        y: (height - 3 - tickH).toFixed(1),
        width: tickW.toFixed(1),
        height: tickH.toFixed(1),
        rx: 1.5,
      });
      rect.append(svg("title", null, `${shorten(valueText(p.value), 80)} — ${absTime(p.ts)}`));
      root.append(rect);
    });
    return root;
  }

  function renderTimeline(prim) {
    const d = dom.get(prim);
    if (!d) return;
    d.timeline.replaceChildren(timelineSvg(prim, model.timelines.get(prim) || []));
  }

  // ---- applying data ----
  function mergeRows(rows) {
    // Authoritative rows (detail fetch, snapshot); a row updated live since
    // the read (newer observation) is kept.
    if (!Array.isArray(rows)) return;
    for (const r of rows) {
      if (!r || typeof r.primitive !== "string") continue;
      const prev = model.rows.get(r.primitive);
      if (prev && !prev.placeholder && isNum(prev.last_observation_ts) && isNum(r.last_observation_ts) && prev.last_observation_ts > r.last_observation_ts) {
        continue;
      }
      model.rows.set(r.primitive, { ...r, previous_state: prev ? prev.previous_state : undefined, version: prev ? prev.version : undefined });
    }
  }

  function mergeObservations(observations) {
    if (!Array.isArray(observations)) return;
    for (const o of observations) {
      if (!o || typeof o.primitive !== "string") continue;
      const prev = model.observations.get(o.primitive);
      if (!prev || !isNum(prev.ts) || !isNum(o.ts) || o.ts >= prev.ts) model.observations.set(o.primitive, o);
      addPoints(o.primitive, [o]);
      if (!model.rows.has(o.primitive)) model.rows.set(o.primitive, placeholderRow(o.primitive));
    }
  }

  // ---- roll-up: "rolls up to identity X with N attackers" ----
  async function fetchRollup() {
    const id = model.identity;
    if (!id) {
      rollup.hidden = true;
      return;
    }
    let ident;
    try {
      ident = await api(`/identities/${encodeURIComponent(id)}`);
    } catch {
      return; // the rows still show; the line waits for the next refetch
    }
    if (destroyed || id !== model.identity) return;
    model.rollupCount = ident.attacker_count;
    rollup.replaceChildren(...identityRollup(ident, uuid));
    rollup.hidden = false;
  }

  function applyDetail(body) {
    model.attacker = body;
    const identity = body.identity_uuid ?? body.identity_id ?? null;
    if (typeof identity === "string") model.identity = identity;
    mergeRows(body.attribution);
    mergeObservations(body.observations);
    renderHeader();
    renderAllRows();
    renderBanner();
  }

  // "ok", "missing" (404: no stream then) or "error"
  async function fetchDetail() {
    try {
      const body = await api(`/attackers/${encodeURIComponent(uuid)}`);
      if (destroyed) return "error";
      applyDetail(body);
      fetchRollup();
      seedTimelines();
      if (model.explained) scheduleExplain();
      return "ok";
    } catch (e) {
      if (destroyed || !session.token) return "error";
      if (e.status === 404) {
        message.textContent = "This attacker does not exist.";
        return "missing";
      }
      message.textContent = `Could not load the attacker: ${e.detail}`;
      return "error";
    }
  }

  function scheduleRefetch() {
    if (refetchTimer) clearTimeout(refetchTimer);
    refetchTimer = setTimeout(() => {
      refetchTimer = null;
      if (!destroyed) fetchDetail();
    }, 150);
  }

  async function seedTimelines() {
    // Fill the pictures from each row's explain window (identity-wide values).
    const prims = [...model.rows.keys()].filter((p) => !model.rows.get(p).placeholder).slice(0, EXPLAIN_PREFETCH_MAX);
    let next = 0;
    async function worker() {
      while (!destroyed && next < prims.length) {
        const prim = prims[next++];
        try {
          const ex = await api(`/attackers/${encodeURIComponent(uuid)}/attribution/${encodeURIComponent(prim)}/explain`);
          if (destroyed) return;
          noteExplain(prim, ex);
        } catch (e) {
          if (!session.token) return;
        }
      }
    }
    await Promise.all(Array.from({ length: EXPLAIN_CONCURRENCY }, worker));
  }

  function noteExplain(prim, ex) {
    if (!ex || typeof ex !== "object") return;
    if (typeof ex.kind === "string") model.kinds.set(prim, ex.kind);
    const row = model.rows.get(prim);
    if (row && ex.previous_state && !row.previous_state) row.previous_state = ex.previous_state;
    if (Array.isArray(ex.window)) addPoints(prim, ex.window);
    renderTimeline(prim);
  }

  function applyState(p, changedEvent) {
    if (!p || typeof p.primitive !== "string") return;
    const prim = p.primitive;
    if (typeof p.identity_uuid === "string" && p.identity_uuid !== model.identity) {
      // the attacker rolled up into another identity (or out of one): its
      // rows replace the old identity's
      const moved = model.identity !== null;
      model.identity = p.identity_uuid;
      renderHeader();
      if (moved) {
        model.rows.clear();
        tbody.replaceChildren();
        dom.clear();
        scheduleRefetch();
      }
    }
    // another attacker joined (or left) this identity: the roll-up line follows
    if (Array.isArray(p.attacker_uuids) && p.attacker_uuids.length !== model.rollupCount) {
      model.rollupCount = p.attacker_uuids.length;
      fetchRollup();
    }
    const prev = model.rows.get(prim);
    if (prev && !prev.placeholder && isNum(p.version) && isNum(prev.version) && p.version <= prev.version) return;
    const newState = typeof p.new_state === "string" ? p.new_state : p.state;
    const ts = isNum(p.ts) ? p.ts : null;
    let lastChange = isNum(p.last_change_ts) ? p.last_change_ts : null;
    if (lastChange === null) {
      lastChange = prev && !prev.placeholder && prev.state === newState ? prev.last_change_ts : ts;
    }
    let previous = prev ? prev.previous_state : undefined;
    if (changedEvent && typeof p.old_state === "string" && p.old_state !== newState) previous = p.old_state;
    model.rows.set(prim, {
      primitive: prim,
      state: newState,
      current_value: p.current_value,
      confidence: p.confidence,
      observation_count: p.observation_count,
      last_change_ts: lastChange,
      last_observation_ts: isNum(p.last_observation_ts) ? p.last_observation_ts : ts,
      version: isNum(p.version) ? p.version : undefined,
      previous_state: previous,
    });
    message.textContent = "";
    renderRow(prim, { changed: true });
    renderBanner();
    if (model.explained === prim) scheduleExplain();
  }

  function applyObservation(p) {
    if (!p || typeof p.primitive !== "string") return;
    if (typeof p.attacker_uuid === "string" && p.attacker_uuid !== uuid) return;
    const prim = p.primitive;
    const prev = model.observations.get(prim);
    if (!prev || !isNum(prev.ts) || !isNum(p.ts) || p.ts >= prev.ts) model.observations.set(prim, p);
    addPoints(prim, [p]);
    if (!model.rows.has(prim)) {
      model.rows.set(prim, placeholderRow(prim));
      message.textContent = "";
    }
    renderRow(prim);
  }

  function onEvent(name, payload, raw) {
    switch (name) {
      case "snapshot":
        if (payload && typeof payload === "object") {
          if (typeof payload.identity_uuid === "string") model.identity = payload.identity_uuid;
          if (Array.isArray(payload.attribution)) mergeRows(payload.attribution);
          mergeObservations(payload.observations);
          renderHeader();
          renderAllRows();
          renderBanner();
        }
        break;
      case "observation":
        applyObservation(payload);
        break;
      case "attribution.state_changed":
        applyState(payload, true);
        break;
      case "attribution.updated":
        applyState(payload, false);
        break;
      case "attribution.multi_actor_suspected":
        if (payload && typeof payload === "object") {
          model.suspicion = payload;
          renderBanner();
        }
        break;
      case "stale":
      case "gap":
      case "identity.formed":
      case "identity.merged":
        // Events may have been missed: read the attacker again.
        scheduleRefetch();
        break;
      default:
        break; // fingerprint.rotated, attacker.scored: nothing shown here
    }
    void raw;
  }

  // ---- explain ----
  function toggleExplain(prim) {
    if (model.explained === prim) {
      closeExplain();
      return;
    }
    const old = model.explained;
    model.explained = prim;
    if (old && dom.has(old)) dom.get(old).badge.setAttribute("aria-expanded", "false");
    dom.get(prim).badge.setAttribute("aria-expanded", "true");
    explainPanel.hidden = false;
    explainPanel.replaceChildren(h("p", { class: "muted" }, `Loading the explanation of ${prim}…`));
    loadExplain(true);
  }

  function closeExplain() {
    const prim = model.explained;
    model.explained = null;
    explainPanel.hidden = true;
    explainPanel.replaceChildren();
    if (prim && dom.has(prim)) {
      const badge = dom.get(prim).badge;
      badge.setAttribute("aria-expanded", "false");
      badge.focus();
    }
  }

  function scheduleExplain() {
    if (explainTimer) clearTimeout(explainTimer);
    explainTimer = setTimeout(() => {
      explainTimer = null;
      if (!destroyed && model.explained) loadExplain(false);
    }, 250);
  }

  async function loadExplain(first) {
    const prim = model.explained;
    const seq = ++explainSeq;
    let ex;
    try {
      ex = await api(`/attackers/${encodeURIComponent(uuid)}/attribution/${encodeURIComponent(prim)}/explain`);
    } catch (e) {
      if (destroyed || seq !== explainSeq || model.explained !== prim || !session.token) return;
      if (first || e.status === 404) {
        explainPanel.replaceChildren(
          explainHeader(prim),
          h("p", { class: "muted" }, e.status === 404 ? "No merged attribution for this primitive yet." : `Could not load the explanation: ${e.detail}`),
        );
      }
      return;
    }
    if (destroyed || seq !== explainSeq || model.explained !== prim) return;
    noteExplain(prim, ex);
    explainPanel.replaceChildren(...renderExplain(prim, ex));
  }

  function explainHeader(prim) {
    const close = h("button", { type: "button", class: "btn btn-quiet", "aria-label": "Close the explanation" }, "Close ✕");
    close.addEventListener("click", closeExplain);
    return h(
      "div",
      { class: "explain-head" },
      h("h2", { id: "explain-title" }, "Why this state? ", h("span", { class: "mono" }, prim)),
      close,
    );
  }

  function kvTable(entries, testid) {
    return h(
      "table",
      { class: "kv", "data-testid": testid },
      h("tbody", null, entries.map(([k, v]) => h("tr", null, h("th", { scope: "row" }, k), h("td", null, v instanceof Node ? v : valueText(v))))),
    );
  }

  function countValues(values) {
    const counts = new Map();
    for (const v of values) {
      const key = valueKey(v);
      const c = counts.get(key);
      if (c) c.n += 1;
      else counts.set(key, { value: v, key, n: 1 });
    }
    return [...counts.values()].sort((a, b) => b.n - a.n);
  }

  function comparisons(ex) {
    const d = ex.detail && typeof ex.detail === "object" ? ex.detail : {};
    const t = ex.thresholds && typeof ex.thresholds === "object" ? ex.thresholds : {};
    const out = [];
    const line = (hit, text) => out.push(h("li", { class: hit ? "cmp-hit" : "cmp-ok" }, text));
    const num = (v) => (isNum(v) ? formatNumber(v) : "—");
    const minObs = d.min_observations; // the hash merger has no floor (and no such key)
    if (isNum(minObs) && isNum(ex.observation_count)) {
      line(ex.observation_count < minObs, `observations ${ex.observation_count} vs at least ${minObs} needed for a state`);
    }
    if (ex.kind === "numeric") {
      const conflict = isNum(d.conflict_dispersion_pct) ? d.conflict_dispersion_pct : t.conflict_dispersion_pct;
      const drift = isNum(d.drift_mean_shift_pct) ? d.drift_mean_shift_pct : t.drift_mean_shift_pct;
      if ("ewma" in d) out.push(h("li", null, `EWMA of the recent window ${num(d.ewma)} (α = ${num(d.ewma_alpha ?? t.ewma_alpha)})`));
      if (isNum(d.cv)) line(isNum(conflict) && d.cv > conflict, `dispersion (CV) ${num(d.cv)} vs conflicted when > ${num(conflict)}`);
      if (isNum(d.shift)) line(isNum(drift) && d.shift >= drift, `mean shift ${num(d.shift)} vs drifting when ≥ ${num(drift)} (older EWMA ${num(d.older_ewma)})`);
      else if ("shift" in d) out.push(h("li", null, "no older window to compare the mean against"));
    } else if (ex.kind === "hash") {
      const maxDrift = isNum(d.hash_drift_max) ? d.hash_drift_max : t.hash_drift_max;
      if (isNum(d.rotations)) line(d.rotations > 0, `rotations ${d.rotations} in the window: 0 stable, ≤ ${num(maxDrift)} drifting, more conflicted`);
      if (isNum(d.distinct)) out.push(h("li", null, `distinct values in the ${num(d.hash_window_secs ?? t.hash_window_secs)} s window: ${d.distinct}`));
    } else {
      if (isNum(d.top_count) && isNum(d.recent_len) && d.recent_len > 0) {
        const need = isNum(d.majority_needed) ? d.majority_needed : t.majority;
        line(d.top_count < need, `top value ${d.top_count} of the last ${d.recent_len} vs ≥ ${num(need)} for a clear majority`);
      }
      // The older window is only judged when the recent one has a clear majority.
      if (isNum(d.older_len) && d.older_len > 0 && isNum(d.older_majority_needed) && d.older_majority_needed > 0) {
        line(
          isNum(d.older_majority_needed) && d.older_top_count < d.older_majority_needed,
          `older window: top value ${num(d.older_top_count)} of ${d.older_len} vs ≥ ${num(d.older_majority_needed)}`,
        );
      }
      if (isNum(d.flips)) {
        const reps = isNum(d.repeats) ? d.repeats : 0;
        const needFlips = 2 * Math.max(reps, 1);
        const alternates = d.flips >= needFlips && d.distinct === 2;
        line(alternates, `flips ${d.flips}, repeats ${reps}: alternation when flips ≥ 2 × max(repeats, 1) = ${needFlips}`);
      }
      if (isNum(d.distinct)) {
        line(d.distinct === 2, `distinct values in the recent window ${d.distinct} (alternation needs exactly 2, at least ${num(d.alternation_min_len ?? t.alternation_min_len)} values)`);
      }
      if (ex.state && ex.state.state === "multi_actor") {
        out.push(h("li", null, `confidence capped at ${num(d.multi_actor_max_confidence ?? t.multi_actor_max_confidence)} for multi-actor`));
      }
    }
    return out;
  }

  function legend(prim, counted, caption) {
    return h(
      "div",
      null,
      h("h3", null, caption),
      h(
        "ul",
        { class: "legend", "data-testid": "explain-counts" },
        counted.map((c) =>
          h(
            "li",
            null,
            h("span", { class: `swatch ${colourClass(colourOf(prim, c.key))}`, "aria-hidden": "true" }),
            valueNode(c.value, 40),
            h("span", { class: "muted" }, `× ${c.n}`),
          ),
        ),
      ),
    );
  }

  function renderExplain(prim, ex) {
    const st = ex.state && typeof ex.state === "object" ? ex.state : {};
    const state = stateOf(st.state);
    const win = Array.isArray(ex.window) ? ex.window.filter((w) => w && isNum(w.ts)) : [];
    const t = ex.thresholds && typeof ex.thresholds === "object" ? ex.thresholds : {};
    const d = ex.detail && typeof ex.detail === "object" ? ex.detail : {};
    const windowN = isNum(d.window_n) ? d.window_n : isNum(t.window_n) ? t.window_n : 5;
    const points = win.map((w) => ({ ts: w.ts, value: w.value, key: valueKey(w.value) }));
    for (const p of points) colourOf(prim, p.key);
    const recent = win.slice(-windowN).map((w) => w.value);
    const older = win.slice(-2 * windowN, -windowN).map((w) => w.value);
    const row = model.rows.get(prim);
    const previous = ex.previous_state || (row && row.previous_state) || null;
    const stored = ex.stored && typeof ex.stored === "object" ? ex.stored : {};
    const parts = [
      explainHeader(prim),
      h(
        "div",
        { class: "verdict" },
        h("span", { class: `pill state-${state}` }, LABELS[state]),
        h("span", { class: "rule-name", "data-testid": "explain-rule" }, valueText(ex.rule ?? "—")),
        h("span", { class: "muted" }, `${ex.kind ?? "?"} merger · confidence ${pct(st.confidence)} · ${plural(isNum(ex.observation_count) ? ex.observation_count : 0, "observation")}`),
      ),
      h("p", { class: "rule-desc", "data-testid": "explain-rule-description" }, valueText(ex.rule_description ?? "")),
      h(
        "p",
        { "data-testid": "explain-previous-state" },
        "Previous state: ",
        previous ? h("span", { class: `pill state-${stateOf(previous)}` }, LABELS[stateOf(previous)]) : h("span", { class: "muted" }, "not recorded"),
        isNum(stored.last_change_ts) ? h("span", { class: "muted" }, ` — in the current state since ${absTime(stored.last_change_ts)}`) : null,
      ),
      h("h3", null, `Window (${plural(win.length, "value")}, newest right)`),
      timelineSvg(prim, points, { width: Math.max(240, 22 * Math.max(win.length, 2)), height: 34, max: Math.max(win.length, 2) }),
      h(
        "div",
        { class: "grid2" },
        legend(prim, countValues(recent), `Recent window (last ${Math.min(windowN, recent.length)})`),
        older.length ? legend(prim, countValues(older), `Older window (${older.length} before)`) : null,
      ),
      h("h3", null, "Compared against the thresholds"),
      h("ul", { class: "compare", "data-testid": "explain-comparisons" }, comparisons(ex)),
      h("p", { class: "muted small" }, "Highlighted: the conditions that point away from a stable reading."),
      h(
        "div",
        { class: "grid2" },
        h("div", null, h("h3", null, "Measured"), kvTable(Object.entries(d), "explain-detail")),
        h("div", null, h("h3", null, "Thresholds"), kvTable(Object.entries(t), "explain-thresholds")),
      ),
      h("h3", null, "Stored row"),
      kvTable(
        [
          ["state", stored.state ?? st.state],
          ["confidence", stored.confidence ?? st.confidence],
          ["observations", stored.observation_count ?? ex.observation_count],
          ["last change", absTime(stored.last_change_ts)],
          ["last observation", absTime(stored.last_observation_ts ?? st.last_observation_ts)],
          ["version", stored.version ?? "—"],
          ["identity", ex.identity_uuid ?? model.identity ?? "—"],
        ],
        "explain-stored",
      ),
    ];
    return parts;
  }

  // ---- start ----
  renderHeader();
  (async () => {
    const found = await fetchDetail();
    if (destroyed) return;
    if (found === "missing") {
      status.hidden = true;
      return;
    }
    stream = new EventStream(`/attackers/${encodeURIComponent(uuid)}/events`, STREAM_EVENTS, onEvent, setStatus);
    stream.start();
  })();

  return {
    destroy() {
      destroyed = true;
      clearInterval(tick);
      if (refetchTimer) clearTimeout(refetchTimer);
      if (explainTimer) clearTimeout(explainTimer);
      if (stream) stream.close();
    },
  };
}

// ---------------------------------------------------------------------------------------
// identities
// ---------------------------------------------------------------------------------------
const IDENTITY_STREAM_EVENTS = ["snapshot", "formed", "merged", "unmerged", "observation.linked"];

function identityLink(id) {
  return h("a", { class: "mono", href: `#/identities/${encodeURIComponent(id)}` }, shorten(id, 40));
}

function evidenceText(ev) {
  if (!ev || typeof ev !== "object") return "";
  const same = ev.value === ev.other_value;
  const value = shorten(valueText(ev.value), 40);
  const how = same ? `= ${value}` : `${value} ≈ ${shorten(valueText(ev.other_value), 40)} (${plural(ev.distance, "bit")} apart)`;
  return `${ev.primitive} ${how}`;
}

// The links recorded for this attacker's merges: "b ↔ a: hassh = …".
function linkingEvidence(ident, attacker) {
  const out = [];
  for (const m of Array.isArray(ident.merges) ? ident.merges : []) {
    for (const link of Array.isArray(m.evidence) ? m.evidence : []) {
      const pair = Array.isArray(link.attackers) ? link.attackers : [];
      if (attacker && !pair.includes(attacker)) continue;
      const evs = Array.isArray(link.evidence) ? link.evidence : [];
      out.push(`${pair.map((x) => shorten(String(x), 24)).join(" ↔ ")}: ${evs.map(evidenceText).join("; ")}`);
    }
  }
  return out;
}

function identityRollup(ident, attacker) {
  const n = isNum(ident.attacker_count) ? ident.attacker_count : 0;
  const parts = [
    h(
      "p",
      null,
      "Rolls up to identity ",
      identityLink(ident.uuid),
      ` with ${plural(n, "attacker")}`,
      ident.merged_into_uuid ? " (merged away)" : "",
      ".",
    ),
  ];
  const links = linkingEvidence(ident, attacker);
  if (links.length) {
    parts.push(h("ul", { class: "evidence", "data-testid": "rollup-evidence" }, ...links.map((t) => h("li", null, t))));
  }
  return parts;
}

function identityView(id) {
  let destroyed = false;
  let stream = null;
  let timer = null;
  const statusText = h("span", null, "Connecting…");
  const status = h(
    "div",
    { class: "stream-status", role: "status", "data-testid": "stream-status", "data-status": "reconnecting" },
    h("span", { class: "dot", "aria-hidden": "true" }),
    statusText,
  );
  const title = h("h1", { id: "identity-title" }, "Identity");
  const facts = h("dl", { class: "facts" });
  const note = h("p", { class: "muted", role: "status" });
  const badges = h("div", { "data-testid": "identity-badges" });
  const members = h("tbody");
  const fingerprints = h("ul", { class: "evidence", "data-testid": "identity-fingerprints" });
  const history = h("ul", { class: "evidence", "data-testid": "identity-merges" });
  setView(
    h(
      "section",
      { "aria-labelledby": "identity-title", "data-testid": "identity-view" },
      h("a", { class: "back", href: "#/" }, "← All attackers"),
      h("div", { class: "detail-head" }, h("div", null, title, facts), status),
      note,
      h("h2", null, "Attribution"),
      badges,
      h("h2", null, "Attackers"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { class: "data", "data-testid": "identity-members" },
          h("thead", null, h("tr", null, h("th", { scope: "col" }, "Attacker"), h("th", { scope: "col" }, "IP"), h("th", { scope: "col" }, "Last seen"), h("th", { scope: "col" }, "Joined from"))),
          members,
        ),
      ),
      h("h2", null, "Fingerprints"),
      fingerprints,
      h("h2", null, "Merges and the evidence that links them"),
      history,
    ),
  );

  function render(ident) {
    title.textContent = `Identity ${shorten(ident.uuid, 40)}`;
    const items = [
      ["Identity", h("span", { class: "mono" }, ident.uuid)],
      ["Attackers", String(ident.attacker_count)],
      ["Created", timeNode(ident.created_at)],
    ];
    if (ident.merged_into_uuid) items.push(["Merged into", identityLink(ident.merged_into_uuid)]);
    facts.replaceChildren(...items.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v))));
    const counts = {};
    for (const r of ident.attribution || []) counts[stateOf(r.state)] = (counts[stateOf(r.state)] || 0) + 1;
    const rows = (ident.attribution || []).map((r) =>
      h(
        "li",
        null,
        h("span", { class: `badge state-${stateOf(r.state)}`, "data-state": stateOf(r.state) }, LABELS[stateOf(r.state)]),
        ` ${r.primitive}: `,
        valueNode(r.current_value, 40),
      ),
    );
    badges.replaceChildren(statePills(counts), h("ul", { class: "evidence" }, ...rows));
    members.replaceChildren(
      ...(ident.attackers || []).map((m) =>
        h(
          "tr",
          { "data-attacker": m.uuid },
          h("td", null, h("a", { class: "mono", href: `#/attackers/${encodeURIComponent(m.uuid)}` }, shorten(m.uuid, 40))),
          h("td", null, m.ip ? valueText(m.ip) : "—"),
          h("td", null, timeNode(m.last_seen)),
          h("td", null, m.home_identity && m.home_identity !== ident.uuid ? identityLink(m.home_identity) : "—"),
        ),
      ),
    );
    fingerprints.replaceChildren(
      ...(ident.fingerprints || []).map((f) =>
        h("li", null, `${f.primitive} = ${shorten(valueText(f.value), 48)} (${plural((f.attacker_uuids || []).length, "attacker")})`),
      ),
    );
    history.replaceChildren(
      ...(ident.merges || []).map((m) =>
        h(
          "li",
          { "data-kind": m.kind },
          `${m.kind === "merged" ? "Merged" : "Un-merged"} ${absTime(m.ts)}: `,
          identityLink(m.loser_uuid),
          m.kind === "merged" ? " into " : " out of ",
          identityLink(m.winner_uuid),
          ` (${plural((m.attacker_uuids || []).length, "attacker")})`,
          ...linkingEvidence(m.evidence ? { merges: [m] } : {}, null).map((t) => h("div", { class: "muted" }, t)),
        ),
      ),
    );
    if (!history.children.length) history.append(h("li", { class: "muted" }, "none"));
  }

  async function load() {
    try {
      const ident = await api(`/identities/${encodeURIComponent(id)}`);
      if (destroyed) return;
      note.textContent = "";
      render(ident);
    } catch (e) {
      if (destroyed) return;
      note.textContent = e.status === 404 ? "This identity does not exist." : `Could not load the identity: ${e.detail}`;
    }
  }

  function onEvent(name, payload) {
    if (name === "snapshot" || !payload || typeof payload !== "object") return;
    // any identity event naming this one: read it again
    const named = [payload.identity_uuid, payload.winner_uuid, payload.loser_uuid, payload.resurrected_uuid, payload.former_winner_uuid, payload.merged_into_uuid];
    if (!named.includes(id)) return;
    if (timer) clearTimeout(timer);
    timer = setTimeout(() => {
      timer = null;
      if (!destroyed) load();
    }, 150);
  }

  function setStatus(state, text) {
    status.setAttribute("data-status", state);
    statusText.textContent = text;
  }

  load();
  stream = new EventStream("/identities/events", IDENTITY_STREAM_EVENTS, onEvent, setStatus);
  stream.start();
  return {
    destroy() {
      destroyed = true;
      if (timer) clearTimeout(timer);
      if (stream) stream.close();
    },
  };
}

// ---------------------------------------------------------------------------------------
// boot
// ---------------------------------------------------------------------------------------
async function boot() {
  document.getElementById("logout").addEventListener("click", logout);
  window.addEventListener("hashchange", () => route());
  const token = loadToken();
  if (token) {
    session.token = token;
    try {
      session.user = await api("/auth/me");
    } catch (e) {
      // 401: api() has already shown the login; otherwise (server down…)
      // keep the token and let the views retry.
      void e;
    }
  }
  if (!currentView) route();
}

boot();
