/** The broker the MQTT benchmarks run against. */

import process from "node:process";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MOSQUITTO, Mosquitto } from "../tests/mosquitto.ts";

/** The broker of a benchmark: MQTT_URL, else a Mosquitto of our own (.ci/mosquitto.conf) when the
 * binary exists, else the embedded aedes broker (or with BENCH_BROKER=embedded). */
export async function benchBroker(): Promise<{ url: string; name: string; embedded: boolean; stop(): Promise<void> }> {
  if (process.env.MQTT_URL) {
    return {
      url: process.env.MQTT_URL,
      name: `MQTT_URL ${process.env.MQTT_URL}`,
      embedded: false,
      stop: async () => {},
    };
  }
  if (MOSQUITTO && process.env.BENCH_BROKER !== "embedded") {
    const m = await Mosquitto.start();
    return { url: m.url, name: "Mosquitto (own instance, .ci/mosquitto.conf)", embedded: false, stop: () => m.stop() };
  }
  const b = await EmbeddedBroker.start();
  return {
    url: `${b.url}?protocol_version=4&shared=false`,
    name: "embedded (aedes, MQTT 3.1.1)",
    embedded: true,
    stop: () => b.close(),
  };
}
