/**
 * novalet, the package entry: the core ({@link "./mod.ts"}: services, RPC, the contracts of
 * transports and registries) and the plug-in wiring ({@link "./open.ts"}: which transport or
 * registry a URL opens). One import gives the whole API.
 *
 * @example
 * ```ts
 * import { Manager, type RequestContext, serve, Service } from "novalet";
 *
 * class Calc extends Manager {
 *   add(_ctx: RequestContext, { a, b }: { a: number; b: number }) {
 *     return a + b;
 *   }
 * }
 * await serve(Service.create({ topic: "calc", manager: Calc })); // memory:// and sqljs::memory: by default
 * ```
 *
 * @module
 */

export * from "./mod.ts";
export * from "./open.ts";
