import { describe, it } from "node:test";
import assert from "node:assert/strict";
import { ConsoleLogger, type LogFields, type Logger, withFields } from "../index.ts";

/** Run `fn` with console.error captured. */
function captured(fn: () => void): string[] {
  const lines: string[] = [];
  const original = console.error;
  console.error = (line: string) => void lines.push(line);
  try {
    fn();
  } finally {
    console.error = original;
  }
  return lines;
}

describe("logging", () => {
  it("ConsoleLogger writes readable lines with key=value fields, at or above its level", () => {
    const lines = captured(() => {
      const log = new ConsoleLogger({ level: "info" });
      log.debug("hidden");
      log.info("Service started", { service: "compute.node1", port: 1883 });
      log.error("Boom", { error: new Error("disk full") });
    });
    assert.equal(lines.length, 2);
    assert.match(lines[0]!, /^\d\d:\d\d:\d\d\.\d{3} INFO {2}Service started service=compute\.node1 port=1883$/);
    assert.match(lines[1]!, /ERROR Boom error="disk full"/);
  });

  it("ConsoleLogger in json mode writes one JSON object a line, errors as name and message", () => {
    const lines = captured(() => {
      new ConsoleLogger({ format: "json" }).child({ service: "s.h" }).warn("Slow", {
        ms: 12,
        error: new TypeError("x"),
      });
    });
    const obj = JSON.parse(lines[0]!);
    assert.equal(obj.level, "warn");
    assert.equal(obj.msg, "Slow");
    assert.equal(obj.service, "s.h");
    assert.equal(obj.ms, 12);
    assert.deepEqual(obj.error, { name: "TypeError", message: "x" });
    assert.ok(!Number.isNaN(Date.parse(obj.time)));
  });

  it("withFields() adds fields to every line of a logger of the user's own", () => {
    const seen: [string, string, LogFields | undefined][] = [];
    const mine: Logger = {
      debug: (m, f) => void seen.push(["debug", m, f]),
      info: (m, f) => void seen.push(["info", m, f]),
      warn: (m, f) => void seen.push(["warn", m, f]),
      error: (m, f) => void seen.push(["error", m, f]),
    };
    withFields(mine, { service: "a.b" }).warn("w", { n: 1 });
    assert.deepEqual(seen, [["warn", "w", { service: "a.b", n: 1 }]]);
  });
});
