/** Where the backup commands write, and their progress lines. */

/** Where the commands write: results on stdout, progress on stderr. */
export interface BackupIo {
  stdout: { write(s: string): unknown };
  stderr: { write(s: string): unknown };
}

/** Reports a count on stderr at most once a second (and not at all for scripts). */
export class Progress {
  #last = Date.now();
  constructor(
    private readonly io: BackupIo | undefined,
    private readonly what: string,
  ) {}
  tick(n: number): void {
    if (this.io === undefined || n % 1000 !== 0 || Date.now() - this.#last < 1000) return;
    this.#last = Date.now();
    this.io.stderr.write(`${this.what}: ${n} records…\n`);
  }
  done(line: string): void {
    this.io?.stderr.write(`${this.what}: ${line}\n`);
  }
}
