/** Small helpers shared by the test files. */
import { afterEach } from "node:test";
import process from "node:process";

import type { LogFields, Logger } from "../index.ts";

/** A unique topic prefix, so concurrent runs on one broker never see each other. */
export function uniquePrefix(tag = "t"): string {
  return `nvt-${tag}-${crypto.randomUUID().slice(0, 8)}`;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Poll `check` until it returns true; fail with `what` after `timeoutMs`. */
export async function waitFor(check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const end = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > end) throw new Error(`Timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(2);
  }
}

/** A logger that keeps its lines, so tests can check what was logged (and keep output quiet). */
export class MemoryLogger implements Logger {
  lines: { level: string; msg: string; fields?: LogFields }[] = [];
  debug(msg: string, fields?: LogFields): void {
    this.lines.push({ level: "debug", msg, fields });
  }
  info(msg: string, fields?: LogFields): void {
    this.lines.push({ level: "info", msg, fields });
  }
  warn(msg: string, fields?: LogFields): void {
    this.lines.push({ level: "warn", msg, fields });
  }
  error(msg: string, fields?: LogFields): void {
    this.lines.push({ level: "error", msg, fields });
  }
  has(level: string, pattern: RegExp): boolean {
    return this.lines.some((l) => l.level === level && pattern.test(l.msg));
  }
}

export const utf8 = (s: string): Uint8Array => new TextEncoder().encode(s);
export const text = (b: Uint8Array): string => new TextDecoder().decode(b);

/** The command that runs a TypeScript file in a child process: tsx under Node, `deno run` under Deno. */
export function childCommand(script: string, args: string[] = []): string[] {
  const deno = (globalThis as { Deno?: { execPath(): string } }).Deno;
  if (deno) return [deno.execPath(), "run", "-A", script, ...args];
  return [process.execPath, "--import", "tsx", script, ...args];
}

/** Inside a describe(): what the returned function is given is closed after each test, last first. */
export function closedAfterEach(): <T extends { close(): Promise<unknown> }>(x: T) => T {
  let opened: { close(): Promise<unknown> }[] = [];
  afterEach(async () => {
    for (const o of opened.reverse()) await o.close();
    opened = [];
  });
  return (x) => {
    opened.push(x);
    return x;
  };
}
