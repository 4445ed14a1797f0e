#!/usr/bin/env bash
# novalet as a user gets it: `npm pack`, installed into a fresh project outside the repository.
# Type-checks strict NodeNext projects (TC39 and experimentalDecorators, no skipLibCheck), runs a
# plain .mjs program and a Deno program, and, with MQTT_URL and PG_URL set, `npx novalet serve`
# with `npx novalet call`, `cast --fanout` and `services list --json` from other processes.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
WORK=$(mktemp -d)
SERVE_PID=
cleanup() {
  if [ -n "$SERVE_PID" ]; then kill -KILL -- "-$SERVE_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf -- '--- consumer: %s\n' "$*"; }

step "npm pack"
TARBALL=$WORK/$(npm pack --silent --pack-destination "$WORK" | tail -1)
TS_VERSION=$(node -p 'require("./node_modules/typescript/package.json").version')

APP=$WORK/app
mkdir -p "$APP/src"
cd "$APP"
cat >package.json <<'EOF'
{ "name": "consumer", "private": true, "type": "module" }
EOF
step "npm install the tarball and typescript@$TS_VERSION"
npm install --no-audit --no-fund --silent "$TARBALL" "typescript@$TS_VERSION" "@types/node@^20"

cat >src/manager.ts <<'EOF'
import { Manager, periodicTask, type RequestContext, Service } from "novalet";
import { MqttTransport } from "novalet/transports/mqtt.ts";
import { MemoryTransport } from "novalet/transports/memory.ts";
import { openSqlRegistry } from "novalet/registry/sql.ts";

export class ShopManager extends Manager {
  ticks = 0;
  add(_ctx: RequestContext, { a, b }: { a: number; b: number }): number {
    return a + b;
  }
  @periodicTask({ spacing: 10 })
  tick(_ctx: RequestContext): void {
    this.ticks++;
  }
}

export const types: unknown[] = [Service, MqttTransport, MemoryTransport, openSqlRegistry];
EOF
tsconfig() {
  cat >tsconfig.json <<EOF
{
  "compilerOptions": {
    "target": "ES2022", "module": "${2:-nodenext}", "moduleResolution": "${3:-nodenext}", "strict": true,
    "exactOptionalPropertyTypes": true, "noUncheckedIndexedAccess": true, "noEmit": true,
    "types": ["node"]$1
  },
  "include": ["src"]
}
EOF
}
step "tsc: strict NodeNext project, TC39 decorators, no skipLibCheck"
tsconfig ""
npx tsc -p .
step "tsc: the same with experimentalDecorators"
tsconfig ', "experimentalDecorators": true'
npx tsc -p .
step "tsc: the same with module esnext, moduleResolution bundler"
tsconfig "" esnext bundler
npx tsc -p .
rm tsconfig.json

step "plain JavaScript (.mjs) on the memory transport"
cat >app.mjs <<'EOF'
import { Manager, periodicTask, listPeriodicTasks, RequestContext, Service } from "novalet";
import { MemoryHub, MemoryTransport } from "novalet/transports/memory.ts";
import { openSqlRegistry } from "novalet/registry/sql.ts";

class Shop extends Manager {
  add(_ctx, { a, b }) { return a + b; }
  tick(_ctx) {}
}
periodicTask({ spacing: 10 })(Shop.prototype, "tick");

const transport = new MemoryTransport(new MemoryHub());
const registry = await openSqlRegistry("sqljs::memory:");
const svc = Service.create({ host: "h1", topic: "shop", manager: Shop, transport, registry });
await svc.start();
const sum = await svc.rpc.call(new RequestContext(), "shop", { method: "add", args: { a: 2, b: 3 } });
const tasks = listPeriodicTasks(svc.manager).map((t) => t.name);
await svc.stop();
await transport.close();
await registry.close();
if (sum !== 5 || tasks.join() !== "tick") throw new Error(`unexpected ${sum} ${tasks}`);
console.log("ok", sum, tasks);
EOF
timeout 60 node app.mjs

step "signed envelopes: a key file from npx novalet keys new, a signed call taken, an unsigned one refused"
npx novalet keys new fleet --call=shop --serve=shop >fleet.json
cat >keys.mjs <<'EOF'
import { Manager, RequestContext, Rpc, RpcTimeoutError, Service } from "novalet";
import { SignedCodec } from "novalet/keys.ts";
import { MemoryHub, MemoryTransport } from "novalet/transports/memory.ts";
import { openSqlRegistry } from "novalet/registry/sql.ts";

class Shop extends Manager {
  add(_ctx, { a, b }) { return a + b; }
}
const transport = new MemoryTransport(new MemoryHub());
const registry = await openSqlRegistry("sqljs::memory:");
const codec = await SignedCodec.fromFile("fleet.json");
const svc = Service.create({ host: "h1", topic: "shop", manager: Shop, transport, registry, codec });
await svc.start();
const ctx = new RequestContext();
const signed = new Rpc(transport, { codec: await SignedCodec.fromFile("fleet.json") });
const unsigned = new Rpc(transport);
const sum = await signed.call(ctx, "shop", { method: "add", args: { a: 2, b: 3 } });
const refused = await unsigned.call(ctx, "shop", { method: "add", args: { a: 1, b: 1 } }, { timeout: 0.5 })
  .then(() => false, (e) => e instanceof RpcTimeoutError);
for (const c of [signed, unsigned]) await c.close();
await svc.stop();
await transport.close();
await registry.close();
if (sum !== 5 || !refused || codec.refused.unsigned !== 1) {
  throw new Error(`unexpected: sum ${sum}, unsigned refused ${refused}, counted ${JSON.stringify(codec.refused)}`);
}
console.log("ok", sum, "unsigned refused");
EOF
timeout 60 node keys.mjs

step "Deno against the installed package"
DENO=$REPO/node_modules/.bin/deno
cp app.mjs deno_app.ts
sed -i 's/add(_ctx, { a, b })/add(_ctx: unknown, { a, b }: { a: number; b: number })/; s/tick(_ctx)/tick(_ctx: unknown)/' deno_app.ts
NO_COLOR=1 timeout 120 "$DENO" run -A deno_app.ts
NO_COLOR=1 timeout 120 "$DENO" check deno_app.ts
NO_COLOR=1 timeout 120 "$DENO" run -A keys.mjs

if [ -n "${MQTT_URL:-}" ] && [ -n "${PG_URL:-}" ]; then
  step "npx novalet serve; npx novalet call, cast --fanout and services list --json from other processes"
  LOG=$WORK/serve.log
  # Its own process group: npx exits on SIGTERM without waiting for the node it started, so the
  # signal goes to the whole group, and the group must be gone afterwards.
  setsid npx novalet serve ./src/manager.ts#ShopManager --transport_url="$MQTT_URL" --registry_url="$PG_URL" \
    --host=consumer-$$ >"$LOG" 2>&1 &
  SERVE_PID=$!
  ok=
  for _ in $(seq 60); do
    if out=$(timeout 20 npx novalet call shop add '{"a":2,"b":3}' --transport_url="$MQTT_URL" \
      --registry_url="$PG_URL" --timeout=2 2>/dev/null) && [ "$(echo "$out" | tail -1)" = 5 ]; then
      ok=1
      break
    fi
    kill -0 "$SERVE_PID" 2>/dev/null || break
    sleep 0.5
  done
  # While it serves: a fanout cast reaches it, and the registry lists it up.
  fanout=
  listed=
  if [ -n "$ok" ]; then
    timeout 20 npx novalet cast shop add '{"a":1,"b":1}' --fanout --transport_url="$MQTT_URL" \
      --registry_url="$PG_URL" >/dev/null && fanout=1
    rows=$(timeout 20 npx novalet services list --json --host="consumer-$$" --registry_url="$PG_URL")
    node -e 'const r = JSON.parse(process.argv[1]); process.exit(r.length === 1 && r[0].topic === "shop" && r[0].state === "up" ? 0 : 1)' \
      "$rows" && listed=1
  fi
  kill -TERM -- "-$SERVE_PID"
  wait "$SERVE_PID" || true
  left=
  for _ in $(seq 60); do
    kill -0 -- "-$SERVE_PID" 2>/dev/null || break
    left=1
    sleep 0.5
  done
  if kill -0 -- "-$SERVE_PID" 2>/dev/null; then left=still; else left=; fi
  if [ -z "$ok" ] || [ -z "$fanout" ] || [ -z "$listed" ] || [ -n "$left" ]; then
    echo "FAILED: novalet serve (call ok: ${ok:-no}, cast --fanout ok: ${fanout:-no}, listed up: ${listed:-no}," \
      "serve still running after SIGTERM: ${left:-no})" >&2
    cat "$LOG" >&2
    exit 1
  fi
  SERVE_PID=
fi
echo "consumer: passed"
