/**
 * 04 — keys: signed envelopes (docs/keys.md). A compute service and two clients in one process, on
 * the memory transport: the fleet signs with a shared HMAC key that may not claim admin, an
 * operator with an Ed25519 key that may. The fleet's client cannot reboot everything; a hand-made
 * request claiming admin is dropped, unanswered; the operator's goes through.
 *
 * Run: `npx tsx examples/04_keys.ts` or `deno run -A examples/04_keys.ts`.
 */

import { Manager, openRegistry, RequestContext, requires, Rpc, Service } from "../index.ts";
import { generateKey, publicPart, SignedCodec } from "../keys.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";

// What `npx novalet keys new` prints; real ones live in files given with --keys=FILE.
const fleet = generateKey("fleet", "hmac"); // may call and serve every topic, assert no role
const ops = generateKey("ops-alice", "ed25519", { roles: ["admin"], serve: [] });

class ComputeManager extends Manager {
  status(_ctx: RequestContext) {
    return `${this.host}: 3 instances running`;
  }
  @requires("admin")
  rebootAll(ctx: RequestContext) {
    return `${this.host}: rebooting everything for ${ctx.userId}`;
  }
}

const hub = new MemoryHub();
const registry = await openRegistry("sqljs::memory:");
// The fleet holds the operator's public half only: it checks her requests, it cannot make one.
const compute = Service.create({
  host: "node1",
  topic: "compute",
  manager: ComputeManager,
  transport: new MemoryTransport(hub),
  registry,
  codec: new SignedCodec({ sign: "fleet", keys: [fleet, publicPart(ops)] }),
});
await compute.start();

const device = new Rpc(new MemoryTransport(hub), { codec: new SignedCodec({ sign: "fleet", keys: [fleet] }) });
const operator = new Rpc(new MemoryTransport(hub), {
  codec: new SignedCodec({ sign: "ops-alice", keys: [fleet, ops] }),
});

console.log(await device.call(new RequestContext({ userId: "sensor-7" }), "compute.node1", { method: "status" }));
try {
  await device.call(RequestContext.admin({ userId: "sensor-7" }), "compute.node1", { method: "rebootAll" });
} catch (e) {
  console.log(`device: ${(e as Error).name}: ${(e as Error).message}`);
}

// A peer without the key publishes a request claiming admin: dropped, not answered, counted.
const raw = new MemoryTransport(hub);
await raw.publish(
  "novalet/rpc/compute/node1",
  new TextEncoder().encode('{"v":1,"id":"x1","method":"rebootAll","args":{},"context":{"is_admin":true}}'),
);
await new Promise((r) => setTimeout(r, 50));
console.log(`forged requests refused so far: ${JSON.stringify((compute.codec as SignedCodec).refused)}`);

console.log(
  await operator.call(RequestContext.admin({ userId: "alice" }), "compute.node1", { method: "rebootAll" }),
);

await Promise.all([device.close(), operator.close(), raw.close()]);
await compute.stop();
await registry.close();
