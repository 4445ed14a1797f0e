/**
 * Child of bench/startup.ts: start one service on TRANSPORT_URL and answer one call from
 * itself; print the time since process start, then the RSS after a short idle.
 */
import process from "node:process";
import { performance } from "node:perf_hooks";
import { Manager, openRegistry, openTransport, RequestContext, Service } from "../mod.ts";

class Ping extends Manager {
  ping(_c: RequestContext) {
    return "pong";
  }
}
const url = process.argv[2] ?? "memory://";
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
const firstCallMs = performance.now(); // since the process started
await new Promise((r) => setTimeout(r, 1000));
global.gc?.();
console.log(JSON.stringify({ firstCallMs, idleRssMB: process.memoryUsage.rss() / 1024 / 1024 }));
await svc.stop();
await transport.close();
await registry.close();
