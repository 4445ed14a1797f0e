#!/usr/bin/env node
// The `novalet` command after `npm install`: load tsx so Node runs the TypeScript CLI as is.
import process from "node:process";
import { register } from "tsx/esm/api";

register();
const { main } = await import("../cli.ts");
process.exitCode = await main(process.argv.slice(2));
