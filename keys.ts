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
}

interface Key {
  id: string;
  hmac?: Buffer;
  publicKey?: KeyObject;
  privateKey?: KeyObject;
  call: Set<string>;
  serve: Set<string>;
  roles: Set<string>;
  /** Length of the signature in base64url. */
  sigLength: number;
}

interface Ring {
  keys: Map<string, Key>;
  signer?: Key;
  maxAge: number;
  skew: number;
}

const KEY_ID = /^[A-Za-z0-9_.:@-]{1,64}$/;
const SIG_OPEN = Buffer.from('{"sig":"');
const TO_OPEN = Buffer.from('"to":"');
const QUOTE = 0x22;
const BRACE = 0x7b;
const OPEN_BRACE = Buffer.of(BRACE);
/** A topic written into the signed bytes as it is: no quote, backslash or control character. */
const PLAIN_TOPIC = /^[^"\\\p{Cc}]*$/u;
/** Refused senders logged by name, at most: a flood of made-up key ids must not grow a set. */
const MAX_LOGGED = 1000;
/** Ids remembered against replay, at most; the oldest go first beyond it. */
const MAX_SEEN = 200_000;
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
    const key: Key = {
      id,
      call: scope(e.call, `${what} "call"`, ["*"]),
      serve: scope(e.serve, `${what} "serve"`, ["*"]),
      roles: scope(e.roles, `${what} "roles"`, []),
      sigLength: 43,
    };
    if (e.type === "hmac") {
      key.hmac = bytesOf(e.secret, `${what} "secret"`, undefined, 16);
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

/** Does `set` (a scope) cover topic `name`, or its host `host`? */
function covers(set: Set<string>, name: string, host: string | undefined): boolean {
  return set.has("*") || (host === undefined ? set.has(name) : set.has(name) || set.has(`${name}.${host}`));
}

const list = (set: Set<string>) => set.size === 0 ? "none" : [...set].join(", ");

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
  /** Request ids seen, until their deadline (plus skew) passes. */
  #seen = new Map<string, number>();
  /** Calls this process signed that wait for a reply: who may answer them. */
  #calls = new Map<string, { name: string; host?: string; until: number }>();
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
  }

  /** A codec of the key file at `path` (JSON, as {@link KeysConfig}). */
  static async fromFile(path: string, opts: Omit<SignedCodecOptions, "file"> = {}): Promise<SignedCodec> {
    return new SignedCodec(await readKeys(path), { ...opts, file: path });
  }

  /** Use these keys from now on (a rotation: list the old and the new key until all sign with the
   * new one). Checked whole before anything changes. */
  setKeys(config: KeysConfig): void {
    this.#ring = buildRing(config, this.#file);
  }

  /** Read the key file again (`serve()` does on SIGHUP); the keys stay as they were if it is bad. */
  async reload(): Promise<void> {
    if (this.#file) this.setKeys(await readKeys(this.#file));
  }

  /** The id of the key this codec signs with. */
  get signer(): string | undefined {
    return this.#ring.signer?.id;
  }

  /** Throw unless this process may answer for `topic`: a service checks it before it serves. */
  checkServe(topic: string): void {
    const key = this.#signerFor(`serve ${quote(topic)}`);
    if (!covers(key.serve, topic, undefined)) {
      throw new NotAuthorized(`Key ${quote(key.id)} may not serve ${quote(topic)} (its "serve": ${list(key.serve)})`);
    }
  }

  /** The request, signed for `topic`.
   * @throws {NotAuthorized} when the signing key may not call that topic or assert its roles. */
  encodeRequest(req: RequestEnvelope, topic = ""): Uint8Array {
    const key = this.#signerFor(`send ${quote(req.method)}`);
    const [name, host] = this.#parts(topic);
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
    const now = Date.now();
    const limit = now + this.#ring.maxAge * 1000;
    if (req.deadline === undefined) req = { ...req, deadline: limit };
    else if (req.deadline > limit) {
      throw new RangeError(
        `Cannot sign ${quote(req.method)} with a deadline ${
          Math.round((req.deadline - now) / 1000)
        } s ahead: the keys' maxAge is ${this.#ring.maxAge} s`,
      );
    }
    if (req.reply_to !== undefined) this.#remember(this.#calls, req.id, { name, host, until: req.deadline! });
    return this.#seal(key, topic, this.#inner.encodeRequest(req, topic));
  }

  /** The reply, signed for the reply topic `topic`. */
  encodeReply(reply: ReplyEnvelope, topic = ""): Uint8Array {
    return this.#seal(this.#signerFor("answer"), topic, this.#inner.encodeReply(reply, topic));
  }

  /** A frame of signed envelopes (each keeps its own signature). */
  encodeBatch(items: Uint8Array[]): Uint8Array {
    return this.#inner.encodeBatch ? this.#inner.encodeBatch(items) : jsonCodec.encodeBatch!(items);
  }

  /** The one request of `bytes` that arrived on `topic`; a refused one throws NotAuthorized. */
  decodeRequest(bytes: Uint8Array, topic = ""): RequestEnvelope {
    const { items } = this.decodeRequests(bytes, topic);
    const req = items[0];
    if (req === undefined) throw new NotAuthorized(`Refused a request on ${quote(topic)}`);
    if (req instanceof BadRequest) throw req;
    return req;
  }

  /** The requests of a message that verify; the others are dropped (logged once per key). */
  decodeRequests(bytes: Uint8Array, topic = ""): { batch: boolean; items: (RequestEnvelope | BadRequest)[] } {
    const items: (RequestEnvelope | BadRequest)[] = [];
    const spans = splitBatch(bytes);
    for (const span of spans ?? [bytes]) {
      const key = this.#verify(span, topic, "request");
      if (!key) continue;
      let req: RequestEnvelope;
      try {
        req = this.#inner.decodeRequest(span, topic);
      } catch (e) {
        // Signed but malformed: its sender is known, so it may hear BadRequest.
        items.push(e instanceof BadRequest ? e : new BadRequest(String(e)));
        continue;
      }
      if (this.#accepts(key, req, topic)) items.push(req);
    }
    return { batch: spans !== undefined, items };
  }

  /** The one reply of `bytes`; a refused one throws NotAuthorized. */
  decodeReply(bytes: Uint8Array, topic = ""): ReplyEnvelope {
    const reply = this.decodeReplies(bytes, topic)[0];
    if (reply === undefined) throw new NotAuthorized(`Refused a reply on ${quote(topic)}`);
    return reply;
  }

  /** The replies of a message that verify and come from a key allowed to answer their call. */
  decodeReplies(bytes: Uint8Array, topic = ""): ReplyEnvelope[] {
    const out: ReplyEnvelope[] = [];
    for (const span of splitBatch(bytes) ?? [bytes]) {
      const key = this.#verify(span, topic, "reply");
      if (!key) continue;
      const reply = this.#inner.decodeReply(span, topic);
      const call = this.#calls.get(reply.id);
      if (!call) {
        this.#refuse("unexpectedReply", key.id, topic, "reply", `no call of ours has id ${quote(reply.id)}`);
      } else if (!covers(key.serve, call.name, call.host)) {
        this.#refuse("outOfScope", key.id, topic, "reply", `the key may not answer for ${quote(call.name)}`);
      } else {
        this.#calls.delete(reply.id);
        out.push(reply);
      }
    }
    return out;
  }

  #signerFor(what: string): Key {
    const key = this.#ring.signer;
    if (key) return key;
    throw new NotAuthorized(
      `Cannot ${what}: no signing key ("sign" is not set${this.#file ? ` in ${this.#file}` : ""})`,
    );
  }

  /** The topic name and host of an RPC topic of our prefix (`[undefined]` when it is none). */
  #parts(topic: string): [string | undefined, string | undefined] {
    if (topic.startsWith(this.#fanoutRoot)) {
      const name = topic.slice(this.#fanoutRoot.length);
      return name.includes("/") ? [undefined, undefined] : [name, undefined];
    }
    if (!topic.startsWith(this.#rpcRoot)) return [undefined, undefined];
    const [name, host, more] = topic.slice(this.#rpcRoot.length).split("/");
    return more === undefined ? [name, host] : [undefined, undefined];
  }

  /** The role of `context` that `key` may not assert, as words; undefined when all are allowed. */
  #deniedRole(key: Key, context: unknown): string | undefined {
    if (key.roles.has("*")) return undefined;
    const c = context as { isAdmin?: unknown; is_admin?: unknown; roles?: unknown };
    if ((c.isAdmin ?? c.is_admin) === true && !key.roles.has("admin")) return "is_admin";
    if (Array.isArray(c.roles)) {
      for (const r of c.roles) if (!key.roles.has(r)) return `role ${quote(r)}`;
    }
    return undefined;
  }

  /** `{"sig":"ID.SIG","to":"TOPIC",` + the envelope after its `{`, signed from `"to"` on. */
  #seal(key: Key, topic: string, inner: Uint8Array): Uint8Array {
    if (inner[0] !== BRACE || !PLAIN_TOPIC.test(topic)) {
      throw new TypeError(`Cannot sign a message to ${quote(topic)}: the envelope or the topic has no signed form`);
    }
    const head = SIG_OPEN.length + key.id.length + 1 + key.sigLength + 2; // {"sig":"ID.SIG",
    const to = Buffer.from(`"to":"${topic}",`);
    const out = Buffer.allocUnsafe(head + to.length + inner.length - 1);
    to.copy(out, head);
    out.set(inner.subarray(1), head + to.length);
    out[head - 1] = BRACE; // the signed bytes: "{" + what follows the header
    const signed = out.subarray(head - 1);
    const sig = key.hmac
      ? createHmac("sha256", key.hmac).update(signed).digest("base64url")
      : edSign(null, signed, key.privateKey!).toString("base64url");
    out.write(`{"sig":"${key.id}.${sig}",`, 0, "latin1");
    return out;
  }

  /** The key that signed `span` for `topic`, or undefined when it is refused (and logged). */
  #verify(span: Uint8Array, topic: string, what: string): Key | undefined {
    const b = Buffer.from(span.buffer, span.byteOffset, span.byteLength);
    if (b.length < SIG_OPEN.length || b.compare(SIG_OPEN, 0, SIG_OPEN.length, 0, SIG_OPEN.length) !== 0) {
      return this.#refuse("unsigned", "", topic, what, "it carries no signature");
    }
    const end = b.indexOf(QUOTE, SIG_OPEN.length);
    const dot = b.lastIndexOf(0x2e, end);
    if (end < 0 || dot < SIG_OPEN.length || b[end + 1] !== 0x2c) {
      return this.#refuse("unsigned", "", topic, what, "its signature field is malformed");
    }
    const id = b.toString("latin1", SIG_OPEN.length, dot);
    const key = this.#ring.keys.get(id);
    if (!key) return this.#refuse("unknownKey", id, topic, what, "signed by a key we do not know");
    const sig = b.toString("latin1", dot + 1, end);
    const rest = b.subarray(end + 2);
    let ok: boolean;
    if (key.hmac) {
      const mac = createHmac("sha256", key.hmac).update(OPEN_BRACE).update(rest).digest();
      const given = Buffer.from(sig, "base64url");
      ok = given.length === mac.length && timingSafeEqual(given, mac);
    } else {
      ok = edVerify(null, Buffer.concat([OPEN_BRACE, rest]), key.publicKey!, Buffer.from(sig, "base64url"));
    }
    if (!ok) return this.#refuse("badSignature", id, topic, what, "its signature does not match its bytes");
    // The destination is signed: a message copied to another topic is refused.
    const toEnd = end + 2 + TO_OPEN.length;
    if (
      b.compare(TO_OPEN, 0, TO_OPEN.length, end + 2, toEnd) !== 0 ||
      b.toString("utf8", toEnd, b.indexOf(QUOTE, toEnd)) !== topic
    ) {
      return this.#refuse("wrongTopic", id, topic, what, "it was signed for another topic");
    }
    return key;
  }

  /** Is a verified request fresh, unseen and within its key's scopes? */
  #accepts(key: Key, req: RequestEnvelope, topic: string): boolean {
    const now = Date.now();
    const { maxAge, skew } = this.#ring;
    const deadline = req.deadline;
    if (deadline === undefined || deadline > now + (maxAge + skew) * 1000) {
      this.#refuse("tooFarAhead", key.id, topic, "request", `its deadline is missing or over ${maxAge} s ahead`);
      return false;
    }
    if (deadline < now - skew * 1000) {
      this.#refuse("expired", key.id, topic, "request", "its deadline has passed");
      return false;
    }
    if (this.#seen.has(req.id)) {
      this.#refuse("replayed", key.id, topic, "request", `its id ${quote(req.id)} was seen before`);
      return false;
    }
    const [name, host] = this.#parts(topic);
    if (name === undefined || !covers(key.call, name, host)) {
      this.#refuse("outOfScope", key.id, topic, "request", "the key may not call this topic");
      return false;
    }
    const denied = this.#deniedRole(key, req.context);
    if (denied !== undefined) {
      this.#refuse("outOfScope", key.id, topic, "request", `the key may not assert ${denied}`);
      return false;
    }
    this.#remember(this.#seen, req.id, deadline + skew * 1000);
    return true;
  }

  /** Keep `value` under `id` until its time passes; the oldest entries go first. */
  #remember<V>(map: Map<string, V>, id: string, value: V): void {
    map.set(id, value);
    if (map.size % 256 !== 0 && map.size < MAX_SEEN) return;
    const now = Date.now();
    for (const [k, v] of map) {
      const until = typeof v === "number" ? v : (v as { until: number }).until;
      if (until >= now && map.size < MAX_SEEN) break;
      map.delete(k);
    }
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

/** The spans of a JSON array's items, or undefined when `bytes` is not an array (one envelope). */
function splitBatch(bytes: Uint8Array): Uint8Array[] | undefined {
  let i = 0;
  while (i < bytes.length && (bytes[i] === 0x20 || bytes[i] === 0x0a || bytes[i] === 0x0d || bytes[i] === 0x09)) i++;
  if (bytes[i] !== 0x5b) return undefined;
  const spans: Uint8Array[] = [];
  let depth = 0;
  let inString = false;
  let start = i + 1;
  for (; i < bytes.length; i++) {
    const c = bytes[i]!;
    if (inString) {
      if (c === 0x5c) i++;
      else if (c === QUOTE) inString = false;
    } else if (c === QUOTE) inString = true;
    else if (c === BRACE || c === 0x5b) depth++;
    else if (c === 0x7d || c === 0x5d) {
      if (--depth === 0) {
        spans.push(trim(bytes.subarray(start, i)));
        break;
      }
    } else if (c === 0x2c && depth === 1) {
      spans.push(trim(bytes.subarray(start, i)));
      start = i + 1;
    }
  }
  return spans;
}

function trim(b: Uint8Array): Uint8Array {
  let s = 0;
  let e = b.length;
  while (s < e && b[s]! <= 0x20) s++;
  while (e > s && b[e - 1]! <= 0x20) e--;
  return b.subarray(s, e);
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
