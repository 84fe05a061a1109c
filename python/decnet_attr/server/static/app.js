// decnet-attr dashboard: vanilla ES modules, no dependencies, no build step.
// This module is the entry point (index.html loads it): it picks the view for
// the session and the location hash. Each view is a module of its own
// (view-*.js) returning { destroy() }; shared pieces live in dom.js (building
// the DOM), format.js (display text), widgets.js (pieces several views show),
// session.js (token and API), stream.js (the live event stream), facts.js
// (what the server says about states and thresholds), timeline.js and
// explain.js (the attacker page's value strips and badge explanations) and
// chart.js.
//
// Security notes:
// - The access token is only ever sent in an Authorization header; the event
//   stream is authorised with a single-use ticket minted for every connect.
// - Everything shown comes from attackers: the DOM is built with textContent
//   and setAttribute only (never innerHTML), so nothing is ever parsed as HTML.

import { h, mainEl, setView } from "./dom.js";
import { applyFacts, factsLoaded } from "./facts.js";
import { api, loadToken, logout, route, session, setRouter } from "./session.js";
import { attackerView } from "./view-attacker.js";
import { identityView } from "./view-identity.js";
import { listView } from "./view-list.js";
import { loginView } from "./view-login.js";
import { changePasswordView } from "./view-password.js";

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

function showView() {
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
  if (!factsLoaded()) {
    currentView = waitForFacts();
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

// The views below need the server's facts (facts.js): fetch them once, then
// show the view; a failure is shown and retried.
const FACTS_RETRY_MS = 2000;

function waitForFacts() {
  let destroyed = false;
  let timer = null;
  setView(h("p", { class: "loading" }, "Loading…"));
  const load = () => {
    api("/dashboard/config").then(
      (config) => {
        if (destroyed) return;
        applyFacts(config);
        route();
      },
      (err) => {
        if (destroyed || !session.token) return;
        setView(h("p", { class: "notice", role: "alert" }, `Cannot load the dashboard: ${err.message}. Retrying…`));
        timer = setTimeout(load, FACTS_RETRY_MS);
      },
    );
  };
  load();
  return {
    destroy() {
      destroyed = true;
      if (timer) clearTimeout(timer);
    },
  };
}

async function boot() {
  setRouter(showView);
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
