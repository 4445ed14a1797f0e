/**
 * Signed envelopes: {@link SignedCodec} wraps a codec so that every request and reply carries a
 * signature over its exact bytes, made with a key whose scopes say which topics it may call and
 * serve and which roles it may assert. A receiver refuses what is unsigned, signed by a key it does
 * not know, altered, sent to another topic, replayed or out of scope: dropped without an answer,
 * logged once per key, counted in {@link SignedCodec.refused}.
 *
 * On the wire a signed envelope is the JSON envelope with two fields in front:
 * `{"sig":"KEYID.SIGNATURE","to":"TOPIC",…}`; the signature covers the bytes from `"to"` on (with
 * a `{` before them). Shared-secret keys (HMAC-SHA256) cost microseconds and suit the call path;
 * Ed25519 keys let devices check an operator's requests without being able to make one.
 *
 * @example
 * ```ts
 * import { generateKey, SignedCodec } from "./keys.ts";
 * const fleet = generateKey("fleet", "hmac", { call: ["*"], serve: ["*"] });
 * const codec = new SignedCodec({ sign: "fleet", keys: [fleet] });
 * // Service.create({ ..., codec }), or --keys=FILE with this JSON in FILE
 * ```
 *
 * @module
 */

import { Buffer } from "node:buffer";
import {
  createHmac,
  createPrivateKey,
  createPublicKey,
  createSecretKey,
  generateKeyPairSync,
  type KeyObject,
  randomBytes,
  sign as edSign,
  timingSafeEqual,
  verify as edVerify,
} from "node:crypto";
import { readFile } from "node:fs/promises";
import {
  BadRequest,
  type Codec,
  getLogger,
  jsonCodec,
  type Logger,
  NotAuthorized,
  quote,
  type ReplyEnvelope,
  type RequestEnvelope,
} from "./mod.ts";

/** One key of a key file. Scopes name topics (`compute`), one host of a topic (`compute.h1`) or `*`. */
export interface KeyEntry {
  /** Its name on the wire: letters, digits and `_.:@-`, at most 64. */
  id: string;
  /** `hmac`: a shared secret (HMAC-SHA256); `ed25519`: a key pair. */
  type: "hmac" | "ed25519";
  /** hmac: the secret, base64url, at least 16 bytes. */
  secret?: string;
  /** ed25519: the public key, base64url of its 32 bytes. */
  public?: string;
  /** ed25519: the private key (its 32-byte seed, base64url); only in the key file of its holder. */
  private?: string;
  /** Topics its holder may send requests to. Default `["*"]`. */
  call?: string[];
  /** Topics its holder may answer for. Default `["*"]`. */
  serve?: string[];
  /** Roles its holder may assert in a request's context; `admin` also covers `is_admin`; `*` any.
   * Default none. */
  roles?: string[];
}

/** A key file: the keys this process knows and the one it signs with. */
export interface KeysConfig {
  /** The id of the key this process signs with; without it, it can only verify. */
  sign?: string;
  /** Seconds a signed request stays acceptable: its deadline may lie at most this far ahead, and
   * its id is remembered that long. Default 600. */
  maxAge?: number;
  /** Seconds clocks may disagree by. Default 30. */
  skew?: number;
  /** Every key, with its scopes. Two keys may be valid at once while one replaces the other. */
  keys: KeyEntry[];
}

/** Why a message was refused; the keys of {@link SignedCodec.refused}. */
export type Refusal =
  | "unsigned"
  | "unknownKey"
  | "badSignature"
  | "wrongTopic"
  | "replayed"
  | "expired"
  | "tooFarAhead"
  | "outOfScope"
  | "unexpectedReply";

/** Options of {@link SignedCodec}. */
export interface SignedCodecOptions {
  /** The topic prefix scopes are read under. Default `novalet`. */
  prefix?: string;
  /** Where refusals are logged (once per key). Default: the default logger. */
  logger?: Logger;
  /** The codec of the envelopes inside. Default: the JSON codec. */
  inner?: Codec;
  /** The file the keys came from, for messages and {@link SignedCodec.reload}. */
  file?: string;
  /** Request ids remembered against replay, of all keys together (and, apart, calls awaiting
   * replies), at most. Past it, the ids that expire soonest are forgotten: the new request's key's
   * if it holds more than its share, else those of the key holding the most, which then refuses its
   * requests that could be such a forgotten replay. A key holding no more than its share keeps all
   * its ids. Default 1,000,000 (about 100 MB when full): enough for ~11,000 requests/s with 60 s
   * deadlines. A whole number, at least 1. */
  maxIds?: number;
}

interface Key {
  id: string;
  hmac?: KeyObject;
  publicKey?: KeyObject;
  privateKey?: KeyObject;
  call: Set<string>;
  serve: Set<string>;
  roles: Set<string>;
  /** Length of the signature in base64url. */
  sigLength: number;
}

interface TopicInfo {
  name?: string;
  host?: string;
  /** `"to":"TOPIC","m":`, as signed. */
  to: Buffer;
}

interface Ring {
  keys: Map<string, Key>;
  signer?: Key;
  maxAge: number;
  skew: number;
}

const KEY_ID = /^[A-Za-z0-9_.:@-]{1,64}$/;
const SIG_OPEN = Buffer.from('{"sig":"');
const QUOTE = 0x22;
const BRACE = 0x7b;
const OPEN_BRACE = Buffer.of(BRACE);
const CLOSE_BRACE = 0x7d;
/** A topic written into the signed bytes as it is: no quote, backslash or control character. */
const PLAIN_TOPIC = /^[^"\\\p{Cc}]*$/u;
/** Refused senders logged by name, at most: a flood of made-up key ids must not grow a set. */
const MAX_LOGGED = 1000;
/** Ids remembered against replay, at most; the oldest go first beyond it. */
const MAX_SEEN = 1_000_000;
// Ed25519 keys in DER: a fixed header before the 32 raw bytes (RFC 8410).
const SPKI_HEADER = Buffer.from("302a300506032b6570032100", "hex");
const PKCS8_HEADER = Buffer.from("302e020100300506032b657004220420", "hex");

function bytesOf(text: unknown, what: string, length?: number, min?: number): Buffer {
  const b = typeof text === "string" && /^[A-Za-z0-9_-]+$/.test(text) ? Buffer.from(text, "base64url") : undefined;
  if (!b || (length !== undefined && b.length !== length) || (min !== undefined && b.length < min)) {
    const size = length !== undefined ? `${length} bytes` : `at least ${min} bytes`;
    throw new TypeError(`${what} must be base64url of ${size}`);
  }
  return b;
}

function scope(v: unknown, what: string, fallback: string[]): Set<string> {
  if (v === undefined) return new Set(fallback);
  if (!Array.isArray(v) || !v.every((s) => typeof s === "string" && s.length > 0)) {
    throw new TypeError(`${what} must be an array of names`);
  }
  return new Set(v);
}

function seconds(v: unknown, what: string, fallback: number): number {
  if (v === undefined) return fallback;
  if (typeof v !== "number" || !(v > 0 && v <= 86_400)) throw new RangeError(`${what} must be 1 to 86400 seconds`);
  return v;
}

/** Check a key file and build its keys; every error names the key and what is wrong with it. */
function buildRing(config: KeysConfig, file: string): Ring {
  const where = file ? ` in ${file}` : "";
  if (config === null || typeof config !== "object" || !Array.isArray(config.keys)) {
    throw new TypeError(`Invalid keys${where}: expected {"keys": [...], "sign": "ID"}`);
  }
  const keys = new Map<string, Key>();
  for (const e of config.keys) {
    const id = (e as { id?: unknown })?.id;
    if (typeof id !== "string" || !KEY_ID.test(id)) {
      throw new TypeError(`Invalid key id ${quote(id)}${where}: letters, digits and _.:@- only, at most 64`);
    }
    if (keys.has(id)) throw new TypeError(`Key ${quote(id)}${where} is listed twice`);
    const what = `Key ${quote(id)}${where}:`;
    const serve = scope(e.serve, `${what} "serve"`, ["*"]);
    for (const t of serve) {
      // A service answers for its whole topic (shared work and fanout too), never one host of it.
      if (t.includes(".")) throw new TypeError(`${what} "serve" names topics, not hosts: ${quote(t)}`);
    }
    const key: Key = {
      id,
      call: scope(e.call, `${what} "call"`, ["*"]),
      serve,
      roles: scope(e.roles, `${what} "roles"`, []),
      sigLength: 43,
    };
    if (e.type === "hmac") {
      key.hmac = createSecretKey(bytesOf(e.secret, `${what} "secret"`, undefined, 16));
    } else if (e.type === "ed25519") {
      const raw = bytesOf(e.public, `${what} "public"`, 32);
      key.publicKey = createPublicKey({ key: Buffer.concat([SPKI_HEADER, raw]), format: "der", type: "spki" });
      if (e.private !== undefined) {
        const seed = bytesOf(e.private, `${what} "private"`, 32);
        key.privateKey = createPrivateKey({ key: Buffer.concat([PKCS8_HEADER, seed]), format: "der", type: "pkcs8" });
        const derived = createPublicKey(key.privateKey).export({ format: "der", type: "spki" }).subarray(12);
        if (!derived.equals(raw)) throw new TypeError(`${what} "private" does not belong to "public"`);
      }
      key.sigLength = 86;
    } else {
      throw new TypeError(`${what} "type" ${quote(e.type)} must be "hmac" or "ed25519"`);
    }
    keys.set(id, key);
  }
  let signer: Key | undefined;
  if (config.sign !== undefined) {
    signer = keys.get(config.sign);
    if (!signer) throw new TypeError(`Signing key ${quote(config.sign)}${where} is not among its keys`);
    if (!signer.hmac && !signer.privateKey) {
      throw new TypeError(`Signing key ${quote(config.sign)}${where} lacks its "private" part: it can only verify`);
    }
  }
  return {
    keys,
    signer,
    maxAge: seconds(config.maxAge, `"maxAge"${where}`, 600),
    skew: seconds(config.skew, `"skew"${where}`, 30),
  };
}

/** Throw unless the signing key of `ring` may serve `topic`. */
function checkServe(ring: Ring, topic: string, file: string): void {
  const key = ring.signer;
  if (!key) throw new NotAuthorized(`Cannot serve: no signing key ("sign" is not set${file ? ` in ${file}` : ""})`);
  if (!covers(key.serve, topic, undefined)) {
    throw new NotAuthorized(`Key ${quote(key.id)} may not serve ${quote(topic)} (its "serve": ${list(key.serve)})`);
  }
}

/** Does `set` (a scope) cover topic `name`, or its host `host`? */
function covers(set: Set<string>, name: string, host: string | undefined): boolean {
  return set.has("*") || (host === undefined ? set.has(name) : set.has(name) || set.has(`${name}.${host}`));
}

const list = (set: Set<string>) => set.size === 0 ? "none" : [...set].join(", ");

/** How many ids tables that share a budget hold together. */
interface Budget {
  used: number;
}

/**
 * Ids kept until a time, forgotten by the second they expire in: no walk over the whole table,
 * however many there are. {@link forgetSoonest} forgets the ids that expire soonest before they
 * do (to make room), and {@link floor} says until when a forgotten one could still have been valid.
 * Times are the caller's (ms), so that a caller can keep its clock from going back.
 */
class IdTable {
  /** Each id and the second it expires in. */
  #seconds = new Map<string, number>();
  /** Ids by the second they expire in. */
  #bySecond = new Map<number, Set<string>>();
  /** No id expires before this second: where the walks for the soonest and the expired start. */
  #lowest = Infinity;
  #budget: Budget;
  #onForget?: (id: string) => void;
  /** The latest expiry (ms) of an id forgotten before it expired, to make room: anything that
   * expires by then may have been seen and forgotten. */
  floor = 0;
  /** `budget` counts the ids of all tables sharing it; `onForget` hears of every id forgotten. */
  constructor(budget: Budget = { used: 0 }, onForget?: (id: string) => void) {
    this.#budget = budget;
    this.#onForget = onForget;
  }
  get size(): number {
    return this.#seconds.size;
  }
  has(id: string): boolean {
    return this.#seconds.has(id);
  }
  delete(id: string): void {
    const second = this.#seconds.get(id);
    if (second === undefined) return;
    this.#seconds.delete(id);
    this.#budget.used--;
    const ids = this.#bySecond.get(second)!;
    ids.delete(id);
    if (ids.size === 0) this.#bySecond.delete(second);
  }
  /** Keep `id` until `until` (ms), or longer if it is kept longer already; `now` is the time (ms). */
  set(id: string, until: number, now: number): void {
    const second = Math.max(Math.ceil(until / 1000), Math.floor(now / 1000) + 1); // at least into the next second
    const had = this.#seconds.get(id);
    if (had !== undefined && had >= second) return;
    this.delete(id);
    this.#budget.used++;
    this.#seconds.set(id, second);
    const ids = this.#bySecond.get(second);
    if (ids) ids.add(id);
    else this.#bySecond.set(second, new Set([id]));
    if (second < this.#lowest) this.#lowest = second;
  }
  /** Forget what expired by second `now`. */
  sweep(now: number): void {
    if (this.#lowest > now) return;
    if (now - this.#lowest < this.#bySecond.size) {
      for (let second = this.#lowest; second <= now; second++) this.#forget(second);
    } else {
      for (const second of this.#bySecond.keys()) if (second <= now) this.#forget(second);
    }
    this.#lowest = now + 1;
  }
  /** Forget the ids that expire soonest, before they expire. */
  forgetSoonest(): void {
    if (this.#seconds.size === 0) return;
    let second = this.#lowest;
    while (!this.#bySecond.has(second)) second++; // seconds are few (maxAge + skew at most), each passed once
    this.#forget(second);
    this.#lowest = second + 1;
    this.floor = Math.max(this.floor, second * 1000);
  }
  #forget(second: number): void {
    const ids = this.#bySecond.get(second);
    if (!ids) return;
    this.#bySecond.delete(second);
    this.#budget.used -= ids.size;
    for (const id of ids) {
      this.#seconds.delete(id);
      this.#onForget?.(id);
    }
  }
}

/**
 * A {@link Codec} that signs what it encodes and refuses what it cannot verify. Give one to
 * `Service.create({ codec })` or `new Rpc(transport, { codec })`; `--keys=FILE` builds one from
 * a key file. {@link setKeys} and {@link reload} rotate keys while it runs.
 */
export class SignedCodec implements Codec {
  /** Refused messages since it was made, by reason. */
  readonly refused: Record<Refusal, number> = {
    unsigned: 0,
    unknownKey: 0,
    badSignature: 0,
    wrongTopic: 0,
    replayed: 0,
    expired: 0,
    tooFarAhead: 0,
    outOfScope: 0,
    unexpectedReply: 0,
  };
  #ring: Ring;
  #inner: Codec;
  #log: Logger;
  #file: string;
  #rpcRoot: string;
  #fanoutRoot: string;
  /** Request ids seen, by key, until their deadline (plus skew) passes; `maxIds` in all. */
  #seen = new Map<string, IdTable>();
  #seenBudget: Budget = { used: 0 };
  #seenSwept = 0;
  #maxIds: number;
  /** The largest skew the keys ever had: ids are kept that much past their deadline. */
  #keepSkew: number;
  /** The smallest: a request later than this past its deadline is expired. Never more than any id
   * was kept for, so a larger skew from a new key file cannot make a forgotten id acceptable again. */
  #lateSkew: number;
  /** The latest time read: the clock as the codec sees it never goes back, so that ids forgotten
   * after a jump forward stay expired when the clock is set back (then everything looks late until
   * the clock catches up: refused, never run twice). */
  #latest = 0;
  #topics = new Map<string, TopicInfo>();
  /** Calls this process signed that wait for a reply until their deadline (plus skew), and the
   * topic each went to. */
  #calls = new IdTable({ used: 0 }, (id) => this.#callTopics.delete(id));
  #callTopics = new Map<string, TopicInfo>();
  #logged = new Set<string>();

  /** A codec signing with `config.sign` and verifying with all of `config.keys`.
   * @throws {TypeError} naming the key and what is wrong with it. */
  constructor(config: KeysConfig, opts: SignedCodecOptions = {}) {
    this.#file = opts.file ?? "";
    this.#ring = buildRing(config, this.#file);
    this.#inner = opts.inner ?? jsonCodec;
    this.#log = opts.logger ?? getLogger();
    const prefix = opts.prefix ?? "novalet";
    this.#rpcRoot = `${prefix}/rpc/`;
    this.#fanoutRoot = `${prefix}/fanout/`;
    this.#maxIds = opts.maxIds ?? MAX_SEEN;
    if (!Number.isInteger(this.#maxIds) || this.#maxIds < 1) {
      throw new RangeError(`maxIds must be a whole number of at least 1, not ${quote(opts.maxIds)}`);
    }
    this.#keepSkew = this.#lateSkew = this.#ring.skew;
  }

  /** A codec of the key file at `path` (JSON, as {@link KeysConfig}). */
  static async fromFile(path: string, opts: Omit<SignedCodecOptions, "file"> = {}): Promise<SignedCodec> {
    return new SignedCodec(await readKeys(path), { ...opts, file: path });
  }

  /** Use these keys from now on (a rotation: list the old and the new key until all sign with the
   * new one). Checked whole before anything changes. */
  setKeys(config: KeysConfig): void {
    this.#use(buildRing(config, this.#file));
  }

  /** Read the key file again (`serve()` does on SIGHUP). The keys stay as they were if it is bad,
   * or if its signing key may not serve `topic` (when given). */
  async reload(topic?: string): Promise<void> {
    if (!this.#file) return;
    const ring = buildRing(await readKeys(this.#file), this.#file);
    if (topic !== undefined) checkServe(ring, topic, this.#file);
    this.#use(ring);
  }

  #use(ring: Ring): void {
    this.#ring = ring;
    this.#keepSkew = Math.max(this.#keepSkew, ring.skew);
    this.#lateSkew = Math.min(this.#lateSkew, ring.skew);
  }

  /** The id of the key this codec signs with. */
  get signer(): string | undefined {
    return this.#ring.signer?.id;
  }

  /** The roles the signing key may assert (`admin` covers `is_admin`; `*` any); none without one. */
  get signerRoles(): string[] {
    return [...(this.#ring.signer?.roles ?? [])];
  }

  /** Throw unless this process may answer for `topic`: a service checks it before it serves. */
  checkServe(topic: string): void {
    checkServe(this.#ring, topic, this.#file);
  }

  /** The request for `topic`, checked against the signing key's scopes; {@link seal} signs the
   * message it goes in.
   * @throws {NotAuthorized} when the signing key may not call that topic or assert its roles. */
  encodeRequest(req: RequestEnvelope, topic = ""): Uint8Array {
    const key = this.#signerFor("send requests");
    const info = this.#topic(topic);
    const { name, host } = info;
    if (name === undefined) throw new TypeError(`Cannot sign a request to ${quote(topic)}: not an RPC topic`);
    if (!covers(key.call, name, host)) {
      throw new NotAuthorized(
        `Key ${quote(key.id)} may not call ${quote(host ? `${name}.${host}` : name)} (its "call": ${list(key.call)})`,
      );
    }
    const denied = this.#deniedRole(key, req.context);
    if (denied !== undefined) {
      throw new NotAuthorized(`Key ${quote(key.id)} may not assert ${denied} (its "roles": ${list(key.roles)})`);
    }
    const now = this.#now();
    const limit = now + this.#ring.maxAge * 1000;
    if (req.deadline === undefined) req = { ...req, deadline: limit };
    else if (!Number.isFinite(req.deadline)) {
      throw new RangeError(`Cannot sign ${quote(req.method)}: its deadline is not a time`);
    } else if (req.deadline > limit) {
      throw new RangeError(
        `Cannot sign ${quote(req.method)} with a deadline ${
          Math.round((req.deadline - now) / 1000)
        } s ahead: the keys' maxAge is ${this.#ring.maxAge} s`,
      );
    }
    if (req.reply_to !== undefined) {
      this.#calls.sweep(Math.floor(now / 1000));
      this.#calls.set(req.id, req.deadline! + this.#keepSkew * 1000, now);
      this.#callTopics.set(req.id, info);
      while (this.#calls.size > this.#maxIds) this.#calls.forgetSoonest();
    }
    return this.#inner.encodeRequest(req, topic);
  }

  /** The reply for reply topic `topic` ({@link seal} signs the message it goes in). */
  encodeReply(reply: ReplyEnvelope, topic = ""): Uint8Array {
    this.#signerFor("answer");
    return this.#inner.encodeReply(reply, topic);
  }

  /** Several envelopes as one message, as the inner codec frames them. */
  encodeBatch(items: Uint8Array[]): Uint8Array {
    return this.#inner.encodeBatch ? this.#inner.encodeBatch(items) : jsonCodec.encodeBatch!(items);
  }

  /** The message (one envelope or a batch) as published to `topic`, signed:
   * `{"sig":"ID.SIG","to":"TOPIC","m":MESSAGE}`, the signature over the bytes from `"to"` on. */
  seal(bytes: Uint8Array, topic: string): Uint8Array {
    const key = this.#signerFor("send");
    const to = this.#topic(topic).to;
    const head = SIG_OPEN.length + key.id.length + 1 + key.sigLength + 2; // {"sig":"ID.SIG",
    const out = Buffer.allocUnsafe(head + to.length + bytes.length + 1);
    to.copy(out, head);
    out.set(bytes, head + to.length);
    out[out.length - 1] = CLOSE_BRACE;
    out[head - 1] = BRACE; // the signed bytes: "{" + what follows the header
    const signed = out.subarray(head - 1);
    const sig = key.hmac
      ? createHmac("sha256", key.hmac).update(signed).digest("base64url")
      : edSign(null, signed, key.privateKey!).toString("base64url");
    out.write(`{"sig":"${key.id}.${sig}",`, 0, "latin1");
    return out;
  }

  /** The one request of `bytes` that arrived on `topic`; a refused one throws NotAuthorized. */
  decodeRequest(bytes: Uint8Array, topic = ""): RequestEnvelope {
    const { items } = this.decodeRequests(bytes, topic);
    const req = items[0];
    if (req === undefined) throw new NotAuthorized(`Refused a request on ${quote(topic)}`);
    if (req instanceof BadRequest) throw req;
    return req;
  }

  /** The requests of a message whose signature verifies, each fresh, unseen and in its key's scopes;
   * the others are dropped (logged once per key). */
  decodeRequests(bytes: Uint8Array, topic = ""): { batch: boolean; items: (RequestEnvelope | BadRequest)[] } {
    const opened = this.#open(bytes, topic, "request");
    if (!opened) return { batch: false, items: [] };
    const { key, body } = opened;
    // Signed but malformed: its sender is known, so it may hear BadRequest (see #answersBad).
    let batch = false;
    let items: (RequestEnvelope | BadRequest)[];
    try {
      ({ batch, items } = this.#inner.decodeRequests
        ? this.#inner.decodeRequests(body, topic)
        : { batch: false, items: [this.#inner.decodeRequest(body, topic)] });
    } catch (e) {
      items = [e instanceof BadRequest ? e : new BadRequest(`Malformed request: ${(e as Error).message}`)];
    }
    const accepted: (RequestEnvelope | BadRequest)[] = [];
    for (const r of items) {
      if (r instanceof BadRequest ? this.#answersBad(key, r, topic) : this.#accepts(key, r, topic)) accepted.push(r);
    }
    return { batch, items: accepted };
  }

  /** The one reply of `bytes`; a refused one throws NotAuthorized. */
  decodeReply(bytes: Uint8Array, topic = ""): ReplyEnvelope {
    const reply = this.decodeReplies(bytes, topic)[0];
    if (reply === undefined) throw new NotAuthorized(`Refused a reply on ${quote(topic)}`);
    return reply;
  }

  /** The replies of a message whose signature verifies, from a key allowed to answer their calls. */
  decodeReplies(bytes: Uint8Array, topic = ""): ReplyEnvelope[] {
    const opened = this.#open(bytes, topic, "reply");
    if (!opened) return [];
    const { key, body } = opened;
    const replies = this.#inner.decodeReplies
      ? this.#inner.decodeReplies(body, topic)
      : [this.#inner.decodeReply(body, topic)];
    const out: ReplyEnvelope[] = [];
    for (const reply of replies) {
      const call = this.#callTopics.get(reply.id);
      if (!call) {
        this.#refuse("unexpectedReply", key.id, topic, "reply", `no call of ours has id ${quote(reply.id)}`);
      } else if (!covers(key.serve, call.name!, undefined)) {
        this.#refuse("outOfScope", key.id, topic, "reply", `the key may not answer for ${quote(call.name)}`);
      } else {
        this.#calls.delete(reply.id);
        this.#callTopics.delete(reply.id);
        out.push(reply);
      }
    }
    return out;
  }

  /** The ids seen signed by `key`. Once a second, every key's table forgets what expired, and a
   * table left with nothing to remember goes. */
  #seenOf(key: Key, now: number): IdTable {
    const second = Math.floor(now / 1000);
    if (second > this.#seenSwept) {
      this.#seenSwept = second;
      for (const [id, table] of this.#seen) {
        table.sweep(second);
        if (table.size === 0 && table.floor < now) this.#seen.delete(id);
      }
    }
    let seen = this.#seen.get(key.id);
    if (!seen) this.#seen.set(key.id, seen = new IdTable(this.#seenBudget));
    return seen;
  }

  /** Keep `id` in `seen` until `until`; past `maxIds` in all, forget the soonest ids of `seen` if it
   * holds more than its share, else of the largest table: a flood of one key never pushes out a
   * quieter key's ids. */
  #remember(seen: IdTable, id: string, until: number, now: number): void {
    seen.set(id, until, now);
    const budget = this.#seenBudget;
    while (budget.used > this.#maxIds) {
      let table = seen;
      if (seen.size * this.#seen.size <= budget.used) {
        for (const t of this.#seen.values()) if (t.size > table.size) table = t;
      }
      table.forgetSoonest();
    }
  }

  /** Date.now(), never less than before. */
  #now(): number {
    const now = Date.now();
    if (now > this.#latest) this.#latest = now;
    return this.#latest;
  }

  #signerFor(what: string): Key {
    const key = this.#ring.signer;
    if (key) return key;
    throw new NotAuthorized(
      `Cannot ${what}: no signing key ("sign" is not set${this.#file ? ` in ${this.#file}` : ""})`,
    );
  }

  /** What the codec needs of a topic: its RPC name and host (name undefined when it is no RPC
   * topic of our prefix) and its signed `"to"` part; kept for the few topics a process uses. */
  #topic(topic: string): TopicInfo {
    let t = this.#topics.get(topic);
    if (t) return t;
    if (!PLAIN_TOPIC.test(topic)) throw new TypeError(`Cannot sign for topic ${quote(topic)}: it has no signed form`);
    t = { to: Buffer.from(`"to":"${topic}","m":`) };
    if (topic.startsWith(this.#fanoutRoot)) {
      const name = topic.slice(this.#fanoutRoot.length);
      if (!name.includes("/")) t.name = name;
    } else if (topic.startsWith(this.#rpcRoot)) {
      const [name, host, more] = topic.slice(this.#rpcRoot.length).split("/");
      if (more === undefined) [t.name, t.host] = [name, host];
    }
    if (this.#topics.size >= 1024) this.#topics.clear();
    this.#topics.set(topic, t);
    return t;
  }

  /** The role of `context` that `key` may not assert, as words; undefined when all are allowed. */
  #deniedRole(key: Key, context: unknown): string | undefined {
    if (key.roles.has("*")) return undefined;
    const c = context as { isAdmin?: unknown; is_admin?: unknown; roles?: unknown };
    // Either name: RequestContext.from() reads is_admin first, then isAdmin.
    if ((c.is_admin === true || c.isAdmin === true) && !key.roles.has("admin")) return "is_admin";
    if (Array.isArray(c.roles)) {
      for (const r of c.roles) if (!key.roles.has(r)) return `role ${quote(r)}`;
    }
    return undefined;
  }

  /** The key that signed `bytes` for `topic`, and the message inside; undefined when refused. */
  #open(bytes: Uint8Array, topic: string, what: string): { key: Key; body: Uint8Array } | undefined {
    const b = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (b.length < SIG_OPEN.length || b.compare(SIG_OPEN, 0, SIG_OPEN.length, 0, SIG_OPEN.length) !== 0) {
      return this.#refuse("unsigned", "", topic, what, "it carries no signature");
    }
    const end = b.indexOf(QUOTE, SIG_OPEN.length);
    const dot = b.lastIndexOf(0x2e, end);
    if (end < 0 || dot < SIG_OPEN.length || b[end + 1] !== 0x2c || b[b.length - 1] !== CLOSE_BRACE) {
      return this.#refuse("unsigned", "", topic, what, "its signature field is malformed");
    }
    if (dot - SIG_OPEN.length > 64) {
      return this.#refuse("unknownKey", "(overlong key id)", topic, what, "its key id is over 64 characters");
    }
    const id = b.toString("latin1", SIG_OPEN.length, dot);
    const key = this.#ring.keys.get(id);
    // Logged under one name: made-up ids must not fill the set of senders logged.
    if (!key) {
      return this.#refuse(
        "unknownKey",
        "(unknown key)",
        topic,
        what,
        `signed by key ${quote(id)}, which we do not know`,
      );
    }
    const rest = b.subarray(end + 2);
    const text = b.toString("latin1", dot + 1, end);
    const sig = Buffer.from(text, "base64url");
    // Only the canonical spelling: decoding skips stray characters and ignores the last one's spare bits.
    if (text.length !== key.sigLength || sig.toString("base64url") !== text) {
      return this.#refuse("badSignature", id, topic, what, "its signature is not the key's base64url signature");
    }
    let ok: boolean;
    if (key.hmac) {
      const mac = createHmac("sha256", key.hmac).update(OPEN_BRACE).update(rest).digest();
      ok = sig.length === mac.length && timingSafeEqual(sig, mac);
    } else {
      ok = edVerify(null, Buffer.concat([OPEN_BRACE, rest]), key.publicKey!, sig);
    }
    if (!ok) return this.#refuse("badSignature", id, topic, what, "its signature does not match its bytes");
    // The destination is signed: a message copied to another topic is refused.
    const to = this.#topic(topic).to;
    if (rest.length <= to.length || rest.compare(to, 0, to.length, 0, to.length) !== 0) {
      return this.#refuse("wrongTopic", id, topic, what, "it was signed for another topic");
    }
    return { key, body: rest.subarray(to.length, rest.length - 1) };
  }

  /** Does a signed but malformed request get its BadRequest answer? Only within its key's call
   * scope, and once per id: a key holder cannot aim answers elsewhere by copies. */
  #answersBad(key: Key, bad: BadRequest, topic: string): boolean {
    const { name, host } = this.#topic(topic);
    if (name === undefined || !covers(key.call, name, host)) {
      this.#refuse("outOfScope", key.id, topic, "request", "the key may not call this topic");
      return false;
    }
    if (bad.id === undefined) return true; // not answered: it says nowhere to
    const now = this.#now();
    const seen = this.#seenOf(key, now);
    // It carries no deadline to hold against the floor: while the key's ids are forgotten early, none is answered.
    if (seen.has(bad.id) || seen.floor > now) {
      this.#refuse("replayed", key.id, topic, "request", `its id ${quote(bad.id)} was seen before`);
      return false;
    }
    this.#remember(seen, bad.id, now + (this.#ring.maxAge + this.#keepSkew) * 1000, now);
    return true;
  }

  /** Is a verified request fresh, unseen and within its key's scopes? */
  #accepts(key: Key, req: RequestEnvelope, topic: string): boolean {
    const now = this.#now();
    const { maxAge, skew } = this.#ring;
    const deadline = req.deadline;
    if (!Number.isFinite(deadline) || deadline! > now + (maxAge + skew) * 1000) {
      this.#refuse("tooFarAhead", key.id, topic, "request", `its deadline is missing or over ${maxAge} s ahead`);
      return false;
    }
    // Expired from the ms its id may be forgotten in (see IdTable.sweep), not one ms later.
    if (deadline! + this.#lateSkew * 1000 <= now) {
      this.#refuse("expired", key.id, topic, "request", "its deadline has passed");
      return false;
    }
    // Past the table's size, ids that had not expired were forgotten: a request that expires by the
    // latest of them may be one of them, replayed. Refused: under a flood, some calls fail, none run twice.
    // By key and id: another key's holder cannot make a client's next ids look used.
    const seen = this.#seenOf(key, now);
    if (seen.has(req.id) || deadline! + this.#lateSkew * 1000 <= seen.floor) {
      this.#refuse("replayed", key.id, topic, "request", `its id ${quote(req.id)} was seen before`);
      return false;
    }
    const { name, host } = this.#topic(topic);
    if (name === undefined || !covers(key.call, name, host)) {
      this.#refuse("outOfScope", key.id, topic, "request", "the key may not call this topic");
      return false;
    }
    const denied = this.#deniedRole(key, req.context);
    if (denied !== undefined) {
      this.#refuse("outOfScope", key.id, topic, "request", `the key may not assert ${denied}`);
      return false;
    }
    this.#remember(seen, req.id, deadline! + this.#keepSkew * 1000, now);
    return true;
  }

  #refuse(reason: Refusal, id: string, topic: string, what: string, why: string): undefined {
    this.refused[reason]++;
    const sender = id || "(unsigned)";
    if (!this.#logged.has(sender) && this.#logged.size < MAX_LOGGED) {
      this.#logged.add(sender);
      this.#log.warn(
        `Refused a ${what} on ${quote(topic)} from key ${
          quote(sender)
        }: ${why}; dropped, not answered (further refusals of this key are counted, not logged)`,
      );
    }
    return undefined;
  }
}

/** Read a key file (JSON, as {@link KeysConfig}). @throws {TypeError} naming the file. */
export async function readKeys(path: string): Promise<KeysConfig> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new TypeError(`Cannot read the key file ${quote(path)}: ${(e as Error).message}`, { cause: e });
  }
  try {
    return JSON.parse(text) as KeysConfig;
  } catch (e) {
    throw new TypeError(`The key file ${quote(path)} is not JSON: ${(e as Error).message}`, { cause: e });
  }
}

/** A new key with its secret (hmac) or private part (ed25519), and the scopes of `opts`. */
export function generateKey(
  id: string,
  type: "hmac" | "ed25519",
  opts: Pick<KeyEntry, "call" | "serve" | "roles"> = {},
): KeyEntry {
  if (!KEY_ID.test(id)) throw new TypeError(`Invalid key id ${quote(id)}: letters, digits and _.:@- only, at most 64`);
  const scopes = { call: opts.call ?? ["*"], serve: opts.serve ?? ["*"], roles: opts.roles ?? [] };
  if (type === "hmac") return { id, type, secret: randomBytes(32).toString("base64url"), ...scopes };
  const { publicKey, privateKey } = generateKeyPairSync("ed25519");
  return {
    id,
    type,
    public: publicKey.export({ format: "der", type: "spki" }).subarray(12).toString("base64url"),
    private: privateKey.export({ format: "der", type: "pkcs8" }).subarray(16).toString("base64url"),
    ...scopes,
  };
}

/** `entry` without its private part: what others need to verify its holder. */
export function publicPart(entry: KeyEntry): KeyEntry {
  const { private: _private, ...rest } = entry;
  return rest;
}
