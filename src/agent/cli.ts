/** Entry point of `kmi agent`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi agent: not available in this build yet\n");
  return 1;
}
