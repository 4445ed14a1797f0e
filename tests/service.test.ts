import { afterEach, describe, it } from "node:test";
import assert from "node:assert/strict";
import { hostname } from "node:os";
import {
  ClosedError,
  DeliveryError,
  Manager,
  parseFlags,
  periodicTask,
  type Registry,
  RequestContext,
  Rpc,
  Service,
  type ServiceOptions,
  type Transport,
} from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MemoryLogger, sleep, uniquePrefix, waitFor } from "./helpers.ts";

const ctx = new RequestContext({ userId: "tester" });

/** A registry that can be made unreachable, and records the calls made to it. */
function flaky(inner: Registry) {
  const state = { down: false, calls: [] as string[] };
  const wrap = <K extends keyof Registry>(k: K) => (...args: unknown[]) => {
    state.calls.push(k);
    if (state.down) return Promise.reject(new Error("connect ECONNREFUSED 127.0.0.1:5432 (simulated)"));
    return (inner[k] as (...a: unknown[]) => unknown)(...args);
  };
  const reg = Object.fromEntries(
    (["register", "reportState", "get", "list", "setDisabled", "setForcedDown", "remove", "close"] as const).map((
      k,
    ) => [k, wrap(k)]),
  ) as unknown as Registry;
  return { reg, state };
}

/** A transport that records subscribe/unsubscribe/close events. */
function recording(inner: Transport, events: string[]): Transport {
  return {
    publish: (t, p, o) => inner.publish(t, p, o),
    async subscribe(f, h, o) {
      events.push(`subscribe ${f.split("/").slice(1).join("/")}${o?.group ? ` group=${o.group}` : ""}`);
      const s = await inner.subscribe(f, h, o);
      return {
        unsubscribe: () => {
          events.push(`unsubscribe ${f.split("/").slice(1).join("/")}`);
          return s.unsubscribe();
        },
      };
    },
    close: () => {
      events.push("transport closed");
      return inner.close();
    },
  };
}

describe("Service", () => {
  let cleanup: (() => Promise<unknown>)[] = [];
  afterEach(async () => {
    for (const c of cleanup.reverse()) await c();
    cleanup = [];
  });

  async function make(opts: Partial<ServiceOptions> & { hub?: MemoryHub } = {}) {
    const hub = opts.hub ?? new MemoryHub({ logger: new MemoryLogger() });
    const transport = opts.transport ?? new MemoryTransport(hub);
    const registry = opts.registry ?? await openSqlRegistry("sqljs::memory:");
    const log = (opts.logger as MemoryLogger | undefined) ?? new MemoryLogger();
    const prefix = opts.prefix ?? uniquePrefix("svc");
    const svc = Service.create({
      host: "h1",
      binary: "nova-echo",
      manager: "./tests/fixtures/managers.ts#EchoManager",
      periodicFuzzyDelay: 0,
      gracefulShutdownTimeout: 5,
      ...opts,
      transport,
      registry,
      logger: log,
      prefix,
    });
    cleanup.push(() => svc.stop());
    if (!opts.registry) cleanup.push(() => registry.close());
    if (!opts.transport) cleanup.push(() => transport.close());
    const rpc = new Rpc(new MemoryTransport(hub), { prefix, logger: log });
    cleanup.push(() => rpc.close());
    return { svc, rpc, registry, transport, log, hub, prefix };
  }

  it("Service.create() takes host, intervals and timeouts from flags", () => {
    const flags = parseFlags([
      "--host=edge-9",
      "--report_interval=3",
      "--periodic_interval=7",
      "--periodic_fuzzy_delay=0",
      "--graceful_shutdown_timeout=4",
    ]);
    const svc = Service.create({ manager: class extends Manager {}, flags, topic: "t" });
    assert.equal(svc.host, "edge-9");
    assert.equal(svc.reportInterval, 3);
    assert.equal(svc.periodicInterval, 7);
    assert.equal(svc.periodicFuzzyDelay, 0);
    assert.equal(svc.gracefulShutdownTimeout, 4);
    const defaults = Service.create({ manager: class extends Manager {}, topic: "t" });
    assert.equal(defaults.host, hostname());
    assert.equal(defaults.reportInterval, 10);
    assert.equal(defaults.periodicInterval, 60);
    // The binary defaults to the script's base name: tests/serve.test.ts checks it in a child.
  });

  it("Service.create() derives the topic from the binary without a leading nova-", () => {
    const M = class extends Manager {};
    assert.equal(Service.create({ manager: M, binary: "nova-compute", host: "h" }).topic, "compute");
    assert.equal(Service.create({ manager: M, binary: "scheduler", host: "h" }).topic, "scheduler");
    assert.equal(Service.create({ manager: M, binary: "nova-x", topic: "y", host: "h" }).topic, "y");
    assert.throws(() => Service.create({ manager: M, binary: "nova-a.b", host: "h" }), /topics have no "."/);
    assert.throws(() => Service.create({ manager: M, topic: "a/b", host: "h" }), TypeError);
    assert.throws(() => Service.create({ binary: "nova-compute", host: "h" }), /No manager for topic "compute"/);
  });

  it("start() loads a manager from a specifier, or from the --TOPIC_manager flag", async () => {
    const { svc, rpc } = await make();
    await svc.start();
    assert.deepEqual(await rpc.call(ctx, "echo", { method: "echo", args: { x: 1 } }), { host: "h1", args: { x: 1 } });
    const flags = parseFlags(["--echo_manager=./tests/fixtures/managers.ts#EchoManager"]);
    const second = await make({ host: "h2", manager: undefined, flags });
    await second.svc.start();
    assert.equal(second.svc.manager.constructor.name, "EchoManager");
  });

  it("start() fails clearly for a bad manager specifier, and leaves nothing running", async () => {
    const cases: [string, RegExp][] = [
      ["./tests/fixtures/managers.ts", /Invalid manager specifier .*expected "\.\/path\.ts#ClassName"/],
      ["./tests/fixtures/nope.ts#X", /Cannot load manager "\.\/tests\/fixtures\/nope\.ts#X"/],
      ["./tests/fixtures/managers.ts#Missing", /"Missing" is not an exported Manager subclass/],
      ["./tests/fixtures/managers.ts#NotAManager", /"NotAManager" is not an exported Manager subclass/],
    ];
    for (const [manager, re] of cases) {
      const { svc } = await make({ manager });
      await assert.rejects(svc.start(), re, manager);
      assert.equal(svc.state, "stopped");
    }
  });

  it("start() registers, runs initHost, consumes, then heartbeats; stop() unwinds in order", async () => {
    const events: string[] = [];
    const { reg, state } = flaky(await openSqlRegistry("sqljs::memory:"));
    cleanup.push(() => reg.close());
    class Ordered extends Manager {
      override initHost() {
        events.push(`initHost (registry calls so far: ${state.calls.join(",")})`);
      }
    }
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    const { svc } = await make({
      hub,
      manager: Ordered,
      registry: reg,
      transport: recording(new MemoryTransport(hub), events),
      reportInterval: 3600,
    });
    await svc.start();
    await waitFor(() => state.calls.includes("reportState"), "the first heartbeat, at once");
    assert.deepEqual(events, [
      "initHost (registry calls so far: register)",
      "subscribe rpc/echo group=echo",
      "subscribe rpc/echo/h1",
      "subscribe fanout/echo",
    ]);
    await svc.stop();
    assert.deepEqual(events.slice(4), ["unsubscribe rpc/echo", "unsubscribe fanout/echo", "unsubscribe rpc/echo/h1"]);
    assert.ok(!events.includes("transport closed"), "a transport passed in is not closed");
    assert.ok(!state.calls.includes("close"), "a registry passed in is not closed");
    assert.ok(!state.calls.includes("remove"), "stop() leaves the row");
    await svc.stop(); // twice is fine
    await assert.rejects(svc.start(), /already started/);
  });

  it("the heartbeat count grows every reportInterval", async () => {
    const { svc, registry } = await make({ reportInterval: 0.03 });
    await svc.start();
    await waitFor(() => (svc.record?.reportCount ?? 0) >= 4, "four heartbeats", 3000);
    const row = await registry.get(svc.record!.id);
    assert.ok(row!.reportCount >= 4);
    assert.ok(row!.lastSeenUp instanceof Date);
  });

  it("a dead registry does not stop RPC; the outage and the recovery are logged once each", async () => {
    const { reg, state } = flaky(await openSqlRegistry("sqljs::memory:"));
    cleanup.push(() => reg.close());
    state.down = true;
    const { svc, rpc, log } = await make({ registry: reg, reportInterval: 0.02 });
    await svc.start(); // registering fails: logged, and the service serves anyway
    assert.equal(svc.record, undefined);
    assert.deepEqual(await rpc.call(ctx, "echo", { method: "echo" }), { host: "h1", args: {} });
    await waitFor(() => state.calls.filter((c) => c === "register").length >= 4, "several failed attempts");
    assert.equal(log.lines.filter((l) => l.level === "error" && /registry is unreachable/.test(l.msg)).length, 1);
    state.down = false;
    await waitFor(() => svc.record !== undefined && svc.record.reportCount >= 1, "registration after recovery");
    await sleep(60);
    assert.equal(log.lines.filter((l) => /reachable again/.test(l.msg)).length, 1);
  });

  it("a heartbeat re-creates a row that was deleted", async () => {
    const { svc, registry, log } = await make({ reportInterval: 0.02 });
    await svc.start();
    await waitFor(() => svc.record !== undefined, "registration");
    const first = svc.record!.id;
    await registry.remove(first);
    await waitFor(() => svc.record!.id !== first, "a new row");
    const rows = await registry.list();
    assert.equal(rows.length, 1);
    assert.equal(rows[0]!.host, "h1");
    assert.ok(log.has("warn", /row of this service was deleted/));
  });

  it("kill() deletes the registry row; stop() keeps it", async () => {
    const a = await make({ reportInterval: 3600 });
    await a.svc.start();
    await a.svc.stop();
    assert.equal((await a.registry.list()).length, 1);
    const b = await make({ reportInterval: 3600 });
    await b.svc.start();
    await b.svc.kill();
    assert.deepEqual(await b.registry.list(), []);
  });

  it("stop() with calls in flight: every call finishes with its result, later calls are refused", async () => {
    class Slow extends Manager {
      async work(_c: RequestContext, { i }: { i: number }) {
        await sleep(100);
        return i * 2;
      }
    }
    const { svc, rpc } = await make({ manager: Slow });
    await svc.start();
    const calls = Array.from({ length: 50 }, (_, i) => rpc.call(ctx, "echo", { method: "work", args: { i } }));
    await waitFor(() => svc.dispatcher!.inFlight === 50, "50 calls in flight");
    assert.equal(await svc.stop(), true);
    assert.deepEqual(await Promise.all(calls), Array.from({ length: 50 }, (_, i) => i * 2));
    await assert.rejects(rpc.call(ctx, "echo", { method: "work", args: { i: 1 } }), DeliveryError);
  });

  it("stop() gives up on a stuck handler after gracefulShutdownTimeout and reports it", async () => {
    class Stuck extends Manager {
      hang() {
        return new Promise(() => {});
      }
    }
    const { svc, rpc, log } = await make({ manager: Stuck, gracefulShutdownTimeout: 0.1 });
    await svc.start();
    const call = rpc.call(ctx, "echo", { method: "hang" }, { timeout: 1 }).catch((e) => e);
    await waitFor(() => svc.dispatcher!.inFlight === 1, "the call in flight");
    assert.equal(await svc.stop(), false);
    assert.ok(log.has("warn", /work still running after 0.1 s/));
    await call;
  });

  it("the periodic loop runs the manager's tasks every periodicInterval until stop()", async () => {
    let ticks = 0;
    class Periodic extends Manager {
      @periodicTask()
      tick(_c: RequestContext) {
        ticks++;
      }
    }
    const { svc } = await make({ manager: Periodic, periodicInterval: 0.02 });
    await svc.start();
    await waitFor(() => ticks >= 3, "three ticks");
    await svc.stop();
    const after = ticks;
    await sleep(50);
    assert.equal(ticks, after);
  });

  it("a service closes the transport and registry it opened itself from flags", async () => {
    const flags = parseFlags([
      "--transport_url=memory://",
      "--registry_url=sqljs::memory:",
      "--periodic_fuzzy_delay=0",
    ]);
    const svc = Service.create({
      host: "h1",
      topic: uniquePrefix("own"),
      manager: class extends Manager {},
      flags,
      logger: new MemoryLogger(),
    });
    await svc.start();
    const registry = svc.registry;
    assert.equal((await registry.list()).length, 1);
    await svc.stop();
    await assert.rejects(registry.list(), ClosedError);
  });

  it("every log line a handler writes carries the request id, before and after its awaits", async () => {
    class Chatty extends Manager {
      talk(_c: RequestContext) {
        this.service.logger.info("sync handler");
      }
      async later(_c: RequestContext) {
        this.service.logger.info("async handler, before");
        await sleep(5);
        this.service.logger.info("async handler, after");
      }
      promised(_c: RequestContext) {
        return sleep(5).then(() => this.service.logger.info("promise handler, after"));
      }
    }
    const { svc, rpc, log } = await make({ manager: Chatty });
    await svc.start();
    const calls = ["talk", "later", "promised", "promised"].map((method, i) =>
      rpc.call(new RequestContext({ requestId: `req-${method}-${i}` }), "echo", { method })
    );
    await Promise.all(calls);
    const ids = (msg: string) => log.lines.filter((l) => l.msg === msg).map((l) => l.fields?.request_id);
    assert.deepEqual(ids("sync handler"), ["req-talk-0"]);
    assert.deepEqual(ids("async handler, before"), ["req-later-1"]);
    assert.deepEqual(ids("async handler, after"), ["req-later-1"]);
    // A plain function returning a promise is known to be async from its second call on.
    assert.ok(ids("promise handler, after").includes("req-promised-3"), JSON.stringify(ids("promise handler, after")));
    assert.equal(log.lines.find((l) => l.msg === "sync handler")?.fields?.service, "echo.h1");
  });
});
