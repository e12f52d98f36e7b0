/** The active CA: what it is, its fingerprints and validity, and downloads as PEM or DER. */
import { CertificateFormat, KeyCustody, type GetCaCertificatesResponse } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { api } from "../api.js";
import { announce, daysLeft, download, errorText, h, when } from "../dom.js";
import { algorithmLabel, date, signerLabel, stateLabel } from "../format.js";
import { pageError, tenantHeader, type Page } from "./common.js";

type Part = "root" | "intermediate" | "chain";

function row(label: string, value: string | Node, id?: string): Node[] {
  return [h("dt", {}, label), h("dd", id === undefined ? {} : { id }, value)];
}

function validity(notBefore: Date | undefined, notAfter: Date | undefined): Node {
  if (notAfter === undefined) return document.createTextNode("—");
  const left = daysLeft(notAfter);
  const text = left < 0 ? `expired ${-left} days ago` : `${left} days left`;
  return h("span", {}, `${when(notBefore)} to ${when(notAfter)} `, h("strong", { class: left < 30 ? "warn" : "" }, `(${text})`));
}

/** Fetches one part of the active CA in `format` and saves it. */
async function save(tenant: string, part: Part, format: CertificateFormat): Promise<void> {
  const res = await api.ca.getCaCertificates({ tenantId: tenant, format });
  const der = format === CertificateFormat.DER;
  const bytes = part === "root" ? res.root : part === "intermediate" ? res.intermediate : res.chain;
  const v = res.version?.version ?? 0;
  download(`${tenant}-${part}-v${v}.${der ? "der" : "pem"}`, bytes, der ? "application/pkix-cert" : "application/x-pem-file");
  announce(`Downloaded the ${part} certificate as ${der ? "DER" : "PEM"}.`);
}

function downloads(tenant: string, res: GetCaCertificatesResponse): HTMLElement {
  const err = h("p", { class: "error", role: "alert" });
  const button = (part: Part, format: CertificateFormat, label: string) =>
    h(
      "button",
      {
        type: "button",
        "aria-label": `Download the ${part} ${part === "chain" ? "" : "certificate "}as ${label}`,
        onclick: () => void save(tenant, part, format).catch((e: unknown) => (err.textContent = errorText(e))),
      },
      label,
    );
  const parts: [Part, string, string][] = [
    ["root", "Root", res.root.length === 0 ? "not uploaded (private CA without its root)" : "install this in devices' trust stores"],
    ["intermediate", "Intermediate", "the tenant's MITM CA; agents sign leaves with it"],
    ["chain", "Chain", "intermediate then root (DER holds the intermediate only)"],
  ];
  return h(
    "section",
    { class: "card", "aria-labelledby": "dl-h" },
    h("h2", { id: "dl-h" }, "Downloads"),
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Certificate"), h("th", { scope: "col" }, "Formats"), h("th", { scope: "col" }, "Use"))),
      h(
        "tbody",
        {},
        ...parts.map(([part, label, use]) =>
          h(
            "tr",
            {},
            h("th", { scope: "row" }, label),
            h("td", { class: "row" }, part === "root" && res.root.length === 0 ? "—" : [button(part, CertificateFormat.PEM, "PEM"), button(part, CertificateFormat.DER, "DER")]),
            h("td", {}, use),
          ),
        ),
      ),
    ),
    err,
  );
}

/** The active CA page. */
export const caPage: Page = async ({ main, params }) => {
  const tenant = params[0]!;
  const head = tenantHeader(tenant, "ca");
  let res: GetCaCertificatesResponse;
  try {
    res = await api.ca.getCaCertificates({ tenantId: tenant, format: CertificateFormat.PEM });
  } catch (err) {
    main.replaceChildren(head, pageError(err), h("p", {}, h("a", { href: `#/t/${tenant}/new` }, "Make a first version (KMI-signed, or a CSR for your private CA)")));
    return;
  }
  const v = res.version!;
  const c = v.certificate!;
  const info = h(
    "section",
    { class: "card", "aria-labelledby": "active-h" },
    h("h2", { id: "active-h" }, `Active CA: version ${v.version}`),
    h(
      "dl",
      { class: "facts" },
      ...row("Source", signerLabel(v.signer), "ca-source"),
      ...row("State", stateLabel(v.state)),
      ...row("Subject", c.subject, "ca-subject"),
      ...row("Issuer", c.issuer, "ca-issuer"),
      ...row("Serial", c.serialHex, "ca-serial"),
      ...row("Key", algorithmLabel(v.keyAlgorithm)),
      ...row("Key held", v.keyCustody === KeyCustody.TOKEN ? "in the KDC's hardware token (never released; the KDC signs the leaves)" : "escrowed by the KDC, released to the proxies' agents", "ca-custody"),
      ...row("SHA-256 fingerprint", h("code", {}, res.intermediateSha256), "fp-intermediate"),
      ...row("Root SHA-256 fingerprint", res.rootSha256 === "" ? "—" : h("code", {}, res.rootSha256), "fp-root"),
      ...row("Validity", validity(date(c.notBefore), date(c.notAfter)), "ca-validity"),
    ),
  );
  main.replaceChildren(head, info, downloads(tenant, res));
};
