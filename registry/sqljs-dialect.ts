/**
 * A kysely dialect for sql.js (SQLite compiled to WebAssembly). Only the execution layer is
 * new: kysely's SQLite driver, adapter, query compiler and introspector do the rest, through
 * their `SqliteDatabase` interface, which {@link SqlJsDatabase} implements over sql.js.
 *
 * sql.js keeps the database in memory. `onCommit` runs after every change that is committed
 * (a write outside a transaction, or a COMMIT), still under kysely's connection lock, so a
 * caller can write the database to a file before the change is acknowledged.
 *
 * @module
 */

import { type SqliteDatabase, SqliteDialect, type SqliteStatement } from "kysely";

/** The part of a sql.js `Statement` used here; typed locally so sql.js stays out of the types. */
export interface SqlJsStatementLike {
  bind(values?: unknown[]): boolean;
  step(): boolean;
  getAsObject(): Record<string, unknown>;
  getColumnNames(): string[];
  free(): boolean;
}

/** The part of a sql.js `Database` used here. */
export interface SqlJsDatabaseLike {
  prepare(sql: string): SqlJsStatementLike;
  exec(sql: string): { columns: string[]; values: unknown[][] }[];
  getRowsModified(): number;
  export(): Uint8Array;
  close(): void;
}

/** Options of {@link SqlJsDialect}. */
export interface SqlJsDialectConfig {
  /** An open sql.js database; the dialect owns it and closes it when kysely is destroyed. */
  database: SqlJsDatabaseLike;
  /** Called after each committed change, with the database. Throwing fails that statement. */
  onCommit?: (db: SqlJsDatabaseLike) => void;
}

// Not "with": a common table expression may lead an INSERT, UPDATE or DELETE, so it counts as a
// write (a WITH … SELECT outside a transaction then saves the file once more, which is harmless).
const READS = new Set(["select", "pragma", "explain", "savepoint", "release"]);

/** What a statement does to the transaction state: begin, commit, rollback, read or write. */
function statementKind(sql: string): string {
  const verb = /^\s*(\w+)/.exec(sql)?.[1]?.toLowerCase() ?? "";
  if (verb === "begin" || verb === "commit" || verb === "insert") return verb;
  if (verb === "end") return "commit";
  if (verb === "rollback") return /^\s*rollback\s+(transaction\s+)?to\b/i.test(sql) ? "read" : "rollback";
  return READS.has(verb) ? "read" : "write";
}

/** kysely's `SqliteDatabase` over a sql.js database. Every statement is freed on every path. */
export class SqlJsDatabase implements SqliteDatabase {
  #db: SqlJsDatabaseLike;
  #onCommit?: (db: SqlJsDatabaseLike) => void;
  #inTransaction = false;

  /** Wraps `config.database`. */
  constructor(config: SqlJsDialectConfig) {
    this.#db = config.database;
    this.#onCommit = config.onCommit;
  }

  /**
   * Compile `sql`. The statement is freed after one run (`all`, `run`, or `iterate` to its end);
   * kysely prepares a fresh one per execution. Throws sql.js's error for invalid SQL.
   */
  prepare(sql: string): SqliteStatement {
    const stmt = this.#db.prepare(sql);
    let reader: boolean;
    try {
      reader = stmt.getColumnNames().length > 0;
    } catch (e) {
      stmt.free();
      throw e;
    }
    const kind = statementKind(sql);
    const rows = function* (params: ReadonlyArray<unknown>): Generator<Record<string, unknown>> {
      try {
        stmt.bind(params as unknown[]);
        while (stmt.step()) yield stmt.getAsObject();
      } finally {
        stmt.free();
      }
    };
    return {
      reader,
      all: (params) => {
        const out = [...rows(params)];
        this.#after(kind);
        return out;
      },
      run: (params) => {
        for (const _ of rows(params)) { /* a statement without result columns yields nothing */ }
        const changes = this.#db.getRowsModified();
        const lastInsertRowid = kind === "insert"
          ? Number(this.#db.exec("select last_insert_rowid()")[0]?.values[0]?.[0] ?? 0)
          : 0;
        this.#after(kind);
        return { changes, lastInsertRowid };
      },
      iterate: (params) => rows(params),
    };
  }

  /** Track transactions by their statements and report committed changes. */
  #after(kind: string): void {
    if (kind === "begin") this.#inTransaction = true;
    else if (kind === "rollback") this.#inTransaction = false;
    else if (kind === "commit" || ((kind === "write" || kind === "insert") && !this.#inTransaction)) {
      this.#inTransaction = false;
      this.#onCommit?.(this.#db);
    }
  }

  /** Close the sql.js database. */
  close(): void {
    this.#db.close();
  }
}

/** kysely's SQLite dialect running on sql.js. */
export class SqlJsDialect extends SqliteDialect {
  /** A dialect over `config.database`, calling `config.onCommit` after each committed change. */
  constructor(config: SqlJsDialectConfig) {
    super({ database: new SqlJsDatabase(config) });
  }
}
