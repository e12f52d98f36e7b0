/** Entry point of `kmi up`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi up: not available in this build yet\n");
  return 1;
}
