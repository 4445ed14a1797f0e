/**
 * 01 — hello: two managers talking through call, cast and fanout over the memory transport.
 *
 * Run: `npx tsx examples/01_hello.ts` or `deno run -A examples/01_hello.ts`.
 */

import { Manager, RemoteError, RequestContext, Service } from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";

// A manager's public methods are its RPC API: each is called as method(ctx, args).
class GreeterManager extends Manager {
  greet(ctx: RequestContext, { name }: { name: string }): string {
    return `Hello, ${name}! (from ${this.host}, request ${ctx.requestId})`;
  }
  note(_ctx: RequestContext, { text }: { text: string }): void {
    console.log(`  [greeter@${this.host}] cast received: ${text}`);
  }
  refuse(_ctx: RequestContext, { name }: { name: string }): never {
    class NotWelcome extends Error {}
    throw new NotWelcome(`${name} is not on the list`);
  }
}

// A second manager that uses the first through its service's RPC client.
class FrontManager extends Manager {
  async welcome(ctx: RequestContext, { name }: { name: string }): Promise<string> {
    return await this.service.rpc.call<string>(ctx, "greeter", { method: "greet", args: { name } });
  }
}

// Every transport on one hub sees the others: this is the broker of the memory transport.
const hub = new MemoryHub();
const transport = new MemoryTransport(hub);
const common = { transport, reportInterval: 10, periodicInterval: 60 };

const greeters = ["alpha", "beta"].map((host) =>
  Service.create({ ...common, host, binary: "nova-greeter", manager: GreeterManager })
);
const front = Service.create({ ...common, host: "alpha", binary: "nova-front", manager: FrontManager });
for (const s of [...greeters, front]) await s.start();

const ctx = new RequestContext({ userId: "demo", projectId: "examples" });
const rpc = front.rpc;

console.log("call greeter (any host):");
console.log("  ->", await rpc.call(ctx, "greeter", { method: "greet", args: { name: "Ada" } }));
console.log("call greeter.beta (that host only):");
console.log("  ->", await rpc.call(ctx, "greeter.beta", { method: "greet", args: { name: "Grace" } }));
console.log("call front, which calls greeter itself:");
console.log("  ->", await rpc.call(ctx, "front", { method: "welcome", args: { name: "Linus" } }));

console.log("cast to greeter (fire and forget):");
await rpc.cast(ctx, "greeter", { method: "note", args: { text: "one of you gets this" } });
console.log("fanout cast to every greeter:");
await rpc.fanoutCast(ctx, "greeter", { method: "note", args: { text: "all of you get this" } });

console.log("a remote error keeps its type and message:");
try {
  await rpc.call(ctx, "greeter", { method: "refuse", args: { name: "Mallory" } });
} catch (e) {
  if (!(e instanceof RemoteError)) throw e;
  console.log(`  -> RemoteError type=${e.type} message="${e.message}"`);
}

// stop() finishes what is in flight (the casts above) before it returns.
for (const s of [front, ...greeters]) await s.stop();
await transport.close();
console.log("done");
