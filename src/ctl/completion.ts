/**
 * Shell completion for `kmi` (`kmi completion bash|zsh`), generated from the same declarations
 * that parse the command line: `kmi ctl`'s command table (src/ctl/cli.ts) and each program's
 * option spec (src/common/config.ts), gathered by cmd/kmi.ts into one {@link CompletionNode} tree.
 *
 * The script holds the tree as two shell functions (`__kmi_node`: the words and flags at a
 * command path; `__kmi_values`: a flag's values) and a small driver per shell. It runs no kmi
 * process while completing, so it stays fast and never touches a server.
 */
import { flagName, type ProgramSpec } from "../common/config.js";
import type { Command } from "./command.js";
import type { FlagSpecs } from "./flags.js";

/** One flag as completion sees it. */
export interface CompletionFlag {
  /** Name without dashes. */
  name: string;
  /** Takes a value (the next word is not a command word). */
  value: boolean;
  /** The values it accepts, when a fixed list. */
  choices?: readonly string[];
  /** Its value is a file path. */
  file?: boolean;
}

/** A command path: its sub-command words and its flags. */
export interface CompletionNode {
  children: Record<string, CompletionNode>;
  flags: CompletionFlag[];
}

/** The shells `kmi completion` writes for. */
export const COMPLETION_SHELLS = ["bash", "zsh"] as const;

const FILE_VALUE = /^(file|dir|path)$/i;

/** Completion flags of `kmi ctl` flag specs (plus --json and --help, which every command takes). */
export function flagsOfSpecs(specs: FlagSpecs): CompletionFlag[] {
  const flags: CompletionFlag[] = Object.entries(specs).map(([name, s]) => ({
    name,
    value: s.type !== "bool",
    ...(s.choices !== undefined ? { choices: s.choices } : {}),
    ...(s.complete === "file" || FILE_VALUE.test(s.value ?? "") ? { file: true } : {}),
  }));
  return [...flags, { name: "json", value: false }, { name: "help", value: false }];
}

/** The completion tree of `kmi ctl`: one path per command of the table. */
export function ctlCompletionTree(commands: readonly Command[]): CompletionNode {
  const root: CompletionNode = { children: {}, flags: [{ name: "help", value: false }, { name: "version", value: false }, { name: "json", value: false }] };
  for (const c of commands) {
    let node = root;
    for (const word of c.name) {
      node.children[word] ??= { children: {}, flags: [{ name: "help", value: false }, { name: "json", value: false }] };
      node = node.children[word]!;
    }
    node.flags = flagsOfSpecs(c.flags);
  }
  return root;
}

/** The completion node of a program's option spec (`kmi kdc`, `kmi up`), with its sub-commands. */
export function programCompletionNode(spec: ProgramSpec, children: Record<string, CompletionNode> = {}): CompletionNode {
  const flags: CompletionFlag[] = Object.entries(spec.options).map(([key, o]) => ({
    name: flagName(key),
    value: o.type !== "boolean",
    ...(o.choices !== undefined ? { choices: o.choices } : {}),
    ...(FILE_VALUE.test(o.valueName ?? "") ? { file: true } : {}),
  }));
  return { children, flags: [...flags, { name: "help", value: false }] };
}

/** Every path of the tree with its node, root first ("" is the root; words joined by spaces). */
function paths(node: CompletionNode, prefix = ""): [string, CompletionNode][] {
  return [[prefix, node], ...Object.entries(node.children).flatMap(([w, n]) => paths(n, prefix === "" ? w : `${prefix} ${w}`))];
}

/** Single-quotes a word for the shell. Every word here comes from kmi's own tables, but quote anyway. */
function q(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** The data functions, shared by both shells (POSIX `case`, plain assignments). */
function dataFunctions(tree: CompletionNode): string {
  const nodeCases: string[] = [];
  const valueCases: string[] = [];
  for (const [path, node] of paths(tree)) {
    const words = Object.keys(node.children).join(" ");
    const flags = node.flags.map((f) => `--${f.name}`).join(" ");
    const valued = node.flags.filter((f) => f.value).map((f) => `--${f.name}`).join(" ");
    nodeCases.push(`    ${q(path)}) __kmi_words=${q(words)}; __kmi_flags=${q(flags)}; __kmi_valued=${q(valued === "" ? "" : ` ${valued} `)} ;;`);
    for (const f of node.flags) {
      if (!f.value) continue;
      const v = f.choices !== undefined ? f.choices.join(" ") : f.file === true ? "@file" : "";
      if (v !== "") valueCases.push(`    ${q(`${path}|--${f.name}`)}) __kmi_vals=${q(v)} ;;`);
    }
  }
  return [
    "# The command tree: words and flags at each command path.",
    "__kmi_node() {",
    '  __kmi_words=""; __kmi_flags=""; __kmi_valued=""',
    '  case "$1" in',
    ...nodeCases,
    "  esac",
    "}",
    "# A flag's values: a list, @file for a path, or empty.",
    "__kmi_values() {",
    '  __kmi_vals=""',
    '  case "$1|$2" in',
    ...valueCases,
    "  esac",
    "}",
    "# Walks the words before the cursor: sets __kmi_path and __kmi_want_value (the flag waiting for its value).",
    "__kmi_walk() {",
    '  __kmi_path=""; __kmi_want_value=""',
    "  local w",
    '  for w in "$@"; do',
    '    if [ -n "$__kmi_want_value" ]; then __kmi_want_value=""; continue; fi',
    '    __kmi_node "$__kmi_path"',
    '    case "$w" in',
    "      --*=*) ;;",
    '      -*) case "$__kmi_valued" in *" $w "*) __kmi_want_value="$w" ;; esac ;;',
    '      *) case " $__kmi_words " in *" $w "*) __kmi_path="${__kmi_path:+$__kmi_path }$w" ;; esac ;;',
    "    esac",
    "  done",
    '  __kmi_node "$__kmi_path"',
    "}",
  ].join("\n");
}

function bashScript(tree: CompletionNode): string {
  return [
    "# bash completion for kmi; generated by `kmi completion bash`.",
    "# Load it with:  source <(kmi completion bash)   (or save it under /etc/bash_completion.d/kmi)",
    dataFunctions(tree),
    "_kmi() {",
    '  local cur="${COMP_WORDS[COMP_CWORD]}"',
    "  COMPREPLY=()",
    '  __kmi_walk "${COMP_WORDS[@]:1:COMP_CWORD-1}"',
    '  if [ -n "$__kmi_want_value" ]; then',
    '    __kmi_values "$__kmi_path" "$__kmi_want_value"',
    '    if [ "$__kmi_vals" = "@file" ]; then compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur"));',
    '    elif [ -n "$__kmi_vals" ]; then COMPREPLY=($(compgen -W "$__kmi_vals" -- "$cur")); fi',
    "    return 0",
    "  fi",
    '  case "$cur" in',
    '    -*) COMPREPLY=($(compgen -W "$__kmi_flags" -- "$cur")) ;;',
    '    *) COMPREPLY=($(compgen -W "$__kmi_words" -- "$cur")) ;;',
    "  esac",
    "}",
    "complete -F _kmi kmi",
    "",
  ].join("\n");
}

function zshScript(tree: CompletionNode): string {
  return [
    "#compdef kmi",
    "# zsh completion for kmi; generated by `kmi completion zsh`.",
    "# Load it with:  source <(kmi completion zsh)   (or save it as _kmi in a folder of $fpath)",
    dataFunctions(tree),
    "_kmi() {",
    '  local cur="${words[CURRENT]}"',
    '  __kmi_walk "${(@)words[2,CURRENT-1]}"',
    '  if [ -n "$__kmi_want_value" ]; then',
    '    __kmi_values "$__kmi_path" "$__kmi_want_value"',
    '    if [ "$__kmi_vals" = "@file" ]; then _files;',
    '    elif [ -n "$__kmi_vals" ]; then compadd -- ${=__kmi_vals}; fi',
    "    return 0",
    "  fi",
    '  case "$cur" in',
    "    -*) compadd -- ${=__kmi_flags} ;;",
    "    *) compadd -- ${=__kmi_words} ;;",
    "  esac",
    "}",
    'if (( $+functions[compdef] )); then compdef _kmi kmi; fi',
    "",
  ].join("\n");
}

/** The completion script of `shell` for the tree. */
export function completionScript(shell: (typeof COMPLETION_SHELLS)[number], tree: CompletionNode): string {
  return shell === "bash" ? bashScript(tree) : zshScript(tree);
}
