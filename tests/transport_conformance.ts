/**
 * The behaviour every Transport must have. Each transport's test file calls
 * `transportConformance()` with a fixture; a fixture may skip a named case with its reason.
 */

import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { ClosedError, DeliveryError, type Transport } from "../index.ts";
import { sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";

/** How a test file gives the suite its transport. */
export interface TransportFixture {
  /** A new connection to the same medium as the others of this fixture. */
  open(): Promise<Transport>;
  /** Release the medium (a broker) after the suite. */
  close?(): Promise<void>;
}

/** Case → the reason it cannot pass on this transport; the runner prints it. */
export type Skips = Partial<Record<keyof typeof CASES, string>>;

export const CASES = {
  exact: "publish() reaches a subscription of the exact topic on another connection",
  plus: "subscribe() with + matches exactly one level",
  hash: "subscribe() with # matches the rest, including the parent level",
  fanout: "without a group, every matching subscription gets every message",
  group: "a group gives each message to exactly one member, spread across members",
  groupAndPlain: "a group and a plain subscription on one filter both receive",
  overlap: "overlapping subscriptions on one connection each get each message once, also one made while messages flow",
  unsubscribe: "unsubscribe() stops delivery to that subscription only",
  order: "messages of one publisher arrive in the order published",
  bytes: "payload bytes arrive intact: empty, binary and 1 MiB",
  handlerThrows: "a handler that throws does not stop later deliveries",
  async: "delivery never happens inside publish()'s own call stack",
  invalid: "invalid topics and filters are refused with a TypeError",
  mandatory: "a mandatory publish that nobody subscribes to rejects with DeliveryError",
  close: "close() is idempotent; publish and subscribe after it reject with ClosedError",
  // Optional abilities: a transport without one skips its case, saying so.
  publishLocal: "publishLocal() gives local subscriptions a private copy, the others the bytes",
  detach: "Subscription.detach() stops delivery to that subscription",
  forget: "forget() removes a subscription for good: nothing more is delivered to it",
  connection: "connection() reaches the same medium; its clean close() leaves the first open and publishes no Will",
} as const;

export function transportConformance(
  name: string,
  makeFixture: () => Promise<TransportFixture>,
  skips: Skips = {},
): void {
  describe(`Transport conformance: ${name}`, () => {
    let fixture: TransportFixture;
    let open: Transport[] = [];
    let p: string;

    before(async () => {
      fixture = await makeFixture();
    });
    after(async () => {
      await fixture?.close?.();
    });
    afterEach(async () => {
      await Promise.all(open.map((t) => t.close()));
      open = [];
    });

    async function connect(): Promise<Transport> {
      const t = await fixture.open();
      open.push(t);
      return t;
    }

    /** Collect what a filter receives on a connection. */
    async function collect(t: Transport, filter: string, group?: string) {
      const got: { topic: string; body: string }[] = [];
      const sub = await t.subscribe(filter, (b, topic) => {
        got.push({ topic, body: text(b) });
      }, { group, qos: 1 });
      return { got, sub };
    }

    /** `fn` may find out that the transport lacks an optional ability: it calls `lacks(why)`. */
    function test(key: keyof typeof CASES, fn: (lacks: (why: string) => void) => Promise<void>): void {
      const reason = skips[key];
      it(CASES[key], reason ? { skip: reason } : {}, async (t) => {
        p = uniquePrefix("tc");
        await fn((why) => {
          t.skip(why);
          // Deno's node:test reports a skip from inside a test as a pass: say it.
          if ("Deno" in globalThis) console.log(`skipped "${CASES[key]}": ${why}`);
        });
      });
    }

    test("exact", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got } = await collect(b, `${p}/x/y`);
      await a.publish(`${p}/x/y`, utf8("hello"), { qos: 1 });
      await waitFor(() => got.length === 1, "the message");
      assert.deepEqual(got, [{ topic: `${p}/x/y`, body: "hello" }]);
    });

    test("plus", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got } = await collect(b, `${p}/a/+/c`);
      const { got: end } = await collect(b, `${p}/end`);
      for (const t of [`${p}/a/b/c`, `${p}/a/b/x/c`, `${p}/a/c`, `${p}/a/zz/c`, `${p}/a/b/c/d`]) {
        await a.publish(t, utf8(t), { qos: 1 });
      }
      await a.publish(`${p}/end`, utf8("end"), { qos: 1 });
      await waitFor(() => end.length === 1 && got.length >= 2, "the matching messages");
      await sleep(20);
      assert.deepEqual(got.map((g) => g.topic).sort(), [`${p}/a/b/c`, `${p}/a/zz/c`]);
    });

    test("hash", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got } = await collect(b, `${p}/a/#`);
      const { got: end } = await collect(b, `${p}/end`);
      for (const t of [`${p}/a`, `${p}/a/b`, `${p}/a/b/c/d`, `${p}/b`, `${p}/ab`]) {
        await a.publish(t, utf8(t), { qos: 1 });
      }
      await a.publish(`${p}/end`, utf8("end"), { qos: 1 });
      await waitFor(() => end.length === 1 && got.length >= 3, "the matching messages");
      await sleep(20);
      assert.deepEqual(got.map((g) => g.topic).sort(), [`${p}/a`, `${p}/a/b`, `${p}/a/b/c/d`]);
    });

    test("fanout", async () => {
      const [a, b, c] = [await connect(), await connect(), await connect()];
      const r1 = await collect(b, `${p}/f`);
      const r2 = await collect(c, `${p}/f`);
      const r3 = await collect(c, `${p}/+`);
      for (let i = 0; i < 10; i++) await a.publish(`${p}/f`, utf8(String(i)), { qos: 1 });
      await waitFor(() => [r1, r2, r3].every((r) => r.got.length === 10), "10 messages on each subscription");
    });

    test("group", async () => {
      const [a, b, c] = [await connect(), await connect(), await connect()];
      const m1 = await collect(b, `${p}/g`, "workers");
      const m2 = await collect(c, `${p}/g`, "workers");
      const n = 100;
      for (let i = 0; i < n; i++) await a.publish(`${p}/g`, utf8(String(i)), { qos: 1 });
      await waitFor(() => m1.got.length + m2.got.length >= n, `${n} messages across the group`);
      await sleep(50);
      const all = [...m1.got, ...m2.got].map((g) => g.body);
      assert.equal(all.length, n, "each message went to exactly one member");
      assert.equal(new Set(all).size, n);
      assert.ok(m1.got.length >= n / 5 && m2.got.length >= n / 5, `spread: ${m1.got.length} / ${m2.got.length}`);
    });

    test("groupAndPlain", async () => {
      const [a, b, c] = [await connect(), await connect(), await connect()];
      const g1 = await collect(b, `${p}/gp`, "workers");
      const g2 = await collect(c, `${p}/gp`, "workers");
      const plain = await collect(c, `${p}/gp`);
      for (let i = 0; i < 10; i++) await a.publish(`${p}/gp`, utf8(String(i)), { qos: 1 });
      await waitFor(() => plain.got.length === 10 && g1.got.length + g2.got.length === 10, "both kinds");
    });

    test("overlap", async () => {
      const [a, b] = [await connect(), await connect()];
      const exact = await collect(b, `${p}/o/x`);
      let n = 0;
      let flowing = true;
      const flow = (async () => {
        while (flowing) {
          await a.publish(`${p}/o/x`, utf8(String(n++)), { qos: 1 });
          await sleep(1); // let the other side (and an in-process hub) run
        }
      })();
      let wild, hash, from;
      try {
        await waitFor(() => exact.got.length >= 5, "messages on the first subscription");
        wild = await collect(b, `${p}/o/+`);
        hash = await collect(b, `${p}/#`);
        from = n; // published once both are subscribed: they must get it
        await waitFor(() => hash!.got.length >= 5, "messages on the later subscriptions");
      } finally {
        flowing = false; // a failure above must not leave the publisher running
        await flow;
      }
      await waitFor(() => exact.got.length >= n && hash.got.some((g) => g.body === String(n - 1)), "the last message");
      await sleep(50);
      const bodies = (r: { got: { body: string }[] }) => r.got.map((g) => Number(g.body));
      assert.deepEqual(
        bodies(exact),
        Array.from({ length: n }, (_, i) => i),
        "the first: every message, once, in order",
      );
      for (const [name, r] of [["o/+", wild], ["#", hash]] as const) {
        const got = bodies(r);
        assert.equal(new Set(got).size, got.length, `${name}: no message twice`);
        for (let i = from; i < n; i++) {
          assert.ok(got.includes(i), `${name}: message ${i} (published after it subscribed)`);
        }
      }
    });

    test("unsubscribe", async () => {
      const [a, b] = [await connect(), await connect()];
      const gone = await collect(b, `${p}/u`);
      const kept = await collect(b, `${p}/u`);
      await a.publish(`${p}/u`, utf8("1"), { qos: 1 });
      await waitFor(() => gone.got.length === 1 && kept.got.length === 1, "the first message on both");
      await gone.sub.unsubscribe();
      await a.publish(`${p}/u`, utf8("2"), { qos: 1 });
      await waitFor(() => kept.got.length === 2, "the second message on the kept subscription");
      await sleep(30);
      assert.equal(gone.got.length, 1);
      await gone.sub.unsubscribe(); // twice is fine
    });

    test("order", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got } = await collect(b, `${p}/o`);
      const n = 500;
      await Promise.all(Array.from({ length: n }, (_, i) => a.publish(`${p}/o`, utf8(String(i)), { qos: 1 })));
      await waitFor(() => got.length === n, `${n} messages`);
      assert.deepEqual(got.map((g) => Number(g.body)), Array.from({ length: n }, (_, i) => i));
    });

    test("bytes", async () => {
      const [a, b] = [await connect(), await connect()];
      const got: Uint8Array[] = [];
      await b.subscribe(`${p}/bytes`, (x) => void got.push(x), { qos: 1 });
      const big = new Uint8Array(1024 * 1024).map((_, i) => (i * 31) & 0xff);
      const payloads = [new Uint8Array(0), new Uint8Array([0, 255, 1, 254, 0xc3, 0x28]), big];
      for (const x of payloads) await a.publish(`${p}/bytes`, x, { qos: 1 });
      await waitFor(() => got.length === 3, "three payloads", 10_000);
      got.forEach((g, i) => assert.deepEqual(Buffer.from(g), Buffer.from(payloads[i]!)));
    });

    test("handlerThrows", async () => {
      const [a, b] = [await connect(), await connect()];
      const got: string[] = [];
      await b.subscribe(`${p}/h`, (x) => {
        got.push(text(x));
        if (got.length === 1) throw new Error("boom (expected by the test)");
      }, { qos: 1 });
      await b.subscribe(`${p}/h2`, (x) => {
        got.push(text(x));
        return Promise.reject(new Error("async boom (expected by the test)"));
      }, { qos: 1 });
      await a.publish(`${p}/h`, utf8("1"), { qos: 1 });
      await a.publish(`${p}/h2`, utf8("2"), { qos: 1 });
      await a.publish(`${p}/h`, utf8("3"), { qos: 1 });
      await waitFor(() => got.length === 3, "all three messages");
    });

    test("async", async () => {
      const a = await connect();
      let returned = false;
      let sawReturned: boolean | undefined;
      await a.subscribe(`${p}/sync`, () => {
        sawReturned = returned;
      }, { qos: 1 });
      const pub = a.publish(`${p}/sync`, utf8("x"), { qos: 1 });
      returned = true;
      await pub;
      await waitFor(() => sawReturned !== undefined, "the delivery");
      assert.equal(sawReturned, true);
    });

    test("invalid", async () => {
      const a = await connect();
      for (const t of ["", `${p}/+`, `${p}/#`, `${p}/a+b`]) {
        await assert.rejects(a.publish(t, utf8("x")), TypeError, `publish to ${JSON.stringify(t)}`);
      }
      for (const f of ["", `${p}/#/x`, `${p}/a#`, `${p}/a+/b`]) {
        await assert.rejects(a.subscribe(f, () => {}), TypeError, `subscribe to ${JSON.stringify(f)}`);
      }
      await assert.rejects(a.subscribe(`${p}/x`, () => {}, { group: "a/b" }), TypeError);
    });

    test("mandatory", async () => {
      const a = await connect();
      await assert.rejects(a.publish(`${p}/nobody`, utf8("x"), { qos: 1, mandatory: true }), DeliveryError);
      await a.publish(`${p}/nobody`, utf8("x"), { qos: 1 }); // not mandatory: fine
    });

    test("close", async () => {
      const a = await connect();
      await a.close();
      await a.close();
      await assert.rejects(a.publish(`${p}/c`, utf8("x")), ClosedError);
      await assert.rejects(a.subscribe(`${p}/c`, () => {}), ClosedError);
    });

    test("publishLocal", async () => {
      const [a, b] = [await connect(), await connect()];
      assert.ok(a.publishLocal, "the transport has publishLocal()");
      const local: unknown[] = [];
      const bytes: string[] = [];
      await b.subscribe(`${p}/l`, (payload, _t, meta) => void local.push([payload.byteLength, meta?.local]), {
        local: true,
      });
      await b.subscribe(`${p}/l`, (payload) => void bytes.push(text(payload)));
      const value = { n: 1 };
      await a.publishLocal!(`${p}/l`, { copy: () => structuredClone(value), bytes: () => utf8('{"n":1}') });
      value.n = 2; // the sender may change its objects once publishLocal() returned
      await waitFor(() => local.length === 1 && bytes.length === 1, "both deliveries");
      assert.deepEqual(local, [[0, { n: 1 }]]);
      assert.deepEqual(bytes, ['{"n":1}']);
    });

    test("detach", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got, sub } = await collect(b, `${p}/d`);
      const { got: end } = await collect(b, `${p}/end`);
      assert.ok(sub.detach, "the subscription has detach()");
      await sub.detach!();
      await a.publish(`${p}/d`, utf8("after"), { qos: 1 });
      await a.publish(`${p}/end`, utf8("end"), { qos: 1 });
      await waitFor(() => end.length === 1, "the end marker");
      await sleep(20);
      assert.deepEqual(got, []);
    });

    test("forget", async () => {
      const [a, b] = [await connect(), await connect()];
      const { got } = await collect(b, `${p}/f`);
      const { got: end } = await collect(b, `${p}/end`);
      assert.ok(b.forget, "the transport has forget()");
      await b.forget!(`${p}/f`);
      await a.publish(`${p}/f`, utf8("after"), { qos: 1 });
      await a.publish(`${p}/end`, utf8("end"), { qos: 1 });
      await waitFor(() => end.length === 1, "the end marker");
      await sleep(20);
      assert.deepEqual(got, []);
    });

    test("connection", async (lacks) => {
      const [a, b] = [await connect(), await connect()];
      if (a.connection === undefined) return lacks(`${name} has no connection() (an optional ability)`);
      const { got: wills } = await collect(b, `${p}/will`);
      const c = await a.connection({ will: { topic: `${p}/will`, payload: utf8("gone") } });
      open.push(c);
      const { got } = await collect(c, `${p}/to-c`);
      await b.publish(`${p}/to-c`, utf8("in"), { qos: 1 });
      const { got: back } = await collect(b, `${p}/from`);
      await c.publish(`${p}/from`, utf8("out"), { qos: 1 });
      await waitFor(() => got.length === 1 && back.length === 1, "a message each way");
      await c.close();
      await a.publish(`${p}/from`, utf8("first"), { qos: 1 });
      await waitFor(() => back.length === 2, "a message from the first connection after the other closed");
      await sleep(100);
      assert.deepEqual(back.map((m) => m.body), ["out", "first"]);
      assert.deepEqual(wills, [], "a clean close publishes no Will");
    });
  });
}
