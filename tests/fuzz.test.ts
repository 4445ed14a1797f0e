/**
 * Property-based fuzzing (fast-check) of the codec and the dispatcher, through a real Service,
 * on the memory transport and over MQTT (embedded aedes, or the broker at MQTT_URL).
 *
 * A hostile client publishes raw bytes (well-formed requests, requests with mutated fields of
 * every type, random JSON, random bytes, invalid UTF-8, batches, deep nesting, huge strings,
 * `__proto__`/`constructor` names and keys, reply_to values of every shape) to the service's
 * request topics. The service's transport is wrapped to record everything the server publishes
 * (a publish to a topic that breaks property 2 is recorded and not forwarded, so one violation
 * does not get the server disconnected by the broker and spoil the cases after it); a sniffer
 * subscribed to `#` records what crosses the medium. Each case ends with a sentinel call from
 * the same publisher: requests are handled in order, so once the sentinel is answered every
 * reply of the case has been published, and the counts are compared (no sleeping).
 *
 * The properties, each an `it` of its own:
 *  1. the server never lets a throw escape and keeps serving: an Rpc probe call is answered;
 *  2. nothing is published outside `{prefix}/reply/`, nor to a reply topic with a wildcard, an
 *     empty level, a control character (Cc), a non-character or a lone surrogate;
 *  3. exactly one well-formed reply per answerable request (a readable string id and a valid
 *     reply_to), none for the others;
 *  4. no undeclared method runs, a call to one is an error, and Object.prototype stays clean;
 *  5. a request nested deeper than the 64-level limit is answered with BadRequest;
 *  6. whatever a handler throws (or returns), its caller gets a well-formed reply.
 *
 * A failure prints fast-check's seed and path; replay it with
 * `FUZZ_SEED=<seed> FUZZ_PATH=<path> npx tsx --test --test-name-pattern='<test>' tests/fuzz.test.ts`.
 * `FUZZ_SCALE=10` multiplies the number of runs (a longer local run).
 */

import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { Buffer } from "node:buffer";
import { setImmediate } from "node:timers";
import fc from "fast-check";
import mqtt, { type MqttClient } from "mqtt";
import {
  type LocalMessage,
  type LogFields,
  type Logger,
  Manager,
  periodicTask,
  type PublishOptions,
  RequestContext,
  Rpc,
  Service,
  type Transport,
} from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { EMBEDDED, mqttFixture } from "./mqtt_fixture.ts";
import { uniquePrefix } from "./helpers.ts";

// ---------------------------------------------------------------------------------------------
// Run counts
// ---------------------------------------------------------------------------------------------

const SCALE = Number(process.env.FUZZ_SCALE ?? 1) || 1;
const SEED = process.env.FUZZ_SEED === undefined ? undefined : Number(process.env.FUZZ_SEED);
const PATH = process.env.FUZZ_PATH;

/** Runs per property (×FUZZ_SCALE): 10,000 on memory for 1-4, a few thousand over MQTT. */
const RUNS = {
  memory: { serving: 2500, topics: 2500, replies: 2500, methods: 2500, deep: 300, throws: 400 },
  mqtt: { serving: 1500, topics: 1500, replies: 1500, methods: 1500, deep: 200, throws: 200 },
} as const;

/** The codec's limits (mod.ts): a "readable" id has 1 to 128 characters, a reply_to at most 1024. */
const MAX_ID = 128;
const MAX_REPLY_TO = 1024;
/** The depth limit being added (64 levels for the whole message): args nesting 100+ is over it. */
const OVER_DEPTH = 100;

// ---------------------------------------------------------------------------------------------
// The manager
// ---------------------------------------------------------------------------------------------

/** What the manager saw; reset by each case where it is per case. */
const calls = { constructed: 0, initHost: 0, forbidden: [] as string[] };

const called = (name: string, first: unknown) => {
  // The dispatcher calls `method(ctx, args)`: a RequestContext first says it dispatched this.
  if (first instanceof RequestContext) calls.forbidden.push(name);
};

/** Values a handler throws: `safe` ones the general stream uses, all of them in property 6. */
const THROWN: Record<string, { safe?: true; make: () => unknown }> = {
  error: { safe: true, make: () => new Error("plain error") },
  named: {
    safe: true,
    make: () => Object.assign(new Error("not found"), { name: "InstanceNotFound", data: { x: 1 } }),
  },
  subclass: { safe: true, make: () => new (class QuotaExceeded extends Error {})("quota") },
  string: { safe: true, make: () => "a string" },
  number: { safe: true, make: () => 42 },
  null: { safe: true, make: () => null },
  undefined: { safe: true, make: () => undefined },
  emptyString: { make: () => "" },
  nan: { make: () => NaN },
  bigint: { make: () => 10n },
  symbol: { make: () => Symbol("odd") },
  function: { make: () => function thrownFunction() {} },
  array: { make: () => [1, "two"] },
  plainObject: { make: () => ({ name: "Fake", message: "looks like an error" }) },
  nullPrototype: { make: () => Object.create(null) },
  nullPrototypeWithFields: { make: () => Object.assign(Object.create(null), { name: "N", message: "m" }) },
  messageGetterThrows: {
    make: () =>
      Object.defineProperty(new Error("x"), "message", {
        get() {
          throw new Error("the message getter throws");
        },
      }),
  },
  nameGetterThrows: {
    make: () =>
      Object.defineProperty(new Error("x"), "name", {
        get() {
          throw new Error("the name getter throws");
        },
      }),
  },
  dataGetterThrows: {
    make: () =>
      Object.defineProperty(new Error("x"), "data", {
        get() {
          throw new Error("the data getter throws");
        },
      }),
  },
  constructorGetterThrows: {
    make: () =>
      Object.defineProperty(new Error("x"), "constructor", {
        get() {
          throw new Error("the constructor getter throws");
        },
      }),
  },
  toStringThrows: {
    make: () => ({
      toString() {
        throw new Error("toString throws");
      },
    }),
  },
  noPrimitive: { make: () => ({ toString: () => ({}), valueOf: () => ({}) }) },
  messageIsNullPrototype: {
    make: () => Object.defineProperty(new Error("x"), "message", { value: Object.create(null) }),
  },
  messageIsSymbol: { make: () => Object.defineProperty(new Error("x"), "message", { value: Symbol("m") }) },
  nameIsNumber: { make: () => Object.assign(new Error("x"), { name: 42 }) },
  nameIsObject: { make: () => Object.assign(new Error("x"), { name: { deep: true } }) },
  constructorNameIsNumber: {
    make: () => {
      const C = class extends Error {};
      Object.defineProperty(C, "name", { value: 7 });
      return new C("x");
    },
  },
  anonymousClass: { make: () => new (class extends Error {})("anonymous") },
  cyclicData: {
    make: () => {
      const data: Record<string, unknown> = {};
      data.self = data;
      return Object.assign(new Error("x"), { data });
    },
  },
  bigintData: { make: () => Object.assign(new Error("x"), { data: 1n }) },
  frozen: { make: () => Object.freeze(new Error("frozen")) },
  aggregate: { make: () => new AggregateError([new Error("a")], "aggregate") },
  hugeMessage: { make: () => new Error("m".repeat(100_000)) },
  throwingProxy: { make: () => throwingProxy({}) },
  throwingErrorProxy: { make: () => throwingProxy(new Error("behind a proxy")) },
  revokedProxy: {
    make: () => {
      const { proxy, revoke } = Proxy.revocable({}, {});
      revoke();
      return proxy;
    },
  },
};
const SAFE_KINDS = Object.keys(THROWN).filter((k) => THROWN[k]!.safe);

/** Values a handler returns that cannot be encoded as they are (property 6 too). */
const RETURNED: Record<string, () => unknown> = {
  bigint: () => 10n,
  cyclic: () => {
    const o: Record<string, unknown> = {};
    o.self = o;
    return o;
  },
  toJSONThrows: () => ({
    toJSON() {
      throw new Error("toJSON throws");
    },
  }),
  getterThrows: () => ({
    get x() {
      throw new Error("getter throws");
    },
  }),
  symbol: () => Symbol("result"),
  function: () => () => 1,
  nullPrototype: () => Object.create(null),
  throwingProxy: () => throwingProxy({}),
};

function throwingProxy<T extends object>(target: T): T {
  const trap = () => {
    throw new Error("a proxy trap throws");
  };
  return new Proxy(target, {
    get: trap,
    set: trap,
    has: trap,
    deleteProperty: trap,
    ownKeys: trap,
    getOwnPropertyDescriptor: trap,
    defineProperty: trap,
    getPrototypeOf: trap,
    setPrototypeOf: trap,
    isExtensible: trap,
    preventExtensions: trap,
    apply: trap,
    construct: trap,
  });
}

const kindOf = (args: unknown): string | undefined =>
  args !== null && typeof args === "object" && typeof (args as { kind?: unknown }).kind === "string"
    ? (args as { kind: string }).kind
    : undefined;

function thrown(args: unknown): unknown {
  const k = kindOf(args);
  return k !== undefined && Object.hasOwn(THROWN, k) ? THROWN[k]!.make() : new Error("no such kind");
}

/**
 * A deep merge of the naive kind: `t[k]` on a target is read with an ordinary get, so an own
 * `"__proto__"` key in `s` would merge into Object.prototype. (`constructor.prototype` cannot:
 * the `constructor` it reads is a function, replaced by an own object.) The codec must drop
 * `__proto__` keys for this to be harmless; property 4 checks it is.
 */
function naiveMerge(t: Record<string, unknown>, s: Record<string, unknown>, depth = 0): void {
  if (depth > 5000) return;
  for (const k in s) {
    const v = s[k];
    if (v !== null && typeof v === "object" && !Array.isArray(v)) {
      const cur = t[k];
      const next = cur !== null && typeof cur === "object" ? cur as Record<string, unknown> : {};
      naiveMerge(next, v as Record<string, unknown>, depth + 1);
      t[k] = next;
    } else t[k] = v;
  }
}

/** Declared: echo, later, raise, raiseAsync, give. Everything else must never run. */
class FuzzManager extends Manager {
  override rpcApiVersion = "1.3";
  notAFunction = 42;
  constructor() {
    super();
    calls.constructed++;
  }
  echo(_ctx: RequestContext, args: Record<string, unknown>) {
    naiveMerge({}, args);
    Object.assign({}, args);
    return { keys: Object.keys(args).length, probe: args.probe ?? null };
  }
  async later(_ctx: RequestContext, args: Record<string, unknown>) {
    await null;
    return { later: Object.keys(args).length };
  }
  raise(_ctx: RequestContext, args: unknown): never {
    throw thrown(args);
  }
  async raiseAsync(_ctx: RequestContext, args: unknown): Promise<never> {
    await null;
    throw thrown(args);
  }
  give(_ctx: RequestContext, args: unknown): unknown {
    const k = kindOf(args);
    return k !== undefined && Object.hasOwn(RETURNED, k) ? RETURNED[k]!() : "plain";
  }
  // Undeclared as RPC methods: each records a dispatch.
  _private(ctx: unknown) {
    called("_private", ctx);
  }
  __private(ctx: unknown) {
    called("__private", ctx);
  }
  ["__proto__"](ctx: unknown) {
    called("__proto__", ctx);
  }
  override initHost() {
    calls.initHost++;
  }
  override periodicTasks(ctx: RequestContext, now?: number): Promise<void> {
    if (typeof now === "object") calls.forbidden.push("periodicTasks"); // (ctx, args): dispatched
    return super.periodicTasks(ctx, typeof now === "number" ? now : undefined);
  }
  @periodicTask({ spacing: 3600 })
  tick(_ctx: RequestContext, args?: unknown) {
    if (args !== undefined) calls.forbidden.push("tick");
  }
  get status() {
    calls.forbidden.push("status");
    return "getter";
  }
  override toString(...a: unknown[]): string {
    called("toString", a[0]);
    return "FuzzManager";
  }
  override valueOf(...a: unknown[]): object {
    called("valueOf", a[0]);
    return this;
  }
  override hasOwnProperty(...a: unknown[]): boolean {
    called("hasOwnProperty", a[0]);
    return Object.hasOwn(this, a[0] as PropertyKey);
  }
  override isPrototypeOf(...a: unknown[]): boolean {
    called("isPrototypeOf", a[0]);
    return false;
  }
  override propertyIsEnumerable(...a: unknown[]): boolean {
    called("propertyIsEnumerable", a[0]);
    return false;
  }
  override toLocaleString(...a: unknown[]): string {
    called("toLocaleString", a[0]);
    return "FuzzManager";
  }
}

const DECLARED = ["echo", "later", "raise", "raiseAsync", "give"];
const UNDECLARED = [
  "_private",
  "__private",
  "__proto__",
  "constructor",
  "initHost",
  "periodicTasks",
  "tick",
  "status",
  "notAFunction",
  "rpcApiVersion",
  "host",
  "service",
  "toString",
  "valueOf",
  "hasOwnProperty",
  "isPrototypeOf",
  "propertyIsEnumerable",
  "toLocaleString",
  "__defineGetter__",
  "__lookupGetter__",
  "then",
  "call",
  "apply",
  "bind",
  "prototype",
  "length",
  "name",
  "arguments",
  "caller",
];

// ---------------------------------------------------------------------------------------------
// Topic rules (independent of mod.ts)
// ---------------------------------------------------------------------------------------------

const CC = /\p{Cc}/u;
const LONE_SURROGATE = /[\uD800-\uDFFF]/u; // in u-mode a pair is one code point: only lone halves match

function hasNonCharacter(s: string): boolean {
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    if ((cp >= 0xfdd0 && cp <= 0xfdef) || (cp & 0xfffe) === 0xfffe) return true;
  }
  return false;
}

/** Property 2: a topic the server may publish to. */
function replyTopicOk(topic: string, root: string): boolean {
  if (!topic.startsWith(root)) return false;
  const levels = topic.slice(root.length).split("/"); // {clientId} or {connection id}/{clientId}
  return levels.length <= 2 && levels.every((l) => l.length > 0 && !/[+#]/.test(l)) && !CC.test(topic) &&
    !LONE_SURROGATE.test(topic) &&
    !hasNonCharacter(topic);
}

/** A reply_to that makes a request answerable (property 3). */
const answerableReplyTo = (v: unknown, root: string): v is string =>
  typeof v === "string" && v.length <= MAX_REPLY_TO && replyTopicOk(v, root);

// ---------------------------------------------------------------------------------------------
// Messages: a small JSON syntax tree, written out at publish time
// ---------------------------------------------------------------------------------------------

/** What a message needs from the run it is published in. */
interface Builder {
  prefix: string;
  root: string;
  tag: string;
  next(): number;
}

/** An object as a list of entries: duplicate keys, `__proto__` and order are ours to choose. */
class Obj {
  constructor(readonly entries: [string, Json][]) {}
}
/** JSON text made at publish time (ids unique per run, topics under this run's prefix). */
class Lazy {
  constructor(readonly text: (b: Builder) => string) {}
}
type Json = null | boolean | number | string | Json[] | Obj | Lazy;

function write(j: Json, b: Builder): string {
  if (j === null || typeof j === "boolean") return String(j);
  if (typeof j === "number" || typeof j === "string") return JSON.stringify(j) ?? "null"; // NaN → null
  if (Array.isArray(j)) return `[${j.map((x) => write(x, b)).join(",")}]`;
  if (j instanceof Obj) return `{${j.entries.map(([k, v]) => `${JSON.stringify(k)}:${write(v, b)}`).join(",")}}`;
  return j.text(b);
}

const raw = (text: string) => new Lazy(() => text);
const uniqueId = (stem: string, to128 = false) =>
  new Lazy((b) => {
    const tail = `~${b.tag}~${b.next()}`;
    return JSON.stringify(to128 ? (stem + "x".repeat(MAX_ID)).slice(0, MAX_ID - tail.length) + tail : stem + tail);
  });
const underRoot = (rest: string) => new Lazy((b) => JSON.stringify(b.root + rest));
const underPrefix = (f: (prefix: string, tag: string) => string) => new Lazy((b) => JSON.stringify(f(b.prefix, b.tag)));

/** Nested containers, `depth` levels deep in all, around a leaf. */
function nest(depth: number, shape: "obj" | "arr" | "mixed", leaf = "1"): string {
  let open = "";
  let close = "";
  for (let i = 0; i < depth; i++) {
    const obj = shape === "obj" || (shape === "mixed" && i % 2 === 0);
    open += obj ? `{"d":` : "[";
    close = (obj ? "}" : "]") + close;
  }
  return open + leaf + close;
}

type TopicKind = "host" | "fanout" | "shared";

/** One message of a case: made into bytes at publish time. */
class Msg {
  constructor(readonly label: string, readonly topic: TopicKind, readonly make: (b: Builder) => Uint8Array) {}
  [fc.toStringMethod](): string {
    const bytes = this.make(PREVIEW);
    return `${this.label} → ${this.topic}: ${preview(bytes)}`;
  }
}

const PREVIEW: Builder = { prefix: "{prefix}", root: "{prefix}/reply/", tag: "{tag}", next: () => 0 };
const fatal = new TextDecoder("utf-8", { fatal: true });
const lenient = new TextDecoder("utf-8");

function preview(bytes: Uint8Array, max = 400): string {
  let text: string;
  let note = "";
  try {
    text = fatal.decode(bytes);
  } catch {
    text = lenient.decode(bytes);
    note = " (invalid UTF-8)";
  }
  // Repeats (deep nesting, huge strings) as `⟨unit×N⟩`.
  const short = text.replace(/(.{1,12}?)\1{7,}/gsu, (run, c: string) => `⟨${c}×${run.length / c.length}⟩`);
  const shown = ascii(JSON.stringify(short.length > max ? short.slice(0, max) : short));
  return `${shown}${short.length > max ? `…` : ""} [${bytes.byteLength} bytes${note}]`;
}

const utf8 = (s: string): Uint8Array => Buffer.from(s, "utf8");

/** JSON text with everything outside printable ASCII escaped: an invisible U+FFFF is seen. */
const ascii = (json: string): string =>
  json.replace(/[^\x20-\x7e]/gu, (c) => {
    const cp = c.codePointAt(0)!;
    return cp > 0xffff ? `\\u{${cp.toString(16)}}` : `\\u${cp.toString(16).padStart(4, "0")}`;
  });
const textMsg = (label: string, topic: TopicKind, j: Json) => new Msg(label, topic, (b) => utf8(write(j, b)));

// ---------------------------------------------------------------------------------------------
// Arbitraries
// ---------------------------------------------------------------------------------------------

const ABSENT = Symbol("absent");
type Field = Json | typeof ABSENT;

const BAD_CHARS = [
  "\u0000",
  "\u0001",
  "\u001f",
  "\t",
  "\n",
  "\u007f",
  "\u0085",
  "\u009f",
  "\uFFFF",
  "\uFFFE",
  "\uFDD0",
  "\uFDEF",
  "\u{1FFFF}",
  "\u{10FFFF}",
  "\uD800",
  "\uDBFF",
  "\uDC00",
  "\uDFFF",
  "+",
  "#",
  "/",
];
const badChar = fc.constantFrom(...BAD_CHARS);
/** Characters allowed in a reply level: printable ASCII but / + #, and some of the rest of Unicode. */
const goodChar = fc.oneof(
  { weight: 6, arbitrary: fc.constantFrom(..."abcXYZ019-_.:$%&*()[]{}'\"\\ ,;=?@!~`^|<>") },
  { weight: 1, arbitrary: fc.constantFrom("é", "ß", "中", "😀", "\u00a0", "\u2028", "\u200b", "\uFFFD", "\u{10FFFD}") },
);
const anyChar = fc.oneof(
  { weight: 4, arbitrary: fc.string({ unit: "binary", minLength: 1, maxLength: 1 }) },
  { weight: 2, arbitrary: goodChar },
  { weight: 1, arbitrary: badChar },
  { weight: 1, arbitrary: fc.integer({ min: 0, max: 0xffff }).map((c) => String.fromCharCode(c)) },
);
const anyString = fc.string({ unit: anyChar, maxLength: 24 });
const goodLevel = fc.string({ unit: goodChar, minLength: 1, maxLength: 24 });

const KEYS = [
  "__proto__",
  "constructor",
  "prototype",
  "toString",
  "valueOf",
  "hasOwnProperty",
  "then",
  "polluted",
  "id",
  "v",
  "method",
  "args",
  "context",
  "reply_to",
  "version",
  "deadline",
  "batch",
  "kind",
  "probe",
  "",
];
const key = fc.oneof({ weight: 2, arbitrary: fc.constantFrom(...KEYS) }, { weight: 3, arbitrary: anyString });

const leaf: fc.Arbitrary<Json> = fc.oneof(
  fc.constant(null),
  fc.boolean(),
  fc.integer(),
  fc.double(),
  fc.constantFrom(Number.MAX_SAFE_INTEGER + 2, -0, 1e308, 5e-324),
  anyString,
  fc.constantFrom("1e999", "-1e999", "-0", "1E-7", "0.10", "123456789012345678901234567890").map(raw),
);

const { json } = fc.letrec<{ json: Json; arr: Json[]; obj: Obj }>((tie) => ({
  json: fc.oneof({ maxDepth: 4, depthSize: "small" }, leaf, tie("arr"), tie("obj")),
  arr: fc.array(tie("json"), { maxLength: 4 }),
  obj: fc.array(fc.tuple(key, tie("json")), { maxLength: 4 }).map((e) => new Obj(e)),
}));
const jsonObject: fc.Arbitrary<Obj> = fc.array(fc.tuple(key, json), { maxLength: 5 }).map((e) => new Obj(e));

/** An object under a `__proto__` or `constructor.prototype` key, somewhere in args. */
const pollutingArgs: fc.Arbitrary<Json> = fc.tuple(
  fc.array(anyString, { maxLength: 3 }),
  fc.constantFrom<Json>(
    new Obj([["__proto__", new Obj([["polluted", "yes"], ["toString", 1]])]]),
    new Obj([["constructor", new Obj([["prototype", new Obj([["polluted", "yes"]])]])]]),
    new Obj([["__proto__", new Obj([["__proto__", new Obj([["polluted", "deeper"]])]])]]),
    new Obj([["prototype", new Obj([["polluted", "yes"]])], ["__proto__", null]]),
    new Obj([["__proto__", [1, 2]], ["hasOwnProperty", "x"], ["toString", "x"], ["valueOf", null]]),
  ),
).map(([path, inner]) => path.reduceRight<Json>((acc, k) => new Obj([[k, acc]]), inner));

const depthShape = fc.constantFrom<"obj" | "arr" | "mixed">("obj", "arr", "mixed");

function field(arb: fc.Arbitrary<Json>, absentWeight: number): fc.Arbitrary<Field> {
  return fc.oneof({ weight: absentWeight, arbitrary: fc.constant(ABSENT) }, { weight: 10, arbitrary: arb });
}

const nonString = fc.oneof(fc.integer(), fc.constant(null), fc.boolean(), fc.constant<Json>([]), jsonObject);

const vArb: fc.Arbitrary<Json> = fc.oneof(
  { weight: 12, arbitrary: fc.constant(1) },
  { weight: 1, arbitrary: fc.constantFrom<Json>(2, 0, "1", true, null, raw("1.0"), raw("10e-1"), [1]) },
);

const idArb: fc.Arbitrary<Json> = fc.oneof(
  { weight: 14, arbitrary: anyString.map((s) => uniqueId(s)) },
  { weight: 1, arbitrary: anyString.map((s) => uniqueId(s, true)) },
  { weight: 1, arbitrary: fc.constantFrom<Json>("", "x".repeat(MAX_ID + 1), "y".repeat(10_000)) },
  { weight: 2, arbitrary: nonString },
);

const methodArb: fc.Arbitrary<Json> = fc.oneof(
  { weight: 8, arbitrary: fc.constantFrom(...DECLARED) },
  { weight: 4, arbitrary: fc.constantFrom(...UNDECLARED) },
  { weight: 1, arbitrary: fc.stringMatching(/^[A-Za-z_$][\w$]{0,20}$/) },
  { weight: 1, arbitrary: anyString },
  { weight: 1, arbitrary: fc.constantFrom<Json>("echo ", "ECHO", "ec\u0000ho", "a".repeat(129), "é", "") },
  { weight: 1, arbitrary: nonString },
);

const argsArb = (opts: { huge: boolean }): fc.Arbitrary<Json> =>
  fc.oneof(
    { weight: 6, arbitrary: jsonObject },
    { weight: 2, arbitrary: fc.constant(new Obj([])) },
    { weight: 2, arbitrary: pollutingArgs },
    { weight: 2, arbitrary: fc.constantFrom(...SAFE_KINDS).map((k) => new Obj([["kind", k]])) },
    {
      weight: 1,
      arbitrary: fc.tuple(fc.integer({ min: 1, max: 6000 }), depthShape).map(([d, s]) => raw(`{"deep":${nest(d, s)}}`)),
    },
    {
      weight: opts.huge ? 1 : 0,
      arbitrary: fc.tuple(fc.constantFrom("x", "é", "😀", "\u0001"), fc.integer({ min: 10_000, max: 30_000 })).map((
        [unit, n],
      ) => new Obj([["s", unit.repeat(n)]])),
    },
    { weight: 1, arbitrary: fc.oneof(fc.constant<Json>([]), anyString, fc.integer(), fc.constant(null)) },
  );

const contextArb: fc.Arbitrary<Json> = fc.oneof(
  { weight: 3, arbitrary: fc.constant(new Obj([])) },
  {
    weight: 2,
    arbitrary: fc.constant(
      new Obj([
        ["user_id", "u1"],
        ["project_id", null],
        ["request_id", "req-1"],
        ["is_admin", true],
        ["roles", ["admin"]],
        ["timestamp", "2020-01-01T00:00:00Z"],
      ]),
    ),
  },
  {
    weight: 2,
    arbitrary: fc.constantFrom<Json>(
      new Obj([["is_admin", "yes"]]),
      new Obj([["roles", [1]]]),
      new Obj([["roles", "admin"]]),
      new Obj([["user_id", 5]]),
      new Obj([["request_id", "r".repeat(1025)]]),
      new Obj([["timestamp", null]]),
      new Obj([["__proto__", new Obj([["is_admin", true]])]]),
      new Obj([["isAdmin", true], ["userId", "camel"]]),
    ),
  },
  { weight: 2, arbitrary: jsonObject },
  { weight: 1, arbitrary: fc.oneof(fc.constant<Json>([]), anyString, fc.integer(), fc.constant(null)) },
);

const replyToArb: fc.Arbitrary<Json> = fc.oneof(
  { weight: 10, arbitrary: goodLevel.map(underRoot) },
  {
    weight: 3,
    arbitrary: fc.tuple(
      fc.string({ unit: goodChar, maxLength: 8 }),
      badChar,
      fc.string({ unit: goodChar, maxLength: 8 }),
    )
      .map(([a, c, z]) => underRoot(a + c + z)),
  },
  { weight: 2, arbitrary: anyString.map(underRoot) },
  {
    weight: 3,
    arbitrary: fc.constantFrom<(prefix: string, tag: string) => string>(
      (p) => `${p}/reply/`,
      (p) => `${p}/reply//`,
      (p) => `${p}/reply/a/`,
      (p) => `${p}/reply/a/b`,
      (p) => `${p}/reply/a/b/c`,
      (p) => `${p}/reply//b`,
      (p) => `${p}/reply/a/+`,
      (p) => `${p}/reply/+`,
      (p) => `${p}/reply/#`,
      (p) => `${p}/reply/a+`,
      (p) => `${p}/reply`,
      (p) => p,
      (p) => `${p}/rpc/fuzz/h1`,
      (p) => `${p}/rpc/fuzz`,
      (p) => `${p}/fanout/fuzz`,
      (p, t) => `${p}/other/${t}`,
      (p, t) => `${p}//reply/${t}`,
      (p, t) => `/${p}/reply/${t}`,
      (p, t) => `${p}/REPLY/${t}`,
      (p, t) => `${p}x/reply/${t}`,
      (p, t) => ` ${p}/reply/${t}`,
      (_p, t) => `novalet/reply/${t}`,
      (_p, t) => `+/reply/${t}`,
      () => "#",
      () => "+",
      () => "",
      (p, t) => `${p}/reply/${t}\u0001`,
      (p, t) => `${p}/reply/\u0085${t}`,
      (p, t) => `${p}/reply/${t}\uFFFF`,
      (p, t) => `${p}/reply/${t}\uFDD0`,
      (p, t) => `${p}/reply/${t}\uD800`,
      (p, t) => `${p}/reply/\uDC00${t}`,
      (p, t) => `${p}/reply/${t}\u0000`,
    ).map(underPrefix),
  },
  {
    weight: 1,
    arbitrary: fc.integer({ min: MAX_REPLY_TO - 40, max: MAX_REPLY_TO + 40 }).map((n) =>
      new Lazy((b) => JSON.stringify(b.root + "r".repeat(Math.max(1, n - b.root.length))))
    ),
  },
  { weight: 1, arbitrary: fc.constant(underRoot("L".repeat(5000))) },
  { weight: 2, arbitrary: nonString },
);

const versionArb: fc.Arbitrary<Json> = fc.constantFrom<Json>(
  "1.0",
  "1.3",
  "1.4",
  "2.0",
  "0.9",
  "1",
  "1.0.0",
  "01.00",
  "9999999999.0",
  "1.99999999999",
  "",
  1,
  null,
);

const NOW = Date.now();
const deadlineArb: fc.Arbitrary<Json> = fc.constantFrom<Json>(
  NOW + 86_400_000,
  1e308,
  0,
  -1,
  NOW - 1000,
  "soon",
  null,
  raw("1e999"),
  new Obj([]),
  true,
);

const batchArb: fc.Arbitrary<Json> = fc.constantFrom<Json>(true, true, true, false, "true", 1, null);

/** A request envelope: each field present, absent or mutated, in a random order, plus extra keys. */
const envelopeArb = (opts: { huge: boolean }): fc.Arbitrary<Obj> =>
  fc.tuple(
    field(vArb, 1),
    field(idArb, 1),
    field(methodArb, 1),
    field(argsArb(opts), 3),
    field(contextArb, 6),
    field(replyToArb, 2),
    field(versionArb, 12),
    field(deadlineArb, 12),
    field(batchArb, 8),
    fc.array(fc.tuple(key, json), { maxLength: 2 }),
    fc.array(fc.double(), { minLength: 10, maxLength: 10 }),
  ).map(([v, id, method, args, context, replyTo, version, deadline, batch, extras, order]) => {
    const named: [string, Field][] = [
      ["v", v],
      ["id", id],
      ["method", method],
      ["args", args],
      ["context", context],
      ["reply_to", replyTo],
      ["version", version],
      ["deadline", deadline],
      ["batch", batch],
    ];
    const entries = [...named.filter((e): e is [string, Json] => e[1] !== ABSENT), ...extras];
    const rank = entries.map((_, i) => order[i % order.length]! + i * 1e-9);
    const sorted = entries.map((e, i) => [e, rank[i]!] as const).sort((a, b) => a[1] - b[1]).map(([e]) => e);
    return new Obj(sorted);
  });

/** What a byte-level mutation does to an encoded message. */
const mutationArb = fc.oneof(
  fc.record({ op: fc.constant("truncate" as const), at: fc.double({ min: 0, max: 1, noNaN: true }) }),
  fc.record({
    op: fc.constant("insert" as const),
    at: fc.double({ min: 0, max: 1, noNaN: true }),
    bytes: fc.constantFrom(
      [0xff],
      [0xfe],
      [0xc0, 0x80],
      [0x80],
      [0xed, 0xa0, 0x80],
      [0xf4, 0x90, 0x80, 0x80],
      [0xe0, 0x80, 0x80],
      [0x00],
      [0x01],
    ),
  }),
  fc.record({
    op: fc.constant("flip" as const),
    at: fc.double({ min: 0, max: 1, noNaN: true }),
    xor: fc.integer({ min: 1, max: 255 }),
  }),
  fc.record({
    op: fc.constant("wrap" as const),
    before: fc.constantFrom("", "\uFEFF", " \n\t", "[", "x"),
    after: fc.constantFrom("", " ", "\n", "}", ",", "x", "]", "\u0000"),
  }),
  fc.constant({ op: "rawControls" as const }),
);
type Mutation = typeof mutationArb extends fc.Arbitrary<infer M> ? M : never;

function mutate(bytes: Uint8Array, m: Mutation): Uint8Array {
  const at = "at" in m ? Math.floor(m.at * bytes.byteLength) : 0;
  switch (m.op) {
    case "truncate":
      return bytes.subarray(0, at);
    case "insert":
      return Buffer.concat([bytes.subarray(0, at), Uint8Array.from(m.bytes), bytes.subarray(at)]);
    case "flip": {
      const out = Uint8Array.from(bytes);
      if (out.byteLength > 0) out[Math.min(at, out.byteLength - 1)]! ^= m.xor;
      return out;
    }
    case "wrap":
      return Buffer.concat([utf8(m.before), bytes, utf8(m.after)]);
    case "rawControls": // "\u0001" escapes written as the raw character: not JSON any more
      return utf8(
        lenient.decode(bytes).replace(/\\u00([01][0-9a-f])/g, (_, h) => String.fromCharCode(parseInt(h, 16))),
      );
  }
}

/** Any message of the general stream. */
function messageArb(topics: TopicKind[]): fc.Arbitrary<Msg> {
  const topic = fc.constantFrom(...topics);
  const envelope = envelopeArb({ huge: false });
  const batchItem = fc.oneof({ weight: 5, arbitrary: envelope }, { weight: 1, arbitrary: json });
  return fc.oneof(
    { weight: 8, arbitrary: fc.tuple(envelope, topic).map(([e, t]) => textMsg("request", t, e)) },
    {
      weight: 4,
      arbitrary: fc.tuple(fc.array(batchItem, { minLength: 1, maxLength: 6 }), topic).map(([items, t]) =>
        textMsg("batch", t, items)
      ),
    },
    {
      weight: 3,
      arbitrary: fc.tuple(envelope, mutationArb, topic).map(([e, m, t]) =>
        new Msg(`request, ${m.op}`, t, (b) => mutate(utf8(write(e, b)), m))
      ),
    },
    { weight: 1, arbitrary: fc.tuple(envelopeArb({ huge: true }), topic).map(([e, t]) => textMsg("large", t, e)) },
    { weight: 2, arbitrary: fc.tuple(json, topic).map(([j, t]) => textMsg("JSON", t, j)) },
    {
      weight: 1,
      arbitrary: fc.tuple(fc.constantFrom<Json>([], [[]], new Obj([]), null, "", 1, true, [null]), topic).map((
        [j, t],
      ) => textMsg("JSON", t, j)),
    },
    {
      weight: 2,
      arbitrary: fc.tuple(fc.uint8Array({ maxLength: 300 }), topic).map(([bytes, t]) =>
        new Msg("bytes", t, () => bytes)
      ),
    },
    {
      weight: 1,
      arbitrary: fc.tuple(fc.integer({ min: 1, max: 6000 }), depthShape, topic).map(([d, s, t]) =>
        new Msg(`nested ${d}`, t, () => utf8(nest(d, s)))
      ),
    },
  );
}

const caseArb = (topics: TopicKind[]) => fc.array(messageArb(topics), { minLength: 1, maxLength: 6 });

// ---------------------------------------------------------------------------------------------
// The oracle: what the server should do with a message, read from its bytes alone
// ---------------------------------------------------------------------------------------------

interface Expectation {
  id: string;
  topic: string;
  method: unknown;
  /** 0 for an otherwise valid request whose deadline may have passed (the server drops those). */
  min: 0 | 1;
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === "object" && !Array.isArray(v);

function parse(bytes: Uint8Array): { ok: true; value: unknown } | { ok: false; why: string } {
  try {
    return { ok: true, value: JSON.parse(fatal.decode(bytes)) };
  } catch (e) {
    return { ok: false, why: (e as Error).message };
  }
}

function expectationsOf(bytes: Uint8Array, root: string): Expectation[] {
  const p = parse(bytes);
  if (!p.ok) return [];
  const items = Array.isArray(p.value) ? p.value : [p.value];
  const out: Expectation[] = [];
  for (const item of items) {
    if (!isObject(item)) continue;
    const { id, reply_to: replyTo, deadline } = item;
    if (typeof id !== "string" || id.length === 0 || id.length > MAX_ID) continue;
    if (!answerableReplyTo(replyTo, root)) continue;
    const late = typeof deadline === "number" && deadline < Date.now() + 60_000;
    out.push({ id, topic: replyTo, method: item.method, min: late ? 0 : 1 });
  }
  return out;
}

interface Reply {
  id: string;
  error?: { type: string; message: string };
}

/** The replies in a message the server published, or why it is not one. */
function repliesOf(bytes: Uint8Array): Reply[] | string {
  const p = parse(bytes);
  if (!p.ok) return `not UTF-8 JSON (${p.why})`;
  const items = Array.isArray(p.value) ? p.value : [p.value];
  if (items.length === 0) return "an empty array";
  const out: Reply[] = [];
  for (const r of items) {
    if (!isObject(r) || r.v !== 1 || typeof r.id !== "string") return `${JSON.stringify(r)} lacks "v":1 or a string id`;
    if (Object.hasOwn(r, "error")) {
      const e = r.error;
      if (!isObject(e) || typeof e.type !== "string" || typeof e.message !== "string") {
        return `the error of reply ${JSON.stringify(r.id)} lacks a string type and message: ${
          JSON.stringify(e)?.slice(0, 200)
        }`;
      }
      out.push({ id: r.id, error: { type: e.type, message: e.message } });
    } else out.push({ id: r.id });
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The harness: a server, a hostile publisher, a sniffer and a probe client on one medium
// ---------------------------------------------------------------------------------------------

interface Published {
  topic: string;
  bytes: Uint8Array;
}

/** Keeps the lines that say a throw escaped (and nothing else: runs make many warnings). */
class FailureLogger implements Logger {
  failures: string[] = [];
  #keep(level: string, msg: string, fields?: LogFields) {
    if (/Unexpected failure|handler failed/i.test(msg)) {
      const e = fields?.error;
      const why = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
      if (this.failures.length < 20) this.failures.push(`${level}: ${msg}: ${why}`);
    }
  }
  debug(): void {}
  info(): void {}
  warn(msg: string, fields?: LogFields): void {
    this.#keep("warn", msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    this.#keep("error", msg, fields);
  }
}

interface Medium {
  /** The server's transport, the probe client's and the fuzz publisher's. */
  server: Transport;
  probe: Transport;
  publish(topic: string, bytes: Uint8Array): Promise<void>;
  /** Subscribe `#`, everything on the medium. */
  sniff(onMessage: (topic: string, bytes: Uint8Array) => void): Promise<void>;
  /** Only this run's traffic on the medium (a private hub), or a shared broker. */
  private: boolean;
  topics: TopicKind[];
  close(): Promise<void>;
}

const macrotask = () => new Promise<void>((r) => setImmediate(r));

class Harness {
  readonly prefix = uniquePrefix("fuzz");
  readonly tag = this.prefix.slice(-8);
  readonly root = `${this.prefix}/reply/`;
  readonly sentinelTopic = `${this.root}sentinel`;
  readonly log = new FailureLogger();
  readonly topicOf: Record<TopicKind, string> = {
    host: `${this.prefix}/rpc/fuzz/h1`,
    shared: `${this.prefix}/rpc/fuzz`,
    fanout: `${this.prefix}/fanout/fuzz`,
  };
  /** What the server published (through its transport), this case. */
  served: Published[] = [];
  /** What crossed the medium (the sniffer), this case. */
  wire: Published[] = [];
  /** Unhandled errors and rejections seen while the harness runs. */
  unhandled: string[] = [];
  #serial = 0;
  #sentinels = new Map<string, () => void>();
  #service?: Service;
  #rpc?: Rpc;
  #medium!: Medium;
  #onUnhandled = (e: unknown) => void this.unhandled.push(String((e as Error)?.stack ?? e));
  readonly builder: Builder = {
    prefix: this.prefix,
    root: this.root,
    tag: this.tag,
    next: () => ++this.#serial,
  };

  get medium(): Medium {
    return this.#medium;
  }

  async start(open: (log: Logger) => Promise<Medium>): Promise<void> {
    calls.constructed = 0;
    calls.initHost = 0;
    process.on("unhandledRejection", this.#onUnhandled);
    process.on("uncaughtException", this.#onUnhandled);
    this.#medium = await open(this.log);
    await this.#medium.sniff((topic, bytes) => this.#onWire(topic, bytes));
    this.#service = Service.create({
      host: "h1",
      binary: "nova-fuzz",
      topic: "fuzz",
      manager: FuzzManager,
      transport: recording(this.#medium.server, this),
      prefix: this.prefix,
      logger: this.log,
      periodicInterval: 3600,
      periodicFuzzyDelay: 0,
      gracefulShutdownTimeout: 5,
    });
    await this.#service.start();
    this.#rpc = new Rpc(this.#medium.probe, { prefix: this.prefix, logger: this.log, timeout: 10 });
  }

  async close(): Promise<void> {
    await this.#rpc?.close();
    await this.#service?.stop();
    await this.#medium?.close();
    process.off("unhandledRejection", this.#onUnhandled);
    process.off("uncaughtException", this.#onUnhandled);
  }

  #onWire(topic: string, bytes: Uint8Array): void {
    if (topic === this.sentinelTopic) {
      const replies = repliesOf(bytes);
      if (typeof replies !== "string") { for (const r of replies) this.#sentinels.get(r.id)?.(); }
      return;
    }
    this.wire.push({ topic, bytes });
  }

  /** Publish the messages of a case, then a sentinel call; resolves once the sentinel is answered. */
  async run(msgs: Msg[]): Promise<Expectation[]> {
    this.served = [];
    this.wire = [];
    this.log.failures = [];
    this.unhandled = [];
    calls.forbidden = [];
    const expected: Expectation[] = [];
    const sends: Promise<void>[] = [];
    for (const m of msgs) {
      const bytes = m.make(this.builder);
      expected.push(...expectationsOf(bytes, this.root));
      sends.push(this.#medium.publish(this.topicOf[m.topic], bytes));
    }
    await Promise.all(sends);
    await macrotask(); // on the memory hub: the case's deliveries and their microtasks are done
    await this.sentinel();
    await macrotask();
    return expected;
  }

  /** A well-formed call from the fuzz publisher; it fails if no answer comes within 10 s. */
  async sentinel(): Promise<void> {
    const id = `sentinel-${this.tag}-${++this.#serial}`;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const answered = new Promise<void>((resolve, reject) => {
      timer = setTimeout(() => {
        this.#sentinels.delete(id);
        reject(new Error(`no reply to the sentinel call ${id} within 10 s: the server stopped serving`));
      }, 10_000);
      this.#sentinels.set(id, () => {
        clearTimeout(timer);
        this.#sentinels.delete(id);
        resolve();
      });
    });
    const request = { v: 1, id, method: "echo", args: {}, reply_to: this.sentinelTopic };
    try {
      await this.#medium.publish(this.topicOf.host, utf8(JSON.stringify(request)));
    } catch (e) {
      clearTimeout(timer);
      this.#sentinels.delete(id);
      throw e;
    }
    await answered;
  }

  /** Property 1's probe: a call from a normal novalet client. */
  async probe(): Promise<void> {
    const n = ++this.#serial;
    const ctx = new RequestContext({ userId: "prober" });
    const r = await this.#rpc!.call(ctx, "fuzz.h1", { method: "echo", args: { probe: n } }, { timeout: 10 });
    assert.deepEqual(r, { keys: 1, probe: n }, "the probe call's result");
  }

  /** Replies published this case, by id (the sentinel's left out), or a reason to fail. */
  repliesById(): Map<string, { topic: string; reply: Reply }[]> {
    const byId = new Map<string, { topic: string; reply: Reply }[]>();
    for (const p of this.served) {
      if (p.topic === this.sentinelTopic) continue;
      const replies = repliesOf(p.bytes);
      if (typeof replies === "string") {
        assert.fail(`the server published a message that is not a reply to ${JSON.stringify(p.topic)}: ${replies}`);
      }
      for (const reply of replies) {
        let list = byId.get(reply.id);
        if (!list) byId.set(reply.id, list = []);
        list.push({ topic: p.topic, reply });
      }
    }
    return byId;
  }
}

/**
 * The server's transport, recording each publish. One that breaks property 2 is recorded and
 * not forwarded (Mosquitto disconnects a client that publishes to a topic with a control
 * character: the cases after it would fail for that reason alone).
 */
function recording(inner: Transport, h: Harness): Transport {
  const allowed = (topic: string) => replyTopicOk(topic, h.root);
  const t: Transport = {
    publish(topic: string, payload: Uint8Array, opts?: PublishOptions) {
      h.served.push({ topic, bytes: payload });
      return allowed(topic) ? inner.publish(topic, payload, opts) : Promise.resolve();
    },
    subscribe: (filter, handler, opts) => inner.subscribe(filter, handler, opts),
    close: () => inner.close(),
  };
  if (inner.forget) t.forget = (filter, opts) => inner.forget!(filter, opts);
  if (inner.publishLocal) {
    t.publishLocal = (topic: string, message: LocalMessage, opts?: PublishOptions) => {
      h.served.push({ topic, bytes: message.bytes() });
      return allowed(topic) ? inner.publishLocal!(topic, message, opts) : Promise.resolve();
    };
  }
  return t;
}

function memoryMedium(log: Logger): Promise<Medium> {
  const hub = new MemoryHub({ logger: log });
  const server = new MemoryTransport(hub);
  const probe = new MemoryTransport(hub);
  const fuzz = new MemoryTransport(hub);
  const sniffer = new MemoryTransport(hub);
  return Promise.resolve({
    server,
    probe,
    publish: (topic, bytes) => fuzz.publish(topic, bytes, { qos: 1 }),
    sniff: async (on) => void await sniffer.subscribe("#", (bytes, topic) => on(topic, bytes)),
    private: true,
    topics: ["host", "host", "fanout", "shared"],
    close: async () => {
      for (const t of [sniffer, fuzz, probe, server]) await t.close();
    },
  });
}

async function mqttMedium(log: Logger): Promise<Medium> {
  const fx = await mqttFixture();
  const options = { ...fx.options(), logger: log };
  const server = await MqttTransport.connect(options);
  const probe = await MqttTransport.connect(options);
  // Bare mqtt.js clients, as a foreign (or hostile) program would use.
  const bare = async (): Promise<MqttClient> => {
    const c = await mqtt.connectAsync(fx.url, { protocolVersion: EMBEDDED ? 4 : 5, reconnectPeriod: 0 });
    const noDelay = () => (c.stream as unknown as { setNoDelay?: (on: boolean) => void }).setNoDelay?.(true);
    noDelay();
    c.on("connect", noDelay);
    return c;
  };
  const fuzz = await bare();
  const sniffer = await bare();
  return {
    server,
    probe,
    publish: async (topic, bytes) => void await fuzz.publishAsync(topic, Buffer.from(bytes), { qos: 1 }),
    sniff: async (on) => {
      sniffer.on("message", (topic, payload) => on(topic, payload));
      await sniffer.subscribeAsync("#", { qos: 1 });
    },
    private: EMBEDDED,
    // aedes delivers nothing to a shared subscription: the group topic only on a real broker.
    topics: EMBEDDED ? ["host", "host", "fanout"] : ["host", "host", "fanout", "shared"],
    close: async () => {
      await fuzz.endAsync();
      await sniffer.endAsync();
      await probe.close();
      await server.close();
      await fx.close?.();
    },
  };
}

// ---------------------------------------------------------------------------------------------
// The checks
// ---------------------------------------------------------------------------------------------

const show = (s: unknown) => {
  const j = ascii(JSON.stringify(s) ?? String(s));
  return j.length > 200 ? `${j.slice(0, 200)}…` : j;
};

/** Property 2 on one case. */
function checkTopics(h: Harness): void {
  for (const p of h.served) {
    if (!replyTopicOk(p.topic, h.root)) {
      assert.fail(
        `the server published to ${show(p.topic)}, not a valid topic under ${show(h.root)}: ${preview(p.bytes, 200)}`,
      );
    }
  }
  const requestTopics = new Set(Object.values(h.topicOf));
  for (const w of h.wire) {
    if (requestTopics.has(w.topic) || replyTopicOk(w.topic, h.root)) continue;
    const ours = h.medium.private || w.topic.includes(h.tag) || Buffer.from(w.bytes).includes(h.tag);
    if (ours) assert.fail(`a message crossed the medium on ${show(w.topic)}: ${preview(w.bytes, 200)}`);
  }
}

/** Property 3 on one case. */
function checkReplies(h: Harness, expected: Expectation[]): void {
  const byId = h.repliesById();
  for (const e of expected) {
    const got = byId.get(e.id) ?? [];
    const range = e.min === 1 ? "exactly one" : "at most one (its deadline passed)";
    if (got.length < e.min || got.length > 1) {
      assert.fail(`request ${show(e.id)} (method ${show(e.method)}) got ${got.length} replies, expected ${range}`);
    }
    for (const g of got) {
      if (g.topic !== e.topic) assert.fail(`the reply to ${show(e.id)} went to ${show(g.topic)}, not ${show(e.topic)}`);
    }
    byId.delete(e.id);
  }
  for (const [id, got] of byId) {
    assert.fail(`${got.length} reply(ies) with id ${show(id)} to ${show(got[0]!.topic)}: no answerable request had it`);
  }
}

const protoSnapshot = (o: object) => new Map(Reflect.ownKeys(o).map((k) => [k, Object.getOwnPropertyDescriptor(o, k)]));
const PROTOS: [string, object, Map<PropertyKey, PropertyDescriptor | undefined>][] = [
  ["Object.prototype", Object.prototype, protoSnapshot(Object.prototype)],
  ["Array.prototype", Array.prototype, protoSnapshot(Array.prototype)],
];

/** Property 4 on one case. */
function checkMethods(h: Harness, expected: Expectation[]): void {
  assert.deepEqual(calls.forbidden, [], "undeclared methods ran");
  assert.equal(calls.constructed, 1, "the manager was constructed once");
  assert.equal(calls.initHost, 1, "initHost ran once (by start)");
  for (const [name, proto, before] of PROTOS) {
    const now = protoSnapshot(proto);
    for (const [k, d] of now) {
      const was = before.get(k);
      if (!was || was.value !== d?.value || was.get !== d?.get || was.set !== d?.set) {
        assert.fail(`${name} was polluted: ${String(k)}`);
      }
    }
    assert.equal(now.size, before.size, `${name} lost properties`);
  }
  const undeclared = new Set(UNDECLARED);
  const byId = h.repliesById();
  for (const e of expected) {
    if (typeof e.method !== "string" || !undeclared.has(e.method)) continue;
    for (const { reply } of byId.get(e.id) ?? []) {
      const type = reply.error?.type;
      if (type !== "NoSuchMethod" && type !== "BadRequest") {
        assert.fail(`a call of the undeclared ${show(e.method)} was answered with ${show(reply)}`);
      }
    }
  }
}

/** Property 1 on one case. */
async function checkServing(h: Harness): Promise<void> {
  await h.probe();
  assert.deepEqual(h.log.failures, [], "a throw escaped into the dispatcher's or the transport's safety net");
  assert.deepEqual(h.unhandled, [], "unhandled errors");
}

async function fuzz<T>(arb: fc.Arbitrary<T>, numRuns: number, predicate: (v: T) => Promise<void>): Promise<void> {
  await fc.assert(fc.asyncProperty(arb, predicate), {
    numRuns: Math.round(numRuns * SCALE),
    seed: SEED,
    path: PATH,
    // Shrinking runs the case again and again on the live server (large deep messages over
    // MQTT take a while): bound it. A run of the property itself takes a few seconds.
    interruptAfterTimeLimit: 30_000,
    markInterruptAsFailure: false,
    includeErrorInReport: true,
  });
}

// ---------------------------------------------------------------------------------------------
// Properties 5 and 6: their own messages
// ---------------------------------------------------------------------------------------------

/** A request whose args (or context, or an extra key) nest `depth` levels, with a good id and reply_to. */
const deepArb = fc.record({
  depth: fc.integer({ min: OVER_DEPTH, max: 6000 }),
  shape: depthShape,
  where: fc.constantFrom("args", "context", "extra"),
  /** A `__proto__` key elsewhere in the request (the codec strips those). */
  proto: fc.boolean(),
  method: fc.constantFrom("echo", "later"),
  batch: fc.boolean(),
  inBatch: fc.boolean(),
  topic: fc.constantFrom<TopicKind>("host", "fanout"),
});
type Deep = typeof deepArb extends fc.Arbitrary<infer D> ? D : never;

function deepMsg(d: Deep, reply: string): (b: Builder) => { id: string; bytes: Uint8Array } {
  return (b) => {
    const id = `deep~${b.tag}~${b.next()}`;
    const inner = nest(d.depth - 1, d.shape); // under the one key below: `depth` levels in all
    const fields = [`"v":1`, `"id":${JSON.stringify(id)}`, `"method":"${d.method}"`];
    fields.push(d.where === "args" ? `"args":{"deep":${inner}}` : `"args":{}`);
    if (d.where === "context") fields.push(`"context":{"deep":${inner}}`);
    if (d.where === "extra") fields.push(`"extra":{"deep":${inner}}`);
    if (d.proto) fields.push(`"more":{"__proto__":{"polluted":1}}`);
    fields.push(`"reply_to":${JSON.stringify(b.root + reply)}`);
    if (d.batch) fields.push(`"batch":true`);
    const text = `{${fields.join(",")}}`;
    return { id, bytes: utf8(d.inBatch ? `[${text}]` : text) };
  };
}

/** One call of property 6: a handler that throws (or returns) an odd value, or a normal call. */
interface OddCall {
  how: "throw" | "return" | "normal";
  kind: string;
  async: boolean;
  batch: boolean;
}

const ODD_CALLS: OddCall[] = [
  ...Object.keys(THROWN).flatMap((kind) =>
    [false, true].flatMap((async) => [false, true].map((batch) => ({ how: "throw" as const, kind, async, batch })))
  ),
  ...Object.keys(RETURNED).flatMap((kind) =>
    [false, true].map((batch) => ({ how: "return" as const, kind, async: false, batch }))
  ),
];

const oddCallArb: fc.Arbitrary<OddCall> = fc.oneof(
  { weight: 3, arbitrary: fc.constantFrom(...ODD_CALLS) },
  {
    weight: 1,
    arbitrary: fc.boolean().map((batch) => ({ how: "normal" as const, kind: "echo", async: false, batch })),
  },
);

const oddMethod = (c: OddCall) =>
  c.how === "normal" ? "echo" : c.how === "return" ? "give" : c.async ? "raiseAsync" : "raise";
const oddLabel = (c: OddCall) => `${oddMethod(c)}(${c.kind})${c.batch ? " batch:true" : ""}`;

/**
 * Property 6 on some calls, sent as one batch message or one message each: every call gets
 * exactly one well-formed reply (an error for a throw). Returns what went wrong, per call.
 */
async function oddCalls(h: Harness, list: OddCall[], together: boolean): Promise<string[]> {
  const ids: string[] = [];
  const request = (c: OddCall, b: Builder) => {
    const id = `odd~${b.tag}~${b.next()}`;
    ids.push(id);
    return {
      v: 1,
      id,
      method: oddMethod(c),
      args: { kind: c.kind },
      reply_to: `${b.root}odd-${b.tag}`,
      batch: c.batch,
    };
  };
  const msgs = together
    ? [new Msg("batch", "host", (b) => utf8(JSON.stringify(list.map((c) => request(c, b)))))]
    : list.map((c) => new Msg(oddLabel(c), "host", (b) => utf8(JSON.stringify(request(c, b)))));
  await h.run(msgs);
  // Read leniently, so that each call is told apart: one bad reply does not hide the others.
  const byId = new Map<unknown, unknown[]>();
  for (const p of h.served) {
    const parsed = parse(p.bytes);
    if (!parsed.ok) continue;
    for (const r of Array.isArray(parsed.value) ? parsed.value : [parsed.value]) {
      if (!isObject(r)) continue;
      byId.set(r.id, [...byId.get(r.id) ?? [], r]);
    }
  }
  const problems: string[] = [];
  list.forEach((c, i) => {
    const got = byId.get(ids[i]!) ?? [];
    const r = got[0] as Record<string, unknown> | undefined;
    const e = r?.error as Record<string, unknown> | undefined;
    if (got.length !== 1) {
      problems.push(`${oddLabel(c)}: ${got.length} replies${got.length ? "" : " (its caller hangs)"}`);
    } else if (r!.v !== 1) problems.push(`${oddLabel(c)}: a reply without "v":1`);
    else if (e !== undefined && (!isObject(e) || typeof e.type !== "string" || typeof e.message !== "string")) {
      problems.push(`${oddLabel(c)}: error ${show(e)} (type and message must be strings)`);
    } else if (c.how === "throw" && e === undefined) problems.push(`${oddLabel(c)}: a result, not an error`);
  });
  return problems;
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

const MEDIA = [
  ["memory", memoryMedium, RUNS.memory],
  [EMBEDDED ? "MQTT (embedded aedes)" : "MQTT (MQTT_URL)", mqttMedium, RUNS.mqtt],
] as const;

for (const [name, open, runs] of MEDIA) {
  describe(`fuzz: ${name}`, () => {
    const h = new Harness();
    before(async () => {
      await h.start(open);
    });
    after(async () => {
      await h.close();
    });

    it(`1. any input: the server never lets a throw escape and keeps serving (${runs.serving} runs)`, async () => {
      await fuzz(caseArb(h.medium.topics), runs.serving, async (msgs) => {
        await h.run(msgs);
        await checkServing(h);
      });
    });

    it(`2. any input: nothing published outside ${"{prefix}"}/reply/ or to a bad reply topic (${runs.topics} runs)`, async () => {
      await fuzz(caseArb(h.medium.topics), runs.topics, async (msgs) => {
        await h.run(msgs);
        checkTopics(h);
      });
    });

    it(`3. any input: exactly one reply per answerable request, none for the rest (${runs.replies} runs)`, async () => {
      await fuzz(caseArb(h.medium.topics), runs.replies, async (msgs) => {
        const expected = await h.run(msgs);
        checkReplies(h, expected);
      });
    });

    it(`4. any input: no undeclared method runs, Object.prototype stays clean (${runs.methods} runs)`, async () => {
      await fuzz(caseArb(h.medium.topics), runs.methods, async (msgs) => {
        const expected = await h.run(msgs);
        checkMethods(h, expected);
      });
    });

    it(`5. a request nested ${OVER_DEPTH}+ levels is answered with BadRequest (${runs.deep} runs)`, async () => {
      await fuzz(deepArb, runs.deep, async (d) => {
        let id = "";
        const make = deepMsg(d, `deep-${h.tag}`);
        await h.run([
          new Msg(`nested ${d.depth} in ${d.where}`, d.topic, (b) => {
            const m = make(b);
            id = m.id;
            return m.bytes;
          }),
        ]);
        const got = h.repliesById().get(id) ?? [];
        assert.equal(got.length, 1, `replies to the request nested ${d.depth} levels`);
        assert.equal(got[0]!.reply.error?.type, "BadRequest", `the reply to a request nested ${d.depth} levels`);
      });
    });

    it(`6. whatever a handler throws or returns, its caller gets a well-formed reply (all ${ODD_CALLS.length} cases)`, async () => {
      const problems: string[] = [];
      for (const c of ODD_CALLS) problems.push(...await oddCalls(h, [c], false));
      if (problems.length > 0) assert.fail(`${problems.length} of ${ODD_CALLS.length} cases:\n${problems.join("\n")}`);
    });

    it(`6. odd throws mixed with normal calls, batched or not: one reply each (${runs.throws} runs)`, async () => {
      await fuzz(
        fc.tuple(fc.array(oddCallArb, { minLength: 1, maxLength: 6 }), fc.boolean()),
        runs.throws,
        async ([list, together]) => assert.deepEqual(await oddCalls(h, list, together), []),
      );
    });
  });
}
