// Drive the candidate page in real Chromium with a fake camera made from real footage, as a
// candidate would use it. One scenario per run; prints one JSON line of what the page showed
// and exits 0 when the page showed what the scenario expects.
//
//   node e2e/candidate.mjs ok|locked|blocked|console|challenge|signed_out
//
// `challenge` waits for the liveness challenge every session starts with and reports what the
// page showed of it (instruction, step, countdown, arrow, live-region attributes).
// `signed_out` waits until the edge signs the candidate out (a stranger fails the challenge and
// its retry), then has an operator re-admit them from the console.
// `console` also opens the operator console (VIGIL_ADMIN/console/): it signs in, waits for the
// candidate's live session, opens the audit view until the lock's evidence frames show beside
// the reference, then blocks the candidate, and the candidate page must show it.
// With VIGIL_SESSION_TOKEN the page is opened as an exam platform opens it, the short-lived token
// in its fragment (`#client=...&token=...`), and the report says whether the page took it.
// Environment: VIGIL_PAGE (the edge's page URL), VIGIL_CLIENT, VIGIL_TOKEN, VIGIL_Y4M (the fake
// camera's footage), VIGIL_SHOTS (a folder for screenshots), and for `blocked` VIGIL_ADMIN (the
// admin API's URL) and VIGIL_ADMIN_TOKEN.
import { launch } from "./chromium.mjs";
import { mkdirSync } from "node:fs";

const scenario = process.argv[2];
const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const shots = env("VIGIL_SHOTS");
mkdirSync(shots, { recursive: true });
const TIMEOUT = Number(process.env.VIGIL_E2E_TIMEOUT_MS ?? 90_000);

const browser = await launch(env("VIGIL_Y4M"));
const seen = { scenario, verdicts: [], actions: [], states: [], challenges: [] };
let ok = false;
let operator;
try {
  const context = await browser.newContext({ viewport: { width: 1100, height: 700 } });
  const page = await context.newPage();
  page.on("console", (m) => {
    if (m.type() === "error") seen.console = [...(seen.console ?? []), m.text()];
  });
  const session = process.env.VIGIL_SESSION_TOKEN;
  if (session) {
    // As an exam platform opens it: a session token in the fragment, never the permanent one.
    const client = encodeURIComponent(env("VIGIL_CLIENT"));
    await page.goto(`${env("VIGIL_PAGE")}#client=${client}&token=${encodeURIComponent(session)}`);
    seen.token_from_fragment = (await page.getByTestId("token").inputValue()) === session
      && (await page.getByTestId("client-id").inputValue()) === env("VIGIL_CLIENT");
    seen.fragment_left = await page.evaluate(() => location.hash);
  } else {
    await page.goto(env("VIGIL_PAGE"));
    await page.getByTestId("client-id").fill(env("VIGIL_CLIENT"));
    await page.getByTestId("token").fill(env("VIGIL_TOKEN"));
  }
  await page.getByTestId("start").click();
  // Record every verdict, action and connection state the page shows.
  await page.exposeFunction("vigilSeen", (kind, text) => seen[kind].push(text));
  await page.evaluate(() => {
    for (const [id, kind] of [["verdict", "verdicts"], ["action", "actions"], ["status", "states"], ["challenge-text", "challenges"]]) {
      const el = document.querySelector(`[data-testid=${id}]`);
      new MutationObserver(() => window.vigilSeen(kind, el.textContent)).observe(el, {
        childList: true,
        characterData: true,
        subtree: true,
      });
    }
  });
  const opts = { timeout: TIMEOUT };
  if (scenario === "ok") {
    await page.getByTestId("verdict").filter({ hasText: /^ok$/ }).waitFor(opts);
    await page.screenshot({ path: `${shots}/candidate-ok.png` });
    ok = await page.getByTestId("lock").isHidden();
  } else if (scenario === "locked") {
    await page.getByTestId("lock").waitFor({ state: "visible", ...opts });
    await page.screenshot({ path: `${shots}/candidate-locked.png` });
    ok = (await page.getByTestId("action").textContent()).startsWith("lock_screen");
  } else if (scenario === "blocked") {
    await page.getByTestId("verdict").filter({ hasNotText: /^—$/ }).waitFor(opts);
    const client = env("VIGIL_CLIENT");
    const res = await fetch(`${env("VIGIL_ADMIN")}/v1/admin/clients/${client}/block`, {
      method: "POST",
      headers: { authorization: `Bearer ${env("VIGIL_ADMIN_TOKEN")}` },
    });
    seen.block = res.status;
    await page.getByTestId("ended").waitFor({ state: "visible", ...opts });
    await page.screenshot({ path: `${shots}/candidate-blocked.png` });
    ok = res.status === 200 && (await page.getByTestId("status").getAttribute("data-state")) === "blocked";
  } else if (scenario === "console") {
    await page.getByTestId("lock").waitFor({ state: "visible", ...opts });
    const client = env("VIGIL_CLIENT");
    operator = await (await browser.newContext({ viewport: { width: 1300, height: 900 } })).newPage();
    await operator.goto(`${env("VIGIL_ADMIN")}/console/`);
    await operator.getByTestId("admin-token").fill(env("VIGIL_ADMIN_TOKEN"));
    await operator.getByTestId("sign-in").click();
    // The live session, with the verdict its edge reported.
    await operator.getByTestId(`connection-${client}`).filter({ hasText: /^active$/ }).waitFor(opts);
    await operator.getByTestId(`verdict-${client}`).filter({ hasText: "wrong_person" }).waitFor(opts);
    seen.console = { verdict: await operator.getByTestId(`verdict-${client}`).textContent() };
    await operator.screenshot({ path: `${shots}/console-live.png` });
    // The audit view: the lock with its evidence frames beside the enrolled reference (the
    // writer may still be storing it: look again until it is there).
    const frame = operator.locator("[data-testid=audit-action] [data-testid=evidence-frame][data-loaded=true]");
    const deadline = Date.now() + TIMEOUT;
    while ((await frame.count()) === 0 && Date.now() < deadline) {
      await operator.getByTestId(`audit-${client}`).click();
      await operator.waitForTimeout(1000);
    }
    await operator.locator("[data-testid=reference][data-loaded=true]").waitFor(opts);
    seen.console.evidence = await frame.count();
    seen.console.chain = await operator.getByTestId("audit-chain").textContent();
    seen.console.key = await operator.getByTestId("audit-key").getAttribute("data-state");
    await operator.getByTestId("audit-chain").scrollIntoViewIfNeeded();
    await operator.screenshot({ path: `${shots}/console-audit.png`, fullPage: true });
    // A console that pinned another writer's key sounds the alarm on the next view, and can
    // pin this one instead.
    await operator.evaluate(() => localStorage.setItem("vigil.console.audit-key", "00112233445566778899aabbccddeeff"));
    await operator.getByTestId(`audit-${client}`).click();
    await operator.locator("[data-testid=audit-key][data-state=changed]").waitFor(opts);
    seen.console.keyChanged = await operator.getByTestId("audit-key").textContent();
    await operator.getByTestId("audit-key").scrollIntoViewIfNeeded();
    await operator.screenshot({ path: `${shots}/console-key-changed.png` });
    await operator.getByTestId("audit-key-accept").click();
    await operator.locator("[data-testid=audit-key][data-state=pinned]").waitFor(opts);
    // A new client, added and enrolled from a photo file through the console.
    await operator.getByTestId("new-id").fill("newcomer");
    await operator.getByTestId("new-name").fill("A newcomer");
    await operator.getByTestId("add").click();
    await operator.getByTestId("new-token").filter({ hasText: "Token (shown once)" }).waitFor(opts);
    await operator.getByTestId("enroll-newcomer").click();
    await operator.getByTestId("enroll-files").setInputFiles(env("VIGIL_ENROLL_PHOTO"));
    await operator.getByTestId("enroll-submit").click();
    await operator.locator("[data-testid=enroll-result][data-status]").waitFor(opts);
    seen.console.enroll = await operator.getByTestId("enroll-result").textContent();
    await operator.screenshot({ path: `${shots}/console-enrolled.png`, fullPage: true });
    // The operator blocks the candidate; the candidate's page says so.
    await operator.getByTestId(`block-${client}`).click();
    await page.getByTestId("ended").waitFor({ state: "visible", ...opts });
    await operator.getByTestId(`status-${client}`).filter({ hasText: /^blocked$/ }).waitFor(opts);
    await page.screenshot({ path: `${shots}/candidate-blocked-by-console.png` });
    await operator.screenshot({ path: `${shots}/console-blocked.png` });
    ok =
      seen.console.evidence > 0 &&
      seen.console.enroll.startsWith("newcomer enrolled") &&
      seen.console.chain.startsWith("intact") &&
      seen.console.key === "pinned" &&
      seen.console.keyChanged.startsWith("KEY CHANGED") &&
      (await page.getByTestId("status").getAttribute("data-state")) === "blocked";
  } else if (scenario === "challenge") {
    const challenge = page.locator("[data-testid=challenge][data-state=active]");
    await challenge.waitFor({ state: "visible", ...opts });
    await page.getByTestId("challenge-countdown").filter({ hasText: /^\d+ s$/ }).waitFor(opts);
    await page.screenshot({ path: `${shots}/candidate-challenge.png` });
    const text = (id) => page.getByTestId(id).textContent();
    seen.challenge = {
      text: await text("challenge-text"),
      step: await text("challenge-step"),
      countdown: await text("challenge-countdown"),
      direction: await challenge.getAttribute("data-direction"),
      reason: await challenge.getAttribute("data-reason"),
      aria_live: await challenge.getAttribute("aria-live"),
      role: await challenge.getAttribute("role"),
      mirrored: await page.locator("#preview").evaluate((v) => getComputedStyle(v).transform === "matrix(-1, 0, 0, 1, 0, 0)"),
    };
    const c = seen.challenge;
    ok =
      /your (left|right)$/.test(c.text) &&
      c.text.endsWith(c.direction) &&
      /^\d+ s$/.test(c.countdown) &&
      /^Step \d+ of \d+$/.test(c.step) &&
      (c.aria_live === "assertive" || ["alert", "status"].includes(c.role));
  } else if (scenario === "signed_out") {
    await page.getByTestId("signed-out").waitFor({ state: "visible", ...opts });
    await page.screenshot({ path: `${shots}/candidate-signed-out.png` });
    seen.signed_out = {
      text: await page.getByTestId("signed-out").textContent(),
      state: await page.getByTestId("status").getAttribute("data-state"),
    };
    const client = env("VIGIL_CLIENT");
    operator = await (await browser.newContext({ viewport: { width: 1300, height: 900 } })).newPage();
    await operator.goto(`${env("VIGIL_ADMIN")}/console/`);
    await operator.getByTestId("admin-token").fill(env("VIGIL_ADMIN_TOKEN"));
    await operator.getByTestId("sign-in").click();
    await operator.getByTestId(`status-${client}`).filter({ hasText: /^signed_out$/ }).waitFor(opts);
    await operator.screenshot({ path: `${shots}/console-signed-out.png` });
    await operator.getByTestId(`readmit-${client}`).click();
    await operator.getByTestId(`status-${client}`).filter({ hasText: /^active$/ }).waitFor(opts);
    seen.signed_out.readmitted = await operator.getByTestId(`status-${client}`).textContent();
    ok =
      seen.signed_out.state === "signed_out" &&
      seen.signed_out.text.includes("Ask your proctor to re-admit you") &&
      seen.signed_out.readmitted === "active";
  } else {
    throw new Error(`unknown scenario ${scenario}`);
  }
} catch (e) {
  seen.error = String(e);
  await operator?.screenshot({ path: `${shots}/console-failure.png`, fullPage: true }).catch(() => {});
} finally {
  await browser.close();
}
// The last few of each, to keep the report short.
for (const k of ["verdicts", "actions", "states", "challenges"]) seen[k] = seen[k].slice(-8);
console.log(JSON.stringify({ ...seen, ok }));
process.exit(ok ? 0 : 1);
