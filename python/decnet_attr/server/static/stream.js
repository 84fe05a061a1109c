import { API, ApiError, api } from "./session.js";

const BACKOFF_MIN_MS = 1000;
const BACKOFF_MAX_MS = 10000;

// One event stream of the relay (`path` under the API, e.g. "/overview/events"),
// with reconnects (fresh ticket each time, resume cursor) and a status callback.
export class EventStream {
  constructor(path, events, onEvent, onStatus) {
    this.path = path;
    this.events = events;
    this.onEvent = onEvent;
    this.onStatus = onStatus;
    this.source = null;
    this.timer = null;
    this.closed = false;
    this.lastEventId = "";
    this.backoff = BACKOFF_MIN_MS;
    this.everConnected = false;
    this.onOnline = () => {
      if (this.timer && !this.source) {
        clearTimeout(this.timer);
        this.timer = null;
        this.connect();
      }
    };
    window.addEventListener("online", this.onOnline);
  }

  start() {
    this.connect();
  }

  close() {
    this.closed = true;
    window.removeEventListener("online", this.onOnline);
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    if (this.source) this.source.close();
    this.source = null;
  }

  async connect() {
    this.timer = null;
    if (this.closed) return;
    this.onStatus("reconnecting", this.everConnected ? "Reconnecting…" : "Connecting…");
    let ticket;
    try {
      // A fresh single-use ticket for every connect and reconnect.
      const res = await api("/auth/sse-ticket", { method: "POST" });
      ticket = res && res.ticket;
      if (typeof ticket !== "string" || !ticket) throw new ApiError(500, "no ticket");
    } catch (e) {
      if (this.closed) return;
      if (e instanceof ApiError && e.status === 401) {
        this.close(); // api() has sent the page back to the login
        return;
      }
      const wait = e instanceof ApiError && e.retryAfter ? Number(e.retryAfter) * 1000 : 0;
      this.retry(Number.isFinite(wait) ? wait : 0);
      return;
    }
    if (this.closed) return;
    // EventSource cannot send headers on a manual reconnect: the resume cursor
    // travels as ?last_event_id= (the relay accepts both).
    const q = new URLSearchParams({ ticket });
    if (this.lastEventId) q.set("last_event_id", this.lastEventId);
    const url = `${API}${this.path}?${q}`;
    let source;
    try {
      source = new EventSource(url);
    } catch {
      this.retry(0);
      return;
    }
    this.source = source;
    source.onopen = () => {
      if (this.source !== source) return;
      this.everConnected = true;
      this.onStatus("connected", "Live");
    };
    source.onerror = () => {
      // Connection lost, HTTP error, or a server "event: error" frame: never
      // let EventSource retry with the spent ticket.
      if (this.source !== source) return;
      source.close();
      this.source = null;
      this.retry(0);
    };
    for (const name of this.events) {
      source.addEventListener(name, (ev) => this.dispatch(source, name, ev));
    }
  }

  dispatch(source, name, ev) {
    if (this.source !== source || this.closed) return;
    if (ev.lastEventId) this.lastEventId = ev.lastEventId;
    this.backoff = BACKOFF_MIN_MS; // data flows: the next failure retries quickly
    let data = null;
    try {
      data = ev.data ? JSON.parse(ev.data) : null;
    } catch {
      return;
    }
    // Live events are {topic, type, ts, payload}; the snapshot is a bare object.
    const payload =
      data && typeof data === "object" && !Array.isArray(data) && "payload" in data ? data.payload : data;
    try {
      this.onEvent(name, payload, data);
    } catch (err) {
      console.error("decnet-attr: failed to apply", name, err);
    }
  }

  retry(minDelay) {
    if (this.closed) return;
    const base = Math.max(this.backoff, minDelay || 0);
    const delay = Math.min(base, Math.max(BACKOFF_MAX_MS, minDelay || 0)) * (0.85 + Math.random() * 0.3);
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
    this.onStatus("reconnecting", `Reconnecting in ${Math.max(1, Math.round(delay / 1000))} s…`);
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
