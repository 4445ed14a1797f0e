/**
 * The shape of the code: the core (mod.ts) imports nothing but the platform, no module's imports
 * lead back to itself, and the core alone, without the plug-in wiring, says what is missing.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { describe, it } from "node:test";
import { fileURLToPath } from "node:url";
import { childCommand } from "./helpers.ts";

const root = fileURLToPath(new URL("..", import.meta.url));

/** The literal specifiers a module imports: static imports, re-exports and dynamic imports.
 * Comments are dropped where they start a line (doc comments hold example imports); a string
 * that holds comment marks stays. */
function importsOf(file: string): string[] {
  const text = readFileSync(file, "utf8")
    .replace(/^[ \t]*\/\*[\s\S]*?\*\//gm, "")
    .replace(/^[ \t]*\/\/.*$/gm, "");
  const found = [
    ...text.matchAll(/^\s*(?:import|export)\s[^;]*?\sfrom\s+["']([^"']+)["']/gm),
    ...text.matchAll(/^\s*import\s+["']([^"']+)["']/gm),
    ...text.matchAll(/\bimport\(\s*["'`]([^"'`$]+)["'`]\s*\)/g),
  ];
  return found.map((m) => m[1]!);
}

/** The project's module graph from `entries`: file → the project files it imports. */
function graph(entries: string[]): Map<string, string[]> {
  const g = new Map<string, string[]>();
  const visit = (file: string) => {
    if (g.has(file)) return;
    const deps = importsOf(join(root, file)).filter((s) => s.startsWith(".")).map((s) =>
      relative(root, join(root, dirname(file), s))
    );
    g.set(file, deps);
    deps.forEach(visit);
  };
  entries.forEach(visit);
  return g;
}

/** A cycle of the graph as a path (`a.ts → b.ts → a.ts`), or undefined. */
function findCycle(g: Map<string, string[]>): string | undefined {
  const state = new Map<string, "open" | "done">();
  const path: string[] = [];
  const dfs = (f: string): string | undefined => {
    if (state.get(f) === "done") return undefined;
    if (state.get(f) === "open") return [...path.slice(path.indexOf(f)), f].join(" → ");
    state.set(f, "open");
    path.push(f);
    for (const d of g.get(f) ?? []) {
      const c = dfs(d);
      if (c) return c;
    }
    path.pop();
    state.set(f, "done");
    return undefined;
  };
  for (const f of g.keys()) {
    const c = dfs(f);
    if (c) return c;
  }
  return undefined;
}

describe("layout: the core and its plug-ins", () => {
  it("mod.ts imports only node: modules", () => {
    const specs = importsOf(join(root, "mod.ts"));
    assert.ok(specs.length > 0, "the scan found mod.ts's imports");
    assert.deepEqual(specs.filter((s) => !s.startsWith("node:")), []);
  });

  it("no import cycle among the package's modules, static or dynamic, and none imports the package itself", () => {
    const g = graph(["index.ts", "cli.ts", "transports/broker.ts", "transports/memory-faults.ts"]);
    const all = ["mod.ts", "open.ts", "transports/memory.ts", "transports/mqtt.ts", "transports/mqtt-internals.ts"];
    for (const f of [...all, "keys.ts", "registry/sql.ts", "registry/pg-pool.ts", "registry/conductor.ts"]) {
      assert.ok(g.has(f), `${f} is reached`);
    }
    assert.equal(findCycle(g), undefined);
    for (const f of g.keys()) {
      const self = importsOf(join(root, f)).filter((s) => s === "novalet" || s.startsWith("novalet/"));
      assert.deepEqual(self, [], `${f} imports the package by its name`);
    }
  });

  it("the import scan sees through strings with comment marks and finds dynamic imports", () => {
    const sample = join(root, "tests/fixtures/import_sample.ts.txt");
    assert.deepEqual(importsOf(sample).sort(), ["./a.ts", "./b.ts", "./c.ts", "novalet/mod.ts"]);
  });

  it("the cycle check finds a cycle where there is one", () => {
    assert.equal(findCycle(new Map([["a", ["b"]], ["b", ["c"]], ["c", ["a"]]])), "a → b → c → a");
  });

  it("the core alone opens nothing from a URL, says how to get the opener, and uses one passed in", async () => {
    const [cmd, ...args] = childCommand(join(root, "tests/fixtures/core_alone.ts"));
    const out = await new Promise<string>((resolve, reject) =>
      execFile(cmd!, args, { cwd: root }, (e, o, err) => e ? reject(new Error(`${e.message}\n${err}`)) : resolve(o))
    );
    const [first, second] = out.trim().split("\n");
    assert.match(first!, /^TypeError: Cannot open a transport: no opener is installed; import novalet's package entry/);
    assert.deepEqual(JSON.parse(second!), { opened: ["memory://", "sqljs::memory:"], answer: "pong" });
  });
});
