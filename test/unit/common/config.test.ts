import { describe, expect, it } from "vitest";
import { ConfigError, defineProgram, describeConfig, envName, flagName, formatHelp, loadConfig } from "../../../src/common/config.js";
import { parseListenAddress } from "../../../src/common/listen.js";

const spec = defineProgram({
  program: "kdc",
  usage: "kmi kdc [flags]",
  summary: "Runs the KDC.",
  options: {
    listen: { type: "string", default: "127.0.0.1:8443", description: "TCP address", valueName: "host:port", validate: (v: string) => void parseListenAddress(v) },
    maxMessageBytes: { type: "integer", default: 4194304, description: "max message size" },
    mtls: { type: "string", choices: ["none", "optional", "required"], default: "optional", description: "client certificates" },
    dev: { type: "boolean", default: false, description: "development mode", short: "d" },
    dataDir: { type: "string", required: true, description: "where LevelDB lives", valueName: "dir" },
    masterKey: { type: "string", description: "master key (prefer the key file)", secret: true },
  },
});

const files: Record<string, string> = {
  "/etc/kmi/kdc.json": JSON.stringify({ listen: "0.0.0.0:9000", "max-message-bytes": 1000, "data-dir": "/file" }),
  "/etc/kmi/bad.json": '{"listen": ',
  "/etc/kmi/unknown.json": '{"lisen": "x"}',
  "/etc/kmi/types.json": '{"max-message-bytes": "big", "data-dir": "/x"}',
};
const readTextFile = async (p: string) => {
  const t = files[p];
  if (t === undefined) throw Object.assign(new Error("nope"), { code: "ENOENT" });
  return t;
};
const load = (argv: string[], env: Record<string, string> = {}) => loadConfig(spec, argv, { env, readTextFile });

describe("config", () => {
  it("names flags and env vars from the option name", () => {
    expect(flagName("maxMessageBytes")).toBe("max-message-bytes");
    expect(envName("kdc", "maxMessageBytes")).toBe("KMI_KDC_MAX_MESSAGE_BYTES");
  });

  it("uses defaults, with typed values", async () => {
    const c = await load(["--data-dir", "/d"]);
    expect(c.values).toEqual({ listen: "127.0.0.1:8443", maxMessageBytes: 4194304, mtls: "optional", dev: false, dataDir: "/d" });
    expect(c.sources).toMatchObject({ listen: "default", dataDir: "flag" });
  });

  it("takes flag over env over file over default", async () => {
    const argv = ["--config", "/etc/kmi/kdc.json"];
    const c1 = await load(argv);
    expect([c1.values.listen, c1.values.maxMessageBytes, c1.values.dataDir]).toEqual(["0.0.0.0:9000", 1000, "/file"]);
    const c2 = await load(argv, { KMI_KDC_LISTEN: "10.0.0.1:1", KMI_KDC_MAX_MESSAGE_BYTES: "2000" });
    expect([c2.values.listen, c2.values.maxMessageBytes, c2.sources.listen]).toEqual(["10.0.0.1:1", 2000, "env"]);
    const c3 = await load([...argv, "--listen", "127.0.0.1:2", "--max-message-bytes=3000"], { KMI_KDC_LISTEN: "10.0.0.1:1" });
    expect([c3.values.listen, c3.values.maxMessageBytes, c3.sources.listen]).toEqual(["127.0.0.1:2", 3000, "flag"]);
    const c4 = await load([], { KMI_KDC_CONFIG: "/etc/kmi/kdc.json" });
    expect(c4.values.dataDir).toBe("/file");
    expect(c4.configFile).toBe("/etc/kmi/kdc.json");
  });

  it("reads booleans from flags (also negated and short) and env", async () => {
    expect((await load(["--data-dir", "/d", "--dev"])).values.dev).toBe(true);
    expect((await load(["--data-dir", "/d", "-d"])).values.dev).toBe(true);
    expect((await load(["--data-dir", "/d", "--no-dev"], { KMI_KDC_DEV: "true" })).values.dev).toBe(false);
    expect((await load(["--data-dir", "/d"], { KMI_KDC_DEV: "yes" })).values.dev).toBe(true);
  });

  it("treats an empty env var as unset", async () => {
    expect((await load(["--data-dir", "/d"], { KMI_KDC_LISTEN: "" })).values.listen).toBe("127.0.0.1:8443");
  });

  it.each([
    [["--lisen", "x"], {}, 'unknown flag --lisen; did you mean "--listen"?; run `kmi kdc --help` for the list'],
    [["extra"], {}, "unexpected argument extra; flags start with --; run `kmi kdc --help` for the list"],
    [[], {}, '--data-dir is required (or KMI_KDC_DATA_DIR, or "data-dir" in the config file)'],
    [["--data-dir", "/d", "--max-message-bytes", "12x"], {}, 'flag --max-message-bytes: "12x" is not an integer'],
    [["--data-dir", "/d"], { KMI_KDC_DEV: "maybe" }, 'environment KMI_KDC_DEV: "maybe" is not a boolean; use true or false'],
    [["--data-dir", "/d", "--mtls", "sometimes"], {}, 'flag --mtls: "sometimes" is not one of none, optional, required'],
    [["--data-dir", "/d", "--listen", "8443"], {}, 'flag --listen: listen address "8443": expected host:port'],
    [["--config", "/nope.json"], {}, "config file /nope.json: cannot read (ENOENT)"],
    [["--config", "/etc/kmi/bad.json"], {}, "config file /etc/kmi/bad.json: not valid JSON"],
    [["--config", "/etc/kmi/unknown.json"], {}, 'config file /etc/kmi/unknown.json: unknown key "lisen"; keys are spelled like the flags'],
    [["--config", "/etc/kmi/types.json"], {}, 'config file /etc/kmi/types.json key "max-message-bytes": "big" is not an integer'],
  ] as const)("refuses %j %j with a clear message", async (argv, env, message) => {
    const p = load([...argv], env);
    await expect(p).rejects.toBeInstanceOf(ConfigError);
    await expect(p).rejects.toThrow(message);
  });

  it("reports --help without validating the rest", async () => {
    expect((await load(["--help"])).help).toBe(true);
    expect((await load(["-h"])).help).toBe(true);
  });

  it("generates help text with every flag, its env var and default, secrets' defaults hidden", () => {
    const help = formatHelp(spec);
    expect(help.split("\n").slice(0, 5)).toEqual(["usage: kmi kdc [flags]", "", "Runs the KDC.", "", "flags:"]);
    expect(help).toContain('--listen <host:port>');
    expect(help).toContain('TCP address (default "127.0.0.1:8443"; env KMI_KDC_LISTEN)');
    expect(help).toContain("--mtls <none|optional|required>");
    expect(help).toContain("-d, --dev");
    expect(help).toContain("--no-dev to turn off");
    expect(help).toContain("where LevelDB lives (required; env KMI_KDC_DATA_DIR)");
    expect(help).toContain("--config <file>");
    expect(help).toContain("Precedence: flag > environment > config file > default.");
  });

  it("describes the effective config without secret values", async () => {
    const c = await load(["--data-dir", "/d", "--master-key", "supersecret"]);
    const d = describeConfig(spec, c);
    expect(d["master-key"]).toBe("<set> (flag)");
    expect(JSON.stringify(d)).not.toContain("supersecret");
    expect(d["listen"]).toBe("127.0.0.1:8443 (default)");
  });

  it("refuses a badly declared program", () => {
    expect(() => defineProgram({ program: "x", usage: "x", options: { "bad-name": { type: "string", description: "" } } })).toThrow("must be camelCase");
    expect(() => defineProgram({ program: "x", usage: "x", options: { port: { type: "integer", default: "1", description: "" } } })).toThrow("is not a integer");
  });
});
