/**
 * A fleet behind docs/broker.md's broker: Mosquitto with a TLS listener (a private CA made here
 * with openssl), a password file and examples/mosquitto/device.acl. Devices reach the broker at
 * `mqtts://...?ca=...`, their registry through the conductor (`conductor:`). Without mosquitto or
 * openssl the broker tests are skipped with a reason, unless MQTT_URL is set (CI): then they fail.
 */
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import {
  DeliveryError,
  Manager,
  NotAuthorized,
  openRegistry,
  parseFlags,
  readPresence,
  type Registry,
  RegistryError,
  type RequestContext,
  RequestContext as Ctx,
  Rpc,
  Service,
} from "../index.ts";
import { createConductor } from "../registry/conductor.ts";
import { openSqlRegistry } from "../registry/sql.ts";
import { MqttTransport } from "../transports/mqtt.ts";
import { MemoryLogger, sleep, waitFor } from "./helpers.ts";
import { Mosquitto, needs } from "./mosquitto.ts";

const OPENSSL = (() => {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
})();

function skipReason(): string | undefined {
  const mosquitto = needs("mosquitto");
  if (mosquitto !== undefined || OPENSSL) return mosquitto;
  if (process.env.MQTT_URL) throw new Error("MQTT_URL is set but openssl is not installed: CI must install it");
  return "openssl is not installed (it makes the test's private CA)";
}

/** A private CA, a server certificate it signed for 127.0.0.1 and localhost, and a client's. */
function makeCertificates(
  dir: string,
): { ca: string; cert: string; key: string; clientCert: string; clientKey: string } {
  const file = (name: string) => join(dir, name);
  const openssl = (...args: string[]) => execFileSync("openssl", args, { cwd: dir, stdio: "pipe" });
  openssl(
    "req",
    "-x509",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-days",
    "1",
    "-subj",
    "/CN=novalet test CA",
    "-keyout",
    "ca.key",
    "-out",
    "ca.pem",
  );
  // A key and a certificate signed by the CA, for `name` (CN `cn`, with `san` as subjectAltName).
  const issue = (name: string, cn: string, san?: string) => {
    openssl(
      "req",
      "-newkey",
      "rsa:2048",
      "-nodes",
      "-subj",
      `/CN=${cn}`,
      "-keyout",
      `${name}.key`,
      "-out",
      `${name}.csr`,
    );
    const ext = san ? ["-extfile", `${name}.cnf`] : [];
    if (san) writeFileSync(file(`${name}.cnf`), `subjectAltName=${san}\n`);
    openssl(
      "x509",
      "-req",
      "-in",
      `${name}.csr`,
      "-CA",
      "ca.pem",
      "-CAkey",
      "ca.key",
      "-CAcreateserial",
      "-days",
      "1",
      ...ext,
      "-out",
      `${name}.pem`,
    );
  };
  issue("server", "localhost", "IP:127.0.0.1,DNS:localhost");
  issue("client", "dev-a");
  return {
    ca: file("ca.pem"),
    cert: file("server.pem"),
    key: file("server.key"),
    clientCert: file("client.pem"),
    clientKey: file("client.key"),
  };
}

/** A device of the fleet: serves topic `sensor`; `ask` calls another device. */
class Sensor extends Manager {
  static notes: string[] = [];
  ping(): string {
    return this.host;
  }
  note(): void {
    Sensor.notes.push(this.host);
  }
  async ask(ctx: RequestContext, { host }: { host: string }): Promise<string> {
    return await this.service.rpc.call<string>(ctx, `sensor.${host}`, { method: "ping" }, { timeout: 5 });
  }
}

const USERS = { operator: "op-secret", conductor: "c-secret", "dev-a": "a-secret", "dev-b": "b-secret" };

describe("a fleet behind examples/mosquitto/device.acl over TLS with a private CA", () => {
  const skip = skipReason();
  const dir = mkdtempSync(join(tmpdir(), "novalet-tls-"));
  let broker: Mosquitto | undefined;
  let ca = "";
  let files: ReturnType<typeof makeCertificates>;
  /** `mqtts://user:password@127.0.0.1:port?ca=...` */
  let url = (_user: keyof typeof USERS, _query = ""): string => "";
  const transports: MqttTransport[] = [];
  const services: Service[] = [];
  const closing: { close(): Promise<void> }[] = [];
  let operator: Registry;
  let operatorRpc: Rpc;
  let deviceA: Service;
  let deviceB: Service;

  const device = (host: "dev-a" | "dev-b", query: string) =>
    Service.create({
      topic: "sensor",
      binary: "nova-sensor",
      manager: Sensor,
      logger: new MemoryLogger(),
      flags: parseFlags([
        `--transport_url=${url(host, query)}`,
        "--registry_url=conductor:",
        `--host=${host}`,
        "--report_interval=0.2",
        "--service_down_time=5",
        "--rpc_response_timeout=5",
      ]),
    });

  before(async () => {
    if (skip) return;
    files = makeCertificates(dir);
    ca = files.ca;
    const acl = new URL("../examples/mosquitto/device.acl", import.meta.url).pathname;
    broker = await Mosquitto.start({
      users: USERS,
      // The listener of .ci/mosquitto.conf, with TLS: these apply to the listener before them.
      conf: [
        `cafile ${files.ca}`,
        `certfile ${files.cert}`,
        `keyfile ${files.key}`,
        "require_certificate false",
        `acl_file ${acl}`,
      ].join("\n"),
    });
    const port = new URL(broker.url).port;
    url = (user, query = "") => `mqtts://${user}:${USERS[user]}@127.0.0.1:${port}?ca=${encodeURIComponent(ca)}${query}`;
    const as = async (user: keyof typeof USERS) => {
      const t = await MqttTransport.connect({ url: url(user), logger: new MemoryLogger() });
      transports.push(t);
      return t;
    };
    const served = await openSqlRegistry("sqljs::memory:");
    closing.push(served);
    const conductor = createConductor({ registry: served, host: "c1", transport: await as("conductor") });
    for (const s of conductor) {
      services.push(s);
      await s.start();
    }
    const ot = await as("operator");
    operator = await openRegistry("conductor:", { transport: ot });
    closing.push(operator);
    operatorRpc = new Rpc(ot, { timeout: 5 });
    closing.push(operatorRpc);
    // dev-a keeps a persistent session: it then has a live connection too (shared work, replies).
    deviceA = device("dev-a", "&session_expiry=60");
    deviceB = device("dev-b", "");
    for (const s of [deviceA, deviceB]) {
      services.push(s);
      await s.start();
    }
  });

  after(async () => {
    for (const s of services.reverse()) await s.stop();
    for (const c of closing.reverse()) await c.close();
    await Promise.all(transports.map((t) => t.close()));
    await broker?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it("a device's replies come back under its broker user", { skip }, () => {
    const a = deviceA.transport as MqttTransport;
    assert.equal(a.clientId, "novalet-nova-sensor-dev-a", "the session's client id");
    assert.equal(a.user, "dev-a");
    // service.rpc is on the live connection (a sibling: the same user, over TLS as well).
    assert.match(deviceA.rpc.replyTopic, /^novalet\/reply\/dev-a\/[0-9a-f-]{36}$/);
    assert.match(deviceB.rpc.replyTopic, /^novalet\/reply\/dev-b\/[0-9a-f-]{36}$/);
  });

  it("a device serves its topic and topic.host, calls another and gets replies", { skip }, async () => {
    const ctx = new Ctx();
    assert.equal(await operatorRpc.call(ctx, "sensor.dev-a", { method: "ping" }), "dev-a");
    const hosts = new Set<string>();
    for (let i = 0; i < 10; i++) hosts.add(await operatorRpc.call<string>(ctx, "sensor", { method: "ping" }));
    assert.deepEqual([...hosts].sort(), ["dev-a", "dev-b"], "both devices take shared work");
    assert.equal(await deviceA.rpc.call(ctx, "sensor.dev-b", { method: "ping" }), "dev-b");
    assert.match(await deviceA.rpc.call<string>(ctx, "sensor", { method: "ping" }), /^dev-[ab]$/);
    assert.equal(await deviceB.rpc.call(ctx, "sensor.dev-a", { method: "ask", args: { host: "dev-b" } }), "dev-b");
  });

  it("a device gets the fanout of its topic", { skip }, async () => {
    Sensor.notes = [];
    await operatorRpc.fanoutCast(new Ctx(), "sensor", { method: "note" });
    await waitFor(() => Sensor.notes.length >= 2, "both devices to take the fanout");
    assert.deepEqual(Sensor.notes.sort(), ["dev-a", "dev-b"]);
  });

  it("a device announces its presence and reads its fleet's, not the conductor's", { skip }, async () => {
    const presence = await readPresence(transports.find((t) => t.client.options.username === "operator")!);
    for (const a of ["sensor.dev-a", "sensor.dev-b", "conductor.c1"]) assert.equal(presence.get(a)?.state, "online", a);
    // Retained: a subscription that is let through gets them at once.
    const got: string[] = [];
    const subs = [
      await deviceA.transport.subscribe("novalet/presence/sensor/+", (_p, t) => void got.push(t)),
      await deviceA.transport.subscribe("novalet/presence/conductor/+", (_p, t) => void got.push(t)).catch(() =>
        undefined
      ),
    ];
    await waitFor(() => got.length >= 2, "the fleet's presence");
    await sleep(200);
    for (const s of subs) await s?.unsubscribe();
    assert.deepEqual(got.sort(), ["novalet/presence/sensor/dev-a", "novalet/presence/sensor/dev-b"]);
  });

  it("a device heartbeats through the conductor", { skip }, async () => {
    const [row] = await operator.list({ host: "dev-a", binary: "nova-sensor" });
    assert.ok(row, "dev-a registered through the conductor");
    const until = Date.now() + 5000;
    let count = row.reportCount;
    while (count < row.reportCount + 3 && Date.now() < until) {
      await sleep(100);
      count = (await operator.get(row.id))!.reportCount;
    }
    assert.ok(count >= row.reportCount + 3, `heartbeats: ${count - row.reportCount}`);
  });

  it("a device cannot read another's replies", { skip }, async () => {
    const ctx = new Ctx();
    const bReplies = deviceB.rpc.replyTopic;
    // The operator may read them: it shows that replies went there while dev-a listened.
    const seen = { operator: 0, deviceA: 0 };
    const watch = await transports.find((t) => t.client.options.username === "operator")!
      .subscribe(bReplies, () => void seen.operator++);
    let spy: { unsubscribe(): Promise<void> } | undefined;
    try {
      // Mosquitto 2.0 grants the subscription and delivers nothing to it; a broker that
      // refuses it (MQTT 5 "not authorized", 0x87) makes subscribe() reject.
      spy = await deviceA.transport.subscribe(bReplies, () => void seen.deviceA++).catch((e) => {
        assert.ok(e instanceof DeliveryError, String(e));
        return undefined;
      });
      const wide = await deviceA.transport.subscribe("novalet/reply/#", (_p, topic) => {
        if (topic.startsWith("novalet/reply/dev-b/")) seen.deviceA++;
      }).catch(() => undefined);
      // A client id proves nothing: dev-a taking the client id "dev-b" reads nothing of dev-b's either.
      const spoof = await MqttTransport.connect({ url: url("dev-a"), clientId: "dev-b", logger: new MemoryLogger() });
      transports.push(spoof);
      await spoof.subscribe("novalet/reply/dev-b/#", () => void seen.deviceA++).catch(() => undefined);
      for (let i = 0; i < 3; i++) {
        assert.equal(await deviceB.rpc.call(ctx, "sensor.dev-a", { method: "ping" }), "dev-a");
      }
      await waitFor(() => seen.operator >= 3, "the operator to see dev-b's replies");
      await sleep(200);
      assert.equal(seen.deviceA, 0, "dev-a received none of dev-b's replies");
      await wide?.unsubscribe();
    } finally {
      await spy?.unsubscribe();
      await watch.unsubscribe();
    }
  });

  it("a device cannot administer the conductor; its work and heartbeats go on", { skip }, async () => {
    const registry = deviceA.registry;
    const [row] = await operator.list({ host: "dev-a", binary: "nova-sensor" });
    assert.ok(row);
    // Refused by the broker (MQTT 5 "not authorized"); Mosquitto 2.0 also drops the connection,
    // and the refusal may be lost with it: the call then fails as a connection error.
    const refused = (e: Error) =>
      e instanceof NotAuthorized && /broker refused/.test(e.message) ||
      e instanceof RegistryError && /Connection closed/.test(e.message);
    await assert.rejects(registry.setDisabled(row.id, true, "taken over"), refused);
    const a = deviceA.transport as MqttTransport;
    await waitFor(() => a.client.connected, "dev-a to reconnect", 10_000);
    await assert.rejects(a.publish("novalet/rpc/conductor_admin", new TextEncoder().encode("{}")), (e: Error) => {
      assert.ok(e instanceof DeliveryError, String(e));
      return true;
    });
    await waitFor(() => a.client.connected, "dev-a to reconnect", 10_000);
    const seen = (await operator.get(row.id))!;
    assert.equal(seen.disabled, false, "nothing reached the conductor");
    const until = Date.now() + 5000;
    let count = seen.reportCount;
    while (count < seen.reportCount + 3 && Date.now() < until) {
      await sleep(100);
      count = (await operator.get(row.id))!.reportCount;
    }
    assert.ok(count >= seen.reportCount + 3, `heartbeats after the refusals: ${count - seen.reportCount}`);
    assert.equal(await operatorRpc.call(new Ctx(), "sensor.dev-a", { method: "ping" }), "dev-a");
  });

  it("a plain mqtt:// connection to the TLS listener fails", { skip }, async () => {
    const plain = url("dev-a").replace("mqtts:", "mqtt:").replace(/\?.*/, "");
    await assert.rejects(
      MqttTransport.connect({ url: plain, connectTimeout: 3, reconnectMin: 5, logger: new MemoryLogger() }),
      /Cannot connect to MQTT broker/,
    );
  });

  it("a client without the private CA fails on the broker's certificate", { skip }, async () => {
    await assert.rejects(
      MqttTransport.connect({ url: url("dev-a").replace(/\?.*/, ""), connectTimeout: 3, logger: new MemoryLogger() }),
      /Cannot connect to MQTT broker .*: (self-signed certificate in certificate chain|unable to verify)/,
    );
  });

  it(
    "a client certificate (cert=, key=) passes a listener that requires one, for every connection",
    { skip },
    async () => {
      const strict = await Mosquitto.start({
        users: { "dev-a": USERS["dev-a"] },
        conf: `cafile ${files.ca}\ncertfile ${files.cert}\nkeyfile ${files.key}\nrequire_certificate true`,
      });
      try {
        const base = `mqtts://dev-a:${USERS["dev-a"]}@127.0.0.1:${new URL(strict.url).port}?ca=${
          encodeURIComponent(ca)
        }`;
        await assert.rejects(
          MqttTransport.connect({ url: base, connectTimeout: 3, reconnectMin: 5, logger: new MemoryLogger() }),
          /Cannot connect to MQTT broker .*certificate ?required/i,
        );
        const own = `&cert=${encodeURIComponent(files.clientCert)}&key=${encodeURIComponent(files.clientKey)}`;
        const t = await MqttTransport.connect({ url: base + own, logger: new MemoryLogger() });
        // The service opens its presence connection (a sibling) with the same certificate.
        const svc = Service.create({
          topic: "sensor",
          host: "dev-a",
          manager: Sensor,
          transport: t,
          logger: new MemoryLogger(),
        });
        const rpc = new Rpc(t, { timeout: 5 });
        try {
          await svc.start();
          assert.equal(await rpc.call(new Ctx(), "sensor.dev-a", { method: "ping" }), "dev-a");
          assert.equal((await readPresence(t)).get("sensor.dev-a")?.state, "online");
        } finally {
          await rpc.close();
          await svc.stop();
          await t.close();
        }
      } finally {
        await strict.stop();
      }
    },
  );
});

describe("MqttTransport TLS files", () => {
  it("connect() names a CA file it cannot read, at open", async () => {
    await assert.rejects(
      MqttTransport.connect({ url: "mqtts://127.0.0.1:1?ca=/no/such/ca.pem", logger: new MemoryLogger() }),
      (e: Error) => {
        assert.match(e.message, /^Cannot read the TLS file ca="\/no\/such\/ca\.pem" for broker .*ENOENT/);
        return true;
      },
    );
    await assert.rejects(
      MqttTransport.connect({ url: "mqtts://127.0.0.1:1", key: "/no/such/key.pem", logger: new MemoryLogger() }),
      /Cannot read the TLS file key="\/no\/such\/key\.pem"/,
    );
  });
  it("connect() refuses TLS files on a URL without TLS", async () => {
    await assert.rejects(
      MqttTransport.connect({ url: "mqtt://127.0.0.1:1?ca=/etc/hostname", logger: new MemoryLogger() }),
      (e: Error) => e instanceof TypeError && /ca="\/etc\/hostname".*need mqtts:\/\//.test(e.message),
    );
  });
});
