/** Registry set-up shared by the benchmarks that heartbeat many rows (registry.ts, conductor.ts). */

import pg from "pg";
import { SqlRegistry } from "../registry/sql.ts";

/** `n` service rows, in one transaction per 1,000 (setting up is not what is measured); their ids. */
export async function fill(r: SqlRegistry, n: number): Promise<number[]> {
  const now = new Date().toISOString();
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

/** Drop a schema of this run, if the server at `url` can be reached at all. */
export async function dropSchema(url: string, schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 2000 });
  try {
    await client.connect();
    await client.query(`drop schema if exists ${schema} cascade`);
  } catch {
    /* no server: nothing was created */
  } finally {
    await client.end().catch(() => {});
  }
}
