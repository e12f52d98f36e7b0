/** Entry point of `kmi ctl`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi ctl: not available in this build yet\n");
  return 1;
}
