import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { execFile } from "node:child_process";
import process from "node:process";
import {
  BadRequest,
  ClosedError,
  Dispatcher,
  errorToWire,
  jsonCodec,
  jsonCopy,
  listPeriodicTasks,
  Manager,
  parseAddress,
  periodicTask,
  queueGetFor,
  RemoteError,
  type ReplyEnvelope,
  RequestContext,
  requires,
  Rpc,
  rpcMethods,
  RpcTimeoutError,
  Service,
  topicMatches,
  Topics,
  type Transport,
} from "../index.ts";
import { MemoryLogger, sleep, text, utf8, waitFor } from "./helpers.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";

describe("topicMatches()", () => {
  const cases: [string, string, boolean][] = [
    ["a/b/c", "a/b/c", true],
    ["a/b/c", "a/b", false],
    ["a/+/c", "a/x/c", true],
    ["a/+/c", "a/x/y/c", false],
    ["a/+", "a/", true], // an empty level is a level
    ["+/+", "/x", true],
    ["a/#", "a", true],
    ["a/#", "a/b/c", true],
    ["a/#", "ab", false],
    ["#", "a/b", true],
    ["a/b", "a/b/c", false],
  ];
  for (const [filter, topic, expected] of cases) {
    it(`topicMatches("${filter}", "${topic}") is ${expected}`, () => {
      assert.equal(topicMatches(filter, topic), expected);
    });
  }

  it("agrees with the level-by-level definition on every filter and topic of up to 3 levels", () => {
    // The definition, written the obvious way: split into levels, "+" any one, "#" the rest.
    const reference = (filter: string, topic: string): boolean => {
      const f = filter.split("/");
      const t = topic.split("/");
      for (let i = 0; i < f.length; i++) {
        if (f[i] === "#") return true;
        if (i >= t.length || (f[i] !== "+" && f[i] !== t[i])) return false;
      }
      return f.length === t.length;
    };
    const levels = ["", "a", "b", "ab"];
    const topics: string[] = [];
    const grow = (prefix: string[], depth: number) => {
      if (prefix.length > 0) topics.push(prefix.join("/"));
      if (depth > 0) { for (const l of levels) grow([...prefix, l], depth - 1); }
    };
    grow([], 3);
    const filters = new Set<string>();
    for (const t of topics) {
      const parts = t.split("/");
      for (let mask = 0; mask < 1 << parts.length; mask++) {
        const f = parts.map((p, i) => (mask >> i) & 1 ? "+" : p);
        filters.add(f.join("/"));
        filters.add([...f.slice(0, -1), "#"].join("/"));
      }
    }
    let checked = 0;
    for (const f of filters) {
      for (const t of topics) {
        assert.equal(topicMatches(f, t), reference(f, t), `topicMatches(${JSON.stringify(f)}, ${JSON.stringify(t)})`);
        checked++;
      }
    }
    assert.ok(checked > 10_000, `checked ${checked} pairs`);
  });
});

describe("addresses", () => {
  it("parseAddress() splits at the first dot: host names may contain dots", () => {
    assert.deepEqual(parseAddress("compute"), { topic: "compute" });
    assert.deepEqual(parseAddress("compute.node1.example.org"), { topic: "compute", host: "node1.example.org" });
  });
  it("queueGetFor() returns topic.host and refuses bad names", () => {
    assert.equal(queueGetFor(null, "network", "host1"), "network.host1");
    for (const [t, h] of [["net.work", "h"], ["", "h"], ["n", ""], ["n", "a/b"], ["n+", "h"], ["n", "#"]]) {
      assert.throws(() => queueGetFor(null, t!, h!), TypeError, `${t} ${h}`);
    }
  });
  it("Topics maps addresses to transport topics under the prefix", () => {
    const t = new Topics("site/a");
    assert.equal(t.forAddress("compute"), "site/a/rpc/compute");
    assert.equal(t.forAddress("compute.h1"), "site/a/rpc/compute/h1");
    assert.equal(t.fanout("compute"), "site/a/fanout/compute");
    assert.equal(t.reply("c1"), "site/a/reply/c1");
    assert.equal(t.reply("c1", "mqtt-1"), "site/a/reply/mqtt-1/c1");
    assert.ok(t.isReplyTopic("site/a/reply/c1"));
    assert.ok(t.isReplyTopic("site/a/reply/mqtt-1/c1"));
    assert.throws(() => t.reply("c1", "a/b"), TypeError);
    for (
      const bad of [
        "site/a/reply/",
        "site/a/reply/a/b/c",
        "site/a/reply/a/",
        "site/a/reply//b",
        "site/a/reply/a/+",
        "site/a/reply/+/b",
        "site/a/reply/a/#",
        "site/a/reply/+",
        "site/b/reply/c",
        "site/a/replyx",
      ]
    ) {
      assert.equal(t.isReplyTopic(bad), false, bad);
    }
    for (const bad of ["", "a//b", "a/+", "#", "a/"]) assert.throws(() => new Topics(bad), TypeError, bad);
  });
});

describe("jsonCodec", () => {
  const ok = { v: 1, id: "r1", method: "add", args: { a: 1 }, context: {}, reply_to: "p/reply/c", version: "1.2" };
  it("decodeRequest() of encodeRequest() gives the envelope back", () => {
    const req = { ...ok, v: 1 as const, deadline: 123 };
    assert.deepEqual(jsonCodec.decodeRequest(jsonCodec.encodeRequest(req)), req);
  });
  it("encodeRequest() writes what JSON.stringify writes, strings that need escaping included", () => {
    const strings = [
      'a"b',
      "a\\b",
      "tab\there",
      "nul\0",
      "del\x7f",
      "é",
      "日本",
      "\ud83d\ude00",
      "lone \ud800",
      "",
      "x".repeat(300),
    ];
    for (const s of strings) {
      for (const deadline of [1796301478123, 0.5, -0, NaN, Infinity]) {
        const req = { v: 1 as const, id: s, method: s, args: { s }, context: {}, reply_to: s, version: s, deadline };
        const text = new TextDecoder().decode(jsonCodec.encodeRequest(req));
        const expected = JSON.stringify({ ...req, context: {} });
        assert.equal(text, expected, JSON.stringify(s));
      }
    }
  });
  it("encodeReply() writes what JSON.stringify of the whole reply writes, whatever the result", () => {
    const keyed = { toJSON: (key: string) => `told ${key}` };
    const results: unknown[] = [
      3,
      -0,
      0.1,
      NaN,
      -Infinity,
      "s",
      'q"\\\n\u2028',
      true,
      null,
      undefined,
      () => 1,
      Symbol("s"),
      [1, undefined, () => 1],
      { a: { b: [keyed] }, u: undefined },
      keyed,
      new Date(0),
      new Map([[1, 2]]),
      Object.assign(Object.create({ inherited: 1 }), { own: 2 }),
      new Number(5),
      new String("boxed"),
    ];
    for (const result of results) {
      for (const id of ["x", 'i"d']) {
        const reply = { v: 1 as const, id, result };
        assert.equal(new TextDecoder().decode(jsonCodec.encodeReply(reply)), JSON.stringify(reply), String(result));
      }
    }
    const error = { v: 1 as const, id: "x", error: { type: "T", message: "m", data: keyed } };
    assert.equal(new TextDecoder().decode(jsonCodec.encodeReply(error)), JSON.stringify(error));
    const both = { ...error, result: 1 } as unknown as ReplyEnvelope; // not made by novalet, but written as it is
    assert.equal(new TextDecoder().decode(jsonCodec.encodeReply(both)), JSON.stringify(both));
    assert.throws(() => jsonCodec.encodeReply({ v: 1, id: "x", result: 1n }), /BigInt/);
  });
  it("decodeRequest() fills absent args and context with empty objects", () => {
    const r = jsonCodec.decodeRequest(utf8('{"v":1,"id":"x","method":"m"}'));
    assert.deepEqual(r, { v: 1, id: "x", method: "m", args: {}, context: {} });
  });
  it("decodeRequest() names the bad field and keeps id and reply_to for the answer", () => {
    const bad = { ...ok, args: [1] };
    assert.throws(() => jsonCodec.decodeRequest(utf8(JSON.stringify(bad))), (e: BadRequest) => {
      assert.ok(e instanceof BadRequest);
      assert.match(e.message, /"args" \[1\] must be an object/);
      assert.equal(e.id, "r1");
      assert.equal(e.replyTo, "p/reply/c");
      return true;
    });
  });
  it("decodeRequest() drops __proto__ keys at every depth", () => {
    const r = jsonCodec.decodeRequest(
      utf8('{"v":1,"id":"x","method":"m","args":{"a":{"__proto__":{"p":1}},"__proto__":{"p":1}}}'),
    );
    assert.deepEqual(Object.keys(r.args), ["a"]);
    assert.equal(Object.hasOwn(r.args.a as object, "__proto__"), false);
    assert.equal(({} as Record<string, unknown>).p, undefined);
  });
  it("encodeBatch() frames envelopes as a JSON array that decodeRequests() splits, a bad one in place", () => {
    const a = jsonCodec.encodeRequest({ v: 1, id: "a", method: "m", args: {}, context: {}, batch: true });
    const bad = utf8('{"v":1,"id":"b","method":"no such name!","reply_to":"p/reply/c"}');
    const { batch, items } = jsonCodec.decodeRequests!(jsonCodec.encodeBatch!([a, bad]));
    assert.equal(batch, true);
    assert.equal((items[0] as { id: string; batch?: boolean }).id, "a");
    assert.equal((items[0] as { batch?: boolean }).batch, true);
    assert.ok(items[1] instanceof BadRequest);
    assert.equal((items[1] as BadRequest).replyTo, "p/reply/c");
    assert.throws(() => jsonCodec.decodeRequests!(utf8("[]")), /empty batch/);
    assert.throws(() => jsonCodec.decodeRequest(utf8('{"v":1,"id":"x","method":"m","batch":"yes"}')), /"batch"/);
    const replies = jsonCodec.decodeReplies!(utf8('[{"v":1,"id":"x","result":1},{"v":1,"id":"y","result":2}]'));
    assert.deepEqual(replies.map((r) => r.id), ["x", "y"]);
  });

  it("decodeReply() accepts results and errors, and refuses other shapes", () => {
    assert.deepEqual(jsonCodec.decodeReply(utf8('{"v":1,"id":"x","result":5}')), { v: 1, id: "x", result: 5 });
    assert.deepEqual(jsonCodec.decodeReply(utf8('{"v":1,"id":"x"}')), { v: 1, id: "x", result: null });
    assert.deepEqual(
      jsonCodec.decodeReply(utf8('{"v":1,"id":"x","error":{"type":"T","message":"m","data":[1]}}')),
      { v: 1, id: "x", error: { type: "T", message: "m", data: [1] } },
    );
    for (const bad of ["{}", '{"v":1}', '{"v":1,"id":"x","error":"oops"}', "nope", "[]"]) {
      assert.throws(() => jsonCodec.decodeReply(utf8(bad)), BadRequest, bad);
    }
  });
});

describe("jsonCopy()", () => {
  class Point {
    x = 1;
    y = undefined;
    #hidden = 3;
    get z() {
      return this.#hidden;
    }
  }
  // deno-lint-ignore no-sparse-arrays
  const sparse = [1, , 3];
  const withToJSON = { a: 1, toJSON: (key: string) => ({ key, nested: { toJSON: () => "inner" } }) };
  const proto = JSON.parse('{"a":{"__proto__":{"polluted":1},"b":2},"__proto__":{"x":1}}');
  const values: [string, unknown][] = [
    ["primitives", [1, "s", true, null, 0, -0, 1.5e300, "\u2028", "\ud800 lone surrogate"]],
    ["non-finite numbers", [NaN, Infinity, -Infinity]],
    ["undefined, functions and symbols", { a: undefined, f() {}, s: Symbol("x"), arr: [undefined, () => 1, Symbol()] }],
    ["a Date, a Map, a Set, a RegExp", { d: new Date(0), m: new Map([[1, 2]]), set: new Set([1]), r: /x/g }],
    ["an invalid Date", { d: new Date(NaN) }],
    ["boxed primitives", [new Number(3), new String("s"), new Boolean(false)]],
    ["a class instance (own enumerable fields only)", new Point()],
    ["typed arrays and a Buffer", { u: new Uint8Array([1, 2]), f: new Float64Array([0.5]), b: Buffer.from("hi") }],
    ["toJSON with its key, not called again on what it returns", { k: withToJSON, list: [withToJSON] }],
    ["a sparse array", sparse],
    ["integer-like keys keep JSON's order", { b: 1, 2: "two", a: 2, 1: "one" }],
    ["__proto__ keys are dropped at any depth", proto],
    ["deep nesting", JSON.parse("[".repeat(200) + "]".repeat(200))],
    [
      "a shared (not cyclic) object",
      (() => {
        const o = { v: 1 };
        return { a: o, b: [o, o] };
      })(),
    ],
  ];
  for (const [name, v] of values) {
    it(`copies ${name} as JSON.parse(JSON.stringify(v)) does`, () => {
      const expected = JSON.parse(JSON.stringify(v), (k, x) => k === "__proto__" ? undefined : x);
      const got = jsonCopy(v);
      assert.deepStrictEqual(got, expected);
      assert.equal(JSON.stringify(got), JSON.stringify(expected), "same key order");
    });
  }

  it("shares nothing mutable with its input", () => {
    const v = { a: { b: [1, { c: 2 }] } };
    const c = jsonCopy(v) as typeof v;
    (c.a.b[1] as { c: number }).c = 99;
    assert.equal((v.a.b[1] as { c: number }).c, 2);
  });

  it("throws TypeError on a BigInt and on a cycle, as JSON.stringify does", () => {
    const cyclic: Record<string, unknown> = { a: 1 };
    cyclic.self = { back: cyclic };
    for (const bad of [{ n: 10n }, [1n], cyclic]) {
      assert.throws(() => JSON.stringify(bad), TypeError);
      assert.throws(() => jsonCopy(bad), TypeError);
    }
  });

  it("a toJSON() that copies an object the outer copy is inside is no cycle, as with JSON.stringify", () => {
    let depth = 0;
    const outer = {
      n: 1,
      b: {
        toJSON(): unknown {
          depth++;
          try {
            return depth > 1 ? "inner" : jsonCopy(outer); // outer is being copied right now
          } finally {
            depth--;
          }
        },
      },
    };
    const viaJson = JSON.parse(JSON.stringify(outer));
    assert.deepEqual(viaJson, { n: 1, b: { n: 1, b: "inner" } });
    assert.deepEqual(jsonCopy(outer), viaJson);
  });

  it("copies well after a copy that threw half-way", () => {
    assert.throws(() => jsonCopy({ a: { b: [{ c: 1n }] } }), TypeError);
    const shared = { v: 1 };
    assert.deepEqual(jsonCopy({ a: shared, b: shared, c: [shared] }), { a: { v: 1 }, b: { v: 1 }, c: [{ v: 1 }] });
  });

  it("jsonCodec.copy() of a request equals decoding its encoding, with the context rebuilt", () => {
    const ctx = new RequestContext({ userId: "u", roles: ["admin"] });
    const req = {
      v: 1 as const,
      id: "i",
      method: "m",
      args: { d: new Date(0), u: undefined },
      context: ctx,
      reply_to: "novalet/reply/x",
      deadline: 5,
    };
    const copied = jsonCodec.copy!(req);
    const decoded = jsonCodec.decodeRequest(jsonCodec.encodeRequest(req));
    assert.ok(copied.context instanceof RequestContext && copied.context !== ctx);
    assert.deepEqual(RequestContext.from(copied.context).toJSON(), RequestContext.from(decoded.context).toJSON());
    assert.deepStrictEqual({ ...copied, context: null }, { ...decoded, context: null });
    const keyed = { toJSON: (key: string) => `key ${key}` }; // toJSON sees where it stands
    const reply = { v: 1 as const, id: "i", result: { at: new Date(0), n: NaN, keyed } };
    assert.deepStrictEqual(jsonCodec.copy!(reply), jsonCodec.decodeReply(jsonCodec.encodeReply(reply)));
    const whole = { v: 1 as const, id: "i", result: keyed };
    assert.deepStrictEqual(jsonCodec.copy!(whole), jsonCodec.decodeReply(jsonCodec.encodeReply(whole)));
    assert.equal((jsonCodec.copy!(whole) as { result: unknown }).result, "key result");
  });
});

describe("RequestContext", () => {
  it("a request carries only the context fields that differ from their defaults; the server gets them all back", () => {
    const wire = (context: RequestContext) =>
      JSON.parse(
        new TextDecoder().decode(jsonCodec.encodeRequest({ v: 1, id: "i", method: "m", args: {}, context })),
      ).context;
    const anonymous = new RequestContext({ requestId: "req-1", timestamp: "2026-01-01T00:00:00.000Z" });
    assert.deepEqual(wire(anonymous), { request_id: "req-1", timestamp: "2026-01-01T00:00:00.000Z" });
    assert.deepEqual(RequestContext.from(wire(anonymous)), anonymous);
    const full = new RequestContext({ userId: "u", projectId: "p", isAdmin: true, roles: ["r"], requestId: "req-2" });
    assert.deepEqual(wire(full), full.toJSON());
    assert.deepEqual(RequestContext.from(wire(full)), full);
    // toJSON() itself stays complete: logs and foreign code see every field.
    assert.deepEqual(Object.keys(anonymous.toJSON()), [
      "user_id",
      "project_id",
      "request_id",
      "is_admin",
      "roles",
      "timestamp",
    ]);
  });
  it("RequestContext.from(JSON round trip) equals the original", () => {
    const c = new RequestContext({ userId: "u", projectId: "p", isAdmin: true, roles: ["r"] });
    assert.deepEqual(RequestContext.from(JSON.parse(JSON.stringify(c))), c);
  });
  it("new RequestContext() makes a req-<uuid> request id and a timestamp", () => {
    const c = new RequestContext();
    assert.match(c.requestId, /^req-[0-9a-f-]{36}$/);
    assert.ok(!Number.isNaN(Date.parse(c.timestamp)));
    assert.equal(c.userId, null);
  });
  it("RequestContext.from() refuses wrong types naming the field", () => {
    assert.throws(() => RequestContext.from({ is_admin: "yes" }), /"is_admin"/);
    assert.throws(() => RequestContext.from({ roles: [1] }), /"roles"/);
    assert.throws(() => RequestContext.from({ user_id: 5 }), /"user_id"/);
    assert.throws(() => RequestContext.from([]), TypeError);
  });
});

describe("errors", () => {
  it("every error class is a NovaletError whose name is its class name, with cause and data", async () => {
    const mod = await import("../index.ts");
    const classes = Object.entries(mod).filter(([, v]) => typeof v === "function" && v.prototype instanceof Error);
    assert.ok(classes.length >= 12, classes.map(([k]) => k).join(", "));
    for (const [name, cls] of classes) {
      const C = cls as new (...a: unknown[]) => Error & { data?: unknown };
      const e = name === "RemoteError" ? new C("T", "m", { cause: 1, data: 2 }) : new C("m", { cause: 1, data: 2 });
      assert.ok(e instanceof mod.NovaletError, name);
      assert.equal(e.name, name);
      assert.equal(e.cause, 1, name);
      assert.equal(e.data, 2, name);
    }
    class QuotaExceeded extends mod.NovaletError {}
    assert.equal(mod.errorToWire(new QuotaExceeded("over")).type, "QuotaExceeded");
  });
});

describe("errorToWire()", () => {
  it("uses the name when set, else the class name, and keeps data", () => {
    class QuotaExceeded extends Error {}
    assert.deepEqual(errorToWire(new QuotaExceeded("q")), { type: "QuotaExceeded", message: "q" });
    const named = Object.assign(new Error("n"), { name: "NotFound", data: { id: 1 } });
    assert.deepEqual(errorToWire(named), { type: "NotFound", message: "n", data: { id: 1 } });
    assert.deepEqual(errorToWire("a string"), { type: "Error", message: "a string" });
    assert.equal(errorToWire(new Error("x")).stack, undefined);
    assert.match(errorToWire(new Error("x"), true).stack!, /Error: x/);
  });
});

describe("Manager method table", () => {
  class Base extends Manager {
    inherited() {}
    overridden() {}
  }
  class Compute extends Base {
    field = () => "not on the prototype";
    runInstance() {}
    override overridden() {}
    _hidden() {}
    get prop() {
      return 1;
    }
    @periodicTask({ spacing: 10 })
    updateResources(_ctx: RequestContext) {}
    @periodicTask({ runImmediately: false })
    heal(_ctx: RequestContext) {}
  }
  it("rpcMethods() lists only public methods declared by Manager subclasses", () => {
    assert.deepEqual([...rpcMethods(new Compute()).keys()].sort(), ["inherited", "overridden", "runInstance"]);
  });
  it("listPeriodicTasks() lists decorated methods with their options", () => {
    assert.deepEqual(listPeriodicTasks(new Compute()), [
      { name: "updateResources", spacing: 10, runImmediately: true },
      { name: "heal", spacing: 0, runImmediately: false },
    ]);
  });
  it("periodicTask() also registers under experimentalDecorators and when called by hand (plain JavaScript)", () => {
    class Legacy extends Manager {
      tick(_ctx: RequestContext) {}
      tock(_ctx: RequestContext) {}
      call() {}
    }
    // The call experimentalDecorators makes: (prototype, name, descriptor).
    periodicTask({ spacing: 5 })(Legacy.prototype, "tick", Object.getOwnPropertyDescriptor(Legacy.prototype, "tick"));
    // The documented call for JavaScript without decorators: (prototype, name).
    periodicTask({ runImmediately: false })(Legacy.prototype, "tock");
    assert.deepEqual(listPeriodicTasks(new Legacy()), [
      { name: "tick", spacing: 5, runImmediately: true },
      { name: "tock", spacing: 0, runImmediately: false },
    ]);
    assert.deepEqual([...rpcMethods(new Legacy()).keys()], ["call"]);
    assert.throws(() => periodicTask()(Legacy.prototype, "missing"), TypeError);
  });
  it("periodicTask() refuses a negative spacing", () => {
    assert.throws(() => periodicTask({ spacing: -1 }), RangeError);
  });
});

describe("requires(): methods for some roles only", () => {
  const ran: string[] = [];
  class Compute extends Manager {
    @requires("admin")
    evacuate(_ctx: RequestContext) {
      ran.push("evacuate");
    }
    @requires("operator", "admin")
    migrate(_ctx: RequestContext) {
      ran.push("migrate");
    }
    show(_ctx: RequestContext) {
      ran.push("show");
    }
    legacy(_ctx: RequestContext) {
      ran.push("legacy");
    }
  }
  requires("auditor")(Compute.prototype, "legacy"); // by hand, as plain JavaScript would

  it("refuses a caller without a required role with NotAuthorized before the method runs; admin contexts pass", async () => {
    const hub = new MemoryHub();
    const svc = Service.create({ host: "h", topic: "compute", manager: Compute, transport: new MemoryTransport(hub) });
    await svc.start();
    const rpc = new Rpc(new MemoryTransport(hub));
    const call = (ctx: RequestContext, method: string) => rpc.call(ctx, "compute", { method });
    try {
      ran.length = 0;
      const member = new RequestContext({ userId: "alice", roles: ["member"] });
      for (const m of ["evacuate", "migrate", "legacy"]) {
        await assert.rejects(
          call(member, m),
          (e: Error) =>
            e instanceof RemoteError && e.type === "NotAuthorized" && e.message.includes(`"${m}" requires the role`) &&
            e.message.includes('"alice" has none of them'),
        );
      }
      await call(member, "show");
      assert.deepEqual(ran, ["show"], "nothing refused ran");
      await call(new RequestContext({ roles: ["operator"] }), "migrate");
      await assert.rejects(call(new RequestContext({ roles: ["operator"] }), "evacuate"), /requires the role admin/);
      await call(new RequestContext({ roles: ["auditor"] }), "legacy");
      await call(RequestContext.admin(), "evacuate");
      await call(new RequestContext({ roles: ["admin"] }), "evacuate");
      assert.deepEqual(ran, ["show", "migrate", "legacy", "evacuate", "evacuate"]);
    } finally {
      await rpc.close();
      await svc.stop();
    }
  });

  it("requires() needs a role name, and applies to methods only", () => {
    assert.throws(() => requires(), TypeError);
    assert.throws(() => requires(""), TypeError);
    assert.throws(() => requires("admin")(Compute.prototype, "missing"), TypeError);
  });
});

describe("Dispatcher: requests in flight", () => {
  class Calc extends Manager {
    add(_c: RequestContext, { a, b }: { a: number; b: number }) {
      return a + b;
    }
    async later(_c: RequestContext) {
      await sleep(20);
      return 1;
    }
    ping(_c: RequestContext) {}
  }
  /** A transport whose publish fails, or waits until the test lets it through. */
  function gate() {
    const state = { fail: true, waiting: [] as (() => void)[] };
    const transport: Transport = {
      publish: () =>
        state.fail ? Promise.reject(new Error("broker gone")) : new Promise<void>((r) => state.waiting.push(r)),
      subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
      close: () => Promise.resolve(),
    };
    return { state, transport };
  }
  const request = (id: string, method: string, extra: Record<string, unknown> = {}) =>
    utf8(JSON.stringify({ v: 1, id, method, args: { a: 1, b: 2 }, reply_to: "t/reply/c1", ...extra }));

  it("a reply that cannot be published is logged with its id, and its request stops counting", async () => {
    const { transport } = gate();
    const log = new MemoryLogger();
    const d = new Dispatcher(new Calc(), transport, { prefix: "t", logger: log });
    d.handle(request("r1", "add", { batch: true }), "t/rpc/calc", { qos: 1 }); // through the outbox
    d.handle(request("r2", "add"), "t/rpc/calc", { qos: 1 }); // alone
    assert.equal(d.inFlight, 2);
    await d.drained();
    assert.equal(d.inFlight, 0);
    assert.ok(log.has("warn", /Could not send the reply to r1/));
    assert.ok(log.has("warn", /Could not send the reply to r2/));
  });

  it("a request counts until the transport took its reply; casts and refused messages count out at once", async () => {
    const { state, transport } = gate();
    state.fail = false;
    const d = new Dispatcher(new Calc(), transport, { prefix: "t", logger: new MemoryLogger() });
    d.handle(request("r3", "later", { batch: true }), "t/rpc/calc", { qos: 1 });
    d.handle(request("r4", "ping", { reply_to: undefined }), "t/rpc/calc", { qos: 1 }); // a cast
    d.handle(utf8("not json"), "t/rpc/calc", { qos: 1 }); // refused, no reply address
    d.handle(utf8("[1]"), "t/rpc/calc", { qos: 1 }); // a batch of one malformed item
    assert.equal(d.inFlight, 1, "only the async call");
    let drained = false;
    void d.drained().then(() => (drained = true));
    await waitFor(() => state.waiting.length === 1, "the reply handed to the transport");
    await sleep(10);
    assert.equal(drained, false, "still in flight while the transport has not taken the reply");
    state.waiting[0]!();
    await waitFor(() => drained, "drained once the reply is taken");
    assert.equal(d.inFlight, 0);
  });
});

describe("Dispatcher: replies while quiet and under load", () => {
  class Calc extends Manager {
    add(_c: RequestContext, { a, b }: { a: number; b: number }) {
      return a + b;
    }
  }
  /** A transport that records what is published; publish() settles at once, or when let through. */
  function recorder() {
    const sent: { topic: string; ids: string[] }[] = [];
    const held: (() => void)[] = [];
    const state = { hold: false };
    const transport: Transport = {
      publish: (topic, payload) => {
        const body = JSON.parse(text(payload)) as { id: string } | { id: string }[];
        sent.push({ topic, ids: Array.isArray(body) ? body.map((r) => r.id) : [body.id] });
        return state.hold ? new Promise<void>((r) => held.push(r)) : Promise.resolve();
      },
      subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
      close: () => Promise.resolve(),
    };
    return { sent, held, state, transport };
  }
  const request = (id: string) =>
    utf8(JSON.stringify({ v: 1, id, method: "add", args: { a: 1, b: 2 }, reply_to: "t/reply/c1", batch: true }));
  const turn = () => new Promise((r) => setTimeout(r, 0));

  /** Three turns that send one reply each: from then on traffic is quiet. */
  async function quieten(d: Dispatcher, sent: { ids: string[] }[], tag: string) {
    for (let n = 0; n < 3; n++) {
      const before = sent.length;
      d.handle(request(`${tag}${n}`), "t/rpc/calc", { qos: 0 });
      assert.equal(sent.length, before, `${tag}${n} waits for the end of its turn`);
      await turn();
      assert.equal(sent.length, before + 1);
    }
  }

  it("after three lone turns a reply leaves at once; replies of a busier turn share a message", async () => {
    const { sent, transport } = recorder();
    const d = new Dispatcher(new Calc(), transport, { prefix: "t", logger: new MemoryLogger() });
    await quieten(d, sent, "q");
    d.handle(request("a"), "t/rpc/calc", { qos: 0 });
    assert.deepEqual(sent.slice(3).map((m) => m.ids), [["a"]], "quiet: published before handle() returned");
    await turn();

    // Three in one turn: the first finds the traffic quiet, the others wait and share a message.
    for (const id of ["c", "d", "e"]) d.handle(request(id), "t/rpc/calc", { qos: 0 });
    assert.deepEqual(sent.slice(4).map((m) => m.ids), [["c"]]);
    await turn();
    assert.deepEqual(sent.slice(4).map((m) => m.ids), [["c"], ["d", "e"]]);

    // After a busy turn replies wait for company until three turns in a row have sent one.
    await quieten(d, sent, "r");
    d.handle(request("f"), "t/rpc/calc", { qos: 0 });
    assert.deepEqual(sent.at(-1)!.ids, ["f"], "quiet again");
    await turn();

    // Two in one turn make a busy turn too, although only the second waited.
    d.handle(request("h"), "t/rpc/calc", { qos: 0 });
    d.handle(request("i"), "t/rpc/calc", { qos: 0 });
    await turn();
    d.handle(request("j"), "t/rpc/calc", { qos: 0 });
    assert.deepEqual(sent.slice(-2).map((m) => m.ids), [["h"], ["i"]], "j waits");
    await d.drained();
    assert.deepEqual(sent.slice(-3).map((m) => m.ids), [["h"], ["i"], ["j"]]);
  });

  it("while the transport has not answered a reply, the next one waits for the end of the turn, in order", async () => {
    const { sent, held, state, transport } = recorder();
    const d = new Dispatcher(new Calc(), transport, { prefix: "t", logger: new MemoryLogger() });
    await quieten(d, sent, "q");
    state.hold = true;
    d.handle(request("b"), "t/rpc/calc", { qos: 1 });
    assert.equal(sent.length, 4, "b at once");
    await turn();
    d.handle(request("c"), "t/rpc/calc", { qos: 1 });
    assert.equal(sent.length, 4, "c waits: b is not answered yet");
    await turn();
    assert.deepEqual(sent.slice(3).map((m) => m.ids), [["b"], ["c"]]);
    assert.equal(d.inFlight, 2);
    for (const r of held.splice(0)) r();
    await d.drained();
  });
});

describe("Rpc: calls waiting for replies", () => {
  /** An Rpc over a transport that keeps each request and lets the test answer it, in any order. */
  function setup() {
    const sent: { id: string; args: { n: number } }[] = [];
    let deliver!: (payload: Uint8Array, topic: string) => void;
    const transport: Transport = {
      publish: (_topic, payload) => {
        sent.push(JSON.parse(text(payload)));
        return Promise.resolve();
      },
      subscribe: (_filter, handler) => {
        deliver = handler as typeof deliver;
        return Promise.resolve({ unsubscribe: () => Promise.resolve() });
      },
      close: () => Promise.resolve(),
    };
    const rpc = new Rpc(transport, { prefix: "t", timeout: 5, logger: new MemoryLogger() });
    const call = (n: number, timeout?: number) =>
      rpc.call<number>(new RequestContext(), "svc", { method: "double", args: { n } }, { timeout });
    const answer = (id: string, result: number) =>
      deliver(utf8(JSON.stringify({ v: 1, id, result })), `t/reply/${rpc.clientId}`);
    const answerOwn = (i: number) => answer(sent[i]!.id, sent[i]!.args.n * 2);
    return { rpc, sent, call, answer, answerOwn };
  }
  /** A fixed pseudo-random order (a failure must repeat). */
  function shuffled(n: number, seed = 42): number[] {
    const order = Array.from({ length: n }, (_, i) => i);
    for (let i = n - 1; i > 0; i--) {
      seed = (seed * 1103515245 + 12345) % 2 ** 31;
      const j = seed % (i + 1);
      [order[i], order[j]] = [order[j]!, order[i]!];
    }
    return order;
  }

  it("5,000 calls waiting at once each get their own reply, answered in random order", async () => {
    const { rpc, sent, call, answerOwn } = setup();
    const results = Array.from({ length: 5000 }, (_, n) => call(n));
    await waitFor(() => sent.length === 5000, "all requests sent");
    assert.equal(rpc.pending, 5000);
    for (const i of shuffled(5000)) answerOwn(i);
    assert.deepEqual(await Promise.all(results), Array.from({ length: 5000 }, (_, n) => n * 2));
    assert.equal(rpc.pending, 0);
    answerOwn(17); // a second reply to an answered call is dropped
    assert.equal(rpc.pending, 0);
    await rpc.close();
  });

  it("calls left waiting while thousands of others come and go, or time out, still get their replies", async () => {
    const { rpc, sent, call, answerOwn } = setup();
    const early = [call(-1), call(-2), call(-3)];
    const expiring = call(-4, 0.05);
    await waitFor(() => sent.length === 4, "the first requests sent");
    for (let round = 0; round < 300; round++) {
      const batch = Array.from({ length: 10 }, (_, k) => call(round * 10 + k));
      const first = sent.length - 10;
      await waitFor(() => sent.length === first + 10, "a batch sent");
      for (const k of shuffled(10, round + 1)) answerOwn(first + k);
      assert.deepEqual(await Promise.all(batch), batch.map((_, k) => (round * 10 + k) * 2));
    }
    await assert.rejects(expiring, RpcTimeoutError);
    answerOwn(3); // too late: dropped
    answerOwn(1);
    answerOwn(0);
    answerOwn(2);
    assert.deepEqual(await Promise.all(early), [-2, -4, -6]);
    assert.equal(rpc.pending, 0);
    await rpc.close();
  });

  it("a reply whose id differs from a call's only in its client part does not settle that call", async () => {
    const { rpc, sent, call, answer, answerOwn } = setup();
    const result = call(21);
    await waitFor(() => sent.length === 1, "the request sent");
    const id = sent[0]!.id;
    const other = (id[0] === "a" ? "b" : "a") + id.slice(1); // same counter, another client
    answer(other, 0);
    answer(id.toUpperCase(), 0); // ids are compared exactly
    assert.equal(rpc.pending, 1);
    answerOwn(0);
    assert.equal(await result, 42);
    await rpc.close();
  });

  it("close() rejects every call still waiting, and only those", async () => {
    const { rpc, sent, call, answerOwn } = setup();
    const results = Array.from({ length: 2000 }, (_, n) => call(n));
    await waitFor(() => sent.length === 2000, "all requests sent");
    for (let i = 0; i < 2000; i += 2) answerOwn(i);
    await rpc.close();
    const settled = await Promise.allSettled(results);
    settled.forEach((s, n) => {
      if (n % 2 === 0) assert.deepEqual(s, { status: "fulfilled", value: n * 2 });
      else assert.ok(s.status === "rejected" && s.reason instanceof ClosedError, `call ${n}`);
    });
    assert.equal(rpc.pending, 0);
  });
});

describe("Dispatcher: duplicate requests", () => {
  class Counter extends Manager {
    runs: string[] = [];
    record(ctx: RequestContext) {
      this.runs.push(ctx.requestId);
    }
  }
  const transport: Transport = {
    publish: () => Promise.resolve(),
    subscribe: () => Promise.resolve({ unsubscribe: () => Promise.resolve() }),
    close: () => Promise.resolve(),
  };
  /** A cast (no reply) whose context carries the id, so each run says which request it was. */
  const cast = (id: string) =>
    utf8(JSON.stringify({ v: 1, id, method: "record", context: { request_id: `req-${id}` } }));
  const own = (client: string, n: number) => `${client}${n.toString(16).padStart(12, "0")}`;
  const A = "0f41e7e0-9d81-8c4e-9d4b-"; // the 24-character client part of ids that Rpc makes
  const B = "5a6b7c8d-1e2f-8a3b-8c4d-";

  function setup(dedupSize: number) {
    const m = new Counter();
    const d = new Dispatcher(m, transport, { prefix: "t", logger: new MemoryLogger(), dedupSize });
    const send = (...ids: string[]) => ids.forEach((id) => d.handle(cast(id), "t/rpc/c", { qos: 1 }));
    const ran = () => m.runs.map((r) => r.slice(4));
    return { send, ran };
  }

  it("runs each id once while it is kept, ids of Rpc's form and others alike", () => {
    const { send, ran } = setup(1000);
    send(own(A, 1), "foreign-1", own(B, 1), own(A, 2));
    send(own(A, 1), "foreign-1", own(B, 1), own(A, 2)); // all four remembered: dropped
    assert.deepEqual(ran(), [own(A, 1), "foreign-1", own(B, 1), own(A, 2)]);
  });

  it("keeps other ids apart from a client's: dedupSize foreign ids push out the oldest foreign one only", () => {
    const { send, ran } = setup(64); // room for one client's first window, and 64 other ids
    const foreign = Array.from({ length: 65 }, (_, i) => `foreign-${i}`);
    send(own(A, 1), ...foreign); // the 65th foreign id pushes out "foreign-0", not own(A, 1)
    send(own(A, 1), "foreign-1", "foreign-0");
    assert.deepEqual(ran(), [own(A, 1), ...foreign, "foreign-0"]);
  });

  it("a client's window forgets its own oldest ids once all windows hold dedupSize ids", () => {
    const { send, ran } = setup(128); // room for one window of 128
    const ids = Array.from({ length: 129 }, (_, i) => own(A, i));
    send(...ids); // counter 128 needs the slot of counter 0: no room to grow, 0 is forgotten
    send(own(A, 0), own(A, 1)); // 0 runs again; 1 is still kept
    assert.deepEqual(ran(), [...ids, own(A, 0)]);
  });

  it("tells apart ids that differ only in the case of a hex digit or in the client part", () => {
    const { send, ran } = setup(1000);
    const lower = own(A, 0xabc);
    send(lower, lower.toUpperCase(), lower.replace(A, B), lower);
    assert.deepEqual(ran(), [lower, lower.toUpperCase(), lower.replace(A, B)]);
  });

  it("keeps the counter of a client whose ids all were forgotten apart from one that comes back", () => {
    const { send, ran } = setup(2);
    send(own(A, 1), own(B, 1), own(B, 2)); // A's only id is forgotten
    send(own(A, 1), own(A, 1)); // A again: runs once
    assert.deepEqual(ran(), [own(A, 1), own(B, 1), own(B, 2), own(A, 1)]);
  });
});

describe("process.nextTick and V8's map cache", () => {
  it("keeps a tick object whose map new ticks still share after 20 full GCs", async () => {
    // In a child process: it needs V8's --expose-gc and --allow-natives-syntax.
    const script = new URL("./fixtures/tick_map.ts", import.meta.url).pathname;
    const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;
    const [cmd, ...args] = deno
      ? [deno.execPath(), "run", "-A", "--v8-flags=--expose-gc,--allow-natives-syntax", script]
      : [process.execPath, "--expose-gc", "--allow-natives-syntax", "--import", "tsx", script];
    const out = await new Promise<string>((resolve, reject) =>
      execFile(cmd!, args, (e, stdout, stderr) => e ? reject(new Error(`${e.message}\n${stderr}`)) : resolve(stdout))
    );
    assert.deepEqual(JSON.parse(out.trim().split("\n").at(-1)!), { kept: true, fresh: true, sameMap: true });
  });
});
