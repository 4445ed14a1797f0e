import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import process from "node:process";
import { childCommand } from "./helpers.ts";

interface Run {
  out: string[];
  exit: Promise<{ code: number | null; signal: string | null; ms: number }>;
  signal(s: NodeJS.Signals): void;
  ready: Promise<void>;
}

/** Start the sensor child; `ready` resolves when its self-call is in flight. */
function start(mode: string, flags: string[] = []): Run {
  const script = new URL("./fixtures/nova-sensor.ts", import.meta.url).pathname;
  const [cmd, ...args] = childCommand(script, [mode, "--periodic_fuzzy_delay=0", ...flags]);
  const child = spawn(cmd!, args, {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NOVALET_LOG_LEVEL: "warn" },
  });
  const out: string[] = [];
  let onReady!: () => void;
  const ready = new Promise<void>((r) => (onReady = r));
  let t0 = 0;
  child.stdout.setEncoding("utf8").on("data", (d: string) => {
    for (const line of d.split("\n").filter(Boolean)) {
      out.push(line);
      if (line === "READY") onReady();
    }
  });
  child.stderr.setEncoding("utf8").on("data", (d: string) => out.push(...d.split("\n").filter(Boolean)));
  const exit = new Promise<{ code: number | null; signal: string | null; ms: number }>((resolve) => {
    child.on("exit", (code, signal) => {
      const printed = out.find((l) => l.startsWith("EXITCODE "));
      const reported = printed === undefined ? null : Number(printed.slice(9));
      if (code !== null && reported !== null) assert.equal(code, reported, "the OS and the child agree");
      resolve({ code: code ?? reported, signal, ms: Date.now() - t0 });
    });
  });
  return {
    out,
    exit,
    ready,
    signal(s) {
      t0 ||= Date.now();
      process.kill(child.pid!, s); // not child.kill(): Deno sends only the first signal through it
    },
  };
}

describe("serve() and signals (child processes)", () => {
  it("the binary defaults to the script's name and the topic to it without nova-", async () => {
    const run = start("slow");
    await run.ready;
    assert.ok(run.out.includes("binary=nova-sensor topic=sensor"), run.out.join("\n"));
    run.signal("SIGTERM");
    await run.exit;
  });

  it("SIGTERM stops gracefully: the call in flight finishes, then the process exits 0", async () => {
    const run = start("slow");
    await run.ready;
    run.signal("SIGTERM");
    const { code } = await run.exit;
    assert.equal(code, 0, run.out.join("\n"));
    assert.ok(run.out.includes("RESULT 21.5"), `the call finished: ${run.out.join(" | ")}`);
  });

  it("SIGINT with a stuck handler exits 1 after --graceful_shutdown_timeout", async () => {
    const run = start("stuck", ["--graceful_shutdown_timeout=0.3"]);
    await run.ready;
    run.signal("SIGINT");
    const { code, ms } = await run.exit;
    assert.equal(code, 1, run.out.join("\n"));
    assert.ok(ms >= 250 && ms < 5000, `exited after ${ms} ms`);
  });

  it("a second SIGINT exits at once with 130", async () => {
    const run = start("stuck", ["--graceful_shutdown_timeout=30"]);
    await run.ready;
    run.signal("SIGINT");
    await new Promise((r) => setTimeout(r, 100));
    run.signal("SIGINT");
    const { code, ms } = await run.exit;
    assert.equal(code, 130, run.out.join("\n"));
    assert.ok(ms < 5000, `exited after ${ms} ms`);
  });
});
