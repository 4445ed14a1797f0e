/**
 * A Mosquitto of the test's own (from .ci/mosquitto.conf), for tests that restart the broker or
 * need a password file. Without the binary these tests are skipped with a reason — unless
 * MQTT_URL is set (CI), where a missing Mosquitto is a failure.
 */

import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";

function which(bin: string): string | undefined {
  for (const d of (process.env.PATH ?? "").split(":").concat(["/usr/sbin", "/usr/bin"])) {
    if (existsSync(join(d, bin))) return join(d, bin);
  }
  return undefined;
}

export const MOSQUITTO = which("mosquitto");
export const MOSQUITTO_PUB = which("mosquitto_pub");
export const MOSQUITTO_SUB = which("mosquitto_sub");

/** The skip reason for a test needing `bin`, or undefined; throws when CI (MQTT_URL) should have it. */
export function needs(bin: "mosquitto" | "mosquitto_pub"): string | undefined {
  const found = bin === "mosquitto" ? MOSQUITTO : MOSQUITTO_PUB && MOSQUITTO_SUB;
  if (found) return undefined;
  if (process.env.MQTT_URL) throw new Error(`MQTT_URL is set but ${bin} is not installed: CI must install it`);
  return `${bin} is not installed (apt-get install mosquitto mosquitto-clients; CI has it)`;
}

async function freePort(): Promise<number> {
  return await new Promise((resolve, reject) => {
    const s = createServer().listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
    s.on("error", reject);
  });
}

async function listening(port: number, child: ChildProcess, log: string): Promise<void> {
  for (let i = 0; i < 100; i++) {
    if (child.exitCode !== null) {
      throw new Error(`mosquitto exited: ${existsSync(log) ? readFileSync(log, "utf8") : "(no log)"}`);
    }
    const ok = await new Promise<boolean>((r) => {
      const c = connect(port, "127.0.0.1", () => {
        c.destroy();
        r(true);
      }).on("error", () => r(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`mosquitto did not listen on ${port}`);
}

/** A running Mosquitto with persistence in a temp folder. */
export class Mosquitto {
  readonly url: string;
  #dir: string;
  #conf: string;
  #port: number;
  #child?: ChildProcess;

  private constructor(dir: string, conf: string, port: number) {
    this.#dir = dir;
    this.#conf = conf;
    this.#port = port;
    this.url = `mqtt://127.0.0.1:${port}`;
  }

  /** Start one; with `users`, anonymous clients are refused and these may connect; `conf`: more
   * configuration lines. */
  static async start(opts: { users?: Record<string, string>; conf?: string } = {}): Promise<Mosquitto> {
    if (!MOSQUITTO) throw new Error("mosquitto is not installed");
    const dir = mkdtempSync(join(tmpdir(), "novalet-mosq-"));
    const port = await freePort();
    const template = readFileSync(new URL("../.ci/mosquitto.conf", import.meta.url), "utf8");
    let conf = template.replaceAll("PORT", String(port)).replaceAll("DIR", dir);
    if (opts.users) {
      const pw = join(dir, "passwd");
      writeFileSync(pw, "");
      for (const [u, p] of Object.entries(opts.users)) execFileSync("mosquitto_passwd", ["-b", pw, u, p]);
      conf = conf.replace("allow_anonymous true", "allow_anonymous false") + `password_file ${pw}\n`;
    }
    if (opts.conf) conf += `${opts.conf}\n`;
    const file = join(dir, "mosquitto.conf");
    writeFileSync(file, conf);
    const m = new Mosquitto(dir, file, port);
    await m.#run();
    return m;
  }

  async #run(): Promise<void> {
    const child = this.#child = spawn(MOSQUITTO!, ["-c", this.#conf], { stdio: "ignore" });
    // A test run that ends abruptly (a timeout, an uncaught error) must not leave the broker behind.
    const kill = () => child.kill("SIGKILL");
    process.once("exit", kill);
    child.once("exit", () => process.removeListener("exit", kill));
    await listening(this.#port, this.#child, join(this.#dir, "mosquitto.log"));
  }

  /** SIGTERM (sessions and queued messages are saved) and wait for the exit. */
  async #halt(): Promise<void> {
    const c = this.#child;
    if (!c || c.exitCode !== null) return;
    const exited = new Promise((r) => c.once("exit", r));
    c.kill("SIGTERM");
    await exited;
  }

  /** Stop and start again on the same port, with the same persistence. */
  async restart(downMs = 0): Promise<void> {
    await this.#halt();
    if (downMs) await new Promise((r) => setTimeout(r, downMs));
    await this.#run();
  }

  async stop(): Promise<void> {
    await this.#halt();
    rmSync(this.#dir, { recursive: true, force: true });
  }
}
