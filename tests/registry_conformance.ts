/**
 * The behaviour every Registry must have. A test file calls `registryConformance()` with a
 * factory of fresh stores; a store can be opened again (to check that data outlives close()).
 */

import { afterEach, describe, it } from "node:test";
import assert from "node:assert/strict";
import { ClosedError, isUp, liveness, NotFound, type Presence, type Registry } from "../index.ts";

/** One fresh, empty store. */
export interface RegistryStore {
  /** Open (or reopen) the store. */
  open(): Promise<Registry>;
  /** Whether a closed-then-reopened store still has its data. */
  durable: boolean;
  /** Whether a second open() while the first is open is another connection to the same data. */
  shared: boolean;
  /** Remove the store (a file, a schema). */
  cleanup(): Promise<void>;
}

const svc = (host = "node1", binary = "nova-compute", topic = "compute") => ({ host, binary, topic });

export function registryConformance(name: string, newStore: () => Promise<RegistryStore>): void {
  describe(`Registry conformance: ${name}`, () => {
    let store: RegistryStore | undefined;
    let opened: Registry[] = [];

    async function release(): Promise<void> {
      await Promise.all(opened.map((r) => r.close()));
      opened = [];
      await store?.cleanup();
      store = undefined;
    }

    afterEach(release);

    async function open(): Promise<Registry> {
      store ??= await newStore();
      const r = await store.open();
      opened.push(r);
      return r;
    }

    it("register() creates a row with Nova's defaults", async () => {
      const r = await open();
      const before = Date.now();
      const row = await r.register(svc());
      assert.ok(row.id > 0);
      assert.equal(row.host, "node1");
      assert.equal(row.binary, "nova-compute");
      assert.equal(row.topic, "compute");
      assert.equal(row.reportCount, 0);
      assert.equal(row.disabled, false);
      assert.equal(row.disabledReason, null);
      assert.equal(row.forcedDown, false);
      assert.equal(row.lastSeenUp, null);
      assert.ok(row.createdAt instanceof Date && row.updatedAt instanceof Date);
      assert.ok(Math.abs(row.createdAt.getTime() - before) < 5000);
    });

    it("register() of an existing host+binary returns that row; another binary gets its own", async () => {
      const r = await open();
      const a = await r.register(svc());
      await r.reportState(a.id);
      const again = await r.register(svc());
      assert.equal(again.id, a.id);
      assert.equal(again.reportCount, 1, "the existing row, not a new one");
      const b = await r.register(svc("node1", "nova-network", "network"));
      assert.notEqual(b.id, a.id);
      assert.equal((await r.list()).length, 2);
    });

    it("register() racing for the same host+binary ends with one row", async () => {
      const r1 = await open();
      const r2 = store!.shared ? await open() : r1; // a second connection where the store has them
      const rows = await Promise.all(Array.from({ length: 20 }, (_, i) => (i % 2 ? r1 : r2).register(svc())));
      assert.equal(new Set(rows.map((x) => x.id)).size, 1);
      assert.equal((await r1.list({ host: "node1" })).length, 1);
    });

    it("reportState() adds 1 to reportCount and sets lastSeenUp and updatedAt", async () => {
      const r = await open();
      const row = await r.register(svc());
      const one = await r.reportState(row.id);
      const two = await r.reportState(row.id);
      assert.equal(one.reportCount, 1);
      assert.equal(two.reportCount, 2);
      assert.ok(two.lastSeenUp instanceof Date);
      assert.ok(two.lastSeenUp.getTime() >= one.lastSeenUp!.getTime());
      assert.equal(two.updatedAt.getTime(), two.lastSeenUp.getTime());
    });

    it("a missing id is NotFound for every edit; get() of it is undefined; a bad id is a TypeError", async () => {
      const r = await open();
      await assert.rejects(r.reportState(424242), NotFound);
      await assert.rejects(r.setDisabled(424242, true), NotFound);
      await assert.rejects(r.setDisabled(424242, false), /cannot enable/);
      await assert.rejects(r.setForcedDown(424242, true), NotFound);
      await assert.rejects(r.remove(424242), NotFound);
      assert.equal(await r.get(424242), undefined);
      for (const bad of [0, -1, 1.5, "1", NaN]) {
        await assert.rejects(async () => await r.reportState(bad as number), TypeError, String(bad));
      }
    });

    it("register() refuses empty or over-long fields, naming the field", async () => {
      const r = await open();
      await assert.rejects(async () => await r.register(svc("")), /Invalid host ""/);
      await assert.rejects(async () => await r.register(svc("h", "x".repeat(256))), /Invalid binary/);
      await assert.rejects(async () => await r.register({ host: "h", binary: "b" } as never), /Invalid topic/);
      // Names RPC could not use: a topic level each, no wildcard, no control character; no "." in a topic.
      await assert.rejects(async () => await r.register({ host: "h/#+", binary: "b", topic: "t" }), /Invalid host/);
      await assert.rejects(
        async () => await r.register({ host: "h", binary: "b\u0000", topic: "t" }),
        /Invalid binary/,
      );
      await assert.rejects(async () => await r.register({ host: "h", binary: "b", topic: "t.x" }), /Invalid topic/);
      await assert.rejects(
        async () => await r.register({ host: "h", binary: "b", topic: "t", serviceDownTime: 1e308 }),
        /Invalid serviceDownTime.*at most 4294967295/,
      );
      assert.deepEqual(await r.list(), []);
    });

    it("list() filters by topic, host and binary, in id order", async () => {
      const r = await open();
      await r.register(svc("n1", "nova-compute", "compute"));
      await r.register(svc("n2", "nova-compute", "compute"));
      await r.register(svc("n1", "nova-network", "network"));
      assert.deepEqual((await r.list()).map((x) => `${x.host}/${x.topic}`), ["n1/compute", "n2/compute", "n1/network"]);
      assert.deepEqual((await r.list({ topic: "compute" })).map((x) => x.host), ["n1", "n2"]);
      assert.deepEqual((await r.list({ host: "n1" })).map((x) => x.topic), ["compute", "network"]);
      assert.deepEqual((await r.list({ host: "n1", binary: "nova-network" })).length, 1);
      assert.deepEqual(await r.list({ host: "nope" }), []);
    });

    it("setDisabled() records the reason, enabling clears it; lastSeenUp never moves", async () => {
      const r = await open();
      const row = await r.register(svc());
      const beat = await r.reportState(row.id);
      const off = await r.setDisabled(row.id, true, "maintenance");
      assert.equal(off.disabled, true);
      assert.equal(off.disabledReason, "maintenance");
      assert.equal(off.lastSeenUp!.getTime(), beat.lastSeenUp!.getTime());
      assert.ok(off.updatedAt.getTime() >= beat.updatedAt.getTime());
      const on = await r.setDisabled(row.id, false);
      assert.equal(on.disabled, false);
      assert.equal(on.disabledReason, null);
      await assert.rejects(async () => await r.setDisabled(row.id, "yes" as never), TypeError);
    });

    it("setForcedDown() makes a fresh service down, and clearing it brings it back", async () => {
      const r = await open();
      const row = await r.reportState((await r.register(svc())).id);
      assert.equal(isUp(row), true);
      const down = await r.setForcedDown(row.id, true);
      assert.equal(down.forcedDown, true);
      assert.equal(isUp(down), false);
      assert.equal(down.lastSeenUp!.getTime(), row.lastSeenUp!.getTime());
      assert.equal(isUp(await r.setForcedDown(row.id, false)), true);
    });

    it("isUp(): up exactly at serviceDownTime, down 1 ms later; without heartbeats createdAt counts", async () => {
      const r = await open();
      const fresh = await r.register(svc());
      const created = fresh.createdAt.getTime();
      assert.equal(isUp(fresh, { now: new Date(created + 60_000) }), true);
      assert.equal(isUp(fresh, { now: new Date(created + 60_001) }), false);
      const beat = await r.reportState(fresh.id);
      const seen = beat.lastSeenUp!.getTime();
      assert.equal(isUp(beat, { now: new Date(seen + 30_000), serviceDownTime: 30 }), true);
      assert.equal(isUp(beat, { now: new Date(seen + 30_001), serviceDownTime: 30 }), false);
    });

    it("register() records reportInterval and serviceDownTime, re-registering updates them, and liveness uses the row's own", async () => {
      const r = await open();
      const plain = await r.register(svc());
      assert.equal(plain.reportInterval, null);
      assert.equal(plain.serviceDownTime, null);
      const row = await r.register({ ...svc(), reportInterval: 2, serviceDownTime: 6 });
      assert.equal(row.id, plain.id);
      assert.equal(row.reportInterval, 2);
      assert.equal(row.serviceDownTime, 6);
      assert.equal((await r.register(svc())).serviceDownTime, 6, "not given: left as it was");
      const beat = await r.reportState(row.id);
      assert.equal(beat.serviceDownTime, 6);
      const seen = beat.lastSeenUp!.getTime();
      // The row's 6 s rule, whatever the judge's own default says.
      assert.deepEqual(liveness(beat, { now: new Date(seen + 6_000), serviceDownTime: 60 }), { state: "up" });
      assert.deepEqual(liveness(beat, { now: new Date(seen + 6_001), serviceDownTime: 60 }), {
        state: "down",
        reason: "stale",
      });
      const again = await r.register({ ...svc(), reportInterval: 10, serviceDownTime: 60.5 });
      assert.equal(again.reportInterval, 10);
      assert.equal(again.serviceDownTime, 60.5);
      assert.equal((await r.get(row.id))!.serviceDownTime, 60.5);
      await assert.rejects(async () => await r.register({ ...svc(), serviceDownTime: -1 }), TypeError);
    });

    it("liveness(): forced, then presence (lost, offline: stopped), then the heartbeat (stale)", async () => {
      const r = await open();
      const row = await r.reportState((await r.register(svc())).id);
      const presence = (state: Presence["state"], host = row.host): Presence => ({
        state,
        incarnation: 1,
        topic: row.topic,
        host,
        binary: row.binary,
        report_interval: 10,
        service_down_time: 60,
        since: new Date().toISOString(),
      });
      assert.deepEqual(liveness(row, { presence: presence("online") }), { state: "up" });
      assert.deepEqual(liveness(row, { presence: presence("lost") }), { state: "down", reason: "lost" });
      assert.deepEqual(liveness(row, { presence: presence("offline") }), { state: "down", reason: "stopped" });
      assert.deepEqual(liveness(row, { presence: presence("lost", "elsewhere") }), { state: "up" }, "another's");
      const forced = await r.setForcedDown(row.id, true);
      assert.deepEqual(liveness(forced, { presence: presence("online") }), { state: "down", reason: "forced" });
      const later = new Date(row.lastSeenUp!.getTime() + 61_000);
      assert.deepEqual(liveness(row, { now: later, presence: presence("online") }), { state: "down", reason: "stale" });
    });

    it("a disabled service that sends heartbeats is up; admin edits do not revive a dead one", async () => {
      const r = await open();
      const row = await r.reportState((await r.register(svc())).id);
      const disabled = await r.setDisabled(row.id, true, "draining");
      assert.equal(isUp(disabled), true, "disabled is not down");
      const later = new Date(row.lastSeenUp!.getTime() + 61_000); // the service died after its beat
      for (
        const edited of [
          await r.setDisabled(row.id, false),
          await r.setForcedDown(row.id, true),
          await r.setForcedDown(row.id, false),
        ]
      ) {
        assert.equal(edited.lastSeenUp!.getTime(), row.lastSeenUp!.getTime());
        assert.equal(isUp(edited, { now: later }), false);
      }
    });

    it("remove() deletes the row; a second remove() is NotFound", async () => {
      const r = await open();
      const row = await r.register(svc());
      await r.remove(row.id);
      assert.equal(await r.get(row.id), undefined);
      await assert.rejects(r.remove(row.id), NotFound);
      const again = await r.register(svc());
      assert.notEqual(again.id, row.id, "ids are not reused");
    });

    it("close() is idempotent and use after close is a ClosedError", async () => {
      const r = await open();
      await r.close();
      await r.close();
      await assert.rejects(async () => await r.list(), ClosedError);
      await assert.rejects(async () => await r.register(svc()), ClosedError);
    });

    it("data survives close() and reopen (durable stores)", async (t) => {
      const r = await open();
      if (!store!.durable) {
        await release(); // node:test runs no afterEach for a skipped test
        t.skip("an in-memory database ends with close() by design");
        return;
      }
      const row = await r.register(svc());
      await r.reportState(row.id);
      await r.setDisabled(row.id, true, "kept");
      await r.close();
      const again = await open();
      const got = await again.get(row.id);
      assert.equal(got?.reportCount, 1);
      assert.equal(got?.disabledReason, "kept");
    });
  });
}
