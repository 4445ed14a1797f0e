/**
 * RPC end to end through Service.create() / start() / stop(), over any transport. Each
 * transport's test file calls `rpcSuite()`; raw envelopes are published straight to the
 * transport, as a foreign or hostile client would.
 */

import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  ClosedError,
  DeliveryError,
  Manager,
  RemoteError,
  RequestContext,
  Rpc,
  RpcTimeoutError,
  Service,
  type ServiceOptions,
  type Transport,
} from "../index.ts";
import type { TransportFixture } from "./transport_conformance.ts";
import { MemoryLogger, sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";

export const RPC_CASES = {
  spread: "call() to a topic spreads the calls across its servers",
  undeliverable: "call() with no server fails fast with DeliveryError",
} as const;

class QuotaExceeded extends Error {}

/** What the managers of this suite saw, per run. */
interface Seen {
  hosts: string[];
  casts: unknown[];
  forbidden: string[];
  inits: string[];
  /** The args objects the server got, kept to check that they are its own. */
  mirrored: Record<string, unknown>[];
  /** Handlers that ran to their end. */
  finished: string[];
}

function makeCalc(seen: Seen) {
  return class Calc extends Manager {
    override rpcApiVersion = "1.3";
    notAFunction = 42;
    override initHost() {
      seen.inits.push(this.host);
    }
    add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
      seen.hosts.push(this.host);
      return a + b;
    }
    whoami(ctx: RequestContext) {
      seen.hosts.push(this.host);
      return { host: this.host, ctx: ctx.toJSON() };
    }
    mirror(_ctx: RequestContext, args: Record<string, unknown>) {
      seen.mirrored.push(args);
      return { args, at: new Date(0), nan: NaN, gone: undefined, map: new Map([[1, 2]]), list: [undefined, () => 1] };
    }
    record(_ctx: RequestContext, args: unknown) {
      seen.casts.push({ host: this.host, args });
    }
    fail(_ctx: RequestContext, { how }: { how: string }) {
      if (how === "class") throw new QuotaExceeded("Quota exceeded for cores: 20 > 10");
      const e = Object.assign(new Error("Instance i-1 could not be found"), { data: { id: "i-1" } });
      e.name = "InstanceNotFound";
      throw e;
    }
    async slow(_ctx: RequestContext, { ms }: { ms: number }) {
      await sleep(ms);
      seen.finished.push("slow");
      return "done";
    }
    cyclic() {
      const o: Record<string, unknown> = {};
      o.self = o;
      return o;
    }
    unencodable(_ctx: RequestContext, { how }: { how: string }) {
      if (how === "bigint") return { n: [1n] };
      return {
        when: {
          toJSON: () => {
            throw new RangeError("Invalid time value");
          },
        },
      };
    }
    /** A naive deep merge, the classic way args pollute Object.prototype. */
    merge(_ctx: RequestContext, args: Record<string, unknown>) {
      const deepMerge = (t: Record<string, unknown>, s: Record<string, unknown>) => {
        for (const k in s) {
          const v = s[k];
          if (v && typeof v === "object") deepMerge((t[k] ??= {}) as Record<string, unknown>, v as never);
          else t[k] = v;
        }
      };
      const target: Record<string, unknown> = {};
      deepMerge(target, args);
      Object.assign({}, args);
      return { ownProto: Object.hasOwn(args, "__proto__"), keys: Object.keys(args) };
    }
    get status() {
      seen.forbidden.push("status");
      return "getter";
    }
    _secret() {
      seen.forbidden.push("_secret");
    }
    __private() {
      seen.forbidden.push("__private");
    }
    override toString() {
      seen.forbidden.push("toString");
      return "Calc";
    }
  };
}

export function rpcSuite(
  name: string,
  makeFixture: () => Promise<TransportFixture>,
  skips: Partial<Record<keyof typeof RPC_CASES, string>> = {},
  /** Size of the "huge string" inputs; 1 MiB unless the medium cannot carry that. */
  hugeBytes = 1024 * 1024,
): void {
  describe(`RPC end to end: ${name}`, () => {
    let fixture: TransportFixture;
    let prefix: string;
    let seen: Seen;
    let log: MemoryLogger;
    let services: Service[] = [];
    let transports: Transport[] = [];
    let clients: Rpc[] = [];
    const ctx = new RequestContext({ userId: "u1", projectId: "p1" });

    before(async () => {
      fixture = await makeFixture();
    });
    after(async () => {
      await fixture?.close?.();
    });
    afterEach(async () => {
      await Promise.all(clients.map((c) => c.close()));
      await Promise.all(services.map((s) => s.stop()));
      await Promise.all(transports.map((t) => t.close()));
      services = [];
      transports = [];
      clients = [];
    });

    async function transport(): Promise<Transport> {
      const t = await fixture.open();
      transports.push(t);
      return t;
    }

    /** Start one Calc server per host; returns a client on its own connection. */
    async function setup(...hosts: string[]): Promise<Rpc> {
      return await setupWith({}, ...hosts);
    }

    async function setupWith(extra: Partial<ServiceOptions>, ...hosts: string[]): Promise<Rpc> {
      prefix = uniquePrefix("rpc");
      seen = { hosts: [], casts: [], forbidden: [], inits: [], mirrored: [], finished: [] };
      log = new MemoryLogger();
      const Calc = makeCalc(seen);
      for (const host of hosts) {
        const s = Service.create({
          host,
          binary: "nova-calc",
          manager: Calc,
          transport: await transport(),
          prefix,
          logger: log,
          gracefulShutdownTimeout: 5,
          ...extra,
        });
        await s.start();
        services.push(s);
      }
      return client();
    }

    async function client(opts: { timeout?: number } = {}): Promise<Rpc> {
      const c = new Rpc(await transport(), { prefix, logger: log, ...opts });
      clients.push(c);
      return c;
    }

    /** A raw client: publishes bytes and collects replies on its own reply topic. */
    async function raw() {
      const t = await transport();
      const replyTo = `${prefix}/reply/raw-${crypto.randomUUID().slice(0, 8)}`;
      const replies: Record<string, unknown>[] = [];
      await t.subscribe(replyTo, (b) => void replies.push(JSON.parse(text(b))), { qos: 1 });
      const send = (body: string | Uint8Array, topic = `${prefix}/rpc/calc`) =>
        t.publish(topic, typeof body === "string" ? utf8(body) : body, { qos: 1 });
      const request = (fields: Record<string, unknown>) =>
        JSON.stringify({ v: 1, id: crypto.randomUUID(), method: "add", args: { a: 1, b: 1 }, ...fields });
      return { t, replyTo, replies, send, request };
    }

    it("call() returns the method's result", async () => {
      const rpc = await setup("h1");
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 2, b: 3 } }), 5);
      assert.equal(rpc.pending, 0);
    });

    it("start() runs initHost() with host set, and the service answers on calc.HOST", async () => {
      const rpc = await setup("h1");
      assert.deepEqual(seen.inits, ["h1"]);
      const r = await rpc.call<{ host: string }>(ctx, "calc.h1", { method: "whoami" });
      assert.equal(r.host, "h1");
    });

    it("cast() runs the method once and resolves without a result", async () => {
      const rpc = await setup("h1");
      assert.equal(await rpc.cast(ctx, "calc", { method: "record", args: { n: 1 } }), undefined);
      await waitFor(() => seen.casts.length === 1, "the cast");
      assert.deepEqual(seen.casts, [{ host: "h1", args: { n: 1 } }]);
    });

    it("casts to one host arrive in the order sent, small and large mixed (batched or not)", async () => {
      const rpc = await setup("h1");
      const big = "b".repeat(20_000);
      const sends = Array.from(
        { length: 40 },
        (_, n) => rpc.cast(ctx, "calc.h1", { method: "record", args: n % 7 === 3 ? { n, big } : { n } }),
      );
      await Promise.all(sends);
      await waitFor(() => seen.casts.length === 40, "40 casts");
      assert.deepEqual(
        seen.casts.map((c) => ((c as { args: { n: number } }).args.n)),
        Array.from({ length: 40 }, (_, n) => n),
      );
    });

    it("concurrent calls to one host travel in batches; batch: false sends each alone", async () => {
      await setup("h1");
      for (const batch of [true, false]) {
        const inner = await transport();
        let publishes = 0;
        const counting: Transport = {
          publish: (t, p, o) => {
            if (t.includes("/rpc/")) publishes++;
            return inner.publish(t, p, o);
          },
          subscribe: (f, h, o) => inner.subscribe(f, h, o),
          close: () => inner.close(),
        };
        const rpc = new Rpc(counting, { prefix, logger: log, batch });
        clients.push(rpc);
        const results = await Promise.all(
          Array.from({ length: 50 }, (_, i) => rpc.call(ctx, "calc.h1", { method: "add", args: { a: i, b: 1 } })),
        );
        assert.deepEqual(results, Array.from({ length: 50 }, (_, i) => i + 1));
        if (batch) assert.ok(publishes < 10, `50 calls took ${publishes} messages`);
        else assert.equal(publishes, 50);
      }
    });

    it("a batch from a foreign client is answered request by request, each alone", async () => {
      await setup("h1");
      const { send, replies, replyTo } = await raw();
      const req = (n: number) => ({ v: 1, id: `b-${n}`, method: "add", args: { a: n, b: n }, reply_to: replyTo });
      await send(
        JSON.stringify([req(1), { v: 1, id: "b-bad", method: 7, reply_to: replyTo }, req(2)]),
        `${prefix}/rpc/calc/h1`,
      );
      await waitFor(() => replies.length === 3, "three replies");
      const byId = Object.fromEntries(replies.map((r) => [r.id, r]));
      assert.equal(byId["b-1"]!.result, 2);
      assert.equal(byId["b-2"]!.result, 4);
      assert.equal((byId["b-bad"]!.error as { type: string }).type, "BadRequest");
      await send("[]", `${prefix}/rpc/calc/h1`); // an empty batch is refused and logged
      await waitFor(() => log.has("warn", /empty batch/), "the log line");
    });

    it("fanoutCast() reaches every server of the topic", async () => {
      const rpc = await setup("h1", "h2", "h3");
      await rpc.fanoutCast(ctx, "calc", { method: "record", args: { all: true } });
      await waitFor(() => seen.casts.length === 3, "three casts");
      await sleep(20);
      assert.deepEqual(seen.casts.map((c) => (c as { host: string }).host).sort(), ["h1", "h2", "h3"]);
    });

    it("call() to topic.host reaches only that host", async () => {
      const rpc = await setup("h1", "h2", "h3");
      for (let i = 0; i < 20; i++) {
        const r = await rpc.call<{ host: string }>(ctx, "calc.h2", { method: "whoami" });
        assert.equal(r.host, "h2");
      }
      assert.deepEqual(new Set(seen.hosts), new Set(["h2"]));
    });

    it(RPC_CASES.spread, skips.spread ? { skip: skips.spread } : {}, async () => {
      const rpc = await setup("h1", "h2", "h3");
      await Promise.all(
        Array.from({ length: 60 }, () => rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 1 } })),
      );
      assert.equal(seen.hosts.length, 60, "each call ran exactly once");
      for (const h of ["h1", "h2", "h3"]) {
        const n = seen.hosts.filter((x) => x === h).length;
        assert.ok(n >= 10, `${h} served ${n} of 60`);
      }
    });

    it("a handler's error arrives as RemoteError with its type, message and data", async () => {
      const rpc = await setup("h1");
      await assert.rejects(rpc.call(ctx, "calc", { method: "fail", args: { how: "class" } }), (e: RemoteError) => {
        assert.ok(e instanceof RemoteError);
        assert.equal(e.type, "QuotaExceeded");
        assert.equal(e.message, "Quota exceeded for cores: 20 > 10");
        assert.equal(e.remoteStack, undefined, "no stack trace crosses the wire by default");
        return true;
      });
      await assert.rejects(rpc.call(ctx, "calc", { method: "fail", args: { how: "name" } }), (e: RemoteError) => {
        assert.equal(e.type, "InstanceNotFound");
        assert.equal(e.message, "Instance i-1 could not be found");
        assert.deepEqual(e.data, { id: "i-1" });
        return true;
      });
    });

    it("call() rejects with RpcTimeoutError after its timeout and leaves nothing pending", async () => {
      const rpc = await setup("h1");
      const t0 = Date.now();
      await assert.rejects(
        rpc.call(ctx, "calc", { method: "slow", args: { ms: 300 } }, { timeout: 0.1 }),
        (e: Error) => e instanceof RpcTimeoutError && /no reply within 0.1 s/.test(e.message),
      );
      assert.ok(Date.now() - t0 < 290, "rejected at the timeout, not at the reply");
      assert.equal(rpc.pending, 0);
      await sleep(250); // the late reply arrives and is dropped quietly
      assert.equal(rpc.pending, 0);
    });

    it(RPC_CASES.undeliverable, skips.undeliverable ? { skip: skips.undeliverable } : {}, async () => {
      const rpc = await setup();
      const t0 = Date.now();
      await assert.rejects(rpc.call(ctx, "nobody", { method: "add" }, { timeout: 5 }), DeliveryError);
      await assert.rejects(rpc.cast(ctx, "nobody", { method: "add" }), DeliveryError);
      assert.ok(Date.now() - t0 < 2000, "failed fast, not at the timeout");
      assert.equal(rpc.pending, 0);
      await rpc.fanoutCast(ctx, "nobody", { method: "add" }); // a fanout to nobody is fine
    });

    it("an unknown method is a RemoteError of type NoSuchMethod", async () => {
      const rpc = await setup("h1");
      await assert.rejects(
        rpc.call(ctx, "calc", { method: "reboot" }),
        (e: RemoteError) => e.type === "NoSuchMethod" && /reboot/.test(e.message),
      );
    });

    it("private names, lifecycle hooks, Object.prototype and non-functions are never invoked", async () => {
      const rpc = await setup("h1");
      const names = [
        "_secret",
        "__private",
        "constructor",
        "__proto__",
        "toString",
        "hasOwnProperty",
        "valueOf",
        "isPrototypeOf",
        "__defineGetter__",
        "initHost",
        "periodicTasks",
        "notAFunction",
        "status",
        "host",
        "service",
        "rpcApiVersion",
      ];
      for (const method of names) {
        await assert.rejects(
          rpc.call(ctx, "calc", { method }),
          (e: RemoteError) => e.type === "NoSuchMethod",
          `${method} must be refused`,
        );
      }
      assert.deepEqual(seen.forbidden, []);
      assert.deepEqual(seen.inits, ["h1"], "initHost ran once, at start");
    });

    it("args cannot pollute Object.prototype, even through a naive deep merge", async () => {
      const rpc = await setup("h1");
      const evil = JSON.parse('{"__proto__": {"polluted": "yes"}, "a": {"__proto__": {"polluted": "yes"}}, "b": 1}');
      const r = await rpc.call<{ ownProto: boolean; keys: string[] }>(ctx, "calc", { method: "merge", args: evil });
      assert.equal(r.ownProto, false);
      assert.deepEqual(r.keys, ["a", "b"]);
      const { send, replies, replyTo } = await raw();
      // As a foreign client would write it, with __proto__ keys at two depths.
      await send(
        `{"v":1,"id":"${crypto.randomUUID()}","method":"merge","reply_to":"${replyTo}",` +
          `"args":{"__proto__":{"polluted":"yes"},"c":{"__proto__":{"polluted":"yes"}}}}`,
      );
      await waitFor(() => replies.length === 1, "the reply");
      assert.deepEqual(replies[0]!.result, { ownProto: false, keys: ["c"] });
      assert.equal(({} as Record<string, unknown>).polluted, undefined);
      assert.equal((Object.prototype as Record<string, unknown>).polluted, undefined);
    });

    it("malformed requests are answered with BadRequest or dropped, and the server keeps serving", async () => {
      const rpc = await setup("h1");
      const { send, request, replies, replyTo } = await raw();
      const huge = "x".repeat(hugeBytes);
      const answered: [string, string][] = [
        ["v", request({ v: 2, reply_to: replyTo })],
        ["method number", request({ method: 42, reply_to: replyTo })],
        ["method huge", request({ method: huge, reply_to: replyTo })],
        ["args array", request({ args: [1, 2], reply_to: replyTo })],
        ["args string", request({ args: "a=1", reply_to: replyTo })],
        ["context roles", request({ context: { roles: 7 }, reply_to: replyTo })],
        ["context user", request({ context: { user_id: { $ne: 1 } }, reply_to: replyTo })],
        ["version", request({ version: "one", reply_to: replyTo })],
        ["deadline", request({ deadline: "soon", reply_to: replyTo })],
      ];
      for (const [, body] of answered) await send(body);
      const dropped: (string | Uint8Array)[] = [
        "not json at all",
        "[1,2,3]",
        "null",
        "",
        new Uint8Array([0xff, 0xfe, 0x00]),
        JSON.stringify({ v: 1, method: "add", reply_to: replyTo }), // no id
        JSON.stringify({ v: 1, id: huge, method: "add", reply_to: replyTo }), // id too long
        request({ reply_to: huge }),
      ];
      for (const body of dropped) await send(body);
      await waitFor(() => replies.length === answered.length, `${answered.length} BadRequest replies`, 10_000);
      for (const r of replies) {
        const error = r.error as { type: string; message: string };
        assert.equal(error.type, "BadRequest", JSON.stringify(r).slice(0, 200));
        assert.ok(error.message.length < 400, "the error does not echo a huge input back");
      }
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 20, b: 22 } }), 42);
      assert.equal(seen.hosts.length, 1, "none of the malformed requests ran");
      assert.ok(log.has("warn", /Malformed request/), "malformed requests are logged");
    });

    it("a request over maxMessageBytes is dropped unread and the server keeps serving", async () => {
      const rpc = await setupWith({ maxMessageBytes: 64 * 1024 }, "h1");
      const { send, request, replies, replyTo } = await raw();
      const body = request({ args: { blob: "y".repeat(100 * 1024) }, reply_to: replyTo });
      await send(body);
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 2 } }, { timeout: 20 }), 3);
      await waitFor(() => log.has("warn", /over maxMessageBytes/), "the log line", 10_000);
      assert.equal(replies.length, 0);
      assert.equal(seen.hosts.length, 1);
    });

    it("a reply_to outside the reply prefix is never published to, and the request is not run", async () => {
      const rpc = await setup("h1");
      const { t, send, request } = await raw();
      const spied: string[] = [];
      await t.subscribe(`${prefix}/evil/#`, (_b, topic) => void spied.push(topic), { qos: 1 });
      await t.subscribe(`${prefix}/rpc/other/#`, (_b, topic) => void spied.push(topic), { qos: 1 });
      await t.subscribe(`${prefix}x/#`, (_b, topic) => void spied.push(topic), { qos: 1 });
      for (
        const replyTo of [
          `${prefix}/evil/x`,
          `${prefix}/rpc/other`,
          `${prefix}/reply/a/b/c`,
          `${prefix}/reply/a/+`,
          `${prefix}/reply//b`,
          `${prefix}/reply/`,
          `${prefix}/reply/+`,
          `${prefix}x/reply/y`,
          "reply",
        ]
      ) {
        await send(request({ reply_to: replyTo }));
      }
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 2 } }), 3);
      await sleep(30);
      assert.deepEqual(spied, []);
      assert.equal(seen.hosts.length, 1, "only the honest call ran");
      assert.ok(log.has("warn", /BadRequest: reply_to/));
    });

    it("an address with /, +, #, or an empty part is refused at once", async () => {
      const rpc = await setup("h1");
      for (const address of ["calc/x", "calc+", "#", "", ".h1", "calc.", "calc.h1/x", "calc.+", "ca#lc"]) {
        await assert.rejects(rpc.call(ctx, address, { method: "add" }), TypeError, `call ${address}`);
        await assert.rejects(rpc.cast(ctx, address, { method: "add" }), TypeError, `cast ${address}`);
      }
      for (const topic of ["a/b", "+", "#", ""]) {
        await assert.rejects(rpc.fanoutCast(ctx, topic, { method: "add" }), TypeError, `fanout ${topic}`);
      }
      await assert.rejects(rpc.call(ctx, "calc", { method: "a.b" }), TypeError);
      await assert.rejects(rpc.call(ctx, "calc", { method: "add", args: [1] as never }), TypeError);
      assert.equal(rpc.pending, 0);
    });

    it("the context arrives intact", async () => {
      const rpc = await setup("h1");
      const sent = new RequestContext({
        userId: "alice",
        projectId: "proj-9",
        requestId: "req-1234",
        isAdmin: true,
        roles: ["admin", "member"],
        timestamp: "2026-01-02T03:04:05.678Z",
      });
      const r = await rpc.call<{ ctx: unknown }>(ctx, "calc", { method: "whoami" }).then(() =>
        rpc.call<{ ctx: unknown }>(sent, "calc", { method: "whoami" })
      );
      assert.deepEqual(r.ctx, sent.toJSON());
      assert.deepEqual(RequestContext.from(r.ctx), sent);
    });

    it("version rules: the major must match and the requested minor must be <= the server's", async () => {
      const rpc = await setup("h1");
      for (const version of ["1.0", "1.3"]) {
        assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 1 } }, { version }), 2);
      }
      for (const version of ["1.4", "2.0", "0.9", "0.0"]) {
        await assert.rejects(
          rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 1 } }, { version }),
          (e: RemoteError) => e.type === "UnsupportedVersion" && e.message.includes(version),
          version,
        );
      }
      assert.equal(seen.hosts.length, 2);
    });

    it("a request whose deadline has passed is not executed", async () => {
      const rpc = await setup("h1");
      const { send, request, replies, replyTo } = await raw();
      await send(request({ reply_to: replyTo, deadline: Date.now() - 1000 }));
      await send(request({ method: "record", args: { late: true }, deadline: Date.now() - 1000 }));
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 1 } }), 2);
      await sleep(20);
      assert.equal(replies.length, 0);
      assert.equal(seen.hosts.length, 1);
      assert.deepEqual(seen.casts, []);
    });

    it("a duplicated message (a redelivery) executes once", async () => {
      const rpc = await setup("h1");
      const { send, request, replies, replyTo } = await raw();
      const cast = request({ method: "record", args: { n: 1 } });
      const call = request({ reply_to: replyTo });
      for (let i = 0; i < 3; i++) {
        await send(cast);
        await send(call);
      }
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 1 } }), 2);
      await waitFor(() => replies.length >= 1, "the reply");
      await sleep(30);
      assert.equal(seen.casts.length, 1);
      assert.equal(replies.length, 1);
      assert.equal(seen.hosts.length, 2, "the duplicated call and the honest one");
    });

    it("args and results arrive as their JSON would carry them, and each side keeps its own copy", async () => {
      const rpc = await setup("h1");
      const args = { d: new Date(0), u: undefined, nested: { n: 1 }, nan: NaN, f: () => 1 };
      const pending = rpc.call<Record<string, Record<string, unknown>>>(ctx, "calc", { method: "mirror", args });
      args.nested.n = 2; // the caller changes its object after the call: the server must not see it
      const r = await pending;
      const epoch = "1970-01-01T00:00:00.000Z";
      assert.deepStrictEqual(JSON.parse(JSON.stringify(r)), r, "plain JSON data");
      assert.deepEqual(r, {
        args: { d: epoch, nested: { n: 1 }, nan: null },
        at: epoch,
        nan: null,
        map: {},
        list: [null, null],
      });
      (r.args!.nested as { n: number }).n = 3; // nor does the server see what the caller does to the result
      assert.deepEqual(seen.mirrored[0], { d: epoch, nested: { n: 1 }, nan: null });
    });

    it("args that cannot be encoded (a BigInt, a cycle) reject at once with TypeError and send nothing", async () => {
      const rpc = await setup("h1");
      const cyclic: Record<string, unknown> = { n: 1 };
      cyclic.self = { back: cyclic };
      await assert.rejects(rpc.call(ctx, "calc", { method: "record", args: { n: 1n } }), TypeError);
      await assert.rejects(rpc.call(ctx, "calc.h1", { method: "record", args: cyclic }), TypeError);
      await assert.rejects(rpc.cast(ctx, "calc", { method: "record", args: { n: 1n } }), TypeError);
      await assert.rejects(rpc.fanoutCast(ctx, "calc", { method: "record", args: cyclic }), TypeError);
      assert.equal(rpc.pending, 0);
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 2 } }), 3);
      await sleep(20);
      assert.deepEqual(seen.casts, [], "nothing was sent");
    });

    it("a result that cannot be serialised is a RemoteError naming the method and the cause, not a hang", async () => {
      const rpc = await setup("h1");
      const cases: [string, Record<string, unknown>, string][] = [
        ["cyclic", {}, "Converting circular structure to JSON"],
        ["unencodable", { how: "bigint" }, "Do not know how to serialize a BigInt"],
        ["unencodable", { how: "toJSON" }, "Invalid time value"],
      ];
      for (const [method, args, cause] of cases) {
        const started = Date.now();
        const e = await rpc.call(ctx, "calc", { method, args }, { timeout: 5 }).then(
          () => assert.fail(`${method} resolved`),
          (e: unknown) => e,
        );
        assert.ok(e instanceof RemoteError, String(e));
        assert.equal(e.type, "ResultNotSerializable");
        // The same words on every path: one line, the method, what JSON said.
        assert.equal(e.message, `Cannot encode the result of "${method}": ${cause}`);
        assert.ok(Date.now() - started < 2_000, "at once, not at the timeout");
      }
      assert.equal(await rpc.call(ctx, "calc", { method: "add", args: { a: 1, b: 2 } }), 3, "still serving");
    });

    it("10,000 concurrent calls all resolve and the pending table is empty afterwards", async () => {
      const rpc = await setup("h1");
      const n = 10_000;
      const results = await Promise.all(
        Array.from({ length: n }, (_, i) => rpc.call<number>(ctx, "calc", { method: "add", args: { a: i, b: 1 } })),
      );
      assert.equal(results.length, n);
      results.forEach((r, i) => assert.equal(r, i + 1));
      assert.equal(rpc.pending, 0);
    });

    it("stop() lets in-flight calls finish, then the service takes no more", async () => {
      const rpc = await setup("h1");
      const inFlight = rpc.call(ctx, "calc", { method: "slow", args: { ms: 200 } });
      await waitFor(() => (services[0]!.dispatcher?.inFlight ?? 0) === 1, "the call to start");
      await services[0]!.stop();
      // What stop() waited for, whatever the machine's load did to the timing.
      assert.deepEqual(seen.finished, ["slow"], "stop() returned after the handler had finished");
      assert.equal(await inFlight, "done");
      await services[0]!.stop(); // twice is fine
      assert.equal(services[0]!.state, "stopped");
      await assert.rejects(
        rpc.call(ctx, "calc.h1", { method: "add" }, { timeout: 0.3 }),
        (e: Error) => e instanceof DeliveryError || e instanceof RpcTimeoutError,
      );
    });

    it("Rpc.close() fails the calls still waiting with ClosedError and refuses new ones", async () => {
      const rpc = await setup("h1");
      const waiting = assert.rejects(rpc.call(ctx, "calc", { method: "slow", args: { ms: 100 } }), ClosedError);
      await sleep(10);
      await rpc.close();
      await waiting;
      await assert.rejects(rpc.call(ctx, "calc", { method: "add" }), ClosedError);
      await rpc.close();
      assert.equal(rpc.pending, 0);
    });
  });
}
