/**
 * How fast a crash is seen, and what it costs the callers: servers in child processes
 * (tests/fixtures/presence_server.ts) killed, stopped and restarted; an observer reads their
 * presence and calls them. The baseline is Nova's rule, a heartbeat older than service_down_time.
 * Broker: MQTT_URL, else a Mosquitto of our own (.ci/mosquitto.conf), else the embedded aedes
 * broker (no shared subscriptions: the shared-topic rows are left out).
 *
 * Run: `npx tsx bench/presence.ts` (BENCH_KILLS=20, BENCH_STOPS=6).
 */

import { type ChildProcess, spawn } from "node:child_process";
import process from "node:process";
import { parsePresence, type Presence, readPresence, RequestContext, Rpc, ServerDied, Topics } from "../index.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { childCommand } from "../tests/helpers.ts";
import { benchBroker } from "./broker.ts";

/** Signal a child by pid: under Deno, ChildProcess.kill() after a SIGSTOP sends nothing. */
function signal(child: ChildProcess, sig: NodeJS.Signals): void {
  try {
    process.kill(child.pid!, sig);
  } catch { /* already gone */ }
}

const KILLS = Number(process.env.BENCH_KILLS ?? 20);
const STOPS = Number(process.env.BENCH_STOPS ?? 6);
const SERVER = new URL("../tests/fixtures/presence_server.ts", import.meta.url).pathname;
const CLI = new URL("../cli.ts", import.meta.url).pathname;

const broker = await benchBroker();
const { url, embedded } = broker;
const brokerName = broker.name;
const stopBroker = () => broker.stop();
const withQuery = (q: string) => url.includes("?") ? `${url}&${q}` : `${url}?${q}`;

const prefix = `nvb-presence-${crypto.randomUUID().slice(0, 8)}`;
const topics = new Topics(prefix);
const observer = await MqttTransport.connect({ url });
const seen: { p: Presence; at: number }[] = [];
await observer.subscribe(topics.presence("+", "+"), (payload) => {
  const p = parsePresence(payload);
  if (p) seen.push({ p, at: performance.now() });
}, { qos: 1 });
const last = (host: string) => seen.filter((s) => s.p.host === host).at(-1);
const children = new Set<ChildProcess>();

async function until(check: () => boolean, ms: number): Promise<boolean> {
  const end = performance.now() + ms;
  while (!check()) {
    if (performance.now() > end) return false;
    await new Promise((r) => setTimeout(r, 2));
  }
  return true;
}

async function server(host: string, transportUrl = url): Promise<ChildProcess> {
  const [cmd, ...args] = childCommand(SERVER, [
    `--host=${host}`,
    `--prefix=${prefix}`,
    `--transport_url=${transportUrl}`,
    "--registry_url=sqljs::memory:",
    "--log_level=error",
  ]);
  const child = spawn(cmd!, args, { stdio: ["ignore", "pipe", "inherit"] });
  children.add(child);
  child.on("exit", () => children.delete(child));
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
  if (!await until(() => out.includes("READY"), 30_000)) throw new Error(`server ${host} did not start`);
  return child;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length * p)] ?? NaN;
const ms = (x: number) => Math.round(x);

interface Row {
  scenario: string;
  result: string;
  baseline: string;
  values?: number[];
}
const rows: Row[] = [];

// 1. kill -9 → lost
{
  const times: number[] = [];
  for (let i = 0; i < KILLS; i++) {
    const child = await server("k1");
    await until(() => last("k1")?.p.state === "online", 5000);
    const t0 = performance.now();
    signal(child, "SIGKILL");
    if (await until(() => last("k1")?.p.state === "lost", 10_000)) times.push(last("k1")!.at - t0);
  }
  rows.push({
    scenario: `kill -9 → presence lost (${KILLS} kills)`,
    result: `median ${ms(median(times))} ms, max ${ms(Math.max(...times))} ms, ${times.length}/${KILLS} seen`,
    baseline: "60,000 ms (service_down_time)",
    values: times.map(ms),
  });
}

// 2. restart right after kill -9 → ends online
{
  let online = 0;
  let child = await server("r1");
  for (let i = 0; i < KILLS; i++) {
    signal(child, "SIGKILL");
    child = await server("r1");
    await new Promise((r) => setTimeout(r, 300));
    if (last("r1")?.p.state === "online") online++;
  }
  signal(child, "SIGKILL");
  rows.push({
    scenario: `restart within 100 ms of kill -9 (${KILLS} tries)`,
    result: `${online}/${KILLS} end online`,
    baseline: "-",
  });
}

// 3. SIGSTOP → lost (the broker's keepalive, at its next sweep); SIGCONT → online. STOPS servers,
// stopped one after another across 6 s (Mosquitto 2.0 sweeps for silent clients every 6 s).
for (const keepalive of [5, 2]) {
  const hosts = Array.from({ length: STOPS }, (_, i) => `s${keepalive}-${i}`);
  const servers: ChildProcess[] = [];
  for (const host of hosts) servers.push(await server(host, withQuery(`keepalive=${keepalive}`)));
  await until(() => hosts.every((h) => last(h)?.p.state === "online"), 5000);
  const lost: number[] = [];
  const back: number[] = [];
  await Promise.all(servers.map(async (child, i) => {
    const host = hosts[i]!;
    await new Promise((r) => setTimeout(r, (i * 6000) / STOPS));
    const t0 = performance.now();
    signal(child, "SIGSTOP");
    if (await until(() => last(host)?.p.state === "lost", 20_000)) lost.push(last(host)!.at - t0);
    const t1 = performance.now();
    signal(child, "SIGCONT");
    if (await until(() => last(host)?.p.state === "online", 15_000)) back.push(last(host)!.at - t1);
    signal(child, "SIGKILL");
  }));
  rows.push({
    scenario: `SIGSTOP, keepalive=${keepalive} → lost; SIGCONT → online (${STOPS} servers)`,
    result: `lost after median ${ms(median(lost))} ms, max ${ms(Math.max(...lost))} ms (${lost.length}/${STOPS}); ` +
      `online ${ms(median(back))} ms (max ${ms(Math.max(...back))}) after SIGCONT (${back.length}/${STOPS})`,
    baseline: "60,000 ms (service_down_time)",
    values: lost.map(ms),
  });
}

// 3b. What a reader adds: `novalet services list --json` as a new process (start, registry,
// presence read), and readPresence() alone in a running process (its own connection and read).
{
  const cli: number[] = [];
  for (let i = 0; i < 3; i++) {
    const [cmd, ...args] = childCommand(CLI, [
      "services",
      "list",
      "--json",
      "--registry_url=sqljs::memory:",
      `--transport_url=${url}`,
      `--prefix=${prefix}`,
    ]);
    const t0 = performance.now();
    const child = spawn(cmd!, args, { stdio: ["ignore", "ignore", "inherit"] });
    await new Promise((r) => child.on("close", r));
    cli.push(performance.now() - t0);
  }
  const read: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t0 = performance.now();
    await readPresence(observer, prefix);
    read.push(performance.now() - t0);
  }
  rows.push({
    scenario: "reading presence: services list --json (a new process); readPresence() in a running one",
    result: `${ms(median(cli))} ms (median of 3); ${ms(median(read))} ms (median of 5)`,
    baseline: "-",
  });
}

// 4. 16 calls in flight to topic.host, kill -9 → all fail
{
  const child = await server("c1");
  const rpc = new Rpc(observer, { prefix, timeout: 60 });
  const ctx = new RequestContext();
  const calls = Array.from({ length: 16 }, () => rpc.call(ctx, "work.c1", { method: "hang" }).catch((e) => e));
  await new Promise((r) => setTimeout(r, 500));
  const t0 = performance.now();
  signal(child, "SIGKILL");
  const outcomes = await Promise.all(calls);
  const took = performance.now() - t0;
  await rpc.close();
  rows.push({
    scenario: "16 calls in flight to topic.host, kill -9",
    result: `${outcomes.filter((e) => e instanceof ServerDied).length}/16 ServerDied after ${ms(took)} ms`,
    baseline: "60,000 ms (rpc_response_timeout)",
  });
}

// 5. three persistent-session servers of a shared topic, one kill -9'd
if (!embedded) {
  const q = withQuery("session_expiry=3600");
  const servers = [await server("p1", q), await server("p2", q), await server("p3", q)];
  const rpc = new Rpc(observer, { prefix, timeout: 5 });
  const ctx = new RequestContext();
  const timed = async (n: number) => {
    const lat: number[] = [];
    let answered = 0;
    for (let i = 0; i < n; i++) {
      const t = performance.now();
      try {
        await rpc.call(ctx, "work", { method: "who" });
        answered++;
        lat.push(performance.now() - t);
      } catch { /* counted as not answered */ }
    }
    return { answered, p99: pct(lat, 0.99) };
  };
  const before = await timed(300);
  signal(servers[1]!, "SIGKILL");
  await new Promise((r) => servers[1]!.on("exit", r));
  const after = await timed(300);
  await rpc.close();
  for (const s of servers) signal(s, "SIGKILL");
  rows.push({
    scenario: "shared topic, 3 persistent-session servers, 1 kill -9: 300 calls",
    result: `${after.answered}/300 answered, p99 ${after.p99.toFixed(2)} ms (${
      (after.p99 / before.p99).toFixed(2)
    }× before: ${before.answered}/300, p99 ${before.p99.toFixed(2)} ms)`,
    baseline: "before this change: a third time out until the session expires",
  });
}

for (const c of children) signal(c, "SIGKILL");
for (const host of new Set(seen.map((s) => s.p.host))) {
  await observer.publish(topics.presence("work", host), new Uint8Array(0), { qos: 1, retain: true });
}
await observer.close();
await stopBroker();

console.log(`Presence and crashes over MQTT (node ${process.version}, broker: ${brokerName})\n`);
console.log("| scenario | novalet | baseline |");
console.log("|---|---|---|");
for (const r of rows) console.log(`| ${r.scenario} | ${r.result} | ${r.baseline} |`);
console.log(JSON.stringify({ bench: "presence", broker: brokerName, rows }));
