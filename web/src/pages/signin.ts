/** The sign-in page: paste a token (login links sign in by themselves). */
import { api } from "../api.js";
import { field, h } from "../dom.js";
import { showError } from "./common.js";

/** Draws the sign-in form; `done` runs after a successful sign-in. */
export function signInPage(main: HTMLElement, done: () => void, message?: string): void {
  const input = h("input", { type: "password", autocomplete: "off", name: "token", spellcheck: "false" });
  const f = field("Token", input, "An operator or tenant-admin token (kmi_…). It is exchanged for a session; the page keeps no copy. Or open a login link from `kmi ctl portal login-link`.");
  const form = h(
    "form",
    { class: "card narrow" },
    h("h1", {}, "Sign in to kmi"),
    message !== undefined ? h("p", { class: "error", role: "alert" }, message) : undefined,
    f.wrap,
    h("button", { type: "submit" }, "Sign in"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    f.error("");
    api.portal.signIn({ credential: { case: "token", value: input.value } }).then(
      () => {
        input.value = "";
        done();
      },
      (err: unknown) => showError(err, { token: f }, f),
    );
  });
  main.replaceChildren(form);
  input.focus();
}
