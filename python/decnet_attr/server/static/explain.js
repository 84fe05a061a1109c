// The explanation of a badge (GET …/attribution/<primitive>/explain): the rule
// that decided the state, the window of values, the measured quantities next
// to the thresholds they were compared against, and the stored row.

import { h } from "./dom.js";
import { LABELS } from "./facts.js";
import { absTime, formatNumber, isNum, pct, plural, stateOf, valueKey, valueNode, valueText } from "./format.js";

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

function legend(counted, caption, swatch) {
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
          h("span", { class: `swatch ${swatch(c.key)}`, "aria-hidden": "true" }),
          valueNode(c.value, 40),
          h("span", { class: "muted" }, `× ${c.n}`),
        ),
      ),
    ),
  );
}

// The panel's content. `header` is its heading node, `timeline(points, opts)`
// draws the window, `swatch(key)` is the colour class of a value,
// `previousState` the row's previous state as the page knows it and
// `identity` the attacker's identity.
export function renderExplain(prim, ex, { header, timeline, swatch, previousState, identity }) {
  const st = ex.state && typeof ex.state === "object" ? ex.state : {};
  const state = stateOf(st.state);
  const win = Array.isArray(ex.window) ? ex.window.filter((w) => w && isNum(w.ts)) : [];
  const t = ex.thresholds && typeof ex.thresholds === "object" ? ex.thresholds : {};
  const d = ex.detail && typeof ex.detail === "object" ? ex.detail : {};
  const windowN = isNum(d.window_n) ? d.window_n : isNum(t.window_n) ? t.window_n : 5;
  const points = win.map((w) => ({ ts: w.ts, value: w.value, key: valueKey(w.value) }));
  for (const p of points) swatch(p.key); // colours in window order
  const recent = win.slice(-windowN).map((w) => w.value);
  const older = win.slice(-2 * windowN, -windowN).map((w) => w.value);
  const previous = ex.previous_state || previousState || null;
  const stored = ex.stored && typeof ex.stored === "object" ? ex.stored : {};
  const parts = [
    header,
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
    timeline(points, { width: Math.max(240, 22 * Math.max(win.length, 2)), height: 34, max: Math.max(win.length, 2) }),
    h(
      "div",
      { class: "grid2" },
      legend(countValues(recent), `Recent window (last ${Math.min(windowN, recent.length)})`, swatch),
      older.length ? legend(countValues(older), `Older window (${older.length} before)`, swatch) : null,
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
        ["identity", ex.identity_uuid ?? identity ?? "—"],
      ],
      "explain-stored",
    ),
  ];
  return parts;
}
