/**
 * 02 — network: the main demo (`npm start`). A network service and a compute service in one
 * process, over the memory transport and an in-memory registry, as in Nova's early days:
 * compute asks network for an address on its host with `queueGetFor()`, casts
 * `associate_floating_ip`, runs a periodic task, and the demo prints the service list.
 *
 * Run: `npx tsx examples/02_network.ts` or `deno run -A examples/02_network.ts`.
 * Flags work too: `npx tsx examples/02_network.ts --report_interval=1 --log_format=json`.
 */

import process from "node:process";
import {
  isUp,
  Manager,
  openRegistry,
  parseFlags,
  periodicTask,
  queueGetFor,
  RequestContext,
  Service,
} from "../index.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";

const say = (who: string, what: string) => console.log(`[${who}] ${what}`);

/** Hands out fixed addresses and associates floating ones, like nova-network. */
class NetworkManager extends Manager {
  #next = 2;
  #floating = new Map<string, string>();

  allocate_fixed_ip(_ctx: RequestContext, { instance_id }: { instance_id: string }) {
    const address = `10.0.0.${this.#next++}`;
    say(`network@${this.host}`, `allocate_fixed_ip(${instance_id}) -> ${address}`);
    return address;
  }

  // A cast: nobody waits for it, so it reports by itself.
  associate_floating_ip(
    _ctx: RequestContext,
    { floating_address, fixed_address }: { floating_address: string; fixed_address: string },
  ) {
    this.#floating.set(floating_address, fixed_address);
    say(`network@${this.host}`, `associate_floating_ip: ${floating_address} -> ${fixed_address}`);
  }

  @periodicTask({ spacing: 0 })
  report_floating_ips(_ctx: RequestContext) {
    say(`network@${this.host}`, `periodic task: ${this.#floating.size} floating IP(s) associated`);
  }
}

/** Boots instances: asks the network service on its own host for addresses. */
class ComputeManager extends Manager {
  async run_instance(ctx: RequestContext, { instance_id }: { instance_id: string }) {
    const network = queueGetFor(ctx, "network", this.host);
    say(`compute@${this.host}`, `run_instance(${instance_id}): calling ${network} allocate_fixed_ip`);
    const fixed = await this.service.rpc.call<string>(ctx, network, {
      method: "allocate_fixed_ip",
      args: { instance_id },
    });
    const floating = "172.24.4.10";
    say(`compute@${this.host}`, `casting associate_floating_ip(${floating}, ${fixed}) to ${network}`);
    await this.service.rpc.cast(ctx, network, {
      method: "associate_floating_ip",
      args: { floating_address: floating, fixed_address: fixed },
    });
    return { instance_id, fixed_address: fixed, floating_address: floating, host: this.host };
  }
}

const flags = parseFlags(
  ["--periodic_fuzzy_delay=0", "--periodic_interval=0.2", ...process.argv.slice(2)],
  process.env,
);
const transport = new MemoryTransport(new MemoryHub());
const registry = await openRegistry("sqljs::memory:");
const common = { flags, transport, registry, host: "node1" };
const network = Service.create({ ...common, binary: "nova-network", manager: NetworkManager });
const compute = Service.create({ ...common, binary: "nova-compute", manager: ComputeManager });
await network.start();
await compute.start();

const ctx = new RequestContext({ userId: "demo", projectId: "admin" });
const result = await compute.rpc.call(ctx, "compute.node1", {
  method: "run_instance",
  args: { instance_id: "i-0001" },
});
say("demo", `run_instance returned ${JSON.stringify(result)}`);

await new Promise((r) => setTimeout(r, 300)); // let the periodic task tick once more

console.log("\nServices in the registry:");
for (const s of await registry.list()) {
  const state = isUp(s, { serviceDownTime: flags.serviceDownTime }) ? "up" : "down";
  console.log(
    `  ${s.id}  ${s.binary.padEnd(13)} ${s.host}  ${s.topic.padEnd(8)} ${
      s.disabled ? "disabled" : "enabled"
    }  ${state}  reports=${s.reportCount}`,
  );
}

await compute.stop();
await network.stop();
await registry.close();
await transport.close();
