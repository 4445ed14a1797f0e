import { transportConformance } from "./transport_conformance.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { MqttTransport } from "../transports/mqtt.ts";
import { sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";
import { DeliveryError } from "../index.ts";
import { BIG_STALLS, embeddedOnly, mqttFixture, NO_SHARED, NO_V5 } from "./mqtt_fixture.ts";

transportConformance("mqtt", () => mqttFixture(), {
  group: NO_SHARED,
  groupAndPlain: NO_SHARED,
  mandatory: NO_V5,
  bytes: BIG_STALLS,
  publishLocal: "messages cross processes as bytes: MqttTransport has no publishLocal()",
});

// Deno + aedes cannot carry 1 MiB (see BIG_STALLS): the huge inputs are 200 KB there.
rpcSuite("mqtt", () => mqttFixture(), { spread: NO_SHARED, undeliverable: NO_V5 }, BIG_STALLS ? 200_000 : undefined);

describe("MQTT subscription identifiers", {
  skip: embeddedOnly("MQTT 3.1.1 has no subscription identifiers (set MQTT_URL to run it)"),
}, () => {
  it("are sent only for filters that overlap on one connection, the earlier one subscribed again with one", async () => {
    const fx = await mqttFixture();
    const t = await MqttTransport.connect(fx.options());
    try {
      const p = uniquePrefix("ids");
      const sent: string[] = [];
      t.client.on("packetsend", (packet) => {
        if (packet.cmd !== "subscribe") return;
        const tag = packet.properties?.subscriptionIdentifier === undefined ? "-" : "id";
        for (const s of packet.subscriptions) sent.push(`${s.topic.replace(`${p}/`, "")} ${tag}`);
      });
      const none = () => {};
      await t.subscribe(`${p}/a/x`, none);
      await t.subscribe(`${p}/b`, none);
      await t.subscribe(`${p}/c`, none, { group: "g" });
      assert.deepEqual(sent, ["a/x -", "b -", "$share/g/c -"], "no overlap, no identifiers");
      sent.length = 0;
      await t.subscribe(`${p}/a/+`, none);
      await t.subscribe(`${p}/c`, none); // the same filter as the group's
      assert.deepEqual(sent, ["a/x id", "a/+ id", "$share/g/c id", "c id"]);
    } finally {
      await t.close();
      await fx.close?.();
    }
  });
});

describe("MqttTransport.publish() while the connection is down", () => {
  it("rejects a QoS 0 message at once (nothing is claimed as sent) and sends a QoS 1 one on reconnecting", async () => {
    const fx = await mqttFixture({ reconnectMin: 0.1 });
    const t = await MqttTransport.connect(fx.options());
    try {
      const p = uniquePrefix("down");
      const got: string[] = [];
      await t.subscribe(`${p}/x`, (payload) => void got.push(text(payload)), { qos: 1 });
      assert.equal(await t.publish(`${p}/x`, utf8("up"), { qos: 0 }), undefined);
      await waitFor(() => got.includes("up"), "the QoS 0 message while connected");

      const closed = new Promise<void>((r) => t.client.once("close", () => r()));
      (t.client.stream as { destroy(): void }).destroy();
      await closed;
      await assert.rejects(t.publish(`${p}/x`, utf8("lost"), { qos: 0 }), (e: Error) => {
        assert.ok(e instanceof DeliveryError, `${e}`);
        assert.match(e.message, new RegExp(`Cannot publish to ${p}/x: No connection to broker`));
        return true;
      });
      let settled = false;
      const later = t.publish(`${p}/x`, utf8("kept"), { qos: 1 }).finally(() => (settled = true));
      await sleep(20);
      if (!t.client.connected) assert.equal(settled, false, "a QoS 1 message waits for the connection and its PUBACK");
      await later; // stored by mqtt.js, sent and acknowledged once connected again
      assert.ok(t.client.connected);
      // Sent again only once the subscription was made again: it reaches our own handler.
      await waitFor(() => got.includes("kept"), "the stored QoS 1 message");
      // The transport subscribes again after the reconnect, asynchronously: QoS 0 until one arrives.
      for (let n = 0; !got.includes("again"); n++) {
        assert.ok(n < 100, "a QoS 0 message after the reconnect within 5 s");
        assert.equal(await t.publish(`${p}/x`, utf8("again"), { qos: 0 }), undefined);
        await sleep(50);
      }
      assert.ok(!got.includes("lost"), "the rejected message was not sent");
    } finally {
      await t.close();
      await fx.close?.();
    }
  });
});
