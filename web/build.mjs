// Bundle the SDK, the candidate page and the frame encoder into dist/, next to the static
// files of public/. The edge serves dist/ (VIGIL_WEB_DIR) at `/`.
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync, statSync, readdirSync } from "node:fs";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist", { recursive: true });
const common = {
  bundle: true,
  minify: true,
  sourcemap: false,
  target: ["chrome110", "firefox115", "safari16"],
  legalComments: "none",
  logLevel: "warning",
};
await build({ ...common, entryPoints: ["src/candidate.ts"], outfile: "dist/candidate.js", format: "esm" });
await build({ ...common, entryPoints: ["src/encoder.worker.ts"], outfile: "dist/encoder.js", format: "esm" });
// The SDK alone, for integrators' own pages.
await build({ ...common, entryPoints: ["src/sdk.ts"], outfile: "dist/vigil-sdk.js", format: "esm" });
// The operator console, served by the admin API at /console/.
await build({ ...common, entryPoints: ["src/console.ts"], outfile: "dist/console/console.js", format: "esm" });
cpSync("public", "dist", { recursive: true });
for (const dir of ["dist", "dist/console"]) {
  for (const f of readdirSync(dir)) {
    if (statSync(`${dir}/${f}`).isFile()) console.log(`${dir}/${f}  ${statSync(`${dir}/${f}`).size} bytes`);
  }
}
