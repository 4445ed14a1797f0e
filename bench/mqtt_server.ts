/**
 * The server side of bench/mqtt.ts, in its own process:
 *   mqtt_server.ts novalet URL PREFIX [KEYS]   a novalet service "bench" (add, echo, tick, count,
 *                                              received); with KEYS, a key file, it signs (keys.ts)
 *   mqtt_server.ts raw URL PREFIX QOS      raw mqtt.js: answers PREFIX/req with {id, result}
 * Prints READY when subscribed; exits on SIGTERM.
 */
import process from "node:process";
import mqtt from "mqtt";
import { Manager, openRegistry, type RequestContext, Service } from "../index.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { SignedCodec } from "../keys.ts";

const [mode, url, prefix, fourth] = process.argv.slice(2);
if (!url || !prefix) throw new Error("usage: mqtt_server.ts novalet URL PREFIX [KEYS] | raw URL PREFIX [QOS]");
const embedded = url.includes("protocol_version=4");

if (mode === "novalet") {
  let received = 0;
  class BenchManager extends Manager {
    add(_c: RequestContext, { a, b }: { a: number; b: number }) {
      return a + b;
    }
    echo(_c: RequestContext, { s }: { s: string }) {
      return s;
    }
    tick(_c: RequestContext) {}
    count(_c: RequestContext) {
      received++;
    }
    received(_c: RequestContext) {
      return received;
    }
  }
  const transport = await MqttTransport.connect({ url });
  const registry = await openRegistry("sqljs::memory:");
  const codec = fourth ? await SignedCodec.fromFile(fourth, { prefix }) : undefined;
  const svc = Service.create({
    host: "srv",
    topic: "bench",
    manager: BenchManager,
    transport,
    registry,
    prefix,
    codec,
  });
  await svc.start();
  process.on("SIGTERM", async () => {
    await svc.stop();
    await transport.close();
    await registry.close();
    process.exit(0);
  });
} else {
  const qos = Number(fourth ?? 0) as 0 | 1;
  const client = await mqtt.connectAsync(url.split("?")[0]!, { protocolVersion: embedded ? 4 : 5 });
  (client.stream as { setNoDelay?: (b: boolean) => void }).setNoDelay?.(true);
  let casts = 0;
  client.on("message", (topic, payload) => {
    if (topic === `${prefix}/tick`) return;
    if (topic === `${prefix}/cast`) {
      casts++;
      return;
    }
    const req = JSON.parse(payload.toString());
    const result = req.op === "count" ? casts : req.s ?? req.a + req.b;
    client.publish(req.reply_to, JSON.stringify({ id: req.id, result }), { qos });
  });
  await client.subscribeAsync([`${prefix}/req`, `${prefix}/cast`, `${prefix}/tick`], { qos });
  process.on("SIGTERM", async () => {
    await client.endAsync();
    process.exit(0);
  });
}
console.log("READY");
