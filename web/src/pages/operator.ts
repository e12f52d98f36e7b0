/** The operator's pages: tenants (each opens its Certificate menu) and the KDC's status. */
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { api } from "../api.js";
import { h, when } from "../dom.js";
import { date } from "../format.js";
import { pageError, type Page } from "./common.js";

/** Every tenant, with its active version. */
export const tenantsPage: Page = async ({ main }) => {
  const head = h("h1", {}, "Tenants");
  try {
    const { tenants } = await api.admin.listTenants({});
    main.replaceChildren(
      head,
      h(
        "section",
        { class: "card scroll" },
        tenants.length === 0
          ? h("p", {}, "No tenants yet (`kmi ctl tenant create ID --bootstrap`).")
          : h(
              "table",
              { id: "tenants" },
              h("thead", {}, h("tr", {}, ...["Tenant", "Name", "Active version", "Created"].map((t) => h("th", { scope: "col" }, t)))),
              h(
                "tbody",
                {},
                ...tenants.map((t) =>
                  h(
                    "tr",
                    {},
                    h("th", { scope: "row" }, h("a", { href: `#/t/${t.tenantId}/ca` }, t.tenantId)),
                    h("td", {}, t.displayName),
                    h("td", {}, t.activeVersion === 0 ? "none" : String(t.activeVersion)),
                    h("td", {}, when(date(t.createdAt))),
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

/** The Auditserver as the KDC's relay reaches it: machines and quarantines, or why it cannot be asked. */
async function auditserverCard(): Promise<HTMLElement> {
  const card = h("section", { class: "card" }, h("h2", {}, "Auditserver"));
  try {
    const { machines } = await api.audit.listMachines({});
    const quarantined = machines.filter((m) => m.status === MachineStatus.QUARANTINED).length;
    card.append(
      h("dl", { class: "facts" }, h("dt", {}, "Machines"), h("dd", { id: "machines-total" }, String(machines.length)), h("dt", {}, "Quarantined"), h("dd", { id: "machines-quarantined" }, String(quarantined))),
      h("p", {}, h("a", { href: "#/machines" }, "See the machines")),
    );
  } catch (err) {
    card.append(pageError(err));
  }
  return card;
}

/** The KDC's status: version, uptime, connected agents, the audit head, per-tenant rollout. */
export const meshPage: Page = async ({ main }) => {
  const head = h("h1", {}, "Mesh status");
  try {
    const s = await api.admin.getKdcStatus({});
    main.replaceChildren(
      head,
      h(
        "section",
        { class: "card" },
        h("h2", {}, "KDC"),
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Version"),
          h("dd", {}, s.version),
          h("dt", {}, "Uptime"),
          h("dd", {}, `${Math.floor(Number(s.uptimeSeconds) / 60)} min`),
          h("dt", {}, "Connected agents"),
          h("dd", { id: "connected-agents" }, String(s.connectedAgents)),
          h("dt", {}, "Attestation key"),
          h("dd", {}, s.attestationKeyLoaded ? "loaded" : "not loaded: distribution is unavailable"),
          h("dt", {}, "Audit log head"),
          h("dd", {}, String(s.auditHeadSeq)),
        ),
      ),
      await auditserverCard(),
      h(
        "section",
        { class: "card scroll" },
        h("h2", {}, "Rollout per tenant"),
        h(
          "table",
          { id: "tenant-rollout" },
          h("thead", {}, h("tr", {}, ...["Tenant", "Active version", "Machines up to date"].map((t) => h("th", { scope: "col" }, t)))),
          h(
            "tbody",
            {},
            ...s.tenants.map((t) =>
              h("tr", {}, h("th", { scope: "row" }, h("a", { href: `#/t/${t.tenantId}/rollout` }, t.tenantId)), h("td", {}, t.activeVersion === 0 ? "none" : String(t.activeVersion)), h("td", {}, `${t.machinesUpToDate} of ${t.machinesTotal}`)),
            ),
          ),
        ),
      ),
    );
  } catch (err) {
    main.replaceChildren(head, pageError(err));
  }
};
