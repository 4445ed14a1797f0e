/**
 * The SQL service registry: Nova's `services` table, written once against `Kysely<Schema>`, on
 * sql.js (embedded, the default) or PostgreSQL (many processes and hosts).
 *
 * @example
 * ```ts
 * const registry = await openSqlRegistry("sqljs:./services.db");
 * const row = await registry.register({ host: "node1", binary: "nova-compute", topic: "compute" });
 * await registry.reportState(row.id); // a heartbeat
 * await registry.close();
 * ```
 *
 * @module
 */

import {
  Kysely,
  type Migration,
  type MigrationProvider,
  Migrator,
  PostgresDialect,
  type Selectable,
  sql,
  type Updateable,
} from "kysely";
import {
  ClosedError,
  MAX_SECONDS,
  NotFound,
  NovaletError,
  parseAddress,
  quote,
  redactUrl,
  type Registry,
  RegistryError,
  RegistryInUse,
  RegistryTimeoutError,
  type ServiceRecord,
  type ServiceRegistration,
  TIMED_OUT,
  within,
} from "../mod.ts";
import { GuardedPool } from "./pg-pool.ts";
import { type SqlJsDatabaseLike, SqlJsDialect } from "./sqljs-dialect.ts";
import { SqlJsFile } from "./sqljs-file.ts";

// Kept for imports from here; the classes live with the other errors and contracts in mod.ts.
export { NovaletError, RegistryError, RegistryInUse, RegistryTimeoutError };
export type { Registry, ServiceRecord };

/** The default time limit of one PostgreSQL registry operation, in seconds. */
export const DEFAULT_QUERY_TIMEOUT = 10;

/**
 * A column the database fills in on insert: read as `T`, optional on insert. The same type as
 * kysely's `Generated`, spelled out so that the schema's documentation is complete here.
 */
export type Generated<T> = {
  readonly __select__: T;
  readonly __insert__: T | undefined;
  readonly __update__: T;
};

/** The `services` table as stored. Booleans are 0/1 integers and times ISO strings (sql.js) or
 * timestamptz (PostgreSQL), so one set of queries serves both. */
export interface ServicesTable {
  /** The service's id, given by the database on insert. */
  id: Generated<number>;
  /** The host the service runs on. */
  host: string;
  /** The program, e.g. `nova-compute`; one row per (host, binary). */
  binary: string;
  /** The RPC topic the service consumes. */
  topic: string;
  /** Heartbeats so far. */
  report_count: Generated<number>;
  /** 1 when an admin disabled the service, else 0. */
  disabled: Generated<number>;
  /** Why it was disabled; null when enabled or when no reason was given. */
  disabled_reason: string | null;
  /** 1 when an admin forced the service down, else 0. */
  forced_down: Generated<number>;
  /** The last heartbeat; null before the first one. */
  last_seen_up: string | Date | null;
  /** When the row was created. */
  created_at: string | Date;
  /** The last change of the row: a heartbeat or an admin edit. */
  updated_at: string | Date;
  /** Seconds between the service's heartbeats, as it registered; null if it did not say. */
  report_interval: number | null;
  /** Seconds after which the service is down without a heartbeat, as it registered; or null. */
  service_down_time: number | null;
}

/** The registry's database as kysely sees it. */
export interface Schema {
  /** Nova's `services` table: one row per (host, binary). */
  services: ServicesTable;
}

/** The SQL the schema is created in: SQLite (sql.js) or PostgreSQL. */
export type Flavour = "sqlite" | "postgres";

/** The migrations, kept in code so that nothing has to be found on disk at run time. */
function migrations(flavour: Flavour): Record<string, Migration> {
  const time = flavour === "postgres" ? "timestamptz" : "text";
  return {
    "0001_services": {
      async up(db: Kysely<unknown>) {
        await db.schema.createTable("services")
          .addColumn("id", flavour === "postgres" ? "serial" : "integer", (c) => {
            const pk = c.primaryKey();
            return flavour === "postgres" ? pk : pk.autoIncrement();
          })
          .addColumn("host", "varchar(255)", (c) => c.notNull())
          .addColumn("binary", "varchar(255)", (c) => c.notNull())
          .addColumn("topic", "varchar(255)", (c) => c.notNull())
          .addColumn("report_count", "integer", (c) => c.notNull().defaultTo(0))
          .addColumn("disabled", "integer", (c) => c.notNull().defaultTo(0))
          .addColumn("disabled_reason", "varchar(255)")
          .addColumn("forced_down", "integer", (c) => c.notNull().defaultTo(0))
          .addColumn("last_seen_up", time)
          .addColumn("created_at", time, (c) => c.notNull())
          .addColumn("updated_at", time, (c) => c.notNull())
          .addUniqueConstraint("services_host_binary", ["host", "binary"])
          .execute();
        await db.schema.createIndex("services_topic").on("services").column("topic").execute();
      },
    },
    // Each row is judged by the settings its own service runs with.
    "0002_liveness_settings": {
      async up(db: Kysely<unknown>) {
        const real = flavour === "postgres" ? "double precision" : "real";
        await db.schema.alterTable("services").addColumn("report_interval", real).execute();
        await db.schema.alterTable("services").addColumn("service_down_time", real).execute();
      },
    },
  };
}

function provider(flavour: Flavour): MigrationProvider {
  return { getMigrations: () => Promise.resolve(migrations(flavour)) };
}

const toDate = (v: string | Date): Date => v instanceof Date ? v : new Date(v);

function toRecord(r: Selectable<ServicesTable>): ServiceRecord {
  return {
    id: Number(r.id),
    host: r.host,
    binary: r.binary,
    topic: r.topic,
    reportCount: Number(r.report_count),
    disabled: Number(r.disabled) !== 0,
    disabledReason: r.disabled_reason,
    forcedDown: Number(r.forced_down) !== 0,
    lastSeenUp: r.last_seen_up === null ? null : toDate(r.last_seen_up),
    reportInterval: r.report_interval === null ? null : Number(r.report_interval),
    serviceDownTime: r.service_down_time === null ? null : Number(r.service_down_time),
    createdAt: toDate(r.created_at),
    updatedAt: toDate(r.updated_at),
  };
}

function checkId(id: unknown): number {
  if (typeof id !== "number" || !Number.isSafeInteger(id) || id <= 0) {
    throw new TypeError(`Invalid service id ${quote(id)}: must be a positive integer`);
  }
  return id;
}

/** Ids bound in one UPDATE of {@link SqlRegistry.reportStates}: well below SQLite's limit of
 * 32,766 variables (sql.js 1.16) and PostgreSQL's 65,535 parameters. */
const MAX_IDS_PER_STATEMENT = 10_000;

function checkField(name: string, v: unknown): string {
  if (typeof v !== "string" || v.length === 0 || v.length > 255) {
    throw new TypeError(`Invalid ${name} ${quote(v)}: must be a string of 1 to 255 characters`);
  }
  return v;
}

/** A topic, host or binary as RPC names them (parseAddress's rules): one topic level, without "/",
 * "+", "#" or control characters; a topic has no ".". */
function checkName(name: "topic" | "host" | "binary", v: unknown): string {
  const s = checkField(name, v);
  if (name === "topic" && s.includes(".")) throw new TypeError(`Invalid topic ${quote(s)}: no "." in a topic`);
  try {
    parseAddress(name === "topic" ? s : `t.${s}`);
  } catch {
    throw new TypeError(`Invalid ${name} ${quote(s)}: one topic level, without "/", "+", "#" or control characters`);
  }
  return s;
}

function checkSeconds(name: string, v: unknown): number | null {
  if (v === undefined) return null;
  if (typeof v !== "number" || !(v > 0) || !(v <= MAX_SECONDS)) {
    throw new TypeError(`Invalid ${name} ${quote(v)}: must be a positive number of seconds, at most ${MAX_SECONDS}`);
  }
  return v;
}

/** Options of {@link SqlRegistry}. */
export interface SqlRegistryOptions {
  /** Which SQL the schema is created in. */
  flavour: Flavour;
  /** Called once by `close()` after the database is destroyed (releases a file lock). */
  onClose?: () => void | Promise<void>;
  /**
   * PostgreSQL: the schema that holds the registry and kysely's migration tables. Without it
   * kysely takes migration tables found in any schema for its own and then fails to use them.
   */
  schema?: string;
  /** The registry's name in error messages (a URL without its password). Errors of the database
   * are wrapped, naming the registry and the operation, when it is given. */
  name?: string;
  /** Time limit of one operation, in seconds, for a database you built yourself; none when unset.
   * ({@link openSqlRegistry} sets none: its PostgreSQL pool limits each operation itself.) */
  timeout?: number;
}

/**
 * The {@link Registry} over any kysely database of the {@link Schema}. It sets no time limit of
 * its own: the database's driver does (for PostgreSQL, {@link openSqlRegistry}'s pool).
 */
export class SqlRegistry implements Registry {
  #db: Kysely<Schema>;
  #onClose?: () => void | Promise<void>;
  #closed = false;
  #name?: string;
  #timeout?: number;

  /** The kysely database, untyped. @deprecated Use {@link SqlRegistry.database}, typed. */
  get db(): unknown {
    return this.#db;
  }

  /** The kysely database of `registry`, for queries the Registry interface does not offer. On
   * PostgreSQL from {@link openSqlRegistry}, one checkout (a transaction, say) gets `queryTimeout`
   * seconds in all. */
  static database(registry: SqlRegistry): Kysely<Schema> {
    return registry.#db;
  }

  private constructor(db: Kysely<Schema>, opts: SqlRegistryOptions) {
    this.#db = db;
    this.#onClose = opts.onClose;
    this.#name = opts.name;
    this.#timeout = opts.timeout;
  }

  /**
   * Bring the schema up to date (kysely migrations) and return the registry, which then owns `db`.
   * @throws {RegistryError} naming the migration when the schema cannot be brought up to date.
   */
  static async create(db: Kysely<Schema>, opts: SqlRegistryOptions): Promise<SqlRegistry> {
    const { error, results } = await new Migrator({
      db,
      provider: provider(opts.flavour),
      migrationTableSchema: opts.schema,
    }).migrateToLatest();
    if (error) {
      const failed = results?.find((r) => r.status === "Error")?.migrationName;
      throw new RegistryError(
        `Cannot migrate the registry schema${failed ? ` (${failed})` : ""}: ${(error as Error).message}`,
        { cause: error },
      );
    }
    return new SqlRegistry(db, opts);
  }

  #open(): Kysely<Schema> {
    if (this.#closed) throw new ClosedError("The registry is closed");
    return this.#db;
  }

  /**
   * Run one operation on one connection (so that a pool's time limit of a checkout is the
   * operation's); database errors, timeouts included, name the registry and `op`.
   */
  async #run<T>(op: string, work: (db: Kysely<Schema>) => Promise<T>): Promise<T> {
    const running = this.#open().connection().execute(work);
    if (this.#name === undefined && this.#timeout === undefined) return await running;
    try {
      const r = this.#timeout === undefined ? await running : await within(running, this.#timeout);
      if (r === TIMED_OUT) {
        const name = this.#name === undefined ? "" : `Registry ${JSON.stringify(this.#name)}: `;
        throw new RegistryTimeoutError(`${name}${op} got no answer within ${this.#timeout} s`);
      }
      return r;
    } catch (e) {
      if (this.#name === undefined) throw e;
      const message = `Registry ${JSON.stringify(this.#name)}: ${op} failed: ${(e as Error)?.message ?? e}`;
      if (e instanceof RegistryTimeoutError) throw new RegistryTimeoutError(message, { cause: e });
      if (e instanceof NovaletError) throw e; // NotFound, ClosedError: already say what happened
      throw new RegistryError(message, { cause: e });
    }
  }

  /**
   * Create the row of (host, binary), or return the existing one (its topic updated when it
   * differs). Safe when several processes race.
   * @throws {TypeError} for a field that is not a string of 1 to 255 characters.
   */
  async register(s: ServiceRegistration): Promise<ServiceRecord> {
    this.#open();
    const host = checkName("host", s?.host);
    const binary = checkName("binary", s?.binary);
    const topic = checkName("topic", s?.topic);
    const settings = {
      report_interval: checkSeconds("reportInterval", s.reportInterval),
      service_down_time: checkSeconds("serviceDownTime", s.serviceDownTime),
    };
    const now = new Date().toISOString();
    return await this.#run(`register(${quote(host)}, ${quote(binary)})`, async (db) => {
      // Insert-or-nothing, then read: two processes racing end with one row.
      await db.insertInto("services")
        .values({ host, binary, topic, created_at: now, updated_at: now, ...settings })
        .onConflict((oc) => oc.columns(["host", "binary"]).doNothing())
        .execute();
      let row = await db.selectFrom("services").selectAll().where("host", "=", host).where("binary", "=", binary)
        .executeTakeFirstOrThrow();
      const changed = row.topic !== topic ||
        (["report_interval", "service_down_time"] as const).some((k) =>
          settings[k] !== null && settings[k] !== (row[k] === null ? null : Number(row[k]))
        );
      if (changed) {
        const set = {
          topic,
          updated_at: now,
          ...Object.fromEntries(Object.entries(settings).filter(([, v]) => v !== null)),
        };
        row = await db.updateTable("services").set(set).where("id", "=", row.id).returningAll()
          .executeTakeFirstOrThrow();
      }
      return toRecord(row);
    });
  }

  /**
   * A heartbeat: add 1 to reportCount and set lastSeenUp to now.
   * @throws {NotFound} when no service has that id (its row was deleted).
   */
  async reportState(id: number): Promise<ServiceRecord> {
    this.#open();
    checkId(id);
    const now = new Date().toISOString();
    return await this.#run(`reportState(${id})`, async (db) => {
      const row = await db.updateTable("services")
        .set({ report_count: sql<number>`report_count + 1`, last_seen_up: now, updated_at: now })
        .where("id", "=", id).returningAll().executeTakeFirst();
      if (!row) throw new NotFound(`Service ${id} not found: cannot report its state`);
      return toRecord(row);
    });
  }

  /**
   * Heartbeats of many services in one database operation: one transaction, so a `sqljs:` file
   * is written once. Each time an id appears it adds 1 to that service's reportCount; lastSeenUp
   * is set to now. A conductor uses it to commit the heartbeats that reach it close together.
   * @param ids The services' ids, in any order; an id may appear more than once.
   * @returns For each element of `ids`, in the same order, the record after that heartbeat (an id
   * given twice gets two successive records), or undefined when no service has that id.
   * @throws {TypeError} when `ids` is not an array or one of them is not a positive integer;
   * nothing is written then.
   * @example
   * ```ts
   * const [a, gone] = await registry.reportStates([row.id, 12345]); // gone: undefined (no row)
   * ```
   */
  async reportStates(ids: readonly number[]): Promise<Array<ServiceRecord | undefined>> {
    this.#open();
    if (!Array.isArray(ids)) throw new TypeError(`Invalid service ids ${quote(ids)}: must be an array`);
    // One UPDATE touches a row once: an id's k-th occurrence goes into the k-th round.
    const rounds: number[][] = [];
    const seen = new Map<number, number>();
    for (const id of ids) {
      checkId(id);
      const k = seen.get(id) ?? 0;
      seen.set(id, k + 1);
      (rounds[k] ??= []).push(id);
    }
    if (ids.length === 0) return [];
    const statements: { round: number; ids: number[] }[] = [];
    rounds.forEach((round, k) => {
      for (let i = 0; i < round.length; i += MAX_IDS_PER_STATEMENT) {
        statements.push({ round: k, ids: round.slice(i, i + MAX_IDS_PER_STATEMENT) });
      }
    });
    const now = new Date().toISOString();
    const byRound = rounds.map(() => new Map<number, ServiceRecord>());
    await this.#run(`reportStates(${ids.length} ids)`, async (db) => {
      const update = async (q: Kysely<Schema>) => {
        for (const s of statements) {
          const rows = await q.updateTable("services")
            .set({ report_count: sql<number>`report_count + 1`, last_seen_up: now, updated_at: now })
            .where("id", "in", s.ids).returningAll().execute();
          for (const row of rows) byRound[s.round]!.set(Number(row.id), toRecord(row));
        }
      };
      // A single statement is a transaction of its own; BEGIN/COMMIT would cost round trips.
      if (statements.length === 1) await update(db);
      else await db.transaction().execute(update);
    });
    seen.clear();
    return ids.map((id) => {
      const k = seen.get(id) ?? 0;
      seen.set(id, k + 1);
      return byRound[k]!.get(id);
    });
  }

  /** The service of that id, or undefined when there is none. */
  async get(id: number): Promise<ServiceRecord | undefined> {
    this.#open();
    checkId(id);
    return await this.#run(`get(${id})`, async (db) => {
      const row = await db.selectFrom("services").selectAll().where("id", "=", id).executeTakeFirst();
      return row && toRecord(row);
    });
  }

  /**
   * The services matching every field given in `filter`, by id.
   * @throws {TypeError} for a filter field that is not a string of 1 to 255 characters.
   */
  async list(filter: { topic?: string; host?: string; binary?: string } = {}): Promise<ServiceRecord[]> {
    this.#open();
    const topic = filter.topic === undefined ? undefined : checkField("topic", filter.topic);
    const host = filter.host === undefined ? undefined : checkField("host", filter.host);
    const binary = filter.binary === undefined ? undefined : checkField("binary", filter.binary);
    return await this.#run("list", async (db) => {
      let q = db.selectFrom("services").selectAll();
      if (topic !== undefined) q = q.where("topic", "=", topic);
      if (host !== undefined) q = q.where("host", "=", host);
      if (binary !== undefined) q = q.where("binary", "=", binary);
      return (await q.orderBy("id").execute()).map(toRecord);
    });
  }

  /** Admin edits touch updated_at, never last_seen_up: they cannot make a dead service look alive. */
  async #edit(id: number, set: Updateable<ServicesTable>, what: string, op: string): Promise<ServiceRecord> {
    this.#open();
    checkId(id);
    return await this.#run(`${op}(${id})`, async (db) => {
      const row = await db.updateTable("services")
        .set({ ...set, updated_at: new Date().toISOString() })
        .where("id", "=", id).returningAll().executeTakeFirst();
      if (!row) throw new NotFound(`Service ${id} not found: cannot ${what}`);
      return toRecord(row);
    });
  }

  /**
   * Disable or enable a service; `reason` is kept while disabled. Never moves lastSeenUp.
   * @throws {NotFound} when no service has that id.
   */
  setDisabled(id: number, disabled: boolean, reason?: string): Promise<ServiceRecord> {
    if (typeof disabled !== "boolean") throw new TypeError(`Invalid disabled ${quote(disabled)}: must be a boolean`);
    if (reason !== undefined && (typeof reason !== "string" || reason.length > 255)) {
      throw new TypeError(`Invalid reason ${quote(reason)}: must be a string of at most 255 characters`);
    }
    return this.#edit(
      id,
      { disabled: disabled ? 1 : 0, disabled_reason: disabled ? reason ?? null : null },
      disabled ? "disable" : "enable",
      "setDisabled",
    );
  }

  /**
   * Mark a service down whatever its heartbeats say (false lifts it). Never moves lastSeenUp.
   * @throws {NotFound} when no service has that id.
   */
  setForcedDown(id: number, forcedDown: boolean): Promise<ServiceRecord> {
    if (typeof forcedDown !== "boolean") {
      throw new TypeError(`Invalid forcedDown ${quote(forcedDown)}: must be a boolean`);
    }
    return this.#edit(
      id,
      { forced_down: forcedDown ? 1 : 0 },
      forcedDown ? "force down" : "lift its forced down",
      "setForcedDown",
    );
  }

  /**
   * Delete the service's row.
   * @throws {NotFound} when no service has that id.
   */
  async remove(id: number): Promise<void> {
    this.#open();
    checkId(id);
    await this.#run(`remove(${id})`, async (db) => {
      const r = await db.deleteFrom("services").where("id", "=", id).executeTakeFirst();
      if (Number(r.numDeletedRows) === 0) throw new NotFound(`Service ${id} not found: cannot delete it`);
    });
  }

  /** Close the database (and release a file's lock). Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    try {
      await this.#db.destroy();
    } finally {
      await this.#onClose?.();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Opening a registry from a URL
// ---------------------------------------------------------------------------------------------

/** Options of {@link openSqlRegistry}. */
export interface OpenRegistryOptions {
  /** PostgreSQL schema to use (created if missing); also `?schema=NAME` in the URL. */
  schema?: string;
  /** PostgreSQL: the most connections open at once. Default 10. */
  poolSize?: number;
  /**
   * PostgreSQL: the time limit of one registry operation, and of opening a connection, in
   * seconds (default {@link DEFAULT_QUERY_TIMEOUT}); also `?query_timeout=SECONDS` in the URL.
   * An operation past it rejects with {@link RegistryTimeoutError} and its connection is closed.
   */
  queryTimeout?: number;
}

/** A time limit in seconds, from an option or the URL. */
function checkTimeout(name: string, v: unknown): number {
  const n = typeof v === "string" && v.trim() !== "" ? Number(v) : v;
  if (typeof n !== "number" || !Number.isFinite(n) || n <= 0 || n > 3600) {
    throw new TypeError(`Invalid ${name} ${quote(v)}: must be a number of seconds, more than 0 and at most 3600`);
  }
  return n;
}

interface SqlJsStatic {
  Database: new (bytes?: Uint8Array) => SqlJsDatabaseLike;
}
let sqlJs: Promise<SqlJsStatic> | undefined;
function loadSqlJs(): Promise<SqlJsStatic> {
  return sqlJs ??= import("sql.js").then((m) => (m.default as unknown as () => Promise<SqlJsStatic>)());
}

/**
 * Open a registry: `sqljs::memory:` (the default), `sqljs:PATH` (a file), or
 * `postgres://user:pass@host:port/db[?schema=NAME][&query_timeout=SECONDS]`.
 * @throws {TypeError} for a URL of another kind, or a bad option (schema, query_timeout).
 * @throws {RegistryError} naming the URL or file when it cannot be opened ({RegistryInUse}: a file in use by
 * another process), a corrupt file, an unreachable server, a failed migration.
 * @throws {RegistryTimeoutError} when PostgreSQL did not answer within the time limit.
 */
export async function openSqlRegistry(url = "sqljs::memory:", opts: OpenRegistryOptions = {}): Promise<SqlRegistry> {
  if (typeof url !== "string") throw new TypeError(`Invalid registry URL ${quote(url)}: not a string`);
  if (url === "sqljs::memory:" || url === "sqljs:") return await openSqlJs();
  if (url.startsWith("sqljs:")) return await openSqlJs(url.slice("sqljs:".length));
  if (/^postgres(ql)?:\/\//.test(url)) return await openPostgres(url, opts);
  throw new TypeError(
    `Unsupported registry URL ${quote(redactUrl(url))}: expected "sqljs::memory:", "sqljs:PATH" or "postgres://..."`,
  );
}

async function openSqlJs(path?: string): Promise<SqlRegistry> {
  const SQL = await loadSqlJs();
  if (path === undefined) {
    return await SqlRegistry.create(
      new Kysely<Schema>({ dialect: new SqlJsDialect({ database: new SQL.Database() }) }),
      {
        flavour: "sqlite",
      },
    );
  }
  const { file, bytes } = SqlJsFile.acquire(path);
  let database: SqlJsDatabaseLike;
  try {
    database = new SQL.Database(bytes);
    // sql.js reads lazily: make a corrupt file fail here, with its name, before anything writes.
    database.exec("select count(*) from sqlite_master");
  } catch (e) {
    file.release();
    throw new RegistryError(
      `Cannot open registry file "${file.path}": ${(e as Error).message}; the file was left as it is`,
      { cause: e },
    );
  }
  const db = new Kysely<Schema>({ dialect: new SqlJsDialect({ database, onCommit: (d) => file.save(d) }) });
  try {
    return await SqlRegistry.create(db, { flavour: "sqlite", onClose: () => file.release() });
  } catch (e) {
    await db.destroy().catch(() => {});
    file.release();
    throw e;
  }
}

async function openPostgres(url: string, opts: OpenRegistryOptions): Promise<SqlRegistry> {
  const parsed = new URL(url);
  const schema = opts.schema ?? parsed.searchParams.get("schema") ?? undefined;
  parsed.searchParams.delete("schema");
  if (schema !== undefined && !/^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(schema)) {
    throw new TypeError(`Invalid PostgreSQL schema ${quote(schema)}: must be an identifier`);
  }
  // Seconds, like every time in novalet; taken out of the URL, where pg would read milliseconds.
  const fromUrl = parsed.searchParams.get("query_timeout");
  parsed.searchParams.delete("query_timeout");
  const timeout = opts.queryTimeout !== undefined
    ? checkTimeout("queryTimeout", opts.queryTimeout)
    : fromUrl !== null
    ? checkTimeout("query_timeout", fromUrl)
    : DEFAULT_QUERY_TIMEOUT;
  const limitMs = Math.ceil(timeout * 1000);
  const name = redactUrl(url);
  const { default: pg } = await import("pg");
  const pool = new pg.Pool({
    connectionString: parsed.toString(),
    max: opts.poolSize ?? 10,
    connectionTimeoutMillis: limitMs,
    // Finds a dead peer under an idle pooled connection; the time limit covers busy ones.
    keepAlive: true,
    keepAliveInitialDelayMillis: 10_000,
    // The server gives up on a statement when we do, so a heartbeat we reported as failed
    // cannot commit later, once a lock it waited for is free.
    statement_timeout: limitMs,
    ...(schema ? { options: `-c search_path=${schema}` } : {}),
  });
  const db = new Kysely<Schema>({ dialect: new PostgresDialect({ pool: new GuardedPool(pool, { limitMs }) }) });
  try {
    if (schema) await sql`create schema if not exists ${sql.id(schema)}`.execute(db);
    // The schema in use (the search_path's first) is named to kysely, so that migration tables
    // of another schema in the same database are never mistaken for ours.
    const current = schema ?? (await sql<{ s: string }>`select current_schema() as s`.execute(db)).rows[0]?.s;
    return await SqlRegistry.create(db, { flavour: "postgres", schema: current, name });
  } catch (e) {
    await db.destroy().catch(() => {});
    const Failure = e instanceof RegistryTimeoutError ? RegistryTimeoutError : RegistryError;
    throw new Failure(`Cannot open registry ${quote(redactUrl(url))}: ${(e as Error).message}`, { cause: e });
  }
}
