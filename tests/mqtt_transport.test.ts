import { transportConformance } from "./transport_conformance.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { BIG_STALLS, mqttFixture, NO_SHARED, NO_V5 } from "./mqtt_fixture.ts";

transportConformance("mqtt", () => mqttFixture(), {
  group: NO_SHARED,
  groupAndPlain: NO_SHARED,
  mandatory: NO_V5,
  bytes: BIG_STALLS,
});

// Deno + aedes cannot carry 1 MiB (see BIG_STALLS): the huge inputs are 200 KB there.
rpcSuite("mqtt", () => mqttFixture(), { spread: NO_SHARED, undeliverable: NO_V5 }, BIG_STALLS ? 200_000 : undefined);
