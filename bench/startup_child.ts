/**
 * Child of bench/startup.ts: start one service on TRANSPORT_URL (or nothing, with "bare") and
 * answer one call from itself; print the time since process start and the RSS after 1 s idle
 * (after a full GC), then, with a second argument N, the RSS after N s idle without forcing
 * anything: what a long-running idle service holds once V8's memory reducer has run.
 */
import process from "node:process";
import { performance } from "node:perf_hooks";

const url = process.argv[2] ?? "memory://";
const steady = Number(process.argv[3] ?? 0);
const rssMB = () => process.memoryUsage.rss() / 1024 / 1024;
const sleep = (s: number) => new Promise((r) => setTimeout(r, s * 1000));

let stop = async () => {};
if (url !== "bare") {
  const { Manager, openRegistry, openTransport, RequestContext, Service } = await import("../index.ts");
  class Ping extends Manager {
    ping(_c: InstanceType<typeof RequestContext>) {
      return "pong";
    }
  }
  const transport = await openTransport(url);
  const registry = await openRegistry("sqljs::memory:");
  const svc = Service.create({
    host: "s",
    topic: "ping",
    manager: Ping,
    transport,
    registry,
    prefix: `st-${process.pid}`,
  });
  await svc.start();
  await svc.rpc.call(new RequestContext(), "ping", { method: "ping" });
  stop = async () => {
    await svc.stop();
    await transport.close();
    await registry.close();
  };
}
const firstCallMs = performance.now(); // since the process started
await sleep(1);
(globalThis as { gc?: () => void }).gc?.();
console.log(JSON.stringify({ firstCallMs, idleRssMB: rssMB() }));
if (steady > 0) {
  await sleep(steady - 1);
  console.log(JSON.stringify({ steadyRssMB: rssMB() }));
}
await stop();
