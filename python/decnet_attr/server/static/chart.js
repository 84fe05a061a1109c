// A small inline-SVG line chart of the ingest rate (observations per second),
// newest point on the right. No dependencies; text only (no innerHTML).

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 240;
const HEIGHT = 48;

function node(tag, attrs) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

// rateChart(points) -> { el, update(values) }: `points` is how many values fit.
export function rateChart(points) {
  const title = node("title");
  title.textContent = "Ingest rate: no data yet";
  const area = node("path", { class: "rate-area", d: "" });
  const line = node("polyline", { class: "rate-line", points: "", fill: "none" });
  const el = node("svg", {
    class: "rate-chart",
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    preserveAspectRatio: "none",
    role: "img",
    "aria-label": "Ingest rate: no data yet",
    "data-testid": "rate-chart",
  });
  el.append(title, area, line);

  function update(values) {
    if (!values.length) return;
    const max = Math.max(1, ...values);
    const step = WIDTH / Math.max(1, points - 1);
    const x0 = WIDTH - step * (values.length - 1);
    const xy = values.map((v, i) => [x0 + i * step, HEIGHT - 2 - (v / max) * (HEIGHT - 4)]);
    const pts = xy.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
    line.setAttribute("points", pts);
    area.setAttribute("d", `M${x0.toFixed(1)},${HEIGHT} L${pts.replaceAll(" ", " L")} L${WIDTH},${HEIGHT} Z`);
    const now = Math.round(values[values.length - 1]);
    const label = `Ingest rate: ${now} observations per second now, peak ${Math.round(max)}`;
    title.textContent = label;
    el.setAttribute("aria-label", label);
    el.setAttribute("data-points", String(values.length));
  }

  return { el, update };
}
