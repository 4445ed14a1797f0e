import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { Manager, openRegistry, RequestContext, Rpc, RpcTimeoutError, Service } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { childCommand, MemoryLogger } from "./helpers.ts";

class Slow extends Manager {
  ping() {
    return "pong";
  }
  never() {
    return new Promise(() => {});
  }
}

describe("call timeouts", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  const logger = new MemoryLogger();
  let svc: Service;
  let rpc: Rpc;
  const ctx = new RequestContext();
  const ready = (async () => {
    const registry = await openRegistry("sqljs::memory:");
    svc = Service.create({
      host: "h",
      topic: "slow",
      manager: Slow,
      transport: new MemoryTransport(hub),
      registry,
      logger,
      gracefulShutdownTimeout: 0.5, // `never` never finishes
    });
    await svc.start();
    rpc = new Rpc(new MemoryTransport(hub), { logger });
    return registry;
  })();
  after(async () => {
    const registry = await ready;
    await rpc.close();
    await svc.stop();
    await registry.close();
  });

  it("a call times out at its own timeout, after calls of the same length were answered", async () => {
    await ready;
    assert.equal(await rpc.call(ctx, "slow", { method: "ping" }, { timeout: 0.3 }), "pong");
    const t0 = performance.now();
    await assert.rejects(rpc.call(ctx, "slow", { method: "never" }, { timeout: 0.3 }), RpcTimeoutError);
    const ms = performance.now() - t0;
    assert.ok(ms >= 290 && ms < 2000, `timed out after ${ms} ms`);
    assert.equal(rpc.pending, 0);
  });

  it("calls of different lengths each time out at their own, in order", async () => {
    await ready;
    const t0 = performance.now();
    const order: string[] = [];
    const at: Record<string, number> = {};
    const wait = (name: string, timeout: number) =>
      assert.rejects(rpc.call(ctx, "slow", { method: "never" }, { timeout }), RpcTimeoutError).then(() => {
        order.push(name);
        at[name] = performance.now() - t0;
      });
    await Promise.all([wait("long", 0.5), wait("short", 0.2), wait("short again", 0.2)]);
    assert.deepEqual(order, ["short", "short again", "long"]);
    assert.ok(at.short! >= 190 && at.long! >= 490, JSON.stringify(at));
  });
});

describe("process lifetime", () => {
  it("a process whose calls are all settled exits without waiting for their timeouts", async () => {
    const script = new URL("./fixtures/calls_then_exit.ts", import.meta.url).pathname;
    const [cmd, ...args] = childCommand(script);
    const t0 = Date.now();
    const child = spawn(cmd!, args, { stdio: ["ignore", "pipe", "inherit"] });
    let out = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    const code = await new Promise<number | null>((resolve) => {
      const killer = setTimeout(() => child.kill("SIGKILL"), 30_000);
      child.on("exit", (c) => {
        clearTimeout(killer);
        resolve(c);
      });
    });
    assert.match(out, /DONE/);
    assert.equal(code, 0);
    // Start-up takes a few seconds at most; a timeout left armed would hold it for 60 s.
    assert.ok(Date.now() - t0 < 25_000, `the child took ${Date.now() - t0} ms`);
  });
});
