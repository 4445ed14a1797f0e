/**
 * novalet over the memory transport against the floor measured in the same run: awaiting the
 * manager method directly. Scenarios: add(a, b) at c=1 and c=64, echo of 16 KiB with 16
 * callers, and a burst of casts counted at the receiver (every one accounted for).
 *
 * Run: `npx tsx bench/memory.ts` (BENCH_SECONDS=2 by default).
 */

import process from "node:process";
import { Manager, openRegistry, RequestContext, Rpc, Service } from "../mod.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { closedLoop, report, type Row, takePeakRss } from "./harness.ts";

const SECONDS = Number(process.env.BENCH_SECONDS ?? 2);
const CASTS = Number(process.env.BENCH_CASTS ?? 200_000);

class BenchManager extends Manager {
  received = 0;
  add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
    return a + b;
  }
  echo(_ctx: RequestContext, { s }: { s: string }) {
    return s;
  }
  count(_ctx: RequestContext) {
    this.received++;
  }
}

const hub = new MemoryHub();
const registry = await openRegistry("sqljs::memory:");
const svc = Service.create({
  host: "bench",
  topic: "bench",
  manager: BenchManager,
  transport: new MemoryTransport(hub),
  registry,
  periodicFuzzyDelay: 0,
});
await svc.start();
const manager = svc.manager as BenchManager;
const rpc = new Rpc(new MemoryTransport(hub));
const ctx = new RequestContext();
const s16k = "x".repeat(16 * 1024);
const rows: Row[] = [];

const direct = (fn: () => unknown) => async () => await fn();
const scenarios: [string, number, () => Promise<unknown>, () => Promise<unknown>][] = [
  [
    "add c=1",
    1,
    direct(() => manager.add(ctx, { a: 1, b: 2 })),
    () => rpc.call(ctx, "bench", { method: "add", args: { a: 1, b: 2 } }),
  ],
  [
    "add c=64",
    64,
    direct(() => manager.add(ctx, { a: 1, b: 2 })),
    () => rpc.call(ctx, "bench", { method: "add", args: { a: 1, b: 2 } }),
  ],
  [
    "echo 16 KiB c=16",
    16,
    direct(() => manager.echo(ctx, { s: s16k })),
    () => rpc.call(ctx, "bench", { method: "echo", args: { s: s16k } }),
  ],
];
for (const [name, concurrency, floor, novalet] of scenarios) {
  rows.push(await closedLoop(name, "floor: direct await", floor, { concurrency, seconds: SECONDS }));
  rows.push(await closedLoop(name, "novalet memory", novalet, { concurrency, seconds: SECONDS }));
}

// Casts: send a burst, count at the receiver; a lost message is reported, never averaged away.
for (
  const [impl, send] of [
    ["floor: direct call", () => manager.count(ctx)],
    ["novalet memory", () => rpc.cast(ctx, "bench", { method: "count" })],
  ] as const
) {
  manager.received = 0;
  takePeakRss();
  const t0 = performance.now();
  for (let i = 0; i < CASTS; i++) {
    const r = send();
    if (r instanceof Promise && i % 1024 === 0) await r; // let the receiver run now and then
  }
  const deadline = performance.now() + 30_000;
  while (manager.received < CASTS && performance.now() < deadline) await new Promise((r) => setTimeout(r, 1));
  const secs = (performance.now() - t0) / 1000;
  rows.push({
    scenario: `cast burst of ${CASTS}`,
    impl,
    ops: manager.received,
    perSecond: Math.round(manager.received / secs),
    p50us: 0,
    p99us: 0,
    peakRssMB: takePeakRss(),
    lost: CASTS - manager.received,
  });
}

await rpc.close();
await svc.stop();
await registry.close();

const ratio = (scenario: string) => {
  const [f, n] = ["floor", "novalet"].map((k) => rows.find((r) => r.scenario === scenario && r.impl.startsWith(k))!);
  return Number((n!.perSecond / f!.perSecond).toFixed(3));
};
report("memory", `novalet over the memory transport, ${SECONDS} s per row`, rows, {
  seconds: SECONDS,
  ratioToFloor: Object.fromEntries(
    rows.filter((r) => r.impl.startsWith("novalet")).map((r) => [r.scenario, ratio(r.scenario)]),
  ),
});
