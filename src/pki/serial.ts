/** Certificate serial numbers. */
import { randomFillSync } from "node:crypto";

/** Bytes in a kmi serial number. */
export const SERIAL_BYTES = 16;

/**
 * A fresh serial number: 16 bytes from the CSPRNG with the top bit cleared (so the INTEGER is
 * positive without a sign byte) and the next bit set (so the DER is always exactly 16 bytes:
 * a leading zero byte would have to be stripped for minimal DER, which OpenSSL enforces).
 * That leaves 126 random bits; the CA/Browser Forum asks for at least 64. Unpredictable serials
 * are what defeats chosen-prefix collisions against the issuer's signature.
 */
export function randomSerial(): Uint8Array {
  const serial = randomFillSync(new Uint8Array(SERIAL_BYTES));
  serial[0] = (serial[0]! & 0x7f) | 0x40;
  return serial;
}
