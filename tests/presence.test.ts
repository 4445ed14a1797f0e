/**
 * Presence and crashes over MQTT, with servers in child processes (tests/fixtures/presence_server.ts):
 * online/offline/lost with incarnations, late Wills, SIGSTOP, calls to a host that dies, shared
 * work that survives a crash of a persistent-session server, and `services list` reading it all.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  Manager,
  parsePresence,
  type Presence,
  readPresence,
  type Registry,
  RequestContext,
  Rpc,
  ServerDied,
  Service,
  Topics,
} from "../index.ts";
import { ConductorManager } from "../registry/conductor.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { childCommand, MemoryLogger, sleep, uniquePrefix, waitFor } from "./helpers.ts";
import { EMBEDDED, MQTT_URL, mqttFixture, NO_SHARED } from "./mqtt_fixture.ts";
import { Mosquitto, needs } from "./mosquitto.ts";

/** Signal a child by pid: under Deno, ChildProcess.kill() after a SIGSTOP sends nothing. */
function signal(child: ChildProcess, sig: NodeJS.Signals): void {
  try {
    process.kill(child.pid!, sig);
  } catch { /* already gone */ }
}

const SERVER = new URL("./fixtures/presence_server.ts", import.meta.url).pathname;
const CLI = new URL("../cli.ts", import.meta.url).pathname;
const utf8 = (s: string) => new TextEncoder().encode(s);

describe("presence over MQTT: who is online, and what a crash does", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>>;
  let observer: MqttTransport;
  const children = new Set<ChildProcess>();
  const prefixes: string[] = [];
  const dir = mkdtempSync(join(tmpdir(), "novalet-presence-"));

  before(async () => {
    fx = await mqttFixture();
    observer = await MqttTransport.connect(fx.options());
  });

  after(async () => {
    for (const c of children) signal(c, "SIGKILL");
    // Clear what the tests left retained.
    for (const prefix of prefixes) {
      const found = await readPresence(observer, prefix, 2);
      const topics = new Topics(prefix);
      for (const p of found.values()) {
        await observer.publish(topics.presence(p.topic, p.host), new Uint8Array(0), { qos: 1, retain: true });
      }
    }
    await observer.close();
    await fx.close?.();
    rmSync(dir, { recursive: true, force: true });
  });

  function newPrefix(): string {
    const p = uniquePrefix("presence");
    prefixes.push(p);
    return p;
  }

  /** The broker's URL with `params` (aedes speaks MQTT 3.1.1 and has no shared subscriptions). */
  function brokerUrl(params: string[] = []): string {
    const all = EMBEDDED ? ["protocol_version=4", "shared=false", ...params] : params;
    return all.length ? `${fx.url}?${all.join("&")}` : fx.url;
  }

  /** A server child; resolves once it serves. */
  async function server(host: string, prefix: string, opts: { params?: string[]; registry?: string } = {}) {
    const args = [
      `--host=${host}`,
      `--prefix=${prefix}`,
      `--transport_url=${brokerUrl(opts.params)}`,
      `--registry_url=${opts.registry ?? "sqljs::memory:"}`,
      "--report_interval=1",
      "--service_down_time=3",
      "--log_level=warn",
    ];
    const [cmd, ...rest] = childCommand(SERVER, args);
    const child = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env: process.env });
    children.add(child);
    let out = "";
    let err = "";
    child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    child.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    const exited = new Promise<void>((r) => child.on("exit", () => (children.delete(child), r())));
    await Promise.race([
      waitFor(() => out.includes("READY"), `server ${host} to serve`, 20_000),
      exited.then(() => {
        throw new Error(`server ${host} exited: ${err}`);
      }),
    ]);
    return { child, exited, stderr: () => err };
  }

  /** Every presence message on `prefix`, with when it arrived. */
  async function watch(prefix: string) {
    const seen: { p: Presence; at: number }[] = [];
    const sub = await observer.subscribe(new Topics(prefix).presence("+", "+"), (payload) => {
      const p = parsePresence(payload);
      if (p) seen.push({ p, at: performance.now() });
    }, { qos: 1 });
    const last = (host: string) => seen.filter((s) => s.p.host === host).at(-1);
    return { seen, last, close: () => sub.unsubscribe() };
  }

  it("a service says online (retained), offline on a clean stop, and lost within 1 s of kill -9", async () => {
    const prefix = newPrefix();
    const w = await watch(prefix);
    const s1 = await server("h1", prefix);
    await waitFor(() => w.last("h1")?.p.state === "online", "online once it serves");
    const found = await readPresence(observer, prefix);
    const online = found.get("work.h1");
    assert.ok(online, "retained online presence");
    assert.equal(online.state, "online");
    assert.equal(online.binary, "nova-work");
    assert.equal(online.report_interval, 1);
    assert.equal(online.service_down_time, 3);
    signal(s1.child, "SIGTERM");
    await s1.exited;
    await waitFor(() => w.last("h1")?.p.state === "offline", "offline after a clean stop");
    assert.equal(w.last("h1")!.p.incarnation, online.incarnation);

    const s2 = await server("h1", prefix);
    await waitFor(() => w.last("h1")?.p.state === "online", "online again");
    const second = w.last("h1")!.p;
    assert.ok(second.incarnation > online.incarnation, "a new incarnation");
    const killedAt = performance.now();
    signal(s2.child, "SIGKILL");
    await waitFor(() => w.last("h1")?.p.state === "lost", "lost after kill -9", 5000);
    const lost = w.last("h1")!;
    assert.equal(lost.p.incarnation, second.incarnation);
    assert.ok(lost.at - killedAt < 1000, `lost ${Math.round(lost.at - killedAt)} ms after the kill`);
    assert.equal((await readPresence(observer, prefix)).get("work.h1")?.state, "lost", "retained");
    await w.close();
  });

  it("a late Will of an earlier run changes nothing: the service says online again", async () => {
    const prefix = newPrefix();
    const s = await server("h2", prefix);
    const online = (await readPresence(observer, prefix)).get("work.h2")!;
    const late: Presence = { ...online, state: "lost", incarnation: online.incarnation - 1 };
    await observer.publish(new Topics(prefix).presence("work", "h2"), utf8(JSON.stringify(late)), {
      qos: 1,
      retain: true,
    });
    await sleep(500);
    const now = (await readPresence(observer, prefix)).get("work.h2")!;
    assert.equal(now.state, "online");
    assert.equal(now.incarnation, online.incarnation);
    signal(s.child, "SIGKILL");
    await s.exited;
  });

  it("a lost that the service takes back at once (a blip, a forged or newer-run Will) fails no call", async () => {
    const prefix = newPrefix();
    const s = await server("h6", prefix);
    const rpc = new Rpc(observer, { prefix, timeout: 30 });
    try {
      const ctx = new RequestContext();
      const outcome = rpc.call(ctx, "work.h6", { method: "hang" }).then(() => "answered", (e) => e);
      await sleep(300);
      const online = (await readPresence(observer, prefix)).get("work.h6")!;
      const topic = new Topics(prefix).presence("work", "h6");
      for (const incarnation of [online.incarnation, online.incarnation + 1000]) {
        const lost: Presence = { ...online, state: "lost", incarnation };
        await observer.publish(topic, utf8(JSON.stringify(lost)), { qos: 1, retain: true });
        await sleep(300);
        const now = (await readPresence(observer, prefix)).get("work.h6")!;
        assert.deepEqual(
          [now.state, now.incarnation],
          ["online", online.incarnation],
          `after a lost of ${incarnation}`,
        );
      }
      await sleep(1000);
      assert.equal(rpc.pending, 1, "the call still waits");
      signal(s.child, "SIGKILL");
      assert.ok((await outcome) instanceof ServerDied, "and fails once the server really dies");
    } finally {
      await rpc.close();
    }
  });

  it("restarted right after kill -9, a service ends online, ten times out of ten", async () => {
    const prefix = newPrefix();
    let s = await server("h3", prefix);
    for (let i = 0; i < 10; i++) {
      signal(s.child, "SIGKILL");
      s = await server("h3", prefix); // spawned at once: well within 100 ms of the kill
      await sleep(300);
      const p = (await readPresence(observer, prefix)).get("work.h3");
      assert.equal(p?.state, "online", `try ${i + 1}: ${JSON.stringify(p)}`);
    }
    signal(s.child, "SIGKILL");
    await s.exited;
  });

  it(
    "SIGSTOP with keepalive=5 makes a service lost within 1.5 × keepalive; SIGCONT brings it back online",
    // On Mosquitto, with services list: the describe block below.
    { skip: process.platform === "win32" ? "no SIGSTOP on Windows" : EMBEDDED ? false : "run on Mosquitto below" },
    async () => {
      const prefix = newPrefix();
      const w = await watch(prefix);
      const s = await server("h4", prefix, { params: ["keepalive=5"] });
      await waitFor(() => w.last("h4")?.p.state === "online", "online");
      const stoppedAt = performance.now();
      signal(s.child, "SIGSTOP");
      try {
        // aedes times each client: the Will's connection negotiates keepalive 1 (willKeepalive(5)).
        await waitFor(() => w.last("h4")?.p.state === "lost", "lost while stopped", 7500);
        const took = w.last("h4")!.at - stoppedAt;
        assert.ok(took < 3000, `lost ${Math.round(took)} ms after SIGSTOP with keepalive=5 on aedes`);
      } finally {
        signal(s.child, "SIGCONT");
      }
      await waitFor(() => w.last("h4")?.p.state === "online", "online after SIGCONT", 5000);
      signal(s.child, "SIGKILL");
      await s.exited;
      await w.close();
    },
  );

  it("16 calls in flight to topic.host fail with ServerDied within 1 s of kill -9", async () => {
    const prefix = newPrefix();
    const s = await server("h5", prefix);
    const rpc = new Rpc(observer, { prefix, timeout: 30 });
    try {
      const ctx = new RequestContext();
      const calls = Array.from({ length: 16 }, () => rpc.call(ctx, "work.h5", { method: "hang" }));
      const outcomes = calls.map((c) => c.then(() => "answered", (e) => e));
      await sleep(500); // the requests reach the server
      const killedAt = performance.now();
      signal(s.child, "SIGKILL");
      const errors = await Promise.all(outcomes);
      const took = performance.now() - killedAt;
      for (const e of errors) assert.ok(e instanceof ServerDied, `${e}`);
      assert.ok(took < 1000, `failed ${Math.round(took)} ms after the kill`);
    } finally {
      await rpc.close();
    }
  });

  it(
    "kill -9 of one of three persistent-session servers: calls and casts to the topic go to the live ones, topic.host waits",
    {
      skip: NO_SHARED,
    },
    async () => {
      const prefix = newPrefix();
      const query = { params: ["session_expiry=3600"] };
      const servers = [
        await server("p1", prefix, query),
        await server("p2", prefix, query),
        await server("p3", prefix, query),
      ];
      const seen = new Map<string, string[]>();
      class Collector extends Manager {
        seen(_ctx: RequestContext, { id, host }: { id: string; host: string }) {
          seen.set(id, [...(seen.get(id) ?? []), host]);
        }
      }
      const registry = await openSqlRegistry("sqljs::memory:");
      const collector = Service.create({
        topic: "collect",
        host: "probe",
        manager: Collector,
        transport: observer,
        registry,
        prefix,
        logger: new MemoryLogger(),
      });
      await collector.start();
      const rpc = new Rpc(observer, { prefix, timeout: 5 });
      const ctx = new RequestContext();
      try {
        const before = await Promise.all(
          Array.from({ length: 60 }, () => rpc.call<string>(ctx, "work", { method: "who" })),
        );
        assert.equal(new Set(before).size, 3, "all three serve the topic");
        signal(servers[1]!.child, "SIGKILL");
        await servers[1]!.exited;
        const answers = await Promise.all(
          Array.from({ length: 300 }, () => rpc.call<string>(ctx, "work", { method: "who" })),
        );
        assert.equal(answers.length, 300);
        assert.ok(answers.every((h) => h === "p1" || h === "p3"), "only the live servers answer");
        const ids = Array.from({ length: 100 }, (_, i) => `cast-${i}`);
        for (const id of ids) await rpc.cast(ctx, "work", { method: "note", args: { id } });
        const mine = "for-p2";
        await rpc.cast(ctx, "work.p2", { method: "note", args: { id: mine } }, { timeout: 60 });
        await waitFor(() => ids.every((id) => seen.has(id)), "every cast to the topic to run", 10_000);
        for (const id of ids) assert.equal(seen.get(id)!.length, 1, `${id} ran once`);
        assert.ok(ids.every((id) => seen.get(id)![0] !== "p2"));
        assert.equal(seen.has(mine), false, "the dead device's own cast waits");
        servers[1] = await server("p2", prefix, query);
        await waitFor(() => seen.has(mine), "the device's own cast to run once it is back", 10_000);
        await sleep(300);
        assert.deepEqual(seen.get(mine), ["p2"]);
      } finally {
        await rpc.close();
        await collector.stop();
        await registry.close();
        for (const s of servers) signal(s.child, "SIGKILL");
      }
    },
  );

  it("services list --json: a stopped service is down (stopped), a killed one down (lost), each with its own settings", async () => {
    const prefix = newPrefix();
    const registry = `sqljs:${join(dir, `${prefix}.db`)}`;
    const list = async () => {
      const [cmd, ...rest] = childCommand(CLI, [
        "services",
        "list",
        "--json",
        `--registry_url=${registry}`,
        `--transport_url=${brokerUrl()}`,
        `--prefix=${prefix}`,
      ]);
      const child = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env: process.env });
      let out = "";
      child.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
      await new Promise((r) => child.on("close", r));
      return JSON.parse(out) as { host: string; state: string; reason?: string; serviceDownTime: number }[];
    };
    const a = await server("l1", prefix, { registry });
    signal(a.child, "SIGTERM");
    await a.exited;
    const b = await server("l2", prefix, { registry });
    signal(b.child, "SIGKILL");
    await b.exited;
    const rows = await list();
    const byHost = new Map(rows.map((r) => [r.host, r]));
    assert.deepEqual([byHost.get("l1")?.state, byHost.get("l1")?.reason], ["down", "stopped"]);
    assert.deepEqual([byHost.get("l2")?.state, byHost.get("l2")?.reason], ["down", "lost"]);
    assert.equal(byHost.get("l2")!.serviceDownTime, 3, "the row records its own service_down_time");
  });
});

/**
 * Issue 21's target on Mosquitto 2.0 (at MQTT_URL, else one of the test's own): a `serve` process
 * with keepalive=5 that is SIGSTOP'd is down (`lost`) in `services list --json`, run as another
 * process, within 8 s; after SIGCONT it is up again within one report interval.
 */
describe("presence on Mosquitto: a serve process with keepalive=5, stopped and continued", {
  skip: process.platform === "win32" ? "no SIGSTOP on Windows" : MQTT_URL ? false : needs("mosquitto"),
}, () => {
  const REPORT_INTERVAL = 2;
  const prefix = uniquePrefix("presence-stop");
  let mosquitto: Mosquitto | undefined;
  let url: string;
  let observer: MqttTransport;
  let registry: Registry;
  let conductor: Service | undefined;
  let child: ChildProcess | undefined;
  let running = false;
  let exited: Promise<void> = Promise.resolve();

  before(async () => {
    if (MQTT_URL) url = MQTT_URL;
    else {
      mosquitto = await Mosquitto.start();
      url = mosquitto.url;
    }
    observer = await MqttTransport.connect({ url, logger: new MemoryLogger() });
    // The registry, served over the broker: the serve process writes it while the CLI reads it.
    registry = await openSqlRegistry("sqljs::memory:");
    conductor = Service.create({
      topic: "conductor",
      host: "test",
      manager: new ConductorManager(registry),
      registry,
      transport: observer,
      prefix,
      logger: new MemoryLogger(),
    });
    await conductor.start();
  });

  after(async () => {
    // Never leave a stopped process behind: continue it, then kill it.
    if (child && running) {
      signal(child, "SIGCONT");
      signal(child, "SIGKILL");
      await exited;
    }
    await conductor?.stop();
    if (observer) {
      const topics = new Topics(prefix);
      for (const p of (await readPresence(observer, prefix, 2)).values()) {
        await observer.publish(topics.presence(p.topic, p.host), new Uint8Array(0), { qos: 1, retain: true });
      }
      await observer.close();
    }
    await registry?.close();
    await mosquitto?.stop();
  });

  /** `novalet services list --json` in a new process: the row of host `h`, and how long it took. */
  async function list(h: string) {
    const started = performance.now();
    const [cmd, ...rest] = childCommand(CLI, [
      "services",
      "list",
      "--json",
      "--registry_url=conductor:",
      `--transport_url=${url}`,
      `--prefix=${prefix}`,
    ]);
    const cli = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env: process.env });
    let out = "";
    let err = "";
    cli.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    cli.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    await new Promise((r) => cli.on("close", r));
    assert.equal(cli.exitCode, 0, `services list: ${err}`);
    const rows = JSON.parse(out) as { host: string; state: string; reason?: string }[];
    return { row: rows.find((r) => r.host === h), ms: performance.now() - started };
  }

  it("is down (lost) in services list within 8 s of SIGSTOP, and up within one report interval of SIGCONT", async () => {
    const seen: { p: Presence; at: number }[] = [];
    const sub = await observer.subscribe(new Topics(prefix).presence("work", "s5"), (payload) => {
      const p = parsePresence(payload);
      if (p) seen.push({ p, at: performance.now() });
    }, { qos: 1 });
    const state = () => seen.at(-1)?.p.state;
    const [cmd, ...rest] = childCommand(SERVER, [
      "--host=s5",
      `--prefix=${prefix}`,
      `--transport_url=${url}?keepalive=5`,
      "--registry_url=conductor:",
      `--report_interval=${REPORT_INTERVAL}`,
      "--service_down_time=30", // so that only presence can make it down here
      "--log_level=warn",
    ]);
    // Its stderr is read, not shown: after SIGCONT it warns that its presence connection was lost.
    const c = child = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env: process.env });
    running = true;
    exited = new Promise<void>((r) => c.on("exit", () => r(void (running = false))));
    let out = "";
    let err = "";
    c.stdout!.setEncoding("utf8").on("data", (d: string) => (out += d));
    c.stderr!.setEncoding("utf8").on("data", (d: string) => (err += d));
    await waitFor(() => out.includes("READY") || !running, "the server to serve", 20_000);
    assert.ok(running, `the server runs: ${err}`);
    await waitFor(() => state() === "online", "online");
    assert.equal((await list("s5")).row?.state, "up");

    const stoppedAt = performance.now();
    signal(c, "SIGSTOP");
    try {
      await waitFor(() => state() === "lost", "lost while stopped", 15_000);
      const took = seen.at(-1)!.at - stoppedAt;
      const down = await list("s5");
      console.log(
        `keepalive=5, SIGSTOP: lost after ${Math.round(took)} ms; services list (a new process) took ${
          Math.round(down.ms)
        } ms`,
      );
      assert.ok(took < 8000, `lost ${Math.round(took)} ms after SIGSTOP (target: 8 s)`);
      assert.deepEqual([down.row?.state, down.row?.reason], ["down", "lost"]);
    } finally {
      signal(c, "SIGCONT");
    }
    const continuedAt = performance.now();
    await waitFor(() => state() === "online", "online after SIGCONT", REPORT_INTERVAL * 1000 + 5000);
    const back = seen.at(-1)!.at - continuedAt;
    console.log(`keepalive=5, SIGCONT: online after ${Math.round(back)} ms`);
    assert.ok(back < REPORT_INTERVAL * 1000, `online ${Math.round(back)} ms after SIGCONT (one report interval)`);
    assert.equal((await list("s5")).row?.state, "up");
    await sub.unsubscribe();
  });
});
