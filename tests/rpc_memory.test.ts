import type { Transport } from "../mod.ts";
import { MemoryHub, MemoryTransport } from "../transports/memory.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { MemoryLogger } from "./helpers.ts";

// Envelopes travel as values (publishLocal): copied with JSON semantics, no text in between.
rpcSuite("memory", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(new MemoryTransport(hub)) });
});

/** The memory transport without publishLocal: every envelope goes as JSON bytes, as on MQTT. */
function bytesOnly(t: MemoryTransport): Transport {
  return {
    publish: (topic, payload, opts) => t.publish(topic, payload, opts),
    subscribe: (filter, handler, opts) => t.subscribe(filter, handler, opts),
    close: () => t.close(),
  };
}

// The same suite through the JSON bytes: both paths must behave alike.
rpcSuite("memory, as bytes", () => {
  const hub = new MemoryHub({ logger: new MemoryLogger() });
  return Promise.resolve({ open: () => Promise.resolve(bytesOnly(new MemoryTransport(hub))) });
});
