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
import pg from "pg";
import { openSqlRegistry, SqlRegistry } from "../registry/sql.ts";

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

async function fill(r: SqlRegistry, n: number): Promise<number[]> {
  const now = new Date().toISOString();
  // Bulk insert in one transaction per chunk: setting up 10,000 rows is not what is measured.
  for (let i = 0; i < n; i += 1000) {
    const rows = Array.from({ length: Math.min(1000, n - i) }, (_, j) => ({
      host: `host-${i + j}`,
      binary: "nova-bench",
      topic: "bench",
      created_at: now,
      updated_at: now,
    }));
    await SqlRegistry.database(r).transaction().execute((trx) => trx.insertInto("services").values(rows).execute());
  }
  return (await r.list()).map((s) => s.id);
}

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
/** Drop a schema of this run, if the server can be reached at all. */
async function dropSchema(schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: PG_URL, connectionTimeoutMillis: 2000 });
  try {
    await client.connect();
    await client.query(`drop schema if exists ${schema} cascade`);
  } catch {
    /* no server: nothing was created */
  } finally {
    await client.end().catch(() => {});
  }
}

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
      await dropSchema(schema); // open may have failed after creating it
    }
    if (onPg) {
      try {
        rows.push(await measure("PostgreSQL", onPg, n));
      } finally {
        await onPg.close();
        await dropSchema(schema);
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
