/**
 * A TCP proxy for fault tests: it forwards to a target and can cut every connection (RST), go
 * silent as a dead network path does (half-open: nothing forwarded, nothing closed), and let
 * new connections through again.
 */
import net from "node:net";

interface Pair {
  client: net.Socket;
  upstream?: net.Socket;
  /** A silenced pair stays silent for good: its peer is gone, as far as the other side can tell. */
  silent: boolean;
}

export class TcpProxy {
  #server: net.Server;
  #target: { host: string; port: number };
  #pairs = new Set<Pair>();
  #silent = false;

  private constructor(server: net.Server, target: { host: string; port: number }) {
    this.#server = server;
    this.#target = target;
  }

  /** Listen on 127.0.0.1, on a port the OS picks, and forward to `host:port`. */
  static async start(host: string, port: number): Promise<TcpProxy> {
    // allowHalfOpen: a FIN from one side is forwarded, or swallowed while silent, never answered.
    const server = net.createServer({ allowHalfOpen: true });
    const proxy = new TcpProxy(server, { host, port });
    server.on("connection", (s) => proxy.#accept(s));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(0, "127.0.0.1", () => resolve());
    });
    return proxy;
  }

  get port(): number {
    return (this.#server.address() as net.AddressInfo).port;
  }

  /** Connections accepted so far that are still open. */
  get connections(): number {
    return this.#pairs.size;
  }

  #accept(client: net.Socket): void {
    const pair: Pair = { client, silent: this.#silent };
    this.#pairs.add(pair);
    const drop = () => {
      if (!this.#pairs.delete(pair)) return;
      client.destroy();
      pair.upstream?.destroy();
    };
    client.on("error", drop).on("close", drop);
    if (pair.silent) return; // accepted, never answered: a connection into a black hole
    const upstream = net.connect({ port: this.#target.port, host: this.#target.host, allowHalfOpen: true });
    pair.upstream = upstream;
    upstream.on("error", drop).on("close", drop);
    client.on("data", (d: Uint8Array) => pair.silent || upstream.write(d));
    upstream.on("data", (d: Uint8Array) => pair.silent || client.write(d));
    client.on("end", () => pair.silent || upstream.end());
    upstream.on("end", () => pair.silent || client.end());
  }

  /** Reset every open connection (RST to the client side where the platform can). */
  reset(): void {
    for (const { client, upstream } of this.#pairs) {
      if (typeof client.resetAndDestroy === "function") client.resetAndDestroy();
      else client.destroy();
      upstream?.destroy();
    }
    this.#pairs.clear();
  }

  /** Half-open: open connections and new ones forward nothing in either direction, and stay open. */
  silence(): void {
    this.#silent = true;
    for (const p of this.#pairs) p.silent = true;
  }

  /** New connections are forwarded again; the silenced ones stay silent. */
  restore(): void {
    this.#silent = false;
  }

  async close(): Promise<void> {
    this.reset();
    await new Promise<void>((resolve) => this.#server.close(() => resolve()));
  }
}
