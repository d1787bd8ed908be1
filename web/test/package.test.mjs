// The SDK as an integrator gets it: `npm pack` of sdk/, installed into a fresh TypeScript
// project, which must type-check against it (and fail to when it misuses the types).
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

const web = resolve(import.meta.dirname, "..");
const tsc = join(web, "node_modules/typescript/bin/tsc");

test("npm pack of the SDK installs into a fresh TypeScript project that type-checks", { timeout: 180_000 }, () => {
  const project = mkdtempSync(join(tmpdir(), "vigil-sdk-consumer-"));
  try {
    const packed = execFileSync("npm", ["pack", "--silent", "--pack-destination", project], {
      cwd: join(web, "sdk"),
      encoding: "utf8",
    }).trim().split("\n").pop();
    const tarball = join(project, packed);
    assert.ok(existsSync(tarball), `npm pack made ${tarball}`);
    writeFileSync(join(project, "package.json"), JSON.stringify({ name: "consumer", private: true, type: "module" }));
    execFileSync("npm", ["install", "--no-audit", "--no-fund", "--prefer-offline", tarball], {
      cwd: project,
      stdio: "inherit",
    });
    for (const f of ["index.js", "index.d.ts", "encoder.js"]) {
      assert.ok(existsSync(join(project, "node_modules/@vigil/sdk/dist", f)), `the package ships dist/${f}`);
    }
    writeFileSync(
      join(project, "tsconfig.json"),
      JSON.stringify({
        compilerOptions: {
          target: "ES2022",
          module: "ES2022",
          moduleResolution: "bundler",
          lib: ["ES2022", "DOM"],
          strict: true,
          noEmit: true,
        },
        include: ["*.ts"],
      }),
    );
    writeFileSync(
      join(project, "exam.ts"),
      `import { VigilClient, closeDecision, type Verdict, type ActionMsg, type ChallengeEvent } from "@vigil/sdk";
const client = new VigilClient({ url: "wss://proctoring.example/v1/stream", clientId: "c1", token: "eyJ..." });
client.on("result", (r) => {
  if (r.analysis.kind === "identity") {
    const v: Verdict = r.analysis.verdict;
    const faces: number = r.analysis.faces.length;
    console.log(v, faces);
  } else {
    console.log(r.analysis.width, r.analysis.height);
  }
});
client.on("action", (a: ActionMsg) => console.log(a.action === "sign_out"));
client.on("challenge", (c: ChallengeEvent) => console.log(c.steps.map((s) => s.kind), c.expiresAt));
client.on("challenge_result", (c) => console.log(c.passed));
client.on("capture", (c) => console.log(c.state === "camera_lost"));
client.on("state", (s) => console.log(s.state, closeDecision(4401)));
`,
    );
    const ok = spawnSync("node", [tsc, "-p", "."], { cwd: project, encoding: "utf8" });
    assert.equal(ok.status, 0, `the consumer type-checks:\n${ok.stdout}${ok.stderr}`);
    // Misuse is caught: a verdict that does not exist, an event that does not exist.
    writeFileSync(
      join(project, "wrong.ts"),
      `import { VigilClient, type Verdict } from "@vigil/sdk";
const v: Verdict = "probably_fine";
new VigilClient({ url: "", clientId: "", token: "" }).on("no_such_event", () => {});
console.log(v);
`,
    );
    const wrong = spawnSync("node", [tsc, "-p", "."], { cwd: project, encoding: "utf8" });
    assert.notEqual(wrong.status, 0, "misuse must not type-check");
    assert.match(wrong.stdout, /probably_fine/);
    assert.match(wrong.stdout, /no_such_event/);
  } finally {
    rmSync(project, { recursive: true, force: true });
  }
});
