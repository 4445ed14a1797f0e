/**
 * 03 — IoT: sensor services on three hosts talk over MQTT. Each sensor takes readings in a
 * periodic task; a controller asks one sensor by `topic.host`, fans a `calibrate` out to all,
 * and prints the registry's view of who is up.
 *
 * Runs on an embedded broker by default, or on MQTT_URL (e.g. a Mosquitto) when it is set:
 *   npx tsx examples/03_iot.ts
 *   MQTT_URL=mqtt://127.0.0.1:1883 deno run -A examples/03_iot.ts
 */

import process from "node:process";
import { isUp, Manager, openRegistry, periodicTask, RequestContext, Service } from "../index.ts";
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

const registry = await openRegistry("sqljs::memory:");
const prefix = `iot-demo-${crypto.randomUUID().slice(0, 6)}`; // runs on a shared broker never mix
const sensors: Service[] = [];
for (const host of ["greenhouse", "cellar", "attic"]) {
  // One connection per device, as separate devices would have.
  const transport = await MqttTransport.connect(mqtt);
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

console.log("\nRegistry: who is up");
for (const s of await registry.list()) {
  console.log(`  ${s.binary.padEnd(16)} ${s.host.padEnd(11)} ${isUp(s, { serviceDownTime: 5 }) ? "up" : "down"}`);
}

for (const s of [controller, ...sensors]) {
  await s.stop();
  await s.transport.close();
}
await registry.close();
await broker?.close();
