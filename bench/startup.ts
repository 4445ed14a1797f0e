/**
 * Start-up and memory: time from process start to the first answered call and the RSS of an
 * idle service (memory transport and MQTT) under Node + tsx, under Node from a bundle made by
 * build.ts (the service and novalet as plain JavaScript, as one would ship it to a device) and
 * under Deno, each next to the runtime alone measured the same way; and 1,000 services in one
 * process on the memory transport.
 * RSS is read twice: 1 s after start (after a full GC), and after BENCH_STEADY s (40) of idling,
 * once V8's memory reducer has given back what start-up used.
 *
 * Run: `npx tsx bench/startup.ts` (MQTT: MQTT_URL, else an own Mosquitto, else the embedded broker).
 */
import { execFile } from "node:child_process";
import { existsSync } from "node:fs";
import process from "node:process";
import { Manager, openRegistry, RequestContext, Service } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MOSQUITTO, Mosquitto } from "../tests/mosquitto.ts";
import { buildDist } from "../build.ts";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);
/** Seconds a service stays idle for the steady RSS (V8's memory reducer runs after ~10-30 s). */
const STEADY = Number(process.env.BENCH_STEADY ?? 40);
const here = new URL(".", import.meta.url);
const script = new URL("./startup_child.ts", here).pathname;
const denoBin = new URL("../node_modules/.bin/deno", here).pathname;

type Runtime = [name: string, cmd: string, args: string[]];
const runtimes: Runtime[] = [["node + tsx", process.execPath, ["--expose-gc", "--import", "tsx", script]]];
// The child built with novalet into plain JavaScript (under node_modules, so that the external
// sql.js resolves as it would in an app).
const bundleDir = new URL("../node_modules/.cache/novalet-bench-dist", here).pathname;
await buildDist(bundleDir, ["bench/startup_child.ts"]);
const bundled = `${bundleDir}/bench/startup_child.js`;
runtimes.push(["node, bundled (build.ts)", process.execPath, ["--expose-gc", bundled]]);
// sql.js's WebAssembly compiled by V8's baseline compiler only: no optimising tier-up, whose
// code and compile memory stay resident. A registry writes once per report interval.
runtimes.push(["node --liftoff-only, bundled", process.execPath, ["--expose-gc", "--liftoff-only", bundled]]);
// And no optimising JavaScript compiler either (Ignition and Sparkplug only): the code TurboFan
// makes for start-up's hot paths, and its compile memory, stay resident too. The price is
// throughput (~4x fewer in-process calls/s): a setting for small devices that answer now and then.
runtimes.push([
  "node --liftoff-only --no-opt, bundled",
  process.execPath,
  ["--expose-gc", "--liftoff-only", "--no-opt", bundled],
]);
if (existsSync(denoBin)) runtimes.push(["deno", denoBin, ["run", "-A", "--v8-flags=--expose-gc", script]]);

/** Run the child; its JSON lines merged. */
function child([, cmd, args]: Runtime, url: string, steady = 0): Promise<Record<string, number>> {
  return new Promise((resolve, reject) => {
    execFile(cmd, [...args, url, String(steady)], { env: { ...process.env, NO_COLOR: "1" } }, (err, stdout) => {
      if (err) reject(err);
      else {resolve(Object.assign(
          {},
          ...stdout.trim().split("\n").filter((l) => l.startsWith("{")).map((l) => JSON.parse(l)),
        ));}
    });
  });
}

let mqttUrl = process.env.MQTT_URL;
let broker = mqttUrl ? `MQTT_URL ${mqttUrl}` : "";
let stop = async () => {};
if (!mqttUrl && MOSQUITTO) {
  const m = await Mosquitto.start();
  mqttUrl = m.url;
  broker = "Mosquitto (own instance)";
  stop = () => m.stop();
} else if (!mqttUrl) {
  const b = await EmbeddedBroker.start();
  mqttUrl = `${b.url}?protocol_version=4&shared=false`;
  broker = "embedded (aedes)";
  stop = () => b.close();
}

interface StartRow {
  runtime: string;
  transport: string;
  firstCallMs: number | null;
  idleRssMB: number;
  steadyRssMB: number;
}
const cases = runtimes.flatMap((rt) =>
  ([["nothing (the runtime alone)", "bare"], ["memory", "memory://"], [`mqtt (${broker})`, mqttUrl!]] as const).map((
    [transport, url],
  ) => ({ rt, transport, url }))
);
// The steady readings wait STEADY s in idle children, all at once; then the timed runs, one by one.
const steady = await Promise.all(cases.map((c) => child(c.rt, c.url, STEADY)));
const rows: StartRow[] = [];
for (const [i, c] of cases.entries()) {
  const runs: Record<string, number>[] = [];
  for (let r = 0; r < RUNS; r++) runs.push(await child(c.rt, c.url));
  const med = (k: string) => runs.map((r) => r[k]!).sort((a, b) => a - b)[Math.floor(runs.length / 2)]!;
  rows.push({
    runtime: c.rt[0],
    transport: c.transport,
    firstCallMs: c.url === "bare" ? null : Math.round(med("firstCallMs")),
    idleRssMB: Math.round(med("idleRssMB")),
    steadyRssMB: Math.round(steady[i]!.steadyRssMB!),
  });
}
await stop();

// 1,000 services in one process, one hub and one registry.
class Echo extends Manager {
  echo(_c: RequestContext, a: Record<string, unknown>) {
    return a;
  }
}
const before = process.memoryUsage.rss();
const hub = new MemoryHub();
const registry = await openRegistry("sqljs::memory:");
const transport = new MemoryTransport(hub);
const t0 = performance.now();
const services: Service[] = [];
for (let i = 0; i < 1000; i++) {
  const s = Service.create({
    host: `h${i}`,
    topic: "echo",
    manager: Echo,
    transport,
    registry,
    periodicFuzzyDelay: 60,
  });
  await s.start();
  services.push(s);
}
const startMs = performance.now() - t0;
const ctx = new RequestContext();
const answers = await Promise.all(
  services.map((s, i) => services[0]!.rpc.call(ctx, `echo.${s.host}`, { method: "echo", args: { i } })),
);
const allAnswered = answers.every((a, i) => (a as { i: number }).i === i);
const rss1000 = Math.round(process.memoryUsage.rss() / 1024 / 1024);
const perService = Math.round((process.memoryUsage.rss() - before) / 1000 / 1024);
for (const s of services) await s.stop();
await registry.close();

console.log(
  `Start-up and memory (node ${process.version}, median of ${RUNS} runs; steady: one run idle ${STEADY} s)\n`,
);
console.log(
  "| runtime | service | process start to first answered call, ms | RSS 1 s after start, MB | RSS idle ${STEADY} s, MB |"
    .replace("${STEADY}", String(STEADY)),
);
console.log("|---|---|---:|---:|---:|");
for (const r of rows) {
  console.log(`| ${r.runtime} | ${r.transport} | ${r.firstCallMs ?? "-"} | ${r.idleRssMB} | ${r.steadyRssMB} |`);
}
console.log(
  `\n1,000 services in one process (memory transport): started in ${Math.round(startMs)} ms, ` +
    `each answered a call: ${allAnswered}, RSS ${rss1000} MB (~${perService} KB per service)`,
);
console.log(
  JSON.stringify({
    bench: "startup",
    steadySeconds: STEADY,
    rows,
    thousand: { startMs: Math.round(startMs), allAnswered, rssMB: rss1000, perServiceKB: perService },
  }),
);
