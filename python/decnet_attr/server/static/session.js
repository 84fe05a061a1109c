// The session (token, user) and the API client. The token lives in memory and
// in sessionStorage (this tab only), and is only ever sent in an Authorization
// header, never in a URL.
//
// Showing a view is app.js's job; it registers its router with setRouter(),
// so that this module and the views can ask for the current view again
// (route()) without importing app.js.

import { describeDetail } from "./format.js";

export const API = "/api/v1";
const TOKEN_KEY = "decnet-attr.token";
const MUST_CHANGE_DETAIL = "Password change required before accessing this resource";
export const PASSWORD_MIN = 12;
export const PASSWORD_MAX = 72;

let router = () => {};

export function setRouter(fn) {
  router = fn;
}

// Show the view for the current session and location again.
export function route() {
  router();
}

export class ApiError extends Error {
  constructor(status, detail, retryAfter) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.detail = detail;
    this.retryAfter = retryAfter;
  }
}

export const session = {
  token: null,
  user: null,
  // The password typed at a login that requires a change: kept in memory only,
  // to prefill the forced change form, and dropped right after.
  pendingOldPassword: null,
};

export function loadToken() {
  try {
    return window.sessionStorage.getItem(TOKEN_KEY);
  } catch {
    return null;
  }
}

export function storeToken(token) {
  session.token = token;
  try {
    if (token) window.sessionStorage.setItem(TOKEN_KEY, token);
    else window.sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: memory only */
  }
}

export async function api(path, { method = "GET", body, auth = true } = {}) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (auth && session.token) headers.Authorization = `Bearer ${session.token}`;
  let resp;
  try {
    resp = await fetch(API + path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "same-origin",
      referrerPolicy: "no-referrer",
    });
  } catch {
    throw new ApiError(0, "The server cannot be reached");
  }
  let data = null;
  const text = await resp.text().catch(() => "");
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!resp.ok) {
    const detail = describeDetail(data && data.detail) || `${resp.status} ${resp.statusText}`;
    const err = new ApiError(resp.status, detail, resp.headers.get("Retry-After"));
    if (auth && resp.status === 401) sessionEnded("Your session has ended. Please sign in again.");
    else if (auth && resp.status === 403 && detail === MUST_CHANGE_DETAIL) mustChangePassword();
    throw err;
  }
  return data;
}

function sessionEnded(message) {
  if (!session.token) return;
  storeToken(null);
  session.user = null;
  flash.loginMessage = message;
  route();
}

function mustChangePassword() {
  if (session.user) session.user.must_change_password = true;
  else session.user = { must_change_password: true };
  route();
}

export const flash = { loginMessage: "" };

export async function logout() {
  const token = session.token;
  storeToken(null);
  session.user = null;
  flash.loginMessage = "You are signed out.";
  route();
  if (token) {
    // best effort: the token is already forgotten here
    try {
      await fetch(`${API}/auth/logout`, {
        method: "POST",
        headers: { Authorization: `Bearer ${token}`, Accept: "application/json" },
        cache: "no-store",
        credentials: "same-origin",
      });
    } catch {
      /* offline: the token expires on its own */
    }
  }
}
