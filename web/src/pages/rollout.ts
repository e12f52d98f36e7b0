/**
 * The rollout: which version each agent holds, against the tenant's active version. There is
 * no streaming RPC for it yet, so the page asks GetRolloutStatus (what `kmi ctl ca status`
 * shows) every 2 seconds while it is open.
 */
import type { GetRolloutStatusResponse } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { api } from "../api.js";
import { announce, h, when } from "../dom.js";
import { date } from "../format.js";
import { pageError, tenantHeader, type Page } from "./common.js";

/** How often the page asks, ms. */
const POLL_MS = 2000;

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

/** The rollout page. */
export const rolloutPage: Page = async ({ main, params, signal }) => {
  const tenant = params[0]!;
  const body = h("section", { class: "card scroll", "aria-labelledby": "ro-h" }, h("h2", { id: "ro-h" }, "Rollout per machine"), h("p", {}, "Loading…"));
  main.replaceChildren(tenantHeader(tenant, "rollout"), h("p", { class: "hint" }, `Updated every ${POLL_MS / 1000} seconds while this page is open.`), body);
  let last = "";
  while (!signal.aborted) {
    try {
      const res = await api.ca.getRolloutStatus({ tenantId: tenant }, { signal });
      body.replaceChildren(body.firstChild!, table(res));
      const summary = `${res.upToDateCount} of ${res.machines.length} machines hold version ${res.activeVersion}`;
      if (summary !== last) announce(summary);
      last = summary;
    } catch (err) {
      if (signal.aborted) return;
      body.replaceChildren(body.firstChild!, pageError(err));
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
};
