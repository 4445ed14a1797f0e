/**
 * The parts of mqtt.js that the MQTT transport uses without a documented API, in one place.
 * mqtt.js is pinned to `~5.16`; {@link checkInternals} runs for every client the transport
 * takes, so a release that renamed or removed one of them fails at connect time, by name,
 * instead of misbehaving later.
 *
 * @module
 */

import { Readable } from "node:stream";
import type { IStore } from "mqtt";

/** The part of mqtt.js's `MqttClient` that these functions type; they reach for the rest. */
export interface MqttClientParts {
  /** The connection's stream, replaced on every reconnect. */
  stream?: unknown;
  /** The options the client was made with; some are read again at run time. */
  options: { reconnectPeriod?: number };
}

/** The mqtt.js versions these internals were checked against. */
export const MQTTJS_RANGE = "~5.16";

/** A packet on its way out through mqtt.js's `_sendPacket`. */
export interface PacketOut {
  /** The packet type: `publish`, `puback`, `pingreq`... */
  cmd: string;
  /** The topic of a publish. */
  topic?: string | Buffer;
  /** The payload of a publish. */
  payload?: unknown;
  /** MQTT 5 properties. */
  properties?: Record<string, unknown>;
  /** The packet identifier of a QoS 1 publish or its PUBACK. */
  messageId?: number;
  /** The MQTT 5 reason code of a PUBACK. */
  reasonCode?: number;
}

/** A QoS 1 publish that mqtt.js keeps until the broker acknowledges it. */
export interface Outgoing {
  /** The callback of the `publish()` that sent it. */
  cb: (error?: Error, packet?: unknown) => void;
}

/** `noStore` is true only when mqtt.js sends a stored QoS 1 packet again after a reconnect. */
type SendPacket = (packet: PacketOut, cb?: unknown, cbStorePut?: unknown, noStore?: unknown) => void;

/** What the transport reaches into, and the type each must have. */
interface Internals {
  _sendPacket: SendPacket;
  outgoing: Record<number, Outgoing | undefined>;
  disconnecting: boolean;
  sendPing(): void;
}

const EXPECTED: [keyof Internals, string][] = [
  ["_sendPacket", "function"],
  ["sendPing", "function"],
  ["outgoing", "object"],
  ["disconnecting", "boolean"],
];

const of = (client: MqttClientParts): Internals => client as unknown as Internals;

/**
 * Throw unless `client` has every internal the transport uses; call it before using a client.
 * @throws {TypeError} naming each missing internal and the mqtt.js version needed.
 */
export function checkInternals(client: MqttClientParts): void {
  const c = client as unknown as Record<string, unknown>;
  const missing = EXPECTED.filter(([name, type]) => typeof c?.[name] !== type || c[name] === null);
  if (missing.length === 0) return;
  const what = missing.map(([name, type]) => `${name} (${type})`).join(", ");
  throw new TypeError(
    `This mqtt.js client has no ${what}: novalet's MQTT transport uses these internals of mqtt.js ` +
      `${MQTTJS_RANGE} (install mqtt@${MQTTJS_RANGE})`,
  );
}

/** Call `watch` with every packet just before mqtt.js writes it (`resent`: a stored QoS 1
 * publish sent again after a reconnect). The packet may still be changed. */
export function watchSends(client: MqttClientParts, watch: (packet: PacketOut, resent: boolean) => void): void {
  const c = of(client);
  const send = c._sendPacket;
  c._sendPacket = (packet, cb, cbStorePut, noStore) => {
    watch(packet, noStore === true);
    return send.call(client, packet, cb, cbStorePut, noStore);
  };
}

/** Write a packet as it is: mqtt.js has no public call to acknowledge a message later. */
export function sendPacket(client: MqttClientParts, packet: PacketOut): void {
  of(client)._sendPacket(packet);
}

/**
 * What `handleMessage`'s callback gets to keep mqtt.js from acknowledging a message: given an
 * error, it sends no PUBACK and reads on (undocumented; the transport acknowledges later or never).
 */
export function noAck(why: string): Error {
  return new Error(why);
}

/** Write a PINGREQ now (not a documented call). */
export function sendPing(client: MqttClientParts): void {
  of(client).sendPing();
}

/** Whether `end()` was called on the client. */
export function isDisconnecting(client: MqttClientParts): boolean {
  return of(client).disconnecting;
}

/** mqtt.js's record of an unacknowledged QoS 1 publish, by packet identifier. */
export function outgoing(client: MqttClientParts, messageId: number): Outgoing | undefined {
  return of(client).outgoing[messageId];
}

/** Cork the client's socket; undefined when its stream cannot be corked. */
export function cork(client: MqttClientParts): { uncork(): void } | undefined {
  const stream = client.stream as { cork?(): void; uncork(): void } | undefined;
  if (stream?.cork === undefined) return undefined;
  stream.cork();
  return stream;
}

/** Set TCP_NODELAY on the client's current socket: mqtt.js has no option for it and replaces
 * the socket on every reconnect. */
export function noDelay(client: MqttClientParts): void {
  (client.stream as { setNoDelay?: (on: boolean) => void } | undefined)?.setNoDelay?.(true);
}

/** Change the wait before the next reconnect: mqtt.js reads `options.reconnectPeriod` anew each
 * time (undocumented), which is how the transport backs off. */
export function setReconnectPeriod(client: MqttClientParts, ms: number): void {
  client.options.reconnectPeriod = ms;
}

/**
 * Call `hook` on every new connection before mqtt.js sends its stored QoS 1 packets again, and
 * hold them until the promise it returns settles (it must not reject). mqtt.js's `_onConnect`
 * asks the outgoing store (public API) for them right after setting `connected`, before it emits
 * `connect`; that order is not documented, so `hook` runs only while the client says it is
 * connected, and a release that asks at another time merely skips it.
 */
export function beforeReplay(client: MqttClientParts, hook: () => Promise<void> | undefined): void {
  const c = client as unknown as { outgoingStore?: IStore; connected: boolean };
  const store = c.outgoingStore;
  if (store === undefined) return;
  // Only createStream changes: put() and del() run for every QoS 1 message and stay as they are.
  const createStream = store.createStream;
  store.createStream = () => {
    const wait = c.connected ? hook() : undefined;
    const stored = createStream.call(store);
    return wait === undefined ? stored : heldUntil(wait, stored as unknown as Readable) as unknown as typeof stored;
  };
}

/** `stored`'s packets once `wait` settled; destroying it (the connection closed) destroys `stored`. */
function heldUntil(wait: Promise<void>, stored: Readable): Readable {
  const out = new Readable({
    objectMode: true,
    read() {},
    destroy(error, done) {
      stored.destroy();
      done(error);
    },
  });
  const go = () => {
    if (out.destroyed) return;
    stored.on("data", (packet) => out.destroyed || out.push(packet));
    stored.on("end", () => out.destroyed || out.push(null));
    stored.on("error", (e) => out.destroy(e));
  };
  wait.then(go, go);
  return out;
}
