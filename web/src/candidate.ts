// The candidate page: the camera preview, the live verdict, and what the policy did.

import { VigilClient, type ActionMsg, type StateChange } from "./sdk";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

const form = $<HTMLFormElement>("signin");
const clientId = $<HTMLInputElement>("client-id");
const token = $<HTMLInputElement>("token");
const preview = $<HTMLVideoElement>("preview");
const verdict = $("verdict");
const verdictWhy = $("verdict-why");
const action = $("action");
const status = $("status");
const banner = $("banner");
const lock = $("lock");
const lockReason = $("lock-reason");
const ended = $("ended");
const endedTitle = $("ended-title");
const endedDetail = $("ended-detail");

const params = new URLSearchParams(location.search);
clientId.value = params.get("client") ?? "";

const REASONS: Record<string, string> = {
  ok: "you are verified",
  no_face: "no face in view",
  multiple_faces: "more than one person in view",
  low_quality: "your face is hard to see: face the camera, add light",
  spoof: "this does not look like a live camera",
  wrong_person: "this is not the enrolled person",
  phone: "a phone is in view",
  no_frames: "the camera stopped sending",
  admin: "an administrator",
};

function showAction(a: ActionMsg) {
  action.textContent = `${a.action} (${a.reason})`;
  const why = REASONS[a.reason] ?? a.reason;
  switch (a.action) {
    case "allow":
      banner.hidden = true;
      lock.hidden = true;
      break;
    case "warn":
      banner.textContent = `Warning: ${why}`;
      banner.hidden = false;
      break;
    case "lock_screen":
      lockReason.textContent = why;
      lock.hidden = false;
      break;
    case "sign_out":
      end("Signed out", `The session was ended: ${why}.`);
      client?.stop("stopped", "sign_out");
      break;
  }
}

function end(title: string, detail: string) {
  endedTitle.textContent = title;
  endedDetail.textContent = detail;
  ended.hidden = false;
}

function showState(s: StateChange) {
  const words: Record<string, string> = {
    connecting: "connecting",
    streaming: "streaming",
    paused: "paused by an administrator",
    reconnecting: `reconnecting${s.retryInMs !== undefined ? ` in ${(s.retryInMs / 1000).toFixed(1)} s` : ""}`,
    stopped: "stopped",
    replaced: "replaced by a newer session",
    blocked: "blocked",
    unauthorized: "unknown client or wrong token",
    kicked: "disconnected by an administrator",
    refused: "refused",
  };
  status.textContent = words[s.state] ?? s.state;
  status.dataset.state = s.state;
  if (s.state === "blocked") end("Blocked", "An administrator blocked this client. Contact your proctor.");
  if (s.state === "replaced") end("Session moved", "This client was opened somewhere else.");
  if (s.state === "unauthorized") form.hidden = false;
}

let client: VigilClient | undefined;

form.addEventListener("submit", async (e) => {
  e.preventDefault();
  client?.stop();
  ended.hidden = true;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  client = new VigilClient({
    url: `${scheme}://${location.host}/v1/stream`,
    clientId: clientId.value.trim(),
    token: token.value.trim(),
    preview,
    fps: Number(params.get("fps") ?? 5),
    workerUrl: new URL("encoder.js", location.href),
  });
  client.on("result", (r) => {
    verdict.textContent = r.analysis.verdict ?? r.analysis.kind;
    verdict.dataset.verdict = r.analysis.verdict ?? "";
    verdictWhy.textContent = r.analysis.verdict ? `(${REASONS[r.analysis.verdict] ?? ""})` : "";
  });
  client.on("action", showAction);
  // For benchmarks and support: the client's own measurements.
  (window as unknown as { vigil: VigilClient }).vigil = client;
  client.on("state", showState);
  client.on("error", (m) => (status.title = `${m.code}: ${m.message}`));
  form.hidden = true;
  try {
    await client.start();
  } catch (err) {
    form.hidden = false;
    status.textContent = `camera: ${(err as Error).message}`;
  }
});
