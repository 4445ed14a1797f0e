/**
 * What MQTT adds to the transport contract: persistent sessions, message expiry, broker
 * restarts, dead servers, payload limits, credentials, and clients that know nothing of novalet.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import process from "node:process";
import mqtt from "mqtt";
import {
  DeliveryError,
  Manager,
  parseFlags,
  RequestContext,
  Rpc,
  ServerDied,
  Service,
  type Transport,
} from "../index.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { MqttTransport, type MqttTransportOptions } from "../transports/mqtt.ts";
import { childCommand, closedAfterEach, MemoryLogger, sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";
import { BIG_STALLS, EMBEDDED, embeddedOnly, mqttFixture } from "./mqtt_fixture.ts";
import { Mosquitto, MOSQUITTO_PUB, MOSQUITTO_SUB, needs } from "./mosquitto.ts";
import { TcpProxy } from "./tcp_proxy.ts";

const ctx = new RequestContext({ userId: "tester" });

/** Records every cast it runs. */
class Recorder extends Manager {
  static seen: number[] = [];
  record(_c: RequestContext, { n }: { n: number }) {
    Recorder.seen.push(n);
  }
  echo(_c: RequestContext, args: Record<string, unknown>) {
    return args;
  }
}

describe("MQTT transport: sessions, limits and restarts", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>>;
  before(async () => {
    fx = await mqttFixture();
  });
  after(async () => await fx.close?.());
  const track = closedAfterEach();
  const connect = async (extra: Partial<MqttTransportOptions> = {}) =>
    track(await MqttTransport.connect({ ...fx.options(), ...extra }));

  /** A service of Recorder on its own transport, with a persistent session as a device has. */
  async function device(prefix: string, clientId: string) {
    const transport = await connect({ clientId, sessionExpiry: 600 });
    const svc = Service.create({
      host: "dev1",
      topic: "sensor",
      manager: Recorder,
      transport,
      prefix,
      periodicFuzzyDelay: 0,
      logger: new MemoryLogger(),
      registry: track(await openSqlRegistry("sqljs::memory:")),
    });
    await svc.start();
    return { svc, transport };
  }

  it("casts to topic.host sent while the device is offline run once when it comes back", async () => {
    Recorder.seen = [];
    const prefix = uniquePrefix("offline");
    const clientId = `dev-${crypto.randomUUID().slice(0, 8)}`;
    const first = await device(prefix, clientId);
    await first.svc.stop(); // keeps topic.host in the broker session
    await first.transport.close();

    const rpc = track(new Rpc(await connect(), { prefix }));
    for (let n = 0; n < 5; n++) await rpc.cast(ctx, "sensor.dev1", { method: "record", args: { n } });
    await sleep(100);
    assert.deepEqual(Recorder.seen, [], "nothing ran while the device was away");

    const second = await device(prefix, clientId);
    await waitFor(() => Recorder.seen.length >= 5, "the queued casts", 10_000);
    await second.svc.stop();
    await second.transport.close();
    await sleep(100);
    assert.deepEqual(Recorder.seen.sort(), [0, 1, 2, 3, 4], "each exactly once");

    // They were acknowledged: a third start gets nothing again.
    Recorder.seen = [];
    const third = await device(prefix, clientId);
    await sleep(300);
    assert.deepEqual(Recorder.seen, []);
    await third.svc.kill(); // kill() removes topic.host from the session for good
  });

  it("a service opening its own transport with ?session_expiry= uses a stable client id; without, a random one", async () => {
    const base = EMBEDDED ? `${fx.url}?protocol_version=4&shared=false` : fx.url;
    const ids: string[] = [];
    for (const url of [`${base}${base.includes("?") ? "&" : "?"}session_expiry=60`, base]) {
      const svc = Service.create({
        host: "dev.example",
        binary: "nova-sensor",
        manager: Recorder,
        flags: parseFlags([`--transport_url=${url}`, `--prefix=${uniquePrefix("sid")}`]),
        logger: new MemoryLogger(),
      });
      await svc.start();
      ids.push((svc.transport as MqttTransport).clientId);
      await svc.kill();
    }
    assert.equal(ids[0], "novalet-nova-sensor-dev.example");
    assert.match(ids[1]!, /^novalet-[0-9a-f-]{12}$/);
  });

  it("a cast whose timeout passed while the device was offline is not delivered", {
    skip: embeddedOnly("aedes speaks MQTT 3.1.1, which has no message expiry"),
  }, async () => {
    Recorder.seen = [];
    const prefix = uniquePrefix("expiry");
    const clientId = `dev-${crypto.randomUUID().slice(0, 8)}`;
    const first = await device(prefix, clientId);
    await first.svc.stop();
    await first.transport.close();
    const rpc = track(new Rpc(await connect(), { prefix }));
    await rpc.cast(ctx, "sensor.dev1", { method: "record", args: { n: 1 } }, { timeout: 1 });
    await rpc.cast(ctx, "sensor.dev1", { method: "record", args: { n: 2 } }, { timeout: 60 });
    await sleep(2200);
    const second = await device(prefix, clientId);
    await waitFor(() => Recorder.seen.length >= 1, "the live cast", 10_000);
    await sleep(200);
    assert.deepEqual(Recorder.seen, [2]);
    await second.svc.kill();
  });

  it("a 1 MiB argument makes the round trip", { skip: BIG_STALLS }, async () => {
    const prefix = uniquePrefix("big");
    const svc = Service.create({
      host: "h",
      topic: "echo",
      manager: Recorder,
      transport: await connect(),
      prefix,
      logger: new MemoryLogger(),
      registry: track(await openSqlRegistry("sqljs::memory:")),
    });
    await svc.start();
    track({ close: () => svc.stop() });
    const rpc = track(new Rpc(await connect(), { prefix }));
    const blob = "z".repeat(1024 * 1024);
    const back = await rpc.call<{ blob: string }>(ctx, "echo", { method: "echo", args: { blob } }, { timeout: 20 });
    assert.equal(back.blob.length, blob.length);
  });

  it("a QoS 1 request's PUBACK and its reply leave the server in one socket write, the reply first", async () => {
    const prefix = uniquePrefix("onewrite");
    const transport = await connect({ qos: 1 });
    const svc = Service.create({
      host: "h",
      topic: "echo",
      manager: Recorder,
      transport,
      prefix,
      logger: new MemoryLogger(),
      registry: track(await openSqlRegistry("sqljs::memory:")),
    });
    await svc.start();
    track({ close: () => svc.stop() });
    const rpc = track(new Rpc(await connect(), { prefix, qos: 1 }));
    await rpc.call(ctx, "echo", { method: "echo", args: { n: 0 } }); // the reply subscription is made
    // Count what reaches the socket: write() for one buffered chunk, writev() for several.
    type Fn = (...a: unknown[]) => unknown;
    const socket = transport.client.stream as unknown as { _write: Fn; _writev: Fn };
    let writes = 0;
    const { _write, _writev } = socket;
    socket._write = function (this: unknown, ...a: unknown[]) {
      writes++;
      return _write.apply(this, a);
    };
    socket._writev = function (this: unknown, ...a: unknown[]) {
      writes++;
      return _writev.apply(this, a);
    };
    const sent: string[] = [];
    const onSend = (p: { cmd: string }) => void sent.push(p.cmd);
    transport.client.on("packetsend", onSend);
    for (let n = 1; n <= 5; n++) {
      assert.deepEqual(await rpc.call(ctx, "echo", { method: "echo", args: { n } }), { n });
    }
    transport.client.off("packetsend", onSend);
    socket._write = _write;
    socket._writev = _writev;
    assert.equal(writes, 5, "one write per call: the PUBACK waits for the reply of the same turn");
    // The broker handles a write's packets in order: the reply is passed on before the PUBACK.
    assert.deepEqual(sent, Array.from({ length: 5 }, () => ["publish", "puback"]).flat());
  });

  it("a busy connection pings every keepalive and stays up", async () => {
    const t = await connect({ keepalive: 1, qos: 1 });
    const topic = `${uniquePrefix("ka")}/x`;
    let received = 0;
    await t.subscribe(topic, () => void received++);
    let pings = 0;
    let closed = 0;
    t.client.on("packetsend", (p) => p.cmd === "pingreq" && pings++);
    t.client.on("close", () => closed++);
    const end = Date.now() + 2600;
    let sent = 0;
    while (Date.now() < end) {
      await t.publish(topic, new Uint8Array([1]));
      sent++;
    }
    await waitFor(() => received === sent, "every message back");
    assert.ok(pings >= 1, `a ping while busy (got ${pings})`);
    assert.equal(closed, 0, "the connection stayed up");
  });

  it("a payload over maxPayloadBytes is refused with an error naming the size and the limit", async () => {
    const t = await connect({ maxPayloadBytes: 1024 });
    await assert.rejects(
      t.publish(`${uniquePrefix("lim")}/x`, new Uint8Array(2048)),
      /Cannot publish 2048 bytes to .*over the limit of 1024 bytes \(maxPayloadBytes\)/,
    );
    const rpc = track(new Rpc(t, { prefix: uniquePrefix("lim") }));
    await assert.rejects(
      rpc.call(ctx, "echo", { method: "echo", args: { blob: "q".repeat(4096) } }),
      (e: Error) => e instanceof DeliveryError && /over the limit of 1024 bytes/.test(e.message),
    );
    assert.equal(rpc.pending, 0);
  });

  it("a server killed in the middle of a call makes the caller fail at once (ServerDied: its Will), not hang", async () => {
    const prefix = `--prefix=${uniquePrefix("kill")}`;
    const url = EMBEDDED ? `${fx.url}?protocol_version=4&shared=false` : fx.url;
    const [cmd, ...args] = childCommand(new URL("../cli.ts", import.meta.url).pathname, [
      "serve",
      "./tests/fixtures/managers.ts#SlowManager",
      "--host=victim",
      `--transport_url=${url}`,
      prefix,
    ]);
    const child = spawn(cmd!, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env } });
    let out = "";
    child.stdout.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.stderr.setEncoding("utf8").on("data", (d: string) => (out += d));
    const exited = new Promise((r) => child.on("close", r));
    try {
      await waitFor(() => out.includes("Serving slow.victim"), "the server", 20_000);
      const rpc = track(new Rpc(await connect(), { prefix: prefix.slice(9) }));
      const call = rpc.call(ctx, "slow.victim", { method: "slow", args: { ms: 60_000 } }, { timeout: 20 });
      const outcome = assert.rejects(call, ServerDied);
      await waitFor(() => out.includes("SLOW STARTED"), "the call to start");
      const killedAt = Date.now();
      process.kill(child.pid!, "SIGKILL");
      await outcome;
      const ms = Date.now() - killedAt;
      assert.ok(ms < 1000, `failed ${ms} ms after the kill (timeout 20 s)`);
      assert.equal(rpc.pending, 0);
    } finally {
      try {
        process.kill(child.pid!, "SIGKILL");
      } catch { /* already gone */ }
      await exited;
    }
  });
});

/** Counts the calls it answers. */
class Counted extends Manager {
  static calls = 0;
  echo(_c: RequestContext, args: Record<string, unknown>) {
    Counted.calls++;
    return args;
  }
}

describe("A clean session reconnects: subscriptions are back before mqtt.js re-sends its stored messages", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>>;
  let proxy: TcpProxy;
  let viaProxy: string;
  before(async () => {
    fx = await mqttFixture();
    const u = new URL(fx.url);
    proxy = await TcpProxy.start(u.hostname, Number(u.port));
    u.port = String(proxy.port);
    viaProxy = u.toString();
  });
  after(async () => {
    await proxy.close();
    await fx.close?.();
  });
  const track = closedAfterEach();
  /** A transport through the proxy, quick to reconnect. */
  const cuttable = async (extra: Partial<MqttTransportOptions> = {}) =>
    track(
      await MqttTransport.connect({ ...fx.options(), url: viaProxy, reconnectMin: 0.1, reconnectMax: 0.2, ...extra }),
    );

  /** Make the connection of `t` a black hole, call `during` once `t` has written a QoS 1 publish
   * into it (so it sits unacknowledged in mqtt.js's store), then cut it; `offline` runs while
   * `t` is disconnected, then the proxy lets `t` connect again. */
  async function cut(t: MqttTransport, during: () => void, offline: () => void): Promise<void> {
    proxy.silence();
    const written = new Promise<void>((resolve) => {
      const onSend = (p: { cmd: string; qos?: number }) => {
        if (p.cmd !== "publish" || p.qos !== 1) return;
        t.client.off("packetsend", onSend);
        resolve();
      };
      t.client.on("packetsend", onSend);
    });
    during();
    await written;
    const closed = new Promise<void>((r) => t.client.once("close", () => r()));
    proxy.reset();
    await closed;
    offline(); // reconnect attempts meanwhile go into the black hole: nothing is sent
    await sleep(50);
    proxy.restore();
    proxy.reset();
  }

  it("close() while offline with a QoS 1 message stored ends at once, and that publish() rejects", async () => {
    const t = await cuttable();
    proxy.silence();
    const written = new Promise<void>((r) => t.client.once("packetsend", () => r()));
    const published = t.publish(`${uniquePrefix("gone")}/x`, new Uint8Array([1]), { qos: 1 }).then(
      () => "sent",
      (e) => e,
    );
    await written;
    const closed = new Promise<void>((r) => t.client.once("close", () => r()));
    proxy.reset(); // offline now; reconnects go into the silence
    await closed;
    const t0 = Date.now();
    await t.close();
    assert.ok(Date.now() - t0 < 1000, `close() took ${Date.now() - t0} ms`);
    assert.ok((await published) instanceof Error, "the stored publish failed");
    proxy.restore();
  });

  it("a call in flight when the connection drops, and one made while it is down, get their answers", async () => {
    const prefix = uniquePrefix("replay");
    const svc = Service.create({
      host: "h1",
      topic: "echo",
      manager: Counted,
      transport: track(await MqttTransport.connect(fx.options())), // not through the proxy
      prefix,
      registry: track(await openSqlRegistry("sqljs::memory:")),
      logger: new MemoryLogger(),
    });
    await svc.start();
    track({ close: () => svc.stop() });
    const clientT = await cuttable();
    const rpc = track(new Rpc(clientT, { prefix, timeout: 10 }));
    const echo = (n: number) => rpc.call(ctx, "echo.h1", { method: "echo", args: { n } });
    assert.deepEqual(await echo(0), { n: 0 }); // the reply subscription exists
    const answered = Counted.calls;

    let inFlight!: Promise<unknown>;
    let whileDown!: Promise<unknown>;
    const t0 = Date.now();
    await cut(clientT, () => (inFlight = echo(1)), () => (whileDown = echo(2)));
    assert.deepEqual(await inFlight, { n: 1 });
    assert.deepEqual(await whileDown, { n: 2 });
    const ms = Date.now() - t0;
    assert.ok(ms < 5000, `answered ${ms} ms after the call (timeout 10 s)`);
    assert.equal(Counted.calls - answered, 2, "the server answered each call once");
    assert.equal(rpc.pending, 0);
  });

  it("a QoS 1 message to our own subscription, left in mqtt.js's store by the cut, reaches it; SUBSCRIBE goes first", async () => {
    const topic = `${uniquePrefix("own")}/x`;
    const t = await cuttable();
    const got: string[] = [];
    await t.subscribe(topic, (p) => void got.push(text(p)), { qos: 1 });
    const sent: string[] = [];
    const sending: Promise<void>[] = [];
    await cut(t, () => sending.push(t.publish(topic, utf8("in flight"), { qos: 1 })), () => {
      t.client.on("packetsend", (p) => void sent.push(p.cmd));
      sending.push(t.publish(topic, utf8("while down"), { qos: 1 }));
    });
    await Promise.all(sending);
    await waitFor(() => got.length === 2, `both messages (got ${JSON.stringify(got)})`, 5000);
    assert.deepEqual(got.sort(), ["in flight", "while down"]);
    const first = sent.indexOf("publish");
    assert.ok(sent.indexOf("subscribe") >= 0 && sent.indexOf("subscribe") < first, `sent: ${sent.join(" ")}`);
  });

  it("a connection lost again before the broker confirmed the subscriptions: the next one makes them, then re-sends", async () => {
    const topic = `${uniquePrefix("twice")}/x`;
    const t = await cuttable();
    const got: string[] = [];
    await t.subscribe(topic, (p) => void got.push(text(p)), { qos: 1 });
    let connects = 0;
    let subscribes = 0;
    let sending!: Promise<void>;
    await cut(t, () => (sending = t.publish(topic, utf8("in flight"), { qos: 1 })), () => {
      t.client.on("connect", () => void connects++);
      t.client.on("packetsend", (p) => {
        // The first SUBSCRIBE after the cut never reaches the broker: its connection goes too.
        if (p.cmd === "subscribe" && subscribes++ === 0) proxy.reset();
      });
    });
    await sending;
    await waitFor(() => got.length === 1, "the message", 5000);
    assert.ok(subscribes >= 2, `subscribed on both connections (${subscribes})`);
    assert.equal(connects, 1, "mqtt.js emitted connect only for the connection that completed its replay");
    await sleep(100);
    assert.deepEqual(got, ["in flight"]);
  });

  it("a subscription refused after the reconnect is logged; the stored messages are sent all the same", async () => {
    const prefix = uniquePrefix("refused");
    const log = new MemoryLogger();
    const t = await cuttable({ logger: log });
    const got: string[] = [];
    await t.subscribe(`${prefix}/ok`, (p) => void got.push(text(p)), { qos: 1 });
    await t.subscribe(`${prefix}/no`, () => {}, { qos: 1 });
    const client = t.client as unknown as { subscribeAsync(topic: string, opts: object): Promise<unknown> };
    const subscribeAsync = client.subscribeAsync;
    client.subscribeAsync = (topic, opts) =>
      topic === `${prefix}/no` ? Promise.reject(new Error("refused here")) : subscribeAsync.call(t.client, topic, opts);
    try {
      let sending!: Promise<void>;
      await cut(t, () => (sending = t.publish(`${prefix}/ok`, utf8("in flight"), { qos: 1 })), () => {});
      await sending;
      await waitFor(() => got.length === 1, "the message", 5000);
    } finally {
      delete (client as { subscribeAsync?: unknown }).subscribeAsync; // the prototype's again
    }
    assert.ok(log.has("error", new RegExp(`Cannot subscribe again to ${prefix}/no after a reconnect`)), "logged");
  });

  it("a persistent session that the broker kept is not subscribed again", async () => {
    const t = await cuttable({ clientId: `keep-${crypto.randomUUID().slice(0, 8)}`, sessionExpiry: 600 });
    const topic = `${uniquePrefix("kept")}/x`;
    const got: string[] = [];
    await t.subscribe(topic, (p) => void got.push(text(p)), { qos: 1 });
    const sent: string[] = [];
    await cut(t, () => void t.publish(topic, utf8("in flight"), { qos: 1 }), () => {
      t.client.on("packetsend", (p) => void sent.push(p.cmd));
    });
    await waitFor(() => got.includes("in flight"), "the message", 5000);
    assert.ok(t.client.connected);
    assert.deepEqual(sent.filter((c) => c === "subscribe"), [], `sent: ${sent.join(" ")}`);
    await t.forget(topic);
  });
});

describe("MQTT credentials", () => {
  it("wrong credentials give a clear error; right ones connect (embedded broker)", async () => {
    const broker = await EmbeddedBroker.start({ users: { novalet: "s3cret" } });
    try {
      await assert.rejects(
        MqttTransport.connect({ ...broker.transportOptions(), username: "novalet", password: "wrong" }),
        (e: Error) => {
          assert.match(
            e.message,
            /Cannot connect to MQTT broker "mqtt:\/\/127\.0\.0\.1:\d+": .*check the user name and password/,
          );
          return true;
        },
      );
      await assert.rejects(MqttTransport.connect(broker.transportOptions()), /Cannot connect to MQTT broker/);
      const ok = await MqttTransport.connect({
        ...broker.transportOptions(),
        url: broker.url.replace("//", "//novalet:s3cret@"),
      });
      await ok.close();
    } finally {
      await broker.close();
    }
  });

  it(
    "wrong credentials give a clear error on Mosquitto with a password file",
    { skip: needs("mosquitto") },
    async () => {
      const m = await Mosquitto.start({ users: { novalet: "s3cret" } });
      try {
        await assert.rejects(
          MqttTransport.connect({ url: m.url.replace("//", "//novalet:nope@") }),
          (e: Error) => {
            assert.match(
              e.message,
              /Cannot connect to MQTT broker "mqtt:\/\/novalet:\*\*\*@127\.0\.0\.1:\d+": .*check the user name and password/,
            );
            assert.doesNotMatch(e.message, /nope/);
            return true;
          },
        );
        const ok = await MqttTransport.connect({ url: m.url, username: "novalet", password: "s3cret" });
        await ok.close();
      } finally {
        await m.stop();
      }
    },
  );
});

describe("Mosquitto restart in the middle of a stream of casts", { skip: needs("mosquitto") }, () => {
  it("every QoS 1 cast is executed exactly once", async () => {
    Recorder.seen = [];
    const m = await Mosquitto.start();
    const prefix = uniquePrefix("restart");
    const closers: Transport[] = [];
    try {
      const opts = { url: m.url, logger: new MemoryLogger(), reconnectMin: 0.1, reconnectMax: 0.5 };
      const serverT = await MqttTransport.connect({ ...opts, clientId: `srv-${prefix}`, sessionExpiry: 600 });
      const clientT = await MqttTransport.connect({ ...opts, clientId: `cli-${prefix}`, sessionExpiry: 600 });
      closers.push(clientT, serverT);
      const registry = await openSqlRegistry("sqljs::memory:");
      const svc = Service.create({
        host: "h1",
        topic: "rec",
        manager: Recorder,
        transport: serverT,
        prefix,
        registry,
        logger: new MemoryLogger(),
      });
      await svc.start();
      const rpc = new Rpc(clientT, { prefix, logger: new MemoryLogger() });
      const n = 600;
      let restarted: Promise<void> | undefined;
      const sends: Promise<void>[] = [];
      for (let i = 0; i < n; i++) {
        if (i === 200) restarted = m.restart(300);
        sends.push(rpc.cast(ctx, "rec.h1", { method: "record", args: { n: i } }));
        if (i % 20 === 0) await sleep(5); // a stream, not one burst
      }
      await restarted;
      await Promise.all(sends);
      await waitFor(() => Recorder.seen.length >= n, `${n} casts`, 30_000);
      await sleep(300);
      const sorted = [...Recorder.seen].sort((a, b) => a - b);
      assert.equal(sorted.length, n, `executed ${sorted.length} times for ${n} casts`);
      assert.deepEqual(sorted, Array.from({ length: n }, (_, i) => i));
      await rpc.close();
      await svc.stop();
      await registry.close();
    } finally {
      for (const c of closers) await c.close();
      await m.stop();
    }
  });
});

describe("Mosquitto restart with clean sessions", { skip: needs("mosquitto") }, () => {
  it("a service subscribes again after the broker lost its session, and calls work again", async () => {
    const m = await Mosquitto.start();
    const prefix = uniquePrefix("resub");
    const opts = { url: m.url, logger: new MemoryLogger(), reconnectMin: 0.1, reconnectMax: 0.5 };
    const serverT = await MqttTransport.connect(opts);
    const clientT = await MqttTransport.connect(opts);
    const registry = await openSqlRegistry("sqljs::memory:");
    const svc = Service.create({ host: "h1", topic: "echo", manager: Recorder, transport: serverT, prefix, registry });
    try {
      await svc.start();
      const rpc = new Rpc(clientT, { prefix, timeout: 5 });
      assert.deepEqual(await rpc.call(ctx, "echo.h1", { method: "echo", args: { n: 1 } }), { n: 1 });
      await m.restart(200); // clean sessions: the broker forgets both clients' subscriptions
      let answer: unknown;
      for (let i = 0; i < 30 && answer === undefined; i++) {
        answer = await rpc.call(ctx, "echo.h1", { method: "echo", args: { n: 2 } }, { timeout: 1 }).catch(() =>
          undefined
        );
      }
      assert.deepEqual(answer, { n: 2 });
      await rpc.close();
    } finally {
      await svc.stop();
      await serverT.close();
      await clientT.close();
      await registry.close();
      await m.stop();
    }
  });
});

describe("Message expiry on the wire (MQTT 5, Mosquitto)", { skip: needs("mosquitto") }, () => {
  let m: Mosquitto;
  let transport: MqttTransport;
  let watcher: mqtt.MqttClient;
  const topic = `${uniquePrefix("ttl")}/rpc/t`;
  /** What the broker passed on: the payload and its messageExpiryInterval, if any. */
  const seen: { text: string; expiry?: number }[] = [];
  before(async () => {
    m = await Mosquitto.start();
    transport = await MqttTransport.connect({ url: m.url });
    watcher = await mqtt.connectAsync(m.url, { protocolVersion: 5 });
    watcher.on("message", (_t, p, packet) => {
      seen.push({ text: String(p), expiry: packet.properties?.messageExpiryInterval });
    });
    await watcher.subscribeAsync(topic, { qos: 1 });
  });
  after(async () => {
    await watcher.endAsync();
    await transport.close();
    await m.stop();
  });

  it("a QoS 1 publish with an expiry reaches subscribers with it; without one, or at QoS 0, with none", async () => {
    seen.length = 0;
    // mqtt.js is handed no option beyond its defaults: on Node 20 an extra key (such as
    // `properties`) gave its copy of the options a new hidden class on every publish.
    const optionKeys = new Set<string>();
    const client = transport.client as unknown as { publish(t: string, p: unknown, o: object, cb: unknown): unknown };
    const publish = client.publish;
    client.publish = (t, p, o, cb) => {
      for (const k of Object.keys(o)) optionKeys.add(k);
      return publish.call(transport.client, t, p, o, cb);
    };
    const bytes = (s: string) => new TextEncoder().encode(s);
    try {
      await transport.publish(topic, bytes("ttl"), { qos: 1, expiry: 30 });
      await transport.publish(topic, bytes("none"), { qos: 1 });
      await transport.publish(topic, bytes("qos0"), { qos: 0, expiry: 30 });
      await transport.publish(topic, bytes("ttl 2.5"), { qos: 1, expiry: 2.5 });
    } finally {
      delete (client as { publish?: unknown }).publish; // the prototype's again
    }
    await waitFor(() => seen.length === 4, "four messages", 5000);
    const byText = Object.fromEntries(seen.map((s) => [s.text, s.expiry]));
    assert.ok(byText.ttl! > 0 && byText.ttl! <= 30, `ttl: ${byText.ttl}`);
    assert.equal(byText.none, undefined);
    assert.equal(byText.qos0, undefined);
    assert.ok(byText["ttl 2.5"]! > 0 && byText["ttl 2.5"]! <= 3, `ttl 2.5: ${byText["ttl 2.5"]}`);
    assert.deepEqual([...optionKeys].filter((k) => !["qos", "retain", "dup"].includes(k)), []);
  });

  it("an expiry beyond what MQTT 5 can carry (4,294,967,295 s) is sent as that maximum; the connection stays up", async () => {
    seen.length = 0;
    let closes = 0;
    const onClose = () => void closes++;
    transport.client.on("close", onClose);
    const bytes = (s: string) => new TextEncoder().encode(s);
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      const sent = Promise.all([
        transport.publish(topic, bytes("far"), { qos: 1, expiry: 2 ** 33 }),
        transport.publish(topic, bytes("next"), { qos: 1, expiry: 30 }),
      ]).then(() => "sent");
      const outcome = await Promise.race([
        sent,
        new Promise<string>((r) => (timer = setTimeout(() => r("not acknowledged within 5 s"), 5000))),
      ]);
      assert.equal(outcome, "sent");
      await waitFor(() => seen.length === 2, "both messages", 5000);
    } finally {
      clearTimeout(timer);
      transport.client.off("close", onClose);
    }
    const byText = Object.fromEntries(seen.map((s) => [s.text, s.expiry]));
    assert.ok(byText.far! > 0xffff_ffff - 10 && byText.far! <= 0xffff_ffff, `far: ${byText.far}`);
    assert.equal(closes, 0, "the connection stayed up");
    assert.ok(transport.client.connected);
  });

  it("a publish that mqtt.js queues while it replays its store after a reconnect keeps its expiry", async () => {
    seen.length = 0;
    // The state mqtt.js is in while it sends its stored packets again after a reconnect: new
    // publishes wait in a queue and leave once the replay is done.
    const client = transport.client as unknown as { _storeProcessing: boolean; _invokeAllStoreProcessingQueue(): void };
    client._storeProcessing = true;
    const first = transport.publish(topic, new TextEncoder().encode("queued ttl"), { qos: 1, expiry: 20 });
    const second = transport.publish(topic, new TextEncoder().encode("queued none"), { qos: 1 });
    await sleep(50);
    assert.equal(seen.length, 0, "queued, not sent");
    client._storeProcessing = false;
    client._invokeAllStoreProcessingQueue();
    await Promise.all([first, second]);
    await waitFor(() => seen.length === 2, "both messages", 5000);
    const byText = Object.fromEntries(seen.map((s) => [s.text, s.expiry]));
    assert.ok(byText["queued ttl"]! > 0 && byText["queued ttl"]! <= 20, `queued ttl: ${byText["queued ttl"]}`);
    assert.equal(byText["queued none"], undefined);
  });
});

describe("Calling a novalet service without novalet", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>>;
  let svc: Service;
  let prefix: string;
  before(async () => {
    fx = await mqttFixture();
    prefix = uniquePrefix("interop");
    svc = Service.create({
      host: "h1",
      topic: "echo",
      manager: Recorder,
      transport: await MqttTransport.connect(fx.options()),
      prefix,
      registry: await openSqlRegistry("sqljs::memory:"),
      logger: new MemoryLogger(),
    });
    await svc.start();
  });
  after(async () => {
    await svc.stop();
    await svc.transport.close();
    await svc.registry.close();
    await fx.close?.();
  });

  const request = (replyTo: string) =>
    JSON.stringify({ v: 1, id: crypto.randomUUID(), method: "echo", args: { hello: "world" }, reply_to: replyTo });

  it("a bare mqtt.js client calls a service with the README's wire format", async () => {
    const client = await mqtt.connectAsync(fx.url, { protocolVersion: EMBEDDED ? 4 : 5 });
    try {
      const replyTo = `${prefix}/reply/bare-${crypto.randomUUID().slice(0, 6)}`;
      const reply = new Promise<Record<string, unknown>>((r) =>
        client.on("message", (_t, p) => r(JSON.parse(String(p))))
      );
      await client.subscribeAsync(replyTo, { qos: 1 });
      const body = request(replyTo);
      await client.publishAsync(`${prefix}/rpc/echo/h1`, body, { qos: 1 });
      const r = await reply;
      assert.deepEqual(r, { v: 1, id: JSON.parse(body).id, result: { hello: "world" } });
    } finally {
      await client.endAsync();
    }
  });

  it(
    "mosquitto_pub and mosquitto_sub call a service with the README's wire format",
    { skip: needs("mosquitto_pub") },
    async () => {
      const u = new URL(fx.url);
      const common = ["-h", u.hostname, "-p", u.port, "-V", EMBEDDED ? "mqttv311" : "mqttv5", "-q", "1"];
      const replyTo = `${prefix}/reply/cli-${crypto.randomUUID().slice(0, 6)}`;
      const sub = new Promise<string>((resolve, reject) => {
        execFile(MOSQUITTO_SUB!, [...common, "-t", replyTo, "-C", "1", "-W", "10"], (err, stdout) => {
          if (err) reject(err);
          else resolve(stdout);
        });
      });
      await sleep(300); // mosquitto_sub has subscribed by then
      const body = request(replyTo);
      await new Promise<void>((resolve, reject) => {
        execFile(
          MOSQUITTO_PUB!,
          [...common, "-t", `${prefix}/rpc/echo/h1`, "-m", body],
          (err) => err ? reject(err) : resolve(),
        );
      });
      const reply = JSON.parse((await sub).trim());
      assert.deepEqual(reply, { v: 1, id: JSON.parse(body).id, result: { hello: "world" } });
    },
  );
});
