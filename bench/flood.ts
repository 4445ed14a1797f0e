/**
 * What a flood costs a server: messages of 10,000 requests each (the most one message may carry)
 * to a method that never finishes, handed to one Dispatcher, as a hostile or runaway client
 * would send them. Measured per row: the time `handle()` holds the event loop per message, and
 * the heap the dispatcher still holds (the running and queued requests, the ids it remembers)
 * once its replies are handed over, after a full GC, against the floor measured in the same
 * run: the same messages only parsed (JSON.parse) and kept.
 *
 * Run: `node --expose-gc --import tsx bench/flood.ts` (without --expose-gc the heap is read
 * without a GC first, and the numbers are rougher).
 */

import process from "node:process";
import { Buffer } from "node:buffer";
import { Dispatcher, Manager, MAX_BATCH, type RequestContext, type Transport } from "../index.ts";

const MESSAGES = Number(process.env.BENCH_FLOOD_MESSAGES ?? 15);

class Stuck extends Manager {
  stuck(_ctx: RequestContext): Promise<never> {
    return new Promise(() => {}); // holds its running slot for ever
  }
}

const gc = (globalThis as { gc?: () => void }).gc ?? (() => {});
const heap = () => {
  gc();
  return process.memoryUsage().heapUsed;
};
const silent = { debug() {}, info() {}, warn() {}, error() {} };

function message(calls: boolean, from: number): Buffer {
  const items: string[] = [];
  for (let i = 0; i < MAX_BATCH; i++) {
    const reply = calls ? `,"reply_to":"b/reply/c${i % 16}"` : "";
    items.push(`{"v":1,"id":"${from + i}","method":"stuck","args":{"n":${i}}${reply}}`);
  }
  return Buffer.from(`[${items.join(",")}]`);
}

interface FloodRow {
  scenario: string;
  impl: string;
  requests: number;
  messageMiB: number;
  handleMsPerMessage: number;
  heapMiB: number;
  replies: number;
}

async function run(scenario: string, calls: boolean): Promise<FloodRow[]> {
  const msgs = Array.from({ length: MESSAGES }, (_, m) => message(calls, m * MAX_BATCH));
  const bytes = msgs.reduce((n, b) => n + b.byteLength, 0);
  const rows: FloodRow[] = [];
  // The floor: the messages parsed and kept, nothing else.
  let h0 = heap();
  let t0 = performance.now();
  const kept = msgs.map((b) => JSON.parse(b.toString("utf8")));
  const parseMs = (performance.now() - t0) / MESSAGES;
  const floorHeap = heap() - h0;
  rows.push(row(scenario, "floor: JSON.parse, kept", parseMs, floorHeap, 0));
  kept.length = 0;
  // The dispatcher: 64 run (for ever), 1,000 wait, the rest are refused.
  let replies = 0;
  const transport: Transport = {
    publish: () => (replies++, Promise.resolve()),
    subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
    close: () => Promise.resolve(),
  };
  const d = new Dispatcher(new Stuck(), transport, { prefix: "b", logger: silent });
  h0 = heap();
  t0 = performance.now();
  for (const b of msgs) d.handle(b, "b/rpc/stuck", { qos: 1 });
  const handleMs = (performance.now() - t0) / MESSAGES;
  await new Promise((r) => setTimeout(r, 100)); // the replies handed over
  rows.push(row(scenario, "novalet Dispatcher", handleMs, heap() - h0, replies));
  return rows;

  function row(scenario: string, impl: string, ms: number, heapBytes: number, replies: number): FloodRow {
    return {
      scenario,
      impl,
      requests: MESSAGES * MAX_BATCH,
      messageMiB: +(bytes / 2 ** 20).toFixed(2),
      handleMsPerMessage: +ms.toFixed(1),
      heapMiB: +(heapBytes / 2 ** 20).toFixed(1),
      replies,
    };
  }
}

const rows = [
  ...await run(`${MESSAGES} messages of ${MAX_BATCH} casts`, false),
  ...await run(`${MESSAGES} messages of ${MAX_BATCH} calls`, true),
];
console.log(`A flood to a method that never finishes (node ${process.version}, ${rows.length} rows)\n`);
console.log("| scenario | implementation | requests | messages MiB | ms per message | heap held MiB | replies |");
console.log("|---|---|---:|---:|---:|---:|---:|");
for (const r of rows) {
  console.log(
    `| ${r.scenario} | ${r.impl} | ${r.requests} | ${r.messageMiB} | ${r.handleMsPerMessage} | ${r.heapMiB} | ${r.replies} |`,
  );
}
const ratio = (scenario: string) => {
  const [floor, novalet] = rows.filter((r) => r.scenario === scenario);
  return +(novalet!.heapMiB / Math.max(0.1, floor!.heapMiB)).toFixed(2);
};
console.log(JSON.stringify({
  bench: "flood",
  heapToFloor: Object.fromEntries([...new Set(rows.map((r) => r.scenario))].map((s) => [s, ratio(s)])),
  rows,
}));
