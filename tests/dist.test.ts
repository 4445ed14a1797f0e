/**
 * build.ts makes dist/: novalet as plain JavaScript for Node, with mqtt.js and kysely bundled.
 * These tests build into a folder of their own and run a service from it under plain Node,
 * on the memory transport and over MQTT.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { after, before, describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { buildDist, ENTRIES } from "../build.ts";
import { listPeriodicTasks, loadManager, openRegistry, RequestContext, rpcMethods, Service } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { mqttFixture } from "./mqtt_fixture.ts";

const root = fileURLToPath(new URL("..", import.meta.url));
const child = fileURLToPath(new URL("./fixtures/dist_child.mjs", import.meta.url));

function runChild(dir: string, url: string): Promise<Record<string, unknown>> {
  return new Promise((resolve, reject) => {
    // `node` itself, also when the suite runs under Deno: the build is for Node.
    execFile("node", [child, dir, url], { timeout: 30_000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`${err.message}\n${stderr}`));
      resolve(JSON.parse(stdout.trim().split("\n").at(-1)!));
    });
  });
}

describe("dist: novalet built into plain JavaScript for Node (build.ts)", () => {
  let out: string;
  let files: string[];
  let mqtt: Awaited<ReturnType<typeof mqttFixture>>;

  before(async () => {
    // Under node_modules, so that the external sql.js resolves as in an app that installed novalet.
    const cache = `${root}node_modules/.cache`;
    mkdirSync(cache, { recursive: true });
    out = mkdtempSync(`${cache}/novalet-test-dist-`);
    files = await buildDist(out);
    mqtt = await mqttFixture();
  });
  after(async () => {
    rmSync(out, { recursive: true, force: true });
    await mqtt?.close?.();
  });

  it("writes one module per entry point, bundling mqtt.js and kysely but not sql.js", () => {
    for (const entry of ENTRIES) {
      const js = `${out}/${entry.replace(/\.ts$/, ".js")}`;
      assert.ok(existsSync(js), `${js} is missing (built: ${files.join(", ")})`);
    }
    const mqttJs = readFileSync(`${out}/transports/mqtt.js`, "utf8");
    assert.doesNotMatch(mqttJs, /from "mqtt"/, "mqtt.js is bundled, not imported");
    const registryJs = readFileSync(`${out}/registry/sql.js`, "utf8");
    assert.doesNotMatch(registryJs, /from "kysely"/, "kysely is bundled, not imported");
    assert.match(registryJs, /import\("sql.js"\)/, "sql.js stays external (it finds its .wasm beside itself)");
  });

  it("runs a service and answers calls and errors under plain Node on the memory transport", async () => {
    const seen = await runChild(out, "memory://");
    assert.deepEqual(seen, {
      sum: 5,
      remote: true,
      type: "NotFound",
      message: "no item x",
      services: ["h1"],
      tsx: false,
      misnamed: [],
    });
  });

  it("loadManager() from the sources accepts a manager extending the Manager of dist/index.js, and serves it", async () => {
    // As `novalet serve` (the sources, through tsx) loads a manager whose file imports "novalet" (dist).
    writeFileSync(
      `${out}/dist_manager.mjs`,
      `import { Manager, periodicTask } from "./index.js";
export class DistShop extends Manager {
  add(_ctx, { a, b }) { return a + b; }
  tick(_ctx) {}
}
periodicTask({ spacing: 7 })(DistShop.prototype, "tick");
`,
    );
    const cls = await loadManager(`${out}/dist_manager.mjs#DistShop`);
    const registry = await openRegistry("sqljs::memory:");
    const transport = new MemoryTransport(new MemoryHub());
    const svc = Service.create({ host: "h1", topic: "shop", manager: cls, transport, registry });
    try {
      await svc.start();
      assert.deepEqual(listPeriodicTasks(svc.manager), [{ name: "tick", spacing: 7, runImmediately: true }]);
      assert.deepEqual([...rpcMethods(svc.manager).keys()], ["add"]);
      const sum = await svc.rpc.call(new RequestContext(), "shop", { method: "add", args: { a: 2, b: 3 } });
      assert.equal(sum, 5);
      // An instance made from the dist class is accepted as a manager too.
      const svc2 = Service.create({ host: "h2", topic: "shop", manager: new cls(), transport, registry });
      await svc2.start();
      await svc2.stop();
    } finally {
      await svc.stop();
      await transport.close();
      await registry.close();
    }
  });

  it("runs a service over MQTT from the build (the transport chunk is loaded on demand)", async () => {
    // The embedded broker speaks MQTT 3.1.1 without shared subscriptions: say so in the URL.
    const url = mqtt.options().protocolVersion === 4 ? `${mqtt.url}?protocol_version=4&shared=false` : mqtt.url;
    const seen = await runChild(out, url);
    assert.equal(seen.sum, 5);
    assert.equal(seen.type, "NotFound");
    assert.equal(seen.remote, true);
  });
});
