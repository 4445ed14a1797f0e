/**
 * Plug-in wiring: which transport or registry a URL opens. The scheme table is written once,
 * here; each plug-in is imported on first use, so a program that never uses MQTT never loads
 * `mqtt`. Importing this module installs it as the core's {@link Opener} (the package entry
 * does), which is how `Service` and `parseFlags()` reach it without the core importing a plug-in.
 *
 * @example A transport of your own for a new scheme
 * ```ts
 * import { registerScheme } from "./open.ts";
 * import { MemoryHub, MemoryTransport } from "./transports/memory.ts";
 *
 * const hub = new MemoryHub();
 * registerScheme("loop:", { kind: "transport", example: "loop://", open: () => Promise.resolve(new MemoryTransport(hub)) });
 * // now --transport_url=loop:// works everywhere a transport URL is accepted
 * ```
 *
 * @module
 */

import {
  type Codec,
  installOpener,
  type Logger,
  type Opener,
  quote,
  redactUrl,
  type Registry,
  type RegistryOpenOptions,
  type Transport,
  type TransportOpenOptions,
} from "./mod.ts";

/** A scheme that opens a transport. */
export interface TransportScheme {
  /** What the scheme opens. */
  kind: "transport";
  /** How the scheme is written in messages, e.g. `mqtt://`. */
  example: string;
  /** The URL names a host (`scheme://host:port`), checked before anything is opened. */
  network?: boolean;
  /** Open it; the URL has passed the checks above. */
  open(url: string, opts: TransportOpenOptions): Promise<Transport>;
}

/** A scheme that opens a registry. */
export interface RegistryScheme {
  /** What the scheme opens. */
  kind: "registry";
  /** How the scheme is written in messages, e.g. `sqljs:`. */
  example: string;
  /** The URL must parse as a URL (its host may be empty, as PostgreSQL's local socket). */
  network?: boolean;
  /** Open it; the URL has passed the checks above. */
  open(url: string, opts: RegistryOpenOptions): Promise<Registry>;
}

/** A scheme's plug-in: a transport or a registry. */
export type Scheme = TransportScheme | RegistryScheme;

const mqtt: TransportScheme = {
  kind: "transport",
  example: "mqtt://",
  network: true,
  open: async (url, opts) => {
    const { MqttTransport } = await import("./transports/mqtt.ts");
    return await MqttTransport.connect({
      url,
      logger: opts.logger,
      sessionClientId: opts.sessionClientId,
      will: opts.will,
    });
  },
};
const sql = (example: string, network: boolean): RegistryScheme => ({
  kind: "registry",
  example,
  network,
  open: async (url) => (await import("./registry/sql.ts")).openSqlRegistry(url),
});

/** The schemes, by their name with its colon (`mqtt:`). */
const schemes = new Map<string, Scheme>([
  ["memory:", {
    kind: "transport",
    example: "memory://",
    open: async () => {
      const { defaultHub, MemoryTransport } = await import("./transports/memory.ts");
      return new MemoryTransport(defaultHub);
    },
  }],
  ["mqtt:", mqtt],
  ["mqtts:", { ...mqtt, example: "mqtts://" }],
  ["tcp:", { ...mqtt, example: "tcp://" }],
  ["ssl:", { ...mqtt, example: "ssl://" }],
  ["ws:", { ...mqtt, example: "ws://" }],
  ["wss:", { ...mqtt, example: "wss://" }],
  ["sqljs:", sql("sqljs:", false)],
  ["postgres:", sql("postgres://", true)],
  ["postgresql:", sql("postgresql://", true)],
  ["conductor:", {
    kind: "registry",
    example: "conductor:",
    open: async (url, opts) => {
      if (!opts.transport) {
        throw new TypeError(`Cannot open ${quote(url)}: a conductor is reached over a transport, and none was given`);
      }
      const { ConductorRegistry } = await import("./registry/conductor.ts");
      const topic = url.slice("conductor:".length) || undefined;
      return new ConductorRegistry(opts.transport, { topic, prefix: opts.prefix, codec: opts.codec });
    },
  }],
]);

/**
 * Make `scheme` (its name and colon: `"loop:"`) open `plugin`, replacing what it opened before.
 * @throws {TypeError} for a name that is not a URL scheme.
 */
export function registerScheme(scheme: string, plugin: Scheme): void {
  if (typeof scheme !== "string" || !/^[a-z][a-z0-9+.-]*:$/.test(scheme)) {
    throw new TypeError(`Invalid scheme ${quote(scheme)}: must look like "name:" (lowercase)`);
  }
  if (plugin?.kind !== "transport" && plugin?.kind !== "registry") {
    throw new TypeError(`Invalid plug-in for ${quote(scheme)}: "kind" must be "transport" or "registry"`);
  }
  schemes.set(scheme, plugin);
}

/** Why `url` opens no `kind` that is registered, in words; undefined when it does. A URL must
 * start with its scheme's `example` (`mqtt://`, `sqljs:`), as its plug-in reads it. */
export function urlProblem(kind: Scheme["kind"], url: string): string | undefined {
  const scheme = typeof url === "string" ? schemes.get(url.slice(0, url.indexOf(":") + 1)) : undefined;
  if (scheme?.kind !== kind || !url.startsWith(scheme.example)) {
    const known = [...schemes.values()].filter((s) => s.kind === kind).map((s) => s.example);
    return `must start with ${known.join(", ")}`;
  }
  if (!scheme.network) return undefined;
  // A network address must parse and name its host: "mqtt://" alone would mean localhost silently.
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    return "not a valid URL (check the host and the port)";
  }
  // (postgres:///db is PostgreSQL's local socket: a registry needs no host.)
  if (u.hostname === "" && kind === "transport") return `names no host (e.g. ${scheme.example}host:port)`;
  return undefined;
}

function lookup<K extends Scheme["kind"]>(kind: K, url: string): Extract<Scheme, { kind: K }> {
  const problem = urlProblem(kind, url);
  if (problem !== undefined) {
    throw new TypeError(`Unsupported ${kind} URL ${quote(typeof url === "string" ? redactUrl(url) : url)}: ${problem}`);
  }
  return schemes.get(url.slice(0, url.indexOf(":") + 1)) as Extract<Scheme, { kind: K }>;
}

/**
 * Open the transport of a URL: `memory://` (the process's default hub), `mqtt://host:1883`,
 * `mqtts://...`, or a scheme registered with {@link registerScheme}.
 * @throws {TypeError} for a URL no scheme opens; what the plug-in throws when it cannot open it.
 */
export function openTransport(url: string, opts: TransportOpenOptions = {}): Promise<Transport> {
  try {
    return lookup("transport", url).open(url, opts);
  } catch (e) {
    return Promise.reject(e);
  }
}

/**
 * Open the registry of a URL: `sqljs::memory:`, `sqljs:PATH`, `postgres://...`, or a scheme
 * registered with {@link registerScheme}.
 * @throws {TypeError} for a URL no scheme opens; what the plug-in throws when it cannot open it.
 */
export function openRegistry(url: string, opts: RegistryOpenOptions = {}): Promise<Registry> {
  try {
    return lookup("registry", url).open(url, opts);
  } catch (e) {
    return Promise.reject(e);
  }
}

/** The signing codec of a key file (`--keys=FILE`): see keys.ts. */
export async function openCodec(path: string, opts: { prefix?: string; logger?: Logger } = {}): Promise<Codec> {
  const { SignedCodec } = await import("./keys.ts");
  return SignedCodec.fromFile(path, opts);
}

/** The opener this module installs in the core. */
export const opener: Opener = { openTransport, openRegistry, urlProblem, openCodec };
installOpener(opener);
