/**
 * What one signing operation of keys.ts costs on this machine: back to back (warm); first thing
 * after the process slept 1 ms, as a call at c=1 waits for the broker; and after that sleep and a
 * JSON.parse of the same bytes, as a server reads a message before it checks the signature (so
 * what any code pays after a sleep is paid before the timing starts). JSON.parse is the reference.
 * A signed call makes 4 such operations (request signed and checked, reply signed and checked).
 *
 * Run: `npx tsx bench/crypto.ts` (SAMPLES=2000 per cell).
 */

import { Buffer } from "node:buffer";
import { createHmac, createSecretKey, generateKeyPairSync, hash, randomBytes, sign, verify } from "node:crypto";
import process from "node:process";

const SAMPLES = Number(process.env.SAMPLES ?? 2000);
const message = Buffer.from(
  JSON.stringify({
    v: 1,
    id: "4d3c2b1a-9f8e-8d7c-a6b5-000000000001",
    method: "add",
    args: { a: 1, b: 2 },
    context: { user_id: null, project_id: null, request_id: `req-${crypto.randomUUID()}`, is_admin: false, roles: [] },
    reply_to: "novalet/reply/device-7/4d3c2b1a-9f8e-8d7c-a6b5",
    deadline: Date.now(),
  }).padEnd(420, " "),
);
const text = message.toString();
const secret = createSecretKey(randomBytes(32));
const { privateKey, publicKey } = generateKeyPairSync("ed25519");
const signature = sign(null, message, privateKey);

const ops: [string, () => unknown][] = [
  ["JSON.parse (reference)", () => JSON.parse(text)],
  ["HMAC-SHA256 (createHmac)", () => createHmac("sha256", secret).update(message).digest()],
  ["SHA-256 alone (crypto.hash)", () => hash("sha256", message, "buffer")],
  ["Ed25519 sign", () => sign(null, message, privateKey)],
  ["Ed25519 verify", () => verify(null, message, publicKey, signature)],
];

/** Mean µs of `op`, each timed alone, `idleMs` of sleep (0: none) before each, and with `parse`
 * a JSON.parse of the message between the sleep and the timing. */
async function time(op: () => unknown, idleMs: number, parse = false): Promise<number> {
  let ns = 0n;
  for (let i = 0; i < SAMPLES; i++) {
    await new Promise((r) => idleMs ? setTimeout(r, idleMs) : setImmediate(r));
    if (parse) JSON.parse(text);
    const t = process.hrtime.bigint();
    op();
    ns += process.hrtime.bigint() - t;
  }
  return Number(ns / BigInt(SAMPLES)) / 1000;
}

const round = (us: number) => Math.round(us * 100) / 100;
const rows: { op: string; warmUs: number; afterIdleUs: number; afterIdleAndParseUs: number }[] = [];
for (const [name, op] of ops) {
  for (let i = 0; i < 20_000; i++) op(); // optimised before timing
  rows.push({
    op: name,
    warmUs: round(await time(op, 0)),
    afterIdleUs: round(await time(op, 1)),
    afterIdleAndParseUs: round(await time(op, 1, true)),
  });
}

console.log(`One operation over ${message.length} bytes, mean of ${SAMPLES} (node ${process.version})\n`);
console.log("| operation | warm µs | after 1 ms asleep µs | after 1 ms asleep and a JSON.parse µs |");
console.log("|---|---:|---:|---:|");
for (const r of rows) console.log(`| ${r.op} | ${r.warmUs} | ${r.afterIdleUs} | ${r.afterIdleAndParseUs} |`);
console.log(JSON.stringify({ bench: "crypto", samples: SAMPLES, bytes: message.length, rows }));
