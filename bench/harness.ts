/** Shared pieces of the benchmarks: timing loops, percentiles, RSS, and the output format. */

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

function percentile(sorted: Float64Array, p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? 0;
}

/**
 * Run `op` from `concurrency` workers for `seconds` (after a short warm-up); latency per op.
 */
export async function closedLoop(
  scenario: string,
  impl: string,
  op: () => Promise<unknown>,
  opts: { concurrency: number; seconds: number; warmup?: number },
): Promise<Row> {
  const warmEnd = performance.now() + (opts.warmup ?? 0.3) * 1000;
  await Promise.all(Array.from({ length: opts.concurrency }, async () => {
    while (performance.now() < warmEnd) await op();
  }));
  takePeakRss();
  // Latencies go into a fixed reservoir (every op counted, at most 200,000 kept), so a fast
  // floor does not measure its own array growing.
  const keep = new Float64Array(200_000);
  let ops = 0;
  const t0 = performance.now();
  const end = t0 + opts.seconds * 1000;
  await Promise.all(Array.from({ length: opts.concurrency }, async () => {
    while (performance.now() < end) {
      const s = performance.now();
      await op();
      const d = performance.now() - s;
      const slot = ops < keep.length ? ops : Math.floor(Math.random() * (ops + 1));
      if (slot < keep.length) keep[slot] = d;
      ops++;
    }
  }));
  const elapsed = (performance.now() - t0) / 1000;
  const sorted = keep.subarray(0, Math.min(ops, keep.length)).sort();
  return {
    scenario,
    impl,
    ops,
    perSecond: Math.round(ops / elapsed),
    p50us: Math.round(percentile(sorted, 0.5) * 1000),
    p99us: Math.round(percentile(sorted, 0.99) * 1000),
    peakRssMB: takePeakRss(),
  };
}

/** Print the markdown table and the JSON line. */
export function report(bench: string, title: string, rows: Row[], extra: Record<string, unknown> = {}): void {
  console.log(`${title} (node ${process.version}, ${rows.length} rows)\n`);
  console.log("| scenario | implementation | ops | ops/s | p50 µs | p99 µs | peak RSS MB | lost |");
  console.log("|---|---|---:|---:|---:|---:|---:|---:|");
  for (const r of rows) {
    console.log(
      `| ${r.scenario} | ${r.impl} | ${r.ops} | ${r.perSecond} | ${r.p50us} | ${r.p99us} | ${r.peakRssMB} | ${
        r.lost ?? "-"
      } |`,
    );
  }
  const notes = rows.filter((r) => r.note).map((r) => `- ${r.scenario} / ${r.impl}: ${r.note}`);
  if (notes.length) console.log("\n" + notes.join("\n"));
  console.log(JSON.stringify({ bench, ...extra, rows }));
}
