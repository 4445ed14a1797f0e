/**
 * Conductor benchmark: heartbeats of a fleet through one conductor over MQTT, on a `sqljs:` file
 * and on PostgreSQL (PG_URL, or the local default when it answers).
 *
 * The conductor is a child process (bench/conductor_child.ts) that fills its registry with
 * CONDUCTOR_SERVICES rows (10,000) and serves it; two load processes run one ConductorRegistry
 * per service (500 per MQTT connection, ten connections each) and call reportState():
 *   - paced: each service once every 10 s, spread evenly (1,000 heartbeats/s for 10,000), for
 *     CONDUCTOR_SECONDS (20); latency is from the call to its reply;
 *   - max: 256 callers per load process without pacing, for CONDUCTOR_MAX_SECONDS (8), against
 *     the conductor that batches heartbeats, then 32 against one that writes them one at a time.
 * Baseline in the same run: heartbeats straight to the same registry, one at a time
 * (bench/registry.ts's measurement), in the conductor's process before it serves.
 * The conductor reports its CPU time (process.cpuUsage) and the writes (transactions) it made.
 * CONDUCTOR_MAX_RUNNING sets the conductor service's maxRunningHandlers (default CONDUCTOR_RUNNING, 1024), which caps a batch.
 *
 * Run: `npx tsx bench/conductor.ts` (prints a markdown table, then one JSON line).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { loadavg, tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import pg from "pg";
import { benchBroker } from "./broker.ts";
import { dropSchema } from "./sql_rows.ts";

const SERVICES = Number(process.env.CONDUCTOR_SERVICES ?? 10_000);
const SECONDS = Number(process.env.CONDUCTOR_SECONDS ?? 20);
const MAX_SECONDS = Number(process.env.CONDUCTOR_MAX_SECONDS ?? 8);
const DIRECT_SECONDS = 2;
const INTERVAL = 10; // each service's report interval, s
const LOADS = 2; // load processes
const CONNECTIONS = 10; // MQTT connections per load process, shared by its clients
const CONCURRENCY = 256; // callers per load process in the max mode
const PLAIN_CONCURRENCY = 32; // the same against a conductor that writes one heartbeat at a time
const PG_URL = process.env.PG_URL ?? "postgres://postgres@127.0.0.1:5432/test";
const script = new URL("./conductor_child.ts", import.meta.url).pathname;

interface Row {
  backend: string;
  mode: string;
  heartbeats: number;
  perSecond: number;
  p50ms: number;
  p99ms: number;
  maxMs: number;
  over1s: number;
  errors: number;
  /** CPU time of the conductor's process over the phase, % of one core. */
  conductorCpu: number;
  /** CPU time of the load processes together, % of one core. */
  loadCpu?: number;
  writesPerSecond?: number;
  heartbeatsPerWrite?: number;
  /** How late the load processes made a paced call, at most (ms). */
  lagMs?: number;
}

// deno-lint-ignore no-explicit-any
type Msg = any;

/** A child process driven over IPC: each command is answered by one message (`mark` by a mark,
 * `stop` by `stopped`, the others by a result), which may come while another command runs. */
class Child {
  #proc: ChildProcess;
  #waiting: { type: string; resolve: (m: Msg) => void }[] = [];
  #exited: Promise<unknown>;
  readonly ready: Promise<Msg>;

  constructor(args: string[]) {
    this.#proc = spawn(process.execPath, ["--import", "tsx", script, ...args], {
      stdio: ["ignore", "inherit", "inherit", "ipc"],
      env: { ...process.env, NOVALET_LOG_LEVEL: process.env.NOVALET_LOG_LEVEL ?? "warn" },
    });
    this.#exited = new Promise((r) => this.#proc.once("exit", r));
    this.ready = this.#next("ready");
    this.#proc.on("message", (m: Msg) => {
      const i = this.#waiting.findIndex((w) => w.type === m.type);
      if (i >= 0) this.#waiting.splice(i, 1)[0]!.resolve(m);
    });
    this.#proc.once("exit", (code) => {
      for (const w of this.#waiting.splice(0)) w.resolve({ type: "exit", code });
    });
  }

  #next(type: string): Promise<Msg> {
    return new Promise((resolve) => this.#waiting.push({ type, resolve }));
  }

  async ask(cmd: { cmd: string; [k: string]: unknown }): Promise<Msg> {
    const answer = this.#next(cmd.cmd === "mark" ? "mark" : cmd.cmd === "stop" ? "stopped" : "result");
    this.#proc.send(cmd);
    const m = await answer;
    if (m.type === "exit") throw new Error(`${script} exited with ${m.code} before answering ${JSON.stringify(cmd)}`);
    return m;
  }

  /** Ask it to stop; kill it if it has not exited 15 s later. */
  async stop(): Promise<void> {
    const timer = setTimeout(() => this.#proc.kill("SIGKILL"), 15_000);
    if (this.#proc.exitCode === null && this.#proc.connected) this.ask({ cmd: "stop" }).catch(() => {});
    await this.#exited;
    clearTimeout(timer);
  }
}

const pct = (sorted: number[], p: number) => sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))] ?? 0;
const round = (x: number, digits = 1) => Math.round(x * 10 ** digits) / 10 ** digits;

function latencyRow(lat: number[], seconds: number) {
  lat.sort((a, b) => a - b);
  return {
    heartbeats: lat.length,
    perSecond: Math.round(lat.length / seconds),
    p50ms: round(pct(lat, 0.5), 2),
    p99ms: round(pct(lat, 0.99), 2),
    maxMs: round(lat[lat.length - 1] ?? 0, 2),
    over1s: lat.filter((x) => x > 1000).length,
  };
}

/** Run `cmd` in every load process while the conductor's CPU and writes are counted. */
async function phase(conductor: Child, loads: Child[], cmd: { cmd: string; start?: number; [k: string]: unknown }) {
  const running = Promise.all(loads.map((l, slot) => l.ask({ ...cmd, slot })));
  // A paced phase starts at `start`: count from then.
  const wait = cmd.start === undefined ? 0 : cmd.start - (performance.timeOrigin + performance.now());
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  const m0 = await conductor.ask({ cmd: "mark" });
  const l0 = await Promise.all(loads.map((l) => l.ask({ cmd: "mark" })));
  const results = await running;
  const m1 = await conductor.ask({ cmd: "mark" });
  const seconds = (m1.t - m0.t) / 1000;
  const writes = m1.writes - m0.writes;
  const errors: Record<string, number> = {};
  for (const r of results) {
    for (const [k, v] of Object.entries(r.errors as Record<string, number>)) errors[k] = (errors[k] ?? 0) + v;
  }
  return {
    lat: results.flatMap((r) => r.lat as number[]),
    seconds,
    errors,
    lagMs: Math.max(...results.map((r) => r.lag ?? 0)),
    conductorCpu: round((m1.cpuMs - m0.cpuMs) / (m1.t - m0.t) * 100),
    loadCpu: round(results.reduce((s, r, i) => s + r.cpuMs - l0[i].cpuMs, 0) / (m1.t - m0.t) * 100),
    writesPerSecond: Math.round(writes / seconds),
    heartbeatsPerWrite: round((m1.written - m0.written) / Math.max(1, writes)),
  };
}

async function pgAnswers(): Promise<string | undefined> {
  const client = new pg.Client({ connectionString: PG_URL, connectionTimeoutMillis: 2000 });
  try {
    await client.connect();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  } finally {
    await client.end().catch(() => {});
  }
}

const loadBefore = loadavg()[0]!;
const broker = await benchBroker();
const dir = mkdtempSync(join(tmpdir(), "novalet-bench-conductor-"));
const rows: Row[] = [];
const notes: string[] = [];
const schemas: string[] = [];
const children = new Set<Child>();
const start = (args: string[]) => {
  const c = new Child(args);
  children.add(c);
  return c;
};
const stop = async (c: Child) => {
  await c.stop();
  children.delete(c);
};

/** One backend: a batching conductor (paced, then max), then a plain one (max). */
async function bench(backend: string, registryUrl: (run: string) => string): Promise<void> {
  const prefix = `bench${process.pid}${backend.replace(/\W/g, "").toLowerCase()}`;
  const common = [broker.url, prefix];
  let conductor = start([
    "conductor",
    ...common,
    registryUrl("batched"),
    String(SERVICES),
    "batched",
    String(DIRECT_SECONDS),
  ]);
  const ready = await conductor.ready;
  const direct = ready.direct;
  rows.push({
    backend,
    mode: "direct registry, one at a time (baseline)",
    ...latencyRow(direct.lat, direct.seconds),
    errors: 0,
    conductorCpu: round(direct.cpuMs / direct.seconds / 10),
  });
  const per = Math.ceil(ready.count / LOADS);
  const loads = Array.from({ length: LOADS }, (_, p) =>
    start([
      "load",
      ...common,
      String(ready.first + p * per),
      String(Math.min(per, ready.count - p * per)),
      String(CONNECTIONS),
    ]));
  await Promise.all(loads.map((l) => l.ready));
  try {
    await Promise.all(loads.map((l) => l.ask({ cmd: "warm", concurrency: 64 })));
    const rate = SERVICES / INTERVAL;
    const paced = await phase(conductor, loads, {
      cmd: "paced",
      start: performance.timeOrigin + performance.now() + 500,
      seconds: SECONDS,
      rate,
      slots: LOADS,
    });
    rows.push({
      backend,
      mode: `conductor, paced ${rate}/s`,
      ...latencyRow(paced.lat, SECONDS),
      errors: Object.values(paced.errors).reduce((a, b) => a + b, 0),
      conductorCpu: paced.conductorCpu,
      loadCpu: paced.loadCpu,
      writesPerSecond: paced.writesPerSecond,
      heartbeatsPerWrite: paced.heartbeatsPerWrite,
      lagMs: round(paced.lagMs),
    });
    notes.push(`${backend}, paced: the load processes made their calls at most ${round(paced.lagMs)} ms late.`);
    if (Object.keys(paced.errors).length) notes.push(`${backend} paced errors: ${JSON.stringify(paced.errors)}`);
    for (const mode of ["batched", "plain"] as const) {
      if (mode === "plain") {
        await stop(conductor);
        conductor = start(["conductor", ...common, registryUrl("plain"), String(SERVICES), "plain", "0"]);
        await conductor.ready;
        await Promise.all(loads.map((l) => l.ask({ cmd: "max", seconds: 1, concurrency: PLAIN_CONCURRENCY })));
      }
      // One write at a time is saturated by a few callers; more would only time out in its queue.
      const concurrency = mode === "batched" ? CONCURRENCY : PLAIN_CONCURRENCY;
      const max = await phase(conductor, loads, { cmd: "max", seconds: MAX_SECONDS, concurrency });
      const how = mode === "batched" ? "batched" : "one write per heartbeat";
      rows.push({
        backend,
        mode: `conductor, max, ${how} (c=${LOADS * concurrency})`,
        ...latencyRow(max.lat, max.seconds),
        errors: Object.values(max.errors).reduce((a, b) => a + b, 0),
        conductorCpu: max.conductorCpu,
        loadCpu: max.loadCpu,
        writesPerSecond: max.writesPerSecond,
        heartbeatsPerWrite: max.heartbeatsPerWrite,
      });
      if (Object.keys(max.errors).length) notes.push(`${backend} max ${mode} errors: ${JSON.stringify(max.errors)}`);
    }
  } finally {
    await Promise.all([conductor, ...loads].map(stop));
  }
}

try {
  await bench("sql.js file", (run) => `sqljs:${join(dir, `conductor-${run}.db`)}`);
  const down = await pgAnswers();
  if (down) notes.push(`PostgreSQL skipped: ${down}`);
  else {
    await bench("PostgreSQL", (run) => {
      const schema = `bench_cond_${process.pid}_${run}`;
      schemas.push(schema);
      const u = new URL(PG_URL);
      u.searchParams.set("schema", schema);
      return u.toString();
    });
  }
} finally {
  await Promise.all([...children].map(stop));
  for (const s of schemas) await dropSchema(PG_URL, s);
  await broker.stop();
  rmSync(dir, { recursive: true, force: true });
}

// Other work on the machine shows in every figure: say how much there was.
const load = [round(loadBefore, 2), round(loadavg()[0]!, 2)];
console.log(
  `Conductor heartbeats: ${SERVICES} services, ${LOADS} load processes × ${CONNECTIONS} MQTT connections, ` +
    `paced ${SECONDS} s, max ${MAX_SECONDS} s (node ${process.version}, broker: ${broker.name}; ` +
    `load average ${load[0]} before, ${load[1]} after)\n`,
);
console.log(
  "| backend | mode | heartbeats/s | p50 ms | p99 ms | max ms | > 1 s | errors | conductor CPU % | load CPU % | writes/s | heartbeats/write |",
);
console.log("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
for (const r of rows) {
  console.log(
    `| ${r.backend} | ${r.mode} | ${r.perSecond} | ${r.p50ms} | ${r.p99ms} | ${r.maxMs} | ${r.over1s} | ${r.errors} | ` +
      `${r.conductorCpu} | ${r.loadCpu ?? "-"} | ${r.writesPerSecond ?? "-"} | ${r.heartbeatsPerWrite ?? "-"} |`,
  );
}
for (const n of notes) console.log(`\n${n}`);
console.log(
  JSON.stringify({
    bench: "conductor",
    services: SERVICES,
    seconds: SECONDS,
    maxSeconds: MAX_SECONDS,
    load,
    rows,
    notes,
  }),
);
