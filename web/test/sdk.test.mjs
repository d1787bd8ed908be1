// The SDK's reconnection rules, on the built bundle (node --test).
import { test } from "node:test";
import assert from "node:assert/strict";
import { backoffMs, closeDecision, SUBPROTOCOLS } from "../dist/vigil-sdk.js";

test("final closes stop the client, and a newer session is never fought", () => {
  assert.equal(closeDecision(4409), "replaced");
  assert.equal(closeDecision(4403), "blocked");
  assert.equal(closeDecision(4401), "unauthorized");
  assert.equal(closeDecision(4000), "kicked");
  assert.equal(closeDecision(4400), "refused");
});

test("everything else is retried", () => {
  for (const code of [1001, 1006, 1011, 4408, 4410, 4429, 4503, 4001]) {
    assert.equal(closeDecision(code), "retry", `close ${code}`);
  }
});

test("backoff is full jitter under a growing, capped ceiling", () => {
  assert.equal(backoffMs(0, 500, 30_000, () => 0.999999), 499);
  assert.equal(backoffMs(3, 500, 30_000, () => 0.5), 2000);
  assert.equal(backoffMs(10, 500, 30_000, () => 0.999999), 29_999);
  assert.equal(backoffMs(1_000, 500, 30_000, () => 0.5), 15_000);
  assert.equal(backoffMs(5, 500, 30_000, () => 0), 0);
});

test("subprotocols name the two encodings", () => {
  assert.deepEqual(SUBPROTOCOLS, { msgpack: "vigil.v1.msgpack", json: "vigil.v1.json" });
});
