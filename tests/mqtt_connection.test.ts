/**
 * Retained messages and sibling connections with a Will (MqttTransport.connection()): on the
 * embedded aedes broker, or on the broker at MQTT_URL.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import process from "node:process";
import mqtt from "mqtt";
import { MqttTransport, willKeepalive } from "../transports/mqtt.ts";
import { childCommand, MemoryLogger, sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";
import { EMBEDDED, mqttFixture } from "./mqtt_fixture.ts";

type Fixture = Awaited<ReturnType<typeof mqttFixture>>;
const CHILD = new URL("./fixtures/mqtt_will_child.ts", import.meta.url).pathname;
const EMPTY = new Uint8Array(0);

/** What a filter receives, with the time each message arrived. */
async function watch(t: MqttTransport, filter: string) {
  const got: { body: string; at: number }[] = [];
  await t.subscribe(filter, (b) => void got.push({ body: text(b), at: performance.now() }), { qos: 1 });
  return got;
}

/** A child that opens a transport and a sibling with `will`, as a separate process would. */
async function willChild(fx: Fixture, will: { topic: string; payload: string; retain?: boolean }, keepalive?: number) {
  const { url, protocolVersion, sharedSubscriptions } = fx.options();
  const opts = JSON.stringify({ url, protocolVersion, sharedSubscriptions, keepalive });
  const [cmd, ...args] = childCommand(CHILD, [opts, JSON.stringify(will)]);
  const child = spawn(cmd!, args, { stdio: ["pipe", "pipe", "inherit"] });
  let out = "";
  child.stdout!.setEncoding("utf8").on("data", (d: string) => void (out += d));
  let done = false;
  const exited = new Promise<void>((r) => child.once("exit", () => r(void (done = true))));
  await waitFor(() => out.includes("READY") || child.exitCode !== null, "the child's connection", 30_000);
  assert.ok(out.includes("READY"), `the child connected (exit code ${child.exitCode})`);
  return { child, exited, running: () => !done, output: () => out };
}

/** SIGKILL (also a stopped child) and wait for the exit: no test leaves a process behind. */
async function reap(
  c: { child: ChildProcess; exited: Promise<void>; running(): boolean } | undefined,
): Promise<void> {
  if (!c) return;
  // By the exit event and process.kill(): Deno takes a signal sent with child.kill() as its end.
  if (c.running()) process.kill(c.child.pid!, "SIGKILL");
  await c.exited;
}

describe("MqttTransport retained messages and connection({ will })", () => {
  let fx: Fixture;
  let parent: MqttTransport;
  let watcher: MqttTransport;
  before(async () => {
    fx = await mqttFixture();
    parent = await MqttTransport.connect(fx.options());
    watcher = await MqttTransport.connect(fx.options());
  });
  after(async () => {
    await watcher?.close();
    await parent?.close();
    await fx?.close?.();
  });

  it("a retained message reaches a later subscriber; an empty retained publish clears it", async () => {
    const p = uniquePrefix("ret");
    try {
      await parent.publish(`${p}/r`, utf8("v1"), { qos: 1, retain: true });
      await parent.publish(`${p}/plain`, utf8("gone"), { qos: 1 });
      const later = await MqttTransport.connect(fx.options());
      try {
        const got = await watch(later, `${p}/+`);
        await waitFor(() => got.length === 1, "the retained message");
        await sleep(100);
        assert.deepEqual(got.map((m) => m.body), ["v1"], "only the retained message is handed over");
      } finally {
        await later.close();
      }
      await parent.publish(`${p}/r`, EMPTY, { qos: 1, retain: true });
      const after = await MqttTransport.connect(fx.options());
      try {
        const got = await watch(after, `${p}/+`);
        await parent.publish(`${p}/end`, utf8("end"), { qos: 1 });
        await waitFor(() => got.length >= 1, "the end marker");
        await sleep(100);
        assert.deepEqual(got.map((m) => m.body), ["end"], "the retained message was cleared");
      } finally {
        await after.close();
      }
    } finally {
      await parent.publish(`${p}/r`, EMPTY, { qos: 1, retain: true });
    }
  });

  it("a killed process's sibling connection has its Will published, retained when asked", async () => {
    const p = uniquePrefix("will");
    const got = await watch(watcher, `${p}/will`);
    let c: Awaited<ReturnType<typeof willChild>> | undefined;
    try {
      c = await willChild(fx, { topic: `${p}/will`, payload: "gone", retain: true });
      await sleep(200);
      assert.equal(got.length, 0, "no Will while the process lives");
      const killed = performance.now();
      process.kill(c.child.pid!, "SIGKILL");
      await waitFor(() => got.length === 1, "the Will after SIGKILL", 5000);
      console.log(`Will after SIGKILL: ${(got[0]!.at - killed).toFixed(1)} ms`);
      assert.equal(got[0]!.body, "gone");
      // Retained: a later subscriber learns it too.
      const later = await MqttTransport.connect(fx.options());
      try {
        const kept = await watch(later, `${p}/will`);
        await waitFor(() => kept.length === 1, "the retained Will");
        assert.equal(kept[0]!.body, "gone");
      } finally {
        await later.close();
      }
    } finally {
      await reap(c);
      await parent.publish(`${p}/will`, EMPTY, { qos: 1, retain: true });
    }
  });

  it("a clean close() publishes no Will, in a child process and in this one", async () => {
    const p = uniquePrefix("clean");
    const got = await watch(watcher, `${p}/will`);
    let c: Awaited<ReturnType<typeof willChild>> | undefined;
    try {
      c = await willChild(fx, { topic: `${p}/will`, payload: "child" });
      c.child.stdin!.write("close\n");
      await c.exited;
      assert.equal(c.child.exitCode, 0);
      assert.match(c.output(), /CLOSED/);
      const live = await parent.connection({ will: { topic: `${p}/will`, payload: utf8("here") } });
      await live.close();
      await sleep(1000);
      assert.deepEqual(got, [], "no Will after a clean close");
    } finally {
      await reap(c);
    }
  });

  it("the Will stays set across reconnects; the sibling and its parent close independently", async () => {
    const p = uniquePrefix("flap");
    const got = await watch(watcher, `${p}/will`);
    const own = await MqttTransport.connect({ ...fx.options(), reconnectMin: 0.05 });
    const live = await own.connection({ will: { topic: `${p}/will`, payload: utf8("lost"), qos: 1 } });
    try {
      assert.match(live.clientId, new RegExp(`^${own.clientId}-live-[0-9a-f]{8}$`));
      assert.equal(live.persistent, false);
      assert.equal(live.client.options.reconnectPeriod, 50, "the parent's reconnect settings");
      for (let i = 1; i <= 2; i++) {
        const connected = new Promise<void>((r) => live.client.once("connect", () => r()));
        (live.client.stream as { destroy(): void }).destroy();
        await waitFor(() => got.length === i, `the Will after dropped connection ${i}`);
        await connected;
      }
      assert.deepEqual(got.map((m) => m.body), ["lost", "lost"]);
      // Closing the parent leaves the sibling working, and the other way round.
      await own.close();
      const echo = await watch(live, `${p}/echo`);
      await parent.publish(`${p}/echo`, utf8("still"), { qos: 1 });
      await waitFor(() => echo.length === 1, "a message on the sibling after its parent closed");
      const second = await parent.connection({});
      await second.close();
      assert.equal(parent.client.connected, true, "closing a sibling leaves its parent open");
    } finally {
      await live.close();
      await own.close();
    }
    await sleep(300);
    assert.equal(got.length, 2, "the last close() was clean");
  });

  it("two transports with one client id back off instead of taking the session from each other twice a second", async () => {
    const clientId = `novalet-${uniquePrefix("twin")}`;
    const { url, ...rest } = fx.options();
    const persistent = url!.includes("?") ? `${url}&session_expiry=60` : `${url}?session_expiry=60`;
    const logs = [new MemoryLogger(), new MemoryLogger()];
    const [a, b] = [
      await MqttTransport.connect({ ...rest, url: persistent, clientId, logger: logs[0] }),
      await MqttTransport.connect({ ...rest, url: persistent, clientId, logger: logs[1] }),
    ];
    let connects = 0;
    a.client.on("connect", () => connects++);
    b.client.on("connect", () => connects++);
    try {
      await sleep(6000);
      // Without the backoff: 11 in 6 s on Mosquitto (each reconnects 0.5 s after being pushed off);
      // with it, 5.
      assert.ok(connects <= 7, `${connects} connects in 6 s`);
      assert.ok(logs.some((l) => l.has("warn", /another client connected as/)), "the warning");
    } finally {
      await a.close();
      await b.close();
      const gone = await MqttTransport.connect({ ...rest, url, clientId });
      await gone.close();
    }
  });

  it("gives open siblings distinct client ids of their own run, and the same one again once closed", async () => {
    const a = await parent.connection({});
    const b = await parent.connection({});
    try {
      assert.match(a.clientId, new RegExp(`^${parent.clientId}-live-[0-9a-f]{8}$`));
      assert.equal(b.clientId, `${a.clientId}-2`);
    } finally {
      await a.close();
      await b.close();
    }
    const c = await parent.connection({});
    await c.close();
    assert.equal(c.clientId, a.clientId);
    // Two runs with one client id (a service started twice) give their siblings different ids.
    const ids: string[] = [];
    for (let run = 0; run < 2; run++) {
      const t = await MqttTransport.connect({ ...fx.options(), clientId: `${parent.clientId}-twin` });
      const sibling = await t.connection({});
      ids.push(sibling.clientId);
      await sibling.close();
      await t.close();
    }
    assert.notEqual(ids[0], ids[1]);
  });

  it("the sibling of a persistent-session transport has a clean session", async () => {
    const p = uniquePrefix("cs");
    const logger = new MemoryLogger();
    const { url, ...rest } = fx.options();
    const durable = await MqttTransport.connect({ ...rest, logger, url: `${url}?session_expiry=60` });
    const will = { topic: `${p}/will`, payload: utf8("x") };
    try {
      assert.equal(durable.persistent, true);
      const first = await durable.connection({ will });
      assert.equal(first.persistent, false);
      assert.equal(first.client.options.clean, true);
      assert.equal(first.client.options.properties?.sessionExpiryInterval, undefined);
      await first.subscribe(`${p}/x`, () => {}, { qos: 1 });
      await first.close();
      await parent.publish(`${p}/x`, utf8("while away"), { qos: 1 });
      const again = await durable.connection({ will });
      try {
        assert.equal(again.clientId, first.clientId, "reopened with the same client id");
        const got = await watch(again, `${p}/x`);
        await parent.publish(`${p}/x`, utf8("marker"), { qos: 1 });
        await waitFor(() => got.length >= 1, "the marker");
        await sleep(300);
        assert.deepEqual(got.map((m) => m.body), ["marker"], "nothing was kept for the closed sibling");
        assert.ok(!logger.has("debug", /Dropped a message/), "nothing came before the subscription either");
      } finally {
        await again.close();
      }
    } finally {
      await durable.close();
      // The persistent session itself ends now, not in 60 s.
      const { url: _u, ...plain } = fx.options();
      const gone = await MqttTransport.connect({ ...plain, url, clientId: durable.clientId });
      await gone.close();
    }
  });

  it("connection() on a transport built from an mqtt.js client rejects with a TypeError", async () => {
    const { url, protocolVersion } = fx.options();
    const client = mqtt.connect(url!, { protocolVersion: protocolVersion ?? 5, log: () => {} });
    try {
      await new Promise<void>((resolve, reject) => {
        client.once("connect", () => resolve());
        client.once("error", reject);
      });
      const t = await MqttTransport.connect({ client, logger: new MemoryLogger() });
      await assert.rejects(t.connection({}), (e: Error) => {
        assert.ok(e instanceof TypeError, `${e}`);
        assert.match(e.message, /needs a transport opened from a URL/);
        return true;
      });
      await t.close();
      await assert.rejects(
        MqttTransport.connect({ client, will: { topic: "x", payload: EMPTY } }),
        /a will needs a url/,
      );
    } finally {
      await client.endAsync();
    }
  });

  it("refuses an invalid Will before connecting", async () => {
    await assert.rejects(parent.connection({ will: { topic: "a/+", payload: EMPTY } }), TypeError);
    await assert.rejects(
      parent.connection({ will: { topic: "a", payload: "text" as unknown as Uint8Array } }),
      /payload must be bytes/,
    );
  });

  it("a connection with a Will negotiates willKeepalive(keepalive) and pings 4 times per floor(1.5 × it)", async () => {
    assert.deepEqual([0, 1, 2, 4.9, 5, 6, 7, 10, 30, 60].map(willKeepalive), [0, 1, 1, 1, 1, 1, 3, 5, 25, 55]);
    const own = await MqttTransport.connect({ ...fx.options(), keepalive: 5 });
    const p = uniquePrefix("kalive");
    const live = await own.connection({ will: { topic: `${p}/will`, payload: utf8("lost") } });
    const plain = await own.connection({});
    try {
      assert.equal(live.client.options.keepalive, 1, "the Will's connection: 1 s for keepalive 5");
      assert.equal(own.client.options.keepalive, 5, "the transport keeps its keepalive");
      assert.equal(plain.client.options.keepalive, 5, "so does a sibling without a Will");
      let pings = 0;
      live.client.on("packetsend", (pk) => void (pk.cmd === "pingreq" && pings++));
      await sleep(1100);
      assert.ok(pings >= 3 && pings <= 6, `a ping every 250 ms (got ${pings} in 1.1 s)`);
    } finally {
      await plain.close();
      await live.close();
      await own.close();
    }
  });

  // Mosquitto 2.0 checks keepalives only every 6 s (src/keepalive.c): the Will of a connection
  // negotiating keepalive 1 comes within floor(1.5 × 1) + 6 s of its last packet there; aedes
  // times each client (1.5 × 1 s).
  const late = EMBEDDED ? 1000 : 6000;
  it(`a stopped process's Will comes within 1.5 × keepalive + ${late / 1000} s (keepalive 1 s)`, async () => {
    const p = uniquePrefix("ka");
    const got = await watch(watcher, `${p}/will`);
    let c: Awaited<ReturnType<typeof willChild>> | undefined;
    try {
      c = await willChild(fx, { topic: `${p}/will`, payload: "silent" }, 1);
      await sleep(1500); // pings flow: no Will while it lives
      assert.equal(got.length, 0, "no Will while it pings");
      const stopped = performance.now();
      process.kill(c.child.pid!, "SIGSTOP");
      await waitFor(() => got.length === 1, "the Will after SIGSTOP", 1500 + late + 2000);
      const ms = got[0]!.at - stopped;
      console.log(`Will after SIGSTOP with keepalive 1 s (${EMBEDDED ? "aedes" : "MQTT_URL"}): ${ms.toFixed(0)} ms`);
      assert.ok(ms <= 1500 + late, `within ${1500 + late} ms, took ${ms.toFixed(0)} ms`);
    } finally {
      await reap(c);
    }
  });
});
