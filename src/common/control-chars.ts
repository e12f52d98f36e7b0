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
