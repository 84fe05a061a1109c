// Pieces several views show: form fields, state pills, the multi-actor
// marker, links to attackers and identities, and an attacker's identity line.

import { h } from "./dom.js";
import { LABELS, STATES } from "./facts.js";
import { isNum, plural, shorten, valueText } from "./format.js";

export function field(id, label, input, hint) {
  return h(
    "div",
    { class: "field" },
    h("label", { for: id }, label),
    input,
    hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null,
  );
}

export function statePills(counts) {
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

export function multiMarker() {
  return h(
    "span",
    { class: "multi-marker", title: "Several operators suspected", "data-testid": "multi-actor-marker" },
    "⚑ MULTI-ACTOR",
  );
}

export function attackerLink(uuid, text) {
  return h("a", { href: `#/attackers/${encodeURIComponent(uuid)}` }, text);
}

export function identityLink(id) {
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
export function linkingEvidence(ident, attacker) {
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

export function identityRollup(ident, attacker) {
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
