// Signed envelopes (keys.ts): forgeries, replays, altered bytes, foreign replies and key
// rotation, over the memory transport and over MQTT (Mosquitto at MQTT_URL, else aedes).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import process from "node:process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  BadRequest,
  type Codec,
  jsonCodec,
  Manager,
  NotAuthorized,
  openRegistry,
  parseFlags,
  type Registry,
  RemoteError,
  type ReplyEnvelope,
  RequestContext,
  type RequestEnvelope,
  requires,
  Rpc,
  RpcTimeoutError,
  serve,
  Service,
  type Transport,
} from "../index.ts";
import { generateKey, type KeyEntry, type KeysConfig, publicPart, SignedCodec } from "../keys.ts";
import { ConductorRegistry, createConductor } from "../registry/conductor.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { mqttFixture } from "./mqtt_fixture.ts";
import { MemoryLogger, sleep, text, uniquePrefix, utf8, waitFor } from "./helpers.ts";

const fleet = generateKey("fleet", "hmac", { call: ["*"], serve: ["*"] });
const device = generateKey("device-7", "hmac", { call: ["compute", "conductor"], serve: ["telemetry"] });
const operator = generateKey("ops", "ed25519", { roles: ["admin"], serve: [] });
const fleet2 = generateKey("fleet-2", "hmac", { call: ["*"], serve: ["*"] });
const narrow = generateKey("narrow", "hmac", { call: ["telemetry"] });

/** What a process of the fleet trusts: every key, the operator's public half only. */
const trusted = (...extra: KeyEntry[]) => [fleet, device, narrow, publicPart(operator), ...extra];

/** An envelope as a peer holding `codec`'s key would publish it to `topic`. */
function signed(codec: SignedCodec, envelope: RequestEnvelope | ReplyEnvelope, topic: string): Uint8Array {
  const bytes = "method" in envelope ? codec.encodeRequest(envelope, topic) : codec.encodeReply(envelope, topic);
  return codec.seal(bytes, topic);
}

class Compute extends Manager {
  runs = 0;
  slow = 0;
  add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
    this.runs++;
    return a + b;
  }
  async later(_ctx: RequestContext, { ms }: { ms: number }) {
    await sleep(ms);
    return "real";
  }
  @requires("admin")
  wipe(_ctx: RequestContext) {
    this.runs += 1000;
    return "wiped";
  }
}

interface Net {
  open(): Promise<Transport>;
  close(): Promise<void>;
}

function trustSuite(name: string, makeNet: () => Promise<Net>) {
  describe(`signed envelopes over ${name}`, () => {
    let net: Net;
    let prefix: string;
    let registry: Registry;
    let svc: Service;
    let manager: Compute;
    let serverLog: MemoryLogger;
    let serverCodec: SignedCodec;
    const open: Transport[] = [];
    const transport = async () => {
      const t = await net.open();
      open.push(t);
      return t;
    };
    const codec = (config: KeysConfig, log = new MemoryLogger()) => new SignedCodec(config, { prefix, logger: log });
    /** Raw bytes as a peer without our library would send them. */
    const sniff = async (filter: string) => {
      const got: { topic: string; payload: Uint8Array }[] = [];
      await (await transport()).subscribe(filter, (payload, topic) => void got.push({ topic, payload }));
      return got;
    };

    before(async () => {
      net = await makeNet();
      prefix = uniquePrefix("keys");
      registry = await openRegistry("sqljs::memory:");
      manager = new Compute();
      serverLog = new MemoryLogger();
      serverCodec = codec({ sign: "fleet", keys: trusted() }, serverLog);
      svc = Service.create({
        host: "h1",
        topic: "compute",
        manager,
        transport: await transport(),
        registry,
        prefix,
        codec: serverCodec,
        logger: new MemoryLogger(),
      });
      await svc.start();
    });
    after(async () => {
      await svc.stop();
      await registry.close();
      for (const t of open) await t.close();
      await net.close();
    });

    it("a signed call is answered, and its bytes carry the key id and the topic they were signed for", async () => {
      const seen = await sniff(`${prefix}/rpc/#`);
      const rpc = new Rpc(await transport(), { prefix, codec: codec({ sign: "device-7", keys: trusted() }) });
      assert.equal(await rpc.call(new RequestContext(), "compute.h1", { method: "add", args: { a: 2, b: 3 } }), 5);
      await waitFor(() => seen.length > 0, "the request on the wire");
      assert.match(
        text(seen[0]!.payload),
        new RegExp(`^\\{"sig":"device-7\\.[A-Za-z0-9_-]{43}","to":"${prefix}/rpc/compute/h1","m":\\{"v":1,`),
      );
      await rpc.close();
    });

    it("an unsigned request, a forged is_admin and a key out of its scope are dropped unanswered before any method runs", async () => {
      const t = await transport();
      const replies = await sniff(`${prefix}/reply/#`);
      const before = { ...serverCodec.refused };
      const runs = manager.runs;
      const envelope = (id: string, ctx: object) =>
        `{"v":1,"id":"${id}","method":"wipe","args":{},"context":${
          JSON.stringify(ctx)
        },"reply_to":"${prefix}/reply/x","deadline":${Date.now() + 10_000}}`;
      // No signature at all, claiming to be an admin.
      await t.publish(`${prefix}/rpc/compute/h1`, utf8(envelope("u1", { is_admin: true, roles: ["admin"] })));
      // Signed with the device's own key, claiming admin: the key may not assert it.
      const forger = new SignedCodec({ sign: "device-7", keys: [{ ...device, roles: ["admin"] }] }, { prefix });
      const forged = signed(forger, {
        v: 1,
        id: "f1",
        method: "wipe",
        args: {},
        context: RequestContext.admin(),
        reply_to: `${prefix}/reply/x`,
      }, `${prefix}/rpc/compute/h1`);
      await t.publish(`${prefix}/rpc/compute/h1`, forged);
      // A key that may call telemetry only, its holder signing a call to compute anyway.
      const outside = new SignedCodec({ sign: "narrow", keys: [{ ...narrow, call: ["*"] }] }, { prefix });
      await t.publish(
        `${prefix}/rpc/compute/h1`,
        signed(outside, {
          v: 1,
          id: "f2",
          method: "add",
          args: { a: 1, b: 1 },
          context: {},
          reply_to: `${prefix}/reply/x`,
        }, `${prefix}/rpc/compute/h1`),
      );
      await waitFor(() => serverCodec.refused.unsigned > before.unsigned, "the unsigned one refused");
      await waitFor(
        () => serverCodec.refused.outOfScope === before.outOfScope + 2,
        "the forged admin and the call refused",
      );
      await sleep(100);
      assert.equal(manager.runs, runs, "no method ran");
      assert.equal(replies.length, 0, "no answer to any");
      assert.ok(serverLog.has("warn", /from key "device-7".*may not assert is_admin/));
      assert.ok(serverLog.has("warn", /from key "\(unsigned\)".*no signature/));
      assert.ok(serverLog.has("warn", /from key "narrow".*may not call this topic/));
    });

    it("is_admin under its other name: a context with is_admin true and isAdmin false is refused", async () => {
      // RequestContext.from() reads is_admin when present: the key's roles must be checked on both names.
      const rpc = new Rpc(await transport(), { prefix, codec: codec({ sign: "device-7", keys: trusted() }) });
      const twoNames = { is_admin: true, isAdmin: false } as unknown as RequestContext;
      await assert.rejects(
        rpc.call(twoNames, "compute.h1", { method: "wipe" }),
        (e: Error) => e instanceof NotAuthorized && /may not assert is_admin/.test(e.message),
      );
      // Hand-made with the device's key, which the receiver must refuse on its own.
      const forger = new SignedCodec({ sign: "device-7", keys: [{ ...device, roles: ["*"] }] }, { prefix });
      const t = await transport();
      const before = serverCodec.refused.outOfScope;
      const runs = manager.runs;
      const topic = `${prefix}/rpc/compute/h1`;
      await t.publish(
        topic,
        signed(
          forger,
          { v: 1, id: "two-names", method: "wipe", args: {}, context: { is_admin: true, isAdmin: false } },
          topic,
        ),
      );
      await waitFor(() => serverCodec.refused.outOfScope === before + 1, "the two-named admin refused");
      await sleep(50);
      assert.equal(manager.runs, runs, "wipe did not run");
      await rpc.close();
    });

    it("an overlong key id is refused on its length, and a signature not in its canonical form is refused", async () => {
      const t = await transport();
      const topic = `${prefix}/rpc/compute/h1`;
      const before = { ...serverCodec.refused };
      await t.publish(topic, utf8(`{"sig":"${"k".repeat(100_000)}.x","to":"${topic}","m":{}}`));
      await waitFor(() => serverCodec.refused.unknownKey === before.unknownKey + 1, "the overlong key id refused");
      assert.ok(serverLog.has("warn", /"\(overlong key id\)": its key id is over 64 characters/));
      // A "\\" or a stray "~" in a captured signature: base64url decoding would skip them.
      const good = text(signed(codec({ sign: "fleet", keys: trusted() }), {
        v: 1,
        id: "canon",
        method: "add",
        args: { a: 1, b: 2 },
        context: {},
      }, topic));
      for (const extra of ["\\", "~"]) {
        await t.publish(topic, utf8(good.replace(/^(\{"sig":"fleet\.[^"]*)"/, `$1${extra}"`)));
      }
      // The same length with the last character's spare bits changed: it decodes to the same bytes.
      const ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
      const end = good.indexOf('",');
      const sameBytes = good.slice(0, end - 1) + ALPHABET[ALPHABET.indexOf(good[end - 1]!) ^ 1]! + good.slice(end);
      const sigOf = (m: string) => Buffer.from(m.slice(m.indexOf(".") + 1, m.indexOf('",')), "base64url");
      assert.deepEqual(sigOf(sameBytes), sigOf(good), "the variant decodes to the same signature");
      await t.publish(topic, utf8(sameBytes));
      await waitFor(() => serverCodec.refused.badSignature === before.badSignature + 3, "all three copies refused");
    });

    it("a signed but malformed request outside its key's call scope, or replayed, is not answered", async () => {
      const replies = await sniff(`${prefix}/reply/#`);
      const t = await transport();
      const topic = `${prefix}/rpc/compute/h1`;
      // "narrow" may call telemetry only; its holder signs a malformed request (no method) to compute.
      const outside = new SignedCodec({ sign: "narrow", keys: [{ ...narrow, call: ["*"] }] }, { prefix });
      const bad = (c: SignedCodec, id: string) =>
        signed(c, { v: 1, id, method: "", args: {}, context: {}, reply_to: `${prefix}/reply/victim` }, topic);
      const before = { ...serverCodec.refused };
      await t.publish(topic, bad(outside, "m1"));
      await waitFor(() => serverCodec.refused.outOfScope === before.outOfScope + 1, "the out-of-scope one refused");
      // In scope: answered with BadRequest once; its copy is a replay.
      const inScope = bad(codec({ sign: "fleet", keys: trusted() }), "m2");
      await t.publish(topic, inScope);
      await t.publish(topic, inScope);
      await waitFor(() => serverCodec.refused.replayed === before.replayed + 1, "the copy refused");
      await sleep(100);
      assert.deepEqual(replies.map((r) => JSON.parse(text(r.payload)).m.id), ["m2"]);
    });

    it("a replayed request is refused: the method runs once", async () => {
      const seen = await sniff(`${prefix}/rpc/compute/h1`);
      const t = await transport();
      const rpc = new Rpc(t, { prefix, codec: codec({ sign: "fleet", keys: trusted() }) });
      const runs = manager.runs;
      await rpc.call(new RequestContext(), "compute.h1", { method: "add", args: { a: 1, b: 2 } });
      await waitFor(() => seen.length === 1, "the request captured");
      const replayed = serverCodec.refused.replayed;
      await t.publish(`${prefix}/rpc/compute/h1`, seen[0]!.payload);
      await waitFor(() => serverCodec.refused.replayed === replayed + 1, "the replay refused");
      assert.equal(manager.runs, runs + 1);
      await rpc.close();
    });

    it("an altered byte, a copy sent to another topic and a deadline too far ahead are refused", async () => {
      const t = await transport();
      const signer = codec({ sign: "fleet", keys: trusted() });
      const req = (id: string, deadline?: number) => ({
        v: 1 as const,
        id,
        method: "add",
        args: { a: 1, b: 2 },
        context: {},
        deadline,
      });
      const good = signed(signer, req("a1"), `${prefix}/rpc/compute/h1`);
      const altered = Buffer.from(good);
      altered[altered.indexOf('"a":1') + 4] = 0x39; // "a":9
      const elsewhere = signed(signer, req("a2"), `${prefix}/rpc/compute`);
      const before = { ...serverCodec.refused };
      const runs = manager.runs;
      await t.publish(`${prefix}/rpc/compute/h1`, altered);
      await t.publish(`${prefix}/rpc/compute/h1`, elsewhere);
      // Signed by a key whose maxAge allows a day, sent to one that allows 600 s.
      const patient = new SignedCodec({ sign: "fleet", maxAge: 86_400, keys: [fleet] }, { prefix });
      await t.publish(
        `${prefix}/rpc/compute/h1`,
        signed(patient, req("a3", Date.now() + 3_600_000), `${prefix}/rpc/compute/h1`),
      );
      await waitFor(() => serverCodec.refused.tooFarAhead === before.tooFarAhead + 1, "the far deadline refused");
      await waitFor(() => serverCodec.refused.badSignature === before.badSignature + 1, "the altered one refused");
      await waitFor(() => serverCodec.refused.wrongTopic === before.wrongTopic + 1, "the copy refused");
      await sleep(50);
      assert.equal(manager.runs, runs);
    });

    it("a reply signed by a key not allowed to answer for the topic is refused; the real one is taken", async () => {
      const seen = await sniff(`${prefix}/rpc/compute/h1`);
      const clientLog = new MemoryLogger();
      const clientCodec = codec({ sign: "fleet", keys: trusted() }, clientLog);
      const rpc = new Rpc(await transport(), { prefix, codec: clientCodec });
      const call = rpc.call(new RequestContext(), "compute.h1", { method: "later", args: { ms: 300 } });
      await waitFor(() => seen.length === 1, "the request captured");
      const req = JSON.parse(text(seen[0]!.payload)).m;
      // The device answers first: its key may serve telemetry only.
      const impostor = new SignedCodec({ sign: "device-7", keys: [device] }, { prefix });
      const t = await transport();
      await t.publish(req.reply_to, signed(impostor, { v: 1, id: req.id, result: "forged" }, req.reply_to));
      assert.equal(await call, "real");
      assert.equal(clientCodec.refused.outOfScope, 1);
      assert.ok(clientLog.has("warn", /reply .*from key "device-7".*may not answer for "compute"/));
      await rpc.close();
    });

    it("a client whose key may not call a topic or assert admin fails at once, naming the key", async () => {
      const rpc = new Rpc(await transport(), { prefix, codec: codec({ sign: "device-7", keys: trusted() }) });
      await assert.rejects(
        rpc.call(new RequestContext(), "billing", { method: "add" }),
        (e: Error) => e instanceof NotAuthorized && /Key "device-7" may not call "billing"/.test(e.message),
      );
      await assert.rejects(
        rpc.call(RequestContext.admin(), "compute.h1", { method: "wipe" }),
        (e: Error) => e instanceof NotAuthorized && /may not assert is_admin \(its "roles": none\)/.test(e.message),
      );
      await rpc.close();
    });

    it("an operator's Ed25519 key asserts admin; the fleet verifies it with the public half only", async () => {
      // The operator's file: its own private key and the fleet key, to check the answer.
      const ops = new Rpc(await transport(), {
        prefix,
        codec: codec({ sign: "ops", keys: [fleet, device, operator] }),
      });
      assert.equal(await ops.call(RequestContext.admin(), "compute.h1", { method: "wipe" }), "wiped");
      await assert.rejects(
        ops.call(new RequestContext(), "compute.h1", { method: "wipe" }),
        (e: Error) => e instanceof RemoteError && e.type === "NotAuthorized",
      );
      await ops.close();
    });

    it("keys rotate while calls run: no call fails", async () => {
      const clientCodec = codec({ sign: "fleet", keys: trusted() });
      const rpc = new Rpc(await transport(), { prefix, codec: clientCodec, timeout: 5 });
      let stop = false;
      let ok = 0;
      const failures: unknown[] = [];
      const loop = (async () => {
        while (!stop) {
          try {
            await rpc.call(new RequestContext(), "compute.h1", { method: "add", args: { a: 1, b: 1 } });
            ok++;
          } catch (e) {
            failures.push(e);
          }
          await new Promise((r) => setImmediate(r)); // in memory a call may settle in microtasks alone
        }
      })();
      const step = async (server: KeysConfig, client: KeysConfig) => {
        serverCodec.setKeys(server);
        clientCodec.setKeys(client);
        const at = ok;
        await waitFor(() => ok > at + 20, "calls after a step");
      };
      try {
        // Both trust both; the server signs with the new key; then the client; then the old key goes.
        await step({ sign: "fleet", keys: trusted(fleet2) }, { sign: "fleet", keys: trusted(fleet2) });
        await step({ sign: "fleet-2", keys: trusted(fleet2) }, { sign: "fleet", keys: trusted(fleet2) });
        await step({ sign: "fleet-2", keys: trusted(fleet2) }, { sign: "fleet-2", keys: trusted(fleet2) });
        const gone = [fleet2, device, narrow, publicPart(operator)];
        await step({ sign: "fleet-2", keys: gone }, { sign: "fleet-2", keys: gone });
      } finally {
        stop = true;
        await loop;
      }
      assert.deepEqual(failures, []);
      assert.ok(ok > 80);
      // The old key is refused now.
      const old = new Rpc(await transport(), {
        prefix,
        codec: codec({ sign: "fleet", keys: trusted() }),
        timeout: 0.5,
      });
      await assert.rejects(old.call(new RequestContext(), "compute.h1", { method: "add", args: {} }), RpcTimeoutError);
      await Promise.all([rpc.close(), old.close()]);
      serverCodec.setKeys({ sign: "fleet", keys: trusted() });
    });

    it("a device key cannot disable a service through the conductor; an operator key can", async () => {
      const creg = await openRegistry("sqljs::memory:");
      const keysOf = (sign: string, keys: KeyEntry[]) => codec({ sign, keys });
      const [c, admin] = createConductor({
        registry: creg,
        host: "c1",
        transport: await transport(),
        prefix,
        codec: keysOf("fleet", trusted()),
        logger: new MemoryLogger(),
      });
      await c.start();
      await admin.start();
      const asDevice = new ConductorRegistry(await transport(), { prefix, codec: keysOf("device-7", trusted()) });
      const row = await asDevice.register({ host: "d7", binary: "nova-telemetry", topic: "telemetry" });
      await asDevice.reportState(row.id);
      await assert.rejects(asDevice.setDisabled(row.id, true, "pwned"), NotAuthorized);
      // Hand-made: signed with the device's key, claiming admin, straight onto the admin topic.
      const forger = new SignedCodec({ sign: "device-7", keys: [{ ...device, call: ["*"], roles: ["*"] }] }, {
        prefix,
      });
      const t = await transport();
      const topic = `${prefix}/rpc/conductor_admin`;
      await t.publish(
        topic,
        signed(forger, {
          v: 1,
          id: "evil",
          method: "setDisabled",
          args: { id: row.id, disabled: true },
          context: RequestContext.admin(),
        }, topic),
      );
      await sleep(200);
      assert.equal((await creg.get(row.id))!.disabled, false);
      const asOperator = new ConductorRegistry(await transport(), { prefix, codec: keysOf("ops", [fleet, operator]) });
      assert.equal((await asOperator.setDisabled(row.id, true, "maintenance")).disabled, true);
      await Promise.all([asDevice.close(), asOperator.close()]);
      await admin.stop();
      await c.stop();
      await creg.close();
    });
  });
}

trustSuite("memory", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(new MemoryTransport(hub)), close: () => Promise.resolve() });
});

trustSuite("MQTT", async () => {
  const f = await mqttFixture();
  return { open: () => f.open(), close: async () => await f.close?.() };
});

describe("key files and flags", () => {
  let dir: string;
  before(async () => dir = await mkdtemp(join(tmpdir(), "novalet-keys-")));
  after(async () => await rm(dir, { recursive: true, force: true }));

  it("a key file that is wrong fails at start with a message naming the key and what it lacks", () => {
    const bad: [unknown, RegExp][] = [
      [
        { keys: [{ id: "k", type: "hmac", secret: "c2hvcnQ" }] },
        /Key "k".*"secret" must be base64url of at least 16 bytes/,
      ],
      [{ keys: [{ id: "k", type: "rsa" }] }, /Key "k".*"type" "rsa" must be "hmac" or "ed25519"/],
      [{ sign: "nope", keys: [fleet] }, /Signing key "nope".*is not among its keys/],
      [{ sign: "ops", keys: [publicPart(operator)] }, /Signing key "ops".*lacks its "private" part/],
      [{ keys: [fleet, fleet] }, /Key "fleet".*listed twice/],
      [
        { keys: [{ ...operator, private: generateKey("x", "ed25519").private }] },
        /"private" does not belong to "public"/,
      ],
      [{ keys: [{ ...fleet, roles: "admin" }] }, /Key "fleet".*"roles" must be an array/],
      [{ maxAge: 0, keys: [fleet] }, /"maxAge".*1 to 86400/],
      [
        { keys: [{ ...fleet, serve: ["compute.node1"] }] },
        /Key "fleet".*"serve" names topics, not hosts: "compute.node1"/,
      ],
    ];
    for (const [config, message] of bad) {
      assert.throws(() => new SignedCodec(config as KeysConfig), message, JSON.stringify(config));
    }
  });

  it("past its table of ids, a codec refuses what could be a forgotten replay rather than run it twice", () => {
    const topic = "novalet/rpc/compute";
    const sender = new SignedCodec({ sign: "fleet", keys: [fleet] });
    const receiver = new SignedCodec({ sign: "fleet", keys: [fleet] }, { maxIds: 100, logger: new MemoryLogger() });
    const deadline = Date.now() + 60_000;
    const msgs = Array.from(
      { length: 150 },
      (_, i) => signed(sender, { v: 1, id: `r${i}`, method: "m", args: {}, context: {}, deadline }, topic),
    );
    const taken = msgs.map((m) => receiver.decodeRequests(m, topic).items.length);
    assert.deepEqual(
      taken,
      [...Array(101).fill(1), ...Array(49).fill(0)],
      "taken until the table overflows, then refused",
    );
    assert.deepEqual(receiver.decodeRequests(msgs[0]!, topic).items, [], "the first one again: refused");
    assert.equal(receiver.refused.replayed, 50);
    const later = signed(
      sender,
      { v: 1, id: "fresh", method: "m", args: {}, context: {}, deadline: deadline + 60_000 },
      topic,
    );
    assert.equal(receiver.decodeRequests(later, topic).items.length, 1, "a request expiring later is taken");
  });

  /** Two senders with keys fleet and fleet-2, a receiver of maxIds 100 trusting both, and requests
   * to compute (a minute ahead unless `at` says). */
  function twoKeys() {
    const topic = "novalet/rpc/compute";
    const receiver = new SignedCodec({ sign: "fleet", keys: [fleet, fleet2] }, {
      maxIds: 100,
      logger: new MemoryLogger(),
    });
    const deadline = Date.now() + 60_000;
    return {
      topic,
      a: new SignedCodec({ sign: "fleet", keys: [fleet] }),
      b: new SignedCodec({ sign: "fleet-2", keys: [fleet2] }),
      receiver,
      deadline,
      request: (id: string, at = deadline) => ({ v: 1 as const, id, method: "m", args: {}, context: {}, deadline: at }),
    };
  }

  it("one key's flood of ids fills only that key's table: another key's requests are still taken", () => {
    const { topic, a: flooder, b: other, receiver, request } = twoKeys();
    for (let i = 0; i < 150; i++) receiver.decodeRequests(signed(flooder, request(`f${i}`), topic), topic);
    assert.equal(receiver.refused.replayed, 49, "the flooding key's own requests are refused past its table");
    const theirs = signed(other, request("o1"), topic);
    assert.equal(receiver.decodeRequests(theirs, topic).items.length, 1, "another key's request is taken");
    assert.deepEqual(receiver.decodeRequests(theirs, topic).items, [], "and its replay refused");
  });

  it("the keys' tables share maxIds: past it, the largest forgets its soonest ids, never a quieter key's", () => {
    const { topic, a, b, receiver, deadline, request } = twoKeys();
    const taken = (msgs: Uint8Array[]) => msgs.map((m) => receiver.decodeRequests(m, topic).items.length);
    const fromA = Array.from({ length: 80 }, (_, i) => signed(a, request(`a${i}`), topic));
    assert.deepEqual(taken(fromA), Array(80).fill(1));
    const fromB = Array.from({ length: 31 }, (_, i) => signed(b, request(`b${i}`), topic));
    assert.deepEqual(taken(fromB.slice(0, 30)), Array(30).fill(1), "b's 21st makes 101: a, the largest, forgets");
    assert.deepEqual(taken([fromA[0]!, fromB[0]!]), [0, 0], "replays of both refused: a's by its floor");
    assert.deepEqual(taken([signed(a, request("a-same"), topic)]), [0], "a's request expiring by its floor: refused");
    assert.deepEqual(taken([fromB[30]!]), [1], "b's next request, same deadline, taken: nothing of b's was forgotten");
    const later = signed(a, request("a-later", deadline + 60_000), topic);
    assert.deepEqual(taken([later]), [1], "a's request expiring after its floor: taken");
  });

  /** Run `f` with Date.now() at `at()` (a function of the real now, read once). */
  function at<T>(ms: number, f: () => T): T {
    const real = Date.now;
    Date.now = () => ms;
    try {
      return f();
    } finally {
      Date.now = real;
    }
  }

  it("a replay is refused at every ms around its id's expiry, also after a key file raises the skew", () => {
    const topic = "novalet/rpc/compute";
    const sender = new SignedCodec({ sign: "fleet", keys: [fleet] });
    const start = Math.ceil(Date.now() / 1000) * 1000;
    const deadline = start + 5_000; // deadline + skew falls on a whole second, as an id's expiry bucket does
    const msg = signed(sender, { v: 1, id: "edge", method: "m", args: {}, context: {}, deadline }, topic);
    for (const after of [-1, 0, 1]) {
      const receiver = new SignedCodec({ sign: "fleet", skew: 1, keys: [fleet] }, { logger: new MemoryLogger() });
      assert.equal(at(start, () => receiver.decodeRequests(msg, topic).items.length), 1);
      const replay = at(deadline + 1_000 + after, () => receiver.decodeRequests(msg, topic).items.length);
      assert.equal(replay, 0, `replayed ${after} ms from its expiry`);
    }
    const receiver = new SignedCodec({ sign: "fleet", skew: 1, keys: [fleet] }, { logger: new MemoryLogger() });
    assert.equal(at(start, () => receiver.decodeRequests(msg, topic).items.length), 1);
    at(
      deadline + 5_000,
      () =>
        receiver.decodeRequests(
          signed(sender, { v: 1, id: "tick", method: "m", args: {}, context: {}, deadline: deadline + 9_000 }, topic),
          topic,
        ),
    ); // its id forgotten
    receiver.setKeys({ sign: "fleet", skew: 60, keys: [fleet] });
    assert.equal(at(deadline + 5_000, () => receiver.decodeRequests(msg, topic).items.length), 0, "after skew 1 -> 60");
    assert.equal(receiver.refused.expired, 1);
  });

  it("a receiver whose clock jumped ahead and back refuses a replay: its clock never goes back", () => {
    const topic = "novalet/rpc/compute";
    const sender = new SignedCodec({ sign: "fleet", keys: [fleet] });
    const receiver = new SignedCodec({ sign: "fleet", keys: [fleet] }, { logger: new MemoryLogger() });
    const t = Date.now();
    const once = signed(sender, { v: 1, id: "once", method: "m", args: {}, context: {}, deadline: t + 60_000 }, topic);
    assert.equal(at(t, () => receiver.decodeRequests(once, topic).items.length), 1);
    const tick = { v: 1 as const, id: "tick", method: "m", args: {}, context: {}, deadline: t + 660_000 };
    const ahead = at(t + 600_000, () => signed(sender, tick, topic)); // the sender's clock jumped too
    assert.equal(at(t + 600_000, () => receiver.decodeRequests(ahead, topic).items.length), 1, "a sweep 10 min on");
    assert.equal(at(t + 5_000, () => receiver.decodeRequests(once, topic).items.length), 0, "the clock set back");
    assert.equal(receiver.refused.expired, 1);
  });

  it("maxIds must be a whole number of at least 1", () => {
    for (const maxIds of [-1, 0, 1.5, NaN]) {
      assert.throws(
        () => new SignedCodec({ keys: [fleet] }, { maxIds }),
        /maxIds must be a whole number/,
        String(maxIds),
      );
    }
  });

  it("calls awaiting replies: one signed twice counts once, and replies to later calls are taken", () => {
    const client = new SignedCodec({ sign: "fleet", keys: [fleet] }, { maxIds: 2 });
    const server = new SignedCodec({ sign: "fleet", keys: [fleet] });
    const topic = "novalet/rpc/compute";
    const replyTo = "novalet/reply/me/1";
    const deadline = Date.now() + 60_000;
    const call = (id: string) =>
      client.encodeRequest({ v: 1, id, method: "m", args: {}, context: {}, reply_to: replyTo, deadline }, topic);
    call("x");
    call("x");
    const answered = (id: string) => client.decodeReplies(signed(server, { v: 1, id, result: id }, replyTo), replyTo);
    assert.equal(answered("x").length, 1);
    call("y");
    call("z");
    assert.deepEqual([answered("y").length, answered("z").length], [1, 1]);
  });

  it("a deadline that is not a time is refused to sign and refused when it arrives", () => {
    const topic = "novalet/rpc/compute";
    const codec = new SignedCodec({ sign: "fleet", keys: [fleet] }, { logger: new MemoryLogger() });
    assert.throws(
      () => codec.encodeRequest({ v: 1, id: "n", method: "m", args: {}, context: {}, deadline: NaN }, topic),
      /deadline is not a time/,
    );
    // A codec inside that reads deadlines its own way: what reaches the checks is NaN.
    const inner: Codec = {
      ...jsonCodec,
      decodeRequests: (bytes, t) => {
        const { batch, items } = jsonCodec.decodeRequests!(bytes, t);
        return { batch, items: items.map((r) => r instanceof BadRequest ? r : { ...r, deadline: NaN }) };
      },
    };
    const receiver = new SignedCodec({ sign: "fleet", keys: [fleet] }, { logger: new MemoryLogger(), inner });
    const msg = signed(
      codec,
      { v: 1, id: "n", method: "m", args: {}, context: {}, deadline: Date.now() + 1000 },
      topic,
    );
    assert.deepEqual(receiver.decodeRequests(msg, topic).items, []);
    assert.equal(receiver.refused.tooFarAhead, 1);
  });

  it("serve() reloads key files on SIGHUP: a bad one, or one whose key may not serve the topic, changes nothing", async () => {
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    const prefix = uniquePrefix("hup");
    const file = join(dir, "hup.json");
    await writeFile(file, JSON.stringify({ sign: "fleet", keys: trusted() }));
    const registry = await openRegistry("sqljs::memory:");
    const log = new MemoryLogger();
    const svc = Service.create({
      host: "h",
      topic: "compute",
      manager: Compute,
      flags: parseFlags([`--keys=${file}`, `--prefix=${prefix}`], {}),
      transport: new MemoryTransport(hub),
      registry,
      logger: log,
    });
    const launcher = await serve(svc, { exit: false, logger: log });
    try {
      const codec = svc.codec as SignedCodec;
      const hup = async (config: unknown, what: RegExp) => {
        await writeFile(file, typeof config === "string" ? config : JSON.stringify(config));
        const n = log.lines.length;
        process.emit("SIGHUP", "SIGHUP");
        await waitFor(() => log.lines.slice(n).some((l) => what.test(l.msg)), String(what));
      };
      await hup("{not json", /Cannot reload the keys of compute\.h/);
      await hup({ sign: "device-7", keys: trusted() }, /Cannot reload the keys of compute\.h/);
      assert.ok(log.lines.some((l) => /may not serve "compute"/.test(String(l.fields?.error))));
      assert.equal(codec.signer, "fleet", "the old keys stay");
      await hup({ sign: "fleet-2", keys: trusted(fleet2) }, /Reloaded the keys of compute\.h/);
      assert.equal(codec.signer, "fleet-2");
    } finally {
      await launcher.stop();
      await registry.close();
    }
  });

  it("--keys makes a service sign and verify; a key that may not serve its topic stops it at start", async () => {
    const hub = new MemoryHub({ logger: new MemoryLogger() });
    const prefix = uniquePrefix("kf");
    const file = join(dir, "fleet.json");
    await writeFile(file, JSON.stringify({ sign: "device-7", keys: trusted() }));
    const flags = parseFlags([`--keys=${file}`, `--prefix=${prefix}`], {});
    const registry = await openRegistry("sqljs::memory:");
    const refused = Service.create({
      host: "h",
      topic: "compute",
      manager: Compute,
      flags,
      transport: new MemoryTransport(hub),
      registry,
      logger: new MemoryLogger(),
    });
    await assert.rejects(refused.start(), /Key "device-7" may not serve "compute" \(its "serve": telemetry\)/);
    const ok = Service.create({
      host: "h",
      topic: "telemetry",
      manager: Compute,
      flags,
      transport: new MemoryTransport(hub),
      registry,
      logger: new MemoryLogger(),
    });
    await ok.start();
    assert.ok(ok.codec instanceof SignedCodec);
    // Unsigned: refused; signed with the fleet key: answered.
    const plain = new Rpc(new MemoryTransport(hub), { prefix, timeout: 0.3 });
    await assert.rejects(
      plain.call(new RequestContext(), "telemetry", { method: "add", args: { a: 1, b: 1 } }),
      RpcTimeoutError,
    );
    const signed = new Rpc(new MemoryTransport(hub), {
      prefix,
      codec: new SignedCodec({ sign: "fleet", keys: trusted() }, { prefix }),
    });
    assert.equal(await signed.call(new RequestContext(), "telemetry", { method: "add", args: { a: 1, b: 1 } }), 2);
    await Promise.all([plain.close(), signed.close()]);
    await ok.stop();
    await registry.close();
    await assert.rejects(
      SignedCodec.fromFile(join(dir, "missing.json")),
      /Cannot read the key file ".*missing.json"/,
    );
  });
});
