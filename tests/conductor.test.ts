/**
 * The conductor: a registry served over the transport. The registry conformance suite runs against
 * `ConductorRegistry` over the memory transport and over MQTT, with a conductor service in front
 * of an in-memory sql.js registry; then what is particular to it.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import {
  Manager,
  NotAuthorized,
  openRegistry,
  type Registry,
  RegistryError,
  RemoteError,
  RequestContext,
  Rpc,
  Service,
  type Transport,
} from "../index.ts";
import { ConductorAdminManager, ConductorManager, ConductorRegistry, createConductor } from "../registry/conductor.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { registryConformance } from "./registry_conformance.ts";
import { MemoryLogger, uniquePrefix, waitFor } from "./helpers.ts";
import { mqttFixture } from "./mqtt_fixture.ts";
import { Mosquitto, needs } from "./mosquitto.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import pg from "pg";

const PG_URL = process.env.PG_URL;

/** A conductor (its two services) over `transport`, in front of `backing` (default: a fresh
 * sql.js registry); it registers itself in another one, so that the suite finds the registry it
 * serves empty. */
async function conductor(transport: Transport, prefix: string, opts: { backing?: Registry; host?: string } = {}) {
  const backing = opts.backing ?? await openSqlRegistry("sqljs::memory:");
  const own = await openSqlRegistry("sqljs::memory:");
  const common = { host: opts.host ?? "c1", transport, registry: own, prefix, logger: new MemoryLogger() };
  const services = [
    Service.create({ ...common, topic: "conductor", binary: "nova-conductor", manager: new ConductorManager(backing) }),
    Service.create({
      ...common,
      topic: "conductor_admin",
      binary: "nova-conductor-admin",
      manager: new ConductorAdminManager(backing),
    }),
  ];
  for (const s of services) await s.start();
  return {
    async stop() {
      for (const s of services) await s.stop();
      if (!opts.backing) await backing.close();
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
      await t.close();
    }
  });

  it("no conductor is a registry outage (RegistryError), and a bad topic or missing transport a TypeError", async () => {
    const t = new MemoryTransport(new MemoryHub());
    const r: Registry = new ConductorRegistry(t, { prefix: uniquePrefix("none"), timeout: 1 });
    await assert.rejects(
      r.list(),
      (e: Error) =>
        e instanceof RegistryError && /The conductor \(conductor\) cannot be reached for list/.test(e.message),
    );
    await r.close();
    assert.throws(() => new ConductorRegistry(t, { topic: "a/b" }), TypeError);
    assert.throws(() => new ConductorRegistry(t, { topic: "a.b" }), TypeError);
    await assert.rejects(openRegistry("conductor:"), /a conductor is reached over a transport/);
    await t.close();
  });

  it("admin operations are served on conductor_admin to admin contexts only: others get NotAuthorized and change nothing", async () => {
    const hub = new MemoryHub();
    const prefix = uniquePrefix("cond");
    const c = await conductor(new MemoryTransport(hub), prefix);
    const t = new MemoryTransport(hub);
    const admin = new ConductorRegistry(t, { prefix });
    const device = new ConductorRegistry(t, { prefix, adminContext: new RequestContext({ userId: "dev-1" }) });
    const rpc = new Rpc(t, { prefix });
    try {
      const row = await device.register({ host: "d1", binary: "nova-x", topic: "x" });
      await assert.rejects(
        device.setDisabled(row.id, true, "mine now"),
        (e: Error) =>
          e instanceof NotAuthorized && /setDisabled is an admin operation: "dev-1" may not/.test(e.message),
      );
      await assert.rejects(device.setForcedDown(row.id, true), NotAuthorized);
      await assert.rejects(device.remove(row.id), NotAuthorized);
      const after = await device.get(row.id);
      assert.equal(after?.disabled, false);
      assert.equal(after?.forcedDown, false);
      // The services' topic has no admin operation at all, whatever the context claims.
      await assert.rejects(
        rpc.call(RequestContext.admin(), "conductor", { method: "setDisabled", args: { id: row.id, disabled: true } }),
        (e: Error) => e instanceof RemoteError && e.type === "NoSuchMethod",
      );
      assert.equal((await admin.setDisabled(row.id, true, "maintenance")).disabled, true);
      assert.equal((await admin.setForcedDown(row.id, true)).forcedDown, true);
      await admin.remove(row.id);
      assert.equal(await admin.get(row.id), undefined);
    } finally {
      await rpc.close();
      await Promise.all([admin.close(), device.close()]);
      await c.stop();
      await t.close();
    }
  });

  it("createConductor serves both topics, registers both, and its authorize decides who administers", async () => {
    const hub = new MemoryHub();
    const prefix = uniquePrefix("cond");
    const served = await openSqlRegistry("sqljs::memory:");
    const pair = createConductor({
      registry: served,
      host: "c1",
      transport: new MemoryTransport(hub),
      prefix,
      logger: new MemoryLogger(),
      authorize: (ctx) => ctx.roles.includes("operator"),
    });
    for (const s of pair) await s.start();
    const t = new MemoryTransport(hub);
    const operator = new ConductorRegistry(t, { prefix, adminContext: new RequestContext({ roles: ["operator"] }) });
    const admin = new ConductorRegistry(t, { prefix });
    try {
      const rows = await operator.list({ host: "c1" });
      assert.deepEqual(rows.map((r) => `${r.binary}/${r.topic}`).sort(), [
        "nova-conductor-admin/conductor_admin",
        "nova-conductor/conductor",
      ]);
      assert.equal((await operator.setDisabled(rows[0]!.id, true)).disabled, true);
      await assert.rejects(admin.setDisabled(rows[0]!.id, false), NotAuthorized, "is_admin is not the operator role");
    } finally {
      await Promise.all([operator.close(), admin.close()]);
      for (const s of pair) await s.stop();
      await served.close();
      await t.close();
    }
  });

  it(`several conductors on one database${PG_URL ? " (PostgreSQL)" : ""} share the topic: calls spread, and the others answer when one dies`, async () => {
    const schema = `nvt_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
    const shared = PG_URL ? undefined : await openSqlRegistry("sqljs::memory:");
    const hub = new MemoryHub();
    const prefix = uniquePrefix("cond");
    const calls = [0, 0, 0];
    const conductors: Awaited<ReturnType<typeof conductor>>[] = [];
    const backings: Registry[] = [];
    const transports: MemoryTransport[] = [];
    const t = new MemoryTransport(hub);
    const registry = new ConductorRegistry(t, { prefix, timeout: 2 });
    try {
      for (let i = 0; i < 3; i++) {
        // Each conductor opens the database itself, as separate processes would.
        const backing = PG_URL ? await openSqlRegistry(PG_URL, { schema }) : shared!;
        if (PG_URL) backings.push(backing);
        const counted = new Proxy(backing, {
          get(target, prop) {
            const v = Reflect.get(target, prop);
            return typeof v === "function" ? (...a: unknown[]) => (calls[i]!++, v.apply(target, a)) : v;
          },
        });
        transports.push(new MemoryTransport(hub));
        conductors.push(await conductor(transports[i]!, prefix, { backing: counted, host: `c${i}` }));
      }
      const row = await registry.register({ host: "d1", binary: "nova-x", topic: "x" });
      for (let i = 0; i < 30; i++) await registry.reportState(row.id);
      assert.ok(calls.every((n) => n >= 5), `every conductor took a share: ${calls}`);
      await transports[0]!.close(); // c0 dies: its subscriptions are gone, its services do not know
      const before = calls[0];
      for (let i = 0; i < 30; i++) await registry.reportState(row.id);
      assert.equal((await registry.get(row.id))?.reportCount, 60, "every heartbeat counted once");
      assert.equal(calls[0], before, "the dead one took nothing");
    } finally {
      await registry.close();
      for (const c of conductors) await c.stop();
      for (const b of backings) await b.close();
      await shared?.close();
      await Promise.all([t, ...transports].map((x) => x.close()));
      if (PG_URL) {
        const client = new pg.Client({ connectionString: PG_URL });
        await client.connect();
        await client.query(`drop schema if exists ${schema} cascade`).finally(() => client.end());
      }
    }
  });
});

describe("conductor behind the README's Mosquitto ACL (examples/mosquitto/conductor.acl)", () => {
  const skip = needs("mosquitto");
  it("a device heartbeats through the conductor but cannot administer; an operator can", { skip }, async () => {
    const acl = new URL("../examples/mosquitto/conductor.acl", import.meta.url).pathname;
    const broker = await Mosquitto.start({
      users: { operator: "op-secret", conductor: "c-secret", device: "d-secret" },
      conf: `acl_file ${acl}`,
    });
    const as = (user: string, pw: string) =>
      MqttTransport.connect({ url: broker.url.replace("//", `//${user}:${pw}@`), logger: new MemoryLogger() });
    const open: Transport[] = [];
    const served = await openSqlRegistry("sqljs::memory:");
    let pair: Service[] = [];
    try {
      const ct = await as("conductor", "c-secret"); // default prefix and topic: the ACL names them
      open.push(ct);
      pair = createConductor({ registry: served, host: "c1", transport: ct, logger: new MemoryLogger() });
      for (const s of pair) await s.start();
      const dt = await as("device", "d-secret");
      const ot = await as("operator", "op-secret");
      open.push(dt, ot);
      const device = await openRegistry("conductor:", { transport: dt });
      const operator = await openRegistry("conductor:", { transport: ot });
      const rpc = new Rpc(ot);
      const svc = Service.create({
        topic: "sensor",
        host: "dev-1",
        manager: class Sensor extends Manager {
          ping() {
            return "pong";
          }
        },
        transport: dt,
        registry: device,
        reportInterval: 0.1,
        logger: new MemoryLogger(),
      });
      try {
        await svc.start();
        await new Promise((r) => setTimeout(r, 400));
        const [row] = await device.list({ host: "dev-1" });
        assert.ok(row && row.reportCount >= 2, `the device heartbeats: ${row?.reportCount}`);
        // Mosquitto refuses the publish (MQTT 5: "not authorized") and, in 2.0, drops the connection:
        // the refusal may be lost with it, and the call then fails as a connection error.
        const refused = (e: Error) =>
          e instanceof NotAuthorized && /broker refused/.test(e.message) ||
          e instanceof RegistryError && /Connection closed/.test(e.message);
        const connected = () =>
          waitFor(() => (dt as MqttTransport).client.connected, "the device to reconnect", 10_000);
        await assert.rejects(device.setDisabled(row.id, true), refused);
        await connected();
        await assert.rejects(device.remove(row.id), refused);
        const seen = (await operator.get(row.id))!;
        assert.equal(seen.disabled, false, "nothing reached the conductor");
        // The device reconnects; its own work and its heartbeats go on.
        await connected();
        const ping = await rpc.call(new RequestContext(), "sensor.dev-1", { method: "ping" }, { timeout: 10 });
        assert.equal(ping, "pong");
        const until = Date.now() + 5000;
        let count = seen.reportCount;
        while (count <= seen.reportCount + 2 && Date.now() < until) {
          await new Promise((r) => setTimeout(r, 100));
          count = (await operator.get(row.id))!.reportCount;
        }
        assert.ok(count > seen.reportCount + 2, `heartbeats after the refusals: ${count - seen.reportCount}`);
        assert.equal((await operator.setDisabled(row.id, true, "maintenance")).disabled, true);
      } finally {
        await svc.stop();
        await rpc.close();
        await device.close();
        await operator.close();
      }
    } finally {
      for (const s of pair) await s.stop();
      await served.close();
      await Promise.all(open.map((t) => t.close()));
      await broker.stop();
    }
  });
});
