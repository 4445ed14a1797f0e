/**
 * What no message, peer or outage may do to a server: crash it, wedge it, aim its replies at
 * topics a broker refuses, make it run a request twice, or make it forget its limits.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import {
  ClosedError,
  Dispatcher,
  LoopGroup,
  LoopingCall,
  Manager,
  MAX_BATCH,
  MAX_JSON_DEPTH,
  MAX_SECONDS,
  parseFlags,
  type Registry,
  RemoteError,
  RequestContext,
  Rpc,
  Service,
  type ServiceOptions,
  type Transport,
  validateFilter,
  validateTopic,
} from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MemoryLogger, sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";

const ctx = new RequestContext();

/** A transport that keeps what is published to it. */
function recorder() {
  const published: { topic: string; payload: string }[] = [];
  const transport: Transport = {
    publish: (topic, payload) => {
      published.push({ topic, payload: text(payload) });
      return Promise.resolve();
    },
    subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
    close: () => Promise.resolve(),
  };
  /** The replies published so far, batches split. */
  const replies = () =>
    published.flatMap((p) => {
      const r = JSON.parse(p.payload);
      return Array.isArray(r) ? r : [r];
    });
  return { transport, published, replies };
}

class Echo extends Manager {
  runs: unknown[] = [];
  echo(_c: RequestContext, args: unknown) {
    this.runs.push(args);
    return args;
  }
  async later(_c: RequestContext, args: unknown) {
    await sleep(30);
    return args;
  }
  record(_c: RequestContext, args: { n?: number }) {
    this.runs.push(args.n);
  }
  throwValue(_c: RequestContext, { kind }: { kind: string }) {
    throw odd(kind);
  }
  async rejectValue(_c: RequestContext, { kind }: { kind: string }) {
    await sleep(1);
    throw odd(kind);
  }
}

function odd(kind: string): unknown {
  switch (kind) {
    case "null":
      return null;
    case "undefined":
      return undefined;
    case "number":
      return 42;
    case "symbol":
      return Symbol("s");
    case "nullProto":
      return Object.create(null);
    case "badToString":
      return {
        toString: () => {
          throw new Error("no");
        },
      };
    case "badMessage": {
      const e = new Error("x");
      Object.defineProperty(e, "message", {
        get() {
          throw new Error("no message for you");
        },
      });
      return e;
    }
    case "badName": {
      const e = new Error("x");
      Object.defineProperty(e, "name", { value: 123 });
      return e;
    }
    case "proxy":
      return new Proxy({}, {
        get() {
          throw new Error("trap");
        },
        getPrototypeOf() {
          throw new Error("trap");
        },
      });
  }
  return new Error(kind);
}

const request = (id: string, method: string, args: unknown, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ v: 1, id, method, args, reply_to: "t/reply/c1", ...extra });

describe("topics a broker would refuse", () => {
  const bad = ["a/x\u0001", "a/x\u0085", "a/\uFFFF", "a/\uFDD0", "a/\u{10FFFF}", "a/\uD800", "a/\uDC00b"];

  it("validateTopic() and validateFilter() refuse control characters, non-characters and lone surrogates", () => {
    for (const t of bad) {
      assert.throws(() => validateTopic(t), TypeError, JSON.stringify(t));
      assert.throws(() => validateFilter(t), TypeError, JSON.stringify(t));
    }
    validateTopic("a/é/😀/x y");
  });

  it("validateTopic() refuses a topic over 65,535 UTF-8 bytes, counting bytes, not characters", () => {
    validateTopic("a".repeat(65_535));
    assert.throws(() => validateTopic("a".repeat(65_536)), /65535 UTF-8 bytes/);
    assert.throws(() => validateTopic("é".repeat(32_768)), /65535 UTF-8 bytes/); // 65,536 bytes
  });

  it("a request whose reply_to has a character a broker refuses is logged and never answered", () => {
    const { transport, published } = recorder();
    const log = new MemoryLogger();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: log });
    for (const c of ["\u0001", "\u0085", "\uFFFF", "\uD800"]) {
      d.handle(utf8(request("r1", "echo", {}, { reply_to: `t/reply/x${c}` })), "t/rpc/e", { qos: 1 });
      // malformed too: a BadRequest must not be aimed there either
      d.handle(utf8(request("r2", "echo", {}, { v: 2, reply_to: `t/reply/x${c}` })), "t/rpc/e", { qos: 1 });
    }
    assert.deepEqual(published, []);
    assert.deepEqual(m.runs, []);
    assert.ok(log.has("warn", /reply_to/));
  });

  it("Rpc refuses a client id or address that a broker would refuse, at once", () => {
    const t = new MemoryTransport(new MemoryHub());
    assert.throws(() => new Rpc(t, { clientId: "x\u0001" }), TypeError);
    const rpc = new Rpc(t);
    return assert.rejects(rpc.call(ctx, "calc.h\u0085", { method: "echo" }), TypeError);
  });
});

describe("bounded work", () => {
  class Slow extends Manager {
    running = 0;
    most = 0;
    release: (() => void)[] = [];
    async slow(_c: RequestContext) {
      this.running++;
      this.most = Math.max(this.most, this.running);
      await new Promise<void>((r) => this.release.push(r));
      this.running--;
      return "done";
    }
    fast(_c: RequestContext) {
      return "fast";
    }
  }

  it("runs at most maxRunning handlers, queues maxQueued, refuses the rest with Overloaded", async () => {
    const { transport, replies } = recorder();
    const m = new Slow();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger(), maxRunning: 3, maxQueued: 5 });
    // one message, a batch of 20 calls
    const batch = Array.from({ length: 20 }, (_, i) => request(`r${i}`, "slow", {}));
    d.handle(utf8(`[${batch.join(",")}]`), "t/rpc/s", { qos: 1 });
    assert.equal(m.running, 3);
    assert.deepEqual({ running: d.load.running, queued: d.load.queued }, { running: 3, queued: 5 });
    await waitFor(() => replies().length === 12, "12 refusals");
    assert.ok(replies().every((r) => r.error?.type === "Overloaded"), JSON.stringify(replies()[0]));
    assert.deepEqual(replies().map((r) => r.id), Array.from({ length: 12 }, (_, i) => `r${i + 8}`));
    // while saturated, another caller is answered at once (refused, not left waiting)
    d.handle(utf8(request("f1", "fast", {})), "t/rpc/s", { qos: 1 });
    await waitFor(() => replies().length === 13, "the refusal of f1");
    assert.equal(replies()[12].error.type, "Overloaded");
    // queued requests run as slots free up, never more than 3 at once
    while (m.release.length > 0 || d.load.queued > 0) {
      m.release.shift()?.();
      await sleep(1);
    }
    await d.drained();
    assert.equal(m.most, 3);
    const done = replies().filter((r) => r.result === "done").map((r) => r.id);
    assert.deepEqual(done, Array.from({ length: 8 }, (_, i) => `r${i}`), "answered in the order they ran");
    // and once idle, everything runs again
    d.handle(utf8(request("f2", "fast", {})), "t/rpc/s", { qos: 1 });
    await waitFor(() => replies().some((r) => r.id === "f2" && r.result === "fast"), "f2 answered");
  });

  /** A started service of Slow on its own hub; `close()` releases what it was given. */
  async function slowService(extra: Partial<ServiceOptions>) {
    const transport = new MemoryTransport(new MemoryHub());
    const registry = await openSqlRegistry();
    const svc = Service.create({
      host: "h1",
      topic: "slow",
      manager: Slow,
      transport,
      registry,
      prefix: uniquePrefix("slow"),
      logger: new MemoryLogger(),
      flags: parseFlags([]),
      ...extra,
    });
    await svc.start();
    const close = async () => {
      await svc.stop();
      await registry.close();
      await transport.close();
    };
    return { svc, transport, close };
  }

  it("a refused call reaches the caller as RemoteError of type Overloaded; the service keeps serving", async () => {
    const { svc, close } = await slowService({ maxRunningHandlers: 2, maxQueuedHandlers: 1 });
    try {
      const calls = Array.from({ length: 5 }, () => svc.rpc.call(ctx, "slow", { method: "slow" }, { timeout: 5 }));
      const settled = Promise.allSettled(calls);
      const m = svc.manager as Slow;
      await waitFor(() => m.release.length === 2, "two running");
      const refused = await Promise.allSettled(calls.slice(3));
      for (const r of refused) {
        assert.equal(r.status, "rejected");
        assert.ok(r.reason instanceof RemoteError && r.reason.type === "Overloaded", String(r.reason));
        assert.match(r.reason.message, /overloaded.*retry later/);
      }
      while ((await Promise.race([settled.then(() => true), sleep(5).then(() => false)])) === false) {
        m.release.shift()?.();
      }
      const results = await settled;
      assert.deepEqual(results.slice(0, 3).map((r) => r.status), ["fulfilled", "fulfilled", "fulfilled"]);
      assert.equal(await svc.rpc.call(ctx, "slow", { method: "fast" }), "fast");
    } finally {
      await close();
    }
  });

  it("a request refused as Overloaded runs when its very message is sent again", async () => {
    const { transport, replies } = recorder();
    const m = new Slow();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger(), maxRunning: 1, maxQueued: 0 });
    d.handle(utf8(request("r0", "slow", {})), "t/rpc/s");
    const again = utf8(request("r1", "fast", {}));
    d.handle(again, "t/rpc/s");
    await waitFor(() => replies().length === 1, "the refusal");
    assert.equal(replies()[0].error.type, "Overloaded");
    m.release.shift()!();
    await waitFor(() => replies().length === 2, "r0 answered");
    d.handle(again, "t/rpc/s"); // the caller retries with the same message: not a duplicate
    await waitFor(() => replies().length === 3, "r1 answered");
    assert.equal(replies()[2].result, "fast");
  });

  it(`a message of more than ${MAX_BATCH} requests is logged and dropped whole`, () => {
    const { transport, published } = recorder();
    const log = new MemoryLogger();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: log });
    const batch = Array.from({ length: MAX_BATCH + 1 }, (_, i) => request(`r${i}`, "echo", {}));
    d.handle(utf8(`[${batch.join(",")}]`), "t/rpc/e");
    assert.deepEqual(m.runs, []);
    assert.deepEqual(published, []);
    assert.ok(log.has("warn", /a batch of 10001 requests, over the limit of 10000/));
  });

  it("a stop that times out drops the requests still queued: they never start on a stopped service", async () => {
    const log = new MemoryLogger();
    const flags = parseFlags(["--graceful_shutdown_timeout=0.2"]);
    const { svc, transport, close } = await slowService({ logger: log, maxRunningHandlers: 1, flags });
    const m = svc.manager as Slow;
    const rpc = new Rpc(transport, { prefix: svc.rpc.topics.prefix });
    for (let i = 0; i < 3; i++) void rpc.cast(ctx, "slow", { method: "slow" });
    await waitFor(() => svc.dispatcher!.load.queued === 2, "one running, two queued");
    assert.equal(await svc.stop(), false);
    assert.ok(log.has("warn", /2 queued request\(s\) dropped unrun/));
    m.release.shift()!(); // the hung handler finishes after all
    await sleep(20);
    assert.equal(m.release.length, 0, "nothing queued started");
    assert.equal(svc.dispatcher!.inFlight, 0);
    await rpc.close();
    await close();
  });

  it("requests held at once are bounded in bytes too: large ones past maxHeldBytes are refused", async () => {
    const { transport, replies } = recorder();
    const m = new Slow();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger(), maxHeldBytes: 10_000 });
    const big = (id: string) => utf8(request(id, "slow", { pad: "x".repeat(4_000) }));
    for (let i = 0; i < 5; i++) d.handle(big(`b${i}`), "t/rpc/s");
    // two fit in 10,000 bytes (running: slots are free); the rest are refused, not queued
    assert.deepEqual({ running: d.load.running, queued: d.load.queued }, { running: 2, queued: 0 });
    await waitFor(() => replies().length === 3, "three refusals");
    assert.ok(replies().every((r) => r.error?.type === "Overloaded"));
    // one request larger than the bound is still taken when nothing is held
    while (m.release.length > 0) m.release.shift()!();
    await waitFor(() => d.load.bytes === 0, "nothing held");
    d.handle(utf8(request("huge", "slow", { pad: "x".repeat(20_000) })), "t/rpc/s");
    assert.equal(d.load.running, 1);
    m.release.shift()!();
    await d.drained();
    assert.equal(d.load.bytes, 0);
  });

  it("a reply too large for the transport reaches the caller as ReplyTooLarge, not as a timeout", async () => {
    const published: string[] = [];
    const transport: Transport = {
      publish: (_t, p) => {
        if (p.byteLength > 1_000) return Promise.reject(new RangeError(`Cannot publish ${p.byteLength} bytes`));
        published.push(text(p));
        return Promise.resolve();
      },
      subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
      close: () => Promise.resolve(),
    };
    const d = new Dispatcher(new Echo(), transport, { prefix: "t", logger: new MemoryLogger() });
    d.handle(utf8(request("r1", "echo", { pad: "x".repeat(5_000) })), "t/rpc/e");
    await waitFor(() => published.length === 1, "the error reply");
    const reply = JSON.parse(published[0]!);
    assert.equal(reply.id, "r1");
    assert.equal(reply.error.type, "ReplyTooLarge");
    assert.match(reply.error.message, /Cannot publish \d+ bytes/);
  });

  it("the limits are flags, checked", () => {
    const f = parseFlags(["--max_running_handlers=8", "--max_queued_handlers=0"]);
    assert.equal(f.maxRunningHandlers, 8);
    assert.equal(f.maxQueuedHandlers, 0);
    assert.equal(parseFlags([]).maxRunningHandlers, 64);
    assert.throws(() => parseFlags(["--max_running_handlers=0"]), /max_running_handlers.*>= 1/);
    assert.throws(() => parseFlags(["--max_queued_handlers=1.5"]), /max_queued_handlers/);
  });
});

describe("durations beyond a timer's limit", () => {
  const month = 30 * 24 * 3600;

  it("a loop with a 30-day interval runs once, not every millisecond", async () => {
    let runs = 0;
    const loop = new LoopingCall(() => void runs++, { logger: new MemoryLogger() }).start({ interval: month });
    await sleep(50);
    loop.stop();
    await loop.done;
    assert.equal(runs, 1);
  });

  it("LoopGroup.stop() with a 30-day graceful timeout waits for the work, not 1 ms", async () => {
    const group = new LoopGroup();
    group.track(sleep(60));
    assert.equal(await group.stop(month), true);
  });

  it("a call with a 30-day timeout waits for its reply", async () => {
    const hub = new MemoryHub();
    const server = new MemoryTransport(hub);
    const prefix = uniquePrefix("long");
    const d = new Dispatcher(new Echo(), server, { prefix, logger: new MemoryLogger() });
    await server.subscribe(`${prefix}/rpc/echo`, d.handle, { local: true });
    const rpc = new Rpc(new MemoryTransport(hub), { prefix });
    // Node warns when a timer overflows (and fires it after 1 ms, again and again while the call waits)
    const warnings: string[] = [];
    const onWarning = (w: Error) => warnings.push(w.name);
    process.on("warning", onWarning);
    try {
      assert.deepEqual(await rpc.call(ctx, "echo", { method: "later", args: { a: 1 } }, { timeout: month }), { a: 1 });
      await sleep(1);
    } finally {
      process.off("warning", onWarning);
    }
    assert.deepEqual(warnings.filter((w) => w === "TimeoutOverflowWarning"), []);
    await rpc.close();
    await server.close();
  });

  it("durations over MAX_SECONDS are refused with an error naming them", () => {
    assert.throws(() => parseFlags([`--periodic_interval=${MAX_SECONDS + 1}`]), /--periodic_interval.*at most/);
    assert.throws(() => parseFlags(["--report_interval=1e400"]), /--report_interval/);
    const rpc = new Rpc(new MemoryTransport(new MemoryHub()));
    assert.throws(() => new Rpc(new MemoryTransport(new MemoryHub()), { timeout: 2 ** 32 }), RangeError);
    return assert.rejects(rpc.call(ctx, "x", { method: "m" }, { timeout: 2 ** 33 }), /timeout.*at most/);
  });
});

describe("duplicate suppression that a publisher cannot flush or poison", () => {
  const own = (n: number) => `0f41e7e0-9d81-8c4e-9d4b-${n.toString(16).padStart(12, "0")}`;
  const cast = (id: string, n: number, deadline = Date.now() + 60_000) =>
    JSON.stringify({ v: 1, id, method: "record", args: { n }, deadline });

  it("a redelivery within its deadline runs once, even after 10,000 other ids in one message", () => {
    const { transport } = recorder();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger() });
    const real = utf8(cast(own(1), 1));
    d.handle(real, "t/rpc/e", { qos: 1 });
    const junk = Array.from({ length: 10_000 }, (_, i) => cast(`junk-${i}`, -1));
    d.handle(utf8(`[${junk.join(",")}]`), "t/rpc/e", { qos: 1 });
    d.handle(real, "t/rpc/e", { qos: 1 }); // the broker delivers it again
    assert.equal(m.runs.filter((n) => n === 1).length, 1);
  });

  it("a flood of ids from 5,000 new clients does not push out a known client's id", () => {
    const { transport } = recorder();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger() });
    const real = utf8(cast(own(1), 1));
    d.handle(real, "t/rpc/e", { qos: 1 });
    const fake = (i: number) => `${i.toString(16).padStart(8, "0")}-9d81-8c4e-9d4b-000000000001`;
    const junk = Array.from({ length: 5_000 }, (_, i) => cast(fake(i), -1));
    const t0 = performance.now();
    d.handle(utf8(`[${junk.join(",")}]`), "t/rpc/e", { qos: 1 });
    assert.ok(performance.now() - t0 < 2000, "no scan per new client");
    d.handle(real, "t/rpc/e", { qos: 1 });
    assert.equal(m.runs.filter((n) => n === 1).length, 1);
    assert.equal(m.runs.length, 5_001, "every junk request ran once");
  });

  it("another message sent first under a client's next id does not make its real request a duplicate", () => {
    const { transport } = recorder();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger() });
    d.handle(utf8(cast(own(7), 666)), "t/rpc/e", { qos: 1 }); // a guess at the client's next id
    const real = utf8(cast(own(7), 7));
    d.handle(real, "t/rpc/e", { qos: 1 });
    d.handle(real, "t/rpc/e", { qos: 1 }); // and its redelivery is still a duplicate
    assert.deepEqual(m.runs, [666, 7]);
  });

  it("an id is forgotten once its deadline passed; at most dedupSize foreign ids are kept", async () => {
    const { transport } = recorder();
    const m = new Echo();
    const log = new MemoryLogger();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: log, dedupSize: 3 });
    const soon = Date.now() + 30;
    d.handle(utf8(cast(own(1), 1, soon)), "t/rpc/e", { qos: 1 });
    d.handle(utf8(cast("f1", 11, soon)), "t/rpc/e", { qos: 1 });
    await sleep(40);
    // Their deadlines passed: a copy now is dropped as late, and their room is free again.
    const f = [0, 1, 2, 3, 4, 5].map((i) => utf8(cast(`f${i}`, 10 + i))); // a redelivery is the same bytes
    for (let i = 2; i <= 5; i++) d.handle(f[i]!, "t/rpc/e", { qos: 1 });
    assert.ok(log.has("warn", /Duplicate suppression is full \(dedupSize 3\)/));
    d.handle(f[2]!, "t/rpc/e", { qos: 1 }); // pushed out by the bound: runs again
    d.handle(f[5]!, "t/rpc/e", { qos: 1 }); // kept: dropped
    assert.deepEqual(m.runs, [1, 11, 12, 13, 14, 15, 12]);
  });
});

describe("hostile shapes", () => {
  it(`a request nested deeper than ${MAX_JSON_DEPTH} levels is answered BadRequest, in a batch too`, async () => {
    const { transport, replies } = recorder();
    const m = new Echo();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger() });
    const deep = (n: number) => "[".repeat(n) + "]".repeat(n);
    d.handle(
      utf8(`{"v":1,"id":"d1","method":"echo","args":{"x":${deep(100_000)}},"reply_to":"t/reply/c1"}`),
      "t/rpc/e",
    );
    d.handle(utf8(`{"v":1,"id":"d2","method":${deep(100_000)},"reply_to":"t/reply/c1"}`), "t/rpc/e");
    d.handle(utf8(`[${request("d3", "echo", { x: JSON.parse(deep(70)) })}]`), "t/rpc/e");
    d.handle(utf8(request("ok", "echo", { x: JSON.parse(deep(50)) })), "t/rpc/e");
    await waitFor(() => replies().length === 4, "four replies");
    const byId = Object.fromEntries(replies().map((r) => [r.id, r]));
    for (const id of ["d1", "d2", "d3"]) assert.equal(byId[id].error?.type, "BadRequest", id);
    assert.match(byId.d1.error.message, /nested deeper than 64 levels/);
    assert.ok("result" in byId.ok);
    assert.equal(m.runs.length, 1);
  });

  for (
    const kind of [
      "null",
      "undefined",
      "number",
      "symbol",
      "nullProto",
      "badToString",
      "badMessage",
      "badName",
      "proxy",
    ]
  ) {
    it(`a handler that throws ${kind} gets an error reply, sync and async`, async () => {
      const { transport, replies } = recorder();
      const d = new Dispatcher(new Echo(), transport, { prefix: "t", logger: new MemoryLogger() });
      d.handle(utf8(request("s", "throwValue", { kind })), "t/rpc/e");
      d.handle(utf8(request("a", "rejectValue", { kind })), "t/rpc/e");
      await waitFor(() => replies().length === 2, "two replies");
      for (const r of replies()) {
        assert.equal(typeof r.error?.type, "string", JSON.stringify(r));
        assert.equal(typeof r.error?.message, "string", JSON.stringify(r));
      }
    });
  }

  it("maxPending counts calls made before the reply subscription is ready", async () => {
    const hub = new MemoryHub();
    const rpc = new Rpc(new MemoryTransport(hub), { maxPending: 100, prefix: uniquePrefix("mp") });
    const calls = Array.from({ length: 150 }, () => rpc.call(ctx, "nobody", { method: "m" }, { timeout: 1 }));
    const results = await Promise.allSettled(calls);
    const full = results.filter((r) => r.status === "rejected" && /maxPending/.test(String(r.reason)));
    assert.equal(full.length, 50);
    await rpc.close();
  });
});

describe("a registry that hangs", () => {
  /** A registry whose operations hang while `state.hang` is set (a half-open connection). */
  function hanging(inner: Registry) {
    const state = { hang: false, hung: 0 };
    const reg = new Proxy(inner, {
      get(target, key) {
        const v = Reflect.get(target, key);
        if (typeof v !== "function" || key === "close") return typeof v === "function" ? v.bind(target) : v;
        return (...args: unknown[]) => {
          if (!state.hang) return v.apply(target, args);
          state.hung++;
          return new Promise(() => {});
        };
      },
    });
    return { reg, state };
  }
  const opened: { close(): Promise<void> }[] = [];
  after(async () => {
    for (const o of opened) await o.close();
  });

  it("a hung heartbeat is abandoned and logged; heartbeats resume when the registry answers again", async () => {
    const inner = await openSqlRegistry();
    opened.push(inner);
    const { reg, state } = hanging(inner);
    const log = new MemoryLogger();
    const transport = new MemoryTransport(new MemoryHub());
    opened.push(transport);
    const svc = Service.create({
      host: "h1",
      topic: "hb",
      manager: Echo,
      transport,
      registry: reg,
      logger: log,
      flags: parseFlags(["--report_interval=0.2", "--service_down_time=1"]),
    });
    await svc.start();
    state.hang = true;
    await waitFor(() => log.has("error", /Heartbeat failed/), "the hung heartbeat reported", 3000);
    const failed = log.lines.find((l) => /Heartbeat failed/.test(l.msg));
    assert.match(String((failed?.fields?.error as Error).message), /no answer to report within 1 s/);
    const before = (await inner.get(svc.record!.id))!.reportCount;
    state.hang = false;
    await waitFor(() => log.has("info", /reachable again/), "heartbeats resumed", 3000);
    assert.ok((await inner.get(svc.record!.id))!.reportCount > before);
    await svc.stop();
  });

  it("stop() and kill() return within graceful_shutdown_timeout while the registry hangs, and close what they opened", async () => {
    for (const how of ["stop", "kill"] as const) {
      const inner = await openSqlRegistry();
      opened.push(inner);
      const { reg, state } = hanging(inner);
      const svc = Service.create({
        host: "h1",
        topic: "hb",
        manager: Echo,
        registry: reg, // the transport (memory://) is the service's own
        logger: new MemoryLogger(),
        flags: parseFlags(["--report_interval=0.2", "--service_down_time=1", "--graceful_shutdown_timeout=1"]),
      });
      await svc.start();
      const transport = svc.transport;
      state.hang = true;
      await waitFor(() => state.hung > 0, "a hung heartbeat");
      const t0 = performance.now();
      await svc[how](); // kill() also waits on the registry's remove(), which hangs
      const took = performance.now() - t0;
      assert.ok(took < 1500, `${how}() took ${Math.round(took)} ms`);
      await assert.rejects(transport.publish("x/y", utf8("z")), ClosedError, `${how}() closed its transport`);
    }
  });
});

describe("MqttTransport.connect() refuses what it cannot carry, before connecting", () => {
  it("a URL that does not parse or names no host, and fields over their protocol's size, name the problem", async () => {
    const { MqttTransport } = await import("../transports/mqtt.ts");
    const refused = async (opts: Record<string, unknown>, re: RegExp) =>
      await assert.rejects(MqttTransport.connect({ connectTimeout: 1, ...opts }), re);
    await refused({ url: "mqtt://[::1" }, /Invalid broker URL "mqtt:\/\/\[::1": not a URL/);
    await refused({ url: "mqtt://h:99999" }, /Invalid broker URL/);
    await refused({ url: "mqtt://" }, /names no host/);
    await refused({ url: "mqtt://127.0.0.1:1?session_expiry=4294967296" }, /sessionExpiry 4294967296/);
    await refused({ url: "mqtt://127.0.0.1:1", keepalive: 65_536 }, /keepalive 65536/);
    await refused({ url: "mqtt://127.0.0.1:1", reconnectMax: 3e6 }, /reconnectMax/);
    await refused({ url: "mqtt://127.0.0.1:1?keep_alive=5" }, /Unknown parameter "keep_alive"/);
  });
});
