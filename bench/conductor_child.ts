/**
 * The processes of bench/conductor.ts, driven over the IPC channel:
 *   conductor_child.ts conductor BROKER PREFIX REGISTRY_URL SERVICES batched|plain DIRECT_SECONDS
 *     fills the registry with SERVICES rows, measures direct heartbeats (one at a time) for
 *     DIRECT_SECONDS, then serves it on topic `conductor`; `plain` hides reportStates() from
 *     the ConductorManager, so that it writes one heartbeat at a time.
 *   conductor_child.ts load BROKER PREFIX FIRST_ID COUNT CONNECTIONS
 *     COUNT ConductorRegistry clients (ids FIRST_ID…), sharing CONNECTIONS MQTT connections.
 * Each answers its commands with one message; `stop` ends it.
 */
import process from "node:process";
import { type Registry, Service, type ServiceRecord } from "../index.ts";
import { CONDUCTOR_RUNNING, ConductorManager, ConductorRegistry } from "../registry/conductor.ts";
import { openSqlRegistry, type SqlRegistry } from "../registry/sql.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { fill } from "./sql_rows.ts";

const [role, url, prefix, ...rest] = process.argv.slice(2);
if (!url || !prefix || !process.send) throw new Error("usage: see the head of bench/conductor_child.ts (IPC needed)");
const send = (m: unknown) => process.send!(m);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

type Command =
  | { cmd: "mark" }
  | { cmd: "warm"; concurrency: number }
  | { cmd: "paced"; start: number; seconds: number; rate: number; slot: number; slots: number }
  | { cmd: "max"; seconds: number; concurrency: number }
  | { cmd: "stop" };

const cpuMs = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1000;
};

if (role === "conductor") {
  const [registryUrl, services, mode, directSeconds] = rest as [string, string, string, string];
  const registry = await openSqlRegistry(registryUrl);
  const ids = await fill(registry, Number(services));
  const direct = await measureDirect(registry, ids, Number(directSeconds));

  // Writes (transactions) of heartbeats, counted where the conductor makes them.
  let writes = 0;
  let written = 0;
  const reportStates = registry.reportStates.bind(registry);
  registry.reportStates = (batch) => {
    writes++;
    written += batch.length;
    return reportStates(batch);
  };
  const reportState = registry.reportState.bind(registry);
  registry.reportState = (id) => {
    writes++;
    written++;
    return reportState(id);
  };
  const served: Registry = mode === "plain"
    ? {
      register: (s) => registry.register(s),
      reportState: (id) => registry.reportState(id),
      get: (id) => registry.get(id),
      list: (f) => registry.list(f),
      setDisabled: (id, d, r) => registry.setDisabled(id, d, r),
      setForcedDown: (id, f) => registry.setForcedDown(id, f),
      remove: (id) => registry.remove(id),
      close: () => registry.close(),
    }
    : registry;
  const transport = await MqttTransport.connect({ url });
  const own = await openSqlRegistry("sqljs::memory:");
  const svc = Service.create({
    topic: "conductor",
    host: "bench-conductor",
    binary: "nova-conductor",
    manager: new ConductorManager(served),
    transport,
    registry: own,
    prefix,
    // createConductor()'s default unless the bench is asked for another: it caps a batch.
    maxRunningHandlers: Number(process.env.CONDUCTOR_MAX_RUNNING ?? CONDUCTOR_RUNNING),
  });
  await svc.start();
  send({ type: "ready", first: ids[0], count: ids.length, direct });
  process.on("message", async (m: Command) => {
    if (m.cmd === "mark") send({ type: "mark", t: performance.now(), cpuMs: cpuMs(), writes, written });
    if (m.cmd === "stop") {
      await svc.stop();
      await transport.close();
      await own.close();
      await registry.close();
      send({ type: "stopped" });
      process.disconnect();
    }
  });
} else if (role === "load") {
  const [first, count, connections] = rest.map(Number) as [number, number, number];
  const transports = await Promise.all(Array.from({ length: connections }, () => MqttTransport.connect({ url })));
  const clients = Array.from({ length: count }, (_, i) => ({
    id: first + i,
    registry: new ConductorRegistry(transports[i % connections]!, { prefix }),
  }));
  const heartbeat = async (i: number, lat: number[], errors: Map<string, number>) => {
    const c = clients[i]!;
    const t = performance.now();
    try {
      const r: ServiceRecord = await c.registry.reportState(c.id);
      if (r.id !== c.id) throw new Error(`got the record of ${r.id} for ${c.id}`);
      lat.push(performance.now() - t);
    } catch (e) {
      // Counted by name and message, numbers left out.
      const k = `${(e as Error).name}: ${(e as Error).message.replace(/\d+/g, "N").slice(0, 100)}`;
      errors.set(k, (errors.get(k) ?? 0) + 1);
    }
  };
  const result = (lat: number[], errors: Map<string, number>, extra: object) => ({
    type: "result",
    lat,
    errors: Object.fromEntries(errors),
    cpuMs: cpuMs(),
    ...extra,
  });

  process.on("message", async (m: Command) => {
    if (m.cmd === "mark") send({ type: "mark", t: performance.now(), cpuMs: cpuMs() });
    if (m.cmd === "warm") {
      // Every client calls once (its Rpc subscribes its reply topic then), a few at a time.
      const lat: number[] = [];
      const errors = new Map<string, number>();
      let next = 0;
      await Promise.all(Array.from({ length: m.concurrency }, async () => {
        while (next < count) await heartbeat(next++, lat, errors);
      }));
      send(result(lat, errors, {}));
    }
    if (m.cmd === "paced") {
      // Client i beats at start + (i·slots + slot)/rate s, then every count·slots/rate s: the
      // processes' beats interleave evenly. Latency is from the call to the reply; `lag` is how
      // late this process made the call (a busy generator would otherwise hide latency).
      const cycle = (count * m.slots) / m.rate * 1000;
      const at = (k: number) =>
        m.start + (k % count * m.slots + m.slot) / m.rate * 1000 + Math.floor(k / count) * cycle;
      const end = m.start + m.seconds * 1000;
      const lat: number[] = [];
      const errors = new Map<string, number>();
      const running: Promise<void>[] = [];
      let lag = 0;
      const t0 = performance.timeOrigin;
      for (let k = 0; at(k) < end; k++) {
        const wait = at(k) - (t0 + performance.now());
        if (wait > 1) await sleep(wait);
        lag = Math.max(lag, t0 + performance.now() - at(k));
        running.push(heartbeat(k % count, lat, errors));
      }
      await Promise.all(running);
      send(result(lat, errors, { lag }));
    }
    if (m.cmd === "max") {
      const lat: number[] = [];
      const errors = new Map<string, number>();
      const end = performance.now() + m.seconds * 1000;
      let next = 0;
      await Promise.all(Array.from({ length: m.concurrency }, async () => {
        while (performance.now() < end) await heartbeat(next++ % count, lat, errors);
      }));
      send(result(lat, errors, {}));
    }
    if (m.cmd === "stop") {
      // Four at a time per connection: each close waits for its unsubscription to go quiet.
      await Promise.all(transports.map(async (_, t) => {
        const mine = clients.filter((_, i) => i % connections === t);
        for (let i = 0; i < mine.length; i += 4) await Promise.all(mine.slice(i, i + 4).map((c) => c.registry.close()));
      }));
      await Promise.all(transports.map((t) => t.close()));
      send({ type: "stopped" });
      process.disconnect();
    }
  });
  send({ type: "ready" });
} else {
  throw new Error(`unknown role ${role}`);
}

/** bench/registry.ts's measurement: heartbeats one at a time, straight to the registry. */
async function measureDirect(r: SqlRegistry, ids: number[], seconds: number) {
  const lat: number[] = [];
  const c0 = cpuMs();
  const t0 = performance.now();
  while (performance.now() < t0 + seconds * 1000) {
    const s = performance.now();
    await r.reportState(ids[lat.length % ids.length]!);
    lat.push(performance.now() - s);
  }
  return { lat, seconds: (performance.now() - t0) / 1000, cpuMs: cpuMs() - c0 };
}
