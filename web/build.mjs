// Bundle the SDK, the candidate page and the frame encoder into dist/, next to the static
// files of public/. The edge serves dist/ (VIGIL_WEB_DIR) at `/`.
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync, statSync, readdirSync } from "node:fs";
import { execFileSync } from "node:child_process";

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
// The SDK as an npm package (sdk/, `npm pack` there): an ES module that imports its one
// dependency, the encoder worker, and the type declarations made by tsc from the same source.
rmSync("sdk/dist", { recursive: true, force: true });
const pkg = { ...common, minify: false, format: "esm" };
await build({ ...pkg, entryPoints: ["src/sdk.ts"], outfile: "sdk/dist/index.js", external: ["@msgpack/msgpack"] });
await build({ ...pkg, entryPoints: ["src/encoder.worker.ts"], outfile: "sdk/dist/encoder.js" });
execFileSync(
  "node_modules/.bin/tsc",
  ["-p", "tsconfig.json", "--declaration", "--emitDeclarationOnly", "--noEmit", "false", "--outDir", "sdk/types"],
  { stdio: "inherit" },
);
cpSync("sdk/types/sdk.d.ts", "sdk/dist/index.d.ts");
rmSync("sdk/types", { recursive: true, force: true });
// The operator console, served by the admin API at /console/.
await build({ ...common, entryPoints: ["src/console.ts"], outfile: "dist/console/console.js", format: "esm" });
cpSync("public", "dist", { recursive: true });
for (const dir of ["dist", "dist/console"]) {
  for (const f of readdirSync(dir)) {
    if (statSync(`${dir}/${f}`).isFile()) console.log(`${dir}/${f}  ${statSync(`${dir}/${f}`).size} bytes`);
  }
}
