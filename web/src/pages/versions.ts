/**
 * History (every version with its state, source, fingerprint and validity) and what can be done
 * to a version: download its CSR, upload its signed certificate, discard it (pending), activate,
 * renew, revoke. Every change asks for a typed confirmation.
 */
import { Signer, VersionState, type IntermediateVersion } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { api } from "../api.js";
import { announce, confirmTyped, download, field, h, select, when } from "../dom.js";
import { date, signerLabel, stateLabel, versionStateText } from "../format.js";
import { pageError, showError, showFieldError, tenantHeader, type Page } from "./common.js";

/** Saves a pending version's CSR. */
export async function saveCsr(tenant: string, version: number): Promise<void> {
  const { csrPem } = await api.ca.getVersionCsr({ tenantId: tenant, version });
  download(`${tenant}-v${version}.csr`, csrPem, "application/pkcs10");
  announce(`Downloaded the CSR of version ${version}.`);
}

function actions(tenant: string, v: IntermediateVersion, refresh: () => void): HTMLElement {
  const n = v.version;
  const cell = h("div", { class: "row" }); // in a td: a flex td would leave the table's grid
  const btn = (label: string, aria: string, onclick: () => void) => h("button", { type: "button", "aria-label": aria, onclick }, label);
  if (v.state === VersionState.PENDING && !v.pendingExpired) {
    cell.append(
      btn("CSR", `Download the CSR of version ${n}`, () => void saveCsr(tenant, n)),
      h("a", { href: `#/t/${tenant}/upload/${n}`, class: "button", "aria-label": `Upload the signed certificate of version ${n}` }, "Upload"),
    );
  }
  if (v.state === VersionState.PENDING) cell.append(btn("Discard", `Discard version ${n}`, () => confirmDiscard(tenant, v, refresh)));
  if (v.state === VersionState.READY) {
    cell.append(
      btn("Activate", `Activate version ${n}`, () =>
        confirmTyped({
          title: `Activate version ${n}`,
          body: `Version ${n} becomes ${tenant}'s active CA; agents receive it on their watch streams and the current one retires.`,
          phrase: `activate ${n}`,
          button: "Activate",
          run: async () => {
            await api.ca.activateVersion({ tenantId: tenant, version: n });
            announce(`Version ${n} is active.`);
            refresh();
          },
        }),
      ),
    );
  }
  if (v.state === VersionState.ACTIVE || v.state === VersionState.READY || v.state === VersionState.RETIRED) {
    cell.append(
      btn("Renew", `Renew version ${n}`, () => {
        const signer = select("signer", [[String(Signer.KMI_ROOT), "KMI-signed (ready at once)"], [String(Signer.PRIVATE_CA), "private CA (a new CSR)"]], String(v.signer));
        confirmTyped({
          title: `Renew version ${n}`,
          body: "A new certificate for the same key (when only the certificate expires). It becomes a new version; the active one stays until you activate it.",
          phrase: `renew ${n}`,
          button: "Renew",
          extra: [field("Signed by", signer).wrap],
          run: async () => {
            const res = await api.ca.renewVersion({ tenantId: tenant, version: n, signer: Number(signer.value) as Signer });
            announce(`Version ${res.version?.version ?? ""} made.`);
            refresh();
          },
        });
      }),
    );
  }
  if (v.state !== VersionState.REVOKED && v.state !== VersionState.DISCARDED) {
    cell.append(
      btn("Revoke", `Revoke version ${n}`, () => {
        const reason = h("input", { type: "text", name: "reason", autocomplete: "off" });
        const r = field("Reason", reason, "Kept in the history and the audit log.");
        confirmTyped({
          title: `Revoke version ${n}`,
          body: v.state === VersionState.ACTIVE ? `Version ${n} is active: revoking it leaves ${tenant} without a CA, and agents drop its key.` : `Agents drop the key of version ${n}.`,
          phrase: `revoke ${n}`,
          button: "Revoke",
          extra: [r.wrap],
          run: async () => {
            await api.ca.revokeVersion({ tenantId: tenant, version: n, reason: reason.value, allowActive: v.state === VersionState.ACTIVE });
            announce(`Version ${n} is revoked.`);
            refresh();
          },
        });
      }),
    );
  }
  return h("td", {}, cell);
}

/** Asks to discard a pending version (its CSR will never be signed), with an optional reason. */
function confirmDiscard(tenant: string, v: IntermediateVersion, refresh: () => void): void {
  const n = v.version;
  const reason = h("input", { type: "text", name: "reason", autocomplete: "off" });
  const r = field("Reason (optional)", reason, "Kept in the history and the audit log.");
  confirmTyped({
    title: `Discard version ${n}`,
    body: `Version ${n} becomes discarded: its key is erased, so no certificate can ever be uploaded for its CSR. It stays in the history.`,
    phrase: `discard ${n}`,
    button: "Discard",
    extra: [r.wrap],
    fieldError: (err) => showFieldError(err, { reason: r }),
    run: async () => {
      r.error("");
      await api.ca.discardPendingVersion({ tenantId: tenant, version: n, reason: reason.value });
      announce(`Version ${n} is discarded.`);
      refresh();
    },
  });
}

/** "Valid until": the certificate's end, or for a pending version when its CSR expires. */
function validUntil(v: IntermediateVersion): string {
  if (v.state === VersionState.PENDING && v.pendingExpiresAt !== undefined) {
    return `CSR ${v.pendingExpired ? "expired" : "expires"} ${when(date(v.pendingExpiresAt))}`;
  }
  return when(date(v.certificate?.notAfter));
}

/** What the subject column says of a version without a certificate. */
function noCertificate(v: IntermediateVersion): string {
  if (v.state === VersionState.DISCARDED) return v.discardReason === "" ? "(discarded, never signed)" : `(discarded: ${v.discardReason})`;
  return "(waiting for upload)";
}

/** The history page. */
export const versionsPage: Page = async ({ main, params, refresh }) => {
  const tenant = params[0]!;
  const head = tenantHeader(tenant, "versions");
  let versions: IntermediateVersion[];
  try {
    versions = (await api.ca.listVersions({ tenantId: tenant })).versions;
  } catch (err) {
    main.replaceChildren(head, pageError(err));
    return;
  }
  const table = h(
    "table",
    { id: "versions" },
    h("caption", {}, "Versions, newest first"),
    h("thead", {}, h("tr", {}, ...["Version", "State", "Source", "Subject", "SHA-256", "Valid until", "Actions"].map((t) => h("th", { scope: "col" }, t)))),
    h(
      "tbody",
      {},
      ...versions.map((v) =>
        h(
          "tr",
          { "data-version": String(v.version), "data-state": stateLabel(v.state), ...(v.pendingExpired ? { "data-expired": "true" } : {}) },
          h("th", { scope: "row" }, String(v.version)),
          h("td", {}, versionStateText(v)),
          h("td", {}, signerLabel(v.signer)),
          h("td", {}, v.certificate?.subject ?? noCertificate(v)),
          h("td", {}, h("code", { class: "fp" }, v.certificate?.sha256Fingerprint ?? "—")),
          h("td", {}, validUntil(v)),
          actions(tenant, v, refresh),
        ),
      ),
    ),
  );
  main.replaceChildren(head, h("section", { class: "card scroll" }, versions.length === 0 ? h("p", {}, "No versions yet.") : table));
};

/** Reads a file input's bytes, or the pasted text's, or nothing. */
async function bytesOf(file: HTMLInputElement, text: HTMLTextAreaElement): Promise<Uint8Array> {
  const f = file.files?.[0];
  if (f !== undefined) return new Uint8Array(await f.arrayBuffer());
  return new TextEncoder().encode(text.value.trim() === "" ? "" : text.value);
}

/** Uploading the signed certificate of a pending version (paste or file), with its customer root. */
export const uploadPage: Page = async ({ main, params }) => {
  const tenant = params[0]!;
  const n = Number(params[1]);
  const head = tenantHeader(tenant, "versions");
  const certText = h("textarea", { name: "certificate", rows: "8", spellcheck: "false" });
  const certFile = h("input", { type: "file", name: "certificate-file", accept: ".pem,.crt,.cer,.der" });
  const rootText = h("textarea", { name: "customer_root", rows: "6", spellcheck: "false" });
  const rootFile = h("input", { type: "file", name: "customer-root-file", accept: ".pem,.crt,.cer,.der" });
  const activate = h("input", { type: "checkbox", name: "activate" });
  const cert = field("Signed intermediate certificate (PEM), pasted", certText, "The certificate your private CA issued for this version's CSR.");
  const certF = field("…or as a file (PEM or DER)", certFile);
  const root = field("Your private CA's root certificate (PEM), pasted — optional", rootText, "When given, the intermediate must chain to it; it is kept as the chain's root.");
  const rootF = field("…or as a file (PEM or DER)", rootFile);
  const formErr = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "up-h" },
    h("h2", { id: "up-h" }, `Upload the signed certificate of version ${n}`),
    h("p", {}, "Checked before anything changes: it parses, it is a CA, its key is the pending CSR's, it is valid now, and it chains to the root when one is given."),
    h("p", {}, h("button", { type: "button", onclick: () => void saveCsr(tenant, n).catch((e: unknown) => showError(e, {}, formErr)) }, "Download the CSR again")),
    cert.wrap,
    certF.wrap,
    root.wrap,
    rootF.wrap,
    h("div", { class: "field check" }, activate, h("label", { for: "activate-upload" }, "Activate it at once")),
    formErr,
    h("button", { type: "submit" }, "Upload"),
  );
  activate.id = "activate-upload";
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    for (const f of [cert, root]) f.error("");
    formErr.textContent = "";
    void (async () => {
      const certificate = await bytesOf(certFile, certText);
      const customerRoot = await bytesOf(rootFile, rootText);
      const res = await api.ca.uploadIntermediate({ tenantId: tenant, version: n, certificate, customerRoot, activate: activate.checked });
      announce(`Version ${n} is ${stateLabel(res.version?.state ?? VersionState.UNSPECIFIED)}.`);
      location.hash = `#/t/${tenant}/versions`;
    })().catch((err: unknown) => showError(err, { certificate: cert, customer_root: root }, formErr));
  });
  main.replaceChildren(head, form);
};
