/**
 * The `novalet` command: serve managers, call and cast to services, and administer the
 * registry as `openstack compute service` does.
 *
 * Run: `npx novalet --help`, or `deno run -A cli.ts --help`.
 *
 * @module
 */

import { existsSync, readFileSync } from "node:fs";
import process from "node:process";
import {
  type Flags,
  liveness,
  loadManager,
  NovaletError,
  openRegistry,
  openTransport,
  parseFlags,
  type Presence,
  readPresence,
  redactUrl,
  type Registry,
  RemoteError,
  RequestContext,
  Rpc,
  serve,
  Service,
  type ServiceRecord,
  UsageError,
} from "./index.ts";
import { adminTopic, createConductor } from "./registry/conductor.ts";
import { generateKey, type KeyEntry, publicPart, readKeys, SignedCodec } from "./keys.ts";

/** Each command's usage lines and what it does: `novalet help COMMAND` prints one. */
const COMMANDS: Record<string, { usage: string; about: string }> = {
  serve: {
    usage: "  novalet serve SPEC... [--topic=T] [flags]       run managers; SPEC is ./path.ts#ClassName",
    about: `serve takes the topic from --topic or the class name (ComputeManager -> compute), and the
binary "nova-TOPIC". On the default memory:// transport only this process can reach it: use
--transport_url=mqtt://... to serve other processes. A sqljs:PATH registry file is created.`,
  },
  call: {
    usage: "  novalet call ADDRESS METHOD [JSON] [--timeout=S] [flags]",
    about: `Prints the result as JSON. A remote error prints its type, message and data on stderr, exit 1.
ADDRESS is a topic ("compute") or topic.host ("compute.node1"); JSON is the args object.`,
  },
  cast: {
    usage: "  novalet cast ADDRESS METHOD [JSON] [--fanout] [flags]",
    about: `Sends without waiting for a result. --fanout sends to every server of topic ADDRESS (a topic,
no ".host"). ADDRESS is a topic ("compute") or topic.host ("compute.node1"); JSON is the args object.`,
  },
  conductor: {
    usage: "  novalet conductor [--topic=conductor] [flags]     serve the registry over the transport",
    about: `Serves the registry at --registry_url (sqljs:PATH, sqljs::memory:, postgres://...) to other
processes over --transport_url, on topic "conductor": they use --registry_url=conductor: (or
conductor:TOPIC) and need no database. The admin operations (enable, disable, force-down,
delete) are served on "conductor_admin", for admin contexts only: confine who may publish there
with the broker's ACL. It registers itself like any service (nova-conductor, nova-conductor-admin).`,
  },
  keys: {
    usage: `  novalet keys new ID [--type=hmac|ed25519] [--call=T,..] [--serve=T,..] [--roles=R,..]
  novalet keys public FILE
  novalet keys join FILE... [--sign=ID]`,
    about: `"keys new" prints a key file (JSON) that signs with a new key: an hmac shared secret (the
default) or an ed25519 key pair. --call/--serve name the topics its holder may call and answer
for (default *), --roles the roles it may assert (admin for an operator; default none). "keys
public FILE" prints FILE's ed25519 keys without their private parts (hmac keys, shared secrets,
are left out): what others add to their key files to trust its holder. "keys join" prints one
key file of the keys of several (signing with --sign, else the first file's). Every command takes
--keys=FILE (NOVALET_KEYS): sign what it sends, refuse what is unsigned (docs/keys.md).`,
  },
  services: {
    usage: `  novalet services list [--topic=T] [--host=H] [--binary=B] [--json] [flags]
  novalet services enable ID [--json] [flags]
  novalet services disable ID [--reason=TEXT] [--json] [flags]
  novalet services force-down ID [--unset] [--json] [flags]
  novalet services delete ID [flags]`,
    about: `Reads and edits the registry at --registry_url, as "openstack compute service" does. A
sqljs:PATH file must exist (novalet serve creates it). With an MQTT --transport_url, "list" also
reads the services' presence from the broker: a killed service is down ("lost") at once, a
stopped one "stopped"; else a row is down ("stale") after its own service_down_time.`,
  },
};

const FLAGS = `Flags (also NOVALET_<NAME> in the environment):
  --transport_url=memory://|mqtt://user:pass@host:1883   --registry_url=sqljs::memory:|sqljs:PATH|postgres://...|conductor:
  --prefix=novalet  --host=NAME  --report_interval=10  --periodic_interval=60  --periodic_fuzzy_delay=60
  --service_down_time=60  --rpc_response_timeout=60  --graceful_shutdown_timeout=60
  --max_running_handlers=64  --max_queued_handlers=1000  --max_held_bytes=33554432
  --log_format=text|json  --log_level=info  --debug  --keys=FILE (sign and verify envelopes)

Exit status: 0 done, 1 the operation failed, 2 bad arguments.`;

const USAGE = `novalet — run and operate novalet services

Usage:
${Object.values(COMMANDS).map((c) => c.usage).join("\n")}
  novalet help COMMAND | novalet COMMAND --help   one command's usage
  novalet --version

ADDRESS is a topic ("compute") or topic.host ("compute.node1"); JSON is the args object.
serve takes the topic from --topic or the class name (ComputeManager -> compute), and the
binary "nova-TOPIC".

${FLAGS}`;

/** The usage of one command. */
function commandUsage(command: string): string {
  const c = COMMANDS[command]!;
  return `Usage:\n${c.usage}\n\n${c.about}\n\n${FLAGS}`;
}

/** The package's version, from the package.json next to this file (or one level up, in dist/). */
function version(): string {
  for (const path of ["./package.json", "../package.json"]) {
    try {
      const pkg = JSON.parse(readFileSync(new URL(path, import.meta.url), "utf8"));
      if (pkg.name === "novalet" && typeof pkg.version === "string") return pkg.version;
    } catch { /* not there: the next place */ }
  }
  throw new NovaletError(`Cannot read the version: no package.json of novalet next to ${import.meta.url}`);
}

/** Take the named CLI options (`--json`, `--reason=x`) out of argv; the rest are flags. */
function options(argv: string[], names: string[]): { opts: Record<string, string>; rest: string[] } {
  const opts: Record<string, string> = {};
  const rest: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const m = /^--([a-z-]+)(?:=(.*))?$/s.exec(argv[i]!);
    if (m && names.includes(m[1]!)) opts[m[1]!] = m[2] ?? "";
    else rest.push(argv[i]!);
  }
  return { opts, rest };
}

/** Split positional arguments from `--flags`. */
function positional(argv: string[]): { args: string[]; flagArgs: string[] } {
  const args: string[] = [];
  const flagArgs: string[] = [];
  for (const a of argv) (a.startsWith("--") ? flagArgs : args).push(a);
  return { args, flagArgs };
}

function flagsFrom(flagArgs: string[]): Flags {
  try {
    return parseFlags(flagArgs, process.env);
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
}

/** Print one key file of the keys of `files` (the same key listed twice must be the same), signing
 * with `sign` (default: the first file's). */
async function joinKeys(files: string[], sign: string | undefined): Promise<number> {
  const keys = new Map<string, KeyEntry>();
  let first: string | undefined;
  for (const file of files) {
    const config = await readKeys(file);
    new SignedCodec(config, { file }); // checks every key
    first ??= config.sign;
    for (const k of config.keys) {
      const had = keys.get(k.id);
      const same = (a: KeyEntry) => JSON.stringify([a.type, a.secret, a.public, a.call, a.serve, a.roles]);
      if (had && same(had) !== same(k)) {
        throw new UsageError(`Key ${JSON.stringify(k.id)} differs between the files: rename one`);
      }
      if (!had || (k.private && !had.private)) keys.set(k.id, k);
    }
  }
  const config = { sign: sign ?? first, keys: [...keys.values()] };
  try {
    new SignedCodec(config); // the signing key is among them, with its private part
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  console.log(JSON.stringify(config, null, 2));
  return 0;
}

/** The signing codec of --keys, if given. */
async function codecOf(flags: Flags): Promise<SignedCodec | undefined> {
  return flags.keys ? await SignedCodec.fromFile(flags.keys, { prefix: flags.prefix }) : undefined;
}

async function keysCommand(argv: string[]): Promise<number> {
  const { opts, rest } = options(argv, ["type", "call", "serve", "roles", "sign"]);
  const [action, arg, ...extra] = rest;
  if (action === "join" && arg !== undefined) return await joinKeys([arg, ...extra], opts.sign);
  if (extra.length || arg === undefined || (action !== "new" && action !== "public")) {
    throw new UsageError(`"keys" needs "new ID", "public FILE" or "join FILE..."`);
  }
  if (action === "public") {
    const config = await readKeys(arg);
    new SignedCodec(config, { file: arg }); // checks every key
    // A shared secret is handed over in private, never printed as "the public part".
    for (const k of config.keys) {
      if (k.type === "hmac") console.error(`novalet: left out hmac key ${JSON.stringify(k.id)}: it is a shared secret`);
    }
    console.log(JSON.stringify({ keys: config.keys.filter((k) => k.type !== "hmac").map(publicPart) }, null, 2));
    return 0;
  }
  const type = opts.type ?? "hmac";
  if (type !== "hmac" && type !== "ed25519") {
    throw new UsageError(`Invalid --type=${JSON.stringify(type)}: hmac or ed25519`);
  }
  const names = (v: string | undefined) => v === undefined ? undefined : v.split(",").filter((x) => x !== "");
  try {
    const key = generateKey(arg, type, { call: names(opts.call), serve: names(opts.serve), roles: names(opts.roles) });
    console.log(JSON.stringify({ sign: arg, keys: [key] }, null, 2));
  } catch (e) {
    throw new UsageError((e as Error).message);
  }
  return 0;
}

function parseArgs(json: string | undefined): Record<string, unknown> {
  if (json === undefined) return {};
  let v: unknown;
  try {
    v = JSON.parse(json);
  } catch (e) {
    throw new UsageError(`Invalid JSON args ${JSON.stringify(json)}: ${(e as Error).message}`);
  }
  if (v === null || typeof v !== "object" || Array.isArray(v)) {
    throw new UsageError(`Invalid JSON args ${JSON.stringify(json)}: must be an object like '{"name":"vm1"}'`);
  }
  return v as Record<string, unknown>;
}

/** A table as `openstack ... list` prints it. */
function table(headers: string[], rows: string[][]): string {
  const widths = headers.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = "+" + widths.map((w) => "-".repeat(w + 2)).join("+") + "+";
  const fmt = (cells: string[]) => "| " + cells.map((c, i) => c.padEnd(widths[i]!)).join(" | ") + " |";
  return [line, fmt(headers), line, ...rows.map(fmt), line].join("\n");
}

function serviceRows(
  records: ServiceRecord[],
  flags: Flags,
  json: boolean,
  presence = new Map<string, Presence>(),
): string {
  const view = records.map((r) => ({
    ...r,
    status: r.disabled ? "disabled" : "enabled",
    ...liveness(r, { serviceDownTime: flags.serviceDownTime, presence: presence.get(`${r.topic}.${r.host}`) }),
  }));
  if (json) return JSON.stringify(view, null, 2);
  return table(
    ["ID", "Binary", "Host", "Topic", "Status", "State", "Updated At", "Disabled Reason"],
    view.map((r) => [
      String(r.id),
      r.binary,
      r.host,
      r.topic,
      r.status,
      r.reason ? `${r.state} (${r.reason})` : r.state,
      r.updatedAt.toISOString(),
      r.disabledReason ?? "-",
    ]),
  );
}

/** The presence the broker of --transport_url keeps; none on memory://, or when it cannot be read
 * (said on stderr: the heartbeats alone decide then). */
async function presenceOf(flags: Flags): Promise<Map<string, Presence>> {
  if (flags.transportUrl.startsWith("memory:")) return new Map();
  try {
    const transport = await openTransport(flags.transportUrl);
    try {
      return await readPresence(transport, flags.prefix);
    } finally {
      await transport.close();
    }
  } catch (e) {
    console.error(
      `novalet: Cannot read presence from the broker (${(e as Error).message}): judging by heartbeats alone`,
    );
    return new Map();
  }
}

function parseId(s: string | undefined): number {
  const id = Number(s);
  if (s === undefined || !Number.isSafeInteger(id) || id <= 0) {
    throw new UsageError(`Invalid service ID ${JSON.stringify(s ?? "")}: must be a positive integer`);
  }
  return id;
}

async function services(argv: string[]): Promise<number> {
  const { opts, rest } = options(argv, ["json", "reason", "unset", "topic", "binary", "host"]);
  const { args, flagArgs } = positional(rest);
  const [action, idText, ...extra] = args;
  if (!action || !["list", "enable", "disable", "force-down", "delete"].includes(action)) {
    throw new UsageError(`Unknown services action ${JSON.stringify(action ?? "")}`);
  }
  if (extra.length || (action === "list" ? idText !== undefined : idText === undefined)) {
    throw new UsageError(`Wrong arguments for "services ${action}"`);
  }
  const flags = flagsFrom(flagArgs);
  // Opening a sqljs file that is not there would create an empty registry: a typo in the path
  // would list no services, and edits would go to a new file nobody serves from.
  const file = /^sqljs:(?!:memory:$)(.+)$/s.exec(flags.registryUrl)?.[1];
  if (file !== undefined && !existsSync(file)) {
    console.error(
      `novalet: Cannot open the registry ${JSON.stringify(file)}: the file does not exist (novalet serve creates it)`,
    );
    return 1;
  }
  // A conductor is reached over the transport; other registries are opened directly.
  const codec = await codecOf(flags);
  const transport = flags.registryUrl.startsWith("conductor:") ? await openTransport(flags.transportUrl) : undefined;
  let registry: Registry;
  try {
    registry = await openRegistry(flags.registryUrl, { transport, prefix: flags.prefix, codec });
  } catch (e) {
    await transport?.close();
    throw e;
  }
  const json = "json" in opts;
  try {
    if (action === "list") {
      const filter = { topic: opts.topic, host: opts.host, binary: opts.binary };
      const [rows, presence] = await Promise.all([registry.list(filter), presenceOf(flags)]);
      console.log(serviceRows(rows, flags, json, presence));
      return 0;
    }
    const id = parseId(idText);
    if (action === "delete") {
      await registry.remove(id);
      console.log(`Deleted service ${id}`);
      return 0;
    }
    const row = action === "enable"
      ? await registry.setDisabled(id, false)
      : action === "disable"
      ? await registry.setDisabled(id, true, opts.reason)
      : await registry.setForcedDown(id, !("unset" in opts));
    console.log(serviceRows([row], flags, json));
    return 0;
  } finally {
    await registry.close();
    await transport?.close();
  }
}

async function callOrCast(kind: "call" | "cast", argv: string[]): Promise<number> {
  const { opts, rest } = options(argv, ["timeout", "fanout"]);
  const { args, flagArgs } = positional(rest);
  const [address, method, json, ...extra] = args;
  if (!address || !method || extra.length) throw new UsageError(`"${kind}" needs ADDRESS METHOD [JSON]`);
  const fanout = "fanout" in opts;
  if (fanout && kind === "call") throw new UsageError(`--fanout works with "cast" only: a call waits for one reply`);
  if (fanout && address.includes(".")) {
    throw new UsageError(`--fanout sends to every server of a topic: ${JSON.stringify(address)} names a host`);
  }
  const flags = flagsFrom(flagArgs);
  const timeout = opts.timeout === undefined ? flags.rpcResponseTimeout : Number(opts.timeout);
  if (!(timeout > 0)) throw new UsageError(`Invalid --timeout=${JSON.stringify(opts.timeout)}: must be seconds > 0`);
  const msg = { method, args: parseArgs(json) };
  const codec = await codecOf(flags);
  const transport = await openTransport(flags.transportUrl);
  const rpc = new Rpc(transport, { prefix: flags.prefix, timeout, codec });
  // An admin context, unless the key signing it may not claim one (a device's or a service's).
  const roles = codec?.signerRoles;
  const admin = !roles || roles.includes("admin") || roles.includes("*");
  const ctx = admin ? RequestContext.admin({ userId: "novalet-cli" }) : new RequestContext({ userId: "novalet-cli" });
  try {
    if (kind === "call") console.log(JSON.stringify(await rpc.call(ctx, address, msg), null, 2));
    else if (fanout) await rpc.fanoutCast(ctx, address, msg, { timeout });
    else await rpc.cast(ctx, address, msg, { timeout });
    return 0;
  } catch (e) {
    if (e instanceof TypeError) throw new UsageError(e.message);
    const err = e as Error;
    const what = e instanceof RemoteError ? `${e.type}: ${e.message}` : `${err.name}: ${err.message}`;
    const hint = flags.transportUrl.startsWith("memory:")
      ? " (the memory transport only reaches services in this process: use --transport_url=mqtt://...)"
      : "";
    console.error(`novalet ${kind} ${address} ${method} failed: ${what}${hint}`);
    if (e instanceof RemoteError && e.data !== undefined) console.error(`data: ${JSON.stringify(e.data)}`);
    return 1;
  } finally {
    await rpc.close();
    await transport.close();
  }
}

async function serveCommand(argv: string[]): Promise<number> {
  const { opts, rest } = options(argv, ["topic"]);
  const { args: specs, flagArgs } = positional(rest);
  if (specs.length === 0) throw new UsageError(`"serve" needs at least one SPEC (./path.ts#ClassName)`);
  if (opts.topic !== undefined && specs.length > 1) throw new UsageError("--topic works with one SPEC only");
  const flags = flagsFrom(flagArgs);
  const list: Service[] = [];
  for (const spec of specs) {
    const manager = await loadManager(spec).catch((e) => {
      throw new UsageError((e as Error).message);
    });
    const topic = opts.topic ?? (manager.name.replace(/Manager$/, "").toLowerCase() || "service");
    list.push(Service.create({ manager, topic, binary: `nova-${topic}`, flags }));
  }
  if (flags.transportUrl.startsWith("memory:")) {
    list[0]!.logger.warn(
      "Serving on the memory:// transport: only this process can reach these services " +
        "(use --transport_url=mqtt://HOST:1883 to serve other processes)",
    );
  }
  const launcher = await serve(...list);
  for (const s of list) s.logger.info(`Serving ${s.topic}.${s.host} (${s.dispatcher?.methods.join(", ")})`);
  return await launcher.done;
}

async function conductorCommand(argv: string[]): Promise<number> {
  const { opts, rest } = options(argv, ["topic"]);
  const { args, flagArgs } = positional(rest);
  if (args.length > 0) throw new UsageError(`"conductor" takes no arguments, only flags`);
  const flags = flagsFrom(flagArgs);
  if (flags.registryUrl.startsWith("conductor:")) {
    throw new UsageError("A conductor serves a registry of its own: --registry_url=sqljs:PATH or postgres://...");
  }
  const topic = opts.topic ?? "conductor";
  const registry = await openRegistry(flags.registryUrl, { prefix: flags.prefix });
  let pair;
  try {
    pair = createConductor({ registry, topic, flags });
  } catch (e) {
    await registry.close();
    throw e instanceof TypeError ? new UsageError(e.message) : e;
  }
  if (flags.transportUrl.startsWith("memory:")) {
    pair[0].logger.warn(
      "Serving the registry on the memory:// transport: only this process can reach it " +
        "(use --transport_url=mqtt://HOST:1883 to serve other processes)",
    );
  }
  try {
    // exit: false, so that the registry is closed below (a sqljs: file's lock released) before the exit.
    const launcher = await serve(...pair, { exit: false });
    pair[0].logger.info(
      `Serving the registry ${redactUrl(flags.registryUrl)} on ${topic}, admin on ${adminTopic(topic)}`,
    );
    return await launcher.done;
  } finally {
    await registry.close();
  }
}

/**
 * Run the CLI with `argv` (without the program name). Resolves with the exit status: 0 done,
 * 1 the operation failed, 2 bad arguments (the message, on stderr, names the `--help` to read).
 * Never rejects: errors are printed. `serve` resolves only once its services have stopped.
 */
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    if (command === undefined) throw new UsageError("No command given");
    if (command === "--help" || command === "-h" || (command === "help" && rest.length === 0)) {
      console.log(USAGE);
      return 0;
    }
    if (command === "--version" || command === "-V") {
      console.log(version());
      return 0;
    }
    if (command === "help") {
      if (rest.length > 1 || !Object.hasOwn(COMMANDS, rest[0]!)) {
        throw new UsageError(`Unknown command ${JSON.stringify(rest.join(" "))} for help`);
      }
      console.log(commandUsage(rest[0]!));
      return 0;
    }
    if (!Object.hasOwn(COMMANDS, command)) throw new UsageError(`Unknown command ${JSON.stringify(command)}`);
    if (rest.includes("--help") || rest.includes("-h")) {
      console.log(commandUsage(command));
      return 0;
    }
    try {
      if (command === "serve") return await serveCommand(rest);
      if (command === "conductor") return await conductorCommand(rest);
      if (command === "call" || command === "cast") return await callOrCast(command, rest);
      if (command === "keys") return await keysCommand(rest);
      return await services(rest);
    } catch (e) {
      if (e instanceof UsageError) e.command ??= command;
      throw e;
    }
  } catch (e) {
    if (e instanceof UsageError) {
      const help = e.command === undefined ? "novalet --help" : `novalet ${e.command} --help`;
      console.error(`novalet: ${e.message} (see ${help})`);
      return 2;
    }
    console.error(`novalet: ${(e as Error).message}`);
    return 1;
  }
}

// Run when started as a program (Deno sets import.meta.main; under Node look at the script).
if ((import.meta as { main?: boolean }).main ?? process.argv[1]?.endsWith("cli.ts")) {
  process.exitCode = await main(process.argv.slice(2));
}
