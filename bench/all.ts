/**
 * `npm run bench`: run every benchmark, each in its own process, print their tables and write
 * them to bench/results/latest.md.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import process from "node:process";

const here = new URL(".", import.meta.url);
const parts = [
  `# novalet benchmarks\n\n${new Date().toISOString()}, node ${process.version}, ${cpus().length} × ${
    cpus()[0]?.model ?? "cpu"
  }\n`,
];
for (const name of ["memory", "mqtt", "registry", "conductor", "startup", "flood", "presence", "signed", "crypto"]) {
  console.error(`--- bench/${name}.ts`);
  const out = execFileSync(process.execPath, ["--expose-gc", "--import", "tsx", new URL(`${name}.ts`, here).pathname], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
    maxBuffer: 64 * 1024 * 1024,
  });
  process.stdout.write(out + "\n");
  parts.push(`## bench/${name}.ts\n\n${out.trim()}\n`);
}
mkdirSync(new URL("results/", here), { recursive: true });
writeFileSync(new URL("results/latest.md", here), parts.join("\n"));
console.error("wrote bench/results/latest.md");
