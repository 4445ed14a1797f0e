/**
 * novalet over MQTT against raw mqtt.js request/response on the same broker in the same run.
 * The server runs in a child process (bench/mqtt_server.ts), the client here. Broker: MQTT_URL,
 * else a Mosquitto of our own from .ci/mosquitto.conf when the binary exists, else the embedded
 * aedes broker (or when BENCH_BROKER=embedded); the output says which.
 *
 * Run: `npx tsx bench/mqtt.ts` (BENCH_SECONDS=2 per row).
 */

import process from "node:process";
import mqtt from "mqtt";
import { RequestContext, Rpc } from "../index.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { benchBroker } from "./broker.ts";
import { compare, mqttServer, report, type Row, takePeakRss } from "./harness.ts";

const SECONDS = Number(process.env.BENCH_SECONDS ?? 2);
const BURST = Number(process.env.BENCH_BURST ?? 5000);

const broker = await benchBroker();
const { url, embedded } = broker;
const brokerName = broker.name;
const stopBroker = () => broker.stop();

/** A burst of QoS 1 casts sent at once, counted at the receiver: a loss is reported, not hidden. */
async function burst(impl: string, send: () => Promise<unknown>, received: () => Promise<number>): Promise<Row> {
  takePeakRss();
  const t0 = performance.now();
  await Promise.all(Array.from({ length: BURST }, send));
  let got = 0;
  const end = Date.now() + 10_000;
  while (Date.now() < end) {
    got = await received();
    if (got >= BURST) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    scenario: `cast burst of ${BURST}`,
    impl,
    ops: got,
    perSecond: Math.round(got / ((performance.now() - t0) / 1000)),
    p50us: 0,
    p99us: 0,
    peakRssMB: takePeakRss(),
    lost: BURST - got,
  };
}

const rows: Row[] = [];
const s16k = "x".repeat(16 * 1024);
const scenarios = [["add c=1", 1], ["add c=64", 64], ["echo 16 KiB c=16", 16]] as const;
// Steady state, not start-up: 1.5 s of warm-up per implementation and row (after 0.3 s, both raw
// mqtt.js and novalet measured 25-45% fewer calls/s at c=1 than after 2 s on a slow VM), then
// 10 alternating slices per implementation, so a slow spell of the machine hits both alike.
const TIMING = { seconds: SECONDS, warmup: 1.5, rounds: 10 };
// The first row after the servers start (add c=1) warms each implementation up for 4 s: V8 was
// still optimising the novalet server's path (again, after early deopts) up to 2-3 s into a c=1
// load (--trace-opt), and the client process shares mqtt.js's code between both clients. c=1 at
// QoS 0: 0.82-0.89 of raw with 1.5 s (five runs), 0.90-0.93 with 3-4 s (six), 0.93-1.02 with 5 s
// (five).
const FIRST_WARMUP = 4;
// The "cast c=N" rows cast to `tick` (counted apart), so the burst's count at the receiver is its own.
// Each implementation runs SECONDS per row, in slices that alternate with the other's.

/** A raw mqtt.js client: a correlation id in a JSON body, one reply topic per client. */
async function rawClient(prefix: string, qos: 0 | 1) {
  const client = await mqtt.connectAsync(url.split("?")[0]!, { protocolVersion: embedded ? 4 : 5 });
  (client.stream as { setNoDelay?: (b: boolean) => void }).setNoDelay?.(true);
  const replyTo = `${prefix}/reply/${crypto.randomUUID()}`;
  const waiting = new Map<string, (v: unknown) => void>();
  client.on("message", (_t, p) => {
    const r = JSON.parse(p.toString());
    waiting.get(r.id)?.(r.result);
    waiting.delete(r.id);
  });
  await client.subscribeAsync(replyTo, { qos });
  const request = (body: Record<string, unknown>) =>
    new Promise((resolve) => {
      const id = crypto.randomUUID();
      waiting.set(id, resolve);
      client.publish(`${prefix}/req`, JSON.stringify({ id, reply_to: replyTo, ...body }), { qos });
    });
  return { client, request };
}

// Raw mqtt.js and novalet side by side, each with its own server process, in alternating slices.
for (const qos of [0, 1] as const) {
  const rawPrefix = `bench-raw-${crypto.randomUUID().slice(0, 6)}`;
  const nvPrefix = `bench-nv-${crypto.randomUUID().slice(0, 6)}`;
  const stopRaw = await mqttServer(["raw", url, rawPrefix, String(qos)]);
  const stopNv = await mqttServer(["novalet", url, nvPrefix]);
  const raw = await rawClient(rawPrefix, qos);
  const transport = await MqttTransport.connect({ url });
  const rpc = new Rpc(transport, { prefix: nvPrefix, qos });
  const ctx = new RequestContext();
  const rawImpl = `raw mqtt.js QoS ${qos}`;
  const nvImpl = `novalet QoS ${qos}`;
  for (const [i, [name, c]] of scenarios.entries()) {
    const echo = name.startsWith("echo");
    const args = echo ? { s: s16k } : { a: 1, b: 2 };
    const method = echo ? "echo" : "add";
    rows.push(
      ...await compare(name, [
        [rawImpl, () => raw.request(args)],
        [nvImpl, () => rpc.call(ctx, "bench", { method, args })],
      ], { concurrency: c, ...TIMING, warmup: i === 0 ? FIRST_WARMUP : TIMING.warmup }),
    );
  }
  if (qos === 1) {
    // A cast is done once the broker has it (PUBACK): these rows are the hand-over rate.
    for (const c of [1, 64]) {
      rows.push(
        ...await compare(`cast c=${c}`, [
          [rawImpl, () => raw.client.publishAsync(`${rawPrefix}/tick`, "{}", { qos: 1 })],
          [nvImpl, () => rpc.cast(ctx, "bench", { method: "tick" })],
        ], { concurrency: c, ...TIMING }),
      );
    }
    rows.push(
      await burst(
        rawImpl,
        () => raw.client.publishAsync(`${rawPrefix}/cast`, "{}", { qos: 1 }),
        async () => (await raw.request({ op: "count" })) as number,
      ),
      await burst(
        nvImpl,
        () => rpc.cast(ctx, "bench", { method: "count" }),
        () => rpc.call<number>(ctx, "bench", { method: "received" }),
      ),
    );
  }
  await raw.client.endAsync();
  await rpc.close();
  await transport.close();
  await Promise.all([stopRaw(), stopNv()]);
}
await stopBroker();

const ratios: Record<string, number> = {};
for (const qos of [0, 1]) {
  for (const [name] of scenarios) {
    const raw = rows.find((r) => r.scenario === name && r.impl === `raw mqtt.js QoS ${qos}`);
    const nv = rows.find((r) => r.scenario === name && r.impl === `novalet QoS ${qos}`);
    if (raw && nv) ratios[`${name} QoS ${qos}`] = Number((nv.perSecond / raw.perSecond).toFixed(3));
  }
}
report("mqtt", `novalet over MQTT vs raw mqtt.js, broker: ${brokerName}, ${SECONDS} s per row`, rows, {
  broker: brokerName,
  seconds: SECONDS,
  ratioToRaw: ratios,
});
