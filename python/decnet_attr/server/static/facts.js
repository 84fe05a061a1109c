// Facts the server owns, read from GET /api/v1/dashboard/config once per
// page load (app.js does that before the first view that needs them): the
// attribution state names and the multi-actor minimum the engine runs with.
// Nothing here is a copy of the server's values; until they arrive the lists
// are empty and the minimum is unset.
//
// The exports are live: STATES and LABELS are filled in place, and
// MULTI_ACTOR_MIN_PRIMITIVES is a `let` binding importers see change.

// The state names in display order (the server's order, "unknown" last).
export const STATES = [];
// Display label of each state: "multi_actor" -> "MULTI-ACTOR".
export const LABELS = {};
// How many primitives of an identity must be multi_actor for the engine to
// suspect several operators (the thresholds' multi_actor_min_primitives).
export let MULTI_ACTOR_MIN_PRIMITIVES = null;

export function factsLoaded() {
  return MULTI_ACTOR_MIN_PRIMITIVES !== null;
}

// Apply the body of GET /api/v1/dashboard/config.
export function applyFacts(config) {
  const names = Array.isArray(config && config.states)
    ? config.states.filter((s) => typeof s === "string")
    : [];
  const ordered = [...names.filter((s) => s !== "unknown"), ...names.filter((s) => s === "unknown")];
  STATES.splice(0, STATES.length, ...ordered);
  for (const key of Object.keys(LABELS)) delete LABELS[key];
  for (const st of ordered) LABELS[st] = st.toUpperCase().replaceAll("_", "-");
  const min = config && config.multi_actor_min_primitives;
  MULTI_ACTOR_MIN_PRIMITIVES = Number.isInteger(min) && min > 0 ? min : 1;
}
