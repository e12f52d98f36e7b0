/** Entry point of `kmi audit`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi audit: not available in this build yet\n");
  return 1;
}
