// An identity's page (#/identities/<uuid>): its attackers, fingerprints,
// badges and merges, kept live from the identities stream.

import { h, setView } from "./dom.js";
import { LABELS } from "./facts.js";
import { absTime, plural, shorten, stateOf, timeNode, valueNode, valueText } from "./format.js";
import { api } from "./session.js";
import { EventStream } from "./stream.js";
import { identityLink, linkingEvidence, statePills } from "./widgets.js";

const IDENTITY_STREAM_EVENTS = ["snapshot", "formed", "merged", "unmerged", "observation.linked"];

export function identityView(id) {
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
