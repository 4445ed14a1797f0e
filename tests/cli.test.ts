import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
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

/** Write `value` as JSON into the test's folder; its path. */
function writeJson(name: string, value: unknown): string {
  const path = join(dir, name);
  writeFileSync(path, JSON.stringify(value));
  return path;
}

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

  it("novalet --version prints the version in package.json", async () => {
    const pkg = JSON.parse(readFileSync(new URL("../package.json", import.meta.url), "utf8"));
    const r = await cli(["--version"]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, `${pkg.version}\n`);
  });

  it("novalet help COMMAND and novalet COMMAND --help print that command's usage, exit 0", async () => {
    const own: Record<string, RegExp> = {
      serve: /novalet serve SPEC\.\.\./,
      call: /novalet call ADDRESS METHOD/,
      cast: /novalet cast ADDRESS METHOD \[JSON\] \[--fanout\]/,
      services: /novalet services list .*\n\s+novalet services enable/,
    };
    for (const [command, re] of Object.entries(own)) {
      for (const args of [["help", command], [command, "--help"], [command, "list", "-h"]]) {
        const r = await cli(args);
        assert.equal(r.code, 0, `${args.join(" ")}: ${r.stderr}`);
        assert.match(r.stdout, re, args.join(" "));
        assert.match(r.stdout, /--max_held_bytes=/, "the flags too");
        for (const [other, otherRe] of Object.entries(own)) {
          if (other !== command) assert.doesNotMatch(r.stdout, otherRe, `${args.join(" ")} shows only ${command}`);
        }
      }
    }
    const all = await cli(["help"]);
    assert.equal(all.code, 0);
    assert.match(all.stdout, /novalet serve SPEC[^]*novalet cast[^]*novalet services delete[^]*novalet --version/);
  });

  it("bad arguments print one line and exit 2, saying what was wrong and pointing at --help", async () => {
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
      [["help", "launch"], /Unknown command "launch" for help/],
      [["cast", "compute.node1", "ping", "--fanout"], /--fanout sends to every server of a topic: "compute.node1"/],
      [["call", "compute", "ping", "--fanout"], /--fanout works with "cast" only/],
    ];
    for (const [args, re] of cases) {
      const r = await cli(args);
      assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
      assert.match(r.stderr, re, args.join(" "));
      assert.doesNotMatch(r.stderr, /Usage:/, args.join(" "));
      assert.equal(r.stderr.trimEnd().split("\n").length, 1, `one line: ${r.stderr}`);
      const command = ["serve", "call", "cast", "services"].includes(args[0]!) ? `${args[0]} ` : "";
      assert.ok(r.stderr.trimEnd().endsWith(`(see novalet ${command}--help)`), r.stderr);
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

  it("services commands refuse a sqljs file that does not exist, and create none", async () => {
    const path = join(dir, "typo.db");
    for (const args of [["services", "list"], ["services", "disable", "1"], ["services", "delete", "1"]]) {
      const r = await cli([...args, `--registry_url=sqljs:${path}`]);
      assert.equal(r.code, 1, `${args.join(" ")}: ${r.stderr}`);
      assert.equal(
        r.stderr,
        `novalet: Cannot open the registry ${
          JSON.stringify(path)
        }: the file does not exist (novalet serve creates it)\n`,
      );
    }
    assert.equal(existsSync(path), false);
  });

  it("serve on the memory transport warns that only this process can reach it", async () => {
    const [cmd, ...args] = childCommand(CLI, ["serve", "./tests/fixtures/managers.ts#EchoManager", "--host=mem-host"]);
    const server = spawn(cmd!, args, { stdio: ["ignore", "pipe", "pipe"], env });
    let log = "";
    server.stderr.setEncoding("utf8").on("data", (d: string) => (log += d));
    server.stdout.resume();
    const exited = new Promise((r) => server.on("close", r));
    try {
      await waitFor(() => /Serving echo\.mem-host/.test(log), "the server to be ready", 20_000);
      assert.match(log, /WARN.*memory:\/\/ transport: only this process can reach .*--transport_url=mqtt:\/\//);
    } finally {
      process.kill(server.pid!, "SIGTERM");
    }
    await exited;
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

    it("cast --fanout reaches every server of the topic; call prints a remote error's type, message and data", async () => {
      const common = [`--transport_url=${url}`, `--prefix=${uniquePrefix("fleet")}`];
      const servers = ["fleet-a", "fleet-b"].map((host) => {
        const [cmd, ...args] = childCommand(CLI, [
          "serve",
          "./tests/fixtures/cli_managers.ts#FleetManager",
          `--host=${host}`,
          "--periodic_fuzzy_delay=0",
          ...common,
        ]);
        const child = spawn(cmd!, args, { stdio: ["ignore", "pipe", "pipe"], env });
        const out = { log: "", stdout: "", exited: new Promise((r) => child.on("close", r)), child };
        child.stderr.setEncoding("utf8").on("data", (d: string) => (out.log += d));
        child.stdout.setEncoding("utf8").on("data", (d: string) => (out.stdout += d));
        return out;
      });
      try {
        for (const s of servers) await waitFor(() => /Serving fleet\./.test(s.log), "the servers to be ready", 20_000);
        const cast = await cli(["cast", "fleet", "ping", '{"n":7}', "--fanout", ...common]);
        assert.equal(cast.code, 0, cast.stderr);
        await waitFor(() => servers.every((s) => /PING 7 at fleet-/.test(s.stdout)), "both servers to get the fanout");
        assert.match(servers[0]!.stdout, /PING 7 at fleet-a/);
        assert.match(servers[1]!.stdout, /PING 7 at fleet-b/);

        const r = await cli(["call", "fleet.fleet-a", "refuse", '{"id":"i-9"}', "--timeout=10", ...common]);
        assert.equal(r.code, 1);
        assert.equal(r.stdout, "");
        assert.match(r.stderr, /failed: InstanceLocked: Instance i-9 is locked\n/);
        assert.match(r.stderr, /\ndata: \{"id":"i-9","locked":true\}\n$/);
      } finally {
        for (const s of servers) process.kill(s.child.pid!, "SIGTERM");
      }
      await Promise.all(servers.map((s) => s.exited));
    });

    it("novalet conductor serves a sqljs: file to a fleet of serve processes and to services list, while they run", async () => {
      const path = join(dir, `${uniquePrefix("cond")}.db`);
      const common = [`--transport_url=${url}`, `--prefix=${uniquePrefix("cond")}`];
      const spawnCli = (args: string[]) => {
        const [cmd, ...rest] = childCommand(CLI, [...args, ...common]);
        const child = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env });
        const out = { log: "", exited: new Promise((r) => child.on("close", r)), child };
        child.stderr.setEncoding("utf8").on("data", (d: string) => (out.log += d));
        child.stdout.resume();
        return out;
      };
      const conductor = spawnCli(["conductor", `--registry_url=sqljs:${path}`, "--host=cond-host"]);
      const fleet: typeof conductor[] = [];
      try {
        await waitFor(() => /Serving the registry/.test(conductor.log), "the conductor", 20_000);
        for (const host of ["dev-a", "dev-b"]) {
          fleet.push(spawnCli([
            "serve",
            "./tests/fixtures/cli_managers.ts#FleetManager",
            `--host=${host}`,
            "--registry_url=conductor:",
            "--report_interval=1",
            "--service_down_time=3",
          ]));
        }
        for (const s of fleet) await waitFor(() => /Serving fleet\./.test(s.log), "the fleet", 20_000);
        const r = await cli(["services", "list", "--json", "--registry_url=conductor:", ...common]);
        assert.equal(r.code, 0, r.stderr);
        const rows = JSON.parse(r.stdout) as { id: number; host: string; binary: string; state: string }[];
        const byHost = new Map(rows.map((row) => [row.host, row]));
        assert.equal(byHost.get("dev-a")?.state, "up");
        assert.equal(byHost.get("dev-b")?.state, "up");
        assert.deepEqual(
          rows.filter((x) => x.host === "cond-host").map((x) => x.binary).sort(),
          ["nova-conductor", "nova-conductor-admin"],
          "the conductor is listed too",
        );
        const edit = await cli([
          "services",
          "disable",
          String(rows.find((x) => x.host === "dev-a")!.id),
          "--reason=test",
          "--registry_url=conductor:",
          ...common,
        ]);
        assert.equal(edit.code, 0, edit.stderr);
        assert.match(edit.stdout, /disabled/);
        const second = await cli(["services", "list", `--registry_url=sqljs:${path}`]);
        assert.equal(second.code, 1, "the file is the conductor's");
        assert.match(second.stderr, /is in use by process \d+ \(".*conductor --registry_url=sqljs:/);
        const rival = await cli(["conductor", `--registry_url=sqljs:${path}`, "--host=cond-2", ...common]);
        assert.equal(rival.code, 1, "a second conductor on the same file fails");
        assert.match(rival.stderr, /is in use by process \d+ \(".*conductor --registry_url=sqljs:.*--host=cond-host/);
      } finally {
        for (const s of [...fleet, conductor]) process.kill(s.child.pid!, "SIGTERM");
      }
      await Promise.all([...fleet, conductor].map((s) => s.exited));
      assert.equal(existsSync(`${path}.lock`), false, "the conductor released the file on SIGTERM");
    });

    it("with --keys, the CLI's admin commands sign with an operator's key: a device's key is refused", async () => {
      const made = await Promise.all([
        cli(["keys", "new", "fleet"]),
        cli(["keys", "new", "ops", "--type=ed25519", "--roles=admin", "--serve="]),
      ]);
      for (const m of made) assert.equal(m.code, 0, m.stderr);
      const [fleet, ops] = made.map((m) => JSON.parse(m.stdout).keys[0]);
      const shown = await cli(["keys", "public", writeJson("ops-own.json", { sign: "ops", keys: [ops, fleet] })]);
      assert.equal(shown.code, 0, shown.stderr);
      assert.match(shown.stderr, /left out hmac key "fleet"/);
      const opsPublic = JSON.parse(shown.stdout).keys;
      assert.equal(opsPublic.length, 1);
      assert.equal(opsPublic[0].private, undefined, "no private part");
      // A device's file: the fleet key and the operator's public half; the operator's: both whole.
      const joined = async (name: string, args: string[]) => {
        const r = await cli(["keys", "join", ...args]);
        assert.equal(r.code, 0, r.stderr);
        return writeJson(name, JSON.parse(r.stdout));
      };
      const fleetOnly = writeJson("fleet-only.json", { sign: "fleet", keys: [fleet] });
      const fleetFile = await joined("fleet.json", [fleetOnly, writeJson("ops-public.json", { keys: opsPublic })]);
      const opsFile = await joined("ops.json", [
        fleetOnly,
        writeJson("ops-own-2.json", { sign: "ops", keys: [ops] }),
        "--sign=ops",
      ]);
      const clash = await cli([
        "keys",
        "join",
        fleetOnly,
        writeJson("other-fleet.json", { keys: [{ ...ops, id: "fleet" }] }),
      ]);
      assert.equal(clash.code, 2);
      assert.match(clash.stderr, /Key "fleet" differs between the files/);
      const path = join(dir, `${uniquePrefix("keys")}.db`);
      const common = [`--transport_url=${url}`, `--prefix=${uniquePrefix("keys")}`];
      const [cmd, ...rest] = childCommand(CLI, [
        "conductor",
        `--registry_url=sqljs:${path}`,
        "--host=kc",
        `--keys=${fleetFile}`,
        ...common,
      ]);
      const conductor = spawn(cmd!, rest, { stdio: ["ignore", "pipe", "pipe"], env });
      let log = "";
      conductor.stderr.setEncoding("utf8").on("data", (d: string) => (log += d));
      conductor.stdout.resume();
      const exited = new Promise((r) => conductor.on("close", r));
      try {
        await waitFor(() => /Serving the registry/.test(log), "the conductor", 20_000);
        const list = await cli([
          "services",
          "list",
          "--json",
          "--registry_url=conductor:",
          `--keys=${fleetFile}`,
          ...common,
        ]);
        assert.equal(list.code, 0, list.stderr);
        const id = String((JSON.parse(list.stdout) as { id: number; binary: string }[])[0]!.id);
        // A call signed with a key that may not claim admin goes with a plain context.
        const called = await cli(["call", "conductor", "get", `{"id":${id}}`, `--keys=${fleetFile}`, ...common]);
        assert.equal(called.code, 0, called.stderr);
        assert.equal(JSON.parse(called.stdout).id, Number(id));
        const asDevice = await cli([
          "services",
          "disable",
          id,
          "--registry_url=conductor:",
          `--keys=${fleetFile}`,
          ...common,
        ]);
        assert.equal(asDevice.code, 1);
        assert.match(asDevice.stderr, /Key "fleet" may not assert is_admin/);
        const asOperator = await cli([
          "services",
          "disable",
          id,
          "--reason=keys",
          "--registry_url=conductor:",
          `--keys=${opsFile}`,
          ...common,
        ]);
        assert.equal(asOperator.code, 0, asOperator.stderr);
        assert.match(asOperator.stdout, /disabled/);
      } finally {
        conductor.kill("SIGTERM");
      }
      await exited;
    });

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
