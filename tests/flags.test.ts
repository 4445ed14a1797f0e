import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { hostname } from "node:os";
import { defaultFlags, openTransport, parseFlags } from "../index.ts";

describe("parseFlags()", () => {
  it("parseFlags() with nothing gives Nova's defaults", () => {
    const f = parseFlags([], {});
    assert.deepEqual(f, defaultFlags());
    assert.equal(f.reportInterval, 10);
    assert.equal(f.periodicInterval, 60);
    assert.equal(f.periodicFuzzyDelay, 60);
    assert.equal(f.serviceDownTime, 60);
    assert.equal(f.rpcResponseTimeout, 60);
    assert.equal(f.gracefulShutdownTimeout, 60);
    assert.equal(f.host, hostname());
    assert.equal(f.transportUrl, "memory://");
    assert.equal(f.registryUrl, "sqljs::memory:");
    assert.equal(f.prefix, "novalet");
  });

  it("parseFlags() reads --name=value, --name value, and NOVALET_* variables; argv wins", () => {
    const f = parseFlags(
      ["--report_interval=5", "--periodic_interval", "30", "--host=node-7.example", "--debug", "--log-format=json"],
      { NOVALET_REPORT_INTERVAL: "2", NOVALET_SERVICE_DOWN_TIME: "25", NOVALET_PREFIX: "site/a", PATH: "/bin" },
    );
    assert.equal(f.reportInterval, 5);
    assert.equal(f.periodicInterval, 30);
    assert.equal(f.serviceDownTime, 25);
    assert.equal(f.host, "node-7.example");
    assert.equal(f.prefix, "site/a");
    assert.equal(f.debug, true);
    assert.equal(f.logFormat, "json");
    assert.equal(parseFlags(["--debug", "--nodebug"]).debug, false);
  });

  it("parseFlags() reads --TOPIC_manager and NOVALET_TOPIC_MANAGER", () => {
    const f = parseFlags(["--compute_manager=./c.ts#Compute"], { NOVALET_NETWORK_MANAGER: "./n.ts#Net" });
    assert.deepEqual(f.managers, { compute: "./c.ts#Compute", network: "./n.ts#Net" });
  });

  it("parseFlags() refuses unknown flags and stray arguments, naming them", () => {
    assert.throws(() => parseFlags(["--report_intervall=5"]), /Unknown flag --report_intervall/);
    assert.throws(() => parseFlags(["serve"]), /Unexpected argument "serve"/);
    assert.throws(() => parseFlags(["--host"]), /--host needs a value/);
  });

  it("parseFlags() refuses bad values with the flag and the value", () => {
    const bad: [string[], RegExp][] = [
      [["--report_interval=0"], /--report_interval="0": must be a positive number/],
      [["--report_interval=ten"], /--report_interval="ten"/],
      [["--periodic_fuzzy_delay=-1"], /non-negative/],
      [["--transport_url=amqp://x"], /--transport_url="amqp:\/\/x": must start with memory:\/\//],
      [["--registry_url=mysql://u:secret@h/d"], /must start with sqljs:/],
      [["--registry_url=postgres:db"], /--registry_url="postgres:db": must start with sqljs:, postgres:\/\//],
      [["--registry_url=SQLJS::memory:"], /must start with sqljs:/],
      [["--transport_url=MQTT://h:1"], /must start with memory:\/\//],
      [["--transport_url=memory:"], /must start with memory:\/\//],
      [["--log_format=xml"], /one of text, json/],
      [["--host=a/b"], /Invalid host "a\/b"/],
      [["--prefix=a/+/b"], /Invalid prefix/],
      [["--debug=maybe"], /true or false/],
    ];
    for (const [argv, re] of bad) assert.throws(() => parseFlags(argv), re, argv.join(" "));
    assert.throws(
      () => parseFlags(["--registry_url=mysql://u:secret@h/d"]),
      (e: Error) => !e.message.includes("secret"),
    );
    assert.throws(() => parseFlags([], { NOVALET_REPORT_INTERVAL: "x" }), /report_interval/);
  });

  it("parseFlags() refuses a service_down_time not greater than report_interval", () => {
    assert.throws(
      () => parseFlags(["--report_interval=60"]),
      /--service_down_time=60: must be greater than --report_interval=60/,
    );
    assert.throws(() => parseFlags(["--service_down_time=5", "--report_interval=10"]), RangeError);
    assert.equal(parseFlags(["--service_down_time=11", "--report_interval=10"]).serviceDownTime, 11);
  });
});

describe("openTransport()", () => {
  it("openTransport() refuses a URL it does not know", async () => {
    await assert.rejects(openTransport("amqp://localhost"), /Unsupported transport URL "amqp:\/\/localhost"/);
  });
  it("openTransport() of an unreachable broker names it and the cause", async () => {
    await assert.rejects(
      openTransport("mqtt://127.0.0.1:1"),
      /Cannot connect to MQTT broker "mqtt:\/\/127\.0\.0\.1:1": .*ECONNREFUSED/,
    );
  });
});
