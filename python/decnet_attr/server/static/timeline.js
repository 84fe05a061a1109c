// A primitive's recent values as a strip of ticks (inline SVG, text only):
// one tick per value, newest at the right edge, coloured by value (the same
// value keeps its colour on the whole page); numeric values also set the
// tick's height.

import { svg } from "./dom.js";
import { absTime, isNum, shorten, valueText } from "./format.js";

// How many values a row's timeline shows.
export const TIMELINE_MAX = 16;
// Distinct colours for values; further values share one.
const VALUE_COLOURS = 8;

// The class of colour number `index` (style.css: .v0 … .v7, .v-other).
export function colourClass(index) {
  return index < VALUE_COLOURS ? `v${index}` : "v-other";
}

// timelineSvg(prim, points, { kind, colourOf, width, height, max }): `points`
// are {ts, value, key} in time order; `colourOf(key)` gives a value's colour
// number; `kind` ("numeric" or another) decides the ticks' heights, guessed
// from the values when not given.
export function timelineSvg(prim, points, { kind, colourOf, width = 176, height = 24, max = TIMELINE_MAX } = {}) {
  const shown = points.slice(-max);
  const drawAs = kind || (shown.length && shown.every((p) => isNum(p.value)) ? "numeric" : "categorical");
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
  if (drawAs === "numeric") {
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
    if (drawAs === "numeric" && isNum(p.value) && hi > lo) {
      tickH = 5 + ((p.value - lo) / (hi - lo)) * (height - 11);
    }
    const latest = i === shown.length - 1;
    const rect = svg("rect", {
      class: `tick ${colourClass(colourOf(p.key))}${latest ? " latest" : " old"}`,
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
