/**
 * The rollout: which version each agent holds, against the tenant's active version, live from
 * the WatchRolloutStatus server stream (the KDC sends the status at once and again when it
 * changes). When the stream breaks, the page says so and opens it again a few seconds later.
 */
import type { GetRolloutStatusResponse } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { api, isUnauthenticated } from "../api.js";
import { announce, errorText, h, when } from "../dom.js";
import { date } from "../format.js";
import { tenantHeader, type Page } from "./common.js";

/** How long the page waits before opening a broken stream again, ms. */
const RETRY_MS = 3000;

function table(res: GetRolloutStatusResponse): HTMLElement {
  if (res.machines.length === 0) return h("p", {}, "No machine has reported yet.");
  return h(
    "table",
    { id: "rollout" },
    h("caption", {}, `Active version ${res.activeVersion}: ${res.upToDateCount} of ${res.machines.length} machines up to date, ${res.connectedCount} connected`),
    h("thead", {}, h("tr", {}, ...["Machine", "Group", "Holds version", "Up to date", "Connected", "Last report"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      ...res.machines.map((m) =>
        h(
          "tr",
          { "data-machine": m.machineId, "data-held": String(m.heldVersion) },
          h("th", { scope: "row" }, m.machineId),
          h("td", {}, m.group),
          h("td", {}, m.heldVersion === 0 ? "none" : String(m.heldVersion)),
          h("td", {}, m.upToDate ? "yes" : "no"),
          h("td", {}, m.connected ? "yes" : "no"),
          h("td", {}, when(date(m.lastReport))),
        ),
      ),
    ),
  );
}

/** Follows the stream until the page ends, reopening it after a break. */
async function follow(tenant: string, body: HTMLElement, state: HTMLElement, signal: AbortSignal): Promise<void> {
  let last = "";
  while (!signal.aborted) {
    try {
      for await (const { status } of api.ca.watchRolloutStatus({ tenantId: tenant }, { signal })) {
        if (status === undefined) continue;
        state.textContent = "Live: updated by the KDC as agents report.";
        body.replaceChildren(body.firstChild!, state, table(status));
        const summary = `${status.upToDateCount} of ${status.machines.length} machines hold version ${status.activeVersion}`;
        if (summary !== last) announce(summary);
        last = summary;
      }
    } catch (err) {
      if (signal.aborted) return;
      state.textContent = `Not live: ${errorText(err)}`;
      if (isUnauthenticated(err)) return;
    }
    await new Promise((r) => setTimeout(r, RETRY_MS));
  }
}

/** The rollout page. */
export const rolloutPage: Page = async ({ main, params, signal }) => {
  const tenant = params[0]!;
  const state = h("p", { class: "hint", id: "rollout-live", role: "status" }, "Connecting…");
  const body = h("section", { class: "card scroll", "aria-labelledby": "ro-h" }, h("h2", { id: "ro-h" }, "Rollout per machine"), state, h("p", {}, "Loading…"));
  main.replaceChildren(tenantHeader(tenant, "rollout"), body);
  void follow(tenant, body, state, signal);
};
