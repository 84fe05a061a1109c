// The forced password change, shown while the account must change its password.

import { h, setView } from "./dom.js";
import { ApiError, PASSWORD_MAX, PASSWORD_MIN, api, logout, route, session, storeToken } from "./session.js";
import { field } from "./widgets.js";

export function changePasswordView() {
  const error = h("p", { class: "form-error", role: "alert", "aria-live": "assertive" });
  const old = h("input", {
    id: "cp-old",
    name: "old_password",
    type: "password",
    autocomplete: "current-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  if (session.pendingOldPassword) old.value = session.pendingOldPassword;
  const next = h("input", {
    id: "cp-new",
    name: "new_password",
    type: "password",
    autocomplete: "new-password",
    required: true,
    minlength: String(PASSWORD_MIN),
    maxlength: String(PASSWORD_MAX),
    "aria-describedby": "cp-new-hint",
  });
  const confirm = h("input", {
    id: "cp-confirm",
    name: "confirm_password",
    type: "password",
    autocomplete: "new-password",
    required: true,
    maxlength: String(PASSWORD_MAX),
  });
  const submit = h(
    "button",
    { type: "submit", class: "btn btn-primary", "data-testid": "change-password-submit" },
    "Change password",
  );
  const cancel = h("button", { type: "button", class: "btn", on: { click: logout } }, "Log out");
  const form = h(
    "form",
    {
      class: "card auth",
      "data-testid": "change-password-form",
      "aria-labelledby": "cp-title",
      novalidate: true,
    },
    h("h1", { id: "cp-title" }, "Choose a new password"),
    h("p", null, "This account must change its password before it can be used."),
    error,
    // for password managers: which account this is
    h("input", {
      type: "text",
      name: "username",
      autocomplete: "username",
      value: (session.user && session.user.username) || "",
      readonly: true,
      hidden: true,
    }),
    field("cp-old", "Current password", old),
    field("cp-new", "New password", next, `${PASSWORD_MIN} to ${PASSWORD_MAX} characters.`),
    field("cp-confirm", "Repeat the new password", confirm),
    h("div", { class: "actions" }, cancel, submit),
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    if (!old.value) {
      error.textContent = "Enter the current password.";
      return;
    }
    if (next.value.length < PASSWORD_MIN || next.value.length > PASSWORD_MAX) {
      error.textContent = `The new password must be ${PASSWORD_MIN} to ${PASSWORD_MAX} characters long.`;
      return;
    }
    if (next.value !== confirm.value) {
      error.textContent = "The two new passwords differ.";
      return;
    }
    submit.disabled = true;
    try {
      const res = await api("/auth/change-password", {
        method: "POST",
        body: { old_password: old.value, new_password: next.value },
      });
      session.pendingOldPassword = null;
      storeToken(res.access_token);
      session.user = await api("/auth/me");
      route();
    } catch (e) {
      if (!session.token) return; // 401: already back at the login
      error.textContent = e instanceof ApiError ? e.detail : "The password could not be changed.";
      submit.disabled = false;
    }
  });
  setView(form);
  (old.value ? next : old).focus();
  return { destroy() {} };
}
