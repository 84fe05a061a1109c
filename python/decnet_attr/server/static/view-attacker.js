// An attacker's page (#/attackers/<uuid>): its facts, the multi-actor banner,
// one row per primitive with its state badge and timeline, and the
// explanation of a badge.

import { h, setView, svg } from "./dom.js";
import { LABELS, MULTI_ACTOR_MIN_PRIMITIVES } from "./facts.js";
import { absTime, formatNumber, isNum, pct, plural, shorten, stateOf, timeNode, valueKey, valueNode, valueText } from "./format.js";
import { api, session } from "./session.js";
import { EventStream } from "./stream.js";
import { identityRollup } from "./widgets.js";

const TIMELINE_MAX = 16;
const VALUE_COLOURS = 8;
const EXPLAIN_PREFETCH_MAX = 64;
const EXPLAIN_CONCURRENCY = 4;

// Every event the relay may send (docs/decnet.md#sse-relay plus our additions).
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

function badgeTitle(row) {
  const st = stateOf(row.state);
  const n = isNum(row.observation_count) ? row.observation_count : 0;
  return `${LABELS[st]} • confidence ${pct(row.confidence)} over ${plural(n, "observation")} — show why`;
}

function colourClass(index) {
  return index < VALUE_COLOURS ? `v${index}` : "v-other";
}

export function attackerView(uuid) {
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
