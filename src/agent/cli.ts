/**
 * `kmi agent`: flags/env/config → AgentConfig → AgentServer → run until SIGTERM/SIGINT.
 * A configuration mistake is one stderr line and exit 2; a start failure propagates to
 * cmd/kmi.ts (one stderr line, exit 1).
 */
import { ConfigError, describeConfig, formatHelp, loadConfig } from "../common/config.js";
import { runUntilSignal } from "../common/lifecycle.js";
import { createLogger } from "../common/logger.js";
import { agentProgram, resolveAgentConfig } from "./config.js";
import { AgentServer } from "./server.js";
import { usePrivateUmask } from "../common/data-dir.js";

/** Entry point of `kmi agent`; resolves with the exit code. */
export async function main(argv: string[]): Promise<number> {
  usePrivateUmask(); // every file in the state dir 0600 (see data-dir.ts for why a umask)
  let loaded;
  let config;
  try {
    loaded = await loadConfig(agentProgram, argv);
    if (loaded.help) {
      process.stdout.write(formatHelp(agentProgram) + "\n");
      return 0;
    }
    config = await resolveAgentConfig(loaded);
  } catch (err) {
    if (err instanceof ConfigError) {
      process.stderr.write(`kmi agent: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ level: config.logLevel, fields: { program: "agent" } });
  logger.info("configuration", describeConfig(agentProgram, loaded));
  const server = AgentServer.create(config, { logger });
  try {
    return await runUntilSignal(server, { logger });
  } catch (err) {
    // Leave nothing half-started behind (the socket, the KDC link).
    await server.destroy().catch(() => undefined);
    if (err instanceof ConfigError) {
      process.stderr.write(`kmi agent: ${err.message}\n`);
      return 2;
    }
    throw err;
  }
}
