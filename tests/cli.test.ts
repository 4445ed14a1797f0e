import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { openSqlRegistry } from "../registry/sql.ts";
import { EmbeddedBroker } from "../transports/broker.ts";
import { childCommand, uniquePrefix, waitFor } from "./helpers.ts";
import { MQTT_URL } from "./mqtt_fixture.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const env = { ...process.env, NOVALET_LOG_LEVEL: "info" };

interface Result {
  code: number | null;
  stdout: string;
  stderr: string;
}

function cli(args: string[], script = CLI): Promise<Result> {
  const [cmd, ...rest] = script.endsWith(".mjs") ? [process.execPath, script, ...args] : childCommand(script, args);
  const child = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env });
  let stdout = "";
  let stderr = "";
  child.stdout.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr.setEncoding("utf8").on("data", (d: string) => (stderr += d));
  return new Promise((resolve) => child.on("close", (code) => resolve({ code, stdout, stderr })));
}

const dir = mkdtempSync(join(tmpdir(), "novalet-cli-"));
after(() => rmSync(dir, { recursive: true, force: true }));

describe("novalet CLI", () => {
  it("novalet --help prints the usage and exits 0", async () => {
    const r = await cli(["--help"]);
    assert.equal(r.code, 0);
    assert.match(r.stdout, /Usage:\n\s+novalet serve SPEC/);
  });

  it(
    "the npm bin entry runs the CLI under Node",
    { skip: "Deno" in globalThis ? "the bin shim is for Node" : false },
    async () => {
      const r = await cli(["--help"], new URL("../bin/novalet.mjs", import.meta.url).pathname);
      assert.equal(r.code, 0);
      assert.match(r.stdout, /novalet services list/);
    },
  );

  it("bad arguments print the usage and exit 2, saying what was wrong", async () => {
    const cases: [string[], RegExp][] = [
      [[], /No command given/],
      [["launch"], /Unknown command "launch"/],
      [["services", "list", "--report_intervall=3"], /Unknown flag --report_intervall/],
      [["services", "frobnicate"], /Unknown services action "frobnicate"/],
      [["services", "disable", "abc"], /Invalid service ID "abc"/],
      [["services", "enable"], /Wrong arguments for "services enable"/],
      [["call", "compute"], /"call" needs ADDRESS METHOD/],
      [["call", "compute", "run", "{not json"], /Invalid JSON args/],
      [["call", "compute", "run", "[1]"], /must be an object/],
      [["call", "compute/x", "run"], /Invalid topic "compute\/x"/],
      [["call", "compute", "run", "--timeout=0"], /Invalid --timeout/],
      [["serve"], /"serve" needs at least one SPEC/],
      [["serve", "./tests/fixtures/managers.ts#Nope"], /"Nope" is not an exported Manager subclass/],
      [["call", "c", "m", "--transport_url=mqtt://[::1"], /Invalid --transport_url="mqtt:\/\/\[::1": not a valid URL/],
      [["call", "c", "m", "--transport_url=mqtt://h:99999"], /Invalid --transport_url="mqtt:\/\/h:99999"/],
      [["call", "c", "m", "--transport_url=mqtt://"], /Invalid --transport_url="mqtt:\/\/": names no host/],
      [["services", "list", "--registry_url=postgres://[bad"], /Invalid --registry_url="postgres:\/\/\[bad"/],
      [["services", "list", "--periodic_interval=4294967296"], /Invalid --periodic_interval=.*at most 4294967295/],
    ];
    for (const [args, re] of cases) {
      const r = await cli(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, re, args.join(" "));
      if (args.length) assert.match(r.stderr, /Usage:/);
    }
  });

  it("services list, disable, enable, force-down and delete work on a registry file", async () => {
    const path = join(dir, "admin.db");
    const reg = await openSqlRegistry(`sqljs:${path}`);
    const a = await reg.register({ host: "node1", binary: "nova-compute", topic: "compute" });
    await reg.reportState(a.id);
    const b = await reg.register({ host: "node2", binary: "nova-network", topic: "network" });
    await reg.close();
    const url = `--registry_url=sqljs:${path}`;

    const list = await cli(["services", "list", url]);
    assert.equal(list.code, 0, list.stderr);
    const lines = list.stdout.trim().split("\n");
    assert.match(
      lines[1]!,
      /\| ID \| Binary\s+\| Host\s+\| Topic\s+\| Status\s+\| State \| Updated At\s+\| Disabled Reason \|/,
    );
    assert.match(list.stdout, new RegExp(`\\| ${a.id}\\s+\\| nova-compute \\| node1 \\| compute \\| enabled \\| up `));

    const off = await cli(["services", "disable", String(a.id), "--reason=kernel upgrade", url]);
    assert.equal(off.code, 0, off.stderr);
    assert.match(off.stdout, /disabled \| up\s+\|.*\| kernel upgrade\s+\|/);

    const down = await cli(["services", "force-down", String(a.id), url, "--json"]);
    const [row] = JSON.parse(down.stdout);
    assert.equal(row.forcedDown, true);
    assert.equal(row.state, "down");
    assert.equal(row.status, "disabled");

    assert.equal((await cli(["services", "force-down", String(a.id), "--unset", url])).code, 0);
    const on = await cli(["services", "enable", String(a.id), url, "--json"]);
    assert.equal(JSON.parse(on.stdout)[0].status, "enabled");

    const filtered = JSON.parse((await cli(["services", "list", "--topic=network", "--json", url])).stdout);
    assert.deepEqual(filtered.map((r: { host: string }) => r.host), ["node2"]);

    assert.equal((await cli(["services", "delete", String(b.id), url])).code, 0);
    const gone = await cli(["services", "delete", String(b.id), url]);
    assert.equal(gone.code, 1);
    assert.match(gone.stderr, new RegExp(`Service ${b.id} not found`));
  });

  it("call over the memory transport fails with a hint, exit 1", async () => {
    const r = await cli(["call", "compute", "run", "--timeout=2"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /DeliveryError: No subscriber .*memory transport only reaches services in this process/);
  });

  describe("serve, call and cast between processes over MQTT", () => {
    let broker: EmbeddedBroker | undefined;
    let url: string;
    before(async () => {
      if (MQTT_URL) url = MQTT_URL;
      else {
        broker = await EmbeddedBroker.start();
        url = `${broker.url}?protocol_version=4&shared=false`;
      }
    });
    after(async () => await broker?.close());

    it("novalet serve answers novalet call and cast, and stops on SIGTERM", async () => {
      const path = join(dir, "served.db");
      const prefix = `--prefix=${uniquePrefix("cli")}`;
      const common = [`--transport_url=${url}`, prefix];
      const [cmd, ...args] = childCommand(CLI, [
        "serve",
        "./tests/fixtures/managers.ts#EchoManager",
        "--host=cli-host",
        "--periodic_fuzzy_delay=0",
        `--registry_url=sqljs:${path}`,
        ...common,
      ]);
      const server = spawn(cmd!, args, { stdio: ["ignore", "pipe", "pipe"], env });
      let log = "";
      server.stderr.setEncoding("utf8").on("data", (d: string) => (log += d));
      server.stdout.resume();
      const exited = new Promise<number | null>((r) => server.on("close", (code) => r(code)));
      try {
        await waitFor(() => /Serving echo\.cli-host \(echo\)/.test(log), "the server to be ready", 20_000);
        const call = await cli(["call", "echo.cli-host", "echo", '{"x":1}', ...common]);
        assert.equal(call.code, 0, call.stderr);
        assert.deepEqual(JSON.parse(call.stdout), { host: "cli-host", args: { x: 1 } });
        const cast = await cli(["cast", "echo", "echo", "{}", ...common]);
        assert.equal(cast.code, 0, cast.stderr);
        const bad = await cli(["call", "echo", "reboot", ...common, "--timeout=5"]);
        assert.equal(bad.code, 1);
        assert.match(bad.stderr, /NoSuchMethod: No such method "reboot"/);
      } finally {
        process.kill(server.pid!, "SIGTERM");
      }
      const code = await exited;
      assert.ok(code === 0 || code === null, `exit ${code}: ${log}`); // Deno reports null for a signalled child
      const list = await cli(["services", "list", "--json", `--registry_url=sqljs:${path}`]);
      const rows = JSON.parse(list.stdout);
      assert.equal(rows.length, 1);
      assert.equal(rows[0].binary, "nova-echo");
      assert.equal(rows[0].host, "cli-host");
      assert.ok(rows[0].reportCount >= 1);
    });
  });
});
