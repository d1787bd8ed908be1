// Debian's Chromium, headless, with a fake camera playing `y4m` (real footage; without one,
// Chromium's own test pattern) and camera permission granted, for the e2e scenarios and the
// benchmark. Nothing is downloaded.
import { chromium } from "playwright-core";

export function launch(y4m) {
  return chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--use-fake-ui-for-media-stream",
      "--use-fake-device-for-media-stream",
      ...(y4m ? [`--use-file-for-fake-video-capture=${y4m}`] : []),
      // A server key to trust (base64 SHA-256 of its SPKI): a test's own certificate, for
      // https:// pages, where browsers give the camera.
      ...(process.env.VIGIL_TRUST_SPKI ? [`--ignore-certificate-errors-spki-list=${process.env.VIGIL_TRUST_SPKI}`] : []),
    ],
  });
}
