/** Entry point of `kmi proxy`: not built yet. */
export async function main(argv: string[]): Promise<number> {
  void argv;
  process.stderr.write("kmi proxy: not available in this build yet\n");
  return 1;
}
