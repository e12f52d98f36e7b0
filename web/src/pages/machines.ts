/**
 * The operator's machine pages, through the KDC's relay of the Auditserver's AuditAdminService:
 * machines (status, last attestation, versions held), quarantine and release with a reason
 * (typed confirmation), and join tokens for new machines.
 */
import type { Group, Machine } from "../../../src/gen/kmi/audit/v1/admin_pb.js";
import { MachineStatus } from "../../../src/gen/kmi/audit/v1/audit_pb.js";
import { api } from "../api.js";
import { announce, confirmTyped, field, h, select, when } from "../dom.js";
import { date } from "../format.js";
import { pageError, showError, type Page } from "./common.js";

/** machine id -> "acme v2, globex v1", from every tenant's rollout. */
async function versionsHeld(): Promise<Map<string, string[]>> {
  const held = new Map<string, string[]>();
  const { tenants } = await api.admin.listTenants({});
  for (const t of tenants) {
    const r = await api.ca.getRolloutStatus({ tenantId: t.tenantId });
    for (const m of r.machines) if (m.heldVersion > 0) held.set(m.machineId, [...(held.get(m.machineId) ?? []), `${t.tenantId} v${m.heldVersion}`]);
  }
  return held;
}

function statusLabel(m: Machine): string {
  return m.status === MachineStatus.QUARANTINED ? "quarantined" : m.status === MachineStatus.ACTIVE ? "active" : "unknown";
}

function attestationLabel(m: Machine): string {
  const a = m.lastAttestation;
  if (a === undefined) return "never";
  return `${a.ok ? "ok" : `failed: ${a.problem}`} (${when(date(a.time))})`;
}

/** Asks for a reason and the typed phrase, then quarantines or releases `m`. */
function changeStatus(m: Machine, release: boolean, refresh: () => void): void {
  const reason = h("input", { type: "text", name: "reason", autocomplete: "off" });
  const r = field("Reason", reason, "Kept on the machine and in the Auditserver's audit log.");
  const verb = release ? "release" : "quarantine";
  confirmTyped({
    title: `${release ? "Release" : "Quarantine"} ${m.machineId}`,
    body: release
      ? `${m.machineId} may attest again and receive secrets.`
      : `${m.machineId} is refused by the KDC at once; its agent drops every key it holds and refuses to sign.`,
    phrase: `${verb} ${m.machineId}`,
    button: release ? "Release" : "Quarantine",
    extra: [r.wrap],
    run: async () => {
      if (release) await api.audit.releaseMachine({ machineId: m.machineId, reason: reason.value });
      else await api.audit.quarantineMachine({ machineId: m.machineId, reason: reason.value });
      announce(`${m.machineId} is ${release ? "released" : "quarantined"}.`);
      refresh();
    },
  });
}

/** Every machine the Auditserver knows. */
export const machinesPage: Page = async ({ main, refresh }) => {
  const head = h("h1", {}, "Machines");
  try {
    const { machines } = await api.audit.listMachines({});
    const held = await versionsHeld();
    const rows = machines.map((m) =>
      h(
        "tr",
        { "data-machine": m.machineId, "data-status": statusLabel(m) },
        h("th", { scope: "row" }, m.machineId),
        h("td", {}, m.group),
        h("td", {}, m.hostname),
        h("td", {}, statusLabel(m), m.statusReason !== "" ? h("div", { class: "hint" }, m.statusReason) : undefined),
        h("td", {}, attestationLabel(m)),
        h("td", {}, (held.get(m.machineId) ?? ["none"]).join(", ")),
        h("td", {}, when(date(m.certificateNotAfter))),
        h(
          "td",
          {},
          m.status === MachineStatus.QUARANTINED
            ? h("button", { type: "button", "aria-label": `Release ${m.machineId}`, onclick: () => changeStatus(m, true, refresh) }, "Release")
            : h("button", { type: "button", class: "danger", "aria-label": `Quarantine ${m.machineId}`, onclick: () => changeStatus(m, false, refresh) }, "Quarantine"),
        ),
      ),
    );
    main.replaceChildren(
      head,
      h(
        "section",
        { class: "card scroll" },
        machines.length === 0
          ? h("p", {}, "No machine has enrolled yet; make a join token.")
          : h(
              "table",
              { id: "machines" },
              h("thead", {}, h("tr", {}, ...["Machine", "Group", "Host", "Status", "Last attestation", "Versions held", "Certificate until", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
              h("tbody", {}, ...rows),
            ),
      ),
    );
  } catch (err) {
    main.replaceChildren(head, pageError(err));
  }
};

/** Join tokens: one-time enrollment secrets for a machine group. */
export const joinTokensPage: Page = async ({ main }) => {
  const head = h("h1", {}, "Join tokens");
  let groups: Group[];
  try {
    groups = (await api.audit.listGroups({})).groups;
  } catch (err) {
    main.replaceChildren(head, pageError(err));
    return;
  }
  const group = field("Machine group", select("group", groups.map((g) => [g.name, `${g.name} (${g.allTenants ? "every tenant" : g.tenantIds.join(", ")})`])));
  const ttl = field("Valid for, seconds", h("input", { type: "number", name: "ttl_seconds", min: "60", value: "3600" }));
  const desc = field("Description", h("input", { type: "text", name: "description", autocomplete: "off" }));
  const formErr = h("p", { class: "error", role: "alert" });
  const result = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "jt-h" },
    h("h2", { id: "jt-h" }, "Make a join token"),
    h("p", {}, "A machine enrolls once with it (`kmi agent --join-token-file FILE`); it is shown once and stored hashed."),
    group.wrap,
    ttl.wrap,
    desc.wrap,
    formErr,
    h("button", { type: "submit" }, "Make a join token"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    for (const f of [group, ttl, desc]) f.error("");
    formErr.textContent = "";
    api.audit.createJoinToken({ group: group.control.value, ttlSeconds: Number(ttl.control.value), description: desc.control.value }).then(
      (res) => {
        const secret = h("textarea", { readonly: true, rows: "2", id: "join-token-secret", spellcheck: "false" });
        secret.value = res.secret;
        result.replaceChildren(
          h(
            "section",
            { class: "card" },
            h("h2", {}, `Join token ${res.tokenId}`),
            field(`Secret (shown once; valid until ${when(date(res.expiresAt))})`, secret).wrap,
          ),
        );
        announce("Join token made.");
      },
      (err: unknown) => showError(err, { group, ttl_seconds: ttl, description: desc }, formErr),
    );
  });
  main.replaceChildren(head, groups.length === 0 ? h("p", {}, "No machine group yet (`kmi ctl group create NAME --tenant T`).") : form, result);
};
