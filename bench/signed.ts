/**
 * What signed envelopes cost (keys.ts): novalet calls over MQTT, signed against unsigned, in
 * alternating slices of the same run. Each server is a child process (bench/mqtt_server.ts), one
 * signing with an HMAC key file, one plain; the client here holds one Rpc of each kind. A third
 * row signs with an Ed25519 key, to show why operators' keys stay off the call path. Each row has
 * the CPU time per call of this process and of its server. A last scenario batches the calls to the
 * shared topic too (`batch: "all"`), unsigned and HMAC. Broker as in bench/mqtt.ts.
 *
 * Run: `npx tsx bench/signed.ts` (BENCH_SECONDS=2 per row).
 */

import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { RequestContext, Rpc } from "../index.ts";
import { generateKey, publicPart, SignedCodec } from "../keys.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { benchBroker } from "./broker.ts";
import { compare, mqttServer, report, type Row } from "./harness.ts";

const SECONDS = Number(process.env.BENCH_SECONDS ?? 2);
const broker = await benchBroker();
const dir = await mkdtemp(join(tmpdir(), "novalet-bench-keys-"));

const fleet = generateKey("fleet", "hmac");
const ops = generateKey("ops", "ed25519");
const hmacFile = join(dir, "hmac.json");
const edFile = join(dir, "ed.json");
await writeFile(hmacFile, JSON.stringify({ sign: "fleet", keys: [fleet, publicPart(ops)] }));
await writeFile(edFile, JSON.stringify({ sign: "ops", keys: [fleet, ops] }));

const tag = crypto.randomUUID().slice(0, 6);
const kinds = [
  { impl: "unsigned", prefix: `bench-plain-${tag}`, keys: undefined },
  { impl: "signed, HMAC-SHA256", prefix: `bench-hmac-${tag}`, keys: hmacFile },
  { impl: "signed, Ed25519", prefix: `bench-ed-${tag}`, keys: edFile },
];
const stops = await Promise.all(
  kinds.map((k) => mqttServer(["novalet", broker.url, k.prefix, ...(k.keys ? [k.keys] : [])])),
);
const transport = await MqttTransport.connect({ url: broker.url });
const ctx = new RequestContext();
const rpcs = (batch?: "all") =>
  Promise.all(kinds.map(async (k) => {
    const codec = k.keys ? await SignedCodec.fromFile(k.keys, { prefix: k.prefix }) : undefined;
    return new Rpc(transport, { prefix: k.prefix, codec, batch });
  }));
const clients = await rpcs();
// Calls to the shared topic batched too (one signature per turn's requests), unsigned and HMAC.
const batching = await rpcs("all");
const add = (rpc: Rpc) => () => rpc.call(ctx, "bench", { method: "add", args: { a: 1, b: 2 } });
const op = (i: number) => add(clients[i]!);

const rows: Row[] = [];
const ratios: Record<string, number> = {};
/** One scenario: its rows, and each signed variant's calls per second as a share of the first's. */
async function measure(name: string, concurrency: number, impls: [string, () => Promise<unknown>][]): Promise<void> {
  const got = await compare(name, impls, {
    concurrency,
    seconds: SECONDS,
    warmup: 1.5,
    rounds: 10,
    servers: stops.map((s) => s.pid),
  });
  rows.push(...got);
  for (const [i, label] of ["HMAC", "Ed25519"].entries()) {
    if (got[i + 1]) ratios[`${name} ${label}`] = Number((got[i + 1]!.perSecond / got[0]!.perSecond).toFixed(3));
  }
}
for (const [name, c] of [["add c=1", 1], ["add c=64", 64]] as const) {
  await measure(name, c, [["unsigned", op(0)], [kinds[1]!.impl, op(1)], [kinds[2]!.impl, op(2)]]);
}
await measure("add c=64, batch all", 64, [["unsigned", add(batching[0]!)], [kinds[1]!.impl, add(batching[1]!)]]);
for (const c of [...clients, ...batching]) await c.close();
await transport.close();
await Promise.all(stops.map((s) => s()));
await broker.stop();
await rm(dir, { recursive: true, force: true });

report(
  "signed",
  `Signed against unsigned calls over MQTT (QoS 1), broker: ${broker.name}, ${SECONDS} s per row`,
  rows,
  {
    broker: broker.name,
    seconds: SECONDS,
    ratioToUnsigned: ratios,
  },
);
