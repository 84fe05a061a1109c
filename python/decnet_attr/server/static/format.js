// Display text: times (absolute, relative, <time> nodes), numbers, values as
// attackers sent them, percentages, plurals and API error details.

import { h } from "./dom.js";
import { STATES } from "./facts.js";

const relFormat =
  typeof Intl !== "undefined" && Intl.RelativeTimeFormat
    ? new Intl.RelativeTimeFormat(undefined, { numeric: "auto" })
    : null;

export function isNum(v) {
  return typeof v === "number" && Number.isFinite(v);
}

// A time as a Date: epoch seconds (attribution rows, observations) or an
// ISO-8601 string (attackers, as DECNET's list and detail give them).
function asDate(ts) {
  if (isNum(ts)) return new Date(ts * 1000);
  if (typeof ts !== "string" || !ts) return null;
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? null : d;
}

export function absTime(ts) {
  const d = asDate(ts);
  return d ? d.toLocaleString() : "—";
}

function isoTime(ts) {
  const d = asDate(ts);
  return d ? d.toISOString() : "";
}

function relTime(ts) {
  const d = asDate(ts);
  if (!d) return "—";
  const diff = (d.getTime() - Date.now()) / 1000; // negative: in the past
  const abs = Math.abs(diff);
  const units = [
    [60, "second", 1],
    [3600, "minute", 60],
    [86400, "hour", 3600],
    [86400 * 30, "day", 86400],
    [86400 * 365, "month", 86400 * 30],
    [Infinity, "year", 86400 * 365],
  ];
  for (const [limit, unit, size] of units) {
    if (abs < limit) {
      const n = Math.round(diff / size);
      if (relFormat) return relFormat.format(n, unit);
      return n <= 0 ? `${-n} ${unit}(s) ago` : `in ${n} ${unit}(s)`;
    }
  }
  return absTime(ts);
}

export function timeNode(ts) {
  return h("time", { datetime: isoTime(ts) || undefined, title: absTime(ts) }, relTime(ts));
}

export function formatNumber(v) {
  if (Number.isInteger(v)) return String(v);
  return String(Number(v.toPrecision(6)));
}

// A value as display text (full) — strings as they are, everything else as JSON.
export function valueText(v) {
  if (v === null || v === undefined) return "null";
  if (typeof v === "string") return v;
  if (typeof v === "number") return formatNumber(v);
  try {
    return JSON.stringify(v);
  } catch {
    return String(v);
  }
}

export function shorten(text, max = 64) {
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

export function valueNode(v, max = 64) {
  if (v === null || v === undefined) return h("span", { class: "null" }, "null");
  const full = valueText(v);
  return h("span", { class: "value-main", title: full.length > max ? full : undefined }, shorten(full, max));
}

// A stable key for counting / colouring values (objects by canonical JSON).
export function valueKey(v) {
  return canonical(v);
}

function canonical(v) {
  if (v === null || typeof v !== "object") return JSON.stringify(v === undefined ? null : v);
  if (Array.isArray(v)) return `[${v.map(canonical).join(",")}]`;
  const keys = Object.keys(v).sort();
  return `{${keys.map((k) => `${JSON.stringify(k)}:${canonical(v[k])}`).join(",")}}`;
}

export function pct(confidence) {
  return isNum(confidence) ? `${Math.round(confidence * 100)}%` : "—";
}

export function stateOf(state) {
  return STATES.includes(state) ? state : "unknown";
}

export function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

export function describeDetail(detail) {
  if (detail === null || detail === undefined) return "";
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => (d && typeof d === "object" ? d.reason || d.msg || JSON.stringify(d) : String(d)))
      .join("; ");
  }
  return JSON.stringify(detail);
}
