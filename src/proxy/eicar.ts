/**
 * Streaming detector of the EICAR anti-malware test file: finds the 68-byte signature in a
 * body that arrives in chunks of any size, including when it straddles chunk boundaries,
 * without buffering the body (it keeps the last 67 bytes seen).
 */

/** The EICAR test string (https://www.eicar.org/download-anti-malware-testfile/). */
export const EICAR = Buffer.from("X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*", "latin1");

const CARRY = EICAR.length - 1;

/** Scans one body. Feed every chunk in order to {@link EicarScanner.push}. */
export class EicarScanner {
  /** The last up-to-67 bytes seen, copied (so a large chunk is not kept alive). */
  private tail: Buffer = Buffer.alloc(0);
  /** True once the signature was seen. */
  found = false;

  /** Scans the next chunk; returns true when the signature has been seen (now or before). */
  push(chunk: Uint8Array): boolean {
    if (this.found) return true;
    const c = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    if (c.length === 0) return false;
    if (this.tail.length > 0) {
      // Signature straddling the previous bytes and this chunk.
      const joined = Buffer.concat([this.tail, c.subarray(0, CARRY)]);
      if (joined.indexOf(EICAR) >= 0) return (this.found = true);
    }
    if (c.length >= EICAR.length && c.indexOf(EICAR) >= 0) return (this.found = true);
    if (c.length >= CARRY) {
      this.tail = Buffer.from(c.subarray(c.length - CARRY));
    } else {
      const joined = Buffer.concat([this.tail, c]);
      this.tail = joined.length > CARRY ? Buffer.from(joined.subarray(joined.length - CARRY)) : joined;
    }
    return false;
  }
}
