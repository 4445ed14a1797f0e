import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { MemoryLogger } from "./helpers.ts";

rpcSuite("memory", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(new MemoryTransport(hub)) });
});
