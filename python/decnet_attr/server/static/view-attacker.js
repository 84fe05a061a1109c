// An attacker's page (#/attackers/<uuid>): its facts, the multi-actor banner,
// one row per primitive with its state badge and timeline, and the
// explanation of a badge.

import { h, setView } from "./dom.js";
import { renderExplain } from "./explain.js";
import { LABELS, MULTI_ACTOR_MIN_PRIMITIVES } from "./facts.js";
import { absTime, isNum, pct, plural, shorten, stateOf, timeNode, valueKey, valueNode, valueText } from "./format.js";
import { api, session } from "./session.js";
import { EventStream } from "./stream.js";
import { TIMELINE_MAX, colourClass, timelineSvg } from "./timeline.js";
import { identityRollup } from "./widgets.js";

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

  function timeline(prim, points, opts = {}) {
    return timelineSvg(prim, points, { ...opts, kind: model.kinds.get(prim), colourOf: (key) => colourOf(prim, key) });
  }

  function renderTimeline(prim) {
    const d = dom.get(prim);
    if (!d) return;
    d.timeline.replaceChildren(timeline(prim, model.timelines.get(prim) || []));
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
    const row = model.rows.get(prim);
    explainPanel.replaceChildren(
      ...renderExplain(prim, ex, {
        header: explainHeader(prim),
        timeline: (points, opts) => timeline(prim, points, opts),
        swatch: (key) => colourClass(colourOf(prim, key)),
        previousState: row && row.previous_state,
        identity: model.identity,
      }),
    );
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
