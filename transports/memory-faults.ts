/**
 * Fault injection for the memory transport, for tests: drop, delay or duplicate the messages
 * whose topic matches a filter. It plugs into the hub's `fault` seam only while a fault is in
 * place, so a hub without faults does no extra work per message.
 *
 * @example
 * ```ts
 * import { inject } from "novalet/transports/memory-faults.ts";
 *
 * const undo = inject(hub, { filter: "novalet/rpc/compute/#", drop: true, count: 1 });
 * // ... the next message to a compute server is lost ...
 * undo();
 * ```
 *
 * @module
 */

import { topicMatches, validateFilter } from "../mod.ts";

/**
 * What a hub's `fault` seam gets for a message: `send()` schedules one delivery of it to every
 * subscription it was routed to, copied now; `delayMs` delivers it that much later.
 */
export type FaultHook = (topic: string, send: (delayMs?: number) => void) => void;

/** The part of a {@link MemoryHub} that faults use (no import of it: memory.ts imports this). */
export interface FaultableHub {
  /** The seam: set while faults are in place. */
  fault?: FaultHook;
  /** The hub's counters; a dropped message counts here. */
  stats: { dropped: number };
}

/** A fault injected on messages whose topic matches `filter`. */
export interface FaultOptions {
  /** The topics it applies to (an MQTT filter). */
  filter: string;
  /** Lose the message. */
  drop?: boolean;
  /** Deliver the message this many seconds late. */
  delay?: number;
  /** Deliver the message twice (a redelivery). */
  duplicate?: boolean;
  /** Apply to this many messages, then remove itself. Default: until removed. */
  count?: number;
}

interface Fault extends FaultOptions {
  left: number;
}

const faults = new WeakMap<FaultableHub, Fault[]>();

/**
 * Inject a fault on `hub`'s messages whose topic matches `opts.filter`; faults add up (a drop
 * wins, the last delay counts). It owns the hub's `fault` seam while faults are in place.
 * @returns a function that removes the fault.
 */
export function inject(hub: FaultableHub, opts: FaultOptions): () => void {
  validateFilter(opts.filter);
  // One timer per delayed message: at most what a timer holds (~24.8 days).
  if (opts.delay !== undefined && !(opts.delay >= 0 && opts.delay <= 2_147_483)) {
    throw new RangeError(`Invalid fault delay ${opts.delay}: must be seconds >= 0, at most 2147483`);
  }
  const f: Fault = { ...opts, left: opts.count ?? Infinity };
  set(hub, [...(faults.get(hub) ?? []), f]);
  return () => set(hub, (faults.get(hub) ?? []).filter((x) => x !== f));
}

/** Keep `list` as the hub's faults; the hub's seam is set only while there are some. */
function set(hub: FaultableHub, list: Fault[]): void {
  faults.set(hub, list);
  hub.fault = list.length === 0 ? undefined : (topic, send) => {
    let times = 1;
    let delayMs: number | undefined;
    let drop = false;
    for (const f of list) {
      if (f.left <= 0 || !topicMatches(f.filter, topic)) continue;
      f.left--;
      if (f.drop) drop = true;
      if (f.duplicate) times = 2;
      if (f.delay !== undefined) delayMs = f.delay * 1000;
    }
    if (list.some((f) => f.left <= 0)) set(hub, list.filter((f) => f.left > 0));
    if (drop) return void hub.stats.dropped++;
    for (let i = 0; i < times; i++) send(delayMs);
  };
}
