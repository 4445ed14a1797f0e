/**
 * The in-memory transport: MQTT topic semantics inside one process, for tests and
 * single-process programs. Transports that share a {@link MemoryHub} see each other's messages.
 *
 * It behaves as the MQTT transport does (the conformance suite checks both): `+`/`#` filters,
 * shared groups, delivery never inside `publish()`'s call stack, payloads copied. Tests inject
 * faults (drop, delay, duplicate) with `inject()` of transports/memory-faults.ts.
 *
 * @module
 */

import { Buffer } from "node:buffer";
import { DeliveryError, getLogger, promising, runHandler, topicMatches, TransportGuard } from "../mod.ts";
import type { LocalMessage, Logger, MessageHandler, MessageMeta } from "../mod.ts";
import type { PublishOptions, SubscribeOptions, Subscription, Transport } from "../mod.ts";
import { type FaultHook, type FaultOptions, inject } from "./memory-faults.ts";
// Re-exported: the public signatures below use them.
export type { LocalMessage, Logger, MessageHandler, PublishOptions, SubscribeOptions, Subscription, Transport };
export type { FaultHook, FaultOptions };

/** A subscription; `local`: it takes in-process messages as values; `g`: its shared group. */
type Sub = { filter: string; handler: MessageHandler; group?: string; active: boolean; local: boolean; g?: Group };
/** A delivery waiting for its turn. */
type Delivery = { sub: Sub; payload: Uint8Array; topic: string; meta?: MessageMeta };
/** A shared group: each message goes to the member after the last one's. */
type Group = { filter: string; members: Sub[]; next: number };

const EMPTY = new Uint8Array(0);
const RESOLVED = Promise.resolve();

/** Items by filter: those without wildcards in a map (most RPC topics, found without a scan). */
class ByFilter<T extends { filter: string }> {
  exact = new Map<string, T[]>();
  wild: T[] = [];

  add(x: T): void {
    if (/[+#]/.test(x.filter)) return void this.wild.push(x);
    const list = this.exact.get(x.filter);
    if (list) list.push(x);
    else this.exact.set(x.filter, [x]);
  }

  /** Lists are replaced, not changed: a delivery loop may be walking the old one. */
  remove(x: T): void {
    if (/[+#]/.test(x.filter)) return void (this.wild = this.wild.filter((y) => y !== x));
    const list = this.exact.get(x.filter)?.filter((y) => y !== x);
    if (list?.length) this.exact.set(x.filter, list);
    else this.exact.delete(x.filter);
  }
}

/** The shared medium of memory transports: a broker without sockets. */
export class MemoryHub {
  /** Subscriptions without a group. */
  #subs = new ByFilter<Sub>();
  /** Shared groups by `group\0filter`, and by filter. */
  #groups = new Map<string, Group>();
  #groupsByFilter = new ByFilter<Group>();
  #log: Logger;
  /** Deliveries of this turn, run by one microtask (one per message costs an AsyncResource each). */
  #queue: Delivery[] = [];
  /** Messages published, delivered and dropped (a fault hook counts its own), for tests. */
  stats = { published: 0, delivered: 0, dropped: 0 };
  /**
   * A seam for fault injection (transports/memory-faults.ts): when set, every routed message goes
   * through it, and is delivered once per call of its `send` (so never when it does not call it).
   */
  fault?: FaultHook;

  /** @deprecated Use `inject(hub, opts)` of transports/memory-faults.ts. */
  inject(opts: FaultOptions): () => void {
    return inject(this, opts);
  }

  /** A hub of its own; `logger` gets the failures of handlers (default: `getLogger()`). */
  constructor(opts: { logger?: Logger } = {}) {
    this.#log = opts.logger ?? getLogger();
  }

  /** @internal Add a subscription of a transport on this hub. */
  add(sub: Sub): void {
    if (sub.group === undefined) return this.#subs.add(sub);
    const key = `${sub.group}\0${sub.filter}`;
    let g = this.#groups.get(key);
    if (!g) {
      this.#groups.set(key, g = { filter: sub.filter, members: [], next: 0 });
      this.#groupsByFilter.add(g);
    }
    g.members.push(sub);
    sub.g = g;
  }

  /** @internal Remove a subscription; a delivery already scheduled for it goes elsewhere. */
  remove(sub: Sub): void {
    sub.active = false;
    if (sub.group === undefined) return this.#subs.remove(sub);
    const g = sub.g!;
    g.members = g.members.filter((s) => s !== sub);
    const key = `${sub.group}\0${sub.filter}`;
    if (g.members.length > 0 || this.#groups.get(key) !== g) return;
    this.#groups.delete(key);
    this.#groupsByFilter.remove(g);
  }

  /** The subscriptions that get a message on `topic`: every plain match, one member per group. */
  #route(topic: string): readonly Sub[] {
    const subs = this.#subs;
    const groups = this.#groupsByFilter;
    const exact = subs.exact.get(topic);
    const exactGroups = groups.exact.get(topic);
    // The usual case of replies: one exact list and nothing else, used as it is.
    if (!exactGroups && subs.wild.length === 0 && groups.wild.length === 0) return exact ?? [];
    const out: Sub[] = [];
    if (exact) out.push(...exact);
    for (const s of subs.wild) if (topicMatches(s.filter, topic)) out.push(s);
    if (exactGroups) { for (const g of exactGroups) out.push(this.#pick(g)); }
    for (const g of groups.wild) if (topicMatches(g.filter, topic)) out.push(this.#pick(g));
    return out;
  }

  #pick(g: Group): Sub {
    return g.members[g.next++ % g.members.length]!;
  }

  /**
   * @internal Route and schedule a message; returns how many subscriptions will get it. Each
   * delivery gets its own copy, taken now: bytes are copied, a local message copies itself.
   */
  publish(topic: string, payload: Uint8Array | LocalMessage): number {
    this.stats.published++;
    const targets = this.#route(topic);
    if (targets.length === 0) return 0;
    // A fault may drop it: the publisher cannot tell a loss, as on a network.
    if (this.fault !== undefined) this.fault(topic, (delayMs) => this.#send(targets, topic, payload, delayMs));
    else this.#send(targets, topic, payload);
    return targets.length;
  }

  #send(targets: readonly Sub[], topic: string, payload: Uint8Array | LocalMessage, delayMs?: number): void {
    for (const sub of targets) {
      // Sender and receiver never share the bytes; Buffer.from copies into a pooled slab, cheaper
      // than a fresh ArrayBuffer per message.
      const d: Delivery = { sub, payload: EMPTY, topic };
      if (payload instanceof Uint8Array) d.payload = Buffer.from(payload);
      else {
        if (sub.local) d.meta = { local: payload.copy() };
        // Bytes too when a member of the group reads bytes: it may get this one (see #deliver).
        if (!sub.local || sub.g?.members.some((m) => !m.local)) d.payload = Buffer.from(payload.bytes());
      }
      if (delayMs !== undefined) setTimeout(() => this.#deliver(d), delayMs);
      else if (this.#queue.push(d) === 1) RESOLVED.then(this.#drain); // cheaper than queueMicrotask
    }
  }

  /** Run the deliveries queued so far; those they queue run in the next microtask. */
  #drain = (): void => {
    const queue = this.#queue;
    this.#queue = [];
    for (const d of queue) this.#deliver(d);
  };

  #deliver(d: Delivery): void {
    let sub = d.sub;
    if (!sub.active) {
      // Unsubscribed between publish and delivery: a group hands it to another member.
      const g = sub.g && this.#groups.get(`${sub.group}\0${sub.filter}`);
      // A value without bytes can only go to a member that takes values.
      const valueOnly = d.meta !== undefined && d.payload === EMPTY;
      const next = g?.members.length ? this.#pick(g) : undefined;
      const taker = next && (!valueOnly || next.local) ? next : g?.members.find((m) => m.local);
      if (!taker) {
        this.stats.dropped++;
        return;
      }
      sub = taker;
    }
    this.stats.delivered++;
    runHandler(sub.handler, d.payload, d.topic, this.#log, sub.local ? d.meta : undefined);
  }
}

/** The hub of transports created without one. */
export const defaultHub: MemoryHub = new MemoryHub();

/** A connection to a {@link MemoryHub}. */
export class MemoryTransport implements Transport {
  /** The hub this transport publishes to and subscribes on. */
  readonly hub: MemoryHub;
  #subs = new Set<Sub>();
  #guard = new TransportGuard();

  /** A transport on `hub`, the medium it shares with the others (default: {@link defaultHub}). */
  constructor(hub: MemoryHub = defaultHub) {
    this.hub = hub;
  }

  /**
   * Schedule delivery of a copy to every matching subscription; never inside this call.
   * @throws {DeliveryError} with `mandatory` when nobody subscribed to `topic`.
   */
  publish(topic: string, payload: Uint8Array, opts: PublishOptions = {}): Promise<void> {
    return promising(() => this.#publish(topic, payload, opts, false));
  }

  /** Send a message as a value to the subscriptions that take values, as bytes to the others. */
  publishLocal(topic: string, message: LocalMessage, opts: PublishOptions = {}): Promise<void> {
    return promising(() => this.#publish(topic, message, opts, true));
  }

  #publish(topic: string, payload: Uint8Array | LocalMessage, opts: PublishOptions, local: boolean): Promise<void> {
    this.#guard.checkPublish(topic);
    if (!local && !(payload instanceof Uint8Array)) {
      throw new TypeError(`Cannot publish to ${topic}: payload must be bytes`);
    }
    // `retain` is ignored: a hub keeps no message for later subscribers.
    const n = this.hub.publish(topic, payload); // throws when a local message cannot be copied or encoded
    if (n === 0 && opts.mandatory) throw new DeliveryError(`No subscriber for "${topic}": nobody serves it`);
    return RESOLVED;
  }

  /** Add a subscription to the hub; it takes messages published from now on. */
  subscribe(filter: string, handler: MessageHandler, opts: SubscribeOptions = {}): Promise<Subscription> {
    return promising(() => {
      this.#guard.checkSubscribe(filter, opts);
      const sub: Sub = { filter, handler, group: opts.group, active: true, local: opts.local === true };
      this.hub.add(sub);
      this.#subs.add(sub);
      const unsubscribe = () => {
        if (sub.active) {
          this.hub.remove(sub);
          this.#subs.delete(sub);
        }
        return RESOLVED;
      };
      return Promise.resolve({ unsubscribe });
    });
  }

  /** Remove every subscription of this transport. Idempotent. */
  close(): Promise<void> {
    this.#guard.close();
    for (const s of this.#subs) this.hub.remove(s);
    this.#subs.clear();
    return RESOLVED;
  }
}
