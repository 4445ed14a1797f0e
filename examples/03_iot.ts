/**
 * 03 — IoT: sensor services on three hosts talk over MQTT. Each sensor takes readings in a
 * periodic task; a controller asks one sensor by `topic.host`, fans a `calibrate` out to all,
 * and prints the registry's view of who is up. The devices hold no database: a conductor owns
 * the registry file (services.db in a temporary folder) and they reach it over the broker with
 * `conductor:`, as `--registry_url=conductor:` does on the command line.
 *
 * Runs on an embedded broker by default, or on MQTT_URL (e.g. a Mosquitto) when it is set:
 *   npx tsx examples/03_iot.ts
 *   MQTT_URL=mqtt://127.0.0.1:1883 deno run -A examples/03_iot.ts
 */

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { isUp, Manager, openRegistry, periodicTask, RequestContext, Service } from "../index.ts";
import { createConductor } from "../registry/conductor.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MqttTransport, type MqttTransportOptions } from "../transports/mqtt.ts";

class SensorManager extends Manager {
  #offset = 0;
  readings: number[] = [];

  // Every tick of the periodic loop: take a reading (a made-up temperature).
  @periodicTask()
  takeReading(_ctx: RequestContext) {
    const value = 20 + (this.host.length % 3) + Math.round(Math.random() * 10) / 10 + this.#offset;
    this.readings.push(value);
  }

  latest(_ctx: RequestContext) {
    return { host: this.host, celsius: this.readings.at(-1) ?? null, samples: this.readings.length };
  }

  calibrate(_ctx: RequestContext, { offset }: { offset: number }) {
    this.#offset = offset;
    console.log(`  [sensor@${this.host}] calibrated with offset ${offset}`);
  }
}

const broker = process.env.MQTT_URL ? undefined : await EmbeddedBroker.start();
const mqtt: MqttTransportOptions = broker ? broker.transportOptions() : { url: process.env.MQTT_URL };
console.log(`Broker: ${broker ? `embedded (aedes) at ${broker.url}` : process.env.MQTT_URL}`);

const prefix = `iot-demo-${crypto.randomUUID().slice(0, 6)}`; // runs on a shared broker never mix

// The conductor: the only process that opens the registry file.
const dir = mkdtempSync(join(tmpdir(), "novalet-iot-"));
const file = await openRegistry(`sqljs:${join(dir, "services.db")}`);
const conductorTransport = await MqttTransport.connect(mqtt);
const conductor = createConductor({ registry: file, host: "gateway", transport: conductorTransport, prefix });
for (const s of conductor) await s.start();
console.log(`Conductor: serving ${join(dir, "services.db")} on topic "conductor"`);

const sensors: Service[] = [];
for (const host of ["greenhouse", "cellar", "attic"]) {
  // One connection per device, as separate devices would have.
  const transport = await MqttTransport.connect(mqtt);
  const registry = await openRegistry("conductor:", { transport, prefix });
  const svc = Service.create({
    host,
    binary: "nova-sensor",
    manager: SensorManager,
    transport,
    registry,
    prefix,
    reportInterval: 0.5,
    periodicInterval: 0.1,
    periodicFuzzyDelay: 0,
  });
  await svc.start();
  sensors.push(svc);
}

const controllerTransport = await MqttTransport.connect(mqtt);
const registry = await openRegistry("conductor:", { transport: controllerTransport, prefix });
const controller = Service.create({
  host: "hub",
  binary: "nova-controller",
  manager: class ControllerManager extends Manager {},
  transport: controllerTransport,
  registry,
  prefix,
  periodicFuzzyDelay: 0,
});
await controller.start();
const ctx = new RequestContext({ userId: "operator" });

await new Promise((r) => setTimeout(r, 350)); // a few readings
console.log("Controller asks the cellar sensor (sensor.cellar):");
console.log("  ->", await controller.rpc.call(ctx, "sensor.cellar", { method: "latest" }));

console.log("Controller fans `calibrate` out to every sensor:");
await controller.rpc.fanoutCast(ctx, "sensor", { method: "calibrate", args: { offset: -0.5 } });
await new Promise((r) => setTimeout(r, 300));

console.log("\nRegistry (through the conductor): who is up");
for (const s of await registry.list()) {
  console.log(`  ${s.binary.padEnd(20)} ${s.host.padEnd(11)} ${isUp(s, { serviceDownTime: 5 }) ? "up" : "down"}`);
}

for (const s of [controller, ...sensors]) {
  await s.stop();
  await s.registry.close();
  await s.transport.close();
}
for (const s of conductor) await s.stop();
await conductorTransport.close();
await file.close();
rmSync(dir, { recursive: true, force: true });
await broker?.close();
