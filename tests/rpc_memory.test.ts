import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { Manager, openRegistry, RequestContext, Rpc, Service, type Transport } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { MemoryLogger, text, utf8, waitFor } from "./helpers.ts";

// Envelopes travel as values (publishLocal): copied with JSON semantics, no text in between.
rpcSuite("memory", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(new MemoryTransport(hub)) });
});

/** The memory transport without publishLocal: every envelope goes as JSON bytes, as on MQTT. */
function bytesOnly(t: MemoryTransport): Transport {
  return {
    publish: (topic, payload, opts) => t.publish(topic, payload, opts),
    subscribe: (filter, handler, opts) => t.subscribe(filter, handler, opts),
    close: () => t.close(),
  };
}

// The same suite through the JSON bytes: both paths must behave alike.
rpcSuite("memory, as bytes", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(bytesOnly(new MemoryTransport(hub))) });
});

describe("request ids", () => {
  it("are UUIDs of version 8, in the order a client sent them, and distinct across clients", async () => {
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    const sniffer = new MemoryTransport(hub);
    const ids: string[] = [];
    // A byte reader: it gets the JSON of what the clients send as values.
    await sniffer.subscribe("novalet/rpc/#", (p) => void ids.push(JSON.parse(text(p)).id));
    const [a, b] = [new Rpc(new MemoryTransport(hub)), new Rpc(new MemoryTransport(hub))];
    const ctx = new RequestContext();
    for (let i = 0; i < 3; i++) {
      await a.cast(ctx, "nobody", { method: "m" }).catch(() => {});
      await b.cast(ctx, "nobody", { method: "m" }).catch(() => {});
    }
    await waitFor(() => ids.length === 6, "six requests");
    for (const id of ids) assert.match(id, /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
    const fromA = ids.filter((_, i) => i % 2 === 0);
    const fromB = ids.filter((_, i) => i % 2 === 1);
    assert.deepEqual([...fromA].sort(), fromA, "in order within a client");
    assert.equal(new Set(ids).size, 6);
    assert.notEqual(fromA[0]!.slice(0, 23), fromB[0]!.slice(0, 23), "clients draw their own random part");
    await Promise.all([a.close(), b.close(), sniffer.close()]);
  });
});

describe("values from a foreign in-process publisher", () => {
  it("a malformed value is answered with BadRequest or dropped, and the service keeps serving", async () => {
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    const log = new MemoryLogger();
    const registry = await openRegistry("sqljs::memory:");
    class Calc extends Manager {
      add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
        return a + b;
      }
    }
    const svc = Service.create({
      host: "h",
      topic: "calc",
      manager: Calc,
      transport: new MemoryTransport(hub),
      registry,
      logger: log,
    });
    await svc.start();
    const t = new MemoryTransport(hub);
    const replies: unknown[] = [];
    await t.subscribe("novalet/reply/foreign", (_p, _t, meta) => void replies.push(meta?.local), { local: true });
    const send = (value: unknown) =>
      t.publishLocal("novalet/rpc/calc", { copy: () => value, bytes: () => utf8(JSON.stringify(value)) });
    await send({ v: 2, id: "x1", method: "add", reply_to: "novalet/reply/foreign" }); // answered
    await send({ v: 1, id: "x2", method: "add", args: "a=1", reply_to: "novalet/reply/foreign" }); // answered
    await send("not an envelope"); // dropped: no reply address
    await send({ v: 1, id: "x3", method: "add", reply_to: "novalet/evil" }); // not run, not answered
    await waitFor(() => replies.length === 2, "two BadRequest replies");
    for (const r of replies) assert.equal((r as { error: { type: string } }).error.type, "BadRequest");
    assert.ok(log.has("warn", /dropped \(no reply address\)/));
    const rpc = new Rpc(new MemoryTransport(hub));
    assert.equal(await rpc.call(new RequestContext(), "calc", { method: "add", args: { a: 1, b: 2 } }), 3);
    await rpc.close();
    await svc.stop();
    await registry.close();
    await t.close();
  });
});
