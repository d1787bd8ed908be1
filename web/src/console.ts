// The operator console: sign in with an admin token, watch every client across the cluster,
// manage them, and read each client's audit trail. It talks only to the admin API of the edge
// that serves it (same origin).

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

interface ClientView {
  id: string;
  display_name: string;
  /** `signed_out`: the policy signed the client out; it stays out until re-admitted. */
  status: "active" | "paused" | "blocked" | "signed_out";
  connection: "active" | "deactivated" | "connection_error";
  edge: string | null;
  connected_since_ms: number | null;
  enrolled: boolean;
  fps: number;
  last_verdict: string | null;
  last_action: string | null;
}

let token = sessionStorage.getItem("vigil-admin-token") ?? "";

async function api(method: string, path: string, body?: unknown): Promise<Response> {
  const res = await fetch(path, {
    method,
    headers: {
      authorization: `Bearer ${token}`,
      ...(body === undefined ? {} : { "content-type": "application/json" }),
    },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) signOut("That token is not accepted.");
  return res;
}

function signOut(message = "") {
  token = "";
  sessionStorage.removeItem("vigil-admin-token");
  $("signin").hidden = false;
  $("app").hidden = true;
  $("signin-error").textContent = message;
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  props: Partial<HTMLElementTagNameMap[K]> & { testid?: string } = {},
  ...children: (Node | string)[]
): HTMLElementTagNameMap[K] {
  const { testid, ...rest } = props;
  const node = Object.assign(document.createElement(tag), rest);
  if (testid) node.dataset.testid = testid;
  node.append(...children);
  return node;
}

function since(ms: number | null): string {
  if (!ms) return "—";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 120 ? `${s} s` : `${Math.round(s / 60)} min`;
}

async function act(id: string, path: string, body?: unknown) {
  const res = await api("POST", `/v1/admin/clients/${encodeURIComponent(id)}/${path}`, body);
  $("notice").textContent = res.ok ? `${id}: ${path}${body ? ` ${JSON.stringify(body)}` : ""} done` : `${id}: ${path} failed (${res.status}) ${await res.text()}`;
  await refresh();
}

function row(c: ClientView): HTMLTableRowElement {
  const live = c.connection === "active";
  const button = (label: string, testid: string, run: () => void) =>
    el("button", { type: "button", testid: `${testid}-${c.id}`, textContent: label, onclick: run });
  // A viewer only reads the trail; a proctor acts on candidates; an admin also enrols.
  const acts = role !== "viewer";
  const controls = el(
    "td",
    { className: "controls" },
    !acts
      ? ""
      : c.status === "paused"
        ? button("Resume", "resume", () => act(c.id, "resume"))
        : button("Pause", "pause", () => act(c.id, "pause")),
    !acts
      ? ""
      : c.status === "blocked"
        ? button("Unblock", "unblock", () => act(c.id, "unblock"))
        : button("Block", "block", () => act(c.id, "block")),
    acts && c.status === "signed_out" ? button("Re-admit", "readmit", () => act(c.id, "readmit")) : "",
    ...(acts
      ? [
          button("Kick", "kick", () => act(c.id, "kick")),
          Object.assign(button("Challenge", "challenge", () => act(c.id, "challenge")), {
            disabled: !live,
            title: live ? "Ask the candidate for a liveness check now" : "Only a connected client can be challenged",
          }),
          button("Warn", "warn", () => act(c.id, "action", { action: "warn" })),
          button("Lock", "lock", () => act(c.id, "action", { action: "lock_screen" })),
          button("Sign out", "signout", () => act(c.id, "action", { action: "sign_out" })),
        ]
      : []),
    button("Audit", "audit", () => void showAudit(c.id)),
    role === "admin" ? button(c.enrolled ? "Re-enrol" : "Enrol", "enroll", () => openEnroll(c.id)) : "",
  );
  return el(
    "tr",
    { testid: `row-${c.id}`, className: live ? "live" : "" },
    el("td", { textContent: c.id, title: c.display_name }),
    el("td", { textContent: c.status, testid: `status-${c.id}`, className: `status-${c.status}` }),
    el("td", { textContent: c.connection, testid: `connection-${c.id}` }),
    el("td", { textContent: c.edge ?? "—" }),
    el("td", { textContent: live ? c.fps.toFixed(1) : "—" }),
    el("td", { textContent: c.last_verdict ?? "—", testid: `verdict-${c.id}` }),
    el("td", { textContent: c.last_action ?? "—", testid: `action-${c.id}` }),
    el("td", { textContent: live ? since(c.connected_since_ms) : "—" }),
    controls,
  );
}

/** Clients per page: the console asks for the page it shows, and nothing while hidden. */
const PAGE = 50;
/** The `after` of each page visited, the shown one last ("" for the first). */
const pages: string[] = [""];
let nextAfter: string | null = null;

async function refresh() {
  if (!token || document.hidden) return;
  const after = pages[pages.length - 1];
  const res = await api("GET", `/v1/admin/clients?limit=${PAGE}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
  if (!res.ok) return;
  const clients = (await res.json()) as ClientView[];
  const total = Number(res.headers.get("x-total-count") ?? clients.length);
  nextAfter = /[?&]after=([^&>]+)/.exec(res.headers.get("link") ?? "")?.[1] ?? null;
  const live = clients.filter((c) => c.connection === "active").length;
  const first = (pages.length - 1) * PAGE + 1;
  const noun = total === 1 ? "client" : "clients";
  $("summary").textContent =
    total > clients.length
      ? `${total} ${noun}; ${first}–${first + clients.length - 1} shown, ${live} of them connected`
      : `${total} ${noun}, ${live} connected`;
  $<HTMLButtonElement>("page-prev").disabled = pages.length === 1;
  $<HTMLButtonElement>("page-next").disabled = nextAfter === null;
  $("clients").replaceChildren(...clients.map(row));
}

$("page-next").addEventListener("click", () => {
  if (nextAfter !== null) pages.push(decodeURIComponent(nextAfter));
  void refresh();
});
$("page-prev").addEventListener("click", () => {
  if (pages.length > 1) pages.pop();
  void refresh();
});
document.addEventListener("visibilitychange", () => void refresh());

interface AuditEntry {
  /** `action`, `admin`, `session`, `prune`, or a kind this console does not know yet (shown as it is). */
  kind: string;
  at_ms?: number;
  [k: string]: unknown;
}

/** A value of an entry, as text: scalars as they are, anything else as JSON. */
function text(v: unknown): string {
  return v === null || typeof v !== "object" ? String(v) : JSON.stringify(v);
}

/** An image behind the admin token: fetched with it, shown from a blob. */
function image(url: string, alt: string, testid: string): HTMLImageElement {
  const img = el("img", { alt, testid });
  void api("GET", url).then(async (res) => {
    if (res.ok) {
      img.src = URL.createObjectURL(await res.blob());
      img.dataset.loaded = "true";
    } else {
      img.alt = `${alt} (${res.status})`;
    }
  });
  return img;
}

/** Where the console pins the audit writer's key: the first fingerprint it is shown. */
const PINNED_KEY = "vigil.console.audit-key";

/**
 * The key the audit writer checked the trail with, against the one this console pinned. A different
 * key, or none after one was pinned, is shown as an alarm: a verification under a key the
 * operator never accepted proves nothing.
 */
function showKey(key: string | null) {
  const box = $("audit-key");
  box.dataset.testid = "audit-key";
  const pinned = localStorage.getItem(PINNED_KEY);
  if (key && !pinned) localStorage.setItem(PINNED_KEY, key);
  const accept = el("button", { type: "button", textContent: "Pin this key instead", testid: "audit-key-accept" });
  accept.addEventListener("click", () => {
    if (key) localStorage.setItem(PINNED_KEY, key);
    showKey(key);
  });
  if (key && (!pinned || pinned === key)) {
    box.className = "";
    box.dataset.state = "pinned";
    box.replaceChildren(`writer's key ${key} (pinned in this browser)`);
  } else if (key) {
    box.className = "alarm";
    box.dataset.state = "changed";
    box.replaceChildren(`KEY CHANGED: the trail was verified with ${key}, but this console pinned ${pinned}. `, accept);
  } else {
    box.className = "alarm";
    box.dataset.state = pinned ? "missing" : "none";
    box.replaceChildren(
      pinned
        ? `NO KEY: the audit writer checked this trail without its key; this console pinned ${pinned}.`
        : "NO KEY: the audit writer has no key (VIGIL_AUDIT_KEY), so the trail's signatures are not checked.",
    );
  }
}

async function showAudit(id: string) {
  const view = $("audit");
  view.hidden = false;
  $("audit-client").textContent = id;
  const res = await api("GET", `/v1/admin/audit/clients/${encodeURIComponent(id)}`);
  const list = $("audit-entries");
  if (!res.ok) {
    list.replaceChildren(el("li", { textContent: `the audit trail is not available (${res.status}): ${await res.text()}` }));
    return;
  }
  const body = (await res.json()) as {
    verification: string;
    key: string | null;
    reference: string | null;
    entries: AuditEntry[];
    total?: number;
  };
  const chain = $("audit-chain");
  const shown = body.entries.length;
  chain.textContent =
    body.total !== undefined && body.total > shown
      ? `${body.verification} Showing the newest ${shown} of this client's ${body.total} entries.`
      : body.verification;
  chain.dataset.testid = "audit-chain";
  showKey(body.key);
  const items = body.entries.map((e) => {
    const when = e.at_ms ? new Date(e.at_ms).toLocaleString() : "";
    if (e.kind === "action") {
      const evidence = Array.isArray(e.evidence) ? (e.evidence as { url: string; verdict: string }[]) : [];
      const frames = evidence.map((f) =>
        el("figure", {}, image(f.url, f.verdict, "evidence-frame"), el("figcaption", { textContent: f.verdict })),
      );
      const reference = body.reference
        ? el("figure", { className: "reference" }, image(body.reference, "enrolled reference", "reference"), el("figcaption", { textContent: "enrolled" }))
        : "";
      return el(
        "li",
        { testid: "audit-action" },
        el("strong", { textContent: `${e.action} (${e.reason})` }),
        ` ${when}${e.origin ? `, ${e.origin}` : ""}${e.operator ? ` by ${e.operator}` : ""}${e.rule ? `, rule: ${e.rule}` : ""}`,
        el("div", { className: "evidence" }, reference, ...frames),
      );
    }
    if (e.kind === "admin") {
      return el("li", { testid: "audit-admin" }, el("strong", { textContent: String(e.operation) }), ` ${when}, by ${e.operator} on ${e.source}`);
    }
    if (e.kind === "session") {
      const why = e.event === "ended" && e.reason ? ` (${e.reason})` : "";
      return el("li", { testid: "audit-session" }, el("strong", { textContent: `session ${e.event}${why}` }), ` ${when} on ${e.source}${e.address ? ` from ${e.address}` : ""}`);
    }
    if (e.kind === "prune") return el("li", {}, `evidence pruned ${when}`);
    // A kind this console does not know (a challenge, …): its name and its fields, as text.
    const { kind, at_ms: _, ...rest } = e;
    const headline = [rest.reason ?? rest.operation ?? rest.result].filter((x) => x !== undefined).map(text);
    const fields = Object.entries(rest)
      .filter(([, v]) => v !== undefined && v !== null && v !== "")
      .map(([k, v]) => `${k}: ${text(v)}`)
      .join(", ");
    return el(
      "li",
      { testid: "audit-note" },
      el("strong", { textContent: `${String(kind).replace(/_/g, " ")}${headline.length ? ` (${headline.join(", ")})` : ""}` }),
      ` ${when}${fields ? `, ${fields}` : ""}`,
    );
  });
  list.replaceChildren(...(items.length ? items : [el("li", { textContent: "nothing recorded" })]));
}

$<HTMLFormElement>("signin").addEventListener("submit", async (e) => {
  e.preventDefault();
  token = $<HTMLInputElement>("admin-token").value.trim();
  const res = await api("GET", "/v1/admin/clients?limit=1");
  if (!res.ok) return;
  sessionStorage.setItem("vigil-admin-token", token);
  await start();
});

$<HTMLFormElement>("add").addEventListener("submit", async (e) => {
  e.preventDefault();
  const id = $<HTMLInputElement>("new-id").value.trim();
  const name = $<HTMLInputElement>("new-name").value.trim();
  const res = await api("POST", "/v1/admin/clients", { id, name });
  const body = await res.json().catch(() => ({}));
  $("new-token").textContent = res.ok
    ? `${id} added. Token (shown once): ${body.token}`
    : `not added: ${body.error ?? res.status}`;
  await refresh();
});

// Enrolment: photos from files or from the operator's camera, judged by a worker's model stack.
let enrollFor = "";
const captured: Blob[] = [];
let camera: MediaStream | undefined;

function openEnroll(id: string) {
  enrollFor = id;
  captured.length = 0;
  $("enroll-client").textContent = id;
  $("enroll-result").textContent = "";
  $("enroll-captured").textContent = "";
  $("enroll").hidden = false;
}

function closeCamera() {
  camera?.getTracks().forEach((t) => t.stop());
  camera = undefined;
  $("enroll-video").hidden = true;
}

$("enroll-camera").addEventListener("click", async () => {
  const video = $<HTMLVideoElement>("enroll-video");
  if (!camera) {
    camera = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 } }, audio: false });
    video.srcObject = camera;
    video.hidden = false;
    await video.play();
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d")?.drawImage(video, 0, 0);
  const blob = await new Promise<Blob | null>((r) => canvas.toBlob(r, "image/jpeg", 0.9));
  if (blob) captured.push(blob);
  $("enroll-captured").textContent = `${captured.length} photo(s) captured`;
});

async function toBase64(blob: Blob): Promise<string> {
  const bytes = new Uint8Array(await blob.arrayBuffer());
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

$<HTMLFormElement>("enroll").addEventListener("submit", async (e) => {
  e.preventDefault();
  const files = [...($<HTMLInputElement>("enroll-files").files ?? [])];
  const photos = await Promise.all([...files, ...captured].map(toBase64));
  const result = $("enroll-result");
  result.textContent = "checking with the model stack…";
  const res = await api("POST", `/v1/admin/clients/${encodeURIComponent(enrollFor)}/enroll`, { photos });
  const body = await res.json().catch(() => ({}));
  result.dataset.status = String(res.status);
  result.textContent = res.ok
    ? `${enrollFor} enrolled from ${body.photos} photo(s) (${body.model}); similarities ${body.similarities
        .map((x: number) => x.toFixed(3))
        .join(", ")}; margin ${body.margin.toFixed(3)}`
    : `not enrolled: ${body.error ?? res.status}`;
  closeCamera();
  await refresh();
});

$("enroll-close").addEventListener("click", () => {
  closeCamera();
  $("enroll").hidden = true;
});

$("sign-out").addEventListener("click", () => signOut());
$("audit-close").addEventListener("click", () => ($("audit").hidden = true));

/** The signed-in operator's role: what the API allows them, so what the console offers. */
let role: "viewer" | "proctor" | "admin" = "viewer";

async function whoami() {
  const res = await api("GET", "/v1/admin/me");
  if (!res.ok) return;
  const me = (await res.json()) as { operator: string; role: typeof role };
  role = me.role;
  const who = $("whoami");
  who.textContent = `${me.operator} (${me.role})`;
  who.dataset.role = me.role;
  // Adding clients is an admin's; the API refuses it to the others anyway.
  $("add").hidden = role !== "admin";
}

let timer: ReturnType<typeof setInterval> | undefined;
async function start() {
  $("signin").hidden = true;
  $("app").hidden = false;
  clearInterval(timer);
  await whoami();
  void refresh();
  timer = setInterval(() => void refresh(), 1000);
}

if (token) void start();
