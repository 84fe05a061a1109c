// The front page: fleet overview, alerts feed and the attackers list.

import { rateChart } from "./chart.js";
import { h, setView } from "./dom.js";
import { LABELS, STATES } from "./facts.js";
import { formatNumber, isNum, shorten, timeNode, valueText } from "./format.js";
import { api, session } from "./session.js";
import { EventStream } from "./stream.js";
import { attackerLink, multiMarker, statePills } from "./widgets.js";

const PAGE_SIZE = 25;
const LIST_REFRESH_MS = 15000;

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

export function listView() {
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
