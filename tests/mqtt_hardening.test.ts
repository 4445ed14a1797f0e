/**
 * The MQTT transport under edges that lose or wedge things: a subscription removed while the
 * broker is still delivering to it.
 */
import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { MqttTransport, type MqttTransportOptions } from "../transports/mqtt.ts";
import { sleep, uniquePrefix, waitFor } from "./helpers.ts";
import { mqttFixture, NO_SHARED } from "./mqtt_fixture.ts";

/** A numbered message: 4 bytes, big-endian. */
const numbered = (n: number): Uint8Array => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
};
const numberOf = (b: Uint8Array): number => new DataView(b.buffer, b.byteOffset, b.byteLength).getUint32(0);

/** Publish the numbered QoS 1 messages [from, to) as a stream: bursts of `burst`, a short pause
 * between them. Resolves once the broker has acknowledged every one. */
async function stream(t: MqttTransport, topic: string, from: number, to: number, burst: number) {
  const sends: Promise<void>[] = [];
  for (let i = from; i < to; i++) {
    sends.push(t.publish(topic, numbered(i), { qos: 1 }));
    if ((i - from) % burst === burst - 1) await sleep(1);
  }
  await Promise.all(sends);
}

/** The numbers in [0, n) that `counts` never saw. */
const missing = (counts: Uint16Array): number[] => [...counts.keys()].filter((i) => counts[i] === 0);

describe("MQTT transport: removing a subscription loses no acknowledged message", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>>;
  let opened: MqttTransport[] = [];
  before(async () => {
    fx = await mqttFixture();
  });
  after(async () => await fx.close?.());
  afterEach(async () => {
    for (const t of opened.reverse()) await t.close();
    opened = [];
  });
  const connect = async (extra: Partial<MqttTransportOptions> = {}) => {
    const t = await MqttTransport.connect({ ...fx.options(), ...extra });
    opened.push(t);
    return t;
  };
  const N = 4000;

  it("unsubscribe() of one group member in the middle of a QoS 1 stream: every message reaches a handler", {
    skip: NO_SHARED,
  }, async () => {
    const topic = `${uniquePrefix("unsub")}/work`;
    const [a, b, pub] = [await connect(), await connect(), await connect()];
    const counts = new Uint16Array(N);
    let leaving = false;
    let afterCall = 0; // messages a's handler took after unsubscribe() was called
    let afterUnsuback = 0; // ... after the broker confirmed it
    let confirmed = false;
    a.client.on("packetreceive", (p) => void (p.cmd === "unsuback" && (confirmed = true)));
    const subA = await a.subscribe(topic, (p) => {
      counts[numberOf(p)]!++;
      if (leaving) afterCall++;
      if (confirmed) afterUnsuback++;
    }, { group: "g", qos: 1 });
    await b.subscribe(topic, (p) => void counts[numberOf(p)]!++, { group: "g", qos: 1 });
    // A steady stream, and in its middle a member that is slow for a moment (a GC pause, a busy
    // CPU: here its socket is not read) while a burst arrives, so that the broker has messages
    // in flight and queued for it when it leaves.
    const socket = a.client.stream as unknown as { pause(): void; resume(): void };
    await stream(pub, topic, 0, N / 2, 200);
    socket.pause();
    await stream(pub, topic, N / 2, N * 3 / 4, N);
    leaving = true;
    const unsubscribed = subA.unsubscribe();
    await sleep(50); // the broker has the UNSUBSCRIBE
    socket.resume();
    await stream(pub, topic, N * 3 / 4, N, 200);
    await unsubscribed;
    const taken = afterCall;
    await waitFor(() => missing(counts).length === 0, "every message", 10_000).catch(() => {});
    const lost = missing(counts);
    assert.deepEqual(
      lost,
      [],
      `${lost.length} of ${N} messages lost; a took ${taken} after unsubscribe(), ${afterUnsuback} after the UNSUBACK`,
    );
    assert.equal(afterCall, taken, "a's handler got nothing after its unsubscribe() resolved");
  });

  it("close() of one group member in the middle of a QoS 1 stream: every message reaches a handler", {
    skip: NO_SHARED,
  }, async () => {
    const topic = `${uniquePrefix("close")}/work`;
    const [a, b, pub] = [await connect(), await connect(), await connect()];
    const counts = new Uint16Array(N);
    await a.subscribe(topic, (p) => void counts[numberOf(p)]!++, { group: "g", qos: 1 });
    await b.subscribe(topic, (p) => void counts[numberOf(p)]!++, { group: "g", qos: 1 });
    const socket = a.client.stream as unknown as { pause(): void; resume(): void };
    await stream(pub, topic, 0, N / 2, 200);
    socket.pause(); // slow for a moment, as above
    await stream(pub, topic, N / 2, N * 3 / 4, N);
    const closed = a.close();
    await sleep(50);
    socket.resume();
    await stream(pub, topic, N * 3 / 4, N, 200);
    await closed;
    await waitFor(() => missing(counts).length === 0, "every message", 10_000).catch(() => {});
    const lost = missing(counts);
    assert.deepEqual(lost, [], `${lost.length} of ${N} messages lost`);
  });

  it("detach() on a persistent session leaves what arrives after it for the next connection", async () => {
    const topic = `${uniquePrefix("detach")}/work`;
    const clientId = `nvt-detach-${crypto.randomUUID().slice(0, 8)}`;
    const [a, pub] = [await connect({ clientId, sessionExpiry: 600 }), await connect()];
    const counts = new Uint16Array(N / 4);
    const n = counts.length;
    const sub = await a.subscribe(topic, (p) => void counts[numberOf(p)]!++, { qos: 1 });
    const socket = a.client.stream as unknown as { pause(): void; resume(): void };
    await stream(pub, topic, 0, n / 2, 100);
    socket.pause();
    await stream(pub, topic, n / 2, n * 3 / 4, n);
    await sub.detach!();
    socket.resume();
    await sleep(100); // what was in flight arrives, with no handler
    await a.close();
    await stream(pub, topic, n * 3 / 4, n, 100); // queued in the session
    const again = await connect({ clientId, sessionExpiry: 600 });
    const sub2 = await again.subscribe(topic, (p) => void counts[numberOf(p)]!++, { qos: 1 });
    await waitFor(() => missing(counts).length === 0, "every message", 10_000).catch(() => {});
    await sub2.unsubscribe(); // leaves nothing in the broker's session
    const lost = missing(counts);
    assert.deepEqual(lost, [], `${lost.length} of ${n} messages lost`);
  });
});
