import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { transportConformance } from "./transport_conformance.ts";
import { inject } from "../transports/memory-faults.ts";
import { MemoryLogger, sleep, text, utf8, waitFor } from "./helpers.ts";

transportConformance("memory", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(new MemoryTransport(hub)) });
}, {
  detach: "the memory transport keeps no sessions: unsubscribe() is all it has",
  forget: "the memory transport keeps no sessions: nothing to forget",
});

describe("MemoryTransport", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  const a = new MemoryTransport(hub);
  const b = new MemoryTransport(hub);
  after(() => Promise.all([a.close(), b.close()]));

  it("publish() copies the payload: the sender may reuse its buffer, receivers get their own", async () => {
    const got: Uint8Array[] = [];
    await b.subscribe("copy/x", (p) => void got.push(p));
    await b.subscribe("copy/+", (p) => void got.push(p));
    const buf = utf8("abc");
    await a.publish("copy/x", buf);
    buf[0] = 0x7a; // the sender scribbles on its buffer after publishing
    await waitFor(() => got.length === 2, "two deliveries");
    assert.equal(text(got[0]!), "abc");
    got[0]![1] = 0x7a; // one receiver scribbles on its copy
    assert.equal(text(got[1]!), "abc");
  });

  it("publishLocal() gives each value subscription its own copy, taken at publish; byte readers get bytes", async () => {
    const value = { n: 1, list: [1] };
    let copies = 0;
    const message = {
      copy: () => (copies++, structuredClone(value)),
      bytes: () => utf8(JSON.stringify(value)),
    };
    const values: unknown[] = [];
    const bytes: string[] = [];
    await b.subscribe("local/x", (p, _t, meta) => void values.push(meta?.local ?? text(p)), { local: true });
    await b.subscribe("local/+", (p, _t, meta) => void values.push(meta?.local ?? text(p)), { local: true });
    await b.subscribe("local/#", (p, _t, meta) => void bytes.push(meta?.local === undefined ? text(p) : "a value!"));
    await a.publishLocal("local/x", message);
    value.n = 2; // the sender changes its object after publishing
    await waitFor(() => values.length === 2 && bytes.length === 1, "three deliveries");
    assert.equal(copies, 2, "copied once per value subscription, at publish");
    assert.deepEqual(values, [{ n: 1, list: [1] }, { n: 1, list: [1] }]);
    assert.notEqual(values[0], values[1]);
    assert.deepEqual(bytes, ['{"n":1,"list":[1]}']);
    await assert.rejects(a.publishLocal("local/#", message), TypeError);
    await assert.rejects(a.publishLocal("nobody/here", message, { mandatory: true }), /nobody serves it/);
  });

  it("a value whose group member left before delivery goes to a member that takes values", async () => {
    const hub2 = new MemoryHub({ logger: new MemoryLogger() });
    const t = new MemoryTransport(hub2);
    const got: string[] = [];
    const leaving = await t.subscribe("g/x", () => void got.push("leaving"), { group: "g", local: true });
    await t.subscribe("g/x", (p, _t, meta) => void got.push(meta?.local ? "value" : `bytes ${text(p)}`), {
      group: "g",
      local: true,
    });
    let copies = 0;
    const message = { copy: () => ({ copy: ++copies }), bytes: () => utf8("B") };
    const sent = t.publishLocal("g/x", message); // to "leaving" (round robin starts there), as a value only
    void leaving.unsubscribe(); // takes effect at once, before the delivery's microtask
    // A member that reads bytes joins before the delivery too, and round robin comes to it next:
    // it cannot read a value, so the value goes to the member that can.
    void t.subscribe("g/x", (p) => void got.push(`byte reader ${text(p)}`), { group: "g" });
    await sent;
    await waitFor(() => got.length === 1, "the hand-over");
    await sleep(10);
    assert.deepEqual(got, ["value"]);
    assert.equal(copies, 1);
    await t.close();
  });

  it("inject({drop}) loses matching messages only, for `count` messages", async () => {
    const got: string[] = [];
    await b.subscribe("drop/#", (p) => void got.push(text(p)));
    const remove = inject(hub, { filter: "drop/lossy", drop: true, count: 2 });
    const dropped = hub.stats.dropped;
    for (const t of ["drop/lossy", "drop/fine", "drop/lossy", "drop/lossy"]) await a.publish(t, utf8(t));
    await waitFor(() => got.length === 2, "two messages");
    await sleep(10);
    assert.deepEqual(got, ["drop/fine", "drop/lossy"]);
    assert.equal(hub.stats.dropped - dropped, 2, "the hub counts what it dropped");
    remove();
  });

  it("inject({delay}) delivers matching messages late", async () => {
    const got: number[] = [];
    await b.subscribe("delay/x", () => void got.push(Date.now()));
    const remove = inject(hub, { filter: "delay/x", delay: 0.05 });
    const t0 = Date.now();
    await a.publish("delay/x", utf8("x"));
    await waitFor(() => got.length === 1, "the delayed message");
    assert.ok(got[0]! - t0 >= 45, `delivered after ${got[0]! - t0} ms`);
    remove();
  });

  it("inject({duplicate}) delivers matching messages twice", async () => {
    const got: string[] = [];
    await b.subscribe("dup/x", (p) => void got.push(text(p)));
    const remove = inject(hub, { filter: "dup/#", duplicate: true });
    await a.publish("dup/x", utf8("once"));
    await waitFor(() => got.length === 2, "two copies");
    remove();
    await a.publish("dup/x", utf8("again"));
    await waitFor(() => got.length === 3, "a single copy after remove()");
  });

  it("a group member that unsubscribes before delivery hands the message to another member", async () => {
    const got: string[] = [];
    const s1 = await b.subscribe("grp/x", () => void got.push("s1"), { group: "g" });
    await b.subscribe("grp/x", () => void got.push("s2"), { group: "g" });
    const published = a.publish("grp/x", utf8("x")); // routed to s1: round robin starts at the first
    const unsubscribed = s1.unsubscribe(); // before the microtask delivers it
    await Promise.all([published, unsubscribed]);
    await waitFor(() => got.length === 1, "the message");
    assert.deepEqual(got, ["s2"]);
  });

  it("inject() sets the hub's fault seam only while a fault is in place", async () => {
    const hub2 = new MemoryHub({ logger: new MemoryLogger() });
    const removeA = inject(hub2, { filter: "a", drop: true });
    inject(hub2, { filter: "b", drop: true, count: 1 });
    const t = new MemoryTransport(hub2);
    await t.subscribe("b", () => {});
    await t.publish("b", utf8("x")); // uses up the count of the second fault
    assert.notEqual(hub2.fault, undefined);
    removeA();
    assert.equal(hub2.fault, undefined, "no fault left: publish does no fault work");
    await t.close();
  });

  it("inject() refuses a bad filter and a negative delay", () => {
    assert.throws(() => inject(hub, { filter: "a/#/b", drop: true }), TypeError);
    assert.throws(() => inject(hub, { filter: "a", delay: -1 }), RangeError);
  });
});
