/**
 * Control characters in text that reaches logs, tables and terminals: C0 (U+0000..U+001F), DEL
 * and C1 (U+0080..U+009F; a terminal reads U+009B as the start of an escape sequence, U+009D as
 * an OSC). Text from a caller that carries one is refused; text that is shown is neutralized.
 */

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/;
const CONTROL_ALL = /[\u0000-\u001f\u007f-\u009f]/g;

/** True when `s` carries a control character. */
export function hasControlChars(s: string): boolean {
  return CONTROL.test(s);
}

/** `s` with each control character replaced by "?". */
export function neutralizeControlChars(s: string): string {
  return s.replace(CONTROL_ALL, "?");
}

const JSON_UNSAFE = /[\u007f-\u009f\u2028\u2029]/;
const JSON_UNSAFE_ALL = /[\u007f-\u009f\u2028\u2029]/g;

/**
 * A JSON text with DEL, the C1 controls and U+2028/U+2029 written as `\uXXXX` escapes:
 * JSON.stringify escapes only C0, so a client's header value carrying U+009B (CSI) would reach
 * a terminal that tails the log as an escape sequence. The value read back is the same; these
 * characters occur only inside JSON strings.
 */
export function escapeJsonControls(json: string): string {
  if (!JSON_UNSAFE.test(json)) return json;
  return json.replace(JSON_UNSAFE_ALL, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}
