/**
 * The broker of the MQTT tests: Mosquitto (or any MQTT 5 broker) at MQTT_URL when it is set —
 * then an unreachable broker fails the tests — else an embedded aedes broker on a free port.
 */

import process from "node:process";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MqttTransport, type MqttTransportOptions } from "../transports/mqtt.ts";
import type { TransportFixture } from "./transport_conformance.ts";
import { MemoryLogger } from "./helpers.ts";

export const MQTT_URL = process.env.MQTT_URL;
export const EMBEDDED = !MQTT_URL;

/** Why a case cannot run on the embedded broker, or undefined on a real one. */
export const embeddedOnly = (why: string): string | undefined => EMBEDDED ? `embedded aedes broker: ${why}` : undefined;

export const NO_SHARED = embeddedOnly("MQTT 3.1.1 and no shared subscriptions (set MQTT_URL to run it)");
/** aedes served from Deno's node:net stalls on packets of a few hundred KiB (Node is fine). */
export const BIG_STALLS = "Deno" in globalThis
  ? embeddedOnly("under Deno aedes stalls on packets over ~256 KiB (set MQTT_URL to run it)")
  : undefined;
export const NO_V5 = embeddedOnly("MQTT 3.1.1 has no 'no matching subscribers' reason code (set MQTT_URL to run it)");

/** Start (or point at) the broker; `open()` makes a transport with extra options. */
export async function mqttFixture(extra: Partial<MqttTransportOptions> = {}): Promise<
  TransportFixture & { url: string; options(): MqttTransportOptions }
> {
  const broker = EMBEDDED ? await EmbeddedBroker.start() : undefined;
  const base: MqttTransportOptions = broker ? broker.transportOptions() : { url: MQTT_URL };
  const options = () => ({ ...base, logger: new MemoryLogger(), ...extra });
  return {
    url: base.url!,
    options,
    open: () => MqttTransport.connect(options()),
    close: async () => await broker?.close(),
  };
}
