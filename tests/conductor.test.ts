/**
 * The conductor: a registry served over the transport. The registry conformance suite runs against
 * `ConductorRegistry` over the memory transport and over MQTT, with a conductor service in front
 * of an in-memory sql.js registry; then what is particular to it.
 */
import { after, describe, it } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  Manager,
  NotAuthorized,
  NotFound,
  openRegistry,
  type Registry,
  RegistryError,
  RemoteError,
  RequestContext,
  Rpc,
  Service,
  type ServiceRecord,
  type Transport,
} from "../index.ts";
import { ConductorAdminManager, ConductorManager, ConductorRegistry, createConductor } from "../registry/conductor.ts";
import { openSqlRegistry, SqlRegistry } from "../registry/sql.ts";
import { SqlJsFile } from "../registry/sqljs-file.ts";
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

/** A conductor in front of `backing` over a memory hub, and a ConductorRegistry calling it;
 * close() stops both (not `backing`). */
async function viaConductor(backing: Registry, tag: string) {
  const hub = new MemoryHub();
  const prefix = uniquePrefix(tag);
  const server = new MemoryTransport(hub);
  const c = await conductor(server, prefix, { backing });
  const client = new MemoryTransport(hub);
  const remote = new ConductorRegistry(client, { prefix });
  return {
    remote,
    async close() {
      await remote.close();
      await c.stop();
      await server.close();
      await client.close();
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

const dir = mkdtempSync(join(tmpdir(), "novalet-conductor-"));
after(() => rmSync(dir, { recursive: true, force: true }));

/** Counts the rewrites of every `sqljs:` file (SqlJsFile.save) while `work` runs. */
async function countingFileWrites<T>(work: () => Promise<T>): Promise<{ result: T; writes: number }> {
  const save = SqlJsFile.prototype.save;
  let writes = 0;
  SqlJsFile.prototype.save = function (this: SqlJsFile, db) {
    writes++;
    return save.call(this, db);
  };
  try {
    return { result: await work(), writes };
  } finally {
    SqlJsFile.prototype.save = save;
  }
}

/** `n` services registered in one transaction (setting up is not what these tests look at). */
async function fill(r: SqlRegistry, n: number): Promise<number[]> {
  const now = new Date().toISOString();
  const tag = crypto.randomUUID().slice(0, 8);
  for (let i = 0; i < n; i += 5000) {
    const rows = Array.from({ length: Math.min(5000, n - i) }, (_, j) => ({
      host: `h-${tag}-${i + j}`,
      binary: "nova-fill",
      topic: "fill",
      created_at: now,
      updated_at: now,
    }));
    await SqlRegistry.database(r).insertInto("services").values(rows).execute();
  }
  return (await r.list({ binary: "nova-fill" })).map((s) => s.id);
}

async function dropSchema(schema: string): Promise<void> {
  const client = new pg.Client({ connectionString: PG_URL });
  await client.connect();
  try {
    await client.query(`drop schema if exists ${schema} cascade`);
  } finally {
    await client.end();
  }
}

/** The registries the batching tests run on: a `sqljs:` file (whose rewrites are counted), and
 * PostgreSQL when PG_URL is set (in a schema of its own, dropped afterwards). */
const backends: { name: string; file: boolean; open(): Promise<{ registry: SqlRegistry; drop(): Promise<void> }> }[] = [
  {
    name: "a sqljs: file",
    file: true,
    open: async () => {
      const path = join(dir, `${crypto.randomUUID()}.db`);
      const registry = await openSqlRegistry(`sqljs:${path}`);
      return { registry, drop: async () => await registry.close() };
    },
  },
];
if (PG_URL) {
  backends.push({
    name: "PostgreSQL",
    file: false,
    open: async () => {
      const schema = `nvt_${crypto.randomUUID().replaceAll("-", "").slice(0, 12)}`;
      const registry = await openSqlRegistry(PG_URL, { schema });
      return {
        registry,
        drop: async () => {
          await registry.close();
          await dropSchema(schema);
        },
      };
    },
  });
}

for (const backend of backends) {
  describe(`SqlRegistry.reportStates() on ${backend.name}`, () => {
    it("reportStates() returns each id's record in order, undefined for an id with no row, in one write", async () => {
      const { registry, drop } = await backend.open();
      try {
        const [a, b, c] = await fill(registry, 3);
        await registry.remove(b!);
        const { result, writes } = await countingFileWrites(() => registry.reportStates([c!, b!, a!]));
        assert.deepEqual(result.map((r) => r?.id), [c, undefined, a]);
        assert.deepEqual(result.map((r) => r?.reportCount), [1, undefined, 1]);
        assert.ok(result[0]!.lastSeenUp instanceof Date);
        if (backend.file) assert.equal(writes, 1);
        assert.deepEqual(await registry.reportStates([]), []);
      } finally {
        await drop();
      }
    });

    it("reportStates() counts an id given several times once per time, each with its own record", async () => {
      const { registry, drop } = await backend.open();
      try {
        const [a, b] = await fill(registry, 2);
        const { result, writes } = await countingFileWrites(() => registry.reportStates([a!, b!, a!, a!]));
        assert.deepEqual(result.map((r) => [r?.id, r?.reportCount]), [[a, 1], [b, 1], [a, 2], [a, 3]]);
        assert.equal((await registry.get(a!))!.reportCount, 3);
        if (backend.file) assert.equal(writes, 1, "rounds of one batch share one transaction");
      } finally {
        await drop();
      }
    });

    it("reportStates() of more ids than one statement binds commits them in one transaction", async () => {
      const { registry, drop } = await backend.open();
      try {
        const ids = await fill(registry, 10_050);
        const { result, writes } = await countingFileWrites(() => registry.reportStates([...ids].reverse()));
        assert.equal(result.length, ids.length);
        assert.ok(result.every((r, i) => r?.id === ids[ids.length - 1 - i] && r?.reportCount === 1));
        if (backend.file) assert.equal(writes, 1);
        assert.ok((await registry.list()).every((r) => r.reportCount === 1));
      } finally {
        await drop();
      }
    });

    it("reportStates() refuses a malformed id with a TypeError and writes nothing", async () => {
      const { registry, drop } = await backend.open();
      try {
        const [a] = await fill(registry, 1);
        for (const bad of [0, -1, 1.5, "1", null]) {
          await assert.rejects(registry.reportStates([a!, bad as number]), TypeError);
        }
        await assert.rejects(registry.reportStates("1" as unknown as number[]), TypeError);
        assert.equal((await registry.get(a!))!.reportCount, 0);
      } finally {
        await drop();
      }
    });
  });

  describe(`conductor batching heartbeats on ${backend.name}`, () => {
    /** A conductor over the memory transport in front of a fresh registry of this backend. */
    async function setUp() {
      const { registry, drop } = await backend.open();
      const { remote, close } = await viaConductor(registry, "batch");
      // Batches written, counted at the registry (each one is one transaction).
      let batches = 0;
      const reportStates = registry.reportStates.bind(registry);
      registry.reportStates = (ids) => {
        batches++;
        return reportStates(ids);
      };
      return {
        registry,
        remote,
        batches: () => batches,
        async close() {
          await close();
          await drop();
        },
      };
    }

    it("concurrent reportState() calls are committed in far fewer writes than calls, each caller getting its own record", async () => {
      const s = await setUp();
      try {
        const ids = await fill(s.registry, 300);
        const { result, writes } = await countingFileWrites(() =>
          Promise.all(ids.map((id) => s.remote.reportState(id)))
        );
        assert.deepEqual(result.map((r) => r.id), ids);
        assert.ok(result.every((r) => r.reportCount === 1 && r.lastSeenUp instanceof Date));
        assert.ok((await s.registry.list()).every((r) => r.reportCount === 1));
        assert.ok(s.batches() <= 30, `${s.batches()} batches for ${ids.length} heartbeats`);
        if (backend.file) assert.ok(writes <= 30, `${writes} file writes for ${ids.length} heartbeats`);
      } finally {
        await s.close();
      }
    });

    it("reportState() of a deleted id fails only that caller with NotFound; the others of its batch succeed", async () => {
      const s = await setUp();
      try {
        const ids = await fill(s.registry, 10);
        await s.registry.remove(ids[4]!);
        const { result, writes } = await countingFileWrites(() =>
          Promise.allSettled(ids.map((id) => s.remote.reportState(id)))
        );
        result.forEach((r, i) => {
          if (i === 4) {
            assert.equal(r.status, "rejected");
            assert.ok((r as PromiseRejectedResult).reason instanceof NotFound);
            assert.match((r as PromiseRejectedResult).reason.message, new RegExp(`Service ${ids[4]} not found`));
          } else {
            assert.equal(r.status, "fulfilled");
            assert.equal((r as PromiseFulfilledResult<ServiceRecord>).value.id, ids[i]);
            assert.equal((r as PromiseFulfilledResult<ServiceRecord>).value.reportCount, 1);
          }
        });
        assert.equal(s.batches(), 1, "all ten in one batch");
        if (backend.file) assert.equal(writes, 1);
      } finally {
        await s.close();
      }
    });

    it("reportState() of a malformed id fails only that caller with a TypeError", async () => {
      const s = await setUp();
      try {
        const ids = await fill(s.registry, 3);
        const result = await Promise.allSettled([...ids, 0].map((id) => s.remote.reportState(id)));
        assert.ok((result[3] as PromiseRejectedResult).reason instanceof TypeError);
        assert.deepEqual(result.slice(0, 3).map((r) => r.status), ["fulfilled", "fulfilled", "fulfilled"]);
      } finally {
        await s.close();
      }
    });

    it("concurrent reportState() calls of one id count once each, every caller getting its own count", async () => {
      const s = await setUp();
      try {
        const [a] = await fill(s.registry, 1);
        const result = await Promise.all(Array.from({ length: 5 }, () => s.remote.reportState(a!)));
        assert.deepEqual(result.map((r) => r.reportCount).sort(), [1, 2, 3, 4, 5]);
        assert.equal((await s.registry.get(a!))!.reportCount, 5);
      } finally {
        await s.close();
      }
    });

    it("a heartbeat that arrives alone is written at once, without waiting for company", async () => {
      const s = await setUp();
      try {
        const [a] = await fill(s.registry, 1);
        for (let i = 1; i <= 3; i++) assert.equal((await s.remote.reportState(a!)).reportCount, i);
        assert.equal(s.batches(), 3);
      } finally {
        await s.close();
      }
    });
  });
}

/** The Registry interface's methods of `r`, and nothing else. */
function only(r: Registry): Registry {
  return {
    register: (s) => r.register(s),
    reportState: (id) => r.reportState(id),
    get: (id) => r.get(id),
    list: (f) => r.list(f),
    setDisabled: (id, d, reason) => r.setDisabled(id, d, reason),
    setForcedDown: (id, f) => r.setForcedDown(id, f),
    remove: (id) => r.remove(id),
    close: () => r.close(),
  };
}

describe("conductor pacing its heartbeat writes", () => {
  it("under load it rests three times as long as a write took (at least 100 ms after a batch), unless requests queue for a running slot", async () => {
    const inner = await openSqlRegistry("sqljs::memory:");
    const ids = await fill(inner, 300);
    // A registry whose writes take 20 ms, recording when each ran.
    const writes: { start: number; end: number; size: number }[] = [];
    const slow = {
      ...only(inner),
      reportStates: async (batch: number[]) => {
        const start = performance.now();
        await new Promise((r) => setTimeout(r, 20));
        const rows = await inner.reportStates(batch);
        writes.push({ start, end: performance.now(), size: batch.length });
        return rows;
      },
    };
    const { remote, close } = await viaConductor(slow, "pace");
    /** `callers` callers heartbeating one after the other for `ms`; the gaps between writes. */
    const load = async (callers: number, ms: number) => {
      writes.length = 0;
      const end = performance.now() + ms;
      await Promise.all(Array.from({ length: callers }, async (_, k) => {
        for (let i = k; performance.now() < end; i += callers) await remote.reportState(ids[i % ids.length]!);
      }));
      return writes.slice(1).map((w, i) => ({
        gap: w.start - writes[i]!.end,
        took: writes[i]!.end - writes[i]!.start,
        size: writes[i]!.size,
      }));
    };
    try {
      // 8 callers: fewer than the service runs at once (64 here), so nothing queues for a slot.
      const paced = await load(8, 600);
      assert.ok(paced.length >= 2, `${paced.length + 1} writes`);
      for (const { gap, took, size } of paced) {
        const least = size > 1 ? Math.max(3 * took, 100) : 3 * took;
        assert.ok(gap >= least - 2, `rested ${gap} ms after a ${took} ms write of ${size}`);
      }
      // 200 callers: requests queue for a running slot, and the writer no longer rests.
      const saturated = await load(200, 600);
      const gaps = saturated.map((g) => g.gap).sort((a, b) => a - b);
      assert.ok(gaps[gaps.length >> 1]! < 20, `median rest ${gaps[gaps.length >> 1]} ms when saturated`);
    } finally {
      await close();
      await inner.close();
    }
  });
});

describe("conductor after a failed heartbeat write", () => {
  it("does not rest after a write that failed: the heartbeats that waited are written at once", async () => {
    const inner = await openSqlRegistry("sqljs::memory:");
    const [a, b] = await fill(inner, 2);
    const writes: { start: number; end: number }[] = [];
    const failing = {
      ...only(inner),
      reportStates: async (batch: number[]) => {
        const start = performance.now();
        try {
          // The first write waits 200 ms for a database that then fails.
          if (writes.length === 0) {
            await new Promise((r) => setTimeout(r, 200));
            throw new RegistryError("The database went away");
          }
          return await inner.reportStates(batch);
        } finally {
          writes.push({ start, end: performance.now() });
        }
      },
    };
    const { remote, close } = await viaConductor(failing, "fail");
    try {
      const first = remote.reportState(a!);
      await new Promise((r) => setTimeout(r, 50)); // while the first write runs
      const second = remote.reportState(b!);
      await assert.rejects(first, RegistryError);
      assert.equal((await second).reportCount, 1);
      const gap = writes[1]!.start - writes[0]!.end;
      assert.ok(gap < 300, `the next write started ${gap} ms after the failed one (a rest would be 600 ms)`);
    } finally {
      await close();
      await inner.close();
    }
  });
});

describe("conductor on a registry without reportStates()", () => {
  it("reportState() goes to the registry's own reportState(), one call per heartbeat", async () => {
    const inner = await openSqlRegistry("sqljs::memory:");
    let calls = 0;
    const plain: Registry = { ...only(inner), reportState: (id) => (calls++, inner.reportState(id)) };
    const { remote, close } = await viaConductor(plain, "plain");
    try {
      const row = await remote.register({ host: "p1", binary: "nova-x", topic: "x" });
      const result = await Promise.all([1, 2, 3].map(() => remote.reportState(row.id)));
      assert.deepEqual(result.map((r) => r.reportCount).sort(), [1, 2, 3]);
      assert.equal(calls, 3);
      await assert.rejects(remote.reportState(row.id + 1), NotFound);
    } finally {
      await close();
      await inner.close();
    }
  });
});
