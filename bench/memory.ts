/**
 * novalet over the memory transport against the floor measured in the same run: awaiting the
 * manager method directly. Scenarios: add(a, b) at c=1 and c=64, echo of 16 KiB with 16
 * callers, and a burst of casts counted at the receiver (every one accounted for).
 *
 * With Moleculer installed (`npm i --no-save moleculer@0.15`), its Fake transporter runs the same
 * scenarios in the same process, in slices alternating with novalet's.
 *
 * Run: `npx tsx bench/memory.ts` (BENCH_SECONDS=2 by default).
 */

import process from "node:process";
import { Manager, openRegistry, RequestContext, Rpc, Service } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { compare, report, type Row, takePeakRss } from "./harness.ts";

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

/**
 * Moleculer over its in-process Fake transporter (two brokers, as two services would be), when
 * it is installed: it is not a dependency (`npm i --no-save moleculer@0.15` to compare).
 */
async function moleculer() {
  const specifier = "moleculer"; // not resolved at type-check time: optional
  const mod = await import(specifier).catch(() => undefined);
  if (!mod) return undefined;
  // deno-lint-ignore no-explicit-any
  const { ServiceBroker } = mod as { ServiceBroker: any };
  const make = (nodeID: string) => new ServiceBroker({ nodeID, transporter: "Fake", logger: false });
  const server = make(`bench-server-${process.pid}`);
  const client = make(`bench-client-${process.pid}`);
  const state = { received: 0 };
  server.createService({
    name: "bench",
    actions: {
      add: (ctx: { params: { a: number; b: number } }) => ctx.params.a + ctx.params.b,
      echo: (ctx: { params: { s: string } }) => ctx.params.s,
    },
    events: { "bench.count": () => void state.received++ },
  });
  await server.start();
  await client.start();
  await client.waitForServices("bench");
  return {
    state,
    call: (action: string, params: object): Promise<unknown> => client.call(`bench.${action}`, params),
    emit: (): Promise<unknown> => client.emit("bench.count", {}),
    stop: async () => {
      await client.stop();
      await server.stop();
    },
  };
}
const mol = await moleculer();

const direct = (fn: () => unknown) => async () => await fn();
const scenarios: [string, number, [string, () => Promise<unknown>][]][] = [
  ["add c=1", 1, [
    ["floor: direct await", direct(() => manager.add(ctx, { a: 1, b: 2 }))],
    ["novalet memory", () => rpc.call(ctx, "bench", { method: "add", args: { a: 1, b: 2 } })],
  ]],
  ["add c=64", 64, [
    ["floor: direct await", direct(() => manager.add(ctx, { a: 1, b: 2 }))],
    ["novalet memory", () => rpc.call(ctx, "bench", { method: "add", args: { a: 1, b: 2 } })],
  ]],
  ["echo 16 KiB c=16", 16, [
    ["floor: direct await", direct(() => manager.echo(ctx, { s: s16k }))],
    ["novalet memory", () => rpc.call(ctx, "bench", { method: "echo", args: { s: s16k } })],
  ]],
];
if (mol) {
  scenarios[0]![2].push(["Moleculer 0.15 Fake", () => mol.call("add", { a: 1, b: 2 })]);
  scenarios[1]![2].push(["Moleculer 0.15 Fake", () => mol.call("add", { a: 1, b: 2 })]);
  scenarios[2]![2].push(["Moleculer 0.15 Fake", () => mol.call("echo", { s: s16k })]);
}
for (const [name, concurrency, impls] of scenarios) {
  rows.push(...await compare(name, impls, { concurrency, seconds: SECONDS }));
}

// Casts: send a burst, count at the receiver; a lost message is reported, never averaged away.
const casters: [string, () => unknown, () => number, (n: number) => void][] = [
  ["floor: direct call", () => manager.count(ctx), () => manager.received, (n) => (manager.received = n)],
  [
    "novalet memory",
    () => rpc.cast(ctx, "bench", { method: "count" }),
    () => manager.received,
    (n) => (manager.received = n),
  ],
];
if (mol) {
  casters.push(["Moleculer 0.15 Fake", () => mol.emit(), () => mol.state.received, (n) => (mol.state.received = n)]);
}
for (const [impl, send, received, reset] of casters) {
  reset(0);
  takePeakRss();
  const t0 = performance.now();
  for (let i = 0; i < CASTS; i++) {
    const r = send();
    if (r instanceof Promise && i % 1024 === 0) await r; // let the receiver run now and then
  }
  const deadline = performance.now() + 30_000;
  while (received() < CASTS && performance.now() < deadline) await new Promise((r) => setTimeout(r, 1));
  const secs = (performance.now() - t0) / 1000;
  rows.push({
    scenario: `cast burst of ${CASTS}`,
    impl,
    ops: received(),
    perSecond: Math.round(received() / secs),
    p50us: 0,
    p99us: 0,
    peakRssMB: takePeakRss(),
    lost: CASTS - received(),
  });
}

await mol?.stop();
await rpc.close();
await svc.stop();
await registry.close();

const ratio = (scenario: string, base: string) => {
  const find = (k: string) => rows.find((r) => r.scenario === scenario && r.impl.startsWith(k));
  const [b, n] = [find(base), find("novalet")];
  return b && n ? Number((n.perSecond / b.perSecond).toFixed(3)) : undefined;
};
const ratios = (base: string) =>
  Object.fromEntries(
    rows.filter((r) => r.impl.startsWith("novalet")).map((r) => [r.scenario, ratio(r.scenario, base)]),
  );
report(
  "memory",
  `novalet over the memory transport, ${SECONDS} s per row${
    mol ? "" : " (Moleculer not installed: `npm i --no-save moleculer@0.15` adds it)"
  }`,
  rows,
  { seconds: SECONDS, ratioToFloor: ratios("floor"), ...(mol ? { ratioToMoleculer: ratios("Moleculer") } : {}) },
);
