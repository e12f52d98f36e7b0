/**
 * Rotate: a new key and certificate. KMI-signed versions are ready at once (or active, when
 * asked); a private-CA version is a CSR to download, sign, and upload.
 */
import { KeyAlgorithm } from "../../../src/gen/kmi/common/v1/common_pb.js";
import { Signer } from "../../../src/gen/kmi/kdc/v1/kdc_pb.js";
import { api } from "../api.js";
import { announce, confirmTyped, field, h, select } from "../dom.js";
import { saveCsr } from "./versions.js";
import { showError, tenantHeader, type Page } from "./common.js";

/** The rotate / CSR page. */
export const newVersionPage: Page = async ({ main, params }) => {
  const tenant = params[0]!;
  const signer = field("Signed by", select("signer", [[String(Signer.KMI_ROOT), "KMI root (ready at once)"], [String(Signer.PRIVATE_CA), "my private CA (make a CSR)"]]));
  const alg = field("Key type", select("key_algorithm", [[String(KeyAlgorithm.ECDSA_P256), "ECDSA P-256"], [String(KeyAlgorithm.RSA_2048), "RSA 2048"], [String(KeyAlgorithm.RSA_3072), "RSA 3072"]]));
  const cn = field("Common name", h("input", { type: "text", name: "cn", autocomplete: "off" }), "Default: “<tenant name> MITM CA <version>”.");
  const org = field("Organization", h("input", { type: "text", name: "org", autocomplete: "organization" }));
  const ou = field("Organizational unit", h("input", { type: "text", name: "ou", autocomplete: "off" }));
  const country = field("Country (two letters)", h("input", { type: "text", name: "country", maxlength: "2", autocomplete: "country" }));
  const days = field("Validity, days", h("input", { type: "number", name: "validity_days", min: "1", max: "1825", value: "365" }));
  const activate = h("input", { type: "checkbox", name: "activate", id: "activate-new" });
  const formErr = h("p", { class: "error", role: "alert" });
  const result = h("div", { "aria-live": "polite" });
  const fields = { "subject.common_name": cn, "subject.organization": org, "subject.organizational_unit": ou, "subject.country": country, validity_days: days, key_algorithm: alg, signer, activate: signer };
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "new-h" },
    h("h2", { id: "new-h" }, "Rotate: a new key and certificate"),
    h("p", {}, "Making a version never disturbs the active one: it stays active until the new one is activated."),
    signer.wrap,
    alg.wrap,
    h("fieldset", {}, h("legend", {}, "Subject"), cn.wrap, org.wrap, ou.wrap, country.wrap),
    days.wrap,
    h("div", { class: "field check" }, activate, h("label", { for: "activate-new" }, "Activate at once (KMI-signed only)")),
    formErr,
    h("button", { type: "submit" }, "Rotate…"),
  );
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    for (const f of Object.values(fields)) f.error("");
    formErr.textContent = "";
    confirmTyped({
      title: `Rotate ${tenant}`,
      body: "A new key is generated in the KDC (it never leaves it).",
      phrase: `rotate ${tenant}`,
      button: "Rotate",
      run: async () => {
        try {
          const res = await api.ca.createVersion({
            tenantId: tenant,
            signer: Number(signer.control.value) as Signer,
            keyAlgorithm: Number(alg.control.value) as KeyAlgorithm,
            subject: { commonName: cn.control.value, organization: org.control.value, organizationalUnit: ou.control.value, country: country.control.value },
            validityDays: Number(days.control.value),
            activate: activate.checked,
          });
          const n = res.version?.version ?? 0;
          announce(`Version ${n} made.`);
          result.replaceChildren(
            h(
              "section",
              { class: "card", "aria-labelledby": "made-h" },
              h("h2", { id: "made-h" }, `Version ${n} made`),
              res.csrPem !== ""
                ? h(
                    "div",
                    { class: "row" },
                    h("button", { type: "button", onclick: () => void saveCsr(tenant, n) }, `Download the CSR of version ${n}`),
                    h("a", { class: "button", href: `#/t/${tenant}/upload/${n}` }, "Upload the signed certificate"),
                  )
                : h("p", {}, h("a", { href: `#/t/${tenant}/versions` }, "See it in the history")),
            ),
          );
        } catch (err) {
          showError(err, fields, formErr);
        }
      },
    });
  });
  main.replaceChildren(tenantHeader(tenant, "new"), form, result);
};
