// What the SDK sustains in headless Chromium: frames per second at 640x480, JPEG encode time per
// frame, and main-thread time per frame, streaming a fake camera (real footage) through the
// candidate page to a live edge. Prints one JSON object.
//
// Environment: VIGIL_PAGE, VIGIL_CLIENT, VIGIL_TOKEN, VIGIL_Y4M; BENCH_FPS (30), BENCH_SECONDS (20).
import { launch } from "./chromium.mjs";
import { statSync } from "node:fs";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const fps = Number(process.env.BENCH_FPS ?? 30);
const seconds = Number(process.env.BENCH_SECONDS ?? 20);
const browser = await launch(env("VIGIL_Y4M"));
try {
  const page = await (await browser.newContext()).newPage();
  await page.goto(`${env("VIGIL_PAGE")}?fps=${fps}`);
  await page.getByTestId("client-id").fill(env("VIGIL_CLIENT"));
  await page.getByTestId("token").fill(env("VIGIL_TOKEN"));
  await page.getByTestId("start").click();
  await page.getByTestId("verdict").filter({ hasNotText: /^—$/ }).waitFor({ timeout: 60_000 });
  const stats = () => page.evaluate(() => window.vigil.stats());
  await page.waitForTimeout(2000);
  const before = await stats();
  await page.waitForTimeout(seconds * 1000);
  const after = await stats();
  const span = after.seconds - before.seconds;
  const size = await page.evaluate(() => {
    const v = document.querySelector("video");
    return `${v.videoWidth}x${v.videoHeight}`;
  });
  const report = {
    camera: size,
    asked_fps: fps,
    seconds: Number(span.toFixed(1)),
    sent_per_s: Number(((after.sent - before.sent) / span).toFixed(1)),
    results_per_s: Number(((after.results - before.results) / span).toFixed(1)),
    dropped: after.dropped - before.dropped,
    held_back_by_max_inflight: after.heldBack - before.heldBack,
    encode_ms: { mean: Number(after.encodeMs.mean.toFixed(2)), p95: Number(after.encodeMs.p95.toFixed(2)) },
    main_thread_ms: { mean: Number(after.mainThreadMs.mean.toFixed(2)), p95: Number(after.mainThreadMs.p95.toFixed(2)) },
    encoder_off_main_thread: after.offMainThread,
    bundle_bytes: {
      "vigil-sdk.js": statSync("dist/vigil-sdk.js").size,
      "candidate.js": statSync("dist/candidate.js").size,
      "encoder.js": statSync("dist/encoder.js").size,
    },
  };
  console.log(JSON.stringify(report, null, 2));
} finally {
  await browser.close();
}
