import { transportConformance } from "./transport_conformance.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { MqttTransport } from "../transports/mqtt.ts";
import { uniquePrefix } from "./helpers.ts";
import { BIG_STALLS, embeddedOnly, mqttFixture, NO_SHARED, NO_V5 } from "./mqtt_fixture.ts";

transportConformance("mqtt", () => mqttFixture(), {
  group: NO_SHARED,
  groupAndPlain: NO_SHARED,
  mandatory: NO_V5,
  bytes: BIG_STALLS,
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
