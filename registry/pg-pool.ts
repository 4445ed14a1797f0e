/**
 * A `pg` pool as kysely's PostgresDialect wants it, made safe against lost and half-open
 * connections: every query has a time limit, a client whose query ran out of time is destroyed
 * instead of going back to the pool, client errors never reach the process as uncaught
 * exceptions, and `end()` finishes in bounded time.
 *
 * @module
 */

import type { PostgresCursor, PostgresPool, PostgresPoolClient, PostgresQueryResult } from "kysely";
import { RegistryTimeoutError } from "../mod.ts";

/** The part of a `pg` client used here; typed locally so pg's types stay out of novalet's. */
interface PgClient {
  query(sql: string, parameters: unknown[]): Promise<unknown>;
  release(err?: Error | boolean): void;
  on(event: "error", listener: (err: Error) => void): unknown;
  once(event: "end", listener: () => void): unknown;
  connection?: { stream?: { destroy(): void } };
}

/** The part of a `pg` Pool used here. */
export interface PgPool {
  connect(): Promise<PgClient>;
  end(): Promise<void>;
  on(event: "error", listener: (err: Error) => void): unknown;
  on(event: "connect", listener: (client: PgClient) => void): unknown;
}

const settles = (p: Promise<unknown>): Promise<void> => p.then(() => {}, () => {});

/** Resolves true when `p` settles within `ms`, false otherwise. */
async function settlesWithin(ms: number, p: Promise<unknown>): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<false>((resolve) => timer = setTimeout(() => resolve(false), ms));
  try {
    return await Promise.race([settles(p).then(() => true as const), late]);
  } finally {
    clearTimeout(timer);
  }
}

/** The {@link PostgresPool} kysely is given; `name` (a redacted URL) is for messages. */
export class GuardedPool implements PostgresPool {
  readonly #pool: PgPool;
  readonly #limitMs: number;
  readonly #name: string;
  /** Connected clients, until their connection ends, with a promise of that end. */
  readonly #clients = new Map<PgClient, Promise<void>>();
  /** The clients kysely holds now. */
  readonly #lent = new Set<PgClient>();

  constructor(pool: PgPool, opts: { limitMs: number; name: string }) {
    this.#pool = pool;
    this.#limitMs = opts.limitMs;
    this.#name = opts.name;
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

  async connect(): Promise<PostgresPoolClient> {
    const client = await this.#pool.connect();
    this.#lent.add(client);
    return new GuardedClient(this, client);
  }

  /** @internal The time limit of one query, in ms. */
  get limitMs(): number {
    return this.#limitMs;
  }

  /** @internal */
  timeoutError(): RegistryTimeoutError {
    return new RegistryTimeoutError(
      `Registry ${JSON.stringify(this.#name)}: a query got no answer within ${this.#limitMs / 1000} s; ` +
        "its connection is closed",
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
    for (const client of this.#clients.keys()) if (!this.#lent.has(client)) destroy(client);
  }

  /** End the pool; past the time limit, destroy what is still connected and return. */
  async end(): Promise<void> {
    const ended = this.#pool.end();
    const done = Promise.all([ended, ...this.#clients.values()]);
    if (await settlesWithin(this.#limitMs, done)) return await ended;
    for (const client of this.#clients.keys()) destroy(client);
    // Destroyed connections reject their queries at once and kysely releases their clients.
    await settlesWithin(1000, done);
  }
}

function destroy(client: PgClient): void {
  client.connection?.stream?.destroy();
}

class GuardedClient implements PostgresPoolClient {
  readonly #pool: GuardedPool;
  readonly #client: PgClient;
  #timedOut?: RegistryTimeoutError;

  constructor(pool: GuardedPool, client: PgClient) {
    this.#pool = pool;
    this.#client = client;
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
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.#timedOut = this.#pool.timeoutError();
        this.#pool.dropIdle();
        reject(this.#timedOut);
      }, this.#pool.limitMs);
    });
    try {
      return await Promise.race([running, late]);
    } finally {
      clearTimeout(timer);
      running.catch(() => {}); // settles when the connection is destroyed, after we have answered
    }
  }

  release(destroy?: boolean): void {
    // pg-pool destroys a client released with an error: a half-open one must not serve again.
    this.#pool.release(this.#client, this.#timedOut ?? destroy);
  }
}
