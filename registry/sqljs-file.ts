/**
 * A sql.js database kept in a file: loaded at open, written back atomically after every
 * committed change (temp file, fsync, rename, fsync of the folder), and guarded by a lock file
 * so a second process cannot silently overwrite the first one's changes.
 *
 * @module
 */

import {
  closeSync,
  existsSync,
  fsyncSync,
  openSync,
  readFileSync,
  realpathSync,
  renameSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { basename, dirname, join, resolve } from "node:path";
import { hostname } from "node:os";
import process from "node:process";
import { redactUrl, RegistryError, RegistryInUse } from "../mod.ts";
import type { SqlJsDatabaseLike } from "./sqljs-dialect.ts";

interface LockInfo {
  pid: number;
  host: string;
  since: string;
  /** The holder's command line (script name and arguments, passwords hidden), to name it. */
  command?: string;
}

/** This process's command line for the lock, e.g. `cli.ts conductor --registry_url=sqljs:x.db`. */
function commandLine(): string {
  const line = [basename(process.argv[1] ?? process.argv[0] ?? "?"), ...process.argv.slice(2)].map(redactUrl).join(" ");
  return line.length > 200 ? `${line.slice(0, 200)}…` : line;
}

/** The file's own path, symbolic links resolved (also in its folders, for a file not yet made),
 * so that every name of one file locks and replaces that file, not a link to it. */
function realPath(path: string): string {
  const full = resolve(path);
  try {
    return realpathSync(full);
  } catch {
    try {
      return join(realpathSync(dirname(full)), basename(full));
    } catch {
      return full; // no folder yet: the write will say so
    }
  }
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as { code?: string }).code === "EPERM"; // exists, owned by someone else
  }
}

/** The lock and the atomic writes of one database file. */
export class SqlJsFile {
  /** The database file, as an absolute path. */
  readonly path: string;
  /** The lock file beside it (`PATH.lock`), holding the holder's pid, host and start time. */
  readonly lockPath: string;
  #released = false;

  private constructor(path: string) {
    this.path = path;
    this.lockPath = `${path}.lock`;
  }

  /**
   * Take the file's lock and read its bytes (undefined for a new file). A lock left by a dead
   * process on this host is taken over.
   * @throws {RegistryInUse} naming the holder when a live process (this one included) holds the
   * lock; naming the file when it cannot be locked or read.
   */
  static acquire(path: string): { file: SqlJsFile; bytes?: Uint8Array } {
    const file = new SqlJsFile(realPath(path));
    file.#lock();
    try {
      const bytes = existsSync(file.path) ? new Uint8Array(readFileSync(file.path)) : undefined;
      return { file, bytes };
    } catch (e) {
      file.release();
      throw new RegistryError(`Cannot read registry file "${file.path}": ${(e as Error).message}`, { cause: e });
    }
  }

  #lock(): void {
    const me: LockInfo = {
      pid: process.pid,
      host: hostname(),
      since: new Date().toISOString(),
      command: commandLine(),
    };
    for (let attempt = 0; attempt < 3; attempt++) {
      try {
        const fd = openSync(this.lockPath, "wx");
        try {
          writeSync(fd, JSON.stringify(me));
          fsyncSync(fd);
        } finally {
          closeSync(fd);
        }
        return;
      } catch (e) {
        if ((e as { code?: string }).code !== "EEXIST") {
          throw new RegistryError(`Cannot lock registry file "${this.path}": ${(e as Error).message}`, { cause: e });
        }
      }
      let holder: LockInfo | undefined;
      try {
        holder = JSON.parse(readFileSync(this.lockPath, "utf8"));
      } catch { /* a lock being written right now, or garbage left by a crash mid-write */ }
      if (holder && (holder.host !== me.host || alive(holder.pid))) {
        const who = holder.pid === me.pid && holder.host === me.host
          ? "this process"
          : `process ${holder.pid}${typeof holder.command === "string" ? ` (${JSON.stringify(holder.command)})` : ""}`;
        throw new RegistryInUse(
          `Registry file "${this.path}" is in use by ${who} on ${holder.host} since ${holder.since} ` +
            `(lock file "${this.lockPath}"); close it there first`,
        );
      }
      // The holder is dead (or the lock is unreadable after a crash): take the lock over.
      try {
        unlinkSync(this.lockPath);
      } catch { /* someone else took it over first; try again */ }
    }
    throw new RegistryError(
      `Cannot lock registry file "${this.path}": the lock file "${this.lockPath}" keeps changing`,
    );
  }

  /**
   * Write the database atomically: a reader sees the old file or the new one, never a mix.
   * Throws the file system's error (e.g. ENOSPC); the file then still holds the previous state.
   */
  save(db: SqlJsDatabaseLike): void {
    const bytes = db.export();
    const tmp = `${this.path}.tmp-${process.pid}`;
    const fd = openSync(tmp, "w");
    try {
      writeFileSync(fd, bytes);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, this.path);
    // The rename itself is durable only once the folder is synced.
    const dir = openSync(dirname(this.path), "r");
    try {
      fsyncSync(dir);
    } finally {
      closeSync(dir);
    }
  }

  /** Remove the lock. Idempotent. */
  release(): void {
    if (this.#released) return;
    this.#released = true;
    try {
      unlinkSync(this.lockPath);
    } catch { /* already gone */ }
  }
}
