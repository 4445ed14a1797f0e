import { type Codec, jsonCodec, Manager, openRegistry, RequestContext, Rpc, Service } from "./index.ts";
import { MqttTransport } from "./transports/mqtt.ts";
import { generateKey, SignedCodec } from "./keys.ts";
const url = process.env.MQTT_URL!;
const fleet = generateKey("fleet", "hmac");
class B extends Manager {
  add(_c: RequestContext, { a, b }: { a: number; b: number }) {
    return a + b;
  }
}
const registry = await openRegistry("sqljs::memory:");
const HEAD = Buffer.from('{"sig":"fleet.' + "A".repeat(43) + '","to":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx","m":');
const fake = (): Codec => ({
  encodeRequest: (r, t) => jsonCodec.encodeRequest(r, t),
  decodeRequest: (b, t) => jsonCodec.decodeRequest(b.subarray(HEAD.length, b.length - 1), t),
  encodeReply: (r, t) => jsonCodec.encodeReply(r, t),
  decodeReply: (b, t) => jsonCodec.decodeReply(b.subarray(HEAD.length, b.length - 1), t),
  encodeBatch: (i) => jsonCodec.encodeBatch!(i),
  decodeRequests: (b, t) => jsonCodec.decodeRequests!(b.subarray(HEAD.length, b.length - 1), t),
  decodeReplies: (b, t) => jsonCodec.decodeReplies!(b.subarray(HEAD.length, b.length - 1), t),
  seal: (b) => Buffer.concat([HEAD, b, Buffer.from("}")]),
});
const kinds: Record<string, (p: string) => Codec | undefined> = {
  plain: () => undefined,
  pad: () => undefined,
  sealOnly: () => ({
    ...fake(),
    decodeRequest: jsonCodec.decodeRequest,
    decodeRequests: jsonCodec.decodeRequests,
    decodeReply: jsonCodec.decodeReply,
    decodeReplies: jsonCodec.decodeReplies,
    seal: (b: Uint8Array) => Buffer.concat([b]),
  }),
  fake: () => fake(),
  signed: (p) => new SignedCodec({ sign: "fleet", keys: [fleet] }, { prefix: p }),
};
const rpcs: Record<string, Rpc> = {};
for (const [k, mk] of Object.entries(kinds)) {
  const prefix = k + Date.now();
  const svc = Service.create({
    host: "h",
    topic: "bench",
    manager: B,
    transport: await MqttTransport.connect({ url }),
    registry,
    prefix,
    codec: mk(prefix),
  });
  await svc.start();
  rpcs[k] = new Rpc(await MqttTransport.connect({ url }), { prefix, codec: mk(prefix) });
}
const ctx = new RequestContext();
const PAD = "x".repeat(100);
async function run(rpc: Rpc, ms: number, pad = false) {
  let n = 0;
  const end = performance.now() + ms;
  while (performance.now() < end) {
    await rpc.call(ctx, "bench", { method: "add", args: pad ? { a: 1, b: 2, pad: PAD } : { a: 1, b: 2 } });
    n++;
  }
  return n;
}
const tot: Record<string, number> = Object.fromEntries(Object.keys(kinds).map((k) => [k, 0]));
for (const k of Object.keys(rpcs)) await run(rpcs[k]!, 1000);
for (let r = 0; r < 10; r++) {
  for (const k of (r % 2 ? Object.keys(rpcs).reverse() : Object.keys(rpcs))) {
    tot[k]! += await run(rpcs[k]!, 400, k === "pad");
  }
}
console.log(Object.fromEntries(Object.entries(tot).map(([k, v]) => [k, Math.round(v / 4)])));
process.exit(0);
