/**
 * The registry served over the transport, as Nova's nova-conductor: a {@link ConductorManager}
 * serves any {@link Registry} (a `sqljs:` file, PostgreSQL) on topic `conductor`, and a
 * {@link ConductorRegistry} is a Registry that calls it, so services and devices need no database
 * of their own (`--registry_url=conductor:` or `conductor:TOPIC`).
 *
 * @example
 * ```ts
 * import { Service } from "novalet";
 * import { ConductorManager } from "novalet/registry/conductor.ts";
 * import { openSqlRegistry } from "novalet/registry/sql.ts";
 *
 * const registry = await openSqlRegistry("sqljs:./services.db");
 * const conductor = Service.create({ topic: "conductor", manager: new ConductorManager(registry), registry });
 * await conductor.start(); // now: --registry_url=conductor: everywhere else
 * ```
 *
 * @module
 */

import {
  ClosedError,
  DeliveryError,
  Manager,
  NotFound,
  quote,
  type Registry,
  RegistryError,
  RegistryTimeoutError,
  RemoteError,
  RequestContext,
  Rpc,
  RpcTimeoutError,
  type ServiceRecord,
  type ServiceRegistration,
  type Transport,
} from "../mod.ts";

/** Serves a registry over RPC: its methods are the {@link Registry} interface's. */
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

  /** {@link Registry.reportState}. */
  reportState(_ctx: RequestContext, { id }: { id: number }): Promise<ServiceRecord> {
    return this.#registry.reportState(id);
  }

  /** {@link Registry.get}; null for no row. */
  async get(_ctx: RequestContext, { id }: { id: number }): Promise<ServiceRecord | null> {
    return (await this.#registry.get(id)) ?? null;
  }

  /** {@link Registry.list}. */
  list(_ctx: RequestContext, filter: { topic?: string; host?: string; binary?: string }): Promise<ServiceRecord[]> {
    return this.#registry.list(filter);
  }

  /** {@link Registry.setDisabled}. */
  setDisabled(
    _ctx: RequestContext,
    { id, disabled, reason }: { id: number; disabled: boolean; reason?: string },
  ): Promise<ServiceRecord> {
    return this.#registry.setDisabled(id, disabled, reason);
  }

  /** {@link Registry.setForcedDown}. */
  setForcedDown(_ctx: RequestContext, { id, forcedDown }: { id: number; forcedDown: boolean }): Promise<ServiceRecord> {
    return this.#registry.setForcedDown(id, forcedDown);
  }

  /** {@link Registry.remove}. */
  async remove(_ctx: RequestContext, { id }: { id: number }): Promise<null> {
    await this.#registry.remove(id);
    return null;
  }
}

/** Options of a {@link ConductorRegistry}. */
export interface ConductorRegistryOptions {
  /** The conductor's topic. Default `conductor`. */
  topic?: string;
  /** Topic prefix. Default `novalet`. */
  prefix?: string;
  /** Seconds a call waits for the conductor. Default 10. */
  timeout?: number;
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
 * A {@link Registry} that calls a conductor over `transport`. Errors keep their meaning
 * (`NotFound`, `TypeError`); a conductor that does not answer is a registry outage
 * ({@link RegistryTimeoutError}, or {@link RegistryError} when nobody serves its topic).
 */
export class ConductorRegistry implements Registry {
  #rpc: Rpc;
  #topic: string;
  #closed = false;
  #ctx = RequestContext.admin({ userId: "novalet-registry" });

  /** A registry on the conductor of `opts.topic`, over `transport` (not closed by close()). */
  constructor(transport: Transport, opts: ConductorRegistryOptions = {}) {
    this.#topic = opts.topic ?? "conductor";
    this.#rpc = new Rpc(transport, { prefix: opts.prefix, timeout: opts.timeout ?? 10 });
    if (this.#topic.includes(".")) {
      throw new TypeError(`Invalid conductor topic ${quote(this.#topic)}: no "." in a topic`);
    }
    this.#rpc.topics.forAddress(this.#topic); // throws a TypeError naming a bad topic
  }

  async #call<T>(method: string, args: Record<string, unknown>): Promise<T> {
    if (this.#closed) throw new ClosedError("The registry is closed");
    try {
      return await this.#rpc.call<T>(this.#ctx, this.#topic, { method, args });
    } catch (e) {
      if (e instanceof RemoteError) {
        if (e.type === "NotFound") throw new NotFound(e.message, { cause: e });
        if (e.type === "TypeError") throw new TypeError(e.message, { cause: e });
        if (e.type === "RangeError") throw new RangeError(e.message, { cause: e });
        throw new RegistryError(`The conductor failed to ${method}: ${e.type}: ${e.message}`, { cause: e });
      }
      if (e instanceof RpcTimeoutError) {
        throw new RegistryTimeoutError(`The conductor (${this.#topic}) gave no answer to ${method}`, { cause: e });
      }
      if (e instanceof DeliveryError) {
        throw new RegistryError(`No conductor serves ${this.#topic}: ${e.message}`, { cause: e });
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
    return toRecord(await this.#call<Wire>("setDisabled", { id, disabled, reason }));
  }

  /** {@link Registry.setForcedDown}, at the conductor. */
  async setForcedDown(id: number, forcedDown: boolean): Promise<ServiceRecord> {
    return toRecord(await this.#call<Wire>("setForcedDown", { id, forcedDown }));
  }

  /** {@link Registry.remove}, at the conductor. */
  async remove(id: number): Promise<void> {
    await this.#call<null>("remove", { id });
  }

  /** Stop calling the conductor; a second call does nothing. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#rpc.close();
  }
}
