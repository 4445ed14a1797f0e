/**
 * The MQTT transport: novalet across processes and machines through an MQTT broker, with the
 * same behaviour as the memory transport (the conformance suite checks both).
 *
 * - One connection per transport; groups are shared subscriptions (`$share/GROUP/FILTER`).
 * - Subscription identifiers (MQTT 5) only where filters on the connection overlap: there they
 *   tell which subscription a message is for; elsewhere the topic does, and a message carries
 *   no property for every broker and client to encode and parse.
 * - TCP_NODELAY on every (re)connection: without it a QoS 1 request/response waits for Nagle
 *   against delayed ACK. The broker needs it too (`set_tcp_nodelay true`).
 * - A message is acknowledged once a handler took it; with a persistent session a message that
 *   no handler takes is never acknowledged, so the broker delivers it again later.
 * - Reconnects with exponential backoff and subscribes again when the broker lost the session,
 *   before mqtt.js sends the QoS 1 messages it kept (a request's reply needs its subscription).
 *
 * @module
 */

import { readFileSync } from "node:fs";
import process from "node:process";
import mqtt, { type IClientOptions, type IConnackPacket, type IPublishPacket, type MqttClient as Client } from "mqtt";
import {
  ClosedError,
  DeliveryError,
  getLogger,
  type LastWill,
  type Logger,
  type MessageHandler,
  type MessageMeta,
  promising,
  type PublishOptions,
  quote,
  redactUrl,
  runHandler,
  type SubscribeOptions,
  type Subscription,
  TIMED_OUT,
  topicMatches,
  type Transport,
  TransportGuard,
  validateTopic,
  within,
} from "../mod.ts";
import {
  beforeReplay,
  checkInternals,
  cork,
  isDisconnecting,
  noAck,
  noDelay,
  outgoing,
  type PacketOut,
  sendPacket,
  sendPing,
  setReconnectPeriod,
  watchSends,
} from "./mqtt-internals.ts";

// Re-exported: the public signatures below use them.
export type { LastWill, Logger, MessageHandler, PublishOptions, SubscribeOptions, Subscription, Transport };

/** mqtt.js's client (see mqtt.js's documentation). */
export type MqttClient = Client;

const noop = (): void => {};
const RESOLVED = Promise.resolve();
/** Tells mqtt.js not to acknowledge a message: MqttTransport does, later (see #holdWrites). */
const ACK_LATER = noAck("acknowledged by novalet at the end of the turn");

/** Options of {@link MqttTransport.connect}. */
export interface MqttTransportOptions {
  /** `mqtt://host:1883`, `mqtts://host:8883`, `ws://...`. Query parameters: see the README. */
  url?: string;
  /** Use this connected client instead of opening one (it is not closed by `close()`). */
  client?: MqttClient;
  /** The user name, if the URL has none. */
  username?: string;
  /** The password, if the URL has none. */
  password?: string;
  /** TLS (`mqtts://`, `wss://`): the file (a path) of the CA certificates that the broker's
   * certificate must chain to, for a private CA; default: the system's. URL parameter `ca`. The
   * broker's certificate is always checked, its name included. */
  ca?: string;
  /** TLS: the client certificate file (a path), for a broker that asks for one. URL parameter `cert`. */
  cert?: string;
  /** TLS: the client certificate's private key file (a path). URL parameter `key`. */
  key?: string;
  /** Default: `sessionClientId` for a persistent session, else `novalet-` and a random id. */
  clientId?: string;
  /** The client id of a persistent session when `clientId` is not given (Service passes
   * `novalet-BINARY-HOST`, so the next run of the service finds its session again). */
  sessionClientId?: string;
  /** 5 (default) or 4 (MQTT 3.1.1). */
  protocolVersion?: 4 | 5;
  /** QoS when a publish does not say. Default 1. */
  qos?: 0 | 1;
  /** Seconds: a connection silent for about 1.5 × this is lost to the broker (which then
   * publishes its Will), and mqtt.js pings this often. Default 30. A connection with a `will`
   * negotiates {@link willKeepalive}(keepalive) instead and pings more often, so that its Will
   * comes within 1.5 × keepalive of silence even on a broker that checks only every 6 s. */
  keepalive?: number;
  /** Seconds the broker keeps the session after a disconnect; > 0 makes it persistent
   * (`clean: false`). Default 0. */
  sessionExpiry?: number;
  /** false: a group becomes a plain subscription (every member gets every message), for brokers
   * without shared subscriptions such as aedes. Default true. */
  sharedSubscriptions?: boolean;
  /** Larger payloads are refused at publish. Default 8 MiB (or less if the broker says so). */
  maxPayloadBytes?: number;
  /** Seconds to wait for the first connection. Default 10. */
  connectTimeout?: number;
  /** Reconnect backoff in seconds: the first wait, doubled after each failure. Default 0.5. */
  reconnectMin?: number;
  /** The longest wait between reconnect attempts, in seconds. Default 30. */
  reconnectMax?: number;
  /** Where connection trouble and failed handlers are logged. Default: `getLogger()`. */
  logger?: Logger;
  /** The MQTT Will of the connection: published by the broker if it ends without `close()`,
   * or when it falls silent (see `keepalive`). */
  will?: LastWill;
}

/** One broker subscription and the local handlers that share it. */
interface BrokerSub {
  key: string;
  filter: string;
  /** No wildcard: a topic matches when it is equal. */
  exact: boolean;
  group?: string;
  qos: 0 | 1;
  /** Its subscription identifier, given when its filter overlaps another's (MQTT 5 only). */
  id?: number;
  /** The broker tags what it sends for this subscription with `id` (not yet while the
   * subscribe that adds the identifier is in flight). */
  tagged: boolean;
  handlers: MessageHandler[];
  next: number;
  /** Subscribed at the broker (false while a subscribe or unsubscribe is in flight). */
  ready: Promise<void>;
  /** Set while its UNSUBSCRIBE is in flight: until the broker confirms, what it delivers for this
   * subscription still goes to the handler being removed. Resolves (never rejects) once gone. */
  leaving?: Promise<void>;
  /** Forget it now, without waiting for the broker's confirmation (close()). */
  left?: () => void;
}

/** Whether some topic matches both filters (true when in doubt, which only costs an identifier). */
function filtersOverlap(a: string, b: string): boolean {
  const x = a.split("/");
  const y = b.split("/");
  for (let i = 0;; i++) {
    const u = x[i];
    const v = y[i];
    if (u === "#" || v === "#") return true;
    if (u === undefined || v === undefined) return u === v;
    if (u !== v && u !== "+" && v !== "+") return false;
  }
}

/** A stable subscription identifier for a key (1 to 268,435,455): a persistent session keeps
 * the identifiers of its subscriptions, so the next process must give a key the same one. */
function stableId(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193) >>> 0;
  return (h % 268_435_454) + 1;
}

/** The largest values the protocol's fields (and a timer, for waits) can hold. */
const LIMITS: [keyof MqttTransportOptions, number][] = [
  ["sessionExpiry", 0xffff_ffff], // a four-byte field, seconds
  ["keepalive", 65_535], // a two-byte field, seconds
  ["connectTimeout", 2_147_483], // one timer
  ["reconnectMin", 2_147_483],
  ["reconnectMax", 2_147_483],
];

/** Refuse a number of seconds the protocol or a timer cannot hold, naming the option. */
function checkLimits(opts: MqttTransportOptions): void {
  for (const [name, max] of LIMITS) {
    const v = opts[name];
    if (v !== undefined && !(typeof v === "number" && v >= 0 && v <= max)) {
      throw new RangeError(`Invalid ${name} ${quote(v)}: must be seconds from 0 to ${max}`);
    }
  }
}

/** How long a connection must last for the reconnect backoff to start again from its minimum. */
const STABLE_CONNECTION_MS = 5000;

/**
 * How late a broker may notice a silent client, at worst, beyond the 1.5 × keepalive that MQTT
 * allows it: Mosquitto 2.0 looks for silent clients only when more than 5 whole seconds have
 * passed since it last looked (`last_keepalive_check + 5 < now`, src/keepalive.c), that is every
 * 6 s, and counts silence in whole seconds against floor(1.5 × keepalive).
 */
const KEEPALIVE_SWEEP_S = 6;
/** Room for the broker's loop (Mosquitto's wakes at least every 100 ms) and the Will's trip. */
const WILL_MARGIN_S = 0.5;
/** A connection with a Will pings this many times within the silence its broker tolerates. */
const WILL_PINGS = 4;

/**
 * The MQTT keepalive that a connection with a Will negotiates for the `keepalive` it was given,
 * so that a silent process's Will still comes within 1.5 × keepalive on a broker that checks
 * keepalives only every 6 s (Mosquitto 2.0).
 *
 * With a negotiated keepalive K, Mosquitto 2.0 closes a silent connection at the first of its
 * sweeps (every 6 s) at which the whole seconds since the connection's last packet exceed
 * floor(1.5 × K): its Will comes between floor(1.5 × K) and floor(1.5 × K) + 6 s after the last
 * packet. This is the largest K (at least 1) with floor(1.5 × K) + 6 + 0.5 ≤ 1.5 × keepalive: 5
 * gives 1 (the Will within ~7.1 s), 10 gives 5, 30 gives 25. Under 5 s no K meets the bound on
 * such a broker; 1 comes closest. Brokers that time each client (aedes, most others) publish the
 * Will 1.5 × K after the last packet: sooner. 0 (no keepalive) stays 0.
 *
 * The price: the connection pings 4 times per floor(1.5 × K) s (every 250 ms for K = 1), and a
 * process whose event loop stalls for longer than floor(1.5 × K) s minus that interval may be
 * declared lost (0.75 s for keepalive 5); it says `online` again once it runs (see Service).
 */
export function willKeepalive(keepalive: number): number {
  if (!(keepalive > 1)) return keepalive;
  let k = Math.floor(keepalive);
  while (k > 1 && Math.floor(1.5 * k) + KEEPALIVE_SWEEP_S + WILL_MARGIN_S > 1.5 * keepalive) k--;
  return k;
}

/** The TLS options that name files, read at connect. */
const TLS_FILES = ["ca", "cert", "key"] as const;

/** The TLS files of `opts`, read (mqtt.js takes their contents); a clear error names a file that
 * cannot be read, or TLS options on a URL without TLS. */
function readTlsFiles(
  opts: MqttTransportOptions,
  url: URL,
  where: string,
): Pick<IClientOptions, "ca" | "cert" | "key"> {
  const out: Pick<IClientOptions, "ca" | "cert" | "key"> = {};
  for (const name of TLS_FILES) {
    const path = opts[name];
    if (path === undefined || path === "") continue;
    if (!/^(mqtts|wss|tls|ssl):$/.test(url.protocol)) {
      throw new TypeError(`Invalid ${name}=${quote(path)} for broker ${where}: TLS files need mqtts:// (or wss://)`);
    }
    try {
      out[name] = readFileSync(path);
    } catch (e) {
      throw new Error(`Cannot read the TLS file ${name}=${quote(path)} for broker ${where}: ${(e as Error).message}`, {
        cause: e,
      });
    }
  }
  return out;
}

/** Read novalet's query parameters from a broker URL and return the URL without them. */
function parseUrl(url: string): { url: string; opts: Partial<MqttTransportOptions> } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new TypeError(`Invalid broker URL ${quote(redactUrl(url))}: not a URL (check the host and the port)`);
  }
  if (u.hostname === "") throw new TypeError(`Invalid broker URL ${quote(redactUrl(url))}: it names no host`);
  const opts: Partial<MqttTransportOptions> = {};
  const num = (name: string) => {
    const v = u.searchParams.get(name);
    if (v === null) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new RangeError(`Invalid ${name}=${quote(v)} in ${quote(redactUrl(url))}`);
    u.searchParams.delete(name);
    return n;
  };
  opts.sessionExpiry = num("session_expiry");
  opts.keepalive = num("keepalive");
  const pv = num("protocol_version");
  if (pv !== undefined && pv !== 4 && pv !== 5) throw new RangeError(`Invalid protocol_version=${pv}: use 4 or 5`);
  opts.protocolVersion = pv as 4 | 5 | undefined;
  const qos = num("qos");
  if (qos !== undefined && qos !== 0 && qos !== 1) throw new RangeError(`Invalid qos=${qos}: use 0 or 1`);
  opts.qos = qos as 0 | 1 | undefined;
  for (const name of TLS_FILES) {
    const path = u.searchParams.get(name);
    if (path === null) continue;
    opts[name] = path;
    u.searchParams.delete(name);
  }
  const shared = u.searchParams.get("shared");
  if (shared !== null) {
    opts.sharedSubscriptions = shared !== "false" && shared !== "0";
    u.searchParams.delete("shared");
  }
  // Over TCP the rest of the query goes nowhere (mqtt.js reads clientId only): a typo must not
  // pass silently. (A WebSocket URL keeps its query: it is part of the address.)
  if (!u.protocol.startsWith("ws")) {
    const unknown = [...u.searchParams.keys()].filter((k) => k !== "clientId");
    if (unknown.length > 0) {
      throw new TypeError(
        `Unknown parameter ${quote(unknown[0])} in broker URL ${quote(redactUrl(url))}: ` +
          "known are session_expiry, keepalive, protocol_version, qos, shared, clientId, ca, cert and key",
      );
    }
  }
  if (u.username) opts.username = decodeURIComponent(u.username);
  if (u.password) opts.password = decodeURIComponent(u.password);
  u.username = "";
  u.password = "";
  return { url: u.toString(), opts };
}

/** How long close() waits, in seconds, for the broker to confirm that the subscriptions are removed. */
const CLOSE_UNSUBSCRIBE_S = 5;
/** How long an unsubscribe waits, after the broker confirmed it, for what the broker had already
 * queued for the subscription (see #quiet); what comes later finds no handler. */
const LEAVE_QUIET_MS = 3000;

/** How long, in seconds, mqtt.js's stored messages wait after a reconnect for the broker to
 * confirm our subscriptions; then they go anyway (see #beforeReplay). */
const RESUBSCRIBE_WAIT_S = 10;

/** The largest message expiry interval MQTT 5 can carry: four bytes, in seconds (136 years). */
const MAX_EXPIRY = 0xffff_ffff;

/**
 * A QoS 1 message that mqtt.js sends again after a reconnect, and that the broker answers by
 * closing the connection (within POISON_WINDOW_MS, before acknowledging it) POISON_STRIKES times
 * in a row, is one the broker refuses: it is dropped, or the client would never serve again. A
 * network flap does not repeat itself right after the same message twice.
 */
const POISON_STRIKES = 2;
const POISON_WINDOW_MS = 5000;
/** MQTT 5 DISCONNECT reasons that are not about a packet the client sent: normal, server busy,
 * shutting down, keep alive timeout, session taken over, message rate, quota, administrative
 * action, use another server, server moved, connection rate, maximum connect time. */
const NOT_ABOUT_A_PACKET = new Set([0, 0x89, 0x8b, 0x8d, 0x8e, 0x96, 0x97, 0x98, 0x9c, 0x9d, 0x9f, 0xa0]);

/** What handlers learn about a message: shared, never changed. */
const AT_QOS_0: MessageMeta = Object.freeze({ qos: 0 });
const AT_QOS_1: MessageMeta = Object.freeze({ qos: 1 });

/** Options of a publish without properties; not frozen (V8 copies a frozen object slowly), and
 * mqtt.js copies them before use. */
const PUBLISH_AT = [{ qos: 0 as const }, { qos: 1 as const }] as const;
/** The same for a retained publish (`retain` is one of mqtt.js's defaults: no new hidden class). */
const PUBLISH_RETAINED = [{ qos: 0 as const, retain: true }, { qos: 1 as const, retain: true }] as const;

/** The longest client id a sibling connection gets: brokers must take 23 bytes, most take far more. */
const MAX_CLIENT_ID_BYTES = 255;

/** mqtt.js's form of a Will, checked: a bad one would make every (re)connection fail. */
function mqttWill(will: LastWill, maxPayload: number): NonNullable<IClientOptions["will"]> {
  if (will === null || typeof will !== "object") throw new TypeError(`Invalid will ${quote(will)}: must be an object`);
  validateTopic(will.topic);
  if (!(will.payload instanceof Uint8Array)) {
    throw new TypeError(`Invalid will on ${will.topic}: payload must be bytes`);
  }
  if (will.payload.byteLength > maxPayload) {
    throw new RangeError(
      `Invalid will on ${will.topic}: ${will.payload.byteLength} bytes, over the limit of ${maxPayload} bytes (maxPayloadBytes)`,
    );
  }
  const qos = will.qos ?? 1;
  if (qos !== 0 && qos !== 1) throw new RangeError(`Invalid will qos ${quote(qos)}: use 0 or 1`);
  // A copy: mqtt.js sends these options again on every reconnect, and the caller may reuse its bytes.
  return { topic: will.topic, payload: Buffer.from(will.payload), qos, retain: will.retain === true };
}

/** A client id for the n-th sibling of `parent`: readable when it fits, else a stable hash of it. */
function siblingClientId(parent: string, tag: string, n: number): string {
  // The tag is this parent's (random): two processes that share a client id (the same service
  // started twice, say) must not take each other's siblings over, in an endless loop of Wills.
  const suffix = n === 1 ? `-live-${tag}` : `-live-${tag}-${n}`;
  const id = parent + suffix;
  if (Buffer.byteLength(id, "utf8") <= MAX_CLIENT_ID_BYTES) return id;
  return `novalet-${stableId(parent).toString(16)}${suffix}`;
}

function withHandlers(subs: BrokerSub[]): BrokerSub | BrokerSub[] | undefined {
  const out = subs.filter((s) => s.handlers.length > 0);
  return out.length === 0 ? undefined : out.length === 1 ? out[0] : out;
}

/** A {@link Transport} over an MQTT broker. */
export class MqttTransport implements Transport {
  /** The mqtt.js client: for events and diagnostics, not for publishing around the transport. */
  readonly client: MqttClient;
  /** The MQTT client id of the connection (a persistent session is found by it). */
  readonly clientId: string;
  /** The user name it logged in with; RPC reply topics go under it (see Transport.user). */
  readonly user?: string;
  /** Whether the broker keeps our session (and our subscriptions) across disconnects. */
  readonly persistent: boolean;
  #owned: boolean;
  #log: Logger;
  #qos: 0 | 1;
  #shared: boolean;
  #maxPayload: number;
  #v5: boolean;
  #subs = new Map<string, BrokerSub>();
  #byId = new Map<number, BrokerSub>();
  /** QoS 1 messages no handler took, on a persistent session: not acknowledged (yet). */
  #held: IPublishPacket[] = [];
  #noSubscribers = new Set<number>();
  /** Closed, and topic, filter and group checks: the rules every transport shares. */
  #guard = new TransportGuard();
  #warnedShared = false;
  #sharedAvailable = true;
  /** The stream corked by #holdWrites until the end of this turn. */
  #corked?: { uncork(): void };
  /** Message ids of this turn's QoS 1 messages, acknowledged when the turn's writes go out. */
  #acks: number[] = [];
  /** The payload being handed to mqtt.js now and its expiry in seconds (see #addExpiry). */
  #expiringPayload?: Buffer;
  #expirySeconds = 0;
  /** Expiries of publishes that mqtt.js queued to send later (while it replays its store). */
  #laterExpiry = new Map<Buffer, number>();
  /** The stored QoS 1 packet that mqtt.js last sent again on this connection, and when. */
  #resent?: PacketOut;
  #resentAt = 0;
  /** The CONNACK of the current (or last) connection. */
  #connack?: IConnackPacket;
  /** The stream of the connection whose subscriptions #beforeReplay dealt with. */
  #subscribedOn?: unknown;
  /** Why the broker closed this connection, when it said (an MQTT 5 DISCONNECT). */
  #closeReason?: number;
  /** The re-sent packet that the last connections were closed on, and how many in a row. */
  #suspect?: PacketOut;
  #strikes = 0;
  /** The options connect() opened this transport with (URL parameters merged); undefined for a
   * client given to connect(): then connection() cannot open another. */
  #opened?: MqttTransportOptions;
  /** Client ids of this transport's open siblings (see connection()), so two never collide. */
  #siblingIds = new Set<string>();
  /** The random part of this transport's siblings' client ids. */
  #siblingTag = crypto.randomUUID().slice(0, 8);
  /** Called on close(): gives the client id back to the parent that opened this sibling. */
  #onClosed?: () => void;
  /** The pings of a connection with a Will (see #pingOften). */
  #pinger?: ReturnType<typeof setInterval>;
  /** PINGREQs of ours (#pingOften's, #quiet's) not answered yet on this connection. */
  #pingsOut = 0;

  private constructor(client: MqttClient, opts: MqttTransportOptions, owned: boolean) {
    checkInternals(client);
    this.client = client;
    this.clientId = client.options.clientId ?? "";
    if (client.options.username) this.user = client.options.username;
    this.#owned = owned;
    this.#log = opts.logger ?? getLogger();
    this.#qos = opts.qos ?? 1;
    this.#shared = opts.sharedSubscriptions ?? true;
    this.#maxPayload = opts.maxPayloadBytes ?? 8 * 1024 * 1024;
    this.#v5 = client.options.protocolVersion === 5;
    this.persistent = client.options.clean === false;
    // Route every message ourselves. mqtt.js sends the PUBACK when the callback is called without
    // an error; with an error it sends none and goes on reading: that is how a message nobody
    // takes stays unacknowledged, for the broker to deliver again.
    client.handleMessage = (packet, callback) => {
      const held = packet.qos > 0 && this.#holdWrites();
      if (this.#offer(packet)) {
        if (!held) return callback();
        // Acknowledged at the end of this turn, after what the handlers published in it (see
        // #holdWrites); an error tells mqtt.js to send no PUBACK of its own and read on.
        this.#acks.push(packet.messageId!);
        return callback(ACK_LATER);
      }
      if (this.persistent && packet.qos > 0) {
        // Closing: not held for a handler, but still not acknowledged: the session keeps it.
        if (this.#guard.closed) return callback(noAck("closing: left for the next connection"));
        this.#log.debug(`Holding a message on ${packet.topic}: no handler takes it yet`, { topic: packet.topic });
        this.#held.push(packet);
        return callback(noAck("held: no handler"));
      }
      this.#log.debug(`Dropped a message on ${packet.topic}: no handler`, { topic: packet.topic });
      callback();
    };
    client.on("packetreceive", (p) => {
      if (p.cmd === "puback") {
        // Reason 16 (v5): "no matching subscribers"; mqtt.js reports it as success.
        if (p.reasonCode === 16 && p.messageId !== undefined) this.#noSubscribers.add(p.messageId);
      } else if (p.cmd === "connack") this.#connack = p;
      else if (p.cmd === "pingresp" && this.#pingsOut > 0) this.#pingsOut--;
    });
    beforeReplay(client, this.#beforeReplay);
    client.on("connect", (connack) => this.#onConnect(connack));
    // Message expiry goes onto the packet here, not through publish()'s options: mqtt.js spreads
    // those over its defaults, and on Node 20 an object spread followed by a key that the
    // defaults lack makes a new hidden class every time, which makes the publish path slow.
    watchSends(client, (packet, resent) => {
      if (packet.cmd !== "publish") return;
      if (this.#expiringPayload !== undefined || this.#laterExpiry.size > 0) this.#addExpiry(packet);
      // mqtt.js re-sends its stored messages one at a time, each after the previous PUBACK.
      if (resent) {
        this.#resent = packet;
        this.#resentAt = Date.now();
      }
    });
    client.on("disconnect", (p) => void (this.#closeReason = p.reasonCode));
    client.on("close", () => this.#onClose());
  }

  /**
   * Connect to a broker (or wrap a connected client) and resolve once connected.
   * @throws {Error} naming the broker and the reason (refused, bad credentials, timeout).
   */
  static async connect(options: MqttTransportOptions): Promise<MqttTransport> {
    if (options.client) {
      if (options.will !== undefined) {
        throw new TypeError(
          "MqttTransport.connect(): a will needs a url; give the mqtt.js client its own will instead",
        );
      }
      const t = new MqttTransport(options.client, options, false);
      if (options.client.connected) noDelay(options.client);
      return t;
    }
    if (!options.url) throw new TypeError("MqttTransport.connect() needs a url or a client");
    const parsed = parseUrl(options.url);
    // Explicit options win over the URL's query parameters.
    const opts: MqttTransportOptions = { ...options };
    for (const [k, v] of Object.entries(parsed.opts) as [keyof MqttTransportOptions, never][]) {
      if (opts[k] === undefined) opts[k] = v;
    }
    checkLimits(opts);
    const sessionExpiry = opts.sessionExpiry ?? 0;
    const protocolVersion = opts.protocolVersion ?? 5;
    const reconnectMin = (opts.reconnectMin ?? 0.5) * 1000;
    const reconnectMax = (opts.reconnectMax ?? 30) * 1000;
    const will = opts.will === undefined ? undefined : mqttWill(opts.will, opts.maxPayloadBytes ?? 8 * 1024 * 1024);
    const keepalive = will === undefined ? opts.keepalive ?? 30 : willKeepalive(opts.keepalive ?? 30);
    const clientOpts: IClientOptions = {
      clientId: opts.clientId ?? (sessionExpiry > 0 ? opts.sessionClientId : undefined) ??
        `novalet-${crypto.randomUUID().slice(0, 12)}`,
      protocolVersion,
      clean: sessionExpiry <= 0,
      keepalive,
      // A ping every keepalive instead of the keepalive timer cleared and set again for every
      // acknowledgement received (mqtt.js's default): a QoS 1 call costs one less timer pair on
      // each side. The broker needs a packet per keepalive; the ping is one.
      reschedulePings: false,
      reconnectPeriod: reconnectMin,
      connectTimeout: (opts.connectTimeout ?? 10) * 1000,
      resubscribe: false, // we subscribe again ourselves, with our subscription identifiers
      queueQoSZero: false, // a QoS 0 publish while offline fails instead of claiming success
      // mqtt-packet otherwise makes a two-byte Buffer for every packet id up front (megabytes of
      // heap in every process), to save one small allocation per QoS 1 packet.
      writeCache: false,
      username: opts.username,
      password: opts.password,
      ...readTlsFiles(opts, new URL(parsed.url), quote(redactUrl(options.url))),
      properties: protocolVersion === 5 && sessionExpiry > 0 ? { sessionExpiryInterval: sessionExpiry } : undefined,
      // No Will Delay Interval (MQTT 5): the Will goes out as soon as the connection is lost.
      will,
      // mqtt.js logs through `debug` several times per message, which costs even switched off.
      // A no-op unless DEBUG asks for mqtt.js's log.
      log: /mqttjs/.test(process.env.DEBUG ?? "") ? undefined : noop,
    };
    const where = quote(redactUrl(options.url));
    const client = mqtt.connect(parsed.url, clientOpts);
    let transport: MqttTransport;
    try {
      transport = new MqttTransport(client, opts, true);
    } catch (e) {
      client.end(true); // an mqtt.js without the internals the transport needs
      throw e;
    }
    transport.#opened = opts;
    // Backoff: mqtt.js waits a fixed reconnectPeriod; double it after each attempt, and start again
    // from reconnectMin only after a connection that lasted. A connection the broker closes at once,
    // again and again, is most often another client with our id: each would take the session back
    // twice a second, for good; backing off makes that a takeover every reconnectMax.
    client.on("reconnect", () => {
      setReconnectPeriod(client, Math.min(reconnectMax, (client.options.reconnectPeriod ?? reconnectMin) * 2));
    });
    let connectedAt = -1;
    let quickCloses = 0;
    client.on("connect", () => (connectedAt = performance.now()));
    client.on("close", () => {
      if (connectedAt < 0) return;
      const lasted = performance.now() - connectedAt >= STABLE_CONNECTION_MS;
      connectedAt = -1;
      if (lasted) {
        quickCloses = 0;
        setReconnectPeriod(client, reconnectMin);
      } else if (++quickCloses === 3) {
        transport.#log.warn(
          `The broker closed the connection right after it was made, 3 times in a row: is another client connected as ${
            quote(transport.clientId)
          }? Backing off`,
        );
      }
    });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => fail(new Error("no answer")), (opts.connectTimeout ?? 10) * 1000);
      const ok = () => {
        cleanup();
        resolve();
      };
      const fail = (e: Error) => {
        cleanup();
        client.end(true);
        const why = /Not authorized|Bad User Name or Password|bad user/i.test(e.message)
          ? `${e.message} (check the user name and password)`
          : e.message;
        reject(new Error(`Cannot connect to MQTT broker ${where}: ${why}`, { cause: e }));
      };
      const cleanup = () => {
        clearTimeout(timer);
        client.off("connect", ok);
        client.off("error", fail);
      };
      client.on("connect", ok);
      client.on("error", fail);
    });
    client.on("error", (e) => transport.#log.warn("MQTT connection error", { broker: where, error: e }));
    client.on("offline", () => transport.#log.warn("MQTT broker unreachable; reconnecting", { broker: where }));
    if (will !== undefined) transport.#pingOften();
    return transport;
  }

  /**
   * Ping WILL_PINGS times within the silence the broker tolerates (floor(1.5 × keepalive) s, the
   * keepalive it announced if it set one), instead of once per keepalive: a connection with a
   * Will negotiates a short keepalive (see willKeepalive), and a ping per keepalive, sent after
   * the previous answer, would leave gaps the broker may take for silence. Runs until close().
   */
  #pingOften(): void {
    const client = this.client;
    const arm = () => {
      clearInterval(this.#pinger);
      const keepalive = client.keepalive; // the broker's Server Keep Alive when it sent one
      if (!(keepalive > 0)) return;
      const every = Math.max(1, Math.floor(1.5 * keepalive)) * 1000 / WILL_PINGS;
      this.#pinger = setInterval(() => {
        if (!client.connected || isDisconnecting(client)) return;
        sendPing(client);
        this.#pingsOut++;
      }, every);
    };
    arm();
    client.on("connect", arm);
  }

  /**
   * Cork the socket until this turn's promise jobs have run, and acknowledge the turn's QoS 1
   * messages then, after what was published in it. mqtt.js writes the PUBACK of a QoS 1 message
   * at once and flushes it in the next tick, which comes before the promise jobs in which the
   * reply (or the caller's next request) is published: two writes, two wake-ups of the broker,
   * for what one write carries. And in one write, the reply goes first: the broker handles a
   * write's packets in order, so it passes the reply (or request) on before it deals with the
   * acknowledgement. (A tick scheduled from a promise job runs after all of them.) Under load
   * every PUBACK of a read shares the write of the batched replies.
   * False when the stream cannot be corked: mqtt.js then acknowledges as it does.
   */
  #holdWrites(): boolean {
    if (this.#corked !== undefined) return true;
    const stream = cork(this.client);
    if (stream === undefined) return false;
    this.#corked = stream;
    RESOLVED.then(this.#releaseLater);
    return true;
  }

  #releaseLater = (): void => process.nextTick(this.#releaseWrites);

  #releaseWrites = (): void => {
    const stream = this.#corked;
    this.#corked = undefined;
    const acks = this.#acks;
    if (acks.length > 0) {
      // Not on a connection that was lost this turn: the broker sends those messages again.
      if (stream === this.client.stream && this.client.connected) { for (const id of acks) this.#puback(id); }
      acks.length = 0;
    }
    stream?.uncork();
  };

  /** Give a publish packet that mqtt.js is about to send the expiry its publish() asked for. */
  #addExpiry(packet: PacketOut): void {
    let seconds: number | undefined;
    if (packet.payload === this.#expiringPayload) {
      seconds = this.#expirySeconds;
      this.#expiringPayload = undefined;
    } else if ((seconds = this.#laterExpiry.get(packet.payload as Buffer)) !== undefined) {
      this.#laterExpiry.delete(packet.payload as Buffer);
    }
    if (seconds === undefined) return;
    const expiry = { messageExpiryInterval: seconds };
    packet.properties = packet.properties === undefined ? expiry : { ...packet.properties, ...expiry };
  }

  /** mqtt.js has no public call to acknowledge a message after its handleMessage returned. */
  #puback(messageId: number | undefined): void {
    sendPacket(
      this.client,
      this.#v5 ? { cmd: "puback", messageId, reasonCode: 0 } : { cmd: "puback", messageId },
    );
  }

  #onConnect(connack: IConnackPacket): void {
    // Emitted once mqtt.js has re-sent its whole store: none of it was refused.
    this.#resent = this.#suspect = undefined;
    this.#strikes = 0;
    noDelay(this.client);
    this.#sharedAvailable = connack.properties?.sharedSubscriptionAvailable !== false;
    const max = connack.properties?.maximumPacketSize;
    if (max !== undefined) this.#maxPayload = Math.min(this.#maxPayload, max - 1024);
    // A broker that kept our session kept our subscriptions; otherwise make them again, unless
    // #beforeReplay did on this connection (it always does, with the mqtt.js we are tested with).
    if (this.#subscribedOn !== this.client.stream && !connack.sessionPresent) this.#subscribeAgain();
  }

  /**
   * A new connection, before mqtt.js sends its stored QoS 1 messages again (see beforeReplay). A
   * broker that kept no session has none of our subscriptions: make them first, and hold those
   * messages until it confirmed them, or a request sent again is answered before its reply
   * subscription exists. Never rejects: a refused subscription is logged and the messages go.
   */
  #beforeReplay = (): Promise<void> | undefined => {
    const stream = this.client.stream;
    if (this.#subscribedOn === stream) return undefined;
    this.#subscribedOn = stream;
    noDelay(this.client);
    if (this.#connack?.sessionPresent || this.#subs.size === 0) return undefined;
    this.#holdWrites(); // the SUBSCRIBEs in one write
    const made = this.#subscribeAgain();
    if (made.length === 0) return undefined;
    return within(Promise.all(made), RESUBSCRIBE_WAIT_S).then((r) => {
      if (r !== TIMED_OUT) return;
      this.#log.warn(
        `The broker has not confirmed our subscriptions ${RESUBSCRIBE_WAIT_S} s after the reconnect: sending the stored messages anyway`,
      );
    });
  };

  /** Subscribe again at the broker to every subscription we have; the promises never reject. */
  #subscribeAgain(): Promise<void>[] {
    const made: Promise<void>[] = [];
    for (const s of this.#subs.values()) {
      if (s.leaving !== undefined) continue;
      made.push(
        s.ready = this.#brokerSubscribe(s).catch((e) => {
          this.#log.error(`Cannot subscribe again to ${s.key} after a reconnect`, { error: e });
        }),
      );
    }
    return made;
  }

  /**
   * The connection is lost. If the broker closed it right after a message re-sent from mqtt.js's
   * store, before acknowledging it, that message is a suspect; the same one POISON_STRIKES times
   * in a row is refused by the broker (a topic it rejects, a packet over its size limit...): it
   * is dropped and its publish() fails, instead of being sent again on every reconnect forever.
   */
  #onClose(): void {
    this.#pingsOut = 0;
    // Unacknowledged messages of a lost connection come again, with the session, on the next one.
    if (this.#held.length > 0) this.#held = [];
    const packet = this.#resent;
    const reason = this.#closeReason;
    this.#resent = this.#closeReason = undefined;
    if (packet === undefined) return; // nothing re-sent: no news about the suspect
    const refused = !this.#guard.closed && !isDisconnecting(this.client) &&
      outgoing(this.client, packet.messageId!) !== undefined && Date.now() - this.#resentAt <= POISON_WINDOW_MS &&
      (reason === undefined || !NOT_ABOUT_A_PACKET.has(reason));
    if (!refused) {
      this.#suspect = undefined;
      this.#strikes = 0;
      return;
    }
    this.#strikes = this.#suspect === packet ? this.#strikes + 1 : 1;
    this.#suspect = packet;
    // After mqtt.js's own close handlers: its replay of the store is over by then.
    if (this.#strikes >= POISON_STRIKES) queueMicrotask(() => this.#dropRefused(packet, reason));
  }

  /** Take a message the broker refuses out of mqtt.js's store and fail its publish(). */
  #dropRefused(packet: PacketOut, reason: number | undefined): void {
    const id = packet.messageId!;
    const entry = outgoing(this.client, id);
    this.#suspect = undefined;
    const strikes = this.#strikes;
    this.#strikes = 0;
    if (entry === undefined || this.client.connected) return;
    const topic = String(packet.topic);
    const why = `the broker closed the connection right after it, the last ${strikes} times it was sent` +
      (reason === undefined ? "" : ` (reason code ${reason})`);
    this.#log.error(`Dropped a QoS 1 message to ${topic}: ${why}`, { topic });
    // mqtt.js calls the publish's callback with "Message removed"; it gets the reason instead.
    const cb = entry.cb;
    entry.cb = (_e, p) => cb(new Error(why), p);
    this.client.removeOutgoingMessage(id);
  }

  /**
   * Publish at `opts.qos` (default: the transport's). Resolves once mqtt.js has written a QoS 0
   * message, or the broker acknowledged a QoS 1 one.
   * @throws {DeliveryError} when the client cannot send it, or with `mandatory` nobody gets it.
   */
  publish(topic: string, payload: Uint8Array, opts: PublishOptions = {}): Promise<void> {
    return promising(() => this.#publish(topic, payload, opts));
  }

  #publish(topic: string, payload: Uint8Array, opts: PublishOptions): Promise<void> {
    this.#guard.checkPublish(topic);
    if (!(payload instanceof Uint8Array)) throw new TypeError(`Cannot publish to ${topic}: payload must be bytes`);
    if (payload.byteLength > this.#maxPayload) {
      throw new RangeError(
        `Cannot publish ${payload.byteLength} bytes to ${topic}: over the limit of ${this.#maxPayload} bytes (maxPayloadBytes)`,
      );
    }
    const qos = opts.qos ?? this.#qos;
    // Message expiry at QoS 1 only: a broker keeps QoS 1 messages for a session that is away (or
    // behind), and expiry spares a device a backlog of dead work. It keeps no QoS 0 message for
    // later (Mosquitto's default), and the property costs bytes to encode and parse. Either way,
    // the dispatcher never runs a request whose deadline has passed. The options given to mqtt.js
    // never carry a key beyond its defaults ({qos, retain, dup}): the expiry goes on the packet
    // in #addExpiry.
    const bytes = Buffer.from(payload.buffer, payload.byteOffset, payload.byteLength);
    const expiring = this.#v5 && qos > 0 && opts.expiry !== undefined;
    if (expiring) {
      this.#expiringPayload = bytes;
      // At most the four-byte field's maximum: more would not encode, and the client would
      // reconnect again and again (NaN gets it too).
      const seconds = Math.ceil(opts.expiry!);
      this.#expirySeconds = seconds < 1 ? 1 : seconds < MAX_EXPIRY ? seconds : MAX_EXPIRY;
    }
    // mqtt.js answers a QoS 0 publish before publish() returns, unless the socket is backed up or
    // it is replaying its store: then no promise is made for it (this is every reply and request
    // at QoS 0). A QoS 1 publish is answered by the broker's PUBACK, later.
    let answered = false;
    let failure: Error | undefined;
    let resolveLater: (() => void) | undefined;
    let rejectLater: ((e: Error) => void) | undefined;
    try {
      this.client.publish(topic, bytes, opts.retain ? PUBLISH_RETAINED[qos] : PUBLISH_AT[qos], (e, packet) => {
        answered = true;
        if (this.#laterExpiry.size > 0) this.#laterExpiry.delete(bytes); // failed while queued
        if (e) failure = new DeliveryError(`Cannot publish to ${topic}: ${e.message}`, { cause: e });
        else {
          const id = packet?.messageId;
          if (id !== undefined && this.#noSubscribers.delete(id) && opts.mandatory) {
            failure = new DeliveryError(`No subscriber for "${topic}": the broker has nobody to deliver it to`);
          }
        }
        if (failure !== undefined) rejectLater?.(failure);
        else resolveLater?.();
      });
    } catch (e) {
      // A rejection, not a throw. (The callback above stays an inline closure rather than a named
      // one shared with this path: under tsx, naming a closure costs an Object.defineProperty.)
      if (!answered) failure = new DeliveryError(`Cannot publish to ${topic}: ${(e as Error).message}`, { cause: e });
      answered = true;
    }
    if (expiring && this.#expiringPayload === bytes) {
      this.#expiringPayload = undefined;
      // Neither sent nor refused: mqtt.js queued it while it replays its store after a reconnect.
      if (!answered) this.#laterExpiry.set(bytes, this.#expirySeconds);
    }
    if (answered) return failure === undefined ? RESOLVED : Promise.reject(failure);
    return new Promise((resolve, reject) => {
      resolveLater = resolve;
      rejectLater = reject;
    });
  }

  /**
   * Subscribe at the broker (a group as a shared subscription) and resolve once it confirmed.
   * @throws {DeliveryError} when the broker refuses the subscription.
   */
  async subscribe(filter: string, handler: MessageHandler, opts: SubscribeOptions = {}): Promise<Subscription> {
    this.#guard.checkSubscribe(filter, opts);
    let group = opts.group;
    if (group !== undefined) {
      if (!this.#shared) {
        if (!this.#warnedShared) {
          this.#log.warn(
            "Shared subscriptions are off (sharedSubscriptions: false): every member of a group receives every message",
          );
          this.#warnedShared = true;
        }
        group = undefined;
      } else if (!this.#sharedAvailable) {
        throw new DeliveryError(
          `Cannot subscribe to ${filter} in group ${quote(group)}: the broker has no shared subscriptions ` +
            `(use a broker that has them, or sharedSubscriptions: false)`,
        );
      }
    }
    const key = group === undefined ? filter : `$share/${group}/${filter}`;
    let sub = this.#subs.get(key);
    // Being unsubscribed at the broker: a new subscription for the key is made once that is done.
    while (sub?.leaving !== undefined) {
      await sub.leaving;
      this.#guard.checkSubscribe(filter); // closed meanwhile?
      sub = this.#subs.get(key);
    }
    if (!sub) {
      const exact = !/[+#]/.test(filter);
      sub = {
        key,
        filter,
        exact,
        group,
        qos: opts.qos ?? this.#qos,
        tagged: false,
        handlers: [],
        next: 0,
        ready: RESOLVED,
      };
      // Overlapping filters: all of them get identifiers, those made earlier first (subscribed
      // again with one), so that once this one exists at the broker every copy says whom it is for.
      const before: Promise<void>[] = [];
      if (this.#v5) {
        for (const o of this.#subs.values()) {
          if (!filtersOverlap(o.filter, filter)) continue;
          if (o.id === undefined) this.#tag(o);
          before.push(o.ready.catch(() => {})); // its own failure is its subscribe()'s to report
        }
        if (before.length > 0) {
          this.#assignId(sub);
          sub.tagged = true;
        }
      }
      this.#subs.set(key, sub);
      const created = sub;
      created.ready = Promise.all(before).then(() => this.#brokerSubscribe(created)).catch((e) => {
        this.#drop(created);
        throw e;
      });
    }
    // The handler is in place before the SUBACK: a resumed session may deliver right away.
    sub.handlers.push(handler);
    this.#release();
    try {
      await sub.ready;
    } catch (e) {
      sub.handlers = sub.handlers.filter((h) => h !== handler);
      throw e instanceof DeliveryError ? e : new DeliveryError(`Cannot subscribe to ${key}: ${(e as Error).message}`, {
        cause: e,
      });
    }
    const s = sub;
    let removed: Promise<void> | undefined;
    const remove = (fromBroker: boolean): Promise<void> => {
      if (removed !== undefined) return removed;
      if (s.leaving !== undefined) return removed = s.leaving; // close() is removing it
      if (s.handlers.length > 1 || this.#subs.get(key) !== s) {
        // Others share the broker subscription (a group's messages go to them now), or it is gone.
        const i = s.handlers.indexOf(handler);
        if (i >= 0) s.handlers = s.handlers.filter((_, j) => j !== i);
        return removed = RESOLVED;
      }
      // The last handler keeps what the broker delivers until it confirms: acknowledged, that
      // must be handled. A clean session that is down has nothing left at the broker.
      if (fromBroker && !this.#guard.closed && (this.persistent || this.client.connected)) {
        return removed = this.#leave(s);
      }
      // detach() of a persistent session: what comes now has no handler and is not acknowledged,
      // so the broker delivers it again on a later connection.
      s.handlers = [];
      this.#drop(s);
      return removed = RESOLVED;
    };
    return {
      unsubscribe: () => remove(true),
      // With a persistent session the broker keeps queueing for the filter while we are away.
      detach: () => remove(!this.persistent),
    };
  }

  /**
   * Unsubscribe at the broker; its handlers still take what it delivers for `s` until it
   * confirms, and after that what it had already queued for this client (MQTT lets it, Mosquitto
   * does): until a ping round trip brings no message (see #quiet). Then `s` is forgotten. Never
   * rejects.
   */
  #leave(s: BrokerSub): Promise<void> {
    return s.leaving ??= new Promise<void>((resolve) => {
      s.left = () => {
        s.handlers = [];
        this.#drop(s);
        resolve();
      };
      this.client.unsubscribe(s.key, (e) => {
        if (!e) return void this.#quiet(LEAVE_QUIET_MS).then(s.left);
        this.#log.warn(`Cannot unsubscribe ${s.key}`, { error: e });
        s.left!();
      });
    });
  }

  /**
   * Resolve once the broker has sent what it had queued for this client: the broker answers a
   * PINGREQ after sending what the PUBACKs before it let through, so a ping round trip in which no
   * message arrives means there is no more. Resolves false after `ms` (a connection that never
   * goes quiet) or when the connection is lost.
   */
  #quiet(ms: number): Promise<boolean> {
    const client = this.client;
    return new Promise((resolve) => {
      let sent = 0; // PINGREQs written since we started, ours or the keepalive's
      // PINGRESPs still due for PINGREQs written before we started (#pingOften's) come first.
      let answered = -this.#pingsOut;
      let ours = 0; // the count of PINGREQs when ours went out
      let received = 0;
      const round = () => {
        received = 0;
        // This turn's acknowledgements first: the PINGREQ must follow them.
        if (this.#corked !== undefined) this.#releaseWrites();
        sendPing(client);
        this.#pingsOut++;
        ours = sent;
      };
      const onSend = (p: { cmd: string }) => void (p.cmd === "pingreq" && sent++);
      const onReceive = (p: { cmd: string }) => {
        if (p.cmd === "publish") received++;
        else if (p.cmd === "pingresp" && ++answered === ours) {
          if (received === 0) finish(true);
          else round();
        }
      };
      const finish = (ok: boolean) => {
        clearTimeout(timer);
        client.off("packetsend", onSend);
        client.off("packetreceive", onReceive);
        client.off("close", lost);
        resolve(ok);
      };
      const lost = () => finish(false);
      const timer = setTimeout(lost, ms);
      client.on("packetsend", onSend);
      client.on("packetreceive", onReceive);
      client.on("close", lost);
      if (client.connected) round();
      else finish(false);
    });
  }

  /** Forget a subscription here (with its identifier); the broker is told by the caller. */
  #drop(s: BrokerSub): void {
    if (this.#subs.get(s.key) === s) this.#subs.delete(s.key);
    if (s.id !== undefined && this.#byId.get(s.id) === s) this.#byId.delete(s.id);
  }

  /** Give `s` an identifier: stable for its key, as a persistent session keeps it across runs. */
  #assignId(s: BrokerSub): void {
    let id = stableId(s.key);
    while (this.#byId.has(id)) id = (id % 268_435_454) + 1;
    s.id = id;
    this.#byId.set(id, s);
  }

  /** An existing subscription now overlaps another: subscribe again, with an identifier. Until
   * the broker acknowledges, its messages come untagged and are routed to it by topic. */
  #tag(s: BrokerSub): void {
    this.#assignId(s);
    // rh 1: a subscription that exists is not sent its retained messages again.
    s.ready = s.ready.then(() => this.#brokerSubscribe(s, 1)).then(() => void (s.tagged = true), (e) => {
      this.#log.error(`Cannot add a subscription identifier to ${s.key}`, { error: e });
    });
  }

  async #brokerSubscribe(s: BrokerSub, rh?: 1): Promise<void> {
    const granted = await this.client.subscribeAsync(s.key, {
      qos: s.qos,
      ...(rh ? { rh } : {}),
      ...(this.#v5 && s.id !== undefined ? { properties: { subscriptionIdentifier: s.id } } : {}),
    });
    const code = granted[0]?.qos as number | undefined;
    if (code !== undefined && code >= 128) {
      const why = code === 0x9e
        ? "the broker has no shared subscriptions"
        : code === 0x87
        ? "not authorized"
        : `refused with code ${code}`;
      throw new DeliveryError(`Cannot subscribe to ${s.key}: ${why}`);
    }
  }

  /**
   * The subscriptions with handlers that a message is for: those its subscription identifiers
   * name, else the untagged ones whose filter matches. One subscription comes without an array:
   * that is nearly every message. A message for a subscription without handlers now is not
   * taken, even when another filter would match: the broker sends that one its own copy.
   */
  #targets(packet: IPublishPacket): BrokerSub | BrokerSub[] | undefined {
    const topic = packet.topic;
    const ids = packet.properties?.subscriptionIdentifier;
    if (ids === undefined) return this.#untagged(topic);
    if (typeof ids === "number") {
      const s = this.#byId.get(ids);
      if (s !== undefined && topicMatches(s.filter, topic)) return s.handlers.length > 0 ? s : undefined;
    } else if (ids !== undefined) {
      const named = ids.map((id) => this.#byId.get(id)).filter((s): s is BrokerSub =>
        s !== undefined && topicMatches(s.filter, topic)
      );
      if (named.length) return withHandlers(named);
    }
    return this.#matching(topic);
  }

  /** A message without identifiers is for the matching subscriptions the broker does not tag;
   * if none (a message queued for an earlier run's session), for every matching one. */
  #untagged(topic: string): BrokerSub | BrokerSub[] | undefined {
    let one: BrokerSub | undefined;
    let more: BrokerSub[] | undefined;
    for (const s of this.#subs.values()) {
      if (s.tagged || !(s.exact ? s.filter === topic : topicMatches(s.filter, topic))) continue;
      if (one === undefined) one = s;
      else (more ??= [one]).push(s);
    }
    if (one === undefined) return this.#matching(topic);
    if (more !== undefined) return withHandlers(more);
    return one.handlers.length > 0 ? one : undefined;
  }

  #matching(topic: string): BrokerSub | BrokerSub[] | undefined {
    return withHandlers([...this.#subs.values()].filter((s) => topicMatches(s.filter, topic)));
  }

  /** Hand a message to its handlers; false when none takes it. */
  #offer(packet: IPublishPacket): boolean {
    const targets = this.#targets(packet);
    if (targets === undefined) return false;
    const payload = packet.payload as Buffer;
    const bytes = new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
    const meta = packet.qos === 0 ? AT_QOS_0 : AT_QOS_1;
    if (!Array.isArray(targets)) this.#deliver(targets, bytes, packet.topic, meta);
    else for (const s of targets) this.#deliver(s, bytes, packet.topic, meta);
    // Taken, not finished: acknowledging at the end of a slow handler would stall the line.
    return true;
  }

  #deliver(s: BrokerSub, bytes: Uint8Array, topic: string, meta: MessageMeta): void {
    if (s.group !== undefined) runHandler(s.handlers[s.next++ % s.handlers.length]!, bytes, topic, this.#log, meta);
    else for (const h of s.handlers) runHandler(h, bytes, topic, this.#log, meta);
  }

  /** Offer the held messages again (a handler was added) and acknowledge those taken now. */
  #release(): void {
    if (this.#held.length === 0) return;
    this.#held = this.#held.filter((packet) => {
      if (!this.#offer(packet)) return true;
      this.#puback(packet.messageId);
      return false;
    });
  }

  /** Remove a filter from the broker session for good (used by `Service.kill()`). */
  async forget(filter: string, opts: SubscribeOptions = {}): Promise<void> {
    if (this.#guard.closed) return;
    const key = opts.group === undefined ? filter : `$share/${opts.group}/${filter}`;
    const s = this.#subs.get(key);
    if (s) this.#drop(s);
    await this.client.unsubscribeAsync(key);
  }

  /**
   * Open another connection to the same broker, with this transport's options (URL, credentials,
   * TLS, protocol version, QoS, keepalive, reconnect settings, logger) but a clean session, its
   * own client id (this one's with `-live`, `-live2`... while earlier ones are open) and `will`
   * as its MQTT Will (with a Will, it negotiates the keepalive {@link willKeepalive} gives). The
   * caller closes it; it and this transport close independently. Its `close()` disconnects
   * cleanly, so the broker drops the Will; a lost connection (a killed process, a keepalive
   * timeout) makes the broker publish it. It stays set across reconnects.
   * @throws {TypeError} when this transport wraps a client given to connect() (no URL to open),
   * or the will is invalid.
   * @throws {ClosedError} when this transport is closed.
   */
  async connection(opts: { will?: LastWill } = {}): Promise<MqttTransport> {
    const parent = this.#opened;
    if (parent === undefined) {
      throw new TypeError(
        "MqttTransport.connection() needs a transport opened from a URL: this one wraps an mqtt.js client given to connect()",
      );
    }
    if (this.#guard.closed) throw new ClosedError("Cannot open a connection: the transport is closed");
    // A clientId in the URL would win over ours in mqtt.js: the sibling's URL goes without it.
    const u = new URL(parent.url!);
    u.searchParams.delete("clientId");
    let n = 1;
    while (this.#siblingIds.has(siblingClientId(this.clientId, this.#siblingTag, n))) n++;
    const clientId = siblingClientId(this.clientId, this.#siblingTag, n);
    this.#siblingIds.add(clientId);
    let sibling: MqttTransport;
    try {
      sibling = await MqttTransport.connect({
        ...parent,
        url: u.toString(),
        clientId,
        sessionClientId: undefined,
        sessionExpiry: 0,
        will: opts.will,
      });
    } catch (e) {
      this.#siblingIds.delete(clientId);
      throw e;
    }
    sibling.#onClosed = () => this.#siblingIds.delete(clientId);
    return sibling;
  }

  /**
   * Remove the subscriptions and disconnect (an owned client). On a clean session they are
   * removed at the broker first, and what it delivers until it confirms still reaches their
   * handlers (that session and what it holds end with the connection). A persistent session
   * keeps them: what arrives now, like the held messages, is left unacknowledged for the next run.
   */
  async close(): Promise<void> {
    if (!this.#guard.close()) return;
    const leaving: Promise<void>[] = [];
    for (const s of this.#subs.values()) {
      if (s.leaving !== undefined) leaving.push(s.leaving);
      else if (!this.persistent && this.client.connected) leaving.push(this.#leave(s));
    }
    // A broker that never confirms gets CLOSE_UNSUBSCRIBE_S; then the subscriptions are forgotten.
    if (leaving.length > 0) await within(Promise.all(leaving), CLOSE_UNSUBSCRIBE_S);
    for (const s of this.#subs.values()) s.left?.();
    this.#subs.clear();
    this.#byId.clear();
    this.#held = [];
    this.#laterExpiry.clear();
    // This turn's acknowledgements go out before the DISCONNECT.
    if (this.#corked !== undefined) this.#releaseWrites();
    // (Pinging until then: a connection with a Will has a short keepalive.)
    clearInterval(this.#pinger);
    if (this.#owned) {
      // mqtt.js's end() first waits for every stored QoS 1 message to be acknowledged: forever when
      // offline. Give a connected broker CLOSE_UNSUBSCRIBE_S, then drop what is left (its publish()
      // rejects). A clean end() sends DISCONNECT: the broker drops the Will of a connection ended so.
      const pending = () => Object.keys(this.client.outgoing).map(Number);
      if (pending().length > 0 && this.client.connected) {
        await within(new Promise<void>((r) => this.client.once("outgoingEmpty", r)), CLOSE_UNSUBSCRIBE_S);
      }
      const left = pending();
      for (const id of left) {
        const entry = outgoing(this.client, id);
        if (entry === undefined) continue;
        const cb = entry.cb;
        entry.cb = (_e, p) => cb(new Error("the transport closed before the broker acknowledged it"), p);
        this.client.removeOutgoingMessage(id);
      }
      await this.client.endAsync(!this.client.connected || left.length > 0);
    }
    this.#onClosed?.();
  }
}
