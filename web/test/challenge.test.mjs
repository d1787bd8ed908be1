// Challenges and the signed-out close, on the built bundle (node --test): the SDK's typed events
// for challenge messages in both encodings, and 4423 as a final close. The socket is a fake:
// the client is driven through its connection without a camera.
import { test } from "node:test";
import assert from "node:assert/strict";
import { encode } from "@msgpack/msgpack";
import { closeDecision, SUBPROTOCOLS, VigilClient } from "../dist/vigil-sdk.js";

/** Stands in for the browser's WebSocket: records what is sent and lets a test deliver. */
class FakeSocket {
  static OPEN = 1;
  static made = [];
  constructor(url, protocols) {
    this.url = url;
    this.protocols = protocols;
    this.protocol = protocols[0];
    this.readyState = FakeSocket.OPEN;
    this.sent = [];
    FakeSocket.made.push(this);
  }
  send(data) {
    this.sent.push(data);
  }
  close(code = 1000, reason = "") {
    this.readyState = 3;
    this.closedWith = { code, reason };
  }
  /** The edge closes the socket. */
  drop(code, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  deliver(msg) {
    this.onmessage?.({ data: this.protocol === SUBPROTOCOLS.json ? JSON.stringify(msg) : encode(msg).slice().buffer });
  }
}

/** A client connected to a fake socket, past its welcome, recording every event. */
function connected(encoding) {
  globalThis.WebSocket = FakeSocket;
  FakeSocket.made = [];
  const client = new VigilClient({ url: "ws://edge/v1/stream", clientId: "c1", token: "t", encoding, reconnect: { baseMs: 1, maxMs: 1 } });
  const events = [];
  for (const type of ["challenge", "challenge_progress", "challenge_result", "error", "state", "action"]) {
    client.on(type, (detail) => events.push({ type, detail }));
  }
  // `start()` needs a camera; the connection alone is what is tested here.
  client.connect();
  const ws = FakeSocket.made[0];
  ws.onopen();
  ws.deliver({ type: "welcome", session_id: "s", max_frame_bytes: 1 << 19, max_fps: 5, max_inflight: 2 });
  return { client, ws, events, of: (type) => events.filter((e) => e.type === type).map((e) => e.detail) };
}

const challenge = {
  type: "challenge",
  id: "0193c0de-0000-7000-8000-000000000001",
  steps: [{ kind: "turn_left" }, { kind: "turn_right" }],
  deadline_ms: 10_000,
  reason: "start",
};

test("4423 signed_out is final, like a block", () => {
  assert.equal(closeDecision(4423), "signed_out");
});

for (const encoding of ["json", "msgpack"]) {
  test(`challenge, progress and result arrive as typed events (${encoding})`, () => {
    const { client, ws, of } = connected(encoding);
    const before = Date.now();
    ws.deliver(challenge);
    ws.deliver({ type: "challenge_progress", id: challenge.id, done: 1 });
    ws.deliver({ type: "challenge_result", id: challenge.id, passed: false, reason: "timeout" });
    const [shown] = of("challenge");
    assert.equal(shown.id, challenge.id);
    assert.equal(shown.reason, "start");
    assert.deepEqual(shown.steps, challenge.steps);
    assert.equal(shown.deadline_ms, 10_000);
    // When the deadline runs out, on the page's clock, counted from the message's arrival.
    assert.ok(shown.expiresAt >= before + 10_000 && shown.expiresAt <= Date.now() + 10_000, `${shown.expiresAt}`);
    assert.deepEqual(of("challenge_progress"), [{ type: "challenge_progress", id: challenge.id, done: 1 }]);
    assert.deepEqual(of("challenge_result"), [{ type: "challenge_result", id: challenge.id, passed: false, reason: "timeout" }]);
    client.stop();
  });
}

test("a close with 4423 stops the client for good: no reconnect", async () => {
  const { client, ws, of } = connected("json");
  ws.deliver({ type: "error", code: "signed_out", message: "signed out: ask your proctor" });
  ws.drop(4423, "signed_out");
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(client.state, "signed_out");
  assert.equal(FakeSocket.made.length, 1, "it must not reconnect");
  const last = of("state").at(-1);
  assert.equal(last.state, "signed_out");
  assert.equal(last.code, 4423);
});

test("a signed_out error makes the close after it final, even when the 4423 was lost", async () => {
  const { client, ws } = connected("msgpack");
  ws.deliver({ type: "error", code: "signed_out", message: "signed out" });
  ws.drop(1006);
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(client.state, "signed_out");
  assert.equal(FakeSocket.made.length, 1, "it must not reconnect");
});

test("any other close is still retried", async () => {
  const { client, ws, of } = connected("json");
  ws.drop(1006);
  assert.equal(client.state, "reconnecting");
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(FakeSocket.made.length, 2, "it reconnects");
  assert.ok(of("state").some((s) => s.state === "reconnecting"));
  client.stop();
});
