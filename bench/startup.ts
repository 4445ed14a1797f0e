/**
 * Start-up and memory: time from process start to the first answered call and the RSS of an
 * idle service (memory transport and MQTT), and 1,000 services in one process on the memory
 * transport.
 *
 * Run: `npx tsx bench/startup.ts` (MQTT: MQTT_URL, else an own Mosquitto, else the embedded broker).
 */
import { execFile } from "node:child_process";
import process from "node:process";
import { Manager, openRegistry, RequestContext, Service } from "../mod.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MOSQUITTO, Mosquitto } from "../tests/mosquitto.ts";

const RUNS = Number(process.env.BENCH_RUNS ?? 3);

function child(url: string): Promise<{ firstCallMs: number; idleRssMB: number }> {
  const script = new URL("./startup_child.ts", import.meta.url).pathname;
  return new Promise((resolve, reject) => {
    execFile(process.execPath, ["--expose-gc", "--import", "tsx", script, url], (err, stdout) => {
      if (err) reject(err);
      else resolve(JSON.parse(stdout.trim().split("\n").pop()!));
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

const rows: { transport: string; firstCallMs: number; idleRssMB: number }[] = [];
for (const [name, url] of [["memory", "memory://"], [`mqtt (${broker})`, mqttUrl]] as const) {
  const runs: { firstCallMs: number; idleRssMB: number }[] = [];
  for (let i = 0; i < RUNS; i++) runs.push(await child(url));
  const med = (k: "firstCallMs" | "idleRssMB") =>
    runs.map((r) => r[k]).sort((a, b) => a - b)[Math.floor(runs.length / 2)]!;
  rows.push({ transport: name, firstCallMs: Math.round(med("firstCallMs")), idleRssMB: Math.round(med("idleRssMB")) });
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

console.log(`Start-up and memory (node ${process.version}, median of ${RUNS} runs)\n`);
console.log("| transport | process start to first answered call, ms | idle service RSS, MB |");
console.log("|---|---:|---:|");
for (const r of rows) console.log(`| ${r.transport} | ${r.firstCallMs} | ${r.idleRssMB} |`);
console.log(
  `\n1,000 services in one process (memory transport): started in ${Math.round(startMs)} ms, ` +
    `each answered a call: ${allAnswered}, RSS ${rss1000} MB (~${perService} KB per service)`,
);
console.log(
  JSON.stringify({
    bench: "startup",
    rows,
    thousand: { startMs: Math.round(startMs), allAnswered, rssMB: rss1000, perServiceKB: perService },
  }),
);
