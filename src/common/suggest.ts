/**
 * "Did you mean …" for `kmi ctl` and `kmi`: the candidate nearest to a mistyped word by edit
 * distance (Levenshtein), when it is near enough to be a typo rather than another word.
 */

/** The Levenshtein distance between `a` and `b` (insertions, deletions, substitutions). */
export function editDistance(a: string, b: string): number {
  let prev = Array.from({ length: b.length + 1 }, (_, j) => j);
  for (let i = 1; i <= a.length; i++) {
    const cur = [i];
    for (let j = 1; j <= b.length; j++) {
      cur[j] = Math.min(prev[j]! + 1, cur[j - 1]! + 1, prev[j - 1]! + (a[i - 1] === b[j - 1] ? 0 : 1));
    }
    prev = cur;
  }
  return prev[b.length]!;
}

/**
 * The candidate nearest to `word`, or undefined when none is within a typo's reach (at most a
 * third of the word's length, and at least 1 and at most 3 edits), or a prefix of it.
 */
export function closest(word: string, candidates: Iterable<string>): string | undefined {
  const limit = Math.min(3, Math.max(1, Math.floor(word.length / 3)));
  let best: { c: string; d: number } | undefined;
  for (const c of candidates) {
    const d = c.startsWith(word) && word.length >= 2 ? 0.5 : editDistance(word, c);
    if (d <= limit && (best === undefined || d < best.d)) best = { c, d };
  }
  return best?.c;
}

/** `; did you mean "X"?` for the nearest candidate, or "". */
export function didYouMean(word: string, candidates: Iterable<string>, render: (c: string) => string = (c) => c): string {
  const c = closest(word, candidates);
  return c === undefined ? "" : `; did you mean "${render(c)}"?`;
}
