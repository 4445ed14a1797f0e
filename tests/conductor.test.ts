/**
 * The conductor: a registry served over the transport. The registry conformance suite runs against
 * `ConductorRegistry` over the memory transport and over MQTT, with a conductor service in front
 * of an in-memory sql.js registry; then what is particular to it.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { Manager, openRegistry, type Registry, RegistryError, Service, type Transport } from "../index.ts";
import { ConductorManager, ConductorRegistry } from "../registry/conductor.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { registryConformance } from "./registry_conformance.ts";
import { MemoryLogger, uniquePrefix } from "./helpers.ts";
import { mqttFixture } from "./mqtt_fixture.ts";

/** A conductor service over `transport`, in front of a fresh sql.js registry (it registers itself
 * in another one, so that the suite finds the registry it serves empty). */
async function conductor(transport: Transport, prefix: string) {
  const backing = await openSqlRegistry("sqljs::memory:");
  const own = await openSqlRegistry("sqljs::memory:");
  const svc = Service.create({
    topic: "conductor",
    host: "c1",
    binary: "nova-conductor",
    manager: new ConductorManager(backing),
    transport,
    registry: own,
    prefix,
    logger: new MemoryLogger(),
  });
  await svc.start();
  return {
    async stop() {
      await svc.stop();
      await backing.close();
      await own.close();
    },
  };
}

registryConformance("conductor over the memory transport", async () => {
  const hub = new MemoryHub();
  const prefix = uniquePrefix("cond");
  const server = new MemoryTransport(hub);
  const c = await conductor(server, prefix);
  const clients: Transport[] = [];
  return {
    open: () => {
      const t = new MemoryTransport(hub);
      clients.push(t);
      return Promise.resolve(new ConductorRegistry(t, { prefix }));
    },
    durable: false,
    shared: true,
    cleanup: async () => {
      await c.stop();
      await Promise.all([server, ...clients].map((t) => t.close()));
    },
  };
});

describe("conductor over MQTT", () => {
  let fx: Awaited<ReturnType<typeof mqttFixture>> | undefined;
  after(async () => await fx?.close?.());

  registryConformance("conductor over MQTT", async () => {
    fx ??= await mqttFixture();
    const prefix = uniquePrefix("cond");
    const server = await fx.open();
    const c = await conductor(server, prefix);
    const clients: Transport[] = [];
    return {
      open: async () => {
        const t = await fx!.open();
        clients.push(t);
        return new ConductorRegistry(t, { prefix });
      },
      durable: false,
      shared: true,
      cleanup: async () => {
        await c.stop();
        await Promise.all([server, ...clients].map((t) => t.close()));
      },
    };
  });
});

describe("conductor", () => {
  it("a service with --registry_url=conductor: registers and heartbeats through the conductor", async () => {
    const hub = new MemoryHub();
    const prefix = uniquePrefix("cond");
    const backing = await openSqlRegistry("sqljs::memory:");
    const c = await conductor(new MemoryTransport(hub), prefix);
    const t = new MemoryTransport(hub);
    const registry = await openRegistry("conductor:", { transport: t, prefix });
    try {
      const svc = Service.create({
        topic: "compute",
        host: "d1",
        manager: class Compute extends Manager {},
        transport: t,
        registry,
        prefix,
        reportInterval: 0.05,
        logger: new MemoryLogger(),
      });
      await svc.start();
      await new Promise((r) => setTimeout(r, 300));
      const rows = await registry.list({ topic: "compute" });
      assert.equal(rows.length, 1);
      assert.ok(rows[0]!.reportCount >= 2, `heartbeats: ${rows[0]!.reportCount}`);
      assert.ok(rows[0]!.lastSeenUp instanceof Date);
      await svc.stop();
    } finally {
      await registry.close();
      await c.stop();
      await backing.close();
      await t.close();
    }
  });

  it("no conductor is a registry outage (RegistryError), and a bad topic or missing transport a TypeError", async () => {
    const t = new MemoryTransport(new MemoryHub());
    const r: Registry = new ConductorRegistry(t, { prefix: uniquePrefix("none"), timeout: 1 });
    await assert.rejects(
      r.list(),
      (e: Error) => e instanceof RegistryError && /No conductor serves conductor/.test(e.message),
    );
    await r.close();
    assert.throws(() => new ConductorRegistry(t, { topic: "a/b" }), TypeError);
    assert.throws(() => new ConductorRegistry(t, { topic: "a.b" }), TypeError);
    await assert.rejects(openRegistry("conductor:"), /a conductor is reached over a transport/);
    await t.close();
  });
});
