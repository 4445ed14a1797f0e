/**
 * A `pg` pool as kysely's PostgresDialect wants it, made safe against lost and half-open
 * connections: every checkout of a connection has a time limit, a client that ran out of time is
 * destroyed instead of going back to the pool, client errors never reach the process as uncaught
 * exceptions, and `end()` finishes in bounded time.
 *
 * @module
 */

import type { PostgresCursor, PostgresPool, PostgresPoolClient, PostgresQueryResult } from "kysely";
import { RegistryTimeoutError, TIMED_OUT, within } from "../mod.ts";

/** The part of a `pg` client used here; typed locally so pg's types stay out of novalet's. */
interface PgClient {
  query(sql: string, parameters: unknown[]): Promise<unknown>;
  release(err?: Error | boolean): void;
  on(event: "error", listener: (err: Error) => void): unknown;
  once(event: "end", listener: () => void): unknown;
  connection?: { stream?: { destroy(): void } };
}

/** The part of a `pg` Pool used here; `pg.Pool` fits it. */
export interface PgPool {
  connect(): Promise<PgClient>;
  end(): Promise<void>;
  on(event: "error", listener: (err: Error) => void): unknown;
  on(event: "connect", listener: (client: PgClient) => void): unknown;
}

const settles = (p: Promise<unknown>): Promise<void> => p.then(() => {}, () => {});

/** Options of {@link GuardedPool}. */
export interface GuardedPoolOptions {
  /**
   * The time limit of one checkout of a connection, in ms: every query made on it must be
   * answered before that much time has passed since the checkout. A registry operation checks
   * out one connection, so this is the limit of one operation.
   */
  limitMs: number;
}

/**
 * The {@link PostgresPool} kysely is given. PostgreSQL operations are time-limited here and
 * nowhere else: only this layer knows which connection hung, and that connection must be
 * destroyed rather than reused.
 */
export class GuardedPool implements PostgresPool {
  readonly #pool: PgPool;
  readonly #limitMs: number;
  /** Connected clients, until their connection ends, with a promise of that end. */
  readonly #clients = new Map<PgClient, Promise<void>>();
  /** The clients kysely holds now. */
  readonly #lent = new Set<PgClient>();
  /** Idle clients destroyed by {@link dropIdle}: pg-pool hands them out until their end event. */
  readonly #dropped = new WeakSet<PgClient>();

  /** Wraps `pool`, which it then owns: `end()` ends it. */
  constructor(pool: PgPool, opts: GuardedPoolOptions) {
    this.#pool = pool;
    this.#limitMs = opts.limitMs;
    // An idle client that loses its server: pg-pool has removed it already.
    pool.on("error", () => {});
    pool.on("connect", (client) => {
      // pg-pool listens to a client's "error" only while the client is idle; one that fails while
      // checked out would throw from the emitter. Its running query is rejected all the same.
      client.on("error", () => {});
      this.#clients.set(client, new Promise((resolve) => client.once("end", () => resolve())));
      client.once("end", () => this.#clients.delete(client));
    });
  }

  /**
   * Check out a connection; its time limit starts now. Rejects with pg's error when none can be
   * opened within the time limit (pg's `connectionTimeoutMillis` bounds the handshake).
   */
  async connect(): Promise<PostgresPoolClient> {
    let client = await this.#pool.connect();
    while (this.#dropped.has(client)) {
      client.release(true); // removed from the pool for good
      client = await this.#pool.connect();
    }
    this.#lent.add(client);
    return new GuardedClient(this, client, performance.now() + this.#limitMs);
  }

  /** @internal */
  timeoutError(): RegistryTimeoutError {
    return new RegistryTimeoutError(
      `An operation got no answer within ${this.#limitMs / 1000} s; its connection is closed`,
    );
  }

  /** @internal A client goes back to the pool, or is destroyed when `err` is given. */
  release(client: PgClient, err: Error | boolean | undefined): void {
    this.#lent.delete(client);
    client.release(err);
  }

  /**
   * @internal A query ran out of time: the network path is likely dead for the idle connections
   * too, so they go, and the next operation opens a fresh one instead of hanging on a stale one.
   */
  dropIdle(): void {
    for (const client of this.#clients.keys()) {
      if (this.#lent.has(client)) continue;
      this.#dropped.add(client);
      destroy(client);
    }
  }

  /**
   * End the pool. Past the time limit, destroy what is still connected and return (after at most
   * one more second): a hung connection cannot hold `close()`. Rejects only with pg's own error.
   */
  async end(): Promise<void> {
    const ended = this.#pool.end();
    const done = settles(Promise.all([ended, ...this.#clients.values()]));
    if (await within(done, this.#limitMs / 1000) !== TIMED_OUT) return await ended;
    for (const client of this.#clients.keys()) destroy(client);
    // Destroyed connections reject their queries at once and kysely releases their clients.
    await within(done, 1);
  }
}

function destroy(client: PgClient): void {
  client.connection?.stream?.destroy();
}

/** One checkout of a pooled client, answering every query by `deadline` (performance.now() ms). */
class GuardedClient implements PostgresPoolClient {
  readonly #pool: GuardedPool;
  readonly #client: PgClient;
  readonly #deadline: number;
  #timedOut?: RegistryTimeoutError;

  constructor(pool: GuardedPool, client: PgClient, deadline: number) {
    this.#pool = pool;
    this.#client = client;
    this.#deadline = deadline;
  }

  query<R>(sql: string, parameters: ReadonlyArray<unknown>): Promise<PostgresQueryResult<R>>;
  query<R>(cursor: PostgresCursor<R>): PostgresCursor<R>;
  query<R>(
    sql: string | PostgresCursor<R>,
    parameters: ReadonlyArray<unknown> = [],
  ): Promise<PostgresQueryResult<R>> | PostgresCursor<R> {
    // kysely passes a cursor only when its dialect is given a cursor class; ours is not.
    if (typeof sql !== "string") throw new TypeError("The registry's PostgreSQL pool does not stream with cursors");
    return this.#query(sql, parameters);
  }

  async #query<R>(sql: string, parameters: ReadonlyArray<unknown>): Promise<PostgresQueryResult<R>> {
    if (this.#timedOut) throw this.#timedOut;
    const running = this.#client.query(sql, parameters as unknown[]) as unknown as Promise<PostgresQueryResult<R>>;
    // A late answer or rejection (the connection is destroyed on release) is left to settle alone.
    const r = await within(running, Math.max(0, this.#deadline - performance.now()) / 1000);
    if (r !== TIMED_OUT) return r;
    this.#timedOut = this.#pool.timeoutError();
    this.#pool.dropIdle();
    throw this.#timedOut;
  }

  release(destroy?: boolean): void {
    // pg-pool destroys a client released with an error: a half-open one must not serve again.
    this.#pool.release(this.#client, this.#timedOut ?? destroy);
  }
}
