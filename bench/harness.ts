/** Shared pieces of the benchmarks: timing loops, percentiles, RSS, and the output format. */

import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import process from "node:process";

export interface Row {
  scenario: string;
  impl: string;
  ops: number;
  perSecond: number;
  p50us: number;
  p99us: number;
  peakRssMB: number;
  lost?: number;
  note?: string;
  /** CPU time of this process (the client side) per op, µs. */
  cpuUsPerOp?: number;
  /** CPU time of the server process per op, µs (Linux: read from /proc). */
  serverCpuUsPerOp?: number;
}

let peakRss = 0;
const rssTimer = setInterval(() => (peakRss = Math.max(peakRss, process.memoryUsage.rss())), 50);
rssTimer.unref?.();
/** Peak RSS since the last reset, in MB. */
export function takePeakRss(): number {
  peakRss = Math.max(peakRss, process.memoryUsage.rss());
  const mb = Math.round(peakRss / 1024 / 1024);
  peakRss = 0;
  return mb;
}

/** CPU time (user + system) of process `pid` so far, µs; undefined where /proc cannot tell.
 * /proc counts in clock ticks, taken as 10 ms (USER_HZ 100, `getconf CLK_TCK` on Linux), so a row
 * summed over slices of 0.2-0.4 s is good to a few µs per call at c=1. */
export function processCpuUs(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(") ") + 2).split(" "); // after the name, which may hold ") "
    return (Number(fields[11]) + Number(fields[12])) * 10_000;
  } catch {
    return undefined;
  }
}

function percentile(sorted: Float64Array, p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? 0;
}

/** Operations and latencies of one implementation, over one or more timed runs. */
class Meter {
  // Latencies go into a fixed reservoir (every op counted, at most 200,000 kept), so a fast
  // floor does not measure its own array growing.
  keep = new Float64Array(200_000);
  ops = 0;
  seconds = 0;
  peakRssMB = 0;
  cpuUs = 0;
  serverCpuUs?: number;
  /** A slice whose server CPU could not be read: the row leaves the column out. */
  serverCpuLost = false;

  record(ms: number): void {
    const slot = this.ops < this.keep.length ? this.ops : Math.floor(Math.random() * (this.ops + 1));
    if (slot < this.keep.length) this.keep[slot] = ms;
    this.ops++;
  }

  row(scenario: string, impl: string): Row {
    const sorted = this.keep.subarray(0, Math.min(this.ops, this.keep.length)).sort();
    return {
      scenario,
      impl,
      ops: this.ops,
      perSecond: Math.round(this.ops / this.seconds),
      p50us: Math.round(percentile(sorted, 0.5) * 1000),
      p99us: Math.round(percentile(sorted, 0.99) * 1000),
      peakRssMB: this.peakRssMB,
      cpuUsPerOp: perOp(this.cpuUs, this.ops),
      ...(this.serverCpuUs === undefined || this.serverCpuLost
        ? {}
        : { serverCpuUsPerOp: perOp(this.serverCpuUs, this.ops) }),
    };
  }
}

async function warmUp(op: () => Promise<unknown>, concurrency: number, seconds: number): Promise<void> {
  const end = performance.now() + seconds * 1000;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < end) await op();
  }));
}

const perOp = (us: number, ops: number) => Math.round(us / Math.max(ops, 1) * 10) / 10;

/** Run `op` from `concurrency` workers for `seconds` into `meter`; with `server`, a pid, its CPU too. */
async function run(
  meter: Meter,
  op: () => Promise<unknown>,
  concurrency: number,
  seconds: number,
  server?: number,
): Promise<void> {
  takePeakRss();
  const cpu = process.cpuUsage();
  const serverCpu = server === undefined ? undefined : processCpuUs(server);
  const t0 = performance.now();
  const end = t0 + seconds * 1000;
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (performance.now() < end) {
      const s = performance.now();
      await op();
      meter.record(performance.now() - s);
    }
  }));
  meter.seconds += (performance.now() - t0) / 1000;
  meter.peakRssMB = Math.max(meter.peakRssMB, takePeakRss());
  const used = process.cpuUsage(cpu);
  meter.cpuUs += used.user + used.system;
  const serverNow = server === undefined ? undefined : processCpuUs(server);
  if (server === undefined) return;
  if (serverCpu === undefined || serverNow === undefined) meter.serverCpuLost = true;
  else meter.serverCpuUs = (meter.serverCpuUs ?? 0) + serverNow - serverCpu;
}

/**
 * Compare implementations of one scenario fairly on a shared, noisy machine: after a warm-up
 * each, they run in alternating slices (`rounds` slices of `seconds / rounds` each, the order
 * reversed every round), so a slow spell of the machine hits all of them alike. `servers[i]`, the
 * pid of implementation i's server process, adds its CPU time per op to the row.
 */
export async function compare(
  scenario: string,
  impls: [impl: string, op: () => Promise<unknown>][],
  opts: { concurrency: number; seconds: number; rounds?: number; warmup?: number; servers?: (number | undefined)[] },
): Promise<Row[]> {
  const rounds = opts.rounds ?? 6;
  for (const [, op] of impls) await warmUp(op, opts.concurrency, opts.warmup ?? 0.3);
  const meters = impls.map(() => new Meter());
  for (let r = 0; r < rounds; r++) {
    const order = impls.map((_, i) => i);
    if (r % 2 === 1) order.reverse();
    for (const i of order) {
      await run(meters[i]!, impls[i]![1], opts.concurrency, opts.seconds / rounds, opts.servers?.[i]);
    }
  }
  return impls.map(([impl], i) => meters[i]!.row(scenario, impl));
}

/** Print the markdown table and the JSON line. */
export function report(bench: string, title: string, rows: Row[], extra: Record<string, unknown> = {}): void {
  console.log(`${title} (node ${process.version}, ${rows.length} rows)\n`);
  const server = rows.some((r) => r.serverCpuUsPerOp !== undefined);
  const cpu = (r: Row) => `${r.cpuUsPerOp ?? "-"} |${server ? ` ${r.serverCpuUsPerOp ?? "-"} |` : ""}`;
  console.log(
    `| scenario | implementation | ops | ops/s | p50 µs | p99 µs | peak RSS MB | lost | CPU µs/op |${
      server ? " server CPU µs/op |" : ""
    }`,
  );
  console.log(`|---|---|---:|---:|---:|---:|---:|---:|---:|${server ? "---:|" : ""}`);
  for (const r of rows) {
    console.log(
      `| ${r.scenario} | ${r.impl} | ${r.ops} | ${r.perSecond} | ${r.p50us} | ${r.p99us} | ${r.peakRssMB} | ${
        r.lost ?? "-"
      } | ${cpu(r)}`,
    );
  }
  const notes = rows.filter((r) => r.note).map((r) => `- ${r.scenario} / ${r.impl}: ${r.note}`);
  if (notes.length) console.log("\n" + notes.join("\n"));
  console.log(JSON.stringify({ bench, ...extra, rows }));
}

/** Start bench/mqtt_server.ts with `args` in a child process and wait for its READY; resolves with
 * a function that stops it (SIGTERM) and waits for its exit, and its pid. */
export async function mqttServer(args: string[]): Promise<(() => Promise<void>) & { pid: number }> {
  const script = new URL("./mqtt_server.ts", import.meta.url).pathname;
  const child = spawn(process.execPath, ["--import", "tsx", script, ...args], { stdio: ["ignore", "pipe", "inherit"] });
  await new Promise<void>((resolve, reject) => {
    child.stdout.setEncoding("utf8").on("data", (d: string) => d.includes("READY") && resolve());
    child.on("exit", (code) => reject(new Error(`server exited with ${code}`)));
  });
  const stop = async () => {
    const gone = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await gone;
  };
  return Object.assign(stop, { pid: child.pid! });
}
