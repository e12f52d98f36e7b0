/** The audit trail: the KDC's hash-chained log, the tenant's entries (an operator's view: every entry). */
import { api } from "../api.js";
import { h } from "../dom.js";
import { pageError, tenantHeader, type Page } from "./common.js";

/** The audit page of a tenant (`params[0]`) or, for operators, of everything. */
export const auditPage: Page = async ({ main, params }) => {
  const tenant = params[0];
  const head = tenant === undefined ? h("h1", {}, "Audit log") : tenantHeader(tenant, "audit");
  try {
    const res = await api.admin.tailAuditLog({ last: true, limit: 200, tenantId: tenant ?? "" });
    const rows = [...res.entries].reverse();
    main.replaceChildren(
      head,
      h(
        "section",
        { class: "card scroll" },
        h(
          "table",
          { id: "audit" },
          h("caption", {}, "Newest first"),
          h("thead", {}, h("tr", {}, ...["#", "Time", "Actor", "Action", "Target", "Outcome"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            ...rows.map((e) =>
              h(
                "tr",
                {},
                h("td", {}, String(e.seq)),
                h("td", {}, e.time === undefined ? "" : new Date(Number(e.time.seconds) * 1000).toISOString().replace("T", " ").slice(0, 19)),
                h("td", {}, e.actor),
                h("td", {}, e.action),
                h("td", {}, e.target),
                h("td", {}, e.outcome),
              ),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    main.replaceChildren(head, pageError(err));
  }
};
