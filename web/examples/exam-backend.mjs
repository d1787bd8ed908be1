// A minimal exam platform back end that adds Vigil, to copy from. No dependencies: Node.js 20.
//
// 1. GET /exam/start?candidate=ID mints a short-lived Vigil session token for the candidate
//    (POST /v1/admin/sessions, with the platform's operator token, server-side only) and sends
//    the candidate's browser to Vigil's page with it in the URL fragment, which browsers never
//    send to a server. The candidate's permanent token never leaves Vigil.
// 2. POST /webhooks/vigil receives Vigil's webhooks: it checks the Standard Webhooks signature
//    and timestamp, drops repeats by `webhook-id` (delivery is at least once), and acts on the
//    event. Here it only records it; a real platform would, say, pause the exam on
//    `action.lock_screen` and end it on `action.sign_out`.
// 3. GET /exam/events lists what was received (a real platform keeps it in its database).
//
// Settings (environment):
//   VIGIL_ADMIN_URL       the edge's admin API, e.g. https://vigil.example.org:8444
//   VIGIL_ADMIN_TOKEN     an operator token for the platform (`vigil operators add exam-platform`)
//   VIGIL_PAGE_URL        Vigil's candidate page, e.g. https://vigil.example.org:8443/
//   VIGIL_WEBHOOK_SECRET  the webhook secret, `whsec_...` (the same as the audit writer's)
//   SESSION_TTL_S         how long a minted token opens sessions (default 10800: 3 hours)
//   HOST, PORT            where this server listens (default 127.0.0.1:3000)
// A private CA for Vigil's certificate: NODE_EXTRA_CA_CERTS=/path/to/ca.pem.
import crypto from "node:crypto";
import http from "node:http";

const env = (name, fallback) => {
  const v = process.env[name] ?? fallback;
  if (v === undefined) throw new Error(`set ${name}`);
  return v;
};
const ADMIN_URL = env("VIGIL_ADMIN_URL").replace(/\/$/, "");
const ADMIN_TOKEN = env("VIGIL_ADMIN_TOKEN");
const PAGE_URL = env("VIGIL_PAGE_URL");
const SECRET = Buffer.from(env("VIGIL_WEBHOOK_SECRET").replace(/^whsec_/, ""), "base64");
const TTL_S = Number(env("SESSION_TTL_S", "10800"));
const MAX_BODY = 1 << 20;
const TOLERANCE_S = 5 * 60;

/** What the platform received, by webhook-id (the audit entry's id). */
const events = new Map();

/** Standard Webhooks: HMAC-SHA256 over `id.timestamp.body`, base64, one of the `v1,` values. */
function verify(headers, body) {
  const id = headers["webhook-id"];
  const timestamp = headers["webhook-timestamp"];
  const signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) return "missing webhook headers";
  const age = Math.abs(Date.now() / 1000 - Number(timestamp));
  if (!Number.isFinite(age) || age > TOLERANCE_S) return "timestamp too far from now";
  const expected = crypto.createHmac("sha256", SECRET).update(`${id}.${timestamp}.`).update(body).digest();
  const ok = signatures.split(" ").some((s) => {
    if (!s.startsWith("v1,")) return false;
    const given = Buffer.from(s.slice(3), "base64");
    return given.length === expected.length && crypto.timingSafeEqual(given, expected);
  });
  return ok ? null : "no matching signature";
}

async function mint(candidate) {
  const res = await fetch(`${ADMIN_URL}/v1/admin/sessions`, {
    method: "POST",
    headers: { authorization: `Bearer ${ADMIN_TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ client_id: candidate, ttl_s: TTL_S }),
    signal: AbortSignal.timeout(10_000),
  });
  const body = await res.json().catch(() => ({}));
  if (res.status !== 201) throw new Error(`Vigil refused the session (${res.status}): ${body.error ?? ""}`);
  return body.token;
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.setTimeout(10_000, () => req.destroy(new Error("body too slow")));
    req.on("data", (c) => {
      size += c.length;
      if (size > MAX_BODY) req.destroy(new Error("body too large"));
      else chunks.push(c);
    });
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

function send(res, status, body, headers = {}) {
  res.writeHead(status, { "content-type": "application/json", ...headers });
  res.end(body === undefined ? "" : JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url ?? "/", "http://platform");
  try {
    if (req.method === "GET" && url.pathname === "/exam/start") {
      const candidate = url.searchParams.get("candidate") ?? "";
      if (!/^[A-Za-z0-9_.-]{1,64}$/.test(candidate)) return send(res, 400, { error: "candidate: 1 to 64 of A-Z a-z 0-9 _ . -" });
      const token = await mint(candidate);
      const page = `${PAGE_URL}#client=${encodeURIComponent(candidate)}&token=${encodeURIComponent(token)}`;
      return send(res, 302, undefined, { location: page, "cache-control": "no-store", "referrer-policy": "no-referrer" });
    }
    if (req.method === "POST" && url.pathname === "/webhooks/vigil") {
      const body = await readBody(req);
      const problem = verify(req.headers, body);
      if (problem) return send(res, 401, { error: problem });
      const id = req.headers["webhook-id"];
      if (!events.has(id)) {
        const event = JSON.parse(body.toString("utf8"));
        events.set(id, event);
        console.log(`${event.data.client_id}: ${event.type}${event.data.reason ? ` (${event.data.reason})` : ""}`);
      }
      return send(res, 204);
    }
    if (req.method === "GET" && url.pathname === "/exam/events") {
      return send(res, 200, [...events.entries()].map(([id, event]) => ({ id, ...event })));
    }
    send(res, 404, { error: "not found" });
  } catch (e) {
    send(res, 502, { error: String(e.message ?? e) });
  }
});
server.headersTimeout = 10_000;
server.requestTimeout = 15_000;
server.listen(Number(env("PORT", "3000")), env("HOST", "127.0.0.1"), () => {
  const { address, port } = server.address();
  console.log(`exam platform on http://${address}:${port}`);
});
