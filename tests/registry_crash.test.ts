import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openSqlRegistry } from "../registry/sql.ts";
import { childCommand } from "./helpers.ts";

const dir = mkdtempSync(join(tmpdir(), "novalet-crash-"));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Run the writer, SIGKILL it after `killAfterMs` from its first ack; the last ack it printed. */
function runAndKill(path: string, killAfterMs: number): Promise<number> {
  const [cmd, ...args] = childCommand(new URL("./fixtures/heartbeat_writer.ts", import.meta.url).pathname, [path]);
  const child = spawn(cmd!, args, { stdio: ["ignore", "pipe", "inherit"] });
  let lastAck = 0;
  let buf = "";
  let timer: ReturnType<typeof setTimeout> | undefined;
  child.stdout.setEncoding("utf8");
  child.stdout.on("data", (chunk: string) => {
    buf += chunk;
    const lines = buf.split("\n");
    buf = lines.pop()!;
    for (const l of lines) lastAck = Math.max(lastAck, Number(l.slice(4)));
    timer ??= setTimeout(() => child.kill("SIGKILL"), killAfterMs);
  });
  return new Promise((resolve, reject) => {
    child.on("error", reject);
    child.on("exit", (code, signal) => {
      clearTimeout(timer);
      if (signal !== "SIGKILL") reject(new Error(`writer exited with ${code ?? signal} before it was killed`));
      else resolve(lastAck);
    });
  });
}

describe("sql.js registry file under kill -9", () => {
  it("a writer killed with SIGKILL at 20 random moments always leaves a file that opens with every acknowledged heartbeat", async () => {
    const path = join(dir, "crash.db");
    let previous = 0;
    for (let i = 0; i < 20; i++) {
      const acked = await runAndKill(path, Math.floor(Math.random() * 150));
      assert.ok(acked > previous, `run ${i}: the writer made progress (${acked} > ${previous})`);
      const registry = await openSqlRegistry(`sqljs:${path}`); // takes over the dead writer's lock
      try {
        const [row] = await registry.list();
        assert.ok(row, `run ${i}: the row is there`);
        assert.ok(row.reportCount >= acked, `run ${i}: ${row.reportCount} stored >= ${acked} acknowledged`);
        previous = row.reportCount;
      } finally {
        await registry.close();
      }
    }
  });
});
