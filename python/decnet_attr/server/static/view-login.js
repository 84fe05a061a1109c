// The sign-in form (#/ when there is no session).

import { h, setView } from "./dom.js";
import { ApiError, PASSWORD_MAX, api, flash, route, session, storeToken } from "./session.js";
import { field } from "./widgets.js";

export function loginView() {
  const error = h("p", { class: "form-error", role: "alert", "aria-live": "assertive" });
  const user = h("input", {
    id: "login-username",
    name: "username",
    autocomplete: "username",
    required: true,
    maxlength: "128",
    autocapitalize: "none",
    spellcheck: "false",
  });
  const pass = h("input", {
    id: "login-password",
    name: "password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  const submit = h("button", { type: "submit", class: "btn btn-primary", "data-testid": "login-submit" }, "Sign in");
  const note = flash.loginMessage ? h("p", { role: "status" }, flash.loginMessage) : null;
  flash.loginMessage = "";
  const form = h(
    "form",
    { class: "card auth", "data-testid": "login-form", "aria-labelledby": "login-title", novalidate: true },
    h("h1", { id: "login-title" }, "Sign in"),
    note,
    error,
    field("login-username", "Username", user),
    field("login-password", "Password", pass),
    h("div", { class: "actions" }, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    if (!user.value || !pass.value) {
      error.textContent = "Enter your username and password.";
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("/auth/login", {
        method: "POST",
        body: { username: user.value, password: pass.value },
        auth: false,
      });
      storeToken(res.access_token);
      if (res.must_change_password) {
        session.pendingOldPassword = pass.value;
        session.user = { username: user.value, role: "", must_change_password: true };
      } else {
        session.user = await api("/auth/me");
      }
      route();
    } catch (e) {
      error.textContent = e instanceof ApiError ? e.detail : "Sign-in failed.";
      submit.disabled = false;
      pass.select();
    }
  });
  setView(form);
  user.focus();
  return { destroy() {} };
}
