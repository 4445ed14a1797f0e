import { transportConformance } from "./transport_conformance.ts";
import { rpcSuite } from "./rpc_suite.ts";
import { mqttFixture, NO_SHARED, NO_V5 } from "./mqtt_fixture.ts";

transportConformance("mqtt", () => mqttFixture(), {
  group: NO_SHARED,
  groupAndPlain: NO_SHARED,
  mandatory: NO_V5,
});

rpcSuite("mqtt", () => mqttFixture(), { spread: NO_SHARED, undeliverable: NO_V5 });
