/**
 * Build dist/: plain JavaScript for Node (and Deno from npm), one ES module per entry point with
 * the code they share split into chunks, mqtt.js and kysely bundled in, with source maps; and with
 * `--declarations`, the `.d.ts` files `tsc -p tsconfig.build.json` emits, their `.ts` import
 * specifiers rewritten to `.js` (tsc keeps them as written) so that a consumer needs neither
 * `allowImportingTsExtensions` nor our sources. `npm run build` (run by `npm pack`) does both.
 *
 * Why bundle the dependencies: Node keeps a lot per loaded module. kysely is 280 ES modules,
 * mqtt.js with its dependencies some 400 CommonJS files; loaded as such they add ~17 and ~18 MB of
 * RSS to a process, bundled ~3 and ~6 MB (measured on Node 20). On a device that is the
 * difference that matters. sql.js (one file that finds its .wasm next to itself), pg and aedes
 * stay external.
 *
 *   tsx build.ts [--declarations] [OUTDIR] [EXTRA_ENTRY...]     (bench/startup.ts adds its child to measure a bundle)
 */
import { execFileSync } from "node:child_process";
import { readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join, resolve } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { build } from "esbuild";

export const ENTRIES = [
  "index.ts",
  "mod.ts",
  "open.ts",
  "keys.ts",
  "transports/memory.ts",
  "transports/memory-faults.ts",
  "transports/mqtt.ts",
  "transports/broker.ts",
  "registry/sql.ts",
  "registry/conductor.ts",
];

/** Build the entries (plus `extra`) into `outdir`; resolves with the files written. */
export async function buildDist(outdir: string, extra: string[] = []): Promise<string[]> {
  const root = fileURLToPath(new URL(".", import.meta.url));
  rmSync(resolve(root, outdir), { recursive: true, force: true }); // no chunks of an earlier build
  const result = await build({
    absWorkingDir: root,
    entryPoints: [...ENTRIES, ...extra],
    outdir,
    outbase: ".",
    bundle: true,
    splitting: true,
    format: "esm",
    platform: "node",
    target: "node20",
    external: ["sql.js", "pg", "aedes"],
    // V8 keeps every module's source text in the heap, as two bytes per character if one
    // character (in a comment, say) is not Latin-1: 1.8 MB for mqtt.js and its helpers as they
    // are. Whitespace and comments go; names stay, so stack traces still read.
    minifyWhitespace: true,
    minifySyntax: true,
    // Bundled CommonJS (mqtt.js and its helpers) calls require() for Node's built-ins.
    banner: {
      js: 'import { createRequire as __novaletRequire } from "node:module";\n' +
        "const require = __novaletRequire(import.meta.url);",
    },
    sourcemap: true,
    metafile: true,
    logLevel: "warning",
  });
  return Object.keys(result.metafile!.outputs);
}

/** Emit the declarations into `outdir` (tsconfig.build.json), `.ts` specifiers made `.js`. */
export function buildDeclarations(outdir: string): string[] {
  const root = fileURLToPath(new URL(".", import.meta.url));
  const tsc = resolve(root, "node_modules/typescript/bin/tsc");
  execFileSync(process.execPath, [tsc, "-p", "tsconfig.build.json", "--outDir", outdir], {
    cwd: root,
    stdio: "inherit",
  });
  const written: string[] = [];
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const path = join(dir, e.name);
      if (e.isDirectory()) walk(path);
      else if (e.name.endsWith(".d.ts")) {
        const text = readFileSync(path, "utf8");
        writeFileSync(path, text.replace(/(\bfrom\s+|\bimport\s*\(\s*)(["'])(\.{1,2}\/[^"']*?)\.ts\2/g, "$1$2$3.js$2"));
        written.push(path);
      }
    }
  };
  walk(resolve(root, outdir));
  return written;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const args = process.argv.slice(2);
  const declarations = args[0] === "--declarations";
  const [outdir = "dist", ...extra] = declarations ? args.slice(1) : args;
  const files = await buildDist(outdir, extra);
  const types = declarations ? buildDeclarations(outdir) : [];
  console.log(`built ${files.length} files and ${types.length} declarations into ${outdir}/`);
}
