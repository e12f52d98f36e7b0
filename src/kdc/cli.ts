/** Entry point of `kmi kdc`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi kdc: not available in this build yet\n");
  return 1;
}
