/**
 * Registry benchmark: heartbeats (reportState) per second and latency percentiles, one at a
 * time, for sql.js in memory, sql.js on a file and PostgreSQL (PG_URL, or the local default
 * when it answers), with 1, 100 and 10,000 registered services.
 *
 * Run: `npx tsx bench/registry.ts` (prints a markdown table, then one JSON line).
 */

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { openSqlRegistry, type SqlRegistry } from "../registry/sql.ts";
import { dropSchema, fill } from "./sql_rows.ts";

const SECONDS = Number(process.env.BENCH_SECONDS ?? 1.5);
const SIZES = [1, 100, 10_000];
const PG_URL = process.env.PG_URL ?? "postgres://postgres@127.0.0.1:5432/test";

interface Row {
  backend: string;
  services: number;
  heartbeats: number;
  perSecond: number;
  p50us: number;
  p99us: number;
}

const pct = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))]!;

async function measure(backend: string, r: SqlRegistry, services: number): Promise<Row> {
  const ids = await fill(r, services);
  const lat: number[] = [];
  const end = performance.now() + SECONDS * 1000;
  const t0 = performance.now();
  while (performance.now() < end) {
    const id = ids[lat.length % ids.length]!;
    const s = performance.now();
    await r.reportState(id);
    lat.push(performance.now() - s);
  }
  const elapsed = (performance.now() - t0) / 1000;
  lat.sort((a, b) => a - b);
  return {
    backend,
    services,
    heartbeats: lat.length,
    perSecond: Math.round(lat.length / elapsed),
    p50us: Math.round(pct(lat, 0.5) * 1000),
    p99us: Math.round(pct(lat, 0.99) * 1000),
  };
}

const dir = mkdtempSync(join(tmpdir(), "novalet-bench-"));
const rows: Row[] = [];
const notes: string[] = [];
try {
  for (const n of SIZES) {
    const mem = await openSqlRegistry("sqljs::memory:");
    rows.push(await measure("sql.js memory", mem, n));
    await mem.close();

    const file = await openSqlRegistry(`sqljs:${join(dir, `bench-${n}.db`)}`);
    rows.push(await measure("sql.js file", file, n));
    await file.close();

    const schema = `bench_${process.pid}_${n}`;
    let onPg: SqlRegistry | undefined;
    try {
      onPg = await openSqlRegistry(PG_URL, { schema });
    } catch (e) {
      if (n === SIZES[0]) notes.push(`PostgreSQL skipped: ${(e as Error).message}`);
      await dropSchema(PG_URL, schema); // open may have failed after creating it
    }
    if (onPg) {
      try {
        rows.push(await measure("PostgreSQL", onPg, n));
      } finally {
        await onPg.close();
        await dropSchema(PG_URL, schema);
      }
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

console.log(`Registry heartbeats, one at a time, ${SECONDS} s per cell (node ${process.version})\n`);
console.log("| backend | services | heartbeats/s | p50 µs | p99 µs |");
console.log("|---|---:|---:|---:|---:|");
for (const r of rows) console.log(`| ${r.backend} | ${r.services} | ${r.perSecond} | ${r.p50us} | ${r.p99us} |`);
for (const n of notes) console.log(`\n${n}`);
console.log(JSON.stringify({ bench: "registry", seconds: SECONDS, rows, notes }));
