// The candidate page's challenge and signed-out screens in real Chromium, against a fake edge:
// no Rust, no broker. dist/ is served from a local HTTP server and the page's WebSocket is
// answered by Playwright (`routeWebSocket`), which plays the edge's part of docs/protocol.md
// ("Challenges"): a welcome, an `ok` result per frame, then a scripted challenge, its progress,
// its result, a failed one with its lock and retry, and a signed_out close (4423).
//
//   npm run build && node e2e/fake-edge.mjs
//
// Environment (all optional): VIGIL_Y4M (a fake camera's footage; Chromium's test pattern
// without it), VIGIL_SHOTS (screenshots; ../target/browser). Prints one JSON line of what it
// checked and exits 0 when every check held.
import { launch } from "./chromium.mjs";
import { decode } from "@msgpack/msgpack";
import { createServer } from "node:http";
import { mkdirSync, readFileSync, statSync } from "node:fs";
import { extname, join, normalize } from "node:path";

const shots = process.env.VIGIL_SHOTS ?? new URL("../../target/browser", import.meta.url).pathname;
mkdirSync(shots, { recursive: true });
const dist = new URL("../dist", import.meta.url).pathname;
const types = { ".html": "text/html", ".js": "text/javascript", ".css": "text/css" };
const server = createServer((req, res) => {
  const path = normalize(new URL(req.url, "http://x").pathname).replace(/^\/+/, "");
  const file = join(dist, path.endsWith("/") || !path ? `${path}index.html` : path);
  if (!file.startsWith(dist) || !statSync(file, { throwIfNoEntry: false })?.isFile()) return res.writeHead(404).end();
  res.writeHead(200, { "content-type": types[extname(file)] ?? "application/octet-stream" }).end(readFileSync(file));
});
await new Promise((r) => server.listen(0, "127.0.0.1", r));
const origin = `http://127.0.0.1:${server.address().port}`;

const checks = {};
const check = (name, ok, seen) => {
  checks[name] = ok ? true : { failed: seen };
};
const browser = await launch(process.env.VIGIL_Y4M);
let edge;
let connections = 0;
try {
  const page = await (await browser.newContext({ viewport: { width: 1100, height: 700 } })).newPage();
  page.on("pageerror", (e) => check(`page error: ${e.message}`, false, String(e)));
  await page.routeWebSocket(/\/v1\/stream$/, (ws) => {
    connections += 1;
    edge = ws;
    ws.onMessage((data) => {
      const msg = typeof data === "string" ? JSON.parse(data) : decode(data);
      if (msg.type === "hello") {
        ws.send(JSON.stringify({ type: "welcome", session_id: "fake", max_frame_bytes: 1 << 20, max_fps: 5, max_inflight: 2 }));
      } else if (msg.type === "frame") {
        ws.send(JSON.stringify({ type: "result", seq: msg.seq, latency_ms: 1, frame_id: `f${msg.seq}`, analyzer: "fake", analysis: { kind: "identity", verdict: "ok" } }));
      }
    });
  });
  const send = (msg) => edge.send(JSON.stringify(msg));
  await page.goto(`${origin}/`);
  await page.getByTestId("client-id").fill("candidate");
  await page.getByTestId("token").fill("token");
  await page.getByTestId("start").click();
  await page.getByTestId("verdict").filter({ hasText: /^ok$/ }).waitFor({ timeout: 20_000 });

  const box = async (sel) => page.locator(sel).boundingBox();
  const challenge = page.getByTestId("challenge");
  const text = page.getByTestId("challenge-text");
  const seconds = async () => Number((await page.getByTestId("challenge-countdown").textContent()).replace(/\D/g, ""));
  const arrowSide = async () => {
    const cam = await box(".camera");
    const arrow = await box("[data-testid=challenge-arrow]");
    return arrow.x + arrow.width / 2 < cam.x + cam.width / 2 ? "left" : "right";
  };

  // The preview is a mirror.
  check("preview mirrored", (await page.locator("#preview").evaluate((v) => getComputedStyle(v).transform)) === "matrix(-1, 0, 0, 1, 0, 0)");

  // A challenge at session start: the first step, large, arrowed to the screen's left.
  const id = "0193c0de-0000-7000-8000-00000000c001";
  send({ type: "challenge", id, steps: [{ kind: "turn_left" }, { kind: "turn_right" }], deadline_ms: 10_000, reason: "start" });
  await challenge.waitFor({ state: "visible", timeout: 5000 });
  check("instruction left", (await text.textContent()) === "Turn your head to your left", await text.textContent());
  check("step 1 of 2", (await page.getByTestId("challenge-step").textContent()) === "Step 1 of 2");
  check("aria-live assertive", (await challenge.getAttribute("aria-live")) === "assertive");
  check("role alert", (await challenge.getAttribute("role")) === "alert");
  check("arrow on the left", (await arrowSide()) === "left");
  const fontPx = await text.evaluate((e) => parseFloat(getComputedStyle(e).fontSize));
  check("instruction is large (>= 24 px)", fontPx >= 24, fontPx);
  const first = await seconds();
  check("countdown starts at 10 s", first === 10, first);
  // What a screen reader gets: the instruction, never the countdown.
  const aria = await challenge.ariaSnapshot();
  check("countdown not in the accessibility tree", aria.includes("Turn your head to your left") && !/\b\d+ s\b/.test(aria), aria);
  await page.screenshot({ path: `${shots}/harness-challenge-left.png` });
  await page.waitForTimeout(1300);
  const later = await seconds();
  check("countdown runs", later < first, [first, later]);

  // Progress: the second step, arrowed to the right.
  send({ type: "challenge_progress", id, done: 1 });
  await text.filter({ hasText: "right" }).waitFor({ timeout: 2000 });
  check("step 2 of 2", (await page.getByTestId("challenge-step").textContent()) === "Step 2 of 2");
  check("arrow on the right", (await arrowSide()) === "right");
  await page.screenshot({ path: `${shots}/harness-challenge-right.png` });

  // Passed: "Thank you", then it goes away.
  send({ type: "challenge_result", id, passed: true, reason: "passed" });
  await text.filter({ hasText: "Thank you" }).waitFor({ timeout: 2000 });
  await page.screenshot({ path: `${shots}/harness-challenge-passed.png` });
  await challenge.waitFor({ state: "hidden", timeout: 4000 });
  check("hidden after a pass", true);

  // Failed: a clear message, then the lock and a retry over it.
  const id2 = "0193c0de-0000-7000-8000-00000000c002";
  send({ type: "challenge", id: id2, steps: [{ kind: "turn_right" }], deadline_ms: 3000, reason: "suspicion" });
  await text.filter({ hasText: "your right" }).waitFor({ timeout: 2000 });
  send({ type: "challenge_result", id: id2, passed: false, reason: "timeout" });
  await text.filter({ hasText: "Check not passed" }).waitFor({ timeout: 2000 });
  check("failure says why", (await page.locator("#challenge-then").textContent()) === "Time ran out.");
  await page.screenshot({ path: `${shots}/harness-challenge-failed.png` });
  send({ type: "action", action: "lock_screen", reason: "spoof", action_id: "a1", evidence_id: "e1" });
  const id3 = "0193c0de-0000-7000-8000-00000000c003";
  send({ type: "challenge", id: id3, steps: [{ kind: "turn_left" }, { kind: "turn_left" }], deadline_ms: 10_000, reason: "retry" });
  await text.filter({ hasText: "your left" }).waitFor({ timeout: 2000 });
  check("lock still shown under a retry", await page.getByTestId("lock").isVisible());
  await page.screenshot({ path: `${shots}/harness-challenge-retry-locked.png` });
  // The same challenge again (as after a reconnect): its progress stays, with the new deadline.
  send({ type: "challenge_progress", id: id3, done: 1 });
  await page.getByTestId("challenge-step").filter({ hasText: "Step 2 of 2" }).waitFor({ timeout: 2000 });
  send({ type: "challenge", id: id3, steps: [{ kind: "turn_left" }, { kind: "turn_left" }], deadline_ms: 4000, reason: "retry" });
  await page.waitForTimeout(300);
  check("same id keeps its progress", (await page.getByTestId("challenge-step").textContent()) === "Step 2 of 2");
  check("same id takes the new deadline", (await seconds()) <= 4, await seconds());
  // A stale progress for another challenge changes nothing.
  send({ type: "challenge_progress", id: "someone-else", done: 2 });
  await page.waitForTimeout(200);
  check("stale progress ignored", (await page.getByTestId("challenge-step").textContent()) === "Step 2 of 2");

  // Signed out: the error, the 4423 close, the signed-out screen, and no reconnect.
  send({ type: "challenge_result", id: id3, passed: false, reason: "timeout" });
  send({ type: "action", action: "lock_screen", reason: "spoof", action_id: "a2", evidence_id: "e2" });
  send({ type: "error", code: "signed_out", message: "signed out; an operator must re-admit this client" });
  await edge.close({ code: 4423, reason: "signed_out" });
  const out = page.getByTestId("signed-out");
  await out.waitFor({ state: "visible", timeout: 5000 });
  check("signed-out text", (await out.textContent()).includes("You were signed out. Ask your proctor to re-admit you."));
  check("state signed_out", (await page.getByTestId("status").getAttribute("data-state")) === "signed_out");
  check("challenge hidden when signed out", await challenge.isHidden());
  await page.screenshot({ path: `${shots}/harness-signed-out.png` });
  await page.waitForTimeout(2500);
  check("no reconnect after 4423", connections === 1, connections);

  // The console, against a fake admin API: the signed-out client is marked, re-admitted with a
  // button, a connected one challenged with another, and its audit trail shows new kinds as text.
  const op = await (await browser.newContext({ viewport: { width: 1300, height: 800 } })).newPage();
  op.on("pageerror", (e) => check(`console error: ${e.message}`, false, String(e)));
  const now = Date.now();
  const view = (id, status, connection) => ({ id, display_name: id, status, connection, edge: connection === "active" ? "e1" : null,
    connected_since_ms: connection === "active" ? now - 30_000 : null, enrolled: true, fps: 5, last_verdict: "ok", last_action: "allow" });
  const clients = { candidate: view("candidate", "signed_out", "deactivated"), other: view("other", "active", "active") };
  const posted = [];
  await op.route(/\/v1\/admin\//, async (route) => {
    const url = new URL(route.request().url());
    const m = url.pathname.match(/^\/v1\/admin\/clients\/([^/]+)\/(\w+)$/);
    if (route.request().method() === "POST" && m) {
      posted.push(`${m[1]}/${m[2]}`);
      if (m[2] === "readmit") clients[m[1]].status = "active";
      return m[2] === "challenge" ? route.fulfill({ status: 204 }) : route.fulfill({ json: clients[m[1]] });
    }
    if (url.pathname === "/v1/admin/clients") return route.fulfill({ json: Object.values(clients) });
    if (url.pathname.startsWith("/v1/admin/audit/clients/")) {
      return route.fulfill({ json: { verification: "intact: 3 entries", reference: null, entries: [
        { kind: "challenge", at_ms: now - 1000, id: "c1", reason: "challenge_failed", steps: ["turn_left"], passed: false },
        { kind: "action", at_ms: now - 2000, action: "sign_out", reason: "challenge_failed", origin: "policy", rule: "spoof", evidence: [] },
        { kind: "admin", at_ms: now - 3000, operator: "ops", operation: "challenge", source: "e1" },
      ] } });
    }
    return route.fulfill({ status: 404 });
  });
  await op.goto(`${origin}/console/`);
  await op.getByTestId("admin-token").fill("admin");
  await op.getByTestId("sign-in").click();
  await op.getByTestId("readmit-candidate").waitFor({ timeout: 5000 });
  check("signed_out status marked", (await op.getByTestId("status-candidate").getAttribute("class")) === "status-signed_out");
  check("no re-admit for an active client", (await op.getByTestId("readmit-other").count()) === 0);
  check("an offline client cannot be challenged", await op.getByTestId("challenge-candidate").isDisabled());
  await op.screenshot({ path: `${shots}/harness-console-signed-out.png` });
  await op.getByTestId("challenge-other").click();
  await op.getByTestId("readmit-candidate").click();
  await op.getByTestId("status-candidate").filter({ hasText: /^active$/ }).waitFor({ timeout: 5000 });
  check("buttons post", posted.join(" ") === "other/challenge candidate/readmit", posted);
  await op.getByTestId("audit-candidate").click();
  await op.getByTestId("audit-note").waitFor({ timeout: 5000 });
  const note = await op.getByTestId("audit-note").textContent();
  check("unknown audit kinds shown as text", note.includes("challenge (challenge_failed)") && note.includes("turn_left"), note);
  check("challenge actions shown", (await op.getByTestId("audit-action").textContent()).includes("sign_out (challenge_failed)"));
  await op.screenshot({ path: `${shots}/harness-console-audit.png`, fullPage: true });
} catch (e) {
  check("ran to the end", false, String(e));
} finally {
  await browser.close();
  server.close();
}
const failed = Object.entries(checks).filter(([, v]) => v !== true);
console.log(JSON.stringify({ ok: failed.length === 0, checks }));
process.exit(failed.length === 0 ? 0 : 1);
