/**
 * An embedded MQTT broker (aedes) on a free loopback port, so tests and examples run on a
 * machine without a broker. aedes speaks MQTT 3.1.1 only and delivers nothing to `$share`
 * subscriptions: connect to it with `protocolVersion: 4` and `sharedSubscriptions: false`,
 * as {@link EmbeddedBroker.transportOptions} does.
 *
 * aedes is an optional peer dependency of novalet: `npm install aedes` to use this module.
 *
 * @module
 */

import { createServer, type Server, type Socket } from "node:net";
import type { AddressInfo } from "node:net";
import type { Aedes } from "aedes";
import type { MqttTransportOptions } from "./mqtt.ts";

/** A running embedded broker. */
export class EmbeddedBroker {
  /** `mqtt://127.0.0.1:PORT`: where clients connect. */
  readonly url: string;
  /** The port it listens on. */
  readonly port: number;
  #server: Server;
  #aedes: Aedes;
  #sockets = new Set<Socket>();
  #closed = false;

  private constructor(server: Server, aedes: Aedes) {
    this.#server = server;
    this.#aedes = aedes;
    server.on("connection", (s) => {
      this.#sockets.add(s);
      s.on("close", () => this.#sockets.delete(s));
    });
    this.port = (server.address() as AddressInfo).port;
    this.url = `mqtt://127.0.0.1:${this.port}`;
  }

  /**
   * Start a broker on 127.0.0.1 and a port the system picks (or `port`). With `users`, only
   * those user names and passwords may connect (anonymous clients are refused).
   */
  static async start(opts: { port?: number; users?: Record<string, string> } = {}): Promise<EmbeddedBroker> {
    const users = opts.users;
    const { Aedes } = await import("aedes").catch((e: unknown) => {
      throw new Error(
        'The embedded MQTT broker needs the package "aedes", an optional dependency of novalet: run `npm install aedes`',
        { cause: e },
      );
    });
    const aedes = await Aedes.createBroker(
      users
        ? {
          authenticate: (_client, username, password, done) => {
            const ok = username !== undefined && Object.hasOwn(users, username) &&
              users[username] === password?.toString();
            if (ok) return done(null, true);
            // CONNACK return code 4: bad user name or password.
            done(Object.assign(new Error("Bad user name or password"), { returnCode: 4 as const }), null);
          },
        }
        : {},
    );
    // noDelay: without it each QoS 1 round trip waits for a delayed ACK.
    const server = createServer({ noDelay: true }, aedes.handle);
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(opts.port ?? 0, "127.0.0.1", () => resolve());
    });
    return new EmbeddedBroker(server, aedes);
  }

  /** Options for an MqttTransport on this broker (MQTT 3.1.1, no shared subscriptions). */
  transportOptions(): MqttTransportOptions {
    return { url: this.url, protocolVersion: 4, sharedSubscriptions: false };
  }

  /** Stop the broker and drop its clients. Idempotent. */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await new Promise<void>((resolve) => this.#aedes.close(() => resolve()));
    await new Promise<void>((resolve) => {
      this.#server.close(() => resolve());
      for (const s of this.#sockets) s.destroy();
    });
  }
}
