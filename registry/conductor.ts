/**
 * The registry served over the transport, as Nova's nova-conductor: a {@link ConductorManager}
 * serves a {@link Registry} (a `sqljs:` file, PostgreSQL) on topic `conductor` to every service;
 * a {@link ConductorAdminManager} serves its admin operations (disable, enable, force down,
 * delete) on `conductor_admin`, a topic of their own so that a broker ACL can confine them to
 * operators; a {@link ConductorRegistry} is a Registry that calls both, so services and devices
 * need no database of their own (`--registry_url=conductor:` or `conductor:TOPIC`).
 *
 * @example
 * ```ts
 * import { serve } from "novalet";
 * import { createConductor } from "novalet/registry/conductor.ts";
 * import { openSqlRegistry } from "novalet/registry/sql.ts";
 *
 * const registry = await openSqlRegistry("sqljs:./services.db");
 * await serve(...createConductor({ registry })); // now: --registry_url=conductor: everywhere else
 * ```
 *
 * @module
 */

import {
  ClosedError,
  type Codec,
  DeliveryError,
  Manager,
  NotAuthorized,
  NotFound,
  quote,
  type Registry,
  RegistryError,
  RegistryTimeoutError,
  RemoteError,
  RequestContext,
  Rpc,
  RpcTimeoutError,
  Service,
  type ServiceOptions,
  type ServiceRecord,
  type ServiceRegistration,
  type Transport,
} from "../mod.ts";
import { setImmediate } from "node:timers";

/** Serves a registry over RPC to services: register, heartbeat, read. The admin operations are
 * {@link ConductorAdminManager}'s. */
export class ConductorManager extends Manager {
  #registry: Registry;

  /** A conductor of `registry` (it does not close it). */
  constructor(registry: Registry) {
    super();
    this.#registry = registry;
  }

  /** {@link Registry.register}. */
  register(_ctx: RequestContext, s: ServiceRegistration): Promise<ServiceRecord> {
    return this.#registry.register(s);
  }

  /**
   * {@link Registry.reportState}. On a registry with `reportStates` (`SqlRegistry`), heartbeats
   * that arrive while one write is running are committed together in the next one.
   */
  reportState(_ctx: RequestContext, { id }: { id: number }): Promise<ServiceRecord> {
    this.#heartbeats ??= Heartbeats.of(this.#registry, () => (this.service?.dispatcher?.load.queued ?? 0) > 0) ?? false;
    return this.#heartbeats ? this.#heartbeats.report(id) : this.#registry.reportState(id);
  }
  #heartbeats?: Heartbeats | false;

  /** {@link Registry.get}; null for no row. */
  async get(_ctx: RequestContext, { id }: { id: number }): Promise<ServiceRecord | null> {
    return (await this.#registry.get(id)) ?? null;
  }

  /** {@link Registry.list}. */
  list(_ctx: RequestContext, filter: { topic?: string; host?: string; binary?: string }): Promise<ServiceRecord[]> {
    return this.#registry.list(filter);
  }
}

/** The topic of the admin operations of the conductor of `topic`. */
export function adminTopic(topic: string): string {
  return `${topic}_admin`;
}

/** Decides whether `ctx` may call the admin operation `method`. */
export type Authorize = (ctx: RequestContext, method: string) => boolean | Promise<boolean>;

/** The default {@link Authorize}: an admin context (`is_admin`, or the role `admin`). */
export function adminOnly(ctx: RequestContext): boolean {
  return ctx.isAdmin || ctx.roles.includes("admin");
}

/**
 * Serves a registry's admin operations over RPC. Each call is first put to `authorize` (default
 * {@link adminOnly}) and refused with {@link NotAuthorized} before it touches the registry. A
 * context is only as trustworthy as the transport: on a shared broker, confine who may publish to
 * this topic (the README's ACL).
 */
export class ConductorAdminManager extends Manager {
  #registry: Registry;
  #authorize: Authorize;

  /** The admin operations of `registry` (it does not close it), allowed when `authorize` says so. */
  constructor(registry: Registry, opts: { authorize?: Authorize } = {}) {
    super();
    this.#registry = registry;
    this.#authorize = opts.authorize ?? adminOnly;
  }

  async #allow(ctx: RequestContext, method: string): Promise<void> {
    if (!(await this.#authorize(ctx, method))) {
      const who = ctx.userId === null ? "an anonymous caller" : quote(ctx.userId);
      throw new NotAuthorized(`${method} is an admin operation: ${who} may not call it`);
    }
  }

  /** {@link Registry.setDisabled}, when allowed. */
  async setDisabled(
    ctx: RequestContext,
    { id, disabled, reason }: { id: number; disabled: boolean; reason?: string },
  ): Promise<ServiceRecord> {
    await this.#allow(ctx, "setDisabled");
    return await this.#registry.setDisabled(id, disabled, reason);
  }

  /** {@link Registry.setForcedDown}, when allowed. */
  async setForcedDown(
    ctx: RequestContext,
    { id, forcedDown }: { id: number; forcedDown: boolean },
  ): Promise<ServiceRecord> {
    await this.#allow(ctx, "setForcedDown");
    return await this.#registry.setForcedDown(id, forcedDown);
  }

  /** {@link Registry.remove}, when allowed. */
  async remove(ctx: RequestContext, { id }: { id: number }): Promise<null> {
    await this.#allow(ctx, "remove");
    await this.#registry.remove(id);
    return null;
  }
}

/** The conductor service's default `maxRunningHandlers`: a heartbeat holds a slot until the write
 * of its batch, and a batch cannot be larger than the slots. */
export const CONDUCTOR_RUNNING = 1024;

/** Options of {@link createConductor}: a Service's, but the registry is the one served. */
export interface ConductorOptions extends Omit<ServiceOptions, "manager" | "topic" | "binary" | "registry"> {
  /** The registry served; the conductor registers itself there too. Not closed by stop(). */
  registry: Registry;
  /** Default `conductor`; the admin operations are served on {@link adminTopic}(topic). */
  topic?: string;
  /** Who may call the admin operations. Default {@link adminOnly}. */
  authorize?: Authorize;
}

/**
 * A conductor: two services to start together (`serve(...createConductor(opts))`), `topic`
 * (binary `nova-conductor`) and its admin topic (binary `nova-conductor-admin`).
 */
export function createConductor(opts: ConductorOptions): [Service, Service] {
  const { registry, topic = "conductor", authorize, ...rest } = opts;
  return [
    Service.create({
      maxRunningHandlers: CONDUCTOR_RUNNING,
      ...rest,
      registry,
      topic,
      binary: "nova-conductor",
      manager: new ConductorManager(registry),
    }),
    Service.create({
      ...rest,
      registry,
      topic: adminTopic(topic),
      binary: "nova-conductor-admin",
      manager: new ConductorAdminManager(registry, { authorize }),
    }),
  ];
}

/** A registry that writes many heartbeats in one operation, as `SqlRegistry.reportStates`. */
interface BatchRegistry extends Registry {
  reportStates(ids: number[]): Promise<Array<ServiceRecord | undefined>>;
}

interface Waiting {
  id: number;
  resolve: (r: ServiceRecord) => void;
  reject: (e: unknown) => void;
}

/**
 * Group commit of heartbeats: while a batch is being written, the heartbeats that arrive wait and
 * all go in the next write, so a registry that pays per write transaction (a `sqljs:` file
 * rewrites itself) keeps up with a fleet. A heartbeat that finds the writer idle is written at
 * once; under load the writer rests REST times as long as its last write took (at most a second;
 * not after a failed write), so that writes take at most a quarter of the time: a `sqljs:` file's write costs CPU in proportion to the file,
 * and writing back to back would keep a core busy whatever the load. It does not rest while the
 * service queues requests for a running slot: every caller then waits for the writer already.
 */
class Heartbeats {
  #registry: BatchRegistry;
  #saturated: () => boolean;
  #waiting: Waiting[] = [];
  /** A write is running or scheduled. */
  #busy = false;
  /** performance.now() until which the writer rests. */
  #restUntil = 0;

  private constructor(registry: BatchRegistry, saturated: () => boolean) {
    this.#registry = registry;
    this.#saturated = saturated;
  }

  /** The batcher of `registry`, or null when it has no `reportStates`; `saturated` tells whether
   * requests wait for a running slot. */
  static of(registry: Registry, saturated: () => boolean): Heartbeats | null {
    const r = registry as Partial<BatchRegistry>;
    return typeof r.reportStates === "function" ? new Heartbeats(registry as BatchRegistry, saturated) : null;
  }

  report(id: number): Promise<ServiceRecord> {
    // A malformed id goes alone: the registry's TypeError then fails that caller only.
    if (!Number.isSafeInteger(id) || id <= 0) return this.#registry.reportState(id);
    return new Promise((resolve, reject) => {
      this.#waiting.push({ id, resolve, reject });
      if (!this.#busy) this.#schedule();
    });
  }

  #schedule(): void {
    this.#busy = true;
    const rest = this.#saturated() ? 0 : this.#restUntil - performance.now();
    // setImmediate, not at once: the other requests read from the same socket data join the write.
    if (rest > 0) setTimeout(() => void this.#write(), rest);
    else setImmediate(() => void this.#write());
  }

  async #write(): Promise<void> {
    const batch = this.#waiting;
    this.#waiting = [];
    const start = performance.now();
    let rest = 0;
    try {
      const rows = await this.#registry.reportStates(batch.map((w) => w.id));
      batch.forEach((w, i) => {
        const row = rows[i];
        if (row) w.resolve(row);
        else w.reject(new NotFound(`Service ${w.id} not found: cannot report its state`));
      });
      // Not after a failure: a write that waited for a dead database says nothing of the next one.
      // A batch of several means a fleet is heartbeating: write at most every MIN_REST_MS then.
      const took = (performance.now() - start) * REST;
      rest = Math.min(batch.length > 1 ? Math.max(took, MIN_REST_MS) : took, MAX_REST_MS);
    } catch (e) {
      for (const w of batch) w.reject(e);
    }
    this.#restUntil = performance.now() + rest;
    this.#busy = false;
    if (this.#waiting.length > 0) this.#schedule();
  }
}

/** How long the heartbeat writer rests after a write under load, in multiples of the write's time. */
const REST = 3;
/** The longest rest, in ms: a slow write (a database waiting for a lock) must not hold the next back long. */
const MAX_REST_MS = 1000;
/** The least rest after a write of several heartbeats: each write of a `sqljs:` file rewrites it whole. */
const MIN_REST_MS = 100;

/** Options of a {@link ConductorRegistry}. */
export interface ConductorRegistryOptions {
  /** The conductor's topic. Default `conductor`. */
  topic?: string;
  /** Topic prefix. Default `novalet`. */
  prefix?: string;
  /** Seconds a call waits for the conductor. Default 10. */
  timeout?: number;
  /** The context of admin operations. Default: an admin context of user `novalet-admin`. */
  adminContext?: RequestContext;
  /** The codec of its calls (a signing one: see keys.ts). Default: the JSON codec. */
  codec?: Codec;
}

type Wire = Omit<ServiceRecord, "lastSeenUp" | "createdAt" | "updatedAt"> & {
  lastSeenUp: string | null;
  createdAt: string;
  updatedAt: string;
};

const toRecord = (w: Wire): ServiceRecord => ({
  ...w,
  lastSeenUp: w.lastSeenUp === null ? null : new Date(w.lastSeenUp),
  createdAt: new Date(w.createdAt),
  updatedAt: new Date(w.updatedAt),
});

/**
 * A {@link Registry} that calls a conductor over `transport`: its admin operations on the
 * conductor's {@link adminTopic}, with an admin context. Errors keep their meaning (`NotFound`,
 * `TypeError`, {@link NotAuthorized}); a conductor that does not answer is a registry outage
 * ({@link RegistryTimeoutError}, or {@link RegistryError} when nobody serves its topic).
 */
export class ConductorRegistry implements Registry {
  #rpc: Rpc;
  #topic: string;
  #closed = false;
  #ctx = new RequestContext({ userId: "novalet-registry" });
  #adminCtx: RequestContext;

  /** A registry on the conductor of `opts.topic`, over `transport` (not closed by close()). */
  constructor(transport: Transport, opts: ConductorRegistryOptions = {}) {
    this.#topic = opts.topic ?? "conductor";
    this.#adminCtx = opts.adminContext ?? RequestContext.admin({ userId: "novalet-admin" });
    this.#rpc = new Rpc(transport, { prefix: opts.prefix, timeout: opts.timeout ?? 10, codec: opts.codec });
    if (this.#topic.includes(".")) {
      throw new TypeError(`Invalid conductor topic ${quote(this.#topic)}: no "." in a topic`);
    }
    this.#rpc.topics.forAddress(this.#topic); // throws a TypeError naming a bad topic
  }

  async #call<T>(method: string, args: Record<string, unknown>, admin = false): Promise<T> {
    if (this.#closed) throw new ClosedError("The registry is closed");
    const topic = admin ? adminTopic(this.#topic) : this.#topic;
    try {
      return await this.#rpc.call<T>(admin ? this.#adminCtx : this.#ctx, topic, { method, args });
    } catch (e) {
      if (e instanceof RemoteError) {
        if (e.type === "NotFound") throw new NotFound(e.message, { cause: e });
        if (e.type === "TypeError") throw new TypeError(e.message, { cause: e });
        if (e.type === "RangeError") throw new RangeError(e.message, { cause: e });
        if (e.type === "NotAuthorized") throw new NotAuthorized(e.message, { cause: e });
        throw new RegistryError(`The conductor failed to ${method}: ${e.type}: ${e.message}`, { cause: e });
      }
      if (e instanceof RpcTimeoutError) {
        throw new RegistryTimeoutError(`The conductor (${topic}) gave no answer to ${method}`, { cause: e });
      }
      if (e instanceof DeliveryError && (e.cause as { code?: unknown } | undefined)?.code === 0x87) {
        // MQTT 5's "not authorized": the broker's ACL keeps this client from the topic.
        throw new NotAuthorized(`The broker refused ${method} on ${topic}: ${e.message}`, { cause: e });
      }
      if (e instanceof DeliveryError) {
        throw new RegistryError(`The conductor (${topic}) cannot be reached for ${method}: ${e.message}`, { cause: e });
      }
      throw e;
    }
  }

  /** {@link Registry.register}, at the conductor. */
  async register(s: ServiceRegistration): Promise<ServiceRecord> {
    return toRecord(await this.#call<Wire>("register", { ...s }));
  }

  /** {@link Registry.reportState}, at the conductor. */
  async reportState(id: number): Promise<ServiceRecord> {
    return toRecord(await this.#call<Wire>("reportState", { id }));
  }

  /** {@link Registry.get}, at the conductor. */
  async get(id: number): Promise<ServiceRecord | undefined> {
    const w = await this.#call<Wire | null>("get", { id });
    return w === null ? undefined : toRecord(w);
  }

  /** {@link Registry.list}, at the conductor. */
  async list(filter: { topic?: string; host?: string; binary?: string } = {}): Promise<ServiceRecord[]> {
    return (await this.#call<Wire[]>("list", { ...filter })).map(toRecord);
  }

  /** {@link Registry.setDisabled}, at the conductor. */
  async setDisabled(id: number, disabled: boolean, reason?: string): Promise<ServiceRecord> {
    return toRecord(await this.#call<Wire>("setDisabled", { id, disabled, reason }, true));
  }

  /** {@link Registry.setForcedDown}, at the conductor. */
  async setForcedDown(id: number, forcedDown: boolean): Promise<ServiceRecord> {
    return toRecord(await this.#call<Wire>("setForcedDown", { id, forcedDown }, true));
  }

  /** {@link Registry.remove}, at the conductor. */
  async remove(id: number): Promise<void> {
    await this.#call<null>("remove", { id }, true);
  }

  /** Stop calling the conductor; a second call does nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#rpc.close();
  }
}
