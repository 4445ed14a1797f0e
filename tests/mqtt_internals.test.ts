/** The mqtt.js internals the MQTT transport relies on, and the check that names a missing one. */
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import mqtt, { type MqttClient } from "mqtt";
import { beforeReplay, checkInternals, MQTTJS_RANGE } from "../transports/mqtt-internals.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { sleep, waitFor } from "./helpers.ts";

/** A client that is never connected: mqtt.js makes it without a socket or a timer (and has
 * nothing for `end()` to close). */
const idle = (): MqttClient => mqtt.connect("mqtt://127.0.0.1:1", { manualConnect: true });

describe("checkInternals()", () => {
  it("passes on the installed mqtt.js's client", () => {
    checkInternals(idle());
  });

  it("names exactly what a client lacks, and the mqtt.js version needed", () => {
    const fake = { sendPing() {}, outgoing: {}, disconnecting: false } as unknown as MqttClient;
    assert.throws(() => checkInternals(fake), (e: Error) => {
      assert.ok(e instanceof TypeError);
      assert.match(e.message, /no _sendPacket \(function\):/);
      assert.ok(!/sendPing|outgoing|disconnecting/.test(e.message), e.message);
      assert.ok(e.message.includes(`mqtt.js ${MQTTJS_RANGE}`), e.message);
      return true;
    });
    assert.throws(() => checkInternals({} as MqttClient), /_sendPacket \(function\), sendPing \(function\), outgoing/);
  });

  it("runs when MqttTransport.connect() is given a client", async () => {
    const client = idle();
    delete (client as unknown as Record<string, unknown>).outgoing;
    await assert.rejects(MqttTransport.connect({ client }), /has no outgoing \(object\): .*mqtt\.js ~5\.16/);
  });
});

describe("beforeReplay()", () => {
  it("runs on a new connection once mqtt.js says connected, and holds its stored packets and `connect` until it settles", async () => {
    const broker = await EmbeddedBroker.start();
    const client = mqtt.connect(broker.url, { protocolVersion: 4, manualConnect: true, reconnectPeriod: 0 });
    try {
      const events: string[] = [];
      let release!: () => void;
      beforeReplay(client, () => {
        events.push(`hook, connected: ${client.connected}`);
        return new Promise<void>((r) => (release = r));
      });
      const sent = client.publishAsync("nvt/replay", "stored", { qos: 1 }); // not connected: into the store
      client.on("packetsend", (p) => void (p.cmd === "publish" && events.push("publish")));
      client.on("connect", () => void events.push("connect"));
      client.connect();
      await waitFor(() => events.length > 0, "the hook");
      await sleep(50);
      assert.deepEqual(events, ["hook, connected: true"], "nothing sent while the hook's promise is pending");
      release();
      await sent;
      await waitFor(() => events.includes("connect"), "connect");
      assert.deepEqual(events, ["hook, connected: true", "publish", "connect"]);
    } finally {
      await client.endAsync();
      await broker.close();
    }
  });
});
