// A reply that cannot be sent reaches the caller at once as a RemoteError naming the method:
// over MQTT (maxPayloadBytes) and over the memory transport as bytes with a payload limit.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  Manager,
  openRegistry,
  type Registry,
  RemoteError,
  RequestContext,
  Rpc,
  Service,
  type Transport,
} from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { mqttFixture } from "./mqtt_fixture.ts";
import type { TransportFixture } from "./transport_conformance.ts";
import { MemoryLogger, uniquePrefix } from "./helpers.ts";

const LIMIT = 2048;

class Sizes extends Manager {
  blob(_ctx: RequestContext, { n }: { n: number }) {
    return "x".repeat(n);
  }
  fail(_ctx: RequestContext, { n }: { n: number }) {
    throw new Error("y".repeat(n));
  }
}

/** The memory transport as bytes, refusing payloads over LIMIT as MqttTransport does. */
function limited(t: MemoryTransport): Transport {
  return {
    publish: (topic, payload, opts) =>
      payload.byteLength > LIMIT
        ? Promise.reject(new RangeError(`Cannot publish ${payload.byteLength} bytes to ${topic}: over the limit`))
        : t.publish(topic, payload, opts),
    subscribe: (filter, handler, opts) => t.subscribe(filter, handler, opts),
    close: () => t.close(),
  };
}

const fixtures: [string, () => Promise<TransportFixture>][] = [
  ["memory", () => {
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    return Promise.resolve({ open: () => Promise.resolve(limited(new MemoryTransport(hub))) });
  }],
  ["mqtt", () => mqttFixture({ maxPayloadBytes: LIMIT })],
];

for (const [name, make] of fixtures) {
  describe(`replies over the transport's payload limit: ${name}`, () => {
    let fx: TransportFixture;
    let registry: Registry;
    let server: Transport;
    let client: Transport;
    let service: Service;
    let rpc: Rpc;
    const ctx = new RequestContext();
    before(async () => {
      fx = await make();
      registry = await openRegistry("sqljs::memory:");
      [server, client] = [await fx.open(), await fx.open()];
      const prefix = uniquePrefix("reply");
      service = Service.create({
        manager: Sizes,
        topic: "sizes",
        host: "h1",
        transport: server,
        registry,
        prefix,
        logger: new MemoryLogger(),
      });
      await service.start();
      rpc = new Rpc(client, { prefix, timeout: 10 });
    });
    after(async () => {
      await rpc?.close();
      await service?.stop();
      await Promise.all([server?.close(), client?.close(), registry?.close()]);
      await fx?.close?.();
    });

    it("a result too large is ReplyTooLarge naming the method, at once", async () => {
      const started = Date.now();
      await assert.rejects(
        rpc.call(ctx, "sizes", { method: "blob", args: { n: 4 * LIMIT } }),
        (e: unknown) => {
          assert.ok(e instanceof RemoteError, String(e));
          assert.equal(e.type, "ReplyTooLarge");
          assert.match(e.message, /^The reply to "blob" could not be sent: Cannot publish \d+ bytes/);
          return true;
        },
      );
      assert.ok(Date.now() - started < 5_000, "not the call's timeout");
    });

    it("so is an error too large to send", async () => {
      await assert.rejects(
        rpc.call(ctx, "sizes", { method: "fail", args: { n: 4 * LIMIT } }),
        (e: unknown) => e instanceof RemoteError && e.type === "ReplyTooLarge" && /"fail"/.test(e.message),
      );
    });

    it("replies that fit alone arrive even when together they would not", async () => {
      // 16 replies of ~600 bytes to one client in one turn: batched, over the limit together.
      const n = Math.floor(LIMIT / 4);
      const results = await Promise.all(
        Array.from({ length: 16 }, () => rpc.call<string>(ctx, "sizes", { method: "blob", args: { n } })),
      );
      assert.ok(results.every((r) => r.length === n));
    });
  });
}
