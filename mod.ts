/**
 * novalet's core — a service framework after the one inside OpenStack Nova.
 *
 * A process runs services. A service is a *manager* (a class whose public methods are its RPC
 * API), a *transport* (MQTT, or in memory) and a *registry* (SQL) where it proves it is alive.
 * Other services reach it with {@link Rpc.call} (waits for the reply) and {@link Rpc.cast}
 * (fire and forget).
 *
 * This file is the whole core and imports nothing but the platform. Plug-ins (transports/,
 * registry/) import it for their interfaces; open.ts maps URLs to them; index.ts, the package
 * entry, gives both. Reading order:
 *
 * 1. The contract — all a transport, registry or codec author needs: errors, `Logger`,
 *    `Transport` (and the rules every transport keeps), `Registry`, `Opener`, the envelopes and
 *    `Codec`, `RequestContext`.
 * 2. The behaviour, along the path of a call: logging, addresses, the JSON codec, `Rpc` (a
 *    request leaves), `Manager`, `Dispatcher` (a request becomes a method call, its result a
 *    reply), loops, liveness, flags, `Service`, `serve()`.
 * 3. The machinery that makes it fast, fenced off: each piece says in a line why it exists;
 *    bench/README.md has the measurements.
 *
 * @example
 * ```ts
 * import { Manager, RequestContext, Service } from "./index.ts";
 *
 * class Calc extends Manager {
 *   add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
 *     return a + b;
 *   }
 * }
 * const svc = Service.create({ host: "h1", topic: "calc", manager: Calc }); // memory://, sqljs::memory:
 * await svc.start();
 * console.log(await svc.rpc.call(new RequestContext(), "calc", { method: "add", args: { a: 1, b: 2 } }));
 * await svc.stop();
 * ```
 *
 * @module
 */

import { AsyncLocalStorage, createHook } from "node:async_hooks";
import { Buffer } from "node:buffer";
import { hostname } from "node:os";
import { basename, extname, resolve as resolvePath } from "node:path";
import { pathToFileURL } from "node:url";
import process from "node:process";
// Node's timers on Deno too: ref()/unref() let an idle timeout list wait without holding the process.
import { setTimeout as setNodeTimeout } from "node:timers";

// =============================================================================================
// Part 1. The contract: what a transport, a registry or a codec author needs
// =============================================================================================

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/** Options shared by novalet's errors. */
export interface NovaletErrorOptions {
  /** The error that caused this one. */
  cause?: unknown;
  /** JSON-serialisable details that cross the wire as `error.data`. */
  data?: unknown;
}

/**
 * The base of novalet's errors: `name` is the class's name, so it crosses the wire as the remote
 * `type`. Catch a subclass; this one only says "novalet's".
 */
export class NovaletError extends Error {
  /** JSON-serialisable details; they cross the wire as `error.data`. */
  readonly data?: unknown;
  /** An error with `message`, and the cause and data of `opts`. */
  constructor(message: string, opts?: NovaletErrorOptions) {
    super(message, { cause: opts?.cause });
    this.name = new.target.name;
    if (opts?.data !== undefined) this.data = opts.data;
  }
}

/** A handler on the server threw: `type`, `message` and `data` are the server's. */
export class RemoteError extends NovaletError {
  /** The remote error's type: its `name`, or its class name when the name was `"Error"`. */
  readonly type: string;
  /** The server's stack trace, present only when the server runs with `debug`. */
  readonly remoteStack?: string;
  /** The error of a reply: the remote `type` and `message`, its `data` and stack in `opts`. */
  constructor(type: string, message: string, opts?: NovaletErrorOptions & { remoteStack?: string }) {
    super(message, opts);
    this.type = type;
    if (opts?.remoteStack !== undefined) this.remoteStack = opts.remoteStack;
  }
}

/** No reply arrived within the call's timeout. */
export class RpcTimeoutError extends NovaletError {}

/** A message could not be handed to anyone (no subscriber, a transport failure, too many calls
 * waiting): nothing ran remotely. */
export class DeliveryError extends NovaletError {}

/** An object was used after `close()` / `stop()`. */
export class ClosedError extends NovaletError {}

/** A call to one host (`topic.host`) ended because that server died before answering (its presence
 * went `lost`): the call may or may not have run. */
export class ServerDied extends NovaletError {}

/** Remote type: the manager has no callable method of that name. */
export class NoSuchMethod extends NovaletError {}

/** Remote type: the requested API version is not served (major differs or minor is newer). */
export class UnsupportedVersion extends NovaletError {}

/** Remote type: the server had no room for the request; nothing ran, the caller may retry later. */
export class Overloaded extends NovaletError {}

/** Remote type: the caller's context may not call that method (its manager's authorisation refused it). */
export class NotAuthorized extends NovaletError {}

/** Remote type: the envelope was malformed. */
export class BadRequest extends NovaletError {
  /** The request's id, when it could be read. */
  id?: string;
  /** The request's reply topic, when it could be read. */
  replyTo?: string;
  /** A malformed request, with what could be read of it in `opts`. */
  constructor(message: string, opts?: NovaletErrorOptions & { id?: string; replyTo?: string }) {
    super(message, opts);
    if (opts?.id !== undefined) this.id = opts.id;
    if (opts?.replyTo !== undefined) this.replyTo = opts.replyTo;
  }
}

/** A registry lookup named an id that has no row. */
export class NotFound extends NovaletError {}

/** The registry failed: it cannot be opened, its file is corrupt, a migration or an operation failed. */
export class RegistryError extends NovaletError {}

/** A registry operation got no answer within its time limit (a dead or half-open connection). */
export class RegistryTimeoutError extends RegistryError {}

/** A `sqljs:` registry file is held by another live process (named in the message). */
export class RegistryInUse extends RegistryError {}

/** A command line the `novalet` command cannot use (exit status 2). */
export class UsageError extends NovaletError {
  /** The command whose `--help` to read, when known. */
  command?: string;
  /** A usage error of `opts.command`. */
  constructor(message: string, opts?: NovaletErrorOptions & { command?: string }) {
    super(message, opts);
    if (opts?.command !== undefined) this.command = opts.command;
  }
}

/** A URL without its password, for messages and logs: `mqtt://user:***@host`. */
export function redactUrl(url: string): string {
  return url.replace(/(\/\/[^:/@]+:)[^@]*@/, "$1***@");
}

/** A value quoted for an error message, cut short so that a huge input cannot flood a log. */
export function quote(value: unknown, max = 60): string {
  let s: string;
  try {
    s = typeof value === "string" ? JSON.stringify(value) : typeof value === "number" && !Number.isFinite(value) // JSON would say null
      ? String(value)
      : String(JSON.stringify(value));
  } catch {
    // A BigInt, a cycle, a structure too deep for the stack, a throwing toJSON: never throw here.
    try {
      s = typeof value === "bigint" ? `${value}n` : Array.isArray(value) ? "[array]" : String(value);
    } catch {
      s = `[${typeof value}]`;
    }
  }
  return s.length > max ? `${s.slice(0, max)}…(${s.length} chars)` : s;
}

// ---------------------------------------------------------------------------------------------
// Logger
// ---------------------------------------------------------------------------------------------

/** Structured fields of a log line. */
export type LogFields = Record<string, unknown>;

/** The logger novalet writes to. Pass your own (pino fits) through the options. */
export interface Logger {
  /** Detail for debugging. */
  debug(msg: string, fields?: LogFields): void;
  /** Normal events: started, stopped, recovered. */
  info(msg: string, fields?: LogFields): void;
  /** Something was refused, dropped or retried; the process goes on. */
  warn(msg: string, fields?: LogFields): void;
  /** A failure someone should look at. */
  error(msg: string, fields?: LogFields): void;
}

/** Log levels in increasing order of severity. */
export type LogLevel = "debug" | "info" | "warn" | "error" | "silent";

// ---------------------------------------------------------------------------------------------
// Transport
// ---------------------------------------------------------------------------------------------

/** Per-publish options. */
export interface PublishOptions {
  /** 0: at most once; 1: at least once (the default of RPC messages). */
  qos?: 0 | 1;
  /** Reject with {@link DeliveryError} when the transport knows that no subscription matches
   * (memory always knows; MQTT 5 brokers say so in PUBACK). RPC sets it for calls and casts. */
  mandatory?: boolean;
  /** Seconds after which the message is worthless: MQTT 5 brokers drop it then (message expiry),
   * so an offline device is not handed hours-old work. */
  expiry?: number;
  /** Keep it as the topic's last message, handed to later subscribers (MQTT retained); an empty
   * payload clears it. Transports without retained messages ignore it. */
  retain?: boolean;
}

/** A message the broker publishes for a connection that ends without a clean disconnect (MQTT's
 * Will): how others learn that a process died or went silent. */
export interface LastWill {
  /** Where it is published. */
  topic: string;
  /** What is published. */
  payload: Uint8Array;
  /** Default 1. */
  qos?: 0 | 1;
  /** Published retained (see {@link PublishOptions.retain}). */
  retain?: boolean;
}

/** Per-subscription options. */
export interface SubscribeOptions {
  /** Share the messages of this filter with the other subscriptions of the same group. */
  group?: string;
  /** The QoS to receive at (MQTT's maximum QoS of the subscription). */
  qos?: 0 | 1;
  /** The handler takes in-process messages as values: one sent with `publishLocal` arrives as
   * `meta.local` (a private copy) with an empty payload. Without it, the handler gets bytes. */
  local?: boolean;
}

/**
 * Receives a message. It is called asynchronously, never inside `publish()`'s call stack. It may
 * keep `payload` but must not change it: the transport may hand the same bytes to other handlers
 * (the sender's are never shared). A message counts as taken when its handler has been called:
 * a QoS 1 message is acknowledged then, without waiting for a returned promise. A throw or a
 * rejection is logged by the transport ({@link runHandler}) and changes nothing else.
 */
export type MessageHandler = (payload: Uint8Array, topic: string, meta?: MessageMeta) => void | Promise<void>;

/** What a transport knows about a delivered message. */
export interface MessageMeta {
  /** The QoS it was delivered with (the dispatcher answers a QoS 0 request at QoS 0). */
  qos?: 0 | 1;
  /** An in-process message, for a subscription made with `local: true` (see publishLocal). */
  local?: unknown;
}

/** A message an in-process transport carries as a value: the codec's copy gives what encoding
 * and decoding would (JSON semantics, a private copy per receiver) without the text between. */
export interface LocalMessage {
  /** A private copy for one receiver. Each call gives a new one. */
  copy(): unknown;
  /** The message as bytes, for subscriptions that read bytes (sniffers, foreign clients). */
  bytes(): Uint8Array;
}

/** What `subscribe()` resolves with. */
export interface Subscription {
  /** Stop this subscription: resolves once no message of it will reach the handler any more. A
   * broker's transport first delivers what the broker had already sent it (a group member that
   * leaves drops nothing); an in-process one drops what it had not delivered yet. */
  unsubscribe(): Promise<void>;
  /** Optional: stop handling here but keep the subscription in a persistent broker session, so
   * messages wait for the next connection (`Service.stop()` uses it for `topic.host`). */
  detach?(): Promise<void>;
}

/**
 * Publish/subscribe with MQTT topic semantics: levels split by `/`; filters may use `+` (one
 * level) and `#` (the rest, and the parent level). A subscription with a `group` shares its
 * filter's messages with the group's other members, each message going to one of them, as MQTT
 * shared subscriptions do; without a group every matching subscription gets every message.
 *
 * Rules for every method: failures are rejected promises, never synchronous throws; after
 * `close()` every call rejects with {@link ClosedError}; a topic, filter or group that a broker
 * would refuse rejects with a TypeError. {@link TransportGuard} and {@link promising} implement
 * them. tests/transport_conformance.ts checks a transport against all of this.
 */
export interface Transport {
  /**
   * Send `payload` to the subscriptions matching `topic`. Resolves when the transport has taken
   * the message (QoS 0: handed to the connection; QoS 1: acknowledged by the broker); delivery
   * happens later, asynchronously. A rejection means it was not taken: {@link DeliveryError}
   * (no subscriber while `mandatory`, refused, connection lost), a RangeError when too large.
   * The transport copies or sends `payload` before resolving; the caller may reuse it after.
   */
  publish(topic: string, payload: Uint8Array, opts?: PublishOptions): Promise<void>;
  /** Deliver the messages matching `filter` to `handler` from when this resolves (the broker
   * confirmed the subscription) until the subscription ends. */
  subscribe(filter: string, handler: MessageHandler, opts?: SubscribeOptions): Promise<Subscription>;
  /** End every subscription and the connection it opened (a client passed in stays open); a
   * second call does nothing. Resolves once no handler will be called again; what a persistent
   * session keeps stays unacknowledged at the broker. */
  close(): Promise<void>;
  /** Optional: forget a persistent subscription (e.g. MQTT `clean: false`) for good. */
  forget?(filter: string, opts?: SubscribeOptions): Promise<void>;
  /** Optional, for transports inside one process: publish a value. Subscriptions made with
   * `local: true` get `message.copy()`, the others `message.bytes()`; the copies are taken before
   * this returns. Everything else (routing, groups, order, mandatory) is as for `publish()`. */
  publishLocal?(topic: string, message: LocalMessage, opts?: PublishOptions): Promise<void>;
  /** Optional, for brokers: open another connection to the same broker with a clean session
   * (nothing of it waits in the broker while it is away) and `will`. The caller closes it.
   * Services use it for what must go to live servers only (shared topics, fanout, replies) and
   * for presence. */
  connection?(opts: { will?: LastWill }): Promise<Transport>;
  /** Optional, for brokers: the connection's client id. */
  readonly clientId?: string;
  /** Optional, for brokers: the user the broker authenticated the connection as. An {@link Rpc} on
   * the transport puts it in its reply topic, `{prefix}/reply/{user}/{Rpc id}` (else the client
   * id), so that a broker ACL can confine a user to its own replies (Mosquitto:
   * `pattern read novalet/reply/%u/#`); a client id proves nothing, any user may take one. */
  readonly user?: string;
  /** Its subscriptions live in a persistent broker session: what they match waits there while it
   * is away (MQTT `clean: false`). */
  readonly persistent?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Topics, and the rules every transport keeps
// ---------------------------------------------------------------------------------------------

/** Does the MQTT topic filter match the topic? (`sport/+/player1`, `sport/#`). */
export function topicMatches(filter: string, topic: string): boolean {
  if (filter === topic) return true;
  // Level by level without splitting: this runs for every message a client receives.
  let f = 0; // start of the filter's current level
  let t = 0; // start of the topic's current level (past its end once the topic has no more)
  for (;;) {
    let fEnd = filter.indexOf("/", f);
    if (fEnd === -1) fEnd = filter.length;
    const wildcard = fEnd - f === 1 ? filter.charCodeAt(f) : 0;
    if (wildcard === 35 /* # */) return true; // this level, all below, and the parent itself
    if (t > topic.length) return false; // the filter has more levels than the topic
    let tEnd = topic.indexOf("/", t);
    if (tEnd === -1) tEnd = topic.length;
    if (wildcard !== 43 /* + */) {
      const len = fEnd - f;
      if (len !== tEnd - t) return false;
      for (let i = 0; i < len; i++) if (filter.charCodeAt(f + i) !== topic.charCodeAt(t + i)) return false;
    }
    if (fEnd === filter.length) return tEnd === topic.length;
    f = fEnd + 1;
    t = tEnd + 1;
  }
}

/** The longest topic MQTT can carry: a two-byte length of UTF-8 bytes. */
export const MAX_TOPIC_BYTES = 65_535;

// What brokers refuse in a topic (Mosquitto disconnects the client): control characters (Cc),
// Unicode non-characters, and lone surrogates (Cs: they have no UTF-8).
const UNSAFE_CHAR = /[\p{Cc}\p{Cs}\p{Noncharacter_Code_Point}]/u;

/** Why `s` cannot be (part of) an MQTT topic, or undefined when it can. */
function topicTextProblem(s: string): string | undefined {
  if (UNSAFE_CHAR.test(s)) return "a control character, a Unicode non-character or a lone surrogate";
  if (s.length > MAX_TOPIC_BYTES / 3 && Buffer.byteLength(s, "utf8") > MAX_TOPIC_BYTES) {
    return `more than ${MAX_TOPIC_BYTES} UTF-8 bytes`;
  }
  return undefined;
}

/** Throws a TypeError unless `filter` is a valid MQTT filter (`#` last, wildcards alone in a level). */
export function validateFilter(filter: string): void {
  if (typeof filter !== "string" || filter.length === 0) {
    throw new TypeError(`Invalid topic filter ${quote(filter)}: must be a non-empty string`);
  }
  const problem = topicTextProblem(filter);
  if (problem) throw new TypeError(`Invalid topic filter ${quote(filter)}: it contains ${problem}`);
  const parts = filter.split("/");
  parts.forEach((p, i) => {
    if ((p.includes("#") && (p !== "#" || i !== parts.length - 1)) || (p.includes("+") && p !== "+")) {
      throw new TypeError(`Invalid topic filter ${quote(filter)}: wildcards must fill a level, "#" only last`);
    }
  });
}

/** Throws a TypeError unless `topic` is a valid topic to publish to: not empty, no wildcard, no
 * control character or non-character, well-formed, at most 65,535 UTF-8 bytes. */
export function validateTopic(topic: string): void {
  if (typeof topic !== "string" || topic.length === 0 || /[+#]/.test(topic)) {
    throw new TypeError(`Invalid topic ${quote(topic)}: must be non-empty, without "+" or "#"`);
  }
  const problem = topicTextProblem(topic);
  if (problem) throw new TypeError(`Invalid topic ${quote(topic)}: it contains ${problem}`);
}

/** Throws a TypeError unless `group` is a valid shared-subscription group: one topic level. */
export function validateGroup(group: string): void {
  if (typeof group !== "string" || group === "" || /[/+#]/.test(group) || topicTextProblem(group) !== undefined) {
    throw new TypeError(
      `Invalid group ${quote(group)}: must be non-empty, without "/", "+", "#" or control characters`,
    );
  }
}

/** `fn()`'s promise, with a synchronous throw turned into a rejection (the Transport rule). */
export function promising<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return fn();
  } catch (e) {
    return Promise.reject(e);
  }
}

/**
 * The checks every transport makes, written once: after `close()` a call fails with
 * ClosedError; a topic, filter or group a broker would refuse fails with a TypeError. A
 * transport keeps one, calls a check first in `publish`/`subscribe` (inside {@link promising}),
 * and `close()` at its own close.
 */
export class TransportGuard {
  #closed = false;
  /** Topics that passed validateTopic(): RPC publishes to a few topics again and again. */
  #goodTopics = new Set<string>();

  /** Whether `close()` was called. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Mark the transport closed; false when it already was. */
  close(): boolean {
    const first = !this.#closed;
    this.#closed = true;
    return first;
  }

  /** Throws ClosedError once closed, TypeError for a topic no broker takes (checked once per topic). */
  checkPublish(topic: string): void {
    if (this.#closed) throw new ClosedError(`Cannot publish to ${topic}: the transport is closed`);
    if (this.#goodTopics.has(topic)) return;
    validateTopic(topic);
    if (this.#goodTopics.size >= 1024) this.#goodTopics.clear();
    this.#goodTopics.add(topic);
  }

  /** Throws ClosedError once closed, TypeError for a bad filter or group. */
  checkSubscribe(filter: string, opts?: SubscribeOptions): void {
    if (this.#closed) throw new ClosedError(`Cannot subscribe to ${filter}: the transport is closed`);
    validateFilter(filter);
    if (opts?.group !== undefined) validateGroup(opts.group);
  }
}

/** Call a subscription's handler for a transport: a throw or a rejection is logged and never
 * reaches the transport, so one bad handler cannot stop deliveries to the others. */
export function runHandler(
  handler: MessageHandler,
  payload: Uint8Array,
  topic: string,
  log: Logger,
  meta?: MessageMeta,
): void {
  try {
    const r = handler(payload, topic, meta);
    if (r instanceof Promise) r.catch((e) => log.error("A message handler failed", { topic, error: e }));
  } catch (e) {
    log.error("A message handler failed", { topic, error: e });
  }
}

/** The longest duration novalet accepts, in seconds: MQTT's message expiry field (~136 years). */
export const MAX_SECONDS = 4_294_967_295;

/** What {@link within} gives when time ran out. */
export const TIMED_OUT: unique symbol = Symbol("timed out");

/** `p`'s value, or TIMED_OUT after `seconds` (`p` then settles on its own, a late rejection
 * swallowed): for waits on what may hang, a registry or a broker. */
export function within<T>(p: Promise<T>, seconds: number): Promise<T | typeof TIMED_OUT> {
  let timer: { cancel(): void } | undefined;
  const late = new Promise<typeof TIMED_OUT>((r) => (timer = longTimeout(() => r(TIMED_OUT), seconds * 1000)));
  p.catch(() => {});
  return Promise.race([p, late]).finally(() => timer!.cancel());
}

// ---------------------------------------------------------------------------------------------
// Registry
// ---------------------------------------------------------------------------------------------

/** A row of the services table (Nova's `services`). */
export interface ServiceRecord {
  /** The row's id, given by the registry. */
  id: number;
  /** The host the service runs on. */
  host: string;
  /** The program, e.g. `nova-compute`; (host, binary) is unique. */
  binary: string;
  /** The topic the service consumes. */
  topic: string;
  /** Heartbeats so far. */
  reportCount: number;
  /** Disabled by an operator: still up, but schedulers should not pick it. */
  disabled: boolean;
  /** Why it was disabled, or null. */
  disabledReason: string | null;
  /** Forced down by an operator: down whatever its heartbeats say. */
  forcedDown: boolean;
  /** The last heartbeat, or null before the first. */
  lastSeenUp: Date | null;
  /** When the row was made. */
  createdAt: Date;
  /** The last change of the row. */
  updatedAt: Date;
  /** Seconds between the service's heartbeats, as it last registered; null if it did not say. */
  reportInterval: number | null;
  /** Seconds without a heartbeat after which the service is down, as it last registered; null
   * if it did not say (judges then use their own). */
  serviceDownTime: number | null;
}

/** What a service registers: who it is, and how its liveness is to be judged. */
export interface ServiceRegistration {
  /** The host it runs on. */
  host: string;
  /** Its program; (host, binary) is its row. */
  binary: string;
  /** The topic it consumes. */
  topic: string;
  /** Seconds between its heartbeats. */
  reportInterval?: number;
  /** Seconds without a heartbeat after which it is down. */
  serviceDownTime?: number;
}

/** The state a service announces on `{prefix}/presence/{topic}/{host}`, retained (README: wire
 * format): `online` when it starts, `offline` when it stops cleanly, `lost` as its Will. */
export interface Presence {
  /** `online`, `offline` (a clean stop) or `lost` (the broker published its Will). */
  state: "online" | "offline" | "lost";
  /** Grows with each start of the service (epoch ms of the start): a message of an older
   * incarnation never overrides a newer one. */
  incarnation: number;
  /** The service's topic. */
  topic: string;
  /** The service's host. */
  host: string;
  /** The service's binary. */
  binary: string;
  /** Its heartbeat interval, seconds. */
  report_interval: number;
  /** Its service_down_time, seconds. */
  service_down_time: number;
  /** When this state began (ISO 8601). */
  since: string;
}

/**
 * Where services record themselves and prove they are alive. Every method rejects (never throws)
 * with a TypeError for a bad argument, {@link NotFound} for an id without a row (edits only),
 * {@link ClosedError} after `close()`; a store that cannot be reached rejects with its own error
 * or {@link RegistryTimeoutError}. tests/registry_conformance.ts checks an implementation.
 */
export interface Registry {
  /** Create the row of (host, binary), or return the existing one (concurrent calls make one)
   * with `reportInterval` and `serviceDownTime` set to those given. */
  register(s: ServiceRegistration): Promise<ServiceRecord>;
  /** A heartbeat: reportCount + 1, lastSeenUp = updatedAt = now. */
  reportState(id: number): Promise<ServiceRecord>;
  /** The row of `id`, or undefined. */
  get(id: number): Promise<ServiceRecord | undefined>;
  /** The rows matching every given field, in id order. */
  list(filter?: { topic?: string; host?: string; binary?: string }): Promise<ServiceRecord[]>;
  /** Disable with a reason, or enable (the reason is cleared); lastSeenUp never moves. */
  setDisabled(id: number, disabled: boolean, reason?: string): Promise<ServiceRecord>;
  /** Force down, or clear it; lastSeenUp never moves. */
  setForcedDown(id: number, forcedDown: boolean): Promise<ServiceRecord>;
  /** Delete the row. */
  remove(id: number): Promise<void>;
  /** Release the store (a file is written, connections end); a second call does nothing. */
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Opening transports and registries from URLs
// ---------------------------------------------------------------------------------------------

/** Options of {@link Opener.openTransport}. */
export interface TransportOpenOptions {
  /** Where the transport logs. */
  logger?: Logger;
  /** The MQTT client id when the URL asks for a persistent session (`?session_expiry=N`). */
  sessionClientId?: string;
  /** The Will of the connection, where the transport has Wills. */
  will?: LastWill;
}

/** Options of {@link Opener.openRegistry}. */
export interface RegistryOpenOptions {
  /** Where the registry logs. */
  logger?: Logger;
  /** A transport, for a registry reached over one (`conductor:`). */
  transport?: Transport;
  /** The topic prefix on that transport. */
  prefix?: string;
  /** The codec of its messages, for a registry reached over a transport. */
  codec?: Codec;
}

/** Opens transports and registries from URLs, for a {@link Service} not given one and for
 * {@link parseFlags}' checks. The core knows no plug-in: open.ts installs itself when imported. */
export interface Opener {
  /** Open the transport of `url`. */
  openTransport(url: string, opts: TransportOpenOptions): Promise<Transport>;
  /** Open the registry of `url`. */
  openRegistry(url: string, opts: RegistryOpenOptions): Promise<Registry>;
  /** Why `url` opens no transport (or registry), in words; undefined when it does. */
  urlProblem(kind: "transport" | "registry", url: string): string | undefined;
  /** Optional: the signing codec of the key file at `path` (`--keys`). */
  openCodec?(path: string, opts: { prefix?: string; logger?: Logger }): Promise<Codec>;
}

let installed: Opener | undefined;

/** Make `opener` the one Service and parseFlags use (open.ts does this when imported). */
export function installOpener(opener: Opener): void {
  installed = opener;
}

function theOpener(what: string): Opener {
  if (installed) return installed;
  throw new TypeError(
    `Cannot open ${what}: no opener is installed; import novalet's package entry (or its open.ts), or pass a transport and a registry`,
  );
}

// ---------------------------------------------------------------------------------------------
// Envelopes and the codec
// ---------------------------------------------------------------------------------------------

/** A request envelope (the README's wire format). */
export interface RequestEnvelope {
  /** The format's version: 1. */
  v: 1;
  /** Unique per request: replies and duplicate suppression use it. */
  id: string;
  /** The manager method to run. */
  method: string;
  /** Its arguments, by name. */
  args: Record<string, unknown>;
  /** A RequestContext when encoding (its JSON is cached), its JSON form when decoded. */
  context: RequestContextJSON | Record<string, unknown> | RequestContext;
  /** Where to send the reply; none for a cast. */
  reply_to?: string;
  /** The API version the caller needs, `"major.minor"`. */
  version?: string;
  /** Epoch milliseconds after which the server drops the request. */
  deadline?: number;
  /** The caller reads batched replies (a JSON array of replies), so the reply may come in one. */
  batch?: boolean;
}

/** An error as it crosses the wire. */
export interface WireError {
  /** The error's name (its class's name for novalet's errors). */
  type: string;
  /** Its message. */
  message: string;
  /** Its `data`, when JSON can carry it. */
  data?: unknown;
  /** Only when the server runs with `debug`. */
  stack?: string;
}

/** A reply envelope: a result or an error. */
export type ReplyEnvelope = { v: 1; id: string; result: unknown } | { v: 1; id: string; error: WireError };

/**
 * Encodes and decodes envelopes. The RPC client and the dispatcher use nothing else, so another
 * wire format (oslo.messaging's, say) is one codec. The optional methods enable batching and
 * in-process values; a codec without them sends every envelope alone, as bytes.
 */
export interface Codec {
  /** A request as bytes, for transport topic `topic`. @throws {TypeError} when its args have no
   * JSON form (a BigInt, a cycle); {@link NotAuthorized} when this process may not send it. */
  encodeRequest(req: RequestEnvelope, topic?: string): Uint8Array;
  /** The request of `bytes`, which arrived on `topic`. @throws {BadRequest} with `id`/`replyTo`
   * set when they could be read. */
  decodeRequest(bytes: Uint8Array, topic?: string): RequestEnvelope;
  /** A reply as bytes, for reply topic `topic`. @throws {TypeError} when its result has no JSON form. */
  encodeReply(reply: ReplyEnvelope, topic?: string): Uint8Array;
  /** The reply of `bytes`, which arrived on `topic`. @throws {BadRequest} when the bytes are not a reply. */
  decodeReply(bytes: Uint8Array, topic?: string): ReplyEnvelope;
  /** Optional: frame several encoded requests (or replies) as one message, a batch. */
  encodeBatch?(items: Uint8Array[]): Uint8Array;
  /** Optional: the requests of a message, single or batch; a malformed one is a BadRequest in its
   * place, one the codec refuses (a bad signature) is left out, unanswered.
   * @throws {BadRequest} when the message as a whole is unreadable. */
  decodeRequests?(bytes: Uint8Array, topic?: string): { batch: boolean; items: (RequestEnvelope | BadRequest)[] };
  /** Optional: the replies of a message, single or batch; refused ones left out. */
  decodeReplies?(bytes: Uint8Array, topic?: string): ReplyEnvelope[];
  /** Optional: the bytes to publish for a message to `topic` (one envelope or a batch), e.g.
   * signed; called once per message, right before it is handed to the transport. */
  seal?(bytes: Uint8Array, topic: string): Uint8Array;
  /** Optional: throw {@link NotAuthorized} unless this process may serve `topic`; a service asks
   * before it subscribes. */
  checkServe?(topic: string): void;
  /** Optional: read its configuration (keys) again, keeping the old one when the new one is bad or
   * may not serve `topic`; `serve()` asks on SIGHUP. */
  reload?(topic?: string): Promise<void>;
  /** Optional: what decoding the encoded envelope would give, without the bytes between (a
   * private deep copy), for transports that carry values. @throws {TypeError} where encoding would. */
  copy?<E extends RequestEnvelope | ReplyEnvelope>(envelope: E): E;
}

// ---------------------------------------------------------------------------------------------
// Request context
// ---------------------------------------------------------------------------------------------

/** The fields of a new {@link RequestContext}; all optional. */
export interface RequestContextInit {
  /** Who asks. */
  userId?: string | null;
  /** On behalf of which project. */
  projectId?: string | null;
  /** Default: a new `req-UUID`. */
  requestId?: string;
  /** Default false. */
  isAdmin?: boolean;
  /** Default none. */
  roles?: readonly string[];
  /** ISO 8601; default now. */
  timestamp?: string;
}

/** The context as it travels on the wire (Nova's snake_case names). */
export interface RequestContextJSON {
  /** {@link RequestContext.userId} */
  user_id: string | null;
  /** {@link RequestContext.projectId} */
  project_id: string | null;
  /** {@link RequestContext.requestId} */
  request_id: string;
  /** {@link RequestContext.isAdmin} */
  is_admin: boolean;
  /** {@link RequestContext.roles} */
  roles: string[];
  /** {@link RequestContext.timestamp} */
  timestamp: string;
}

const NO_ROLES: readonly string[] = Object.freeze([]);

/** Who asks and which request this is, as Nova's `RequestContext`; travels with every message. */
export class RequestContext {
  /** Who asks, or null. */
  readonly userId: string | null;
  /** On behalf of which project, or null. */
  readonly projectId: string | null;
  /** The request's id: in every log line of its handlers, passed on to the calls they make. */
  readonly requestId: string;
  /** Whether the caller claims admin rights. */
  readonly isAdmin: boolean;
  /** The caller's roles (frozen). */
  readonly roles: readonly string[];
  /** ISO 8601 time of the original request. */
  readonly timestamp: string;
  /** A context from `init`, the rest at its defaults. */
  constructor(init: RequestContextInit = {}) {
    this.userId = init.userId ?? null;
    this.projectId = init.projectId ?? null;
    this.requestId = init.requestId ?? `req-${crypto.randomUUID()}`;
    this.isAdmin = init.isAdmin ?? false;
    // A frozen array cannot change under us: shared (copying contexts is then cheap).
    const roles = init.roles ?? NO_ROLES;
    this.roles = roles === NO_ROLES || Object.isFrozen(roles)
      ? roles
      : roles.length === 0
      ? NO_ROLES
      : Object.freeze([...roles]);
    this.timestamp = init.timestamp ?? new Date().toISOString();
  }
  /** An admin context, as Nova's `get_admin_context()`. */
  static admin(init: RequestContextInit = {}): RequestContext {
    return new RequestContext({ ...init, isAdmin: true });
  }
  /** The wire form. */
  toJSON(): RequestContextJSON {
    return {
      user_id: this.userId,
      project_id: this.projectId,
      request_id: this.requestId,
      is_admin: this.isAdmin,
      roles: [...this.roles],
      timestamp: this.timestamp,
    };
  }
  /**
   * Rebuild a context from its JSON form (snake_case or camelCase names).
   * @throws {TypeError} when a field has the wrong type.
   */
  static from(obj: unknown): RequestContext {
    if (obj instanceof RequestContext) return obj;
    if (obj === null || typeof obj !== "object" || Array.isArray(obj)) {
      throw new TypeError(`Invalid context ${quote(obj)}: must be an object`);
    }
    const o = obj as Record<string, unknown>;
    const isAdmin = pickField(o, "is_admin", "isAdmin");
    if (isAdmin !== undefined && typeof isAdmin !== "boolean") {
      throw new TypeError(`Invalid context field "is_admin" ${quote(isAdmin)}: must be a boolean`);
    }
    const roles = o.roles;
    if (roles !== undefined && (!Array.isArray(roles) || roles.some((r) => typeof r !== "string"))) {
      throw new TypeError(`Invalid context field "roles" ${quote(roles)}: must be an array of strings`);
    }
    return new RequestContext({
      userId: contextString("user_id", pickField(o, "user_id", "userId"), true) ?? null,
      projectId: contextString("project_id", pickField(o, "project_id", "projectId"), true) ?? null,
      requestId: contextString("request_id", pickField(o, "request_id", "requestId"), false),
      isAdmin: isAdmin as boolean | undefined,
      roles: roles as string[] | undefined,
      timestamp: contextString("timestamp", o.timestamp, false),
    });
  }
}

// Functions, not closures in from(): under tsx (esbuild's keepNames) each closure made costs a call.
function pickField(o: Record<string, unknown>, snake: string, camel: string): unknown {
  return Object.hasOwn(o, snake) ? o[snake] : o[camel];
}

function contextString(name: string, v: unknown, nullable: boolean): string | undefined {
  if (v === undefined || (nullable && v === null)) return undefined;
  if (typeof v !== "string" || v.length > 1024) {
    throw new TypeError(`Invalid context field "${name}" ${quote(v)}: must be a string${nullable ? " or null" : ""}`);
  }
  return v;
}

// =============================================================================================
// Part 2. The behaviour: a request from Rpc.call() through the transport to a manager's method, and back
// =============================================================================================

// ---------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------

// The running handler's context, so its log lines carry the request id (oslo.log's thread-local).
// Only async handlers get an AsyncLocalStorage scope: its promise hooks slow every await.
const requestScope = new AsyncLocalStorage<RequestContext>();
let syncScope: RequestContext | undefined;

/** Call `self.fn(ctx, args)` with `ctx` as the current context. */
function inScope(
  ctx: RequestContext,
  isAsync: boolean,
  fn: (ctx: RequestContext, args: unknown) => unknown,
  self: object,
  args: unknown,
): unknown {
  if (isAsync) return requestScope.run(ctx, () => fn.call(self, ctx, args));
  const outer = syncScope;
  syncScope = ctx;
  try {
    return fn.call(self, ctx, args);
  } finally {
    syncScope = outer;
  }
}

/** The context of the RPC handler running now, if any. */
export function currentContext(): RequestContext | undefined {
  return syncScope ?? requestScope.getStore();
}

const LEVELS: Record<LogLevel, number> = { debug: 10, info: 20, warn: 30, error: 40, silent: 99 };

/**
 * The default logger: readable lines (`12:00:01.234 WARN  message key=value`) or JSON lines
 * (`{"time":...,"level":"warn","msg":...,...}`) on stderr.
 */
export class ConsoleLogger implements Logger {
  #min: number;
  #json: boolean;
  #fields: LogFields;
  /** A logger writing lines at `level` (default info) and above, as `format` (default text), with `fields` on each. */
  constructor(opts: { level?: LogLevel; format?: "text" | "json"; fields?: LogFields } = {}) {
    this.#min = LEVELS[opts.level ?? "info"];
    this.#json = opts.format === "json";
    this.#fields = opts.fields ?? {};
  }
  /** A logger that adds `fields` to every line. */
  child(fields: LogFields): ConsoleLogger {
    const c = new ConsoleLogger();
    c.#min = this.#min;
    c.#json = this.#json;
    c.#fields = { ...this.#fields, ...fields };
    return c;
  }
  #write(level: Exclude<LogLevel, "silent">, msg: string, fields?: LogFields): void {
    if (LEVELS[level] < this.#min) return;
    const ctx = currentContext();
    const all = ctx
      ? { ...this.#fields, request_id: ctx.requestId, ...fields }
      : fields
      ? { ...this.#fields, ...fields }
      : this.#fields;
    const now = new Date();
    let line: string;
    if (this.#json) {
      line = safeStringify({ time: now.toISOString(), level, msg, ...all });
    } else {
      const kv = Object.entries(all).map(([k, v]) =>
        `${k}=${typeof v === "string" ? v : v instanceof Error ? quote(v.message, 200) : quote(v, 200)}`
      );
      line = `${now.toISOString().slice(11, 23)} ${level.toUpperCase().padEnd(5)} ${msg}${
        kv.length ? " " + kv.join(" ") : ""
      }`;
    }
    console.error(line);
  }
  debug(msg: string, fields?: LogFields): void {
    this.#write("debug", msg, fields);
  }
  info(msg: string, fields?: LogFields): void {
    this.#write("info", msg, fields);
  }
  warn(msg: string, fields?: LogFields): void {
    this.#write("warn", msg, fields);
  }
  error(msg: string, fields?: LogFields): void {
    this.#write("error", msg, fields);
  }
}

function safeStringify(v: unknown): string {
  try {
    return JSON.stringify(v, (_k, x) => x instanceof Error ? { name: x.name, message: x.message } : x);
  } catch {
    return JSON.stringify({ msg: String(v) });
  }
}

/** A logger that adds `fields`, and the request id of the running handler, to every line. */
export function withFields(logger: Logger, fields: LogFields): Logger {
  if (logger instanceof ConsoleLogger) return logger.child(fields);
  const all = (f?: LogFields): LogFields => {
    const ctx = currentContext();
    return ctx ? { ...fields, request_id: ctx.requestId, ...f } : { ...fields, ...f };
  };
  return {
    debug: (m, f) => logger.debug(m, all(f)),
    info: (m, f) => logger.info(m, all(f)),
    warn: (m, f) => logger.warn(m, all(f)),
    error: (m, f) => logger.error(m, all(f)),
  };
}

let defaultLogger: Logger = new ConsoleLogger({
  level: (envVar("NOVALET_LOG_LEVEL") as LogLevel | undefined) ?? "info",
  format: envVar("NOVALET_LOG_FORMAT") === "json" ? "json" : "text",
});

/** The logger used where none was passed. */
export function getLogger(): Logger {
  return defaultLogger;
}

/** Replace the logger used where none was passed. */
export function setDefaultLogger(logger: Logger): void {
  defaultLogger = logger;
}

function envVar(name: string): string | undefined {
  try {
    return process.env[name];
  } catch {
    return undefined; // Deno without --allow-env
  }
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

const BAD_NAME = /[/+#]/;

/** Topic names, host names and client ids: one topic level each, at most 255 characters. */
const MAX_NAME = 255;

/** One topic level of at most MAX_NAME characters, without what a broker refuses. */
function isName(value: unknown): value is string {
  return typeof value === "string" && value.length > 0 && value.length <= MAX_NAME && !BAD_NAME.test(value) &&
    topicTextProblem(value) === undefined;
}

function checkName(kind: string, value: unknown, where: string): string {
  if (!isName(value)) {
    throw new TypeError(
      `Invalid ${kind} ${quote(value)} in ${
        quote(where)
      }: must be 1 to ${MAX_NAME} characters, without "/", "+", "#", control characters or Unicode non-characters`,
    );
  }
  return value;
}

/** A parsed logical address: `compute` or `compute.host1`. */
export interface Address {
  /** The topic name. */
  topic: string;
  /** The host, for an address that names one server. */
  host?: string;
}

/** Split a logical address at its first `.`: topic names have no dot, host names may. */
export function parseAddress(address: string): Address {
  if (typeof address !== "string") throw new TypeError(`Invalid address ${quote(address)}: not a string`);
  const dot = address.indexOf(".");
  if (dot < 0) return { topic: checkName("topic", address, address) };
  return {
    topic: checkName("topic", address.slice(0, dot), address),
    host: checkName("host", address.slice(dot + 1), address),
  };
}

/**
 * The address of the server of `topic` on `host`, as Nova's `rpc.queue_get_for`.
 * @example `queueGetFor(ctx, "network", "host1") === "network.host1"`
 */
export function queueGetFor(_ctx: RequestContext | null, topic: string, host: string): string {
  checkName("topic", topic, `${topic}.${host}`);
  if (typeof topic === "string" && topic.includes(".")) {
    throw new TypeError(`Invalid topic ${quote(topic)}: topic names cannot contain "."`);
  }
  checkName("host", host, `${topic}.${host}`);
  return `${topic}.${host}`;
}

/** Validate an MQTT topic prefix: levels without wildcards, none empty. */
function checkPrefix(prefix: string): string {
  if (
    typeof prefix !== "string" || prefix.length > 1024 || prefix.split("/").some((p) => p === "" || /[+#]/.test(p)) ||
    topicTextProblem(prefix) !== undefined
  ) {
    throw new TypeError(
      `Invalid prefix ${
        quote(prefix)
      }: levels must be non-empty, without "+", "#", control characters or Unicode non-characters`,
    );
  }
  return prefix;
}

/** The transport topics behind logical addresses, for one prefix. */
export class Topics {
  /** The prefix of every topic: `{prefix}/rpc/...`, `{prefix}/fanout/...`, `{prefix}/reply/...`. */
  readonly prefix: string;
  /** `{prefix}/reply/`: the reply topics' common root. */
  readonly replyRoot: string;
  /** The topics of `prefix`. @throws {TypeError} for an empty level, a wildcard or a control character. */
  constructor(prefix = "novalet") {
    this.prefix = checkPrefix(prefix);
    this.replyRoot = `${prefix}/reply/`;
  }
  /** `compute` → `{prefix}/rpc/compute`; `compute.h1` → `{prefix}/rpc/compute/h1`. */
  forAddress(address: string): string {
    const { topic, host } = parseAddress(address);
    return host === undefined ? `${this.prefix}/rpc/${topic}` : `${this.prefix}/rpc/${topic}/${host}`;
  }
  /** `compute` → `{prefix}/fanout/compute`: every server of the topic. */
  fanout(topic: string): string {
    checkName("topic", topic, topic);
    return `${this.prefix}/fanout/${topic}`;
  }
  /** Where the service of `topic` on `host` announces its {@link Presence}: `{prefix}/presence/{topic}/{host}`
   * (`+` for either gives a filter). */
  presence(topic: string, host: string): string {
    if (topic !== "+") checkName("topic", topic, topic);
    if (host !== "+") checkName("host", host, host);
    return `${this.prefix}/presence/${topic}/${host}`;
  }
  /** The reply topic of an RPC client: `{prefix}/reply/{clientId}`, or under the broker user (or
   * client id) of its connection, `owner`: `{prefix}/reply/{owner}/{clientId}`. */
  reply(clientId: string, owner?: string): string {
    checkName("client id", clientId, clientId);
    if (owner === undefined) return `${this.replyRoot}${clientId}`;
    return `${this.replyRoot}${checkName("connection owner", owner, owner)}/${clientId}`;
  }
  /** Is `topic` a reply topic of this prefix: one or two non-empty levels, nothing a broker refuses? */
  isReplyTopic(topic: string): boolean {
    if (typeof topic !== "string" || !topic.startsWith(this.replyRoot)) return false;
    const rest = topic.slice(this.replyRoot.length);
    const slash = rest.indexOf("/");
    const levels = slash === -1 ? [rest] : [rest.slice(0, slash), rest.slice(slash + 1)];
    return levels.every((l) => l.length > 0 && !BAD_NAME.test(l)) && topicTextProblem(rest) === undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// The JSON codec: reading and checking envelopes
// ---------------------------------------------------------------------------------------------

const METHOD_NAME = /^[A-Za-z_$][\w$]{0,127}$/;
const VERSION = /^\d{1,9}\.\d{1,9}$/;
const MAX_ID = 128;
const MAX_REPLY_TO = 1024;
const decoder = new TextDecoder("utf-8", { fatal: true });

// Buffer.from(string) writes into a pooled slab: much cheaper than TextEncoder for small messages.
const utf8 = (s: string): Uint8Array => Buffer.from(s, "utf8");

/** Parse JSON; a text that mentions `__proto__` is parsed without that key anywhere. */
function parseJson(bytes: Uint8Array): unknown {
  return parseText(decoder.decode(bytes));
}

function parseText(text: string): unknown {
  // JSON.parse makes "__proto__" an own property, harmless until a handler copies it with
  // Object.assign or a spread-merge into a target; dropping it here closes that door for all.
  if (!text.includes("__proto__")) return JSON.parse(text);
  return JSON.parse(text, (key, value) => key === "__proto__" ? undefined : value);
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return v !== null && typeof v === "object" && !Array.isArray(v);
}

/** What is wrong with a parsed request, if anything (first problem only). */
function requestProblem(raw: Record<string, unknown>, id?: string, replyTo?: string): string | undefined {
  if (raw.v !== 1) return `"v" is ${quote(raw.v)}, expected 1`;
  if (id === undefined) return `"id" ${quote(raw.id)} must be a string of 1 to ${MAX_ID} characters`;
  if (typeof raw.method !== "string" || !METHOD_NAME.test(raw.method)) {
    return `"method" ${quote(raw.method)} must be an identifier of at most 128 characters`;
  }
  if (raw.args !== undefined && !isPlainObject(raw.args)) return `"args" ${quote(raw.args)} must be an object`;
  if (raw.context !== undefined && !isPlainObject(raw.context)) {
    return `"context" ${quote(raw.context)} must be an object`;
  }
  if (raw.reply_to !== undefined && replyTo === undefined) {
    return `"reply_to" ${quote(raw.reply_to)} must be a string of at most ${MAX_REPLY_TO} characters`;
  }
  if (raw.version !== undefined && (typeof raw.version !== "string" || !VERSION.test(raw.version))) {
    return `"version" ${quote(raw.version)} must look like "1.2"`;
  }
  if (raw.deadline !== undefined && (typeof raw.deadline !== "number" || !Number.isFinite(raw.deadline))) {
    return `"deadline" ${quote(raw.deadline)} must be a number (epoch ms)`;
  }
  if (raw.batch !== undefined && typeof raw.batch !== "boolean") return `"batch" ${quote(raw.batch)} must be a boolean`;
  return undefined;
}

/** Validate one parsed request; a BadRequest keeps the id and reply_to when they are readable. */
function checkRequest(raw: unknown): RequestEnvelope {
  if (!isPlainObject(raw)) throw new BadRequest(`Malformed request: ${quote(raw)} is not a JSON object`);
  const { id, replyTo } = readableIds(raw);
  const problem = requestProblem(raw, id, replyTo);
  if (problem !== undefined) throw new BadRequest(`Malformed request: ${problem}`, { id, replyTo });
  const req: RequestEnvelope = {
    v: 1,
    id: id!,
    method: raw.method as string,
    args: (raw.args ?? {}) as Record<string, unknown>,
    context: (raw.context ?? {}) as Record<string, unknown>,
  };
  if (replyTo !== undefined) req.reply_to = replyTo;
  if (raw.version !== undefined) req.version = raw.version as string;
  if (raw.deadline !== undefined) req.deadline = raw.deadline as number;
  if (raw.batch === true) req.batch = true;
  return req;
}

/** checkRequest(), with the BadRequest returned in place of the request (one of a batch, say). */
function requestOrBad(raw: unknown): RequestEnvelope | BadRequest {
  try {
    return checkRequest(raw);
  } catch (e) {
    return e as BadRequest; // checkRequest throws nothing else
  }
}

function checkReply(raw: unknown): ReplyEnvelope {
  if (!isPlainObject(raw) || raw.v !== 1 || typeof raw.id !== "string") {
    throw new BadRequest(`Malformed reply: ${quote(raw)} lacks "v":1 or a string "id"`);
  }
  if (Object.hasOwn(raw, "error")) {
    const e = raw.error;
    if (!isPlainObject(e) || typeof e.type !== "string" || typeof e.message !== "string") {
      throw new BadRequest(`Malformed reply ${quote(raw.id)}: "error" needs string "type" and "message"`);
    }
    const error: WireError = { type: e.type, message: e.message };
    if (e.data !== undefined) error.data = e.data;
    if (typeof e.stack === "string") error.stack = e.stack;
    return { v: 1, id: raw.id, error };
  }
  return { v: 1, id: raw.id, result: raw.result ?? null };
}

function parseOrBad(bytes: Uint8Array, what: string): unknown {
  try {
    return parseJson(bytes);
  } catch (e) {
    throw new BadRequest(`Malformed ${what}: not UTF-8 JSON (${(e as Error).message})`, { cause: e });
  }
}

/** How deep JSON may nest in a request message (a batch's array and the envelope count). */
export const MAX_JSON_DEPTH = 64;

/** The most requests one message may carry (novalet's own batches carry at most 128). */
export const MAX_BATCH = 10_000;

/**
 * The requests of a message, single or batch. A message nested too deep is refused whole: each
 * of its requests becomes a BadRequest that keeps what can be read at the top (id, reply_to), so
 * nothing recursive ever walks it (JSON.parse itself does not recurse).
 */
function parseRequests(bytes: Uint8Array): { batch: boolean; items: (RequestEnvelope | BadRequest)[] } {
  let text: string;
  let raw: unknown;
  let deep: boolean;
  try {
    text = decoder.decode(bytes);
    deep = tooDeep(text);
    // Too deep: parsed plainly (JSON.parse does not recurse; parseText's reviver would), and
    // nothing of it but its top-level id and reply_to is read.
    raw = deep ? JSON.parse(text) : parseText(text);
  } catch (e) {
    throw new BadRequest(`Malformed request: not UTF-8 JSON (${(e as Error).message})`, { cause: e });
  }
  const list = Array.isArray(raw) ? raw : undefined;
  if (list?.length === 0) throw new BadRequest("Malformed request: an empty batch");
  if (list !== undefined && list.length > MAX_BATCH) {
    throw new BadRequest(`Malformed request: a batch of ${list.length} requests, over the limit of ${MAX_BATCH}`);
  }
  if (deep) {
    const refuse = (r: unknown) => {
      const { id, replyTo } = readableIds(r);
      return new BadRequest(`Malformed request: JSON nested deeper than ${MAX_JSON_DEPTH} levels`, { id, replyTo });
    };
    return { batch: list !== undefined, items: list ? list.map(refuse) : [refuse(raw)] };
  }
  return { batch: list !== undefined, items: list ? list.map(requestOrBad) : [checkRequest(raw)] };
}

/** The id and reply_to of a parsed request, where they are strings of a sane length. */
function readableIds(raw: unknown): { id?: string; replyTo?: string } {
  if (!isPlainObject(raw)) return {};
  const id = typeof raw.id === "string" && raw.id.length > 0 && raw.id.length <= MAX_ID ? raw.id : undefined;
  const replyTo = typeof raw.reply_to === "string" && raw.reply_to.length <= MAX_REPLY_TO ? raw.reply_to : undefined;
  return { id, replyTo };
}

/** The JSON codec of the documented wire format. */
export const jsonCodec: Codec = {
  encodeRequest(req) {
    // Built by hand so that the cached context is not serialised again, and the plain strings
    // (ids, names, topics) are not handed to JSON.stringify one by one.
    let s = `{"v":1,"id":${jsonString(req.id)},"method":${jsonString(req.method)},"args":${
      JSON.stringify(req.args)
    },"context":${contextToJson(req.context)}`;
    if (req.reply_to !== undefined) s += `,"reply_to":${jsonString(req.reply_to)}`;
    if (req.version !== undefined) s += `,"version":${jsonString(req.version)}`;
    if (req.deadline !== undefined) s += `,"deadline":${jsonNumber(req.deadline)}`;
    if (req.batch) s += `,"batch":true`;
    return utf8(s + "}");
  },
  decodeRequest(bytes) {
    const { batch, items } = parseRequests(bytes);
    if (batch) throw new BadRequest("Malformed request: a batch where one request was expected");
    if (items[0] instanceof BadRequest) throw items[0];
    return items[0]!;
  },
  decodeRequests(bytes) {
    return parseRequests(bytes);
  },
  encodeReply(reply) {
    // Written around the result's JSON, as a request is; a result with a toJSON() (told its key)
    // or without a JSON form (the key is left out), and errors, go through JSON.stringify.
    if (reply.v === 1 && "result" in reply && !("error" in reply)) {
      const r = reply.result;
      const own = ((typeof r === "object" && r !== null) || typeof r === "bigint") &&
        typeof (r as { toJSON?: unknown }).toJSON === "function";
      const json = own ? undefined : typeof r === "number" ? jsonNumber(r) : JSON.stringify(r);
      if (json !== undefined) return utf8(`{"v":1,"id":${jsonString(reply.id)},"result":${json}}`);
    }
    return utf8(JSON.stringify(reply));
  },
  decodeReply(bytes) {
    return checkReply(parseOrBad(bytes, "reply"));
  },
  decodeReplies(bytes) {
    const raw = parseOrBad(bytes, "reply");
    return Array.isArray(raw) ? raw.map(checkReply) : [checkReply(raw)];
  },
  copy<E extends RequestEnvelope | ReplyEnvelope>(envelope: E): E {
    if (!("method" in envelope)) {
      // A reply, field by field as well (this is the hot path of in-process calls).
      const r = envelope as ReplyEnvelope;
      // (encodeReply stringifies the whole reply: toJSON() gets the key "result" or "error")
      const out = { v: 1, id: jsonCopy(r.id) } as Record<string, unknown>;
      if ("error" in r) out.error = copyJson(r.error, "error", undefined);
      else if ((r as { result?: unknown }).result !== undefined) out.result = copyJson(r.result, "result", undefined);
      return out as E;
    }
    // Field by field, as encodeRequest writes them: the context without JSON.
    const r = envelope as RequestEnvelope;
    const out = {
      v: 1,
      id: jsonCopy(r.id),
      method: jsonCopy(r.method),
      args: jsonCopy(r.args),
      context: copyContext(r.context),
    } as RequestEnvelope;
    if (r.reply_to !== undefined) out.reply_to = jsonCopy(r.reply_to) as string;
    if (r.version !== undefined) out.version = jsonCopy(r.version) as string;
    if (r.deadline !== undefined) out.deadline = jsonCopy(r.deadline) as number;
    if (r.batch) out.batch = true;
    return out as E;
  },
  encodeBatch(items) {
    // A JSON array of the encoded envelopes, joined at the byte level: nothing is encoded twice.
    const parts: Uint8Array[] = [OPEN];
    items.forEach((item, i) => {
      if (i > 0) parts.push(COMMA);
      parts.push(item);
    });
    parts.push(CLOSE);
    return Buffer.concat(parts);
  },
};

/** The wire form of a thrown value: type from `name` (or the class when `name` is "Error"). */
export function errorToWire(err: unknown, debug = false): WireError {
  // Total: whatever was thrown (null, a Symbol, a null-prototype object, an Error whose getters
  // throw, a Proxy), the caller gets an error reply rather than waiting out its timeout.
  try {
    if (!(err instanceof Error)) return { type: "Error", message: printable(err) };
    const name = err.name;
    const type = typeof name === "string" && name && name !== "Error"
      ? name
      : (typeof err.constructor?.name === "string" && err.constructor.name) || "Error";
    const wire: WireError = { type: type.slice(0, 255), message: printable(err.message) };
    const data = (err as { data?: unknown }).data;
    if (data !== undefined) {
      try {
        JSON.stringify(data);
        wire.data = data;
      } catch { /* data that cannot travel stays on the server */ }
    }
    if (debug && typeof err.stack === "string") wire.stack = err.stack;
    return wire;
  } catch {
    return { type: "Error", message: "The handler threw a value that cannot be read" };
  }
}

/** `String(v)`, or a placeholder when that throws (a null-prototype object, a Proxy). */
function printable(v: unknown): string {
  try {
    return typeof v === "string" ? v : String(v);
  } catch {
    return `[unprintable ${typeof v}]`;
  }
}

const RESOLVED = Promise.resolve();
const EMPTY_BYTES = new Uint8Array(0);

// ---------------------------------------------------------------------------------------------
// RPC client: call, cast, fanout
// ---------------------------------------------------------------------------------------------

/** A message to a manager: `method(ctx, args)`. */
export interface RpcMessage {
  /** The manager method to run. */
  method: string;
  /** Its arguments, by name (JSON). */
  args?: Record<string, unknown>;
}

/** Options of one call or cast. */
export interface CallOptions {
  /** Seconds to wait for the reply (calls) or until the server drops the message. */
  timeout?: number;
  /** The API version the caller needs, `"major.minor"`. */
  version?: string;
  /** QoS of the request (and, for a call, of its reply). Default: the client's. */
  qos?: 0 | 1;
}

/** Options of an {@link Rpc} client. */
export interface RpcOptions {
  /** Topic prefix. Default `"novalet"`. */
  prefix?: string;
  /** Default call timeout in seconds. Default 60 (`--rpc_response_timeout`). */
  timeout?: number;
  /** Calls that may wait for replies at once; one more fails with DeliveryError. Default 100,000. */
  maxPending?: number;
  /** QoS of requests and replies. Default 1. */
  qos?: 0 | 1;
  /** Default: the JSON codec of the README's wire format. */
  codec?: Codec;
  /** Default: {@link getLogger}. */
  logger?: Logger;
  /** The id in the reply topic. Default: a random UUID, under the transport's `user` (else its
   * `clientId`) when it has one that fits in a topic level (`{prefix}/reply/{user}/{clientId}`). */
  clientId?: string;
  /**
   * Batching (one broker message carries many envelopes, a JSON array): `true` (default) lets
   * servers batch their replies to this client and batches requests addressed to one server
   * (`topic.host`); `"all"` batches requests to a shared `topic` too, so a burst goes to one of
   * its servers instead of being spread; `false` sends every message alone.
   */
  batch?: boolean | "all";
}

function checkTimeout(t: unknown, what: string): number {
  if (typeof t !== "number" || !(t > 0) || !(t <= MAX_SECONDS)) {
    throw new RangeError(`Invalid ${what} ${quote(t)}: must be a positive number of seconds, at most ${MAX_SECONDS}`);
  }
  return t;
}

function checkMessage(msg: RpcMessage): void {
  if (!isPlainObject(msg) || typeof msg.method !== "string" || !METHOD_NAME.test(msg.method)) {
    throw new TypeError(`Invalid message ${quote(msg)}: needs a "method" that is an identifier`);
  }
  if (msg.args !== undefined && !isPlainObject(msg.args)) {
    throw new TypeError(`Invalid args ${quote(msg.args)} for "${msg.method}": must be an object`);
  }
}

function asError(e: unknown): Error {
  return e instanceof Error ? e : new DeliveryError(String(e));
}

function asBadRequest(e: unknown): BadRequest {
  return e instanceof BadRequest ? e : new BadRequest(String((e as Error)?.message ?? e), { cause: e });
}

/** The presence watch of one topic's servers: one subscription for all its hosts; per host the
 * newest incarnation seen online, and the pending failure of its calls after a `lost`. */
interface TopicWatch {
  sub?: Promise<Subscription>;
  online: Map<string, number>;
  dying: Map<string, { cancel(): void }>;
}

/** How long a `lost` may be taken back by an `online` (a network blip) before calls fail. */
const LOST_GRACE_MS = 700;

/** A call, encoded, on its way out. */
interface OutgoingCall {
  id: string;
  address: string;
  topic: string;
  method: string;
  encoded: Uint8Array | LocalMessage;
  timeout: number;
  qos: 0 | 1;
}

/**
 * The RPC client: call (wait for the reply), cast (fire and forget) and fanout cast, over one
 * transport. Replies come back on one subscription per client, made at the first call.
 */
export class Rpc {
  /** The topics of the client's prefix. */
  readonly topics: Topics;
  /** The id in the client's reply topic. */
  readonly clientId: string;
  #transport: Transport;
  #timeout: number;
  #maxPending: number;
  #qos: 0 | 1;
  #codec: Codec;
  #log: Logger;
  #pending = new PendingCalls();
  #replySub?: Promise<Subscription>;
  /** Topics whose hosts were called (`topic.host`), watched for presence: a `lost` fails the calls
   * to that host; and the addresses already seen (no lookup of the topic per call). */
  #watched = new Map<string, TopicWatch>();
  #watchedAddresses = new Set<string>();
  #repliesReady = false;
  /** Calls made before the reply subscription was ready, waiting for it. */
  #beforeReplies = 0;
  #outbox: Outbox;
  #batchReplies: boolean;
  #batchShared: boolean;
  #replyTopic: string;
  #topicCache = new Map<string, string>();
  #timeouts = new Timeouts();
  #ids = new MessageIds();
  /** Envelopes travel as values (no JSON text): the transport carries them, the codec copies. */
  #local: boolean;
  #closed = false;

  /** A client on `transport`; nothing is subscribed until the first call. */
  constructor(transport: Transport, opts: RpcOptions = {}) {
    this.#transport = transport;
    this.topics = new Topics(opts.prefix);
    this.#timeout = checkTimeout(opts.timeout ?? 60, "timeout");
    this.#maxPending = opts.maxPending ?? 100_000;
    this.#qos = opts.qos ?? 1;
    this.#codec = opts.codec ?? jsonCodec;
    // batch: false gives a codec without encodeBatch, so every message leaves alone.
    const batching = opts.batch !== false && this.#codec.encodeBatch !== undefined;
    this.#outbox = new Outbox(transport, this.#codec, batching);
    this.#batchReplies = batching;
    this.#batchShared = batching && opts.batch === "all";
    this.#local = transport.publishLocal !== undefined && this.#codec.copy !== undefined;
    this.#log = opts.logger ?? getLogger();
    this.clientId = opts.clientId ?? crypto.randomUUID();
    // Under the broker user (or connection), where a broker ACL can confine it (see Transport.user).
    const owner = isName(transport.user) ? transport.user : transport.clientId;
    const connectionId = opts.clientId === undefined && isName(owner) ? owner : undefined;
    this.#replyTopic = this.topics.reply(this.clientId, connectionId); // validates the client id
  }

  /** The topic this client's replies come back on. */
  get replyTopic(): string {
    return this.#replyTopic;
  }

  /** Calls waiting for a reply now. */
  get pending(): number {
    return this.#pending.size + this.#beforeReplies;
  }

  /**
   * Invoke `msg.method(ctx, msg.args)` on one server of `address` and wait for its result.
   * @throws {RemoteError} the handler threw (or NoSuchMethod / UnsupportedVersion / BadRequest).
   * @throws {RpcTimeoutError} no reply within the timeout.
   * @throws {DeliveryError} the request could not be handed to the transport or to anyone.
   * @throws {TypeError} a malformed address or message, at once.
   * @example
   * ```ts
   * const rpc = new Rpc(transport);
   * const sum = await rpc.call<number>(new RequestContext(), "calc", { method: "add", args: { a: 1, b: 2 } });
   * await rpc.call(ctx, "compute.host1", { method: "reboot", args: { id } }, { timeout: 5 }); // that host's server
   * ```
   */
  call<T = unknown>(ctx: RequestContext, address: string, msg: RpcMessage, opts: CallOptions = {}): Promise<T> {
    let topic: string;
    let timeout: number;
    try {
      if (this.#closed) throw new ClosedError(`Cannot call ${quote(address)}: the RPC client is closed`);
      topic = this.#topicFor(address);
      checkMessage(msg);
      timeout = opts.timeout === undefined ? this.#timeout : checkTimeout(opts.timeout, "timeout");
      const waiting = this.#pending.size + this.#beforeReplies;
      if (waiting >= this.#maxPending) {
        throw new DeliveryError(
          `Cannot call "${address}.${msg.method}": ${waiting} calls are already waiting (maxPending)`,
        );
      }
    } catch (e) {
      return Promise.reject(e);
    }
    // Encoded now, so that the caller may change its objects once call() returns.
    const id = this.#ids.next();
    const req: RequestEnvelope = {
      v: 1,
      id,
      method: msg.method,
      args: msg.args ?? {},
      context: ctx,
      reply_to: this.#replyTopic,
      deadline: Date.now() + timeout * 1000,
    };
    if (opts.version !== undefined) req.version = opts.version;
    if (this.#batchReplies) req.batch = true;
    let encoded: Uint8Array | LocalMessage;
    try {
      encoded = encodeFor(this.#codec, this.#local, req, topic);
    } catch (e) {
      return Promise.reject(e); // the args do not encode (a BigInt, a cycle)
    }
    const call: OutgoingCall = { id, address, topic, method: msg.method, encoded, timeout, qos: opts.qos ?? this.#qos };
    if (address.includes(".") && !this.#watchedAddresses.has(address)) this.#watch(address);
    // The reply subscription is made by the first call and reused; later calls skip the wait.
    if (this.#repliesReady) return this.#call(call);
    // Counted against maxPending while they wait for the subscription, like any waiting call.
    this.#beforeReplies++;
    return (this.#replySub ??= this.#subscribeReplies()).then(
      () => {
        this.#beforeReplies--;
        if (this.#closed) throw new ClosedError(`Call "${address}.${msg.method}" abandoned: the RPC client was closed`);
        return this.#call<T>(call);
      },
      (e) => {
        this.#beforeReplies--;
        throw e;
      },
    );
  }

  #call<T>(call: OutgoingCall): Promise<T> {
    const { id, address, topic, method, encoded, timeout, qos } = call;
    const p = new Pending(this.#pending, call);
    const result = new Promise<T>((resolve, reject) => {
      p.resolve = resolve as (v: unknown) => void;
      p.reject = reject;
    });
    this.#pending.add(p);
    this.#timeouts.add(p, timeout * 1000);
    // Not awaited: the reply may come before the broker's PUBACK, and a rejection of `result`
    // (timeout, close) must always have a taker.
    this.#publish(address, topic, encoded, { qos, mandatory: true, expiry: timeout }).catch(
      (e) => this.#settle(id)?.reject(deliveryFailure(`call "${address}.${method}"`, e)),
    );
    return result;
  }

  /**
   * Publish a request: as a value over an in-process transport; else batched when it goes to one
   * server (or `batch: "all"`), else alone so that the servers of a shared topic each take their
   * share. `address` undefined is a fanout: never batched.
   */
  #publish(
    address: string | undefined,
    topic: string,
    encoded: Uint8Array | LocalMessage,
    opts: PublishOptions,
  ): Promise<void> {
    try {
      if (!(encoded instanceof Uint8Array)) return this.#transport.publishLocal!(topic, encoded, opts);
      if (address !== undefined && (this.#batchShared || address.includes("."))) {
        return this.#outbox.sendAsync(topic, encoded, opts);
      }
      return this.#transport.publish(topic, this.#codec.seal ? this.#codec.seal(encoded, topic) : encoded, opts);
    } catch (e) {
      return Promise.reject(e); // a transport that throws instead of rejecting
    }
  }

  /** The transport topic of an address, from a small cache (services call the same few). */
  #topicFor(address: string): string {
    let topic = this.#topicCache.get(address);
    if (topic === undefined) {
      topic = this.topics.forAddress(address); // validates: a bad address is never cached
      if (this.#topicCache.size >= 1024) this.#topicCache.clear();
      this.#topicCache.set(address, topic);
    }
    return topic;
  }

  /** Send `msg` to one server of `address` without waiting for a result. Resolves once the
   * transport took the message. */
  cast(ctx: RequestContext, address: string, msg: RpcMessage, opts: CallOptions = {}): Promise<void> {
    try {
      if (this.#closed) throw new ClosedError(`Cannot cast to ${quote(address)}: the RPC client is closed`);
      return this.#send(this.#topicFor(address), address, undefined, ctx, msg, opts);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /** Send `msg` to every server of `topic`. Zero listeners is not an error. */
  fanoutCast(ctx: RequestContext, topic: string, msg: RpcMessage, opts: CallOptions = {}): Promise<void> {
    try {
      if (this.#closed) throw new ClosedError(`Cannot fanout to ${quote(topic)}: the RPC client is closed`);
      return this.#send(this.topics.fanout(topic), undefined, topic, ctx, msg, opts);
    } catch (e) {
      return Promise.reject(e);
    }
  }

  /**
   * Send a cast to `address`, or a fanout to `fanout` (never mandatory). Throws at once when the
   * message is malformed or does not encode; the promise says whether the transport took it.
   */
  #send(
    topic: string,
    address: string | undefined,
    fanout: string | undefined,
    ctx: RequestContext,
    msg: RpcMessage,
    opts: CallOptions,
  ): Promise<void> {
    checkMessage(msg);
    const req: RequestEnvelope = {
      v: 1,
      id: this.#ids.next(),
      method: msg.method,
      args: msg.args ?? {},
      context: ctx,
    };
    if (opts.version !== undefined) req.version = opts.version;
    const expiry = opts.timeout === undefined ? undefined : checkTimeout(opts.timeout, "timeout");
    if (expiry !== undefined) req.deadline = Date.now() + expiry * 1000;
    const encoded = encodeFor(this.#codec, this.#local, req, topic); // throws when the args do not encode
    const sent = this.#publish(address, topic, encoded, {
      qos: opts.qos ?? this.#qos,
      mandatory: address !== undefined,
      expiry,
    });
    // In-process, the transport has the message once publishLocal returns: nothing to bound.
    if (this.#local) {
      return sent.catch((e) => {
        throw deliveryFailure(`cast ${castName(address, fanout, msg)}`, e);
      });
    }
    // Else the hand-over is bounded: a transport that cannot reach its broker must not hang a cast.
    const limit = expiry ?? this.#timeout;
    return new Promise<void>((resolve, reject) => {
      const handover: Expiring = {
        expire() {
          const what = castName(address, fanout, msg);
          reject(new DeliveryError(`Cannot cast ${what}: the transport did not take it within ${limit} s`));
        },
      };
      this.#timeouts.add(handover, limit * 1000);
      sent.then(() => {
        this.#timeouts.remove(handover);
        resolve();
      }, (e) => {
        this.#timeouts.remove(handover);
        reject(deliveryFailure(`cast ${castName(address, fanout, msg)}`, e));
      });
    });
  }

  async #subscribeReplies(): Promise<Subscription> {
    try {
      const sub = await this.#transport.subscribe(this.#replyTopic, (p, _t, meta) => this.#onReply(p, meta), {
        qos: this.#qos,
        local: this.#codec.copy !== undefined, // a codec without copy() must see the bytes
      });
      this.#repliesReady = true;
      return sub;
    } catch (e) {
      this.#replySub = undefined; // let the next call try again
      throw deliveryFailure("subscribe to replies", e);
    }
  }

  /** The call waiting for `id`, no longer waiting; undefined if none waits. */
  #settle(id: string): Pending | undefined {
    const p = this.#pending.get(id);
    if (p) this.#forget(p);
    return p;
  }

  #forget(p: Pending): void {
    this.#pending.delete(p);
    this.#timeouts.remove(p);
  }

  #onReply(payload: Uint8Array, meta?: MessageMeta): void {
    let replies: ReplyEnvelope[] | ReplyEnvelope;
    try {
      if (meta?.local !== undefined) replies = checkReply(meta.local);
      else if (this.#codec.decodeReplies) replies = this.#codec.decodeReplies(payload, this.#replyTopic);
      else replies = this.#codec.decodeReply(payload, this.#replyTopic);
    } catch (e) {
      this.#log.warn("Dropped a malformed reply", { error: e });
      return;
    }
    if (!Array.isArray(replies)) this.#onOneReply(replies);
    else for (const reply of replies) this.#onOneReply(reply);
  }

  #onOneReply(reply: ReplyEnvelope): void {
    const p = this.#settle(reply.id);
    if (!p) {
      this.#log.debug("Dropped a reply nobody waits for (late or duplicate)", { id: reply.id });
      return;
    }
    if ("error" in reply) {
      const e = reply.error;
      p.reject(new RemoteError(e.type, e.message, { data: e.data, remoteStack: e.stack }));
    } else {
      p.resolve(reply.result);
    }
  }

  /** Watch the presence of the servers of `address`'s topic: one subscription per topic, at most
   * 1,024 topics. */
  #watch(address: string): void {
    if (this.#watchedAddresses.size >= 100_000) this.#watchedAddresses.clear();
    this.#watchedAddresses.add(address);
    const topic = address.slice(0, address.indexOf("."));
    if (this.#watched.has(topic) || this.#watched.size >= 1024) return;
    const w: TopicWatch = { online: new Map(), dying: new Map() };
    this.#watched.set(topic, w);
    w.sub = this.#transport.subscribe(
      this.topics.presence(topic, "+"),
      (payload) => this.#onPresence(topic, w, payload),
      {
        qos: 1,
      },
    );
    w.sub.catch((e) => {
      this.#watched.delete(topic);
      this.#log.debug(`Cannot watch the presence of the servers of ${topic}`, { error: e });
    });
  }

  /** A presence of a server of a watched topic: a `lost` not older than the online we saw fails
   * the calls to that host, unless an `online` takes it back within LOST_GRACE_MS (a blip). */
  #onPresence(topic: string, w: TopicWatch, payload: Uint8Array): void {
    const p = parsePresence(payload);
    if (p === undefined || p.topic !== topic) return;
    const { host } = p;
    if (p.state === "online") {
      if (p.incarnation < (w.online.get(host) ?? -1)) return;
      w.online.set(host, p.incarnation);
      w.dying.get(host)?.cancel();
      w.dying.delete(host);
      return;
    }
    if (p.state !== "lost" || p.incarnation < (w.online.get(host) ?? -1) || w.dying.has(host)) return;
    const address = `${topic}.${host}`;
    const timer = setNodeTimeout(() => {
      w.dying.delete(host);
      for (const pending of this.#pending.values()) {
        if (pending.call.address !== address) continue;
        this.#forget(pending);
        pending.reject(
          new ServerDied(
            `Call "${address}.${pending.call.method}" failed: its server died before answering (presence lost)`,
          ),
        );
      }
    }, LOST_GRACE_MS);
    timer.unref();
    w.dying.set(host, { cancel: () => clearTimeout(timer) });
  }

  /** Stop listening for replies; calls still waiting fail with ClosedError. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    for (const p of this.#pending.values()) {
      this.#forget(p);
      p.reject(new ClosedError(`Call "${p.call.address}.${p.call.method}" abandoned: the RPC client was closed`));
    }
    const sub = this.#replySub;
    this.#replySub = undefined;
    this.#repliesReady = false;
    if (sub) await sub.then((s) => s.unsubscribe()).catch(() => {});
    const watches = [...this.#watched.values()];
    this.#watched.clear();
    for (const w of watches) {
      for (const d of w.dying.values()) d.cancel();
      await w.sub?.then((s) => s.unsubscribe()).catch(() => {});
    }
  }
}

/** An envelope as bytes, or as a value for an in-process transport. @throws where encoding does. */
function encodeFor(
  codec: Codec,
  local: boolean,
  envelope: RequestEnvelope | ReplyEnvelope,
  topic: string,
): Uint8Array | LocalMessage {
  return local ? new LocalEnvelope(codec, envelope, topic) : encodeBytes(codec, envelope, topic);
}

function encodeBytes(codec: Codec, envelope: RequestEnvelope | ReplyEnvelope, topic: string): Uint8Array {
  return "method" in envelope ? codec.encodeRequest(envelope, topic) : codec.encodeReply(envelope, topic);
}

/** How errors name a cast: `"address.method"`, or `fanout "topic.method"`. */
function castName(address: string | undefined, fanout: string | undefined, msg: RpcMessage): string {
  return address !== undefined ? `"${address}.${msg.method}"` : `fanout "${fanout}.${msg.method}"`;
}

function deliveryFailure(what: string, e: unknown): Error {
  if (e instanceof DeliveryError || e instanceof ClosedError || e instanceof TypeError) return e;
  return new DeliveryError(`Cannot ${what}: ${(e as Error)?.message ?? e}`, { cause: e });
}

// ---------------------------------------------------------------------------------------------
// Managers and periodic tasks
// ---------------------------------------------------------------------------------------------

/** How a `@periodicTask` runs. */
export interface PeriodicTaskOptions {
  /** Seconds between runs; 0 (default) runs at every tick of the periodic loop. */
  spacing?: number;
  /** Run at the first tick (default true); false waits `spacing` seconds first. */
  runImmediately?: boolean;
}

/** A periodic task of a manager, as listed by {@link listPeriodicTasks}. */
export interface PeriodicTaskInfo {
  /** The method's name. */
  name: string;
  /** Seconds between runs. */
  spacing: number;
  /** Whether it runs at the first tick. */
  runImmediately: boolean;
}

// Keyed by the method (Node 20 has no Symbol.metadata); global, so that a manager decorated with
// one copy of novalet (dist/, say) is run by another (the sources).
const periodicRegistry: WeakMap<object, PeriodicTaskInfo> =
  ((globalThis as Record<symbol, unknown>)[Symbol.for("novalet.periodicTasks")] ??= new WeakMap()) as WeakMap<
    object,
    PeriodicTaskInfo
  >;

/**
 * What `periodicTask(opts)` returns: a decorator for TC39 decorators (the default), for
 * `experimentalDecorators`, and a function to call by hand in plain JavaScript.
 */
export interface PeriodicTaskDecorator {
  /** TC39 decorator. */
  <T extends (this: Manager, ctx: RequestContext) => unknown>(method: T, context: ClassMethodDecoratorContext): T;
  /** `experimentalDecorators`, or by hand: `periodicTask(opts)(MyManager.prototype, "name")`. */
  (target: object, key: string, descriptor?: PropertyDescriptor): void;
}

/**
 * Marks a manager method as a periodic task. It runs as `method(ctx)`. Works as a TC39
 * decorator, under `experimentalDecorators`, and without decorators (plain JavaScript).
 * @example
 * ```ts
 * class Compute extends Manager {
 *   @periodicTask({ spacing: 600 })
 *   async updateAvailableResources(ctx: RequestContext) {}
 * }
 * ```
 * @example Plain JavaScript
 * ```js
 * class Compute extends Manager {
 *   async updateAvailableResources(ctx) {}
 * }
 * periodicTask({ spacing: 600 })(Compute.prototype, "updateAvailableResources");
 * ```
 */
export function periodicTask(opts: PeriodicTaskOptions = {}): PeriodicTaskDecorator {
  const spacing = opts.spacing ?? 0;
  if (typeof spacing !== "number" || !(spacing >= 0) || !Number.isFinite(spacing)) {
    throw new RangeError(`Invalid periodic task spacing ${quote(spacing)}: must be seconds >= 0`);
  }
  const runImmediately = opts.runImmediately ?? true;
  function decorate(method: unknown, context: unknown, descriptor?: PropertyDescriptor): unknown {
    if (typeof context === "string") {
      // experimentalDecorators (target, key, descriptor), or a call by hand (prototype, key).
      const target = method as object | null;
      const d = descriptor ?? (target ? Object.getOwnPropertyDescriptor(target, context) : undefined);
      if (typeof target !== "object" || target === null || typeof d?.value !== "function") {
        throw new TypeError(`periodicTask applies to public instance methods only: ${quote(context)} is not one`);
      }
      periodicRegistry.set(d.value, { name: context, spacing, runImmediately });
      return undefined;
    }
    const ctx = context as ClassMethodDecoratorContext | undefined;
    if (
      typeof method !== "function" || ctx?.kind !== "method" || ctx.static || ctx.private ||
      typeof ctx.name !== "string"
    ) {
      throw new TypeError("@periodicTask applies to public instance methods only");
    }
    periodicRegistry.set(method, { name: ctx.name, spacing, runImmediately });
    return method;
  }
  return decorate as PeriodicTaskDecorator;
}

/**
 * Marks `Manager.prototype`. Two copies of novalet (dist/mod.js imported by an application,
 * the sources run by the CLI) have two Manager classes: `instanceof` tells them apart, this does not.
 */
const MANAGER = Symbol.for("novalet.Manager");

/** Whether `cls` is a subclass of Manager, from this copy of novalet or another. */
export function isManagerClass(cls: unknown): cls is ManagerClass {
  if (typeof cls !== "function" || !cls.prototype) return false;
  const proto: unknown = cls.prototype;
  return !Object.hasOwn(proto as object, MANAGER) && isManager(proto);
}

/** Whether `value` is a Manager (or a Manager subclass's prototype), from any copy of novalet. */
export function isManager(value: unknown): value is Manager {
  return (typeof value === "object" && value !== null) && (value as Record<symbol, unknown>)[MANAGER] === true;
}

/** Names a Manager subclass can never expose, whatever it declares. */
const LIFECYCLE = new Set(["constructor", "initHost", "periodicTasks", "preStartHook", "postStartHook", "cleanupHost"]);

/** Walk the prototypes a subclass of Manager declares, most derived first. */
function* managerPrototypes(manager: object): Generator<object> {
  for (let p = Object.getPrototypeOf(manager); p && !Object.hasOwn(p, MANAGER) && p !== Object.prototype;) {
    yield p;
    p = Object.getPrototypeOf(p);
  }
}

/** The periodic tasks of a manager (most derived definition wins). */
export function listPeriodicTasks(manager: Manager): PeriodicTaskInfo[] {
  const seen = new Set<string>();
  const tasks: PeriodicTaskInfo[] = [];
  for (const proto of managerPrototypes(manager)) {
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (seen.has(name)) continue;
      seen.add(name);
      const d = Object.getOwnPropertyDescriptor(proto, name);
      const info = typeof d?.value === "function" ? periodicRegistry.get(d.value) : undefined;
      if (info) tasks.push({ ...info, name });
    }
  }
  return tasks;
}

/**
 * The callable methods of a manager: own functions of the prototypes a Manager subclass
 * declares, minus `_names`, lifecycle hooks, periodic tasks, accessors and anything on
 * Object.prototype. Built once per manager; a message name is only ever looked up in it.
 */
export function rpcMethods(manager: Manager): Map<string, (ctx: RequestContext, args: unknown) => unknown> {
  const table = new Map<string, (ctx: RequestContext, args: unknown) => unknown>();
  const seen = new Set<string>();
  for (const proto of managerPrototypes(manager)) {
    for (const name of Object.getOwnPropertyNames(proto)) {
      if (seen.has(name)) continue;
      seen.add(name);
      if (name.startsWith("_") || LIFECYCLE.has(name) || Object.hasOwn(Object.prototype, name)) continue;
      const d = Object.getOwnPropertyDescriptor(proto, name);
      if (!d || typeof d.value !== "function" || periodicRegistry.has(d.value)) continue;
      table.set(name, d.value as (ctx: RequestContext, args: unknown) => unknown);
    }
  }
  return table;
}

// The roles a method requires, keyed by the method; global for the same reason as periodicRegistry.
const requiredRoles: WeakMap<object, readonly string[]> =
  ((globalThis as Record<symbol, unknown>)[Symbol.for("novalet.requiredRoles")] ??= new WeakMap()) as WeakMap<
    object,
    readonly string[]
  >;

/**
 * Confine an RPC method to callers whose context is admin (`is_admin`) or holds one of `roles`;
 * the dispatcher refuses others with {@link NotAuthorized} before the method runs. A context is
 * only as trustworthy as the transport that carried it (see the README on broker ACLs).
 *
 * @example
 * ```ts
 * class Compute extends Manager {
 *   @requires("admin", "operator")
 *   evacuate(_ctx: RequestContext) {}
 * }
 * ```
 */
export function requires(...roles: string[]): PeriodicTaskDecorator {
  if (roles.length === 0 || roles.some((r) => typeof r !== "string" || r.length === 0)) {
    throw new TypeError(`requires() needs one or more role names: got ${quote(roles)}`);
  }
  const frozen = Object.freeze([...roles]);
  function decorate(method: unknown, context: unknown, descriptor?: PropertyDescriptor): unknown {
    const fn = typeof context === "string"
      ? (descriptor ?? Object.getOwnPropertyDescriptor(method as object, context))?.value
      : (context as ClassMethodDecoratorContext | undefined)?.kind === "method"
      ? method
      : undefined;
    if (typeof fn !== "function") throw new TypeError("@requires applies to methods only");
    requiredRoles.set(fn, frozen);
    return typeof context === "string" ? undefined : method;
  }
  return decorate as PeriodicTaskDecorator;
}

/** Whether `ctx` may call a method that requires `roles`. */
function mayCall(ctx: RequestContext, roles: readonly string[]): boolean {
  return ctx.isAdmin || roles.some((r) => ctx.roles.includes(r));
}

interface TaskState {
  info: PeriodicTaskInfo;
  nextRun: number;
  running: boolean;
}

/**
 * Base class of managers. Its public methods (those a subclass declares) are the RPC API:
 * a message `{method, args}` runs `method(ctx, args)`; names starting with `_`, the lifecycle
 * hooks and periodic tasks are not callable.
 * @example
 * ```ts
 * class Compute extends Manager {
 *   override rpcApiVersion = "1.2";
 *   async reboot(ctx: RequestContext, { id }: { id: string }) {
 *     return { id, by: ctx.userId, on: this.host };
 *   }
 *   @periodicTask({ spacing: 60 })
 *   async audit(_ctx: RequestContext) {}
 * }
 * ```
 */
export class Manager {
  /** The host this manager serves, set before `initHost()`. */
  host = "";
  /** The service that runs this manager, set before `initHost()`. */
  service!: Service;
  /** `major.minor`: a request's major must match, its minor must be <= ours. */
  rpcApiVersion = "1.0";
  #tasks?: TaskState[];
  static {
    Object.defineProperty(this.prototype, MANAGER, { value: true });
  }

  /** Called after registration, before consuming starts. */
  initHost(): Promise<void> | void {}

  /**
   * Start the periodic tasks that are due and not already running. Each task runs on its own,
   * so a slow one does not hold back the others; a failing one is logged and runs again at its
   * next slot. Resolves when the tasks started now have finished.
   */
  periodicTasks(ctx: RequestContext, now: number = Date.now()): Promise<void> {
    this.#tasks ??= listPeriodicTasks(this).map((info) => ({
      info,
      nextRun: info.runImmediately ? 0 : now + info.spacing * 1000,
      running: false,
    }));
    const started: Promise<void>[] = [];
    const log = this.service?.logger ?? getLogger();
    for (const t of this.#tasks) {
      if (t.running || now < t.nextRun) continue;
      t.running = true;
      t.nextRun = now + t.info.spacing * 1000;
      const fn = (this as unknown as Record<string, (ctx: RequestContext) => unknown>)[t.info.name]!;
      const run = (async () => {
        try {
          await fn.call(this, ctx);
        } catch (e) {
          log.error(`Periodic task ${t.info.name} failed`, { task: t.info.name, error: e });
        } finally {
          t.running = false;
        }
      })();
      started.push(run);
    }
    return Promise.all(started).then(() => {});
  }
}

/** A Manager subclass. */
export type ManagerClass = new () => Manager;

// ---------------------------------------------------------------------------------------------
// The dispatcher: requests to method calls, results to replies
// ---------------------------------------------------------------------------------------------

/** Options of a {@link Dispatcher}. */
export interface DispatcherOptions {
  /** Topic prefix. Default `"novalet"`. */
  prefix?: string;
  /** Default: the JSON codec. */
  codec?: Codec;
  /** Default: {@link getLogger}. */
  logger?: Logger;
  /** Send stack traces with errors. Default false. */
  debug?: boolean;
  /**
   * Request ids remembered at most, to suppress redelivered duplicates: each is kept until its
   * request's deadline (or `dedupWindow`), up to this many (the oldest go first). Default 100,000.
   */
  dedupSize?: number;
  /** Seconds an id without a deadline is remembered. Default 600. */
  dedupWindow?: number;
  /** Larger messages are logged and dropped unread. Default 16 MiB. */
  maxMessageBytes?: number;
  /** Handlers that may run at once (an async handler runs until its promise settles). Default 64. */
  maxRunning?: number;
  /** Requests that may wait for a running slot; more are refused with `Overloaded`. Default 1,000. */
  maxQueued?: number;
  /**
   * Bytes of requests (each its share of the message it came in) held at once, running and
   * queued; more are refused with `Overloaded`, except that one request is always taken when
   * nothing is held. Default 32 MiB.
   */
  maxHeldBytes?: number;
  /** QoS of replies. Default 1 (a QoS 0 request is answered at QoS 0). */
  qos?: 0 | 1;
}

/** A request admitted but waiting for a running slot. */
interface Queued {
  req: RequestEnvelope;
  qos: 0 | 1;
  /** Its share of the bytes of the message it came in (see maxHeldBytes). */
  bytes: number;
}

function versionOk(requested: string, ours: string): boolean {
  const [rMaj, rMin] = requested.split(".").map(Number);
  const [oMaj, oMin] = ours.split(".").map(Number);
  return rMaj === oMaj && rMin! <= oMin!;
}

/**
 * Turns request messages into manager method calls and replies. One per service; `handle` is
 * the handler of its subscriptions.
 */
export class Dispatcher {
  /** The manager whose methods run. */
  readonly manager: Manager;
  #table: Map<string, (ctx: RequestContext, args: unknown) => unknown>;
  /** The roles of the methods that `@requires` some, by name (looked up once, not per call). */
  #roles = new Map<string, readonly string[]>();
  #transport: Transport;
  #topics: Topics;
  #codec: Codec;
  #log: Logger;
  #debug: boolean;
  #recent: RecentIds;
  #outbox: Outbox;
  /** Methods that return promises: they run in the async scope (see inScope). */
  #async = new Set<unknown>();
  #goodReplyTopics = new Set<string>();
  #maxBytes: number;
  #qos: 0 | 1;
  #inFlight = 0;
  #idle: (() => void)[] = [];
  /** Replies travel as values (see publishLocal). */
  #local: boolean;
  #dedupWindowMs: number;
  /** Handlers running now (started, result not yet settled), and the requests waiting for one. */
  #running = 0;
  #maxRunning: number;
  /** Requests waiting for a slot. */
  #queue = new Fifo<Queued>();
  #maxQueued: number;
  #heldBytes = 0;
  #maxHeldBytes: number;
  #pumping = false;
  /** Requests refused as overloaded since the last log line about it, and when that was. */
  #refused = 0;
  #refusedLoggedAt = -Infinity;

  /** A dispatcher of `manager`'s methods, replying over `transport`. */
  constructor(manager: Manager, transport: Transport, opts: DispatcherOptions = {}) {
    this.manager = manager;
    this.#table = rpcMethods(manager);
    for (const [name, fn] of this.#table) {
      const roles = requiredRoles.get(fn);
      if (roles !== undefined) this.#roles.set(name, roles);
    }
    for (const fn of this.#table.values()) if (fn.constructor.name === "AsyncFunction") this.#async.add(fn);
    this.#transport = transport;
    this.#topics = new Topics(opts.prefix);
    this.#codec = opts.codec ?? jsonCodec;
    this.#log = opts.logger ?? getLogger();
    this.#debug = opts.debug ?? false;
    this.#recent = new RecentIds(positiveInt(opts.dedupSize ?? 100_000, "dedupSize"));
    this.#dedupWindowMs = checkTimeout(opts.dedupWindow ?? 600, "dedupWindow") * 1000;
    this.#maxRunning = positiveInt(opts.maxRunning ?? 64, "maxRunning");
    this.#maxQueued = positiveInt(opts.maxQueued ?? 1000, "maxQueued", 0);
    this.#maxHeldBytes = positiveInt(opts.maxHeldBytes ?? 32 * 1024 * 1024, "maxHeldBytes");
    this.#outbox = new Outbox(transport, this.#codec);
    this.#local = transport.publishLocal !== undefined && this.#codec.copy !== undefined;
    this.#maxBytes = opts.maxMessageBytes ?? 16 * 1024 * 1024;
    this.#qos = opts.qos ?? 1;
  }

  /** The names a message may call. */
  get methods(): string[] {
    return [...this.#table.keys()];
  }

  /** Requests being handled now: from their arrival until their reply is handed over. */
  get inFlight(): number {
    return this.#inFlight;
  }

  /** Handlers running now, requests queued for a running slot, and the bytes of both (see
   * maxRunning, maxQueued, maxHeldBytes). */
  get load(): { running: number; queued: number; bytes: number } {
    return { running: this.#running, queued: this.#queued(), bytes: this.#heldBytes };
  }

  /** Resolves when no request is being handled. */
  drained(): Promise<void> {
    if (this.#inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.#idle.push(r));
  }

  /**
   * Handle one message (a request or a batch of them); never throws. Each request counts in
   * `inFlight` until its reply is handed over: no promise per message, none at all for a
   * synchronous method.
   */
  handle = (payload: Uint8Array, topic: string, meta?: MessageMeta): void => {
    this.#inFlight++; // the message itself, while its requests are read
    try {
      if (meta?.local !== undefined) this.#run(requestOrBad(meta.local), topic, this.#qos, 0, 0);
      else this.#handle(payload, topic, meta?.qos === 0 ? 0 : this.#qos);
    } catch (e) {
      this.#failed(e, topic);
    }
    this.#done();
  };

  #failed(e: unknown, topic: string): void {
    this.#log.error("Unexpected failure while dispatching", { topic, error: e });
  }

  /** One request (or message) less in flight. */
  #done = (): void => {
    if (--this.#inFlight === 0 && this.#idle.length > 0) { for (const r of this.#idle.splice(0)) r(); }
  };

  /** A message as bytes: one request or a batch. */
  #handle(payload: Uint8Array, topic: string, qos: 0 | 1): void {
    if (payload.byteLength > this.#maxBytes) {
      this.#log.warn(`Dropped a request of ${payload.byteLength} bytes: over maxMessageBytes ${this.#maxBytes}`, {
        topic,
      });
      return;
    }
    let items: (RequestEnvelope | BadRequest)[];
    try {
      items = this.#codec.decodeRequests
        ? this.#codec.decodeRequests(payload, topic).items
        : [this.#codec.decodeRequest(payload, topic)];
    } catch (e) {
      items = [asBadRequest(e)]; // the message as a whole is unreadable
    }
    const fp = fingerprint(payload);
    const bytes = Math.ceil(payload.byteLength / items.length);
    for (const item of items) this.#run(item, topic, qos, fp, bytes);
  }

  /** One request, counted in flight until #done (on every path, exactly once). `fp`: the
   * fingerprint of the message it came in (0 for an in-process message); `bytes`: its share of
   * that message's bytes (0 in-process: the sender's own objects). */
  #run(item: RequestEnvelope | BadRequest, topic: string, qos: 0 | 1, fp: number, bytes: number): void {
    this.#inFlight++;
    try {
      if (item instanceof BadRequest) this.#refuse(item, topic, qos);
      else this.#one(item, topic, qos, fp, bytes);
    } catch (e) {
      this.#failed(e, topic); // a bug of ours: #one and #refuse answer what they catch
      this.#done();
    }
  }

  /** Answer a malformed request with BadRequest when it says where, else log and drop it. */
  #refuse(bad: BadRequest, topic: string, qos: 0 | 1): void {
    if (bad.id !== undefined && bad.replyTo !== undefined && this.#replyTopicOk(bad.replyTo)) {
      this.#log.warn(bad.message, { topic, id: bad.id });
      this.#reply(bad.replyTo, { v: 1, id: bad.id, error: errorToWire(bad) }, qos, false);
    } else {
      this.#log.warn(`${bad.message}; dropped (no reply address)`, { topic });
      this.#done();
    }
  }

  /** Run one request (now, or queued for a slot) and answer it (in a batch with other replies when
   * the caller reads them). */
  #one(req: RequestEnvelope, topic: string, qos: 0 | 1, fp: number, bytes: number): void {
    const { id, reply_to: replyTo } = req;
    if (replyTo !== undefined && !this.#replyTopicOk(replyTo)) {
      this.#log.warn(
        `BadRequest: reply_to ${quote(replyTo)} is not under "${this.#topics.replyRoot}"; not executed, not answered`,
        { topic, id, method: req.method },
      );
      return this.#done();
    }
    const now = Date.now();
    if (req.deadline !== undefined && now > req.deadline) {
      this.#log.warn(`Dropped "${req.method}": its deadline passed ${now - req.deadline} ms ago`, { id });
      return this.#done();
    }
    if (!this.#recent.add(id, fp, req.deadline ?? now + this.#dedupWindowMs, now, this.#log)) {
      this.#log.debug(`Dropped a duplicate of request ${id} ("${req.method}")`, { id });
      return this.#done();
    }
    const fits = this.#heldBytes === 0 || this.#heldBytes + bytes <= this.#maxHeldBytes;
    if (fits && this.#running < this.#maxRunning && this.#queued() === 0) {
      this.#heldBytes += bytes;
      return this.#start(req, qos, topic, bytes);
    }
    if (fits && this.#queued() < this.#maxQueued) {
      this.#heldBytes += bytes;
      this.#queue.push({ req, qos, bytes });
      return;
    }
    this.#recent.forget(id, fp); // refused: a resend of the same message must run
    this.#overloaded(req, qos);
  }

  #queued(): number {
    return this.#queue.size;
  }

  /** Refuse a request for want of room: `Overloaded` (nothing ran; the caller may retry). */
  #overloaded(req: RequestEnvelope, qos: 0 | 1): void {
    this.#refused++;
    const now = performance.now();
    if (now - this.#refusedLoggedAt >= 10_000) {
      this.#log.warn(
        `Overloaded: refused ${this.#refused} request(s) (${this.#running} handlers running, ${this.#queued()} queued, ${this.#heldBytes} bytes held: maxRunning, maxQueued, maxHeldBytes)`,
        { method: req.method, id: req.id },
      );
      this.#refused = 0;
      this.#refusedLoggedAt = now;
    }
    if (req.reply_to === undefined) return this.#done(); // a cast: counted and logged above
    // The wire form of an Overloaded error, without making one (and its stack): refusing is cheap.
    const message = `The server of "${req.method}" is overloaded (${this.#running} running, ${this.#queued()} ` +
      "queued); nothing ran, retry later";
    this.#answer(req, qos, undefined, { type: "Overloaded", message });
  }

  /** Start queued requests while there are free slots. */
  #pump(): void {
    if (this.#pumping) return; // a synchronous handler finishing inside the loop below
    this.#pumping = true;
    try {
      while (this.#running < this.#maxRunning && this.#queued() > 0) {
        const { req, qos, bytes } = this.#queue.take();
        if (req.deadline !== undefined && Date.now() > req.deadline) {
          this.#log.warn(`Dropped "${req.method}": its deadline passed while it was queued`, { id: req.id });
          this.#heldBytes -= bytes;
          this.#done();
          continue;
        }
        try {
          this.#start(req, qos, undefined, bytes);
        } catch (e) {
          this.#failed(e, req.method);
          this.#done();
        }
      }
    } finally {
      this.#pumping = false;
    }
  }

  /**
   * After a stop that timed out: forget the requests still queued (they would start on a
   * stopped service), each counted out once. Returns how many.
   */
  abandonQueued(): number {
    const n = this.#queue.size;
    while (this.#queue.size > 0) {
      this.#heldBytes -= this.#queue.take().bytes;
      this.#done();
    }
    return n;
  }

  /** Run the method now, in a running slot, and answer with its outcome. */
  #start(req: RequestEnvelope, qos: 0 | 1, topic: string | undefined, bytes: number): void {
    this.#running++;
    let result: unknown;
    try {
      result = this.#invoke(req);
    } catch (e) {
      return this.#answer(req, qos, undefined, errorToWire(e, this.#debug), bytes);
    }
    // A synchronous handler's result is used as is: no extra turn of the event loop.
    if (!(result instanceof Promise)) return this.#answer(req, qos, result, undefined, bytes);
    result.then(
      (r) => this.#answer(req, qos, r, undefined, bytes),
      (e) => this.#answer(req, qos, undefined, errorToWire(e, this.#debug), bytes),
    ).catch((e) => { // a bug of ours, as in #run
      this.#failed(e, topic ?? req.method);
      this.#done();
    });
  }

  /** Reply with the result or the error (a cast's error is logged). `held`: the bytes of a
   * request that ran, whose running slot is free now (undefined for a refused one). */
  #answer(req: RequestEnvelope, qos: 0 | 1, result: unknown, error?: WireError, held?: number): void {
    const { id, reply_to: replyTo } = req;
    if (replyTo === undefined) {
      if (error) this.#log.error(`Cast "${req.method}" failed: ${error.type}: ${error.message}`, { id });
      this.#done();
    } else {
      const reply: ReplyEnvelope = error ? { v: 1, id, error } : { v: 1, id, result: result ?? null };
      this.#reply(replyTo, reply, qos, req.batch === true, req.method);
    }
    // The slot goes to the next queued request once this one's reply is on its way: in order.
    if (held === undefined) return;
    this.#heldBytes -= held;
    if (--this.#running < this.#maxRunning && this.#queued() > 0) this.#pump();
  }

  /** Run the method: its result, or a promise of it. Throws what the lookup or the method throws. */
  #invoke(req: RequestEnvelope): unknown {
    const fn = this.#table.get(req.method);
    if (!fn) throw new NoSuchMethod(`No such method ${quote(req.method)} on ${this.manager.constructor.name}`);
    const ours = this.manager.rpcApiVersion;
    if (req.version !== undefined && !versionOk(req.version, ours)) {
      throw new UnsupportedVersion(
        `Version ${req.version} of "${req.method}" is not supported: this server speaks ${ours}`,
      );
    }
    let ctx: RequestContext;
    try {
      ctx = RequestContext.from(req.context);
    } catch (e) {
      throw new BadRequest(`Malformed request: ${(e as Error).message}`, { cause: e });
    }
    const roles = this.#roles.size === 0 ? undefined : this.#roles.get(req.method);
    if (roles !== undefined && !mayCall(ctx, roles)) {
      const who = ctx.userId === null ? "an anonymous caller" : quote(ctx.userId);
      throw new NotAuthorized(`${quote(req.method)} requires the role ${roles.join(" or ")}: ${who} has none of them`);
    }
    // A handler that is not an async function but returns a promise gets the async scope too,
    // from its next call on (its first one cannot be told apart before it has run).
    const isAsync = this.#async.has(fn);
    const r = inScope(ctx, isAsync, fn, this.manager, req.args);
    if (!isAsync && r instanceof Promise) this.#async.add(fn);
    return r;
  }

  /** Publish a reply: in a batch with other replies to the same client when its request said
   * it reads them (`"batch": true`), else alone, so that any MQTT client can read it. Its request
   * is #done once the reply is handed over (or could not be). */
  #reply(replyTo: string, reply: ReplyEnvelope, qos: 0 | 1, batch: boolean, method?: string): void {
    try {
      const message = this.#encodeReply(reply, replyTo, method);
      if (!(message instanceof Uint8Array)) {
        // In-process: the hub holds the reply once publishLocal returns; nothing to wait for.
        this.#transport.publishLocal!(replyTo, message, { qos }).catch((e) => this.#replyFailed(e, replyTo, reply.id));
        return this.#done();
      }
      // One callback for every reply (no closure each): the outbox hands back the id, the method
      // and the message, for an error reply or a retry alone.
      if (batch) this.#outbox.send(replyTo, message, { qos }, this.#replySent, reply.id, method);
      else this.#outbox.sendAlone(replyTo, message, { qos }, this.#replySent, reply.id, method);
    } catch (e) {
      this.#replySent(asError(e), replyTo, { bytes: EMPTY_BYTES, opts: { qos }, label: reply.id, method }, false);
    }
  }

  /** A reply was handed over or not (see Sent); its request is #done either way, once. */
  #replySent = (e: Error | undefined, replyTo: string, item: Outgoing, batched: boolean): void => {
    if (e !== undefined) {
      const { label: id, method } = item;
      // Too large for the transport (a RangeError, refused before sending). A batch may be too
      // large where its replies are not: each is sent again alone. A reply still too large is
      // answered by a small error reply, so that the caller does not wait out its timeout.
      if (e instanceof RangeError && batched) {
        this.#outbox.sendAlone(replyTo, item.bytes, item.opts, this.#replySent, id, method);
        return;
      }
      this.#replyFailed(e, replyTo, id);
      if (e instanceof RangeError && id !== undefined) {
        const error: WireError = {
          type: "ReplyTooLarge",
          message: `The reply to ${quote(method)} could not be sent: ${e.message}`,
        };
        try {
          const bytes = encodeBytes(this.#codec, { v: 1, id, error }, replyTo);
          this.#outbox.sendAlone(replyTo, bytes, { qos: item.opts.qos ?? this.#qos }, this.#errorReplySent, id);
        } catch (e2) {
          this.#replyFailed(e2, replyTo, id);
        }
      }
    }
    this.#done();
  };

  #errorReplySent = (e: Error | undefined, replyTo: string, item: Outgoing): void => {
    if (e !== undefined) this.#replyFailed(e, replyTo, item.label);
  };

  #replyFailed(e: unknown, replyTo: string, id?: string): void {
    this.#log.warn(`Could not send the reply to ${id}`, { replyTo, error: e });
  }

  /** The reply as bytes, or as a value for an in-process transport. */
  #encodeReply(reply: ReplyEnvelope, replyTo: string, method?: string): Uint8Array | LocalMessage {
    try {
      return encodeFor(this.#codec, this.#local, reply, replyTo);
    } catch (e) {
      // The result has no JSON form (a BigInt, a cycle, a toJSON() that throws): tell the caller
      // at once, in the same words on both paths (V8's cycle message adds lines on one of them).
      const wire = errorToWire(e, this.#debug);
      wire.message = `Cannot encode the result of ${quote(method)}: ${wire.message.split("\n", 1)[0]}`;
      wire.type = "ResultNotSerializable";
      const error: ReplyEnvelope = { v: 1, id: reply.id, error: wire };
      return encodeFor(this.#codec, this.#local, error, replyTo);
    }
  }

  /** isReplyTopic(), remembered for the few clients that call often. */
  #replyTopicOk(topic: string): boolean {
    if (this.#goodReplyTopics.has(topic)) return true;
    if (!this.#topics.isReplyTopic(topic)) return false;
    if (this.#goodReplyTopics.size >= 1024) this.#goodReplyTopics.clear();
    this.#goodReplyTopics.add(topic);
    return true;
  }
}

function positiveInt(v: unknown, what: string, min = 1): number {
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < min) {
    throw new RangeError(`Invalid ${what} ${quote(v)}: must be an integer >= ${min}`);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Loops
// ---------------------------------------------------------------------------------------------

/** Options of {@link LoopingCall.start}. */
export interface LoopStartOptions {
  /** Seconds between the starts of two runs. */
  interval: number;
  /** Seconds before the first run. Default 0. */
  initialDelay?: number;
}

/**
 * Runs a function every `interval` seconds, timed from each run's start, never overlapping
 * itself. A run longer than the interval is logged and the next starts at once. An error is
 * logged and the loop goes on, unless `stopOnError` is set.
 */
export class LoopingCall {
  /** The loop's name, in its log lines. */
  readonly name: string;
  #fn: () => unknown;
  #log: Logger;
  #stopOnError: boolean;
  #late = false;
  #timer?: { cancel(): void };
  #wake?: () => void;
  #stopped = false;
  #started = false;
  /** Resolves when the loop has stopped and its last run has finished. */
  done: Promise<void> = Promise.resolve();

  /** A loop of `fn`; `stopOnError` ends it at the first error (`done` rejects). */
  constructor(fn: () => unknown, opts: { name?: string; logger?: Logger; stopOnError?: boolean } = {}) {
    this.#fn = fn;
    this.name = opts.name ?? (fn.name || "loop");
    this.#log = opts.logger ?? getLogger();
    this.#stopOnError = opts.stopOnError ?? false;
  }

  /** Started and not stopped. */
  get running(): boolean {
    return this.#started && !this.#stopped;
  }

  /** Start the loop; once only. @throws {RangeError} for a bad interval or delay. */
  start(opts: LoopStartOptions): this {
    if (this.#started) throw new Error(`Loop ${quote(this.name)} was already started`);
    const interval = checkTimeout(opts.interval, "interval");
    const initialDelay = opts.initialDelay ?? 0;
    if (!(initialDelay >= 0 && initialDelay <= MAX_SECONDS)) {
      throw new RangeError(`Invalid initialDelay ${quote(initialDelay)}: must be seconds >= 0, at most ${MAX_SECONDS}`);
    }
    this.#started = true;
    this.done = this.#run(interval * 1000, initialDelay * 1000);
    return this;
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      this.#wake = resolve;
      this.#timer = longTimeout(resolve, ms);
    });
  }

  async #run(intervalMs: number, delayMs: number): Promise<void> {
    if (delayMs > 0) await this.#sleep(delayMs);
    while (!this.#stopped) {
      const start = Date.now();
      try {
        await this.#fn();
      } catch (e) {
        this.#log.error(`Loop ${this.name} failed`, { loop: this.name, error: e });
        if (this.#stopOnError) {
          this.#stopped = true;
          throw e;
        }
      }
      if (this.#stopped) break;
      const took = Date.now() - start;
      // Once per streak of late runs: a registry that hangs would otherwise repeat it every interval.
      if (took > intervalMs && !this.#late) {
        this.#log.warn(
          `Loop ${this.name} run took ${took} ms, longer than its interval of ${intervalMs} ms (said once until one is on time)`,
          { loop: this.name },
        );
      }
      this.#late = took > intervalMs;
      await this.#sleep(Math.max(0, intervalMs - took));
    }
  }

  /** Cancel the timer; `done` resolves when a run in progress finishes. */
  stop(): void {
    this.#stopped = true;
    this.#timer?.cancel();
    this.#wake?.();
  }
}

/** Owns the loops and in-flight work of a service; stops them together. */
export class LoopGroup {
  #loops = new Set<LoopingCall>();
  #work = new Set<Promise<unknown>>();

  /** Start `fn` every `interval` seconds in this group. */
  addTimer(fn: () => unknown, opts: LoopStartOptions & { name?: string; logger?: Logger }): LoopingCall {
    const loop = new LoopingCall(fn, opts).start(opts);
    this.#loops.add(loop);
    return loop;
  }

  /** Track a piece of running work so `stop()` waits for it. */
  track<T>(p: Promise<T>): Promise<T> {
    this.#work.add(p);
    p.then(() => this.#work.delete(p), () => this.#work.delete(p));
    return p;
  }

  /**
   * Cancel every timer and wait for what runs, at most `graceful` seconds.
   * @returns true when everything finished in time.
   */
  async stop(graceful = 60): Promise<boolean> {
    for (const l of this.#loops) l.stop();
    const all = Promise.allSettled([...[...this.#loops].map((l) => l.done), ...this.#work]);
    this.#loops.clear();
    return await within(all, graceful) !== TIMED_OUT;
  }
}

/** The longest delay of one timer (Node and Deno fire a longer one at once): ~24.8 days. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** setTimeout for any delay: one longer than a timer can hold is chained. */
function longTimeout(fn: () => void, ms: number): { cancel(): void } {
  let timer: ReturnType<typeof setTimeout>;
  const arm = (left: number) => {
    timer = setTimeout(left > MAX_TIMER_MS ? () => arm(left - MAX_TIMER_MS) : fn, Math.min(left, MAX_TIMER_MS));
  };
  arm(ms);
  return { cancel: () => clearTimeout(timer) };
}

// ---------------------------------------------------------------------------------------------
// Liveness
// ---------------------------------------------------------------------------------------------

/** Why a service is down: `forced` by an operator, `stopped` cleanly, `lost` (its process died or
 * went silent: the broker published its Will), `stale` (no heartbeat within its service_down_time). */
export type DownReason = "forced" | "stopped" | "lost" | "stale";

/** A service's liveness: up, or down and why. */
export interface Liveness {
  /** `up` or `down`. */
  state: "up" | "down";
  /** Why it is down; absent when up. */
  reason?: DownReason;
}

/** Options of {@link liveness} and {@link isUp}. */
export interface LivenessOptions {
  /** Default: now. */
  now?: Date;
  /** For a row that records none: seconds without a heartbeat after which it is down (60). */
  serviceDownTime?: number;
  /** The service's presence, when the transport has it ({@link readPresence}). */
  presence?: Presence;
}

/**
 * A service's liveness: forced down; else gone by its presence (`offline`: stopped, `lost`);
 * else, as Nova's servicegroup DB driver decides, down (`stale`) once `now - (lastSeenUp ??
 * createdAt)` exceeds its own service_down_time (the row's, else `opts`', else 60 s). Without
 * presence (memory transport, a broker without Wills) the heartbeat alone decides.
 */
export function liveness(r: ServiceRecord, opts: LivenessOptions = {}): Liveness {
  if (r.forcedDown) return { state: "down", reason: "forced" };
  const p = opts.presence;
  if (p !== undefined && p.host === r.host && p.binary === r.binary && p.state !== "online") {
    return { state: "down", reason: p.state === "lost" ? "lost" : "stopped" };
  }
  const last = r.lastSeenUp ?? r.createdAt;
  const now = opts.now ?? new Date();
  const downTime = r.serviceDownTime ?? opts.serviceDownTime ?? 60;
  return now.getTime() - last.getTime() <= downTime * 1000 ? { state: "up" } : { state: "down", reason: "stale" };
}

/** Whether the service is up: {@link liveness} says `up`. */
export function isUp(r: ServiceRecord, opts: LivenessOptions = {}): boolean {
  return liveness(r, opts).state === "up";
}

/** The presence in a message's bytes, or undefined when they are not one (an empty message
 * clears a retained presence). */
export function parsePresence(payload: Uint8Array): Presence | undefined {
  if (payload.byteLength === 0 || payload.byteLength > 4096) return undefined;
  let p: Record<string, unknown>;
  try {
    p = parseJson(payload) as Record<string, unknown>;
  } catch {
    return undefined;
  }
  const ok = isPlainObject(p) && ["online", "offline", "lost"].includes(p.state as string) &&
    Number.isSafeInteger(p.incarnation) && typeof p.topic === "string" && typeof p.host === "string" &&
    typeof p.binary === "string" && typeof p.report_interval === "number" &&
    typeof p.service_down_time === "number" && typeof p.since === "string";
  return ok ? p as unknown as Presence : undefined;
}

/**
 * The presence of every service the broker keeps (retained), by `topic.host`. Resolves once the
 * broker has sent what it keeps (a message of ours sent after subscribing comes back after
 * them), or after `timeout` seconds with what came.
 */
export async function readPresence(
  transport: Transport,
  prefix = "novalet",
  timeout = 5,
): Promise<Map<string, Presence>> {
  // A connection of its own where there can be one: a subscription the transport already has
  // would share the broker's, which sends retained messages only when a subscription is made.
  if (transport.connection) {
    const opening = transport.connection({});
    const own = await within(opening, timeout);
    if (own === TIMED_OUT) {
      opening.then((t) => t.close(), () => {});
      throw new DeliveryError(`Cannot read presence: no connection to the broker within ${timeout} s`);
    }
    try {
      return await readFrom(own, prefix, timeout);
    } finally {
      await own.close();
    }
  }
  return await readFrom(transport, prefix, timeout);
}

async function readFrom(transport: Transport, prefix: string, timeout: number): Promise<Map<string, Presence>> {
  const topics = new Topics(prefix);
  const found = new Map<string, Presence>();
  let done!: () => void;
  const end = new Promise<void>((r) => (done = r));
  const marker = `${topics.prefix}/presence-read/${crypto.randomUUID()}`;
  const subs = [
    await transport.subscribe(topics.presence("+", "+"), (payload) => {
      const p = parsePresence(payload);
      if (p !== undefined) found.set(`${p.topic}.${p.host}`, p);
    }, { qos: 1 }),
  ];
  try {
    subs.push(await transport.subscribe(marker, () => done(), { qos: 1 }));
    await transport.publish(marker, utf8("."), { qos: 1 });
    await within(end, timeout);
  } finally {
    await Promise.all(subs.map((s) => s.unsubscribe().catch(() => {})));
  }
  return found;
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

/** Settings of a novalet process, from the command line and `NOVALET_*` environment variables. */
export interface Flags {
  /** Seconds between heartbeats. Default 10. */
  reportInterval: number;
  /** Seconds between periodic task ticks. Default 60. */
  periodicInterval: number;
  /** The first periodic tick waits a random [0, this] seconds. Default 60. */
  periodicFuzzyDelay: number;
  /** A service is down when its last heartbeat is older than this. Default 60; > reportInterval. */
  serviceDownTime: number;
  /** Default call timeout, seconds. Default 60. */
  rpcResponseTimeout: number;
  /** How long a graceful stop waits for in-flight work, seconds. Default 60. */
  gracefulShutdownTimeout: number;
  /** Handlers a service runs at once. Default 64. */
  maxRunningHandlers: number;
  /** Requests a service queues for a running slot; more are refused (`Overloaded`). Default 1000. */
  maxQueuedHandlers: number;
  /** Bytes of requests a service holds, running and queued; more are refused. Default 32 MiB. */
  maxHeldBytes: number;
  /** Default: the machine's hostname. */
  host: string;
  /** `memory://` (default), `mqtt://user:pass@host:1883`, `mqtts://...`. */
  transportUrl: string;
  /** `sqljs::memory:` (default), `sqljs:PATH`, `postgres://user@host/db`. */
  registryUrl: string;
  /** Topic prefix. Default `novalet`. */
  prefix: string;
  /** `text` (default) or `json` lines on stderr. */
  logFormat: "text" | "json";
  /** The lowest level logged. Default `info`. */
  logLevel: LogLevel;
  /** Send stack traces with remote errors. Default false. */
  debug: boolean;
  /** A key file: sign every envelope and refuse unsigned ones (see keys.ts). Default none. */
  keys: string;
  /** `--TOPIC_manager=./path.ts#Class`, by topic. */
  managers: Record<string, string>;
}

type FlagSpec = { key: keyof Flags; parse: (v: string, name: string) => unknown };

const seconds = (min: "positive" | "zero") => (v: string, name: string): number => {
  const n = Number(v);
  if (v.trim() === "" || !(n <= MAX_SECONDS) || (min === "positive" ? n <= 0 : n < 0)) {
    throw new RangeError(
      `Invalid --${name}=${quote(v)}: must be a ${
        min === "positive" ? "positive" : "non-negative"
      } number of seconds, at most ${MAX_SECONDS}`,
    );
  }
  return n;
};

const count = (min: number) => (v: string, name: string): number => {
  const n = Number(v);
  if (!/^\d+$/.test(v.trim()) || !Number.isSafeInteger(n) || n < min) {
    throw new RangeError(`Invalid --${name}=${quote(v)}: must be a whole number >= ${min}`);
  }
  return n;
};

const oneOf = <T extends string>(...allowed: T[]) => (v: string, name: string): T => {
  if (!allowed.includes(v as T)) {
    throw new RangeError(`Invalid --${name}=${quote(v)}: must be one of ${allowed.join(", ")}`);
  }
  return v as T;
};

const url = (kind: "transport" | "registry") => (v: string, name: string): string => {
  // Without an opener any scheme may do: opening it says what is wrong.
  const problem = installed ? installed.urlProblem(kind, v) : /^[a-z][a-z0-9+.-]*:/i.test(v) ? undefined : "not a URL";
  if (problem !== undefined) throw new RangeError(`Invalid --${name}=${quote(redactUrl(v))}: ${problem}`);
  return v;
};

const bool = (v: string, name: string): boolean => {
  if (["true", "1", "yes", ""].includes(v)) return true;
  if (["false", "0", "no"].includes(v)) return false;
  throw new RangeError(`Invalid --${name}=${quote(v)}: must be true or false`);
};

const FLAGS: Record<string, FlagSpec> = {
  report_interval: { key: "reportInterval", parse: seconds("positive") },
  periodic_interval: { key: "periodicInterval", parse: seconds("positive") },
  periodic_fuzzy_delay: { key: "periodicFuzzyDelay", parse: seconds("zero") },
  service_down_time: { key: "serviceDownTime", parse: seconds("positive") },
  rpc_response_timeout: { key: "rpcResponseTimeout", parse: seconds("positive") },
  graceful_shutdown_timeout: { key: "gracefulShutdownTimeout", parse: seconds("positive") },
  max_running_handlers: { key: "maxRunningHandlers", parse: count(1) },
  max_queued_handlers: { key: "maxQueuedHandlers", parse: count(0) },
  max_held_bytes: { key: "maxHeldBytes", parse: count(1) },
  host: { key: "host", parse: (v, n) => checkName("host", v, `--${n}`) },
  transport_url: { key: "transportUrl", parse: url("transport") },
  registry_url: { key: "registryUrl", parse: url("registry") },
  prefix: { key: "prefix", parse: (v) => checkPrefix(v) },
  log_format: { key: "logFormat", parse: oneOf("text", "json") },
  log_level: { key: "logLevel", parse: oneOf("debug", "info", "warn", "error", "silent") },
  debug: { key: "debug", parse: bool },
  keys: { key: "keys", parse: (v) => v },
};

/** The flags' defaults (the host is this machine's name). */
export function defaultFlags(): Flags {
  return {
    reportInterval: 10,
    periodicInterval: 60,
    periodicFuzzyDelay: 60,
    serviceDownTime: 60,
    rpcResponseTimeout: 60,
    gracefulShutdownTimeout: 60,
    maxRunningHandlers: 64,
    maxQueuedHandlers: 1000,
    maxHeldBytes: 32 * 1024 * 1024,
    host: hostname(),
    transportUrl: "memory://",
    registryUrl: "sqljs::memory:",
    prefix: "novalet",
    logFormat: "text",
    logLevel: "info",
    debug: false,
    keys: "",
    managers: {},
  };
}

/**
 * Read flags from `argv` (`--report_interval=10` or `--report_interval 10`; `--debug`,
 * `--nodebug`) over `NOVALET_REPORT_INTERVAL`-style variables of `env`, over the defaults.
 * `--TOPIC_manager=./path.ts#Class` names the manager of a topic.
 * @throws {RangeError} for a bad value; {TypeError} for an unknown flag or a stray argument.
 * @example
 * ```ts
 * const flags = parseFlags(["--report_interval=5", "--transport_url", "mqtt://broker:1883"], process.env);
 * flags.reportInterval; // 5 (NOVALET_REPORT_INTERVAL=7 in env would lose to the flag)
 * ```
 */
export function parseFlags(argv: readonly string[] = [], env: Record<string, string | undefined> = {}): Flags {
  const flags = defaultFlags();
  const set = (name: string, value: string, where: string) => {
    const manager = /^([a-z][a-z0-9-]*)_manager$/.exec(name);
    if (manager) {
      flags.managers[manager[1]!] = value;
      return;
    }
    const spec = FLAGS[name];
    if (!spec) {
      throw new TypeError(`Unknown flag ${where}; known flags: --${Object.keys(FLAGS).join(", --")}, --TOPIC_manager`);
    }
    (flags as unknown as Record<string, unknown>)[spec.key] = spec.parse(value, name);
  };
  for (const [k, v] of Object.entries(env)) {
    if (!k.startsWith("NOVALET_") || v === undefined) continue;
    const name = k.slice("NOVALET_".length).toLowerCase();
    if (FLAGS[name] || name.endsWith("_manager")) set(name, v, `${k}`);
  }
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    const m = /^--([a-z][a-z0-9_-]*)(?:=(.*))?$/s.exec(arg);
    if (!m) throw new TypeError(`Unexpected argument ${quote(arg)}: flags look like --name=value`);
    let [, name, value] = m as unknown as [string, string, string | undefined];
    name = name.replaceAll("-", "_");
    if (value === undefined && (name === "debug" || name === "nodebug")) {
      set("debug", name === "debug" ? "true" : "false", `--${name}`);
      continue;
    }
    if (value === undefined) {
      value = argv[++i];
      if (value === undefined) throw new TypeError(`Flag --${name} needs a value`);
    }
    set(name, value, `--${name}`);
  }
  if (flags.serviceDownTime <= flags.reportInterval) {
    throw new RangeError(
      `Invalid --service_down_time=${flags.serviceDownTime}: must be greater than --report_interval=${flags.reportInterval}, or every service would look down between two heartbeats`,
    );
  }
  return flags;
}

// ---------------------------------------------------------------------------------------------
// Service
// ---------------------------------------------------------------------------------------------

/** Options of {@link Service.create}. What is missing comes from `flags`. */
export interface ServiceOptions {
  /** Default: `flags.host` (the machine's hostname). */
  host?: string;
  /** Default: the script's base name (`nova-compute` for `bin/nova-compute.ts`). */
  binary?: string;
  /** Default: `binary` without a leading `nova-`. */
  topic?: string;
  /** A Manager subclass, an instance, or `"./path.ts#ClassName"`. Default: `--TOPIC_manager`. */
  manager?: ManagerClass | Manager | string;
  /** Seconds between heartbeats. Default `flags.reportInterval` (10). */
  reportInterval?: number;
  /** Seconds between periodic task ticks. Default `flags.periodicInterval` (60). */
  periodicInterval?: number;
  /** Seconds without a heartbeat after which others see it down; recorded in its registry row.
   * Default `flags.serviceDownTime` (60). */
  serviceDownTime?: number;
  /** The first periodic tick waits a random [0, this] seconds. Default `flags.periodicFuzzyDelay` (60). */
  periodicFuzzyDelay?: number;
  /** Default: opened from `flags.transportUrl` and closed by `stop()`. A transport passed in is never closed. */
  transport?: Transport;
  /** Default: opened from `flags.registryUrl` and closed by `stop()`. A registry passed in is never closed. */
  registry?: Registry;
  /** What opens the transport and registry from their URLs. Default: the one open.ts installs. */
  opener?: Opener;
  /** Default: `parseFlags([], process.env)`, i.e. the defaults and `NOVALET_*` variables. */
  flags?: Flags;
  /** Topic prefix. Default `flags.prefix` (`novalet`). */
  prefix?: string;
  /** How envelopes are written and read, for the service and its `rpc`. Default: the JSON codec,
   * or with `flags.keys` the opener's signing codec of that key file. */
  codec?: Codec;
  /** Default: a ConsoleLogger of the flags' level and format. */
  logger?: Logger;
  /** Send stack traces with errors. */
  debug?: boolean;
  /** Seconds `stop()` waits for in-flight work. Default `flags.gracefulShutdownTimeout` (60). */
  gracefulShutdownTimeout?: number;
  /** Default call timeout of `service.rpc`, seconds. Default `flags.rpcResponseTimeout` (60). */
  rpcTimeout?: number;
  /** Larger requests are logged and dropped unread. Default 16 MiB. */
  maxMessageBytes?: number;
  /** Handlers run at once. Default `flags.maxRunningHandlers` (64). */
  maxRunningHandlers?: number;
  /** Requests queued for a running slot; more are refused with `Overloaded`. Default
   * `flags.maxQueuedHandlers` (1000). */
  maxQueuedHandlers?: number;
  /** Bytes of requests held, running and queued. Default `flags.maxHeldBytes` (32 MiB). */
  maxHeldBytes?: number;
}

/** Load `"./path.ts#ClassName"` (path relative to the working directory, or a package name). */
export async function loadManager(spec: string): Promise<ManagerClass> {
  const hash = typeof spec === "string" ? spec.lastIndexOf("#") : -1;
  if (hash <= 0 || hash === spec.length - 1) {
    throw new TypeError(`Invalid manager specifier ${quote(spec)}: expected "./path.ts#ClassName"`);
  }
  const path = spec.slice(0, hash);
  const name = spec.slice(hash + 1);
  const url = path.startsWith(".") || path.startsWith("/") ? pathToFileURL(resolvePath(path)).href : path;
  let mod: Record<string, unknown>;
  try {
    mod = await import(url);
  } catch (e) {
    throw new TypeError(`Cannot load manager ${quote(spec)}: ${(e as Error).message}`, { cause: e });
  }
  const cls = mod[name];
  if (!isManagerClass(cls)) {
    throw new TypeError(`Cannot load manager ${quote(spec)}: ${quote(name)} is not an exported Manager subclass`);
  }
  return cls as ManagerClass;
}

/** The script's base name without extension (`nova-compute` for `bin/nova-compute.ts`). */
function scriptName(): string {
  const main = process.argv[1];
  return main ? basename(main, extname(main)) : "novalet";
}

/**
 * A service: a manager consuming `topic` (shared with the other servers of the topic),
 * `topic.host` and the fanout of `topic`, registered in the registry with a heartbeat every
 * `reportInterval`, and running the manager's periodic tasks every `periodicInterval`.
 */
export class Service {
  /** The host it serves (`topic.host`). */
  readonly host: string;
  /** Its program's name; (host, binary) is its registry row. */
  readonly binary: string;
  /** The topic it consumes. */
  readonly topic: string;
  /** Seconds between heartbeats. */
  readonly reportInterval: number;
  /** Seconds between periodic task ticks. */
  readonly periodicInterval: number;
  /** Seconds without a heartbeat after which others see it down (recorded in its row). */
  readonly serviceDownTime: number;
  /** The first periodic tick waits a random [0, this] seconds. */
  readonly periodicFuzzyDelay: number;
  /** Seconds `stop()` waits for work in flight. */
  readonly gracefulShutdownTimeout: number;
  /** The flags it was made with. */
  readonly flags: Flags;
  /** Its logger: every line carries `service=topic.host`. */
  readonly logger: Logger;
  /** The registry row, once registered. */
  record?: ServiceRecord;
  #opts: ServiceOptions;
  #topics: Topics;
  #transport?: Transport;
  #registry?: Registry;
  #owned: { close(): Promise<void> }[] = [];
  #rpc?: Rpc;
  #codec?: Codec;
  #manager?: Manager;
  #dispatcher?: Dispatcher;
  /** `topic` (shared) and the fanout: unsubscribed on stop. */
  #subs: Subscription[] = [];
  /** `topic.host`: only detached on stop, so a persistent session keeps it. */
  #hostSub?: Subscription;
  #group = new LoopGroup();
  #state: "new" | "starting" | "running" | "stopping" | "stopped" = "new";
  #stopping?: Promise<boolean>;
  #registryDown = false;
  /** Where shared work, the fanout and replies go: on a transport with a persistent session, a
   * second connection with a clean session (none of it may wait for a dead server); else the
   * transport itself. */
  #live?: Transport;
  /** This run's presence: its topic and incarnation, the connection that carries its Will (`via`),
   * the watch of it, whether it is announced. */
  #presence?: {
    topic: string;
    incarnation: number;
    via?: Transport;
    sub?: Subscription;
    on: boolean;
    warned?: boolean;
  };

  private constructor(opts: ServiceOptions) {
    const flags = opts.flags ?? parseFlags([], process.env);
    this.flags = flags;
    this.#opts = opts;
    this.binary = checkName("binary", opts.binary ?? scriptName(), "binary");
    this.host = checkName("host", opts.host ?? flags.host, "host");
    this.topic = checkName("topic", opts.topic ?? this.binary.replace(/^nova-/, ""), "topic");
    if (this.topic.includes(".")) throw new TypeError(`Invalid topic ${quote(this.topic)}: topics have no "."`);
    this.reportInterval = checkTimeout(opts.reportInterval ?? flags.reportInterval, "reportInterval");
    this.periodicInterval = checkTimeout(opts.periodicInterval ?? flags.periodicInterval, "periodicInterval");
    this.serviceDownTime = checkTimeout(opts.serviceDownTime ?? flags.serviceDownTime, "serviceDownTime");
    this.periodicFuzzyDelay = opts.periodicFuzzyDelay ?? flags.periodicFuzzyDelay;
    if (!(this.periodicFuzzyDelay >= 0 && this.periodicFuzzyDelay <= MAX_SECONDS)) {
      throw new RangeError(
        `Invalid periodicFuzzyDelay ${quote(this.periodicFuzzyDelay)}: must be seconds >= 0, at most ${MAX_SECONDS}`,
      );
    }
    this.gracefulShutdownTimeout = checkTimeout(
      opts.gracefulShutdownTimeout ?? flags.gracefulShutdownTimeout,
      "gracefulShutdownTimeout",
    );
    if ((opts.manager ?? flags.managers[this.topic]) === undefined) {
      throw new TypeError(`No manager for topic ${quote(this.topic)}: pass "manager" or --${this.topic}_manager`);
    }
    this.#topics = new Topics(opts.prefix ?? flags.prefix);
    const base = opts.logger ??
      (opts.flags ? new ConsoleLogger({ level: flags.logLevel, format: flags.logFormat }) : getLogger());
    this.logger = withFields(base, { service: `${this.topic}.${this.host}` });
    this.#transport = opts.transport;
    this.#registry = opts.registry;
  }

  /**
   * Build a service; nothing runs until `start()`. What `opts` leaves out comes from the flags.
   * @throws {TypeError} a bad host, binary or topic, or no manager; {RangeError} a bad duration.
   * @example
   * ```ts
   * const svc = Service.create({ topic: "compute", manager: Compute, flags: parseFlags(process.argv.slice(2)) });
   * await svc.start(); // register, consume compute, compute.HOST and the fanout; heartbeat every 10 s
   * await svc.stop(); // in-flight calls finish first
   * ```
   */
  static create(opts: ServiceOptions): Service {
    return new Service(opts);
  }

  /** The manager, once started. */
  get manager(): Manager {
    if (!this.#manager) throw new ClosedError(`Service ${this.topic}.${this.host} has not started`);
    return this.#manager;
  }

  /** The codec of the service and its `rpc`, once started. */
  get codec(): Codec {
    if (!this.#codec) throw new ClosedError(`Service ${this.topic}.${this.host} has not started`);
    return this.#codec;
  }

  /** The transport, once started. */
  get transport(): Transport {
    if (!this.#transport) throw new ClosedError(`Service ${this.topic}.${this.host} has not started`);
    return this.#transport;
  }

  /** The registry, once started. */
  get registry(): Registry {
    if (!this.#registry) throw new ClosedError(`Service ${this.topic}.${this.host} has not started`);
    return this.#registry;
  }

  /** An RPC client on the service's transport, to call other services. */
  get rpc(): Rpc {
    return this.#rpc ??= new Rpc(this.#live ?? this.transport, {
      prefix: this.#topics.prefix,
      codec: this.codec,
      logger: this.logger,
      timeout: this.#opts.rpcTimeout ?? this.flags.rpcResponseTimeout,
    });
  }

  /** The dispatcher, once started (its `inFlight` and `methods`). */
  get dispatcher(): Dispatcher | undefined {
    return this.#dispatcher;
  }

  /** `new` → `starting` → `running` → `stopping` → `stopped`. */
  get state(): "new" | "starting" | "running" | "stopping" | "stopped" {
    return this.#state;
  }

  /**
   * Build the manager, register, `initHost()`, consume `topic` (shared), `topic.host` and the
   * fanout, then start the heartbeat (the first one at once) and the periodic loop.
   */
  async start(): Promise<void> {
    if (this.#state !== "new") throw new Error(`Service ${this.topic}.${this.host} was already started`);
    this.#state = "starting";
    try {
      await this.#start();
      this.#state = "running";
    } catch (e) {
      await this.#teardown(false);
      this.#state = "stopped";
      throw e;
    }
  }

  async #start(): Promise<void> {
    const m = this.#opts.manager ?? this.flags.managers[this.topic]!;
    const manager = isManager(m) ? m : new (typeof m === "string" ? await loadManager(m) : m)();
    manager.host = this.host;
    manager.service = this;
    this.#manager = manager;
    this.#presence = { topic: this.#topics.presence(this.topic, this.host), incarnation: Date.now(), on: false };
    const codec = this.#codec = this.#opts.codec ?? (this.flags.keys ? await this.#openCodec() : jsonCodec);
    codec.checkServe?.(this.topic); // a key that may not serve this topic fails here, named
    if (!this.#transport) {
      // A persistent session must be found again by the next run of this service: a stable id.
      this.#transport = await (this.#opts.opener ?? theOpener("a transport")).openTransport(this.flags.transportUrl, {
        logger: this.logger,
        sessionClientId: `novalet-${this.binary}-${this.host}`,
      });
      this.#owned.push(this.#transport);
    }
    if (!this.#registry) {
      this.#registry = await (this.#opts.opener ?? theOpener("a registry")).openRegistry(this.flags.registryUrl, {
        logger: this.logger,
        transport: this.#transport,
        prefix: this.#topics.prefix,
        codec,
      });
      this.#owned.push(this.#registry);
    }
    await this.#register();
    await manager.initHost();
    const live = this.#live = await this.#openLive(this.#transport);
    const dispatcher = new Dispatcher(manager, live, {
      prefix: this.#topics.prefix,
      codec,
      logger: this.logger,
      debug: this.#opts.debug ?? this.flags.debug,
      maxMessageBytes: this.#opts.maxMessageBytes,
      maxRunning: this.#opts.maxRunningHandlers ?? this.flags.maxRunningHandlers,
      maxQueued: this.#opts.maxQueuedHandlers ?? this.flags.maxQueuedHandlers,
      maxHeldBytes: this.#opts.maxHeldBytes ?? this.flags.maxHeldBytes,
    });
    this.#dispatcher = dispatcher;
    const handle = dispatcher.handle; // it counts its in-flight handlers; stop() waits for them
    const t = this.#topics;
    // The dispatcher reads requests sent as values (publishLocal), unless its codec must see the
    // bytes (a signing codec has no copy()): values would pass by its checks.
    const local = codec.copy !== undefined;
    // Shared work and the fanout go to live servers only; what is addressed to this host may wait
    // in the transport's persistent session while it is away.
    this.#subs.push(await live.subscribe(t.forAddress(this.topic), handle, { group: this.topic, local }));
    this.#hostSub = await this.#transport.subscribe(t.forAddress(`${this.topic}.${this.host}`), handle, { local });
    this.#subs.push(await live.subscribe(t.fanout(this.topic), handle, { local }));
    await this.#announce();
    this.#group.addTimer(() => this.#report(), { name: "report", interval: this.reportInterval, logger: this.logger });
    const ctx = RequestContext.admin();
    // The loop only starts the due tasks: a slow task must not hold back the next tick.
    this.#group.addTimer(() => void this.#group.track(manager.periodicTasks(ctx)), {
      name: "periodic",
      interval: this.periodicInterval,
      initialDelay: Math.random() * this.periodicFuzzyDelay,
      logger: this.logger,
    });
  }

  #openCodec(): Promise<Codec> {
    const opener = this.#opts.opener ?? theOpener("a key file");
    if (!opener.openCodec) {
      throw new TypeError(`Cannot use --keys=${quote(this.flags.keys)}: the opener reads no key files`);
    }
    return opener.openCodec(this.flags.keys, { prefix: this.#topics.prefix, logger: this.logger });
  }

  /**
   * The connection that carries this run's Will and presence, and the live connection (see
   * #live). Presence has a connection of its own, which carries nothing else: a Will must follow
   * a silence within 1.5 × keepalive, so that connection negotiates a shorter keepalive and pings
   * often (MQTT: see willKeepalive), and a process that stalls for longer than it tolerates loses
   * only that connection (it says `online` again once it runs: #onOwnPresence), never its work.
   * A transport that cannot open connections (memory) has no presence.
   */
  async #openLive(transport: Transport): Promise<Transport> {
    const p = this.#presence!;
    if (!transport.connection) {
      this.#presence = undefined;
      return transport;
    }
    const will: LastWill = { topic: p.topic, payload: this.#presenceBytes("lost"), retain: true };
    try {
      p.via = await transport.connection({ will });
    } catch (e) {
      if (!(e instanceof TypeError)) throw e;
      this.logger.warn(`No presence for this service: ${e.message}`);
      this.#presence = undefined;
      return transport;
    }
    this.#owned.push(p.via);
    if (!transport.persistent) return transport;
    const live = await transport.connection({});
    this.#owned.push(live);
    return live;
  }

  #presenceBytes(state: Presence["state"]): Uint8Array {
    const presence: Presence = {
      state,
      incarnation: this.#presence!.incarnation,
      topic: this.topic,
      host: this.host,
      binary: this.binary,
      report_interval: this.reportInterval,
      service_down_time: this.serviceDownTime,
      since: new Date().toISOString(),
    };
    return utf8(JSON.stringify(presence));
  }

  /** Say `online` (retained), and say it again whenever something else lands on our presence
   * topic: our own Will after a silent spell, or a late Will of an earlier run. */
  async #announce(): Promise<void> {
    const p = this.#presence;
    if (!p?.via) return;
    const via = p.via;
    p.on = true;
    p.sub = await via.subscribe(p.topic, (payload) => this.#onOwnPresence(via, payload), { qos: 1 });
    await via.publish(p.topic, this.#presenceBytes("online"), { qos: 1, retain: true });
  }

  #onOwnPresence(via: Transport, payload: Uint8Array): void {
    const p = this.#presence!;
    const seen = parsePresence(payload);
    if (!p.on || (seen?.state === "online" && seen.incarnation === p.incarnation)) return;
    // Only a newer run that is online makes this one stand down; a newer one's Will or stop means
    // that run is gone, and this one, alive, says so.
    if (seen?.state === "online" && seen.incarnation > p.incarnation) {
      if (!p.warned) {
        this.logger.warn(`A newer run of ${this.topic}.${this.host} announced itself: two servers claim it`);
      }
      p.warned = true;
      return;
    }
    via.publish(p.topic, this.#presenceBytes("online"), { qos: 1, retain: true }).catch((e) =>
      this.logger.warn("Cannot announce this service's presence", { error: e })
    );
  }

  /** Create or reuse the row; an unreachable registry is logged and retried by the report loop. */
  async #register(): Promise<void> {
    try {
      this.record = await this.#registryCall((r) => r.register(this), "register");
    } catch (e) {
      if (e instanceof TypeError) throw e;
      this.#registryDown = true;
      this.logger.error("Cannot register: the registry is unreachable; serving anyway, retrying at each heartbeat", {
        error: e,
      });
    }
  }

  /** One heartbeat; logs a registry outage once and its recovery once; re-creates a lost row. */
  async #report(): Promise<void> {
    try {
      if (!this.record) this.record = await this.#registryCall((r) => r.register(this), "register");
      const id = this.record.id;
      try {
        this.record = await this.#registryCall((r) => r.reportState(id), "report");
      } catch (e) {
        if (!(e instanceof NotFound)) throw e;
        this.logger.warn("The registry row of this service was deleted; registering again");
        const again = await this.#registryCall((r) => r.register(this), "register");
        this.record = await this.#registryCall((r) => r.reportState(again.id), "report");
      }
      if (this.#registryDown) this.logger.info("The registry is reachable again; heartbeats resume");
      this.#registryDown = false;
    } catch (e) {
      if (!this.#registryDown) this.logger.error("Heartbeat failed: the registry is unreachable", { error: e });
      this.#registryDown = true;
    }
  }

  /**
   * A registry operation, abandoned after `reportInterval` seconds (at least 1): a registry that
   * hangs (a half-open connection) must not hold the heartbeat loop, start() or stop() forever.
   */
  async #registryCall<T>(op: (r: Registry) => Promise<T>, what: string): Promise<T> {
    const limit = Math.max(1, this.reportInterval);
    const r = await within(op(this.#registry!), limit);
    if (r === TIMED_OUT) throw new RegistryTimeoutError(`The registry gave no answer to ${what} within ${limit} s`);
    return r;
  }

  /**
   * Stop consuming, let in-flight handlers finish (at most `gracefulShutdownTimeout`), stop the
   * loops, and close what the service opened itself. The registry row stays. Idempotent.
   * @returns true when everything in flight finished in time.
   */
  stop(): Promise<boolean> {
    return this.#stopping ??= this.#stop(false);
  }

  /** Like `stop()`, and also delete the registry row and any persistent subscription. */
  kill(): Promise<boolean> {
    return this.#stopping ??= this.#stop(true);
  }

  async #stop(kill: boolean): Promise<boolean> {
    if (this.#state === "new" || this.#state === "stopped") {
      this.#state = "stopped";
      return true;
    }
    this.#state = "stopping";
    const clean = await this.#teardown(kill);
    this.#state = "stopped";
    return clean;
  }

  async #teardown(kill: boolean): Promise<boolean> {
    // Every step gets what is left of the graceful time (a moment at least, so a close can start):
    // a broker or registry that hangs cannot hold stop() past it, and the later steps still run.
    const end = performance.now() + this.gracefulShutdownTimeout * 1000;
    const left = () => Math.max(0.05, (end - performance.now()) / 1000);
    let clean = true;
    const step = async (what: string, run: () => Promise<unknown> | undefined, logErrors = true) => {
      try {
        if (await within(Promise.resolve().then(run), left()) !== TIMED_OUT) return;
        clean = false;
        this.logger.warn(`Gave up waiting to ${what}: the graceful time (${this.gracefulShutdownTimeout} s) is over`);
      } catch (e) {
        if (logErrors) this.logger.warn(`Could not ${what}`, { error: e });
      }
    };
    // topic.host is detached, not unsubscribed: with a persistent session, work sent to this host
    // while it is away waits in the broker. kill() removes it for good below.
    for (const s of this.#subs.splice(0)) await step("unsubscribe", () => s.unsubscribe(), false);
    const own = this.#hostSub;
    this.#hostSub = undefined;
    if (own) await step("detach topic.host", () => (own.detach ?? own.unsubscribe).call(own), false);
    // Gone at once for everyone watching: `offline` (kill: the presence cleared, as the row goes).
    const p = this.#presence;
    if (p?.on && p.via) {
      p.on = false;
      const via = p.via;
      await step("stop watching presence", () => p.sub?.unsubscribe(), false);
      const bytes = kill ? EMPTY_BYTES : this.#presenceBytes("offline");
      await step("announce the stop", () => via.publish(p.topic, bytes, { qos: 1, retain: true }));
    }
    const transport = this.#transport;
    if (kill && transport?.forget) {
      const hostTopic = this.#topics.forAddress(`${this.topic}.${this.host}`);
      await step("forget topic.host", () => transport.forget!(hostTopic), false);
    }
    if (this.#dispatcher) this.#group.track(this.#dispatcher.drained());
    if (!await this.#group.stop(left())) {
      clean = false;
      const dropped = this.#dispatcher?.abandonQueued() ?? 0;
      this.logger.warn(
        `Stopped with work still running after ${this.gracefulShutdownTimeout} s` +
          (dropped > 0 ? `; ${dropped} queued request(s) dropped unrun` : ""),
      );
    }
    const record = this.record;
    if (kill && record) await step("delete the registry row", () => this.#registry?.remove(record.id));
    await step("close the RPC client", () => this.#rpc?.close());
    for (const o of this.#owned.splice(0).reverse()) await step("close", () => o.close());
    return clean;
  }
}

// ---------------------------------------------------------------------------------------------
// serve()
// ---------------------------------------------------------------------------------------------

/** What `serve()` returns: the running services and a way to stop them. */
export interface Launcher {
  /** The services, in the order they started. */
  readonly services: readonly Service[];
  /** Stop every service gracefully; true when all in-flight work finished in time. */
  stop(): Promise<boolean>;
  /** Resolves with the exit code once the services stopped (0: clean, 1: work was cut). */
  readonly done: Promise<number>;
}

/** Options of {@link serve}. */
export interface ServeOptions {
  /** Exit the process after a signal-initiated stop. Default true. */
  exit?: boolean;
  /** Where the signals and the stop are logged. Default: the first service's logger. */
  logger?: Logger;
}

/**
 * Start every service, then wait for SIGTERM or SIGINT: stop them gracefully (in-flight calls
 * finish, each service bounded by its graceful timeout) and exit 0, or 1 when work was cut off.
 * A second signal exits at once (130).
 * @example
 * ```ts
 * const flags = parseFlags(process.argv.slice(2), process.env);
 * await serve(Service.create({ topic: "compute", manager: Compute, flags }));
 * ```
 */
export async function serve(...args: (Service | ServeOptions)[]): Promise<Launcher> {
  const services = args.filter((a): a is Service => a instanceof Service);
  const opts = (args.find((a) => !(a instanceof Service)) ?? {}) as ServeOptions;
  const log = opts.logger ?? services[0]?.logger ?? getLogger();
  const started: Service[] = [];
  try {
    for (const s of services) {
      await s.start();
      started.push(s);
    }
  } catch (e) {
    await Promise.all(started.map((s) => s.stop()));
    throw e;
  }
  let resolveDone!: (code: number) => void;
  const done = new Promise<number>((r) => (resolveDone = r));
  let stopping: Promise<boolean> | undefined;
  const stop = () =>
    stopping ??= (async () => {
      const clean = (await Promise.all(services.map((s) => s.stop()))).every(Boolean);
      process.off("SIGTERM", onSignal);
      process.off("SIGINT", onSignal);
      if (reloads) process.off("SIGHUP", onHangup);
      resolveDone(clean ? 0 : 1);
      return clean;
    })();
  let signals = 0;
  // One listener for the whole life of the launcher: some runtimes call a listener added while a
  // signal is being handled for that same signal.
  function onSignal(signal: string) {
    if (++signals > 1) {
      log.warn(`Second ${signal}: exiting now`);
      process.exit(130);
    }
    log.info(`Caught ${signal}, stopping ${services.length} service(s) gracefully`);
    void stop().then((clean) => {
      if (opts.exit ?? true) process.exit(clean ? 0 : 1);
    });
  }
  // SIGHUP, where a codec can reload (a key file): read it again, for a key rotation; a bad file
  // changes nothing. Elsewhere SIGHUP keeps its default (the process ends with its terminal).
  const reloads = process.platform !== "win32" && services.some((s) => s.codec.reload);
  function onHangup() {
    for (const s of services) {
      s.codec.reload?.(s.topic).then(
        () => log.info(`Reloaded the keys of ${s.topic}.${s.host}`),
        (e) => log.error(`Cannot reload the keys of ${s.topic}.${s.host}; keeping the old ones`, { error: e }),
      );
    }
  }
  process.on("SIGTERM", onSignal);
  process.on("SIGINT", onSignal);
  if (reloads) process.on("SIGHUP", onHangup);
  return { services, stop, done };
}

// =============================================================================================
// Part 3. The machinery that makes it fast (each piece measured; see bench/README.md)
// =============================================================================================

// ---------------------------------------------------------------------------------------------
// Node's tick object, kept alive
// ---------------------------------------------------------------------------------------------

/**
 * One of Node's tick objects, kept alive: V8 caches the hidden class of tick objects weakly, and
 * after a few full GCs without one alive nextTick() goes megamorphic for good (mqtt.js and Node's
 * streams tick several times a message). A no-op where the runtime reports no tick objects.
 */
const keptTick = catchTickObject();

/** A new tick object of Node's, caught by an async hook that is on for one `process.nextTick()`
 * only; undefined where the runtime reports no tick inits. @internal */
export function catchTickObject(): object | undefined {
  let tick: object | undefined;
  const hook = createHook({
    init(_id, type, _trigger, resource) {
      if (type === "TickObject") tick ??= resource;
    },
  });
  hook.enable();
  try {
    process.nextTick(() => {});
  } finally {
    hook.disable();
  }
  return tick;
}

/** The tick object that mod.ts keeps (for the test of the above); undefined where none was seen.
 * @internal */
export function keptTickObject(): object | undefined {
  return keptTick;
}

// ---------------------------------------------------------------------------------------------
// The outbox: one message for many envelopes
// ---------------------------------------------------------------------------------------------

/** Told once a message was handed over (`error` undefined) or could not be, with the message as
 * it was queued and whether it left in a batch. One function for many messages: no closure each. */
type Sent = (error: Error | undefined, topic: string, item: Outgoing, batched: boolean) => void;

interface Outgoing {
  bytes: Uint8Array;
  opts: PublishOptions;
  done?: Sent;
  /** The sender's: a reply's id, for its log line. */
  label?: string;
  /** The method a reply answers (for the dispatcher's error reply when it cannot be sent). */
  method?: string;
}

/**
 * Batches what is published to one topic in one turn of the event loop into one message (when the
 * codec frames batches): under load the broker's, the client library's and QoS 1's work per
 * message is shared. A lone message leaves as it is. While traffic is quiet (three turns in a row
 * sent one message each, nothing unanswered) a message leaves at once instead of at turn's end.
 */
class Outbox {
  #transport: Transport;
  #codec: Codec;
  /** This turn's queues by topic, one table per kind of message (QoS, mandatory): no key to
   * build per message, and a reply topic's hash is already cached by the lookups before. */
  #tables: Map<string, Queue>[] = [];
  /** This turn's queues in the order they were opened; empty between turns. */
  #open: Queue[] = [];
  /** Turns in a row, up to the last flush, that sent one message; quiet from `quietAfter` on. */
  #loneTurns = 0;
  /** A message left at once since the last flush. */
  #sentAtOnce = false;
  /** Messages handed to the transport whose outcome it has not told yet. */
  #unsettled = 0;
  static readonly quietAfter = 3;
  static readonly maxItems = 128;
  static readonly maxBytes = 64 * 1024;
  /** Larger messages gain nothing from company: they leave alone, at once. */
  static readonly alone = 8 * 1024;

  #batching: boolean;

  constructor(transport: Transport, codec: Codec, batching = true) {
    this.#transport = transport;
    this.#codec = codec;
    this.#batching = batching && codec.encodeBatch !== undefined;
  }

  /** Queue `bytes` for `topic`; `done` is told when the transport took it (or failed to). */
  send(topic: string, bytes: Uint8Array, opts: PublishOptions, done?: Sent, label?: string, method?: string): void {
    const item: Outgoing = { bytes, opts, done, label, method };
    // Quiet traffic and nothing waiting in this turn: at once (see the class comment).
    if (this.#open.length === 0 && this.#unsettled === 0 && this.#loneTurns >= Outbox.quietAfter) {
      this.#sentAtOnce = true;
      return this.#publish(topic, [item]);
    }
    const kind = (opts.qos === undefined ? 0 : opts.qos + 1) * 2 + (opts.mandatory ? 1 : 0);
    const table = this.#tables[kind] ??= new Map();
    let q = table.get(topic);
    // A large message leaves at once, unless smaller ones wait before it: order is kept.
    if (!this.#batching || (bytes.byteLength > Outbox.alone && !q)) return this.#publish(topic, [item]);
    if (!q) {
      table.set(topic, q = { topic, items: [], table });
      // A microtask, not a tick: mqtt.js handles each received packet in a tick of its own, so
      // a tick would flush after every packet and a burst would never share a message.
      if (this.#open.push(q) === 1) RESOLVED.then(this.#flush);
    }
    q.items.push(item);
  }

  /** Publish `bytes` alone, now (a message whose reader does not read batches); `done` as in send(). */
  sendAlone(
    topic: string,
    bytes: Uint8Array,
    opts: PublishOptions,
    done?: Sent,
    label?: string,
    method?: string,
  ): void {
    this.#publish(topic, [{ bytes, opts, done, label, method }]);
  }

  /** send(), as a promise. */
  sendAsync(topic: string, bytes: Uint8Array, opts: PublishOptions): Promise<void> {
    return new Promise((resolve, reject) => this.send(topic, bytes, opts, (e) => e ? reject(e) : resolve()));
  }

  #flush = (): void => {
    const open = this.#open;
    this.#open = [];
    const lone = !this.#sentAtOnce && open.length === 1 && open[0]!.items.length === 1;
    this.#loneTurns = lone ? this.#loneTurns + 1 : 0;
    this.#sentAtOnce = false;
    for (const q of open) q.table.delete(q.topic); // what is sent from here on waits for the next flush
    for (const { topic, items } of open) {
      for (let i = 0; i < items.length;) {
        let j = i + 1;
        let size = items[i]!.bytes.byteLength;
        while (j < items.length && j - i < Outbox.maxItems && size + items[j]!.bytes.byteLength <= Outbox.maxBytes) {
          size += items[j++]!.bytes.byteLength;
        }
        // The whole queue in one message (nearly always): no copy of it.
        this.#publish(topic, i === 0 && j === items.length ? items : items.slice(i, j));
        i = j;
      }
    }
  };

  #publish(topic: string, chunk: Outgoing[]): void {
    const first = chunk[0]!;
    let bytes = first.bytes;
    let opts = first.opts;
    if (chunk.length > 1) {
      bytes = this.#codec.encodeBatch!(chunk.map((c) => c.bytes));
      // The batch lives as long as its longest-lived message (no expiry if one has none).
      const expiries = chunk.map((c) => c.opts.expiry);
      const expiry = expiries.includes(undefined) ? undefined : Math.max(...(expiries as number[]));
      // Spelled out: on Node 20, a spread followed by a key the source lacks makes a new hidden
      // class every time (see MqttTransport's #addExpiry).
      opts = { qos: first.opts.qos, mandatory: first.opts.mandatory, expiry };
    }
    let sent: Promise<void>;
    try {
      if (this.#codec.seal) bytes = this.#codec.seal(bytes, topic);
      sent = this.#transport.publish(topic, bytes, opts);
    } catch (e) {
      sent = Promise.reject(e); // a transport that throws instead of rejecting
    }
    this.#unsettled++;
    sent.then(() => this.#settle(chunk, topic, undefined), (e) => this.#settle(chunk, topic, asError(e)));
  }

  #settle(chunk: Outgoing[], topic: string, error: Error | undefined): void {
    this.#unsettled--;
    const batched = chunk.length > 1;
    for (const c of chunk) c.done?.(error, topic, c, batched);
  }
}

/** The messages for one topic (of one kind) in this turn. */
interface Queue {
  topic: string;
  items: Outgoing[];
  table: Map<string, Queue>;
}

// ---------------------------------------------------------------------------------------------
// Message ids
// ---------------------------------------------------------------------------------------------

/** The length of the client part of a MessageIds id; 12 hex digits of counter follow. */
const ID_CLIENT_LENGTH = 24;

/**
 * Message ids: UUIDv8 (RFC 9562) of 74 random bits per client and a 48-bit counter: unique as
 * random UUIDs, in order within a client, far cheaper than `crypto.randomUUID()` per message.
 */
class MessageIds {
  #prefix = "";
  #n = 2 ** 48;
  next(): string {
    if (this.#n >= 2 ** 48) {
      // xxxxxxxx-xxxx-4xxx-Vxxx-: the version nibble becomes 8; the variant nibble V stays.
      const r = crypto.randomUUID();
      this.#prefix = `${r.slice(0, 14)}8${r.slice(15, ID_CLIENT_LENGTH)}`;
      this.#n = 0;
    }
    return this.#prefix + (this.#n++).toString(16).padStart(12, "0");
  }
}

/** The counter of an id made by MessageIds (read back: next() writes it), or -1 for an id of
 * another form. Lowercase hex only: one id, one counter. */
function idCounter(id: string): number {
  if (id.length !== ID_CLIENT_LENGTH + 12 || id.charCodeAt(14) !== 56 /* 8 */ || id.charCodeAt(23) !== 45 /* - */) {
    return -1;
  }
  let n = 0;
  for (let i = ID_CLIENT_LENGTH; i < id.length; i++) {
    const c = id.charCodeAt(i);
    const d = c >= 48 && c <= 57 ? c - 48 : c >= 97 && c <= 102 ? c - 87 : -1;
    if (d < 0) return -1;
    n = n * 16 + d;
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// Calls waiting for replies
// ---------------------------------------------------------------------------------------------

/** A call waiting for its reply (an entry of the pending table and of the timeouts). */
class Pending implements Expiring {
  at?: number;
  prev?: Expiring;
  next?: Expiring;
  list?: TimeoutList;
  resolve!: (v: unknown) => void;
  reject!: (e: unknown) => void;
  /** Where the table looks for it first (see slotKey). */
  readonly key: number;
  constructor(
    readonly table: PendingCalls,
    readonly call: OutgoingCall,
  ) {
    this.key = slotKey(call.id);
  }
  expire(): void {
    const { address, method, timeout } = this.call;
    this.table.delete(this);
    this.reject(new RpcTimeoutError(`Cannot call "${address}.${method}": no reply within ${timeout} s`));
  }
}

/** Where PendingCalls looks for an id first: its counter (0 for an id of another form). */
function slotKey(id: string): number {
  return Math.max(0, idCounter(id));
}

/**
 * The calls waiting for replies: open addressing in an array, keyed by the id's counter, with
 * backward-shift deletion. Not a Map: a Map's discarded tables point to their successors, so one
 * promoted table kept every later call alive through scavenges (see bench/README.md).
 */
class PendingCalls {
  #slots: (Pending | undefined)[] = new Array(16).fill(undefined);
  #mask = 15;
  size = 0;

  get(id: string): Pending | undefined {
    const slots = this.#slots;
    const mask = this.#mask;
    for (let i = slotKey(id) & mask;; i = (i + 1) & mask) {
      const p = slots[i];
      if (p === undefined || p.call.id === id) return p;
    }
  }

  add(p: Pending): void {
    if ((this.size + 1) * 2 > this.#slots.length) this.#resize(this.#slots.length * 2);
    this.#put(p);
    this.size++;
  }

  #put(p: Pending): void {
    const slots = this.#slots;
    const mask = this.#mask;
    let i = p.key & mask;
    while (slots[i] !== undefined) i = (i + 1) & mask;
    slots[i] = p;
  }

  /** Remove `p` if it is here. */
  delete(p: Pending): void {
    const slots = this.#slots;
    const mask = this.#mask;
    let i = p.key & mask;
    for (; slots[i] !== p; i = (i + 1) & mask) if (slots[i] === undefined) return;
    slots[i] = undefined;
    this.size--;
    // Move back the entries of the run after i that may sit at i: none may be left behind a gap.
    for (let j = (i + 1) & mask; slots[j] !== undefined; j = (j + 1) & mask) {
      const home = slots[j]!.key & mask;
      const stays = i <= j ? i < home && home <= j : i < home || home <= j;
      if (!stays) {
        slots[i] = slots[j];
        slots[j] = undefined;
        i = j;
      }
    }
    // A burst of calls leaves a large table behind: give it back once mostly empty.
    if (this.size * 8 < slots.length && slots.length > 1024) this.#resize(slots.length / 2);
  }

  #resize(length: number): void {
    const old = this.#slots;
    this.#slots = new Array(length).fill(undefined);
    this.#mask = length - 1;
    for (const p of old) if (p !== undefined) this.#put(p);
  }

  values(): Pending[] {
    return this.#slots.filter((p): p is Pending => p !== undefined);
  }
}

// ---------------------------------------------------------------------------------------------
// Timeout lists
// ---------------------------------------------------------------------------------------------

/** An entry of {@link Timeouts}. */
interface Expiring {
  /** performance.now() at which it expires. */
  at?: number;
  prev?: Expiring;
  next?: Expiring;
  list?: TimeoutList;
  expire(): void;
}

interface TimeoutList {
  ms: number;
  head?: Expiring;
  tail?: Expiring;
  timer?: ReturnType<typeof setNodeTimeout>;
}

/**
 * Timeouts without a timer each: entries of one length expire in the order added, so each length
 * is a FIFO list with one timer for its head, and removing an entry is O(1). While an entry waits
 * the timer is referenced: a pending call keeps the process alive, as a timer of its own would.
 */
class Timeouts {
  #lists = new Map<number, TimeoutList>();

  add(e: Expiring, ms: number): void {
    let list = this.#lists.get(ms);
    if (!list) this.#lists.set(ms, list = { ms });
    e.at = performance.now() + ms;
    e.list = list;
    e.prev = list.tail;
    e.next = undefined;
    if (list.tail) list.tail.next = e;
    else {
      list.head = e;
      // An idle list keeps its (unreferenced) timer: armed for an older entry, it fires in time.
      list.timer?.ref();
    }
    list.tail = e;
    list.timer ??= setNodeTimeout(() => this.#fire(list), Math.min(ms, MAX_TIMER_MS));
  }

  remove(e: Expiring): void {
    const list = e.list;
    if (!list) return;
    if (e.prev) e.prev.next = e.next;
    else list.head = e.next;
    if (e.next) e.next.prev = e.prev;
    else list.tail = e.prev;
    e.list = e.prev = e.next = undefined;
    if (!list.head) list.timer?.unref(); // nothing waits: the process may exit
  }

  #fire(list: TimeoutList): void {
    list.timer = undefined;
    const now = performance.now();
    for (let e = list.head; e && e.at! <= now + 1; e = list.head) {
      this.remove(e);
      e.expire();
    }
    if (list.head) {
      list.timer = setNodeTimeout(() => this.#fire(list), Math.min(MAX_TIMER_MS, Math.max(1, list.head.at! - now)));
    } else if (this.#lists.get(list.ms) === list) this.#lists.delete(list.ms);
  }
}

// ---------------------------------------------------------------------------------------------
// In-process envelopes as values
// ---------------------------------------------------------------------------------------------

/** An envelope as a message of an in-process transport: copied now (the sender may change its
 * objects afterwards), copied again for every further receiver, encoded only for byte readers. */
class LocalEnvelope implements LocalMessage {
  #codec: Codec;
  #snapshot: RequestEnvelope | ReplyEnvelope;
  #given = false;
  #bytes?: Uint8Array;
  #topic: string;
  constructor(codec: Codec, envelope: RequestEnvelope | ReplyEnvelope, topic: string) {
    this.#codec = codec;
    this.#snapshot = codec.copy!(envelope);
    this.#topic = topic;
  }
  copy(): unknown {
    if (this.#given) return this.#codec.copy!(this.#snapshot);
    this.#given = true;
    return this.#snapshot;
  }
  bytes(): Uint8Array {
    return this.#bytes ??= encodeBytes(this.#codec, this.#snapshot, this.#topic);
  }
}

/**
 * What `JSON.parse(JSON.stringify(value))` gives, without the text: `toJSON()` is called (a Date
 * becomes its ISO string), undefined, functions and symbols are left out (null in arrays),
 * non-finite numbers become null, boxed primitives are unboxed, Maps and class instances become
 * plain objects of their own enumerable properties, and a `"__proto__"` key is dropped as
 * {@link parseJson} drops it. Strings are shared: they are immutable, so sharing is a copy.
 * @throws {TypeError} on a BigInt or a cycle, as JSON.stringify does.
 */
export function jsonCopy(value: unknown): unknown {
  return copyJson(value, "", undefined);
}

/** `stack`: the objects being copied, outermost first (a cycle check), made at the first one. */
function copyJson(value: unknown, key: string | number, stack: object[] | undefined): unknown {
  let v = value;
  if ((typeof v === "object" && v !== null) || typeof v === "bigint") {
    const toJSON = (v as { toJSON?: unknown }).toJSON;
    if (typeof toJSON === "function") v = toJSON.call(v, String(key));
  }
  if (typeof v === "object" && v !== null) {
    if (v instanceof Number) v = Number(v);
    else if (v instanceof String) v = String(v);
    else if (v instanceof Boolean || v instanceof BigInt) v = v.valueOf();
  }
  switch (typeof v) {
    case "string":
    case "boolean":
      return v;
    case "number":
      return Number.isFinite(v) ? v + 0 : null; // + 0 turns -0 into 0, as "0" parses
    case "bigint":
      throw new TypeError("Do not know how to serialize a BigInt");
    case "object": {
      if (v === null) return null;
      if (stack === undefined) stack = [];
      else if (stack.includes(v)) throw new TypeError("Converting circular structure to JSON");
      stack.push(v);
      let out: unknown[] | Record<string, unknown>;
      if (Array.isArray(v)) {
        out = [];
        for (let i = 0; i < v.length; i++) out.push(copyJson(v[i], i, stack) ?? null);
      } else {
        out = {};
        const o = v as Record<string, unknown>;
        for (const k of Object.keys(o)) {
          if (k === "__proto__") continue;
          const x = copyJson(o[k], k, stack);
          if (x !== undefined) out[k] = x;
        }
      }
      stack.pop();
      return out;
    }
    default: // undefined, functions, symbols
      return undefined;
  }
}

/** A RequestContext is rebuilt from its fields (no JSON); a subclass travels as its toJSON(). */
function copyContext(ctx: RequestEnvelope["context"]): RequestEnvelope["context"] {
  if (ctx instanceof RequestContext && ctx.constructor === RequestContext) return new RequestContext(ctx);
  return jsonCopy(ctx) as RequestEnvelope["context"];
}

// ---------------------------------------------------------------------------------------------
// JSON written by hand
// ---------------------------------------------------------------------------------------------

// A context is immutable and usually sent many times (a handler passes its ctx on): serialise once.
const contextJson = new WeakMap<RequestContext, string>();

function contextToJson(ctx: RequestContextJSON | Record<string, unknown> | RequestContext): string {
  if (!(ctx instanceof RequestContext)) return JSON.stringify(ctx);
  let json = contextJson.get(ctx);
  if (json === undefined) contextJson.set(ctx, json = JSON.stringify(wireContext(ctx)));
  return json;
}

/** The context as a request carries it: fields at their defaults are left out (from() gives them
 * back), half the bytes of an anonymous context. A subclass travels as its toJSON() says. */
function wireContext(ctx: RequestContext): unknown {
  const json = ctx.toJSON();
  if (ctx.constructor !== RequestContext) return json;
  const out: Partial<RequestContextJSON> = {};
  if (json.user_id !== null) out.user_id = json.user_id;
  if (json.project_id !== null) out.project_id = json.project_id;
  out.request_id = json.request_id;
  if (json.is_admin) out.is_admin = true;
  if (json.roles.length > 0) out.roles = json.roles;
  out.timestamp = json.timestamp;
  return out;
}

/** `JSON.stringify(s)`: the string between quotes when it holds nothing to escape, as ids,
 * method names and topics do. (Anything else, a non-string included, goes to JSON.stringify.) */
function jsonString(s: string): string {
  if (typeof s !== "string") return JSON.stringify(s);
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 || c === 0x22 /* " */ || c === 0x5c /* \ */ || c > 0x7e) return JSON.stringify(s);
  }
  return `"${s}"`;
}

/** `JSON.stringify(n)` for a finite number (the same digits as String(n)). */
function jsonNumber(n: number): string {
  return typeof n === "number" && Number.isFinite(n) ? `${n}` : JSON.stringify(n);
}

const OPEN = utf8("[");
const COMMA = utf8(",");
const CLOSE = utf8("]");

/** Whether JSON text nests deeper than MAX_JSON_DEPTH (brackets inside strings do not count). */
function tooDeep(text: string): boolean {
  // Fewer brackets than the limit cannot nest past it: counted natively, nearly every message
  // (a large one included) is done here without a walk in JS.
  let brackets = 0;
  for (const open of ["{", "["]) {
    for (let i = text.indexOf(open); i !== -1 && brackets <= MAX_JSON_DEPTH; i = text.indexOf(open, i + 1)) brackets++;
  }
  if (brackets <= MAX_JSON_DEPTH) return false;
  let depth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      for (i++; i < text.length; i++) {
        const d = text.charCodeAt(i);
        if (d === 0x5c /* \ */) i++;
        else if (d === 0x22) break;
      }
    } else if (c === 0x5b /* [ */ || c === 0x7b /* { */) {
      if (++depth > MAX_JSON_DEPTH) return true;
    } else if (c === 0x5d /* ] */ || c === 0x7d /* } */) depth--;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Duplicate suppression
// ---------------------------------------------------------------------------------------------

// A secret per process, so that nobody can make a message that fingerprints like another.
const FINGERPRINT_SEED = crypto.getRandomValues(new Uint32Array(1))[0]!;

/**
 * A 32-bit fingerprint of a message's bytes (FNV-1a style, seeded; four bytes a step), never 0
 * (that is for in-process messages). A redelivery has the same; a message made by someone who
 * has not seen the real one, and does not know the seed, has another.
 */
function fingerprint(bytes: Uint8Array): number {
  const n = bytes.length;
  let h = Math.imul(0x811c9dc5 ^ FINGERPRINT_SEED ^ n, 0x01000193);
  const words = n >>> 2;
  if (words > 0) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, n);
    for (let i = 0; i < words; i++) h = Math.imul(h ^ view.getUint32(i << 2, true), 0x01000193);
  }
  for (let i = words << 2; i < n; i++) h = Math.imul(h ^ bytes[i]!, 0x01000193);
  return (h >>> 0) || 1;
}

/**
 * The ids of one client of novalet's id form, indexed by counter: slot `counter & mask` holds the
 * counter, its message's fingerprint and until when it is kept. Counters come in order, so slots
 * are visited in order: no hashing, no allocation, few cache misses (one Map of all ids was not).
 */
class ClientWindow {
  counters: Float64Array;
  fps: Int32Array;
  until: Float64Array;
  /** The latest `until` of its ids: once past, the whole window may go. */
  latest = 0;
  constructor(readonly prefix: string, size: number) {
    this.counters = new Float64Array(size).fill(-1);
    this.fps = new Int32Array(size);
    this.until = new Float64Array(size);
  }
  get size(): number {
    return this.counters.length;
  }
  /** Twice the slots, every kept id where its counter says. */
  grow(): void {
    const { counters, fps, until } = this;
    const size = counters.length * 2;
    this.counters = new Float64Array(size).fill(-1);
    this.fps = new Int32Array(size);
    this.until = new Float64Array(size);
    for (let i = 0; i < counters.length; i++) {
      if (counters[i] === -1) continue;
      const j = counters[i]! % size;
      this.counters[j] = counters[i]!;
      this.fps[j] = fps[i]!;
      this.until[j] = until[i]!;
    }
  }
}

/**
 * The request ids a dispatcher took, to drop a redelivery: add() is false for an id seen before
 * *in a message with the same bytes*, so someone who guesses a client's next ids cannot have its
 * real calls dropped. An id is kept until its request's deadline: novalet-form ids per client
 * (ClientWindow; at most `maxSlots` each, `max` in all, a window forgetting its own oldest past
 * that), others as strings, oldest first, at most `max`. A flood of junk ids, of any form, never
 * pushes out the ids of a client that has a window.
 */
class RecentIds {
  /** In the order they were made: the head is the first to check for expiry. */
  #clients = new Map<string, ClientWindow>();
  /** The client of the last id: calls come from few clients, often one after another. */
  #last?: ClientWindow;
  /** Slots of all windows together. */
  #slots = 0;
  /** Ids kept as strings (other forms, new clients in a flood): `id` + "\n" + fingerprint. */
  #strings = new Set<string>();
  /** The strings in arrival order, with the time until which each is kept. */
  #ring = new Fifo<{ key: string; until: number }>();
  #max: number;
  #warnedAt = -Infinity;
  static readonly firstSlots = 64;
  static readonly maxSlots = 65_536;

  constructor(max: number) {
    this.#max = max;
  }

  /** Remember `id` (seen in a message of fingerprint `fp`) until `until`; false if it was seen. */
  add(id: string, fp: number, until: number, now: number, log: Logger): boolean {
    const n = idCounter(id);
    const w = n < 0 ? undefined : this.#window(id, now);
    if (w === undefined) return this.#addString(`${id}\n${fp}`, until, now, log, fp);
    let i = n & (w.size - 1);
    if (w.counters[i] === n && w.until[i]! >= now) {
      if (w.fps[i] === (fp | 0)) return false;
      return this.#addString(`${id}\n${fp}`, until, now, log, fp); // the same id in another message
    }
    // A live id of this client in the way: make room, or forget it if there is none (a client
    // outrunning its window forgets its own oldest ids: not worth a warning, nobody else did it).
    while (w.counters[i] !== -1 && w.until[i]! >= now) {
      if (w.size >= RecentIds.maxSlots || (this.#slots + w.size > this.#max && !this.#reclaim(now, w.size))) break;
      this.#slots += w.size;
      w.grow();
      i = n & (w.size - 1);
    }
    w.counters[i] = n;
    w.fps[i] = fp;
    w.until[i] = until;
    if (until > w.latest) w.latest = until;
    return true;
  }

  /** Forget `id` again (its request was refused, so a resend must run). */
  forget(id: string, fp: number): void {
    const n = idCounter(id);
    const w = n < 0 ? undefined : this.#clients.get(id.slice(0, ID_CLIENT_LENGTH));
    const i = w === undefined ? -1 : n & (w.size - 1);
    if (w !== undefined && w.counters[i] === n && w.fps[i] === (fp | 0)) w.counters[i] = -1;
    else this.#strings.delete(`${id}\n${fp}`);
  }

  /** The window of the client of `id`; undefined when there is no room for a new one. */
  #window(id: string, now: number): ClientWindow | undefined {
    const last = this.#last;
    if (last !== undefined && id.startsWith(last.prefix)) return last;
    const prefix = id.slice(0, ID_CLIENT_LENGTH);
    let w = this.#clients.get(prefix);
    if (w === undefined) {
      if (this.#slots + RecentIds.firstSlots > this.#max && !this.#reclaim(now, RecentIds.firstSlots)) return undefined;
      this.#clients.set(prefix, w = new ClientWindow(prefix, RecentIds.firstSlots));
      this.#slots += RecentIds.firstSlots;
    }
    this.#last = w;
    return w;
  }

  /** Drop windows whose ids all expired, oldest first, until `slots` more fit; false if they do
   * not. A window in use met on the way goes to the back: a few looks per call, never a scan. */
  #reclaim(now: number, slots: number): boolean {
    for (let looks = 0; looks < 8 && this.#slots + slots > this.#max; looks++) {
      const w = this.#clients.values().next().value;
      if (w === undefined) break;
      this.#clients.delete(w.prefix);
      if (w.latest >= now) this.#clients.set(w.prefix, w);
      else {
        this.#slots -= w.size;
        if (this.#last === w) this.#last = undefined;
      }
    }
    return this.#slots + slots <= this.#max;
  }

  #addString(key: string, until: number, now: number, log: Logger, fp: number): boolean {
    const ring = this.#ring;
    while (ring.size > 0 && ring.peek()!.until < now) this.#strings.delete(ring.take().key);
    const size = this.#strings.size;
    if (this.#strings.add(key).size === size) return false;
    if (ring.size >= this.#max) {
      this.#strings.delete(ring.take().key);
      this.#full(log, now, fp);
    }
    ring.push({ key, until });
    return true;
  }

  /** An id is forgotten before its deadline: worth a warning (once a minute) unless in-process
   * (`fp` 0), where redeliveries do not happen and a fast caller always outruns the bound. */
  #full(log: Logger, now: number, fp: number): void {
    if (fp === 0 || now - this.#warnedAt < 60_000) return;
    this.#warnedAt = now;
    log.warn(`Duplicate suppression is full (dedupSize ${this.#max}): forgetting ids before their deadline`);
  }
}

/** A queue: push at the back, take from the front in O(1); taken slots are cut off the front now
 * and then, not one by one (Array.shift() copies the rest each time). */
class Fifo<T> {
  #items: (T | undefined)[] = [];
  #head = 0;
  get size(): number {
    return this.#items.length - this.#head;
  }
  push(item: T): void {
    this.#items.push(item);
  }
  /** The front item, still in the queue; undefined when empty. */
  peek(): T | undefined {
    return this.#items[this.#head];
  }
  /** Take the front item; the queue must not be empty. */
  take(): T {
    const item = this.#items[this.#head]!;
    this.#items[this.#head++] = undefined;
    if (this.#head === this.#items.length) {
      this.#items = [];
      this.#head = 0;
    } else if (this.#head > 1024 && this.#head * 2 > this.#items.length) {
      this.#items = this.#items.slice(this.#head);
      this.#head = 0;
    }
    return item;
  }
}
